//! Header rewriting: hop-by-hop stripping (RFC 9110 §7.6.1), `X-Forwarded-*`, request ids,
//! and the small header-derived decisions (host, upgrade, JSON preference).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Version};

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_ESCALE_ERROR: HeaderName = HeaderName::from_static("x-escale-error");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// The host a request is addressed to: the URI authority (HTTP/2 `:authority`, absolute-form)
/// wins over the `Host` header, as RFC 9112 §3.2.2 asks. The `Host` header's value is shared,
/// not copied.
pub(crate) fn request_host<B>(req: &Request<B>) -> Option<HeaderValue> {
    if let Some(a) = req.uri().authority() {
        return HeaderValue::from_str(a.as_str()).ok();
    }
    let host = req.headers().get(header::HOST)?;
    host.to_str().is_ok().then(|| host.clone())
}

/// True when `value` (a comma-separated header) contains `token`, ignoring case.
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// An HTTP/1.1 upgrade request (`Connection: upgrade` plus an `Upgrade` header).
pub(crate) fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && has_token(req.headers(), &header::CONNECTION, "upgrade")
}

/// Hop-by-hop by name (RFC 9110 §7.6.1), besides the headers a `Connection` header names:
/// `Connection`, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == KEEP_ALIVE
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || name.as_str().starts_with("proxy-")
}

/// Removes hop-by-hop headers: `Connection` and the headers it names, `Keep-Alive`,
/// `Proxy-*`, `TE` (except `trailers`), `Trailer`, `Transfer-Encoding`, and `Upgrade` unless
/// `upgrading` (then `Connection: upgrade` is set again).
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // The common case, checked with one scan: nothing to remove.
    if !upgrading && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let te_trailers = has_token(headers, &header::TE, "trailers");
    let named = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok());
    let hop: Vec<HeaderName> = headers
        .keys()
        .filter(|k| is_hop_by_hop(k))
        .cloned()
        .chain(named)
        .filter(|n| !(upgrading && *n == header::UPGRADE))
        .collect();
    for name in hop {
        headers.remove(&name);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Appends `ip` in its usual text form (IPv4 by hand: this runs for every request).
pub(crate) fn push_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                if octet >= 100 {
                    out.push(b'0' + octet / 100);
                }
                if octet >= 10 {
                    out.push(b'0' + octet / 10 % 10);
                }
                out.push(b'0' + octet % 10);
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write as _;
            let _ = write!(out, "{v6}");
        }
    }
}

/// A request id we keep: 1 to 128 characters from `[A-Za-z0-9._:+/=-]`.
pub(crate) fn is_sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._:+/=-".contains(c))
}

/// Generates request ids: a random per-process prefix and a counter, 32 hex digits.
#[derive(Debug)]
pub(crate) struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        RequestIds {
            prefix: rand::random(),
            next: AtomicU64::new(rand::random::<u32>() as u64),
        }
    }

    /// Keeps a sane incoming `X-Request-Id`, otherwise sets a fresh one; returns the value.
    pub(crate) fn ensure(&self, headers: &mut HeaderMap) -> HeaderValue {
        if let Some(v) = headers.get(&X_REQUEST_ID) {
            if is_sane_request_id(v) && headers.get_all(&X_REQUEST_ID).iter().count() == 1 {
                return v.clone();
            }
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 32];
        let digits = (u128::from(self.prefix) << 64) | u128::from(n);
        for (i, d) in id.iter_mut().enumerate() {
            *d = b"0123456789abcdef"[((digits >> (124 - 4 * i)) & 0xf) as usize];
        }
        let v = HeaderValue::from_bytes(&id).expect("hex digits are a valid header value");

        headers.insert(&X_REQUEST_ID, v.clone());
        v
    }
}

/// True when the client's `Accept` prefers `application/json` over HTML and plain text.
pub(crate) fn prefers_json(headers: &HeaderMap) -> bool {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let mut json_q = None;
    let mut text_q: f32 = -1.0;
    for item in accept.split(',') {
        let mut parts = item.split(';');
        let media = parts.next().unwrap_or("").trim();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        if media.eq_ignore_ascii_case("application/json") {
            json_q = Some(q);
        } else if media.eq_ignore_ascii_case("text/html")
            || media.eq_ignore_ascii_case("text/plain")
        {
            text_q = text_q.max(q);
        }
    }
    json_q.is_some_and(|q| q > 0.0 && q >= text_q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-authorization", "basic x"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers, deflate"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert_eq!(h.get("x-kept").unwrap(), "yes");
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn keeps_upgrade_when_upgrading() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get("upgrade").unwrap(), "websocket");
        assert_eq!(h.get("connection").unwrap(), "upgrade");
    }

    #[test]
    fn client_addresses_are_written_as_std_does() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "192.168.100.255",
            "9.99.100.1",
            "2001:db8::7",
            "::1",
        ] {
            let mut out = Vec::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip.as_bytes());
        }
    }

    #[test]
    fn request_id_kept_if_sane() {
        let ids = RequestIds::new();
        let mut h = map(&[("x-request-id", "abc-123")]);
        assert_eq!(ids.ensure(&mut h), "abc-123");
        let mut h = map(&[("x-request-id", "bad id with spaces")]);
        let v = ids.ensure(&mut h);
        assert_eq!(v.len(), 32);
        assert_eq!(h.get("x-request-id").unwrap(), &v);
        let mut h = HeaderMap::new();
        assert_ne!(ids.ensure(&mut h), v);
    }

    #[test]
    fn json_preference() {
        assert!(prefers_json(&map(&[("accept", "application/json")])));
        assert!(!prefers_json(&map(&[(
            "accept",
            "text/html,application/json;q=0.9"
        )])));
        assert!(!prefers_json(&map(&[("accept", "*/*")])));
        assert!(!prefers_json(&HeaderMap::new()));
    }
}

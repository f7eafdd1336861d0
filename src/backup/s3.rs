//! Backups in an S3-compatible object store (`[backup.s3]`): Scaleway, OVH, Hetzner,
//! Exoscale, MinIO, Garage, AWS. A small client of its own: AWS Signature Version 4 ([`sign`],
//! checked against AWS's published vectors), path-style addressing (`endpoint/bucket/key`),
//! one HTTP/1.1 connection per request (hyper; rustls over the system's roots plus
//! `backup.s3.ca_file` for https endpoints).
//!
//! Uploads stream from the sealed file and never hold it in memory. A file of at most
//! [`PART_MIN`] bytes goes in one `PUT`; a larger one in a multipart upload (parts of
//! [`PART_MIN`] or more, at most [`MAX_PARTS`] of them, so every provider's limits hold:
//! Scaleway allows 1,000 parts, a single `PUT` 5 GB). Each request's payload is read twice from
//! the file: once to compute its SHA-256, which is signed (`x-amz-content-sha256`), so the
//! store checks every byte it keeps, and once to send it; memory stays at a buffer per
//! request. A failed multipart upload is aborted (no orphan parts billed); the object's size is
//! checked after the upload. Idempotent requests are retried (3 tries) when the store is
//! unreachable, stalls or answers 5xx.
//!
//! Errors ([`S3Error`]) say what to fix: credentials refused, bucket missing, access denied,
//! endpoint unreachable, TLS (a private CA), timeouts.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::config::S3Settings;

/// Parts of a multipart upload are at least this big (and a file this big or smaller goes in
/// one `PUT`).
pub const PART_MIN: u64 = 16 << 20;
/// Parts of one multipart upload at most (Scaleway's limit; AWS allows 10,000).
pub const MAX_PARTS: u64 = 1000;
/// The SHA-256 of nothing.
pub const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const TRIES: u32 = 3;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Error bodies and XML answers read at most.
const MAX_XML: usize = 4 << 20;

/// Why a request to the object store failed, and what to fix.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("cannot reach the object store at {endpoint}: {reason}: check backup.s3.endpoint and that the store is up and reachable from this host")]
    Unreachable { endpoint: String, reason: String },
    #[error("TLS with the object store at {endpoint} failed: {reason}: if the store's certificate comes from a private CA, give that CA's certificate in backup.s3.ca_file")]
    Tls { endpoint: String, reason: String },
    #[error("the store refused the credentials ({status} {code}): check backup.s3.access_key_id and the secret access key (ESCALE_BACKUP_S3_SECRET_ACCESS_KEY or backup.s3.secret_access_key_file){hint}")]
    Credentials {
        status: u16,
        code: String,
        hint: &'static str,
    },
    #[error("the bucket `{bucket}` does not exist at {endpoint} (404 NoSuchBucket): create it, or fix backup.s3.bucket")]
    NoBucket { bucket: String, endpoint: String },
    #[error("the store denied {op} ({status} {code}): give the access key the right to put, get, list and delete objects in the bucket `{bucket}`")]
    Denied {
        op: &'static str,
        status: u16,
        code: String,
        bucket: String,
    },
    #[error("no object `{key}` in s3://{bucket}")]
    NoObject { bucket: String, key: String },
    #[error("the store answered {status} {code} to {op}: {message}")]
    Store {
        op: &'static str,
        status: u16,
        code: String,
        message: String,
    },
    #[error("{op} took longer than {secs} s: the store at {endpoint} is too slow or stalled")]
    Timeout {
        op: &'static str,
        secs: u64,
        endpoint: String,
    },
    #[error("the object `{key}` has {got} bytes in the store where {want} were sent: the upload is incomplete")]
    Incomplete { key: String, got: u64, want: u64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

type Result<T, E = S3Error> = std::result::Result<T, E>;

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> S3Error {
    let path = path.display().to_string();
    move |source| S3Error::Io { what, path, source }
}

impl S3Error {
    /// Worth another try: the store did not answer, stalled, or failed on its side.
    fn transient(&self) -> bool {
        match self {
            S3Error::Unreachable { .. } | S3Error::Timeout { .. } => true,
            S3Error::Store { status, code, .. } => {
                *status >= 500 || *status == 429 || code == "RequestTimeout"
            }
            _ => false,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Signature Version 4

/// RFC 3986 percent-encoding as SigV4 wants it: everything but `A-Z a-z 0-9 - _ . ~` (and `/`
/// when `keep_slash`, for paths).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// What a request is signed with.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub region: &'a str,
    /// `s3` for the store.
    pub service: &'a str,
}

/// A request as signed: `path` already URI-encoded, `query` and `headers` raw (the headers'
/// names in any case; every one given is signed).
#[derive(Debug, Clone, Copy)]
pub struct Signable<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub headers: &'a [(String, String)],
    /// Hex SHA-256 of the body, or `UNSIGNED-PAYLOAD`.
    pub payload_hash: &'a str,
}

/// The canonical query string: names and values encoded, sorted by name then value.
pub fn canonical_query(query: &[(String, String)]) -> String {
    let mut q: Vec<(String, String)> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, false), uri_encode(v, false)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// The canonical request and the signed headers' list (`host;x-amz-date`).
pub fn canonical_request(r: &Signable<'_>) -> (String, String) {
    let mut headers: Vec<(String, String)> = r
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect();
    headers.sort();
    let signed = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    (
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            r.method,
            r.path,
            canonical_query(r.query),
            canonical_headers,
            signed,
            r.payload_hash
        ),
        signed,
    )
}

fn hmac(key: &[u8], data: &str) -> [u8; 32] {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(data.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The string to sign for `amz_date` (`20150830T123600Z`).
pub fn string_to_sign(c: &Credentials<'_>, amz_date: &str, canonical: &str) -> String {
    let scope = format!(
        "{}/{}/{}/aws4_request",
        &amz_date[..8.min(amz_date.len())],
        c.region,
        c.service
    );
    format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// The `Authorization` header of request `r` made at `amz_date`.
pub fn sign(c: &Credentials<'_>, amz_date: &str, r: &Signable<'_>) -> String {
    let (canonical, signed) = canonical_request(r);
    let to_sign = string_to_sign(c, amz_date, &canonical);
    let date = &amz_date[..8.min(amz_date.len())];
    let k = hmac(format!("AWS4{}", c.secret_access_key).as_bytes(), date);
    let k = hmac(&k, c.region);
    let k = hmac(&k, c.service);
    let k = hmac(&k, "aws4_request");
    let signature = hex::encode(hmac(&k, &to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={}/{date}/{}/{}/aws4_request, SignedHeaders={signed}, Signature={signature}",
        c.access_key_id, c.region, c.service
    )
}

/// `20150830T123600Z` for `t`.
pub fn amz_date(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// XML answers (a few fields of a few answers; no general parser)

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#34;", "\"")
        .replace("&amp;", "&")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The raw contents of every `<tag>...</tag>` in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

fn element(xml: &str, tag: &str) -> Option<String> {
    elements(xml, tag).first().map(|v| unescape(v))
}

// ---------------------------------------------------------------------------------------------
// The client

type Body = BoxBody<Bytes, std::io::Error>;

/// What a request sends (made again for each try).
#[derive(Debug, Clone)]
enum Payload {
    Empty,
    Bytes(Bytes),
    /// `len` bytes of the file from `offset`.
    File {
        path: PathBuf,
        offset: u64,
        len: u64,
    },
}

impl Payload {
    fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }

    /// The hex SHA-256 of what is sent (the file range read once for it).
    async fn sha256(&self) -> Result<String> {
        match self {
            Payload::Empty => Ok(EMPTY_SHA256.to_string()),
            Payload::Bytes(b) => Ok(hex::encode(Sha256::digest(b))),
            Payload::File { path, offset, len } => {
                let (p, offset, len) = (path.clone(), *offset, *len);
                tokio::task::spawn_blocking(move || -> std::io::Result<String> {
                    use std::io::{Read, Seek, SeekFrom};
                    let mut f = std::fs::File::open(&p)?;
                    f.seek(SeekFrom::Start(offset))?;
                    let mut h = Sha256::new();
                    let mut buf = vec![0u8; 256 << 10];
                    let mut left = len;
                    while left > 0 {
                        let want = left.min(buf.len() as u64) as usize;
                        let n = f.read(&mut buf[..want])?;
                        if n == 0 {
                            return Err(std::io::Error::other("the file is shorter than expected"));
                        }
                        h.update(&buf[..n]);
                        left -= n as u64;
                    }
                    Ok(hex::encode(h.finalize()))
                })
                .await
                .map_err(|e| S3Error::Io {
                    what: "cannot hash",
                    path: path.display().to_string(),
                    source: std::io::Error::other(e),
                })?
                .map_err(io_err("cannot read", path))
            }
        }
    }

    async fn body(&self) -> Result<Body> {
        Ok(match self {
            Payload::Empty => Full::new(Bytes::new()).map_err(|e| match e {}).boxed(),
            Payload::Bytes(b) => Full::new(b.clone()).map_err(|e| match e {}).boxed(),
            Payload::File { path, offset, len } => {
                let mut f = tokio::fs::File::open(path)
                    .await
                    .map_err(io_err("cannot open", path))?;
                f.seek(std::io::SeekFrom::Start(*offset))
                    .await
                    .map_err(io_err("cannot read", path))?;
                let stream = tokio_util::io::ReaderStream::with_capacity(f.take(*len), 64 << 10)
                    .map(|r| r.map(Frame::data));
                BodyExt::boxed(StreamBody::new(stream))
            }
        })
    }
}

/// An object of the bucket that is a backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// The backup's name (the key without the prefix).
    pub name: String,
    pub size: u64,
}

/// A finished upload.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct Uploaded {
    /// Where it went: `s3://bucket/prefix/name`.
    pub url: String,
    /// The store's endpoint.
    pub endpoint: String,
    /// Bytes uploaded.
    pub size: u64,
    /// 1 for a single `PUT`, else the parts of the multipart upload.
    pub parts: u32,
    /// How long the upload took, in milliseconds.
    pub duration_ms: u64,
}

/// A client of the bucket named by `[backup.s3]`.
#[derive(Clone)]
pub struct Store {
    s: S3Settings,
    /// host[:port] as written (the `Host` header).
    authority: String,
    /// Where to connect (IPv6 without brackets).
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoint", &self.s.endpoint)
            .field("bucket", &self.s.bucket)
            .finish()
    }
}

impl Store {
    /// The client for `s` (its TLS roots loaded for an https endpoint).
    pub fn new(s: &S3Settings) -> Result<Store> {
        let uri: http::Uri = s.endpoint.parse().map_err(|e| S3Error::Unreachable {
            endpoint: s.endpoint.clone(),
            reason: format!("not a URL: {e}"),
        })?;
        let https = uri.scheme_str() == Some("https");
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            Some(Arc::new(client_config(s)?))
        } else {
            None
        };
        Ok(Store {
            s: s.clone(),
            authority,
            host,
            port,
            tls,
        })
    }

    /// The settings it was made from.
    pub fn settings(&self) -> &S3Settings {
        &self.s
    }

    /// `s3://bucket/prefix/name`.
    pub fn url_of(&self, name: &str) -> String {
        format!("s3://{}/{}{name}", self.s.bucket, self.s.prefix)
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.s.prefix)
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Body>> {
        let unreachable = |reason: String| S3Error::Unreachable {
            endpoint: self.s.endpoint.clone(),
            reason,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| unreachable(format!("no connection within {CONNECT_TIMEOUT:?}")))?
        .map_err(|e| unreachable(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let handshake_err = |e: hyper::Error| unreachable(format!("HTTP handshake: {e}"));
        match &self.tls {
            None => {
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await
                        .map_err(handshake_err)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(send)
            }
            Some(cfg) => {
                let name =
                    rustls::pki_types::ServerName::try_from(self.host.clone()).map_err(|e| {
                        S3Error::Tls {
                            endpoint: self.s.endpoint.clone(),
                            reason: format!("`{}` is not a server name: {e}", self.host),
                        }
                    })?;
                let tls = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    tokio_rustls::TlsConnector::from(cfg.clone()).connect(name, tcp),
                )
                .await
                .map_err(|_| unreachable(format!("no TLS handshake within {CONNECT_TIMEOUT:?}")))?
                .map_err(|e| S3Error::Tls {
                    endpoint: self.s.endpoint.clone(),
                    reason: e.to_string(),
                })?;
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                        .await
                        .map_err(handshake_err)?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(send)
            }
        }
    }

    /// Sends one signed request (tried again when transient); the answer's head, its body
    /// unread, when its status is a success (else the error it means).
    async fn request(
        &self,
        op: &'static str,
        method: Method,
        name: Option<&str>,
        query: &[(String, String)],
        extra: &[(&str, String)],
        payload: Payload,
    ) -> Result<Response<Incoming>> {
        let hash = payload.sha256().await?;
        let mut tries = 0;
        loop {
            tries += 1;
            match self
                .request_once(op, &method, name, query, extra, &payload, &hash)
                .await
            {
                Err(e) if e.transient() && tries < TRIES => {
                    tracing::warn!(error = %e, op, "object store request failed; trying again");
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(tries))).await;
                }
                other => return other,
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn request_once(
        &self,
        op: &'static str,
        method: &Method,
        name: Option<&str>,
        query: &[(String, String)],
        extra: &[(&str, String)],
        payload: &Payload,
        hash: &str,
    ) -> Result<Response<Incoming>> {
        let mut path = format!("/{}", uri_encode(&self.s.bucket, false));
        if let Some(n) = name {
            path.push('/');
            path.push_str(&uri_encode(&self.key(n), true));
        }
        let q = canonical_query(query);
        let date = amz_date(SystemTime::now());
        let mut headers: Vec<(String, String)> = vec![
            ("host".into(), self.authority.clone()),
            ("x-amz-content-sha256".into(), hash.to_string()),
            ("x-amz-date".into(), date.clone()),
        ];
        for (k, v) in extra {
            headers.push((k.to_string(), v.clone()));
        }
        let authorization = sign(
            &Credentials {
                access_key_id: &self.s.access_key_id,
                secret_access_key: &self.s.secret_access_key.0,
                region: &self.s.region,
                service: "s3",
            },
            &date,
            &Signable {
                method: method.as_str(),
                path: &path,
                query,
                headers: &headers,
                payload_hash: hash,
            },
        );
        let uri = if q.is_empty() {
            path
        } else {
            format!("{path}?{q}")
        };
        let mut req = Request::builder().method(method.clone()).uri(uri);
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let len = payload.len();
        if len > 0 || matches!(*method, Method::PUT | Method::POST) {
            req = req.header(http::header::CONTENT_LENGTH, len);
        }
        let req = req
            .header(http::header::AUTHORIZATION, authorization)
            .body(payload.body().await?)
            .map_err(|e| S3Error::Store {
                op,
                status: 0,
                code: String::new(),
                message: format!("cannot build the request: {e}"),
            })?;
        // A stall is caught; a slow but moving upload is not cut (at least 256 KiB/s).
        let budget = Duration::from_secs(60 + len / (256 << 10));
        let endpoint = self.s.endpoint.clone();
        let timeout = |_| S3Error::Timeout {
            op,
            secs: budget.as_secs(),
            endpoint: endpoint.clone(),
        };
        let answer = tokio::time::timeout(budget, async {
            let mut send = self.connect().await?;
            send.send_request(req)
                .await
                .map_err(|e| S3Error::Unreachable {
                    endpoint: self.s.endpoint.clone(),
                    reason: format!("{op}: {e}"),
                })
        })
        .await
        .map_err(timeout)??;
        if answer.status().is_success() || answer.status() == StatusCode::PARTIAL_CONTENT {
            return Ok(answer);
        }
        let status = answer.status();
        let body = self
            .read_text(answer, Duration::from_secs(30))
            .await
            .unwrap_or_default();
        Err(self.refusal(op, status, name, &body))
    }

    /// What an error answer means.
    fn refusal(
        &self,
        op: &'static str,
        status: StatusCode,
        name: Option<&str>,
        body: &str,
    ) -> S3Error {
        let code = element(body, "Code").unwrap_or_default();
        let message = element(body, "Message").unwrap_or_else(|| {
            status
                .canonical_reason()
                .unwrap_or("no message")
                .to_string()
        });
        match code.as_str() {
            "SignatureDoesNotMatch"
            | "InvalidAccessKeyId"
            | "InvalidToken"
            | "ExpiredToken"
            | "InvalidSecurity"
            | "AuthorizationHeaderMalformed" => S3Error::Credentials {
                status: status.as_u16(),
                code,
                hint: if body.contains("region") {
                    ", and backup.s3.region"
                } else {
                    ""
                },
            },
            "RequestTimeTooSkewed" => S3Error::Store {
                op,
                status: status.as_u16(),
                code,
                message: format!("{message}: set this host's clock right (NTP)"),
            },
            "NoSuchBucket" => S3Error::NoBucket {
                bucket: self.s.bucket.clone(),
                endpoint: self.s.endpoint.clone(),
            },
            "NoSuchKey" => S3Error::NoObject {
                bucket: self.s.bucket.clone(),
                key: name.map(|n| self.key(n)).unwrap_or_default(),
            },
            _ if status == StatusCode::NOT_FOUND && name.is_some() && code.is_empty() => {
                S3Error::NoObject {
                    bucket: self.s.bucket.clone(),
                    key: name.map(|n| self.key(n)).unwrap_or_default(),
                }
            }
            _ if status == StatusCode::FORBIDDEN => S3Error::Denied {
                op,
                status: 403,
                code: if code.is_empty() {
                    "AccessDenied".into()
                } else {
                    code
                },
                bucket: self.s.bucket.clone(),
            },
            _ => S3Error::Store {
                op,
                status: status.as_u16(),
                code,
                message,
            },
        }
    }

    /// The body as text (at most [`MAX_XML`] bytes kept); a body cut off or slower than `within`
    /// is an error (a listing must be whole).
    async fn read_text(&self, r: Response<Incoming>, within: Duration) -> Result<String> {
        let mut body = r.into_body();
        let mut out = Vec::new();
        let read = async {
            while let Some(frame) = body.frame().await {
                if let Ok(d) = frame?.into_data() {
                    if out.len() + d.len() <= MAX_XML {
                        out.extend_from_slice(&d);
                    }
                }
            }
            Ok::<(), hyper::Error>(())
        };
        match tokio::time::timeout(within, read).await {
            Ok(Ok(())) => Ok(String::from_utf8_lossy(&out).into_owned()),
            Ok(Err(e)) => Err(S3Error::Unreachable {
                endpoint: self.s.endpoint.clone(),
                reason: format!("its answer broke off: {e}"),
            }),
            Err(_) => Err(S3Error::Timeout {
                op: "reading the store's answer",
                secs: within.as_secs(),
                endpoint: self.s.endpoint.clone(),
            }),
        }
    }

    /// Checks that the bucket answers to these credentials (lists one object).
    pub async fn check(&self) -> Result<()> {
        let q = vec![
            ("list-type".to_string(), "2".to_string()),
            ("max-keys".to_string(), "1".to_string()),
            ("prefix".to_string(), self.s.prefix.clone()),
        ];
        let answer = self
            .request(
                "listing the bucket",
                Method::GET,
                None,
                &q,
                &[],
                Payload::Empty,
            )
            .await?;
        self.read_text(answer, Duration::from_secs(30)).await?;
        Ok(())
    }

    /// The backups under the prefix (objects named as escale names backups), in no order.
    pub async fn list(&self) -> Result<Vec<Object>> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = vec![
                ("list-type".to_string(), "2".to_string()),
                ("prefix".to_string(), self.s.prefix.clone()),
            ];
            if let Some(t) = &token {
                q.push(("continuation-token".to_string(), t.clone()));
            }
            let answer = self
                .request(
                    "listing the bucket",
                    Method::GET,
                    None,
                    &q,
                    &[],
                    Payload::Empty,
                )
                .await?;
            let xml = self.read_text(answer, Duration::from_secs(60)).await?;
            for c in elements(&xml, "Contents") {
                let (Some(key), Some(size)) = (element(c, "Key"), element(c, "Size")) else {
                    continue;
                };
                let Some(name) = key.strip_prefix(&self.s.prefix) else {
                    continue;
                };
                if super::is_backup_name(name) {
                    out.push(Object {
                        name: name.to_string(),
                        size: size.trim().parse().unwrap_or(0),
                    });
                }
            }
            token = element(&xml, "NextContinuationToken");
            if element(&xml, "IsTruncated").as_deref() != Some("true") || token.is_none() {
                return Ok(out);
            }
        }
    }

    /// Removes the backup `name` from the bucket.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let answer = self
            .request(
                "deleting an object",
                Method::DELETE,
                Some(name),
                &[],
                &[],
                Payload::Empty,
            )
            .await?;
        self.read_text(answer, Duration::from_secs(30)).await?;
        Ok(())
    }

    /// The object's size (`HEAD`).
    pub async fn size_of(&self, name: &str) -> Result<u64> {
        let answer = self
            .request(
                "reading an object's size",
                Method::HEAD,
                Some(name),
                &[],
                &[],
                Payload::Empty,
            )
            .await?;
        Ok(content_length(&answer).unwrap_or(0))
    }

    /// The first `n` bytes of the backup `name` (its header, for listing).
    pub async fn read_start(&self, name: &str, n: u64) -> Result<Vec<u8>> {
        let answer = self
            .request(
                "reading an object",
                Method::GET,
                Some(name),
                &[],
                &[("range", format!("bytes=0-{}", n.saturating_sub(1)))],
                Payload::Empty,
            )
            .await?;
        let mut body = answer.into_body();
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| S3Error::Unreachable {
                endpoint: self.s.endpoint.clone(),
                reason: format!("reading an object: {e}"),
            })?;
            if let Ok(d) = frame.into_data() {
                out.extend_from_slice(&d);
                if out.len() as u64 >= n {
                    out.truncate(n as usize);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Uploads the file at `path` as the object `prefix + name`: one `PUT` up to [`PART_MIN`]
    /// bytes, a multipart upload above; checks the stored size.
    pub async fn upload(&self, path: &Path, name: &str) -> Result<Uploaded> {
        let started = Instant::now();
        let size = tokio::fs::metadata(path)
            .await
            .map_err(io_err("cannot read", path))?
            .len();
        let parts = if size <= PART_MIN {
            let answer = self
                .request(
                    "uploading the backup",
                    Method::PUT,
                    Some(name),
                    &[],
                    &[("content-type", "application/octet-stream".into())],
                    Payload::File {
                        path: path.to_path_buf(),
                        offset: 0,
                        len: size,
                    },
                )
                .await?;
            self.read_text(answer, Duration::from_secs(30)).await?;
            1
        } else {
            self.multipart(path, name, size).await?
        };
        let stored = self.size_of(name).await?;
        if stored != size {
            return Err(S3Error::Incomplete {
                key: self.key(name),
                got: stored,
                want: size,
            });
        }
        Ok(Uploaded {
            url: self.url_of(name),
            endpoint: self.s.endpoint.clone(),
            size,
            parts,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    async fn multipart(&self, path: &Path, name: &str, size: u64) -> Result<u32> {
        let part = part_size(size);
        let answer = self
            .request(
                "starting a multipart upload",
                Method::POST,
                Some(name),
                &[("uploads".to_string(), String::new())],
                &[("content-type", "application/octet-stream".into())],
                Payload::Empty,
            )
            .await?;
        let xml = self.read_text(answer, Duration::from_secs(30)).await?;
        let Some(upload_id) = element(&xml, "UploadId") else {
            return Err(S3Error::Store {
                op: "starting a multipart upload",
                status: 200,
                code: String::new(),
                message: "the answer names no UploadId".into(),
            });
        };
        let result = self.parts(path, name, size, part, &upload_id).await;
        if result.is_err() {
            let q = [("uploadId".to_string(), upload_id.clone())];
            if let Err(e) = self
                .request_once(
                    "aborting a multipart upload",
                    &Method::DELETE,
                    Some(name),
                    &q,
                    &[],
                    &Payload::Empty,
                    EMPTY_SHA256,
                )
                .await
            {
                tracing::warn!(error = %e, upload_id, "could not abort the failed multipart upload; the bucket's lifecycle rules must remove its parts");
            }
        }
        result
    }

    async fn parts(
        &self,
        path: &Path,
        name: &str,
        size: u64,
        part: u64,
        upload_id: &str,
    ) -> Result<u32> {
        let mut etags = Vec::new();
        let mut offset = 0;
        let mut number = 0u32;
        while offset < size {
            number += 1;
            let len = part.min(size - offset);
            let q = [
                ("partNumber".to_string(), number.to_string()),
                ("uploadId".to_string(), upload_id.to_string()),
            ];
            let answer = self
                .request(
                    "uploading a part",
                    Method::PUT,
                    Some(name),
                    &q,
                    &[],
                    Payload::File {
                        path: path.to_path_buf(),
                        offset,
                        len,
                    },
                )
                .await?;
            let etag = answer
                .headers()
                .get(http::header::ETAG)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string();
            self.read_text(answer, Duration::from_secs(30)).await?;
            if etag.is_empty() {
                return Err(S3Error::Store {
                    op: "uploading a part",
                    status: 200,
                    code: String::new(),
                    message: format!("the answer to part {number} has no ETag"),
                });
            }
            etags.push(etag);
            offset += len;
        }
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, e) in etags.iter().enumerate() {
            xml.push_str(&format!(
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                escape(e)
            ));
        }
        xml.push_str("</CompleteMultipartUpload>");
        let q = [("uploadId".to_string(), upload_id.to_string())];
        let answer = self
            .request(
                "completing a multipart upload",
                Method::POST,
                Some(name),
                &q,
                &[("content-type", "application/xml".into())],
                Payload::Bytes(Bytes::from(xml)),
            )
            .await?;
        // The store may answer 200 and put its error in the body.
        let body = self.read_text(answer, Duration::from_secs(300)).await?;
        if body.contains("<Error>") {
            return Err(self.refusal(
                "completing a multipart upload",
                StatusCode::INTERNAL_SERVER_ERROR,
                Some(name),
                &body,
            ));
        }
        Ok(number)
    }

    /// Downloads the backup `name` into `dir` (a `.partial` file renamed once complete, 0600);
    /// `progress(got, total)` after each chunk. Returns the file's path.
    pub async fn download(
        &self,
        name: &str,
        dir: &Path,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<PathBuf> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(io_err("cannot create", dir))?;
        let dest = dir.join(name);
        let partial = dir.join(format!(".{name}.partial"));
        let answer = self
            .request(
                "downloading a backup",
                Method::GET,
                Some(name),
                &[],
                &[],
                Payload::Empty,
            )
            .await?;
        let total = content_length(&answer).unwrap_or(0);
        let file =
            crate::secrets::create_private(&partial).map_err(io_err("cannot create", &partial))?;
        let mut file = tokio::fs::File::from_std(file);
        let result: Result<u64> = async {
            let mut body = answer.into_body();
            let mut got = 0u64;
            loop {
                let frame = tokio::time::timeout(Duration::from_secs(60), body.frame())
                    .await
                    .map_err(|_| S3Error::Timeout {
                        op: "downloading a backup",
                        secs: 60,
                        endpoint: self.s.endpoint.clone(),
                    })?;
                let Some(frame) = frame else { break };
                let frame = frame.map_err(|e| S3Error::Unreachable {
                    endpoint: self.s.endpoint.clone(),
                    reason: format!("the download broke off: {e}"),
                })?;
                if let Ok(d) = frame.into_data() {
                    file.write_all(&d)
                        .await
                        .map_err(io_err("cannot write", &partial))?;
                    got += d.len() as u64;
                    progress(got, total);
                }
            }
            file.sync_all()
                .await
                .map_err(io_err("cannot sync", &partial))?;
            Ok(got)
        }
        .await;
        let done = match result {
            Ok(got) if total > 0 && got != total => Err(S3Error::Incomplete {
                key: self.key(name),
                got,
                want: total,
            }),
            Ok(_) => tokio::fs::rename(&partial, &dest)
                .await
                .map_err(io_err("cannot rename", &partial)),
            Err(e) => Err(e),
        };
        if let Err(e) = done {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(e);
        }
        Ok(dest)
    }
}

/// The part size for a file of `size` bytes: [`PART_MIN`], or more (whole MiB) so that at
/// most [`MAX_PARTS`] parts are needed.
pub fn part_size(size: u64) -> u64 {
    let need = size.div_ceil(MAX_PARTS).div_ceil(1 << 20) << 20;
    need.max(PART_MIN)
}

fn content_length(r: &Response<Incoming>) -> Option<u64> {
    r.headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The TLS client: the system's roots, plus `ca_file`'s certificates.
fn client_config(s: &S3Settings) -> Result<rustls::ClientConfig> {
    let tls_err = |reason: String| S3Error::Tls {
        endpoint: s.endpoint.clone(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for c in native.certs {
        let _ = roots.add(c);
    }
    if let Some(path) = &s.ca_file {
        let pem = std::fs::read(path).map_err(io_err("cannot read backup.s3.ca_file", path))?;
        for c in rustls_pemfile::certs(&mut pem.as_slice()) {
            let c = c.map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
            roots
                .add(c)
                .map_err(|e| tls_err(format!("{}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(tls_err(
            "no trusted root certificate: install the system's CA roots (ca-certificates)".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A stand-in store for unit tests: answers each request with `answer("METHOD query",
/// tries)` = (status, body, etag), records `METHOD query` of each, and answers a `HEAD` with
/// the length of the last `PUT`. Not a mock of escale: a tiny HTTP
/// server on loopback speaking the few answers the client reads.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;

    pub type Answer = (u16, &'static str, &'static str);

    /// Serves on a loopback port; returns it and the requests seen.
    pub async fn serve(
        answer: impl Fn(&str, usize) -> Answer + Send + Sync + 'static,
    ) -> (u16, Arc<Mutex<Vec<String>>>) {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let answer = Arc::new(answer);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = seen.clone();
        let last_put = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (log, answer, last_put) = (log.clone(), answer.clone(), last_put.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (log, answer, last_put) =
                            (log.clone(), answer.clone(), last_put.clone());
                        async move {
                            let method = req.method().clone();
                            let what = format!(
                                "{} {}",
                                req.method(),
                                req.uri().query().unwrap_or_default()
                            );
                            let signed = req
                                .headers()
                                .get("authorization")
                                .is_some_and(|v| v.as_bytes().starts_with(b"AWS4-HMAC-SHA256 "));
                            let len = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            if method == http::Method::PUT {
                                last_put.store(len, std::sync::atomic::Ordering::SeqCst);
                            }
                            let tries = {
                                let mut l = log.lock().unwrap();
                                l.push(what.clone());
                                l.iter().filter(|w| **w == what).count()
                            };
                            let (status, body, etag) = if signed {
                                answer(&what, tries)
                            } else {
                                (400, "<Error><Code>Unsigned</Code></Error>", "")
                            };
                            let mut r = Response::builder().status(status);
                            if !etag.is_empty() {
                                r = r.header("etag", etag);
                            }
                            if method == http::Method::HEAD {
                                r = r.header(
                                    "content-length",
                                    last_put.load(std::sync::atomic::Ordering::SeqCst),
                                );
                            }
                            Ok::<_, std::convert::Infallible>(
                                r.body(Full::new(Bytes::from(body))).unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        (port, seen)
    }

    /// Settings for the stand-in on `port`.
    pub fn settings(port: u16) -> crate::config::S3Settings {
        crate::config::S3Settings {
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "fr-par".into(),
            bucket: "escale-b".into(),
            prefix: String::new(),
            access_key_id: "AK".into(),
            secret_access_key: crate::config::SecretString("SK".into()),
            ca_file: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credentials of AWS's Signature Version 4 test suite.
    const SUITE: Credentials<'static> = Credentials {
        access_key_id: "AKIDEXAMPLE",
        secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
        region: "us-east-1",
        service: "service",
    };

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The suite's `get-vanilla`, `post-vanilla` and `get-vanilla-query-order-key-case`:
    /// `GET / HTTP/1.1`, `Host:example.amazonaws.com`, `X-Amz-Date:20150830T123600Z`.
    #[test]
    fn signature_v4_test_suite_vectors() {
        let headers = h(&[
            ("Host", "example.amazonaws.com"),
            ("X-Amz-Date", "20150830T123600Z"),
        ]);
        let get = Signable {
            method: "GET",
            path: "/",
            query: &[],
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        };
        let (creq, signed) = canonical_request(&get);
        assert_eq!(
            creq,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(signed, "host;x-amz-date");
        assert_eq!(
            string_to_sign(&SUITE, "20150830T123600Z", &creq),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
        assert_eq!(
            sign(&SUITE, "20150830T123600Z", &get),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        let post = Signable {
            method: "POST",
            ..get
        };
        assert!(sign(&SUITE, "20150830T123600Z", &post).ends_with(
            "Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        ));
        let query = h(&[("Param2", "value2"), ("Param1", "value1")]);
        let ordered = Signable {
            query: &query,
            ..get
        };
        assert!(sign(&SUITE, "20150830T123600Z", &ordered).ends_with(
            "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        ));
    }

    /// The S3 documentation's example "GET Object" (the first 10 bytes of `test.txt` in
    /// `examplebucket`, signed with the empty payload's hash).
    #[test]
    fn s3_documentation_get_object_example() {
        let headers = h(&[
            ("Host", "examplebucket.s3.amazonaws.com"),
            ("Range", "bytes=0-9"),
            ("x-amz-content-sha256", EMPTY_SHA256),
            ("x-amz-date", "20130524T000000Z"),
        ]);
        let r = Signable {
            method: "GET",
            path: "/test.txt",
            query: &[],
            headers: &headers,
            payload_hash: EMPTY_SHA256,
        };
        let c = Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE",
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            region: "us-east-1",
            service: "s3",
        };
        let (creq, _) = canonical_request(&r);
        assert!(string_to_sign(&c, "20130524T000000Z", &creq)
            .ends_with("7344ae5b7ee6c3e7e6b0fe0640412a37625d1fbfff95c48bbb2dc43964946972"));
        assert_eq!(
            sign(&c, "20130524T000000Z", &r),
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn encoding_dates_parts_and_xml() {
        assert_eq!(uri_encode("a b/c~d+e=", true), "a%20b/c~d%2Be%3D");
        assert_eq!(uri_encode("a/b", false), "a%2Fb");
        assert_eq!(
            canonical_query(&h(&[("uploads", ""), ("b", "x y"), ("a", "2"), ("a", "1")])),
            "a=1&a=2&b=x%20y&uploads="
        );
        assert_eq!(
            amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)),
            "20150830T123600Z"
        );
        assert_eq!(part_size(1), PART_MIN);
        assert_eq!(
            part_size(100 << 30),
            103 << 20,
            "100 GiB in at most 1000 parts"
        );
        assert!(part_size(100 << 30) * MAX_PARTS >= 100 << 30);
        let xml = "<ListBucketResult><KeyCount>2</KeyCount><IsTruncated>false</IsTruncated>\
            <Contents><Key>p/escale-a-1.backup</Key><Size>10</Size></Contents>\
            <Contents><Key>p/a&amp;b</Key><Size>3</Size></Contents></ListBucketResult>";
        let c = elements(xml, "Contents");
        assert_eq!(c.len(), 2);
        assert_eq!(element(c[1], "Key").as_deref(), Some("p/a&b"));
        assert_eq!(element(xml, "Key").as_deref(), Some("p/escale-a-1.backup"));
        assert_eq!(element(xml, "IsTruncated").as_deref(), Some("false"));
    }

    #[test]
    fn refusals_say_what_to_fix() {
        let s = S3Settings {
            endpoint: "http://127.0.0.1:9".into(),
            region: "fr-par".into(),
            bucket: "escale-b".into(),
            prefix: "p/".into(),
            access_key_id: "AK".into(),
            secret_access_key: crate::config::SecretString("SK".into()),
            ca_file: None,
        };
        let store = Store::new(&s).unwrap();
        let body = |code: &str| format!("<Error><Code>{code}</Code><Message>m</Message></Error>");
        let e = store.refusal(
            "x",
            StatusCode::FORBIDDEN,
            None,
            &body("SignatureDoesNotMatch"),
        );
        assert!(
            e.to_string()
                .contains("the store refused the credentials (403 SignatureDoesNotMatch)")
                && e.to_string().contains("secret"),
            "{e}"
        );
        let e = store.refusal(
            "x",
            StatusCode::FORBIDDEN,
            None,
            &body("InvalidAccessKeyId"),
        );
        assert!(matches!(e, S3Error::Credentials { .. }), "{e}");
        let e = store.refusal("x", StatusCode::NOT_FOUND, None, &body("NoSuchBucket"));
        assert!(e.to_string().contains("`escale-b` does not exist"), "{e}");
        let e = store.refusal(
            "listing",
            StatusCode::FORBIDDEN,
            None,
            &body("AccessDenied"),
        );
        assert!(
            e.to_string().contains("give the access key the right"),
            "{e}"
        );
        let e = store.refusal("x", StatusCode::NOT_FOUND, Some("n"), "");
        assert!(e.to_string().contains("no object `p/n`"), "{e}");
        assert!(store
            .refusal(
                "x",
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                &body("SlowDown")
            )
            .transient());
        assert_eq!(store.url_of("n"), "s3://escale-b/p/n");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_named() {
        // Port 9 (discard) on loopback: nothing listens in a test environment.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let s = S3Settings {
            endpoint: format!("http://127.0.0.1:{port}"),
            region: "fr-par".into(),
            bucket: "escale-b".into(),
            prefix: String::new(),
            access_key_id: "AK".into(),
            secret_access_key: crate::config::SecretString("SK".into()),
            ca_file: None,
        };
        let e = Store::new(&s).unwrap().check().await.unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot reach the object store at http://127.0.0.1")
                && e.to_string().contains("backup.s3.endpoint"),
            "{e}"
        );
    }

    /// A store that accepts the first part, fails the second with a 500 (tried again) then
    /// a 400 (not tried again): the upload fails with the store's code and is aborted.
    #[tokio::test]
    async fn a_failed_multipart_upload_is_retried_when_transient_then_aborted() {
        let (port, seen) = fake::serve(|what, tries| {
            if what.starts_with("POST uploads") {
                (
                    200,
                    "<InitiateMultipartUploadResult><UploadId>u1</UploadId></InitiateMultipartUploadResult>",
                    "",
                )
            } else if what.starts_with("PUT partNumber=1&") {
                (200, "", "\"e1\"")
            } else if what.starts_with("PUT partNumber=2&") && tries == 1 {
                (
                    500,
                    "<Error><Code>InternalError</Code><Message>try again</Message></Error>",
                    "",
                )
            } else if what.starts_with("PUT partNumber=2&") {
                (
                    400,
                    "<Error><Code>EntityTooSmall</Code><Message>no</Message></Error>",
                    "",
                )
            } else if what.starts_with("DELETE uploadId=u1") {
                (204, "", "")
            } else {
                (404, "<Error><Code>NoSuchKey</Code></Error>", "")
            }
        })
        .await;
        let s = fake::settings(port);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("escale-a-20261201T031003123Z.backup");
        std::fs::write(&path, vec![7u8; (PART_MIN + 1000) as usize]).unwrap();
        let e = Store::new(&s)
            .unwrap()
            .upload(&path, "escale-a-20261201T031003123Z.backup")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, S3Error::Store { status: 400, code, .. } if code == "EntityTooSmall"),
            "{e}"
        );
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                "POST uploads=".to_string(),
                "PUT partNumber=1&uploadId=u1".into(),
                "PUT partNumber=2&uploadId=u1".into(),
                "PUT partNumber=2&uploadId=u1".into(),
                "DELETE uploadId=u1".into(),
            ]
        );
    }
}

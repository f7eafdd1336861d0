//! The CLI's HTTP client for the escale API, and where it keeps credentials.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::Problem;

/// What a CLI command can fail with; each maps to an exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The server refused or failed the operation (exit 1).
    #[error("{0}")]
    Server(String),
    /// The server answered an error status (exit 1).
    #[error("{detail}")]
    Refused { status: u16, detail: String },
    /// The request was not authenticated or not allowed (exit 4).
    #[error("{detail}")]
    Auth { status: u16, detail: String },
    /// The server could not be reached (exit 3).
    #[error("cannot reach the escale server at {url}: {reason}\n  (set ESCALE_URL or --url; is `escale serve` running?)")]
    Unreachable { url: String, reason: String },
    /// The command line was wrong in a way clap cannot see (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A local failure (exit 1).
    #[error("{0}")]
    Local(String),
    /// An operation ran and failed, e.g. a rollout (exit 1).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Server(_)
            | CliError::Refused { .. }
            | CliError::Local(_)
            | CliError::Failed(_) => 1,
            CliError::Usage(_) => 2,
            CliError::Unreachable { .. } => 3,
            CliError::Auth { .. } => 4,
        }
    }

    /// The HTTP status the server answered, when the error is its answer.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            CliError::Refused { status, .. } | CliError::Auth { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The error as `--json` prints it on stderr: `{"error": ..., "status": ..., "exit": ...}`
    /// (`status` is the server's HTTP status, `null` when the server did not answer).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "error": self.to_string(),
            "status": self.http_status(),
            "exit": self.exit_code(),
        })
    }
}

/// Stored by `escale login`, 0600.
#[derive(Debug, Serialize, Deserialize)]
pub struct Credentials {
    pub url: String,
    pub token: String,
}

/// `$XDG_CONFIG_HOME/escale/credentials.json` (or `~/.config/...`).
pub fn credentials_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("escale").join("credentials.json"))
}

/// Reads stored credentials, if any.
pub fn load_credentials() -> Option<Credentials> {
    let text = std::fs::read_to_string(credentials_path()?).ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes credentials 0600, replacing the previous ones atomically.
pub fn store_credentials(c: &Credentials) -> Result<PathBuf, CliError> {
    let path = credentials_path().ok_or_else(|| {
        CliError::Local("cannot find a config directory: set HOME or XDG_CONFIG_HOME".into())
    })?;
    let dir = path.parent().expect("credentials path has a parent");
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let tmp = dir.join(format!(".credentials.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = crate::secrets::create_private(&tmp)?;
        f.write_all(
            serde_json::to_string_pretty(c)
                .expect("credentials serialise")
                .as_bytes(),
        )?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)
    };
    write().map_err(|e| CliError::Local(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

/// A client for one server with one token.
pub struct Client {
    base: String,
    token: Option<String>,
    http: HyperClient<HttpConnector, Full<Bytes>>,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CliError> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(CliError::Usage(format!(
                "server URL `{base}` must start with http:// (the API listener; put it behind the escale proxy for TLS)"
            )));
        }
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(std::time::Duration::from_secs(10)));
        Ok(Client {
            base,
            token,
            http: HyperClient::builder(TokioExecutor::new()).build(connector),
        })
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// Sends a request and decodes a JSON answer; errors carry the server's problem detail.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<T, CliError> {
        let bytes = self.call_raw(method, path, body).await?;
        let bytes = if bytes.is_empty() {
            Bytes::from_static(b"null")
        } else {
            bytes
        };
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Local(format!("unexpected answer from the server: {e}")))
    }

    /// Like [`Client::call`] but returns the raw body.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<Bytes, CliError> {
        let resp = self.send(method, path, body).await?;
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e.to_string()))?
            .to_bytes())
    }

    /// GETs one page: its JSON and the path of the next page (`Link: <...>; rel="next"`).
    async fn page(&self, path: &str) -> Result<(serde_json::Value, Option<String>), CliError> {
        let resp = self.send(Method::GET, path, None).await?;
        let next = resp
            .headers()
            .get(http::header::LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(next_link);
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.unreachable(e.to_string()))?
            .to_bytes();
        let page = serde_json::from_slice(&bytes)
            .map_err(|e| CliError::Local(format!("unexpected answer from the server: {e}")))?;
        Ok((page, next))
    }

    /// GETs a paginated list, following each page's `Link: <...>; rel="next"` until the last
    /// page or `max` items; answers one JSON array.
    pub async fn list(&self, path: &str, max: usize) -> Result<serde_json::Value, CliError> {
        let mut items: Vec<serde_json::Value> = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(path) = next.take() {
            let (page, link) = self.page(&path).await?;
            next = link;
            let serde_json::Value::Array(page) = page else {
                return Err(CliError::Local(
                    "unexpected answer from the server: not a list".into(),
                ));
            };
            let empty = page.is_empty();
            items.extend(page);
            if items.len() >= max || empty {
                items.truncate(max);
                break;
            }
        }
        Ok(serde_json::Value::Array(items))
    }

    /// GETs a paginated object whose `field` is the paged list (`GET .../instances`),
    /// following each page's `Link: <...>; rel="next"`: answers the first page's object with
    /// `field` holding the items of every page.
    pub async fn list_in(&self, path: &str, field: &str) -> Result<serde_json::Value, CliError> {
        let mut first: Option<serde_json::Value> = None;
        let mut items: Vec<serde_json::Value> = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(path) = next.take() {
            let (mut page, link) = self.page(&path).await?;
            next = link;
            let list = match page.get_mut(field).map(serde_json::Value::take) {
                Some(serde_json::Value::Array(list)) => list,
                _ => {
                    return Err(CliError::Local(format!(
                        "unexpected answer from the server: no `{field}` list"
                    )))
                }
            };
            let empty = list.is_empty();
            items.extend(list);
            first.get_or_insert(page);
            if empty {
                break;
            }
        }
        let mut out = first.unwrap_or_else(|| serde_json::json!({}));
        out[field] = serde_json::Value::Array(items);
        Ok(out)
    }

    /// Sends a request and hands each chunk of a successful body to `sink` as it arrives,
    /// until the body ends or `sink` returns false.
    pub async fn stream_raw(
        &self,
        method: Method,
        path: &str,
        mut sink: impl FnMut(&[u8]) -> bool,
    ) -> Result<(), CliError> {
        let mut body = self.send(method, path, None).await?.into_body();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.unreachable(e.to_string()))?;
            if let Some(data) = frame.data_ref() {
                if !sink(data) {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Opens a Server-Sent Events stream (`/api/v1/events/stream`); the server has subscribed
    /// once this returns, so every event published after it is read from the stream.
    pub async fn events(&self, path: &str) -> Result<EventStream, CliError> {
        let body = self.send(Method::GET, path, None).await?.into_body();
        Ok(EventStream {
            body,
            buf: Vec::new(),
            base: self.base.clone(),
        })
    }

    /// Sends a request; a non-2xx answer becomes an error carrying the server's problem detail.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<http::Response<hyper::body::Incoming>, CliError> {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(
                    serde_json::to_vec(&v).expect("json serialises"),
                ))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req
            .body(body)
            .map_err(|e| CliError::Usage(format!("bad request: {e}")))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| self.unreachable(error_chain(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let detail = serde_json::from_slice::<Problem>(&bytes)
            .map(|p| p.detail)
            .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).chars().take(500).collect());
        Err(match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => CliError::Auth {
                status: status.as_u16(),
                detail,
            },
            _ => CliError::Refused {
                status: status.as_u16(),
                detail,
            },
        })
    }

    fn unreachable(&self, reason: String) -> CliError {
        CliError::Unreachable {
            url: self.base.clone(),
            reason,
        }
    }
}

/// The target of a `Link` header's `rel="next"`: a path on this server (a link elsewhere is
/// not followed).
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        let next = params
            .split(';')
            .any(|p| p.trim().eq_ignore_ascii_case("rel=\"next\"") || p.trim() == "rel=next");
        (next && target.starts_with('/') && !target.starts_with("//")).then(|| target.to_string())
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Events read from a Server-Sent Events stream, one JSON object each.
pub struct EventStream {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
    base: String,
}

impl EventStream {
    /// The next event (`{"type": ..., "summary": ..., ...}`; `{"type": "missed"}` when the
    /// server says this reader fell behind), or `None` when the stream ended.
    pub async fn next(&mut self) -> Result<Option<serde_json::Value>, CliError> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&frame);
                let mut kind = None;
                let mut data = String::new();
                for line in text.lines() {
                    if let Some(k) = line.strip_prefix("event: ") {
                        kind = Some(k.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data.push_str(d);
                    }
                }
                if data.is_empty() {
                    continue; // a comment (keep-alive)
                }
                let mut v: serde_json::Value = serde_json::from_str(&data).map_err(|e| {
                    CliError::Local(format!("unexpected event from the server: {e}"))
                })?;
                if kind.as_deref() == Some("missed") {
                    v["type"] = "missed".into();
                }
                return Ok(Some(v));
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(CliError::Unreachable {
                        url: self.base.clone(),
                        reason: e.to_string(),
                    })
                }
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        self.buf.extend_from_slice(d);
                    }
                }
            }
        }
    }
}

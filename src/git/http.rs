//! The smart HTTP handlers: ref advertisement and receive-pack, with request and response
//! bodies streamed (the pack goes to git's standard input as it arrives; progress goes back
//! as it happens).

use std::convert::Infallible;
use std::process::Stdio;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::pkt::{self, Pkt};
use super::{
    deploy, ensure_repo, git, one_line, valid_ref, GitError, PushCommands, Report, MAX_PUSH_BYTES,
};
use crate::http::{ApiError, Auth};
use crate::registry::{Actor, AppRef};
use crate::service::Services;

/// Largest command section (ref updates) of a push.
const MAX_COMMANDS_BYTES: usize = 1 << 20;

/// The git routes, to merge into the API router.
pub fn router() -> Router<Services> {
    Router::new()
        .route("/git/{repo}/info/refs", get(info_refs))
        .route("/git/{repo}/git-receive-pack", post(receive_pack))
        .route("/git/{repo}/git-upload-pack", post(upload_pack))
}

/// A plain-text answer: git shows `text/plain` error bodies to the user as `remote:` lines.
fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut body = msg.into();
    body.push('\n');
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"escale\""),
        );
    }
    r
}

const PUSH_ONLY: &str = "escale's git endpoint takes pushes only (`git push` deploys the `main` branch); clone and fetch from where your source lives";

/// Authenticates and finds the app of `/git/{app}.git/...`: 401 without valid credentials,
/// 404 for an app the caller cannot see (or a name that cannot be an app).
async fn resolve(
    s: &Services,
    parts: &mut axum::http::request::Parts,
    repo: &str,
) -> Result<(Actor, AppRef), Response> {
    let actor = match Auth::from_request_parts(parts, s).await {
        Ok(Auth(a)) => a,
        Err(ApiError::Unauthorized(_)) => {
            return Err(text(
                StatusCode::UNAUTHORIZED,
                "authentication required: use an escale API token as the password (any user name), e.g. https://git:TOKEN@host/git/APP.git",
            ))
        }
        Err(e) => return Err(e.into_response()),
    };
    let name = repo.strip_suffix(".git").unwrap_or(repo);
    let not_found = || {
        text(
            StatusCode::NOT_FOUND,
            format!(
                "no app named `{}`: create it with `escale apps create NAME`, then push to /git/NAME.git",
                crate::validate::printable(name)
            ),
        )
    };
    if crate::validate::app_name(name).is_err() {
        return Err(not_found());
    }
    match s.registry.app(&actor, name).await {
        Ok(app) => Ok((actor, app)),
        Err(crate::registry::RegistryError::NotFound { .. }) => Err(not_found()),
        Err(e) => Err(ApiError::from(e).into_response()),
    }
}

fn internal(e: GitError) -> Response {
    tracing::error!(error = %e, "git request failed");
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the server failed to handle this git request; its log says why",
    )
}

#[derive(serde::Deserialize)]
struct ServiceQuery {
    service: Option<String>,
}

/// `GET /git/{app}.git/info/refs?service=git-receive-pack`
async fn info_refs(
    State(s): State<Services>,
    axum::extract::Path(repo): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (mut parts, _body) = req.into_parts();
    let service = axum::extract::Query::<ServiceQuery>::try_from_uri(&parts.uri)
        .ok()
        .and_then(|q| q.0.service);
    let (_actor, app) = match resolve(&s, &mut parts, &repo).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    match service.as_deref() {
        Some("git-receive-pack") => {}
        Some("git-upload-pack") => return text(StatusCode::FORBIDDEN, PUSH_ONLY),
        _ => {
            return text(
                StatusCode::FORBIDDEN,
                "only git's smart HTTP protocol is served; use git 1.6.6 or later",
            )
        }
    }
    let path = match ensure_repo(&s.config.data_dir, &app).await {
        Ok(p) => p,
        Err(e) => return internal(e),
    };
    let out = match git()
        .args(["receive-pack", "--stateless-rpc", "--advertise-refs", "--"])
        .arg(&path)
        .output()
        .await
    {
        Ok(o) if o.status.success() => o.stdout,
        Ok(o) => {
            return internal(GitError::Git {
                what: "receive-pack --advertise-refs",
                stderr: one_line(&String::from_utf8_lossy(&o.stderr)),
            })
        }
        Err(source) => {
            return internal(GitError::Spawn {
                what: "receive-pack",
                source,
            })
        }
    };
    let mut body = pkt::encode(b"# service=git-receive-pack\n");
    body.extend_from_slice(pkt::FLUSH);
    body.extend_from_slice(&out);
    let mut r = (StatusCode::OK, body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-git-receive-pack-advertisement"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `POST /git/{app}.git/git-upload-pack`: refused.
async fn upload_pack(
    State(s): State<Services>,
    axum::extract::Path(repo): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (mut parts, _body) = req.into_parts();
    if let Err(r) = resolve(&s, &mut parts, &repo).await {
        return r;
    }
    text(StatusCode::FORBIDDEN, PUSH_ONLY)
}

/// How the response is framed: side-band (with the largest payload per packet) or plain.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Framing {
    Band(usize),
    Plain,
    /// No client (a webhook deploy): lines go to the server's log.
    Log,
}

/// Progress lines to the pusher (`remote: ...`), on side band 2; dropped when the client did
/// not ask for a side band or has gone.
#[derive(Clone)]
pub(crate) struct Progress {
    tx: mpsc::UnboundedSender<Bytes>,
    framing: Framing,
}

impl Progress {
    /// Progress of a deploy nobody watches (webhooks): lines go to the server's log.
    pub(crate) fn detached() -> Progress {
        let (tx, _rx) = mpsc::unbounded_channel();
        Progress {
            tx,
            framing: Framing::Log,
        }
    }

    pub(crate) fn say(&self, line: &str) {
        if let Framing::Log = self.framing {
            tracing::info!(line = %line.trim_end(), "webhook deploy");
            return;
        }
        if let Framing::Band(max) = self.framing {
            let mut l = line.trim_end_matches(['\n', '\r']).to_string();
            l.push('\n');
            let _ = self
                .tx
                .send(Bytes::from(pkt::sideband_max(2, l.as_bytes(), max)));
        }
    }

    fn raw(&self, b: Vec<u8>) {
        let _ = self.tx.send(Bytes::from(b));
    }

    /// Sends the final report (and, with a side band, the closing flush).
    fn finish(&self, report: &Report) {
        match self.framing {
            Framing::Band(max) => {
                let mut out = pkt::sideband_max(1, &report.encode(), max);
                out.extend_from_slice(pkt::FLUSH);
                self.raw(out);
            }
            Framing::Plain => self.raw(report.encode()),
            Framing::Log => {}
        }
    }
}

fn streaming_response(rx: mpsc::UnboundedReceiver<Bytes>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-git-receive-pack-result"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `POST /git/{app}.git/git-receive-pack`: the push.
async fn receive_pack(
    State(s): State<Services>,
    axum::extract::Path(repo): axum::extract::Path<String>,
    req: Request,
) -> Response {
    let (mut parts, body) = req.into_parts();
    let (actor, app) = match resolve(&s, &mut parts, &repo).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let ctype = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ctype != "application/x-git-receive-pack-request" {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send a git receive-pack request (Content-Type: application/x-git-receive-pack-request)",
        );
    }
    if parts
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed push requests are not supported",
        );
    }
    let too_big = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a push may be at most {} MiB", MAX_PUSH_BYTES >> 20),
        )
    };
    if parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_PUSH_BYTES)
    {
        return too_big();
    }

    // Read the command section (up to the first flush) to know what the push does.
    let mut body = body.into_data_stream();
    let mut head = Vec::new();
    let mut parser = pkt::Parser::default();
    let mut pkts = Vec::new();
    let mut ended = false;
    'read: loop {
        while let Some(p) = match parser.next_pkt() {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
        } {
            let flush = p == Pkt::Flush;
            pkts.push(p);
            if flush {
                break 'read;
            }
        }
        if head.len() > MAX_COMMANDS_BYTES {
            return too_big();
        }
        match body.next().await {
            Some(Ok(chunk)) => {
                head.extend_from_slice(&chunk);
                parser.push(&chunk);
            }
            Some(Err(e)) => {
                return text(StatusCode::BAD_REQUEST, format!("reading the request: {e}"))
            }
            None => {
                ended = true;
                break;
            }
        }
    }
    let commands = match PushCommands::parse(&pkts) {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let framing = if commands.has("side-band-64k") {
        Framing::Band(pkt::MAX_PKT - 5)
    } else if commands.has("side-band") {
        Framing::Band(1000 - 5)
    } else {
        Framing::Plain
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let progress = Progress { tx, framing };

    let deploy_ref = s.config.git.deploy_ref();
    let deploy_branch = s.config.git.deploy_branch.clone();
    let deploying = commands
        .updates
        .iter()
        .find(|u| u.name == deploy_ref && !u.is_delete())
        .cloned();
    let mut guard = None;
    let refusal = if commands.updates.iter().any(|u| !valid_ref(&u.name)) {
        tracing::info!(app = %app.name, "git push refused: invalid ref name");
        Some("escale accepts branch and tag names made of letters, digits, `.`, `_`, `-` and `/` (no component starting with `.` or `-`)".to_string())
    } else if deploying.is_some() && s.scheduler.is_none() {
        Some("this server runs no scheduler, so it cannot deploy".to_string())
    } else if let Some(u) = &deploying {
        let what = format!(
            "a git push of {} by {}",
            &u.new[..7.min(u.new.len())],
            actor.name
        );
        match s.try_lock(&app, what).await {
            Ok(g) => {
                guard = Some(g);
                None
            }
            Err(busy) => Some(busy.to_string()),
        }
    } else {
        None
    };
    // Refusals before git sees anything. The rest of the body is read and dropped so that the
    // client is not cut off while it sends its pack.
    if let Some(reason) = refusal {
        let updates = commands.updates.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !ended && n <= MAX_PUSH_BYTES {
                match body.next().await {
                    Some(Ok(c)) => n += c.len() as u64,
                    _ => break,
                }
            }
            progress.say(&format!("-----> push refused: {reason}"));
            progress.finish(&Report::rejected(&updates, &reason));
        });
        return streaming_response(rx);
    }
    let path = match ensure_repo(&s.config.data_dir, &app).await {
        Ok(p) => p,
        Err(e) => return internal(e),
    };
    let mut child = match git()
        .args(["receive-pack", "--stateless-rpc", "--"])
        .arg(&path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(source) => {
            return internal(GitError::Spawn {
                what: "receive-pack",
                source,
            })
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");

    // The request body, streamed into git.
    let writer = tokio::spawn(async move {
        let mut n = head.len() as u64;
        if stdin.write_all(&head).await.is_err() {
            return Ok(());
        }
        if ended {
            return Ok(());
        }
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return Err(format!("reading the request: {e}")),
            };
            n += chunk.len() as u64;
            if n > MAX_PUSH_BYTES {
                return Err(format!(
                    "the push is larger than {} MiB",
                    MAX_PUSH_BYTES >> 20
                ));
            }
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        Ok(())
    });

    let s2 = s.clone();
    let out = progress.clone();
    // Runs to the end even when the client goes away: refs may have moved, so the deploy (or
    // the reset of the branch) must happen.
    tokio::spawn(async move {
        let stderr_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut buf).await;
            buf
        });
        let mut parser = pkt::Parser::default();
        let mut report = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut done = false;
        while !done {
            let n = match stdout.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            match framing {
                Framing::Plain | Framing::Log => report.extend_from_slice(&buf[..n]),
                Framing::Band(_) => {
                    parser.push(&buf[..n]);
                    loop {
                        match parser.next_pkt() {
                            Ok(Some(Pkt::Data(d))) if d.first() == Some(&1) => {
                                report.extend_from_slice(&d[1..])
                            }
                            Ok(Some(Pkt::Data(d))) => out.raw(pkt::encode(&d)),
                            Ok(Some(Pkt::Flush)) => {
                                done = true;
                                break;
                            }
                            Ok(Some(Pkt::Special(_))) => {}
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "receive-pack output unreadable");
                                done = true;
                                break;
                            }
                        }
                    }
                }
            }
        }
        // Drain what is left so git can exit.
        let _ = tokio::io::copy(&mut stdout, &mut tokio::io::sink()).await;
        let status = child.wait().await;
        let upload = writer.await.unwrap_or(Ok(()));
        let git_err = stderr_task.await.unwrap_or_default();
        if !git_err.is_empty() {
            tracing::info!(app = %app.name, stderr = %one_line(&String::from_utf8_lossy(&git_err)), "git receive-pack said");
        }
        let mut report = match Report::parse(&report) {
            Ok(r) if !r.lines.is_empty() => r,
            _ => {
                // No report (a probe, or the client did not ask for one, or git failed).
                if let Err(e) = upload {
                    out.say(&format!("-----> push failed: {e}"));
                }
                if !matches!(status, Ok(st) if st.success()) {
                    tracing::warn!(app = %app.name, status = ?status, "git receive-pack failed");
                }
                if let Framing::Band(_) = framing {
                    if !commands.updates.is_empty() {
                        out.finish(&Report::rejected(
                            &commands.updates,
                            "the server could not store the push",
                        ));
                    }
                }
                return;
            }
        };
        if let Err(e) = &upload {
            out.say(&format!("-----> push failed: {e}"));
        }
        tracing::info!(app = %app.name, user = %actor.name, refs = commands.updates.len(), "git push received");
        for u in &commands.updates {
            if u.name == deploy_ref || !report.ok(&u.name) {
                continue;
            }
            out.say(&format!(
                "escale deploys pushes to `{deploy_branch}` only: `{}` was stored, not deployed",
                u.name
            ));
        }
        if commands
            .updates
            .iter()
            .any(|u| u.name == deploy_ref && u.is_delete() && report.ok(&u.name))
        {
            out.say(&format!(
                "`{deploy_branch}` was deleted; nothing was stopped: the current release keeps serving"
            ));
        }
        if let (Some(u), Some(guard)) = (deploying.filter(|u| report.ok(&u.name)), &guard) {
            let job = deploy::Job {
                services: &s2,
                guard,
                actor: &actor,
                app: &app,
                repo: &path,
                update: &u,
                progress: &out,
            };
            if let Err(e) = job.run().await {
                let reason = e.to_string();
                tracing::info!(app = %app.name, reason = %reason, "git push deploy failed");
                out.say(&format!("-----> deploy failed: {reason}"));
                reset_branch(&path, &u).await;
                report.fail(&u.name, &reason);
            }
        }
        out.finish(&report);
    });
    streaming_response(rx)
}

/// Puts the deploy branch back where it was before a push whose deploy failed.
pub(crate) async fn reset_branch(repo: &std::path::Path, u: &super::RefUpdate) {
    let args: Vec<&str> = if super::is_zero(&u.old) {
        vec!["update-ref", "-d", "--", &u.name, &u.new]
    } else {
        vec!["update-ref", "--", &u.name, &u.old, &u.new]
    };
    if let Err(e) = super::run_git("update-ref", repo, &args).await {
        tracing::warn!(error = %e, "could not reset the deploy branch after a failed deploy");
    }
}

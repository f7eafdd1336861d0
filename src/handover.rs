//! Restart and upgrade without dropping a request: a new `escale serve` on the same data dir
//! takes the listening sockets over from the running one.
//!
//! The running server listens on `data_dir/handover.sock` (a unix socket inside the 0700 data
//! dir: only the owner reaches it). A new server finding it:
//!
//! 1. asks for the **listeners** and receives the very same sockets (the API's, the proxy's
//!    HTTP and HTTPS) as descriptors (`SCM_RIGHTS`): nothing is closed or bound again, so no
//!    connection is refused and no accept queue is lost;
//! 2. asks the old server to **stop its background work** (reconciler, ACME, node joining,
//!    scheduled backups) and waits for it: one reconciler at a time drives the engines. The
//!    old proxy and API keep serving meanwhile, on the routes they have;
//! 3. starts its own reconciler, which adopts the running containers, and waits until its
//!    routing table is warm (a pass done, the instances probed; bounded);
//! 4. accepts on the shared sockets (both processes accept for a moment), then asks the old
//!    server to **drain**: it stops accepting, finishes the requests in flight (an idle
//!    HTTP/1.1 connection is given a short linger for a request already on its way, answered
//!    with `Connection: close`) and exits.
//!
//! Listeners are used only where the new configuration names the same address (or port 0);
//! an address changed in the config is bound anew.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// The control socket's name in the data dir.
pub const SOCKET: &str = "handover.sock";

/// How long each step of a handover may take before the new server gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Handover failures.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("handover socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("handover with the running escale failed: {0}")]
    Protocol(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HandoverError {
    let path = path.display().to_string();
    move |source| HandoverError::Io { path, source }
}

/// The sockets a server listens on, by name (`api`, `http`, `https`).
#[derive(Debug, Default)]
pub struct Sockets {
    pub api: Option<std::net::TcpListener>,
    pub http: Option<std::net::TcpListener>,
    pub https: Option<std::net::TcpListener>,
}

/// The new server's side of a handover in progress.
pub struct Taker {
    stream: BufReader<UnixStream>,
    path: PathBuf,
}

impl std::fmt::Debug for Taker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Taker({})", self.path.display())
    }
}

/// Connects to a running server's handover socket in `data_dir`; `None` when no server runs
/// there (a socket file left by a crashed server is removed).
pub fn connect(data_dir: &Path) -> Result<Option<Taker>, HandoverError> {
    let path = data_dir.join(SOCKET);
    match UnixStream::connect(&path) {
        Ok(s) => {
            s.set_read_timeout(Some(STEP_TIMEOUT)).map_err(io(&path))?;
            Ok(Some(Taker {
                stream: BufReader::new(s),
                path,
            }))
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            let _ = std::fs::remove_file(&path);
            Ok(None)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

impl Taker {
    fn send(&mut self, line: &str) -> Result<(), HandoverError> {
        let path = self.path.clone();
        self.stream
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .map_err(io(&path))
    }

    fn expect_ok(&mut self, what: &str) -> Result<(), HandoverError> {
        let mut line = String::new();
        let path = self.path.clone();
        self.stream.read_line(&mut line).map_err(io(&path))?;
        if line.trim() == "ok" {
            Ok(())
        } else {
            Err(HandoverError::Protocol(format!(
                "{what}: the running escale answered `{}`",
                line.trim()
            )))
        }
    }

    /// Receives the running server's listening sockets.
    pub fn listeners(&mut self) -> Result<Sockets, HandoverError> {
        self.send("listeners")?;
        let fd = self.stream.get_ref().as_raw_fd();
        let mut names = [0u8; 256];
        let mut cmsg = nix::cmsg_space!([RawFd; 3]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut names)];
            let msg = recvmsg::<()>(fd, &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC)
                .map_err(|e| HandoverError::Protocol(format!("receiving the listeners: {e}")))?;
            let mut fds = Vec::new();
            for c in msg
                .cmsgs()
                .map_err(|e| HandoverError::Protocol(format!("receiving the listeners: {e}")))?
            {
                if let ControlMessageOwned::ScmRights(r) = c {
                    fds.extend(r);
                }
            }
            (msg.bytes, fds)
        };
        let names = String::from_utf8_lossy(&names[..len]).trim().to_string();
        let names: Vec<&str> = names.split(',').filter(|n| !n.is_empty()).collect();
        if names.len() != fds.len() {
            return Err(HandoverError::Protocol(format!(
                "{} names for {} sockets",
                names.len(),
                fds.len()
            )));
        }
        let mut out = Sockets::default();
        for (name, fd) in names.into_iter().zip(fds) {
            // SAFETY: the kernel has just installed `fd` in this process for this message
            // (SCM_RIGHTS); nothing else refers to it, so the listener becomes its one owner.
            let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            match name {
                "api" => out.api = Some(l),
                "http" => out.http = Some(l),
                "https" => out.https = Some(l),
                _ => {}
            }
        }
        Ok(out)
    }

    /// Asks the running server to stop its reconciler and background tasks; returns once it
    /// has.
    pub fn stop_background(&mut self) -> Result<(), HandoverError> {
        self.send("stop-background")?;
        self.expect_ok("stopping the reconciler")
    }

    /// Tells the running server to stop accepting, drain and exit.
    pub fn drain(mut self) -> Result<(), HandoverError> {
        self.send("drain")?;
        self.expect_ok("draining")
    }
}

/// What the running server is asked to do by a newer one.
#[derive(Debug)]
pub enum Request {
    /// Stop the reconciler and background tasks, then answer on the sender.
    StopBackground(tokio::sync::oneshot::Sender<()>),
    /// The newer server went away after [`Request::StopBackground`] and before taking over:
    /// start the background work again.
    ResumeBackground,
    /// Stop accepting, drain, exit.
    Drain,
}

/// Serves the handover socket of `data_dir` until `stop`: gives `sockets` to a newer server
/// and forwards its requests on `requests`. The socket file is replaced if one exists.
pub async fn serve(
    data_dir: PathBuf,
    sockets: Vec<(&'static str, std::net::TcpListener)>,
    requests: tokio::sync::mpsc::Sender<Request>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), HandoverError> {
    let path = data_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = tokio::net::UnixListener::bind(&path).map_err(io(&path))?;
    // Owner-only, as everything in the data dir: whoever connects can take the sockets over.
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(io(&path))?;
    }
    tokio::pin!(stop);
    loop {
        let conn = tokio::select! {
            () = &mut stop => break,
            c = listener.accept() => c,
        };
        let (stream, _) = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "handover socket: accept failed");
                continue;
            }
        };
        let draining = handle(stream, &sockets, &requests).await;
        match draining {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "handover with a newer escale failed"),
        }
    }
    // Only this server's own socket file: a newer server may have bound its own already.
    drop(listener);
    Ok(())
}

/// One newer server's requests; true once it asked this one to drain.
async fn handle(
    stream: tokio::net::UnixStream,
    sockets: &[(&'static str, std::net::TcpListener)],
    requests: &tokio::sync::mpsc::Sender<Request>,
) -> Result<bool, HandoverError> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let proto = |e: std::io::Error| HandoverError::Protocol(e.to_string());
    let mut stream = tokio::io::BufReader::new(stream);
    let mut stopped_background = false;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await.map_err(proto)? == 0 {
            if stopped_background {
                tracing::error!(
                    "the newer escale went away after this one stopped its reconciler and before \
                     it took over: this one starts its reconciler and background work again"
                );
                let _ = requests.send(Request::ResumeBackground).await;
            }
            return Ok(false);
        }
        match line.trim() {
            "listeners" => {
                let names: Vec<&str> = sockets.iter().map(|(n, _)| *n).collect();
                let names = names.join(",");
                let fds: Vec<RawFd> = sockets.iter().map(|(_, l)| l.as_raw_fd()).collect();
                let inner = stream.get_ref();
                loop {
                    inner.writable().await.map_err(proto)?;
                    let sent = inner.try_io(tokio::io::Interest::WRITABLE, || {
                        sendmsg::<()>(
                            inner.as_raw_fd(),
                            &[IoSlice::new(names.as_bytes())],
                            &[ControlMessage::ScmRights(&fds)],
                            MsgFlags::empty(),
                            None,
                        )
                        .map_err(std::io::Error::from)
                    });
                    match sent {
                        Ok(_) => break,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(proto(e)),
                    }
                }
                tracing::info!(sockets = %names, "handover: listening sockets given to a newer escale");
            }
            "addresses" => {
                // For `escale doctor`: which addresses this server holds.
                let list: Vec<String> = sockets
                    .iter()
                    .filter_map(|(n, l)| Some(format!("{n}={}", l.local_addr().ok()?)))
                    .collect();
                stream
                    .get_mut()
                    .write_all(format!("{}\n", list.join(",")).as_bytes())
                    .await
                    .map_err(proto)?;
            }
            "stop-background" => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                requests
                    .send(Request::StopBackground(tx))
                    .await
                    .map_err(|_| HandoverError::Protocol("the server is stopping".into()))?;
                let _ = rx.await;
                stopped_background = true;
                stream.get_mut().write_all(b"ok\n").await.map_err(proto)?;
            }
            "drain" => {
                requests
                    .send(Request::Drain)
                    .await
                    .map_err(|_| HandoverError::Protocol("the server is stopping".into()))?;
                stream.get_mut().write_all(b"ok\n").await.map_err(proto)?;
                return Ok(true);
            }
            other => {
                let _ = stream
                    .get_mut()
                    .write_all(format!("unknown request `{other}`\n").as_bytes())
                    .await;
            }
        }
    }
}

/// The addresses the escale serving `data_dir` listens on; `None` when none serves there.
pub fn addresses(data_dir: &Path) -> Option<Vec<std::net::SocketAddr>> {
    let s = UnixStream::connect(data_dir.join(SOCKET)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    (&s).write_all(b"addresses\n").ok()?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).ok()?;
    Some(
        line.trim()
            .split(',')
            .filter_map(|e| e.split_once('=')?.1.parse().ok())
            .collect(),
    )
}

/// Tells systemd (when it started this process with `NOTIFY_SOCKET`, `Type=notify`) about
/// the service: `READY=1` once serving, `MAINPID=<pid>` when this process took over from the
/// main one (so systemd follows the new process), `STOPPING=1`. Without `NOTIFY_SOCKET`,
/// nothing.
pub fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "sd_notify: no socket");
            return;
        }
    };
    let path = path.to_string_lossy().into_owned();
    let sent = match path.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
        }
        None => sock.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %path, "sd_notify failed");
    }
}

/// An inherited listener when it listens where `want` says (same address, or port 0 asked
/// on the same IP), else `None` (the caller binds anew).
pub fn matching(
    l: Option<std::net::TcpListener>,
    want: std::net::SocketAddr,
) -> Option<std::net::TcpListener> {
    let l = l?;
    let have = l.local_addr().ok()?;
    (have == want || (want.port() == 0 && have.ip() == want.ip())).then_some(l)
}

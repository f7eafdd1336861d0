//! `escale serve`: opens the registry and runs the API (and, as they are wired in, the
//! reconciler and the proxy) until shutdown.
//!
//! Like mini-redis, [`run`] takes already-bound listeners and a shutdown future, so tests bind
//! port 0 and start the real thing.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::auth::generate_setup_token;
use crate::config::{Config, LogFormat};
use crate::registry::{Registry, RegistryError};
use crate::scheduler::Scheduler;
use crate::secrets::{MasterKey, SecretsError};

/// Start-up and run-time failures of the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
    #[error("cannot open the registry: {0}")]
    Registry(#[from] RegistryError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot reach the Docker engine at {host} (set ESCALE_DOCKER_HOST): {source}")]
    Docker {
        host: String,
        source: Box<crate::node::NodeError>,
    },
    #[error("cannot load the certificates: {0}")]
    Certs(#[from] crate::certs::CertError),
    #[error("cannot start the proxy: {0}")]
    Proxy(#[from] crate::proxy::ProxyError),
    #[error("server I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Handover(#[from] crate::handover::HandoverError),
}

/// How long API connections may take to finish after a shutdown signal before they are cut.
pub const API_DRAIN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens (creating if needed) the data dir, master key and registry of `config`.
///
/// The data dir holds the registry, the master key and the apps' git repositories: it is made
/// 0700 and everything in it owner-only (files 0600, directories 0700) at every start, which
/// also fixes installs made before this rule; the database is created 0600 before SQLite
/// opens it (its `-wal` and `-shm` files take its mode).
pub async fn open_registry(config: &Config) -> Result<Registry, ServerError> {
    create_data_dir(&config.data_dir)?;
    let env_key = std::env::var("ESCALE_MASTER_KEY").ok();
    let key = MasterKey::load_or_create(&config.data_dir, env_key.as_deref())?;
    create_private_file(&config.database_path()).map_err(|source| ServerError::DataDir {
        path: config.database_path().display().to_string(),
        source,
    })?;
    Ok(Registry::open_with(
        &config.database_path(),
        key,
        config.installation_id.as_deref(),
    )
    .await?)
}

fn create_data_dir(path: &Path) -> Result<(), ServerError> {
    let err = |source| ServerError::DataDir {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    make_private(path).map_err(err)?;
    crate::git::make_repos_private(path);
    Ok(())
}

/// Creates `path` empty with mode 0600 unless it exists.
fn create_private_file(path: &Path) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    match opts.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Takes every group and other permission bit off `path` and everything under it (symbolic
/// links are not followed, and left as they are).
pub fn make_private(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.file_type().is_symlink() {
            return Ok(());
        }
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                make_private(&entry?.path())?;
            }
        }
    }
    Ok(())
}

/// Binds the configured API listener.
pub async fn bind_api(config: &Config) -> Result<TcpListener, ServerError> {
    TcpListener::bind(config.api_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "api_addr",
            addr: config.api_addr,
            source,
        })
}

/// `escale serve`: takes the listening sockets over from an escale already serving on the
/// same data dir (see [`crate::handover`]) or binds them, then runs until `shutdown` (or
/// until a newer escale takes over from this one).
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    create_data_dir(&config.data_dir)?;
    let data_dir = config.data_dir.clone();
    let taken = tokio::task::spawn_blocking(move || {
        let Some(mut taker) = crate::handover::connect(&data_dir)? else {
            return Ok(None);
        };
        let sockets = taker.listeners()?;
        Ok::<_, crate::handover::HandoverError>(Some((taker, sockets)))
    })
    .await
    .map_err(|e| ServerError::Io(std::io::Error::other(e)))??;
    let (taker, sockets) = match taken {
        Some((t, s)) => {
            tracing::info!("an escale already serves this data dir: taking its sockets over");
            (Some(t), s)
        }
        None => (None, crate::handover::Sockets::default()),
    };
    let api = match crate::handover::matching(sockets.api, config.api_addr) {
        Some(l) => {
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => bind_api(&config).await?,
    };
    let inherited = Inherited {
        http: sockets.http,
        https: sockets.https,
        taker,
    };
    run_with(config, api, inherited, shutdown).await
}

/// What a server taking over got from the one it replaces.
#[derive(Debug, Default)]
pub struct Inherited {
    pub http: Option<std::net::TcpListener>,
    pub https: Option<std::net::TcpListener>,
    pub taker: Option<crate::handover::Taker>,
}

/// Runs escale on an already-bound API listener until `shutdown` resolves, then stops
/// accepting, lets requests in flight finish, and returns.
pub async fn run(
    config: Config,
    api_listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    run_with(config, api_listener, Inherited::default(), shutdown).await
}

/// How long a server taking over waits for its routing table to be warm before it accepts.
const WARM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Binds `addr`, or uses the inherited listener when it listens there.
async fn listener_for(
    inherited: Option<std::net::TcpListener>,
    addr: SocketAddr,
    what: &'static str,
) -> Result<std::net::TcpListener, ServerError> {
    if let Some(l) = crate::handover::matching(inherited, addr) {
        return Ok(l);
    }
    let l = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { what, addr, source })?;
    Ok(l.into_std()?)
}

/// [`run`], with what a server taking over inherited.
pub async fn run_with(
    config: Config,
    api_listener: TcpListener,
    inherited: Inherited,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let Inherited {
        http: inherited_http,
        https: inherited_https,
        taker,
    } = inherited;
    // Descriptors: the limit raised as far as allowed, then split so that the proxy, however
    // loaded, leaves enough for the API, the registry and the engines.
    let nofile = crate::listen::raise_nofile_limit();
    let budget = crate::listen::Budget::from_limit(nofile);
    let proxy_limits = crate::listen::ConnLimits::new(
        "proxy",
        if config.proxy.max_connections == 0 {
            budget.proxy
        } else {
            config.proxy.max_connections
        },
        config.proxy.max_connections_per_client,
    );
    let api_limits = crate::listen::ConnLimits::new(
        "api",
        if config.api_max_connections == 0 {
            budget.api
        } else {
            config.api_max_connections
        },
        config.api_max_connections_per_client,
    );
    tracing::info!(
        nofile,
        proxy_connections = proxy_limits.max_total(),
        api_connections = api_limits.max_total(),
        "connection caps"
    );
    let registry = open_registry(&config).await?;
    if registry.user_count().await? == 0 {
        let token = generate_setup_token();
        registry.store_setup_token(&token.hash).await?;
        announce_setup(&token.secret, api_listener.local_addr()?);
    }
    let mut local_nodes = Vec::new();
    if config.docker_host != "off" {
        let local = crate::node::Node::connect_local("local", &config.docker_host)
            .await
            .map_err(|source| ServerError::Docker {
                host: config.docker_host.clone(),
                source: Box::new(source),
            })?
            .with_advertise_ip(config.advertise_ip)
            .with_reach(config.local_reach);
        local_nodes.push(Arc::new(local));
    } else {
        tracing::info!("docker_host is off: apps run on the registered nodes only");
    }
    let config = Arc::new(config);
    let mut state = AppState::new(registry.clone(), config.clone());
    let routes = crate::routing::shared();
    let metrics = state.metrics.clone();
    let rates = state.rates.clone();
    let cert_manager = state.certs.clone();
    let loaded = cert_manager.load().await?;
    tracing::info!(certificates = loaded, "certificates loaded");
    let certs = cert_manager.store().clone();
    let scheduler = Scheduler::new(
        registry.clone(),
        config.clone(),
        local_nodes,
        routes.clone(),
    );
    if config.https_addr.is_some() {
        // Redirecting to HTTPS only makes sense when something listens there.
        scheduler.redirect_https_with(certs.clone());
    }
    state.scheduler = Some(scheduler.clone());
    let cleanup_state = state.services.clone();
    let app = api::router(state);

    // Two shutdown signals: the background work (reconciler, ACME, nodes, backups, cleanup,
    // rates) stops first, alone when a newer escale takes over (and starts again if that one
    // goes away before taking over); then the serving (proxy, API).
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stop_rx_proxy = stop_rx.clone();
    let serving_stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    // Taking over: the old server's reconciler stops before this one starts.
    let taker = match taker {
        Some(mut t) => {
            let t = tokio::task::spawn_blocking(move || t.stop_background().map(|()| t))
                .await
                .map_err(|e| ServerError::Io(std::io::Error::other(e)))??;
            tracing::info!("handover: the old escale's reconciler stopped");
            Some(t)
        }
        None => None,
    };
    if config.acme.directory_url.is_some()
        && config.acme.challenge == crate::config::AcmeChallenge::Http01
        && config.http_addr.is_none()
    {
        tracing::warn!(
            "acme.challenge is http-01 but http_addr is off: certificates can only be ordered \
             if port 80 reaches this host some other way (or set acme.challenge = \"tls-alpn-01\")"
        );
    }
    let background_work = BackgroundWork {
        scheduler: scheduler.clone(),
        services: cleanup_state,
        certs: cert_manager.clone(),
        rates,
        metrics: metrics.clone(),
    };
    let mut background = Some(background_work.start());

    // The proxy: plain HTTP and HTTPS listeners on the routing snapshot.
    let mut proxy_config = proxy_config(&config);
    proxy_config.acme_challenges = Some(cert_manager.challenges().clone());
    proxy_config.connection_limits = Some(proxy_limits);
    metrics.watch_listener(api_limits.clone());
    let mut listeners = crate::proxy::Listeners::default();
    if taker.is_some() {
        let warm = scheduler.wait_warm(WARM_TIMEOUT).await;
        tracing::info!(warm, "handover: routing table ready, accepting");
    }
    // Kept to hand the sockets to a newer escale (see `crate::handover`).
    let mut handover_sockets: Vec<(&'static str, std::net::TcpListener)> = Vec::new();
    {
        use std::os::fd::AsFd;
        let fd = api_listener.as_fd().try_clone_to_owned()?;
        handover_sockets.push(("api", std::net::TcpListener::from(fd)));
    }
    if let Some(addr) = config.http_addr {
        let l = listener_for(inherited_http, addr, "http_addr").await?;
        println!("escale: proxy listening on http://{}", l.local_addr()?);
        handover_sockets.push(("http", l.try_clone()?));
        listeners.http = Some(l);
    }
    if let Some(addr) = config.https_addr {
        let l = listener_for(inherited_https, addr, "https_addr").await?;
        println!("escale: proxy listening on https://{}", l.local_addr()?);
        // HTTP -> HTTPS redirects keep a port that is not 443.
        proxy_config.https_redirect_port = Some(l.local_addr()?.port()).filter(|p| *p != 443);
        handover_sockets.push(("https", l.try_clone()?));
        // The store, plus TLS-ALPN-01 validation certificates for `acme-tls/1` clients.
        let certs: Arc<dyn rustls::server::ResolvesServerCert> = cert_manager.resolver();
        listeners.https = Some((l, certs));
    }
    let proxy_workers = crate::proxy::spawn_workers(
        config.proxy.workers,
        listeners,
        routes.clone(),
        proxy_config,
        metrics.clone(),
        stop_rx_proxy,
    )?;
    tracing::info!(workers = config.proxy.workers, "proxy started");
    let api_addr = api_listener.local_addr()?;
    tracing::info!(api = %api_addr, data_dir = %config.data_dir.display(), "escale is serving");
    println!("escale: API listening on http://{api_addr}");
    let api_task = tokio::spawn(serve_api(
        api_listener,
        app,
        ApiLimits {
            header_read_timeout: config.proxy.header_read_timeout,
            connections: api_limits,
        },
        serving_stopped(),
    ));
    // The handover socket: a newer escale on this data dir takes over from this one.
    let (handover_tx, mut handover_rx) = tokio::sync::mpsc::channel(4);
    let handover_task = tokio::spawn(crate::handover::serve(
        config.data_dir.clone(),
        handover_sockets,
        handover_tx,
        serving_stopped(),
    ));
    let took_over = taker.is_some();
    if let Some(t) = taker {
        match tokio::task::spawn_blocking(move || t.drain()).await {
            Ok(Ok(())) => tracing::info!("handover: the old escale is draining; this one serves"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "handover: the old escale did not confirm its drain")
            }
            Err(e) => tracing::warn!(error = %e, "handover task failed"),
        }
    }
    // Under systemd (`Type=notify`): serving; after a takeover, this is the main process now.
    crate::handover::sd_notify(&if took_over {
        format!("MAINPID={}\nREADY=1", std::process::id())
    } else {
        "READY=1".to_string()
    });
    tokio::pin!(shutdown);
    // A newer escale took over: it is systemd's main process now, so no STOPPING=1 from here.
    let mut handed_over = false;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            r = handover_rx.recv() => match r {
                Some(crate::handover::Request::StopBackground(done)) => {
                    tracing::info!("a newer escale takes over: stopping the reconciler and background tasks");
                    if let Some(bg) = background.take() {
                        bg.stop().await;
                    }
                    let _ = done.send(());
                }
                Some(crate::handover::Request::ResumeBackground) => {
                    if background.is_none() {
                        tracing::warn!("the newer escale went away before taking over: this one reconciles again");
                        background = Some(background_work.start());
                    }
                }
                Some(crate::handover::Request::Drain) => {
                    tracing::info!("a newer escale serves: draining and stopping");
                    handed_over = true;
                    break;
                }
                None => std::future::pending::<()>().await,
            },
        }
    }
    if !handed_over {
        crate::handover::sd_notify("STOPPING=1");
    }
    if let Some(bg) = background.take() {
        bg.stop().await;
    }
    let _ = stop_tx.send(true);
    let api_deadline = tokio::time::Instant::now() + API_DRAIN_GRACE;
    let _ = handover_task.await;
    if let Err(e) = proxy_workers.join().await {
        tracing::error!(error = %e, "proxy stopped with an error");
    }
    // Requests in flight may finish, but a client that never completes its request (or a
    // followed log stream) must not keep the server from stopping.
    let mut api_task = api_task;
    match tokio::time::timeout_at(api_deadline, &mut api_task).await {
        Ok(Ok(r)) => r?,
        Ok(Err(e)) => tracing::error!(error = %e, "API task failed"),
        Err(_) => {
            tracing::warn!(
                grace = ?API_DRAIN_GRACE,
                "API connections still open after the shutdown grace; closing them"
            );
            api_task.abort();
        }
    }
    tracing::info!("escale stopped");
    Ok(())
}

/// What runs in the background of a serving escale, apart from the serving itself: the
/// reconciler, node joining, ACME, scheduled backups, upkeep, cleanup and the dashboard's rates.
/// Stopped alone when a newer escale takes over, and started again if it goes away first.
struct BackgroundWork {
    scheduler: Arc<Scheduler>,
    /// The registry and configuration are the services' own.
    services: crate::service::Services,
    certs: Arc<crate::certs::CertManager>,
    rates: Arc<crate::web::rates::Rates>,
    metrics: Arc<crate::proxy::ProxyMetrics>,
}

/// The background tasks of one start of [`BackgroundWork`].
struct Background {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl BackgroundWork {
    fn start(&self) -> Background {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let config = &self.services.config;
        let tasks = vec![
            tokio::spawn(self.scheduler.clone().run(stopped())),
            // The dashboard's request and error rates: the proxy's counters sampled every 30 s.
            tokio::spawn(self.rates.clone().run(self.metrics.clone(), stopped())),
            // Registered nodes join the pool when they answer (and leave it when removed).
            tokio::spawn(crate::service::nodes::join(
                self.services.registry.clone(),
                self.scheduler.clone(),
                stopped(),
            )),
            // Scheduled backups (`[backup] interval`), counted in /metrics.
            tokio::spawn(crate::backup::run_schedule(
                self.services.registry.clone(),
                config.data_dir.clone(),
                config.backup.clone(),
                self.services.backups.clone(),
                stopped(),
            )),
            // What the nodes use, and pruning what escale owns there.
            tokio::spawn(crate::service::upkeep::run(
                self.services.clone(),
                stopped(),
            )),
            // What destroyed apps left outside the registry (repositories, built images).
            tokio::spawn(crate::cleanup::run(self.services.clone(), stopped())),
            // The bucket backups go to ([backup.s3]) checked at start: a wrong key or a
            // missing bucket is said now, not at the first backup (which fails clearly too).
            tokio::spawn(check_backup_bucket(config.backup.s3.clone(), stopped())),
            tokio::spawn(crate::certs::acme::run(
                self.certs.clone(),
                crate::certs::acme::AcmeSettings {
                    directory_url: config.acme.directory_url.clone(),
                    email: config.acme.email.clone(),
                    renew_before: config.acme.renew_before,
                    ca_root: config.acme.ca_root.clone(),
                    challenge: config.acme.challenge,
                },
                stopped(),
            )),
        ];
        Background { stop, tasks }
    }
}

/// Checks the backup bucket once and logs the outcome (nothing without `[backup.s3]`).
async fn check_backup_bucket(
    s3: Option<crate::config::S3Settings>,
    stop: impl Future<Output = ()>,
) {
    let Some(s3) = s3 else { return };
    let checked = async { crate::backup::s3::Store::new(&s3)?.check().await };
    tokio::select! {
        () = stop => {}
        r = checked => match r {
            Ok(()) => {
                tracing::info!(bucket = %s3.location(), endpoint = %s3.endpoint, "backups go to the bucket too")
            }
            Err(e) => {
                tracing::error!(error = %e, "backup.s3: the bucket backups go to does not answer; backups will fail until this is fixed")
            }
        }
    }
}

impl Background {
    /// Signals every task to stop and waits until they have ended.
    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// What bounds the API's connections.
struct ApiLimits {
    /// Time a client has for its first byte and for each request head.
    header_read_timeout: std::time::Duration,
    /// Caps on open connections, per listener and per client.
    connections: Arc<crate::listen::ConnLimits>,
}

/// Serves the API router (HTTP/1.1 and h2c) until `shutdown`, then waits for the open
/// connections to finish their requests. A connection over the caps is closed at accept; a
/// client must send its first byte, and each request head, within `header_read_timeout` (as
/// on the proxy: silent and slow clients cannot hold connections open); an HTTP/2 client that
/// stops answering keep-alive PINGs is dropped. The client's address is given to handlers as
/// `ConnectInfo<SocketAddr>`. Connection tasks are tracked: when this future is dropped
/// (the shutdown grace ran out), they end with it.
async fn serve_api(
    listener: TcpListener,
    app: axum::Router,
    limits: ApiLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let header_read_timeout = limits.header_read_timeout;
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(std::time::Duration::from_secs(20))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    let builder = Arc::new(builder);
    // Tells every connection to finish its request in flight and close.
    let (closing_tx, closing_rx) = tokio::sync::watch::channel(false);
    let shed_log = crate::proxy::server::ShedLog::default();
    let mut tasks = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            conn = crate::proxy::server::accept(&listener, "api") => conn,
        };
        while tasks.try_join_next().is_some() {}
        let permit = match limits.connections.admit(peer.ip()) {
            Ok(p) => p,
            Err(refused) => {
                shed_log.note(&refused, peer);
                continue;
            }
        };
        let router = app.clone();
        let builder = builder.clone();
        let mut closing = closing_rx.clone();
        tasks.spawn(async move {
            let _permit = permit;
            // The first byte, before hyper's protocol detection (which would wait forever).
            let mut first = [0u8; 1];
            match tokio::time::timeout(header_read_timeout, tcp.peek(&mut first)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    tower::ServiceExt::oneshot(router.clone(), req)
                },
            );
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "API connection ended with an error");
            }
        });
    }
    drop(listener);
    // Every connection finishes its request in flight and closes; the caller bounds the
    // wait, and dropping `tasks` with this future ends whatever is left.
    let _ = closing_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// The proxy's settings from `[proxy]`.
pub fn proxy_config(config: &Config) -> crate::proxy::ProxyConfig {
    crate::proxy::ProxyConfig {
        max_header_bytes: config.proxy.max_header_bytes,
        header_read_timeout: config.proxy.header_read_timeout,
        idle_timeout: config.proxy.idle_timeout,
        upstream_response_timeout: config.proxy.upstream_timeout,
        access_log_sample: config.proxy.access_log_sample,

        ..Default::default()
    }
}

fn announce_setup(secret: &str, api: SocketAddr) {
    // On the console on purpose: whoever reads the server's console owns the installation.
    println!(
        "\n  escale has no admin yet. Bind the first admin with this one-time token:\n\n    \
         escale setup --url http://{api} --setup-token {secret} --name admin\n\n  \
         (a new token is printed at each start until an admin exists)\n"
    );
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown requested");
}

/// Installs the `tracing` subscriber: human or JSON lines on stderr; colours only when stderr
/// is a terminal (a log file or journal gets plain text).
pub fn init_logging(format: LogFormat, level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Human => builder.try_init(),
    };
}

//! An in-memory [`Engine`] for the reconciler's unit tests (never used by `escale serve`, and
//! never in the Docker integration tests).
//!
//! It keeps containers with their labels, states, exit codes and log lines, images and app
//! networks, and counts calls. Knobs make a call fail ([`FakeEngine::fail`]), never answer
//! ([`FakeEngine::hang`]) or panic ([`FakeEngine::panic_on`]); make started containers exit at
//! once or later ([`FakeEngine::exit_on_start`], [`FakeEngine::exit_after`], or
//! [`FakeEngine::exit`] for one container); and emit container events ([`FakeEngine::emit`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::StreamExt;
use tokio::sync::broadcast;

use super::{
    AppNetwork, ContainerInstance, Engine, EngineError, InstanceSpec, InstanceState, LogLine,
    LogStream, NodeEvent, Result, StartedInstance,
};

/// The engine calls a knob can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Call {
    List,
    Start,
    Stop,
    Remove,
    ImageExists,
    EnsureImage,
    LoadImage,
    Logs,
    ListNetworks,
    RemoveNetwork,
    Capacity,
}

/// What a call does instead of its work.
#[derive(Debug, Clone)]
enum Fault {
    Fail(String),
    Hang,
    Panic,
}

#[derive(Debug)]
struct Container {
    instance: ContainerInstance,
    logs: Vec<String>,
    /// A real listening socket at the instance's address (see [`FakeEngine::listen`]): TCP
    /// health checks pass while it is open.
    socket: Option<std::net::TcpListener>,
}

#[derive(Default)]
struct State {
    containers: BTreeMap<String, Container>,
    images: HashSet<String>,
    networks: BTreeMap<String, AppNetwork>,
    faults: HashMap<Call, Fault>,
    exit_on_start: Option<(i64, bool)>,
    exit_after: Option<(Duration, i64)>,
    start_logs: Vec<String>,
    listen: bool,
    calls: BTreeMap<Call, u64>,
    /// How long a start takes, and the starts in flight now and at most so far.
    start_delay: Duration,
    starting: usize,
    most_starting: usize,
    /// What [`Engine::capacity`] answers (`None`: the engine does not say).
    capacity: Option<crate::node::Capacity>,
}

/// An in-memory engine. Cheap to share (`Arc`).
pub struct FakeEngine {
    name: String,
    ip: IpAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<NodeEvent>,
}

impl FakeEngine {
    /// An empty engine named `name` with every image present (see [`FakeEngine::without_images`]).
    pub fn new(name: &str) -> Arc<FakeEngine> {
        Arc::new(FakeEngine {
            name: name.to_string(),
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            state: Arc::new(Mutex::new(State {
                images: HashSet::from(["*".to_string()]),
                ..State::default()
            })),
            events: broadcast::channel(1024).0,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes every start take `delay` (the engine is busy).
    pub fn slow_starts(&self, delay: Duration) {
        self.state().start_delay = delay;
    }

    /// The most starts this engine has had in flight at once.
    pub fn most_concurrent_starts(&self) -> usize {
        self.state().most_starting
    }

    /// Starts with no image at all (images must be loaded or "pulled" by `ensure_image`).
    pub fn without_images(self: Arc<Self>) -> Arc<Self> {
        self.state().images.clear();
        self
    }

    /// Adds an image.
    pub fn add_image(&self, image: &str) {
        self.state().images.insert(image.to_string());
    }

    /// Sets what the engine says its host has.
    pub fn set_capacity(&self, cpus: u32, memory_bytes: u64) {
        self.state().capacity = Some(crate::node::Capacity { cpus, memory_bytes });
    }

    /// Makes every `call` fail with `reason` until [`FakeEngine::heal`].
    pub fn fail(&self, call: Call, reason: &str) {
        self.state().faults.insert(call, Fault::Fail(reason.into()));
    }

    /// Makes every `call` never answer until [`FakeEngine::heal`] (calls already hanging stay).
    pub fn hang(&self, call: Call) {
        self.state().faults.insert(call, Fault::Hang);
    }

    /// Makes every `call` panic until [`FakeEngine::heal`].
    pub fn panic_on(&self, call: Call) {
        self.state().faults.insert(call, Fault::Panic);
    }

    /// Undoes the knobs on `call`.
    pub fn heal(&self, call: Call) {
        self.state().faults.remove(&call);
    }

    /// Started containers exit at once with `code` (`None`: they run).
    pub fn exit_on_start(&self, code: Option<i64>, oom: bool) {
        self.state().exit_on_start = code.map(|c| (c, oom));
    }

    /// Started containers exit with `code` after `after` (`None`: they run).
    pub fn exit_after(&self, after: Option<(Duration, i64)>) {
        self.state().exit_after = after;
    }

    /// Lines every container started from now on has written.
    pub fn set_start_logs(&self, lines: &[&str]) {
        self.state().start_logs = lines.iter().map(|l| l.to_string()).collect();
    }

    /// Started containers listen on a real local TCP port (their address), so TCP health
    /// checks pass.
    pub fn listen(&self, on: bool) {
        self.state().listen = on;
    }

    /// Closes a container's socket: it runs, but its TCP health checks fail from now on.
    pub fn stop_listening(&self, container_id: &str) {
        if let Some(c) = self.state().containers.get_mut(container_id) {
            c.socket = None;
        }
    }

    /// Makes a container exit with `code` now, emitting `die` (and `oom`).
    pub fn exit(&self, container_id: &str, code: i64, oom: bool) {
        if let Some(e) = exit_in(&self.state, container_id, code, oom) {
            let _ = self.events.send(e);
        }
    }

    /// Emits a container event to the current subscribers.
    pub fn emit(&self, event: NodeEvent) {
        let _ = self.events.send(event);
    }

    /// Puts a container in place as if an earlier escale had started it.
    pub fn adopt(&self, instance: ContainerInstance) {
        self.state().containers.insert(
            instance.container_id.clone(),
            Container {
                instance,
                logs: Vec::new(),
                socket: None,
            },
        );
    }

    /// All containers (any state).
    pub fn containers(&self) -> Vec<ContainerInstance> {
        self.state()
            .containers
            .values()
            .map(|c| c.instance.clone())
            .collect()
    }

    /// Running containers.
    pub fn running(&self) -> Vec<ContainerInstance> {
        self.containers()
            .into_iter()
            .filter(|c| c.state == InstanceState::Running)
            .collect()
    }

    /// How many times `call` was made.
    pub fn calls(&self, call: Call) -> u64 {
        self.state().calls.get(&call).copied().unwrap_or(0)
    }

    /// Counts the call and applies its knob.
    async fn enter(&self, call: Call) -> Result<()> {
        let fault = {
            let mut st = self.state();
            *st.calls.entry(call).or_default() += 1;
            st.faults.get(&call).cloned()
        };
        match fault {
            None => Ok(()),
            Some(Fault::Fail(reason)) => Err(EngineError::Failed {
                engine: self.name.clone(),
                action: format!("{call:?}"),
                reason,
            }),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Panic) => panic!("fake engine `{}`: {call:?} panics", self.name),
        }
    }

    fn has_image(st: &State, image: &str) -> bool {
        st.images.contains("*") || st.images.contains(image)
    }
}

fn event_of(c: &ContainerInstance, action: &str, exit_code: Option<i64>) -> NodeEvent {
    NodeEvent {
        container_id: c.container_id.clone(),
        action: action.into(),
        app: Some(c.app.clone()),
        instance: Some(c.instance.clone()),
        exit_code,
        time: crate::registry::now_ms() / 1000,
    }
}

#[async_trait::async_trait]
impl Engine for FakeEngine {
    fn name(&self) -> &str {
        &self.name
    }

    fn advertise_ip(&self) -> IpAddr {
        self.ip
    }

    async fn list_instances(&self, installation: &str) -> Result<Vec<ContainerInstance>> {
        self.enter(Call::List).await?;
        let _ = installation;
        Ok(self.containers())
    }

    async fn start_instance(&self, spec: &InstanceSpec) -> Result<StartedInstance> {
        self.enter(Call::Start).await?;
        let delay = {
            let mut st = self.state();
            st.starting += 1;
            st.most_starting = st.most_starting.max(st.starting);
            st.start_delay
        };
        tokio::time::sleep(delay).await;
        self.state().starting -= 1;
        // Ids are unique across fake engines, as Docker's are in practice.
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let container_id = format!("fa{n:062x}");
        let socket = if self.state().listen {
            let s = std::net::TcpListener::bind((self.ip, 0)).map_err(|e| EngineError::Failed {
                engine: self.name.clone(),
                action: "binding a socket".into(),
                reason: e.to_string(),
            })?;
            Some(s)
        } else {
            None
        };
        let addr = match &socket {
            Some(s) => s.local_addr().expect("bound socket"),
            None => SocketAddr::new(self.ip, 20_000 + (n % 40_000) as u16),
        };
        let spec_label = spec
            .extra_labels
            .iter()
            .find(|(k, _)| k == crate::node::LABEL_SPEC)
            .map(|(_, v)| v.clone());
        let (exit_now, exit_later, logs) = {
            let st = self.state();
            if !Self::has_image(&st, &spec.image) {
                return Err(EngineError::Failed {
                    engine: self.name.clone(),
                    action: "starting an instance".into(),
                    reason: format!("no image `{}`", spec.image),
                });
            }
            (st.exit_on_start, st.exit_after, st.start_logs.clone())
        };
        let mut instance = ContainerInstance {
            container_id: container_id.clone(),
            app: spec.app.clone(),
            process: spec.process.clone(),
            release: spec.release,
            slot: spec.slot,
            instance: spec.instance.clone(),
            name: crate::node::container_name(&spec.installation, &spec.instance),
            image: spec.image.clone(),
            state: InstanceState::Running,
            exit_code: None,
            oom_killed: false,
            addr: Some(addr),
            created: crate::registry::now_ms() / 1000,
            spec: spec_label,
        };
        if let Some((code, oom)) = exit_now {
            instance.state = InstanceState::Exited;
            instance.exit_code = Some(code);
            instance.oom_killed = oom;
            instance.addr = None;
        }
        let started = event_of(&instance, "start", None);
        self.state().containers.insert(
            container_id.clone(),
            Container {
                instance,
                logs,
                socket,
            },
        );
        let _ = self.events.send(started);
        if let Some((code, _)) = exit_now {
            return Err(EngineError::Failed {
                engine: self.name.clone(),
                action: format!("starting instance `{}`", spec.instance),
                reason: format!("it exited right after starting (exit code {code})"),
            });
        }
        if let Some((after, code)) = exit_later {
            let state = self.state.clone();
            let events = self.events.clone();
            let id = container_id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                if let Some(e) = exit_in(&state, &id, code, false) {
                    let _ = events.send(e);
                }
            });
        }
        Ok(StartedInstance { container_id, addr })
    }

    async fn stop_instance(&self, container_id: &str, _timeout: Duration) -> Result<()> {
        self.enter(Call::Stop).await?;
        let event = {
            let mut st = self.state();
            match st.containers.get_mut(container_id) {
                Some(c) if c.instance.state == InstanceState::Running => {
                    c.instance.state = InstanceState::Exited;
                    c.instance.exit_code = Some(143);
                    c.instance.addr = None;
                    c.socket = None;
                    Some(event_of(&c.instance, "die", Some(143)))
                }
                _ => None,
            }
        };
        if let Some(e) = event {
            let _ = self.events.send(e);
        }
        Ok(())
    }

    async fn remove_instance(&self, container_id: &str) -> Result<()> {
        self.enter(Call::Remove).await?;
        let removed = self.state().containers.remove(container_id);
        if let Some(c) = removed {
            let _ = self.events.send(event_of(&c.instance, "destroy", None));
        }
        Ok(())
    }

    async fn capacity(&self) -> Result<Option<crate::node::Capacity>> {
        self.enter(Call::Capacity).await?;
        Ok(self.state().capacity)
    }

    async fn image_exists(&self, image: &str) -> Result<bool> {
        self.enter(Call::ImageExists).await?;
        Ok(Self::has_image(&self.state(), image))
    }

    async fn ensure_image(&self, image: &str) -> Result<()> {
        self.enter(Call::EnsureImage).await?;
        self.state().images.insert(image.to_string());
        Ok(())
    }

    fn save_image(&self, image: &str) -> BoxStream<'static, Result<Bytes>> {
        let present = Self::has_image(&self.state(), image);
        let item = if present {
            Ok(Bytes::from(image.to_string()))
        } else {
            Err(EngineError::Failed {
                engine: self.name.clone(),
                action: format!("saving image `{image}`"),
                reason: "no such image".into(),
            })
        };
        stream::iter([item]).boxed()
    }

    async fn load_image(&self, mut tar: BoxStream<'static, Result<Bytes>>) -> Result<()> {
        self.enter(Call::LoadImage).await?;
        let mut name = Vec::new();
        while let Some(chunk) = tar.next().await {
            name.extend_from_slice(&chunk?);
        }
        self.state()
            .images
            .insert(String::from_utf8_lossy(&name).into_owned());
        Ok(())
    }

    fn logs(
        &self,
        container_id: &str,
        _follow: bool,
        tail: Option<usize>,
    ) -> BoxStream<'static, Result<LogLine>> {
        let fault = {
            let mut st = self.state();
            *st.calls.entry(Call::Logs).or_default() += 1;
            st.faults.get(&Call::Logs).cloned()
        };
        match fault {
            Some(Fault::Hang) => return stream::pending().boxed(),
            Some(Fault::Fail(reason)) => {
                return stream::iter([Err(EngineError::Failed {
                    engine: self.name.clone(),
                    action: "reading logs".into(),
                    reason,
                })])
                .boxed()
            }
            Some(Fault::Panic) => panic!("fake engine `{}`: Logs panics", self.name),
            None => {}
        }
        let lines = self
            .state()
            .containers
            .get(container_id)
            .map(|c| c.logs.clone())
            .unwrap_or_default();
        let skip = tail.map_or(0, |n| lines.len().saturating_sub(n));
        stream::iter(lines.into_iter().skip(skip).map(|text| {
            Ok(LogLine {
                stream: LogStream::Stdout,
                time: String::new(),
                text,
            })
        }))
        .boxed()
    }

    fn events(&self, _installation: &str) -> BoxStream<'static, Result<NodeEvent>> {
        let rx = self.events.subscribe();
        stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(e) => return Some((Ok(e), rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
        .boxed()
    }

    async fn list_app_networks(&self, _installation: &str) -> Result<Vec<AppNetwork>> {
        self.enter(Call::ListNetworks).await?;
        Ok(self.state().networks.values().cloned().collect())
    }

    async fn remove_network(&self, id: &str) -> Result<()> {
        self.enter(Call::RemoveNetwork).await?;
        self.state().networks.remove(id);
        Ok(())
    }
}

/// Marks a running container exited; the event to emit, if it was running.
fn exit_in(state: &Mutex<State>, id: &str, code: i64, oom: bool) -> Option<NodeEvent> {
    let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
    let c = st.containers.get_mut(id)?;
    if c.instance.state != InstanceState::Running {
        return None;
    }
    c.instance.state = InstanceState::Exited;
    c.instance.exit_code = Some(code);
    c.instance.oom_killed = oom;
    c.instance.addr = None;
    c.socket = None;
    Some(event_of(
        &c.instance,
        if oom { "oom" } else { "die" },
        Some(code),
    ))
}

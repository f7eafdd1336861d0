//! The reconciler against in-memory engines ([`crate::runtime::fake::FakeEngine`]) and a real
//! registry on a temporary directory: crash backoff, adoption after a restart, drains, rollout
//! failure, engine calls that hang, fail or panic, and the events that come out of it all.
//!
//! Passes are driven by hand ([`Scheduler::pass`]) except where `run` itself is under test;
//! tests wait for conditions (with a deadline), never for fixed times.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Scheduler;
use crate::config::Config;
use crate::events::{DrainCause, Event, HealthStatus, InstanceStatus, Subscription};
use crate::registry::{Actor, HealthKind, ProcessPatch, Registry};
use crate::runtime::fake::{Call, FakeEngine};
use crate::runtime::Engine;

const IMAGE: &str = "registry.example/shop:1";
const DEADLINE: Duration = Duration::from_secs(15);

struct Harness {
    _dir: tempfile::TempDir,
    registry: Registry,
    config: Arc<Config>,
    actor: Actor,
    engines: Vec<Arc<FakeEngine>>,
    sched: Arc<Scheduler>,
    bus: Subscription,
    events: Vec<Event>,
}

impl Harness {
    async fn new(nodes: &[&str]) -> Harness {
        Harness::with(nodes, |_| {}).await
    }

    async fn with(nodes: &[&str], tune: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let registry = Registry::open(
            &dir.path().join("escale.db"),
            crate::secrets::MasterKey::random(),
        )
        .await
        .expect("registry");
        let actor = registry.host_admin().await.expect("admin");
        let mut config = Config::for_data_dir(dir.path());
        config.scheduler.drain_grace = Duration::ZERO;
        config.scheduler.stop_timeout = Duration::from_millis(100);
        config.scheduler.reconcile_interval = Duration::from_millis(100);
        tune(&mut config);
        let config = Arc::new(config);
        let engines: Vec<Arc<FakeEngine>> = nodes.iter().map(|n| FakeEngine::new(n)).collect();
        let bus = registry.bus().subscribe();
        let sched = Harness::scheduler(&registry, &config, &engines);
        Harness {
            _dir: dir,
            registry,
            config,
            actor,
            engines,
            sched,
            bus,
            events: Vec::new(),
        }
    }

    fn scheduler(
        registry: &Registry,
        config: &Arc<Config>,
        engines: &[Arc<FakeEngine>],
    ) -> Arc<Scheduler> {
        let sched = Scheduler::with_engines(
            registry.clone(),
            config.clone(),
            engines
                .iter()
                .map(|e| e.clone() as Arc<dyn Engine>)
                .collect(),
            crate::routing::shared(),
        );
        sched.set_engine_timeout(Duration::from_millis(300));
        sched
    }

    /// An app whose `web` process runs `instances` of [`IMAGE`] (health: none, so an
    /// instance is healthy once listed), deployed.
    async fn app(&self, name: &str, instances: u32) {
        self.registry
            .create_app(&self.actor, name, None, 8080)
            .await
            .expect("app");
        let patch = ProcessPatch {
            health_kind: Some(HealthKind::None),
            ..Default::default()
        };
        self.registry
            .upsert_process(&self.actor, name, "web", &patch, 8080, true)
            .await
            .expect("process");
        self.scale(name, instances).await;
        self.deploy(name, IMAGE).await;
    }

    async fn scale(&self, name: &str, instances: u32) {
        self.registry
            .set_formation(
                &self.actor,
                name,
                &BTreeMap::from([("web".to_string(), instances)]),
            )
            .await
            .expect("formation");
    }

    async fn deploy(&self, name: &str, image: &str) -> u32 {
        self.registry
            .create_release(&self.actor, name, image, "image", "test")
            .await
            .expect("release")
    }

    /// Takes what the bus has so far.
    async fn collect(&mut self) {
        while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(1), self.bus.recv()).await
        {
            self.events.push(e.event.clone());
        }
    }

    /// Runs passes until `done` holds (panics after [`DEADLINE`]).
    async fn until(&mut self, what: &str, mut done: impl FnMut(&Harness) -> bool) {
        let start = Instant::now();
        loop {
            self.sched.pass().await.expect("pass");
            // The health checker, by hand too (verdicts are read by the next pass).
            self.sched.health.probe_due().await;
            self.collect().await;
            if done(self) {
                return;
            }
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn engine(&self, i: usize) -> &FakeEngine {
        &self.engines[i]
    }

    fn healthy(&self) -> usize {
        self.sched
            .view
            .load()
            .instances
            .iter()
            .filter(|i| i.state == InstanceStatus::Running && i.health == HealthStatus::Healthy)
            .count()
    }

    fn count(&self, pred: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| pred(e)).count()
    }
}

#[tokio::test]
async fn instances_start_and_are_announced() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.app("shop", 2).await;
    h.until("two healthy instances", |h| h.healthy() == 2).await;
    // Spread: one per node.
    assert_eq!(h.engine(0).running().len(), 1);
    assert_eq!(h.engine(1).running().len(), 1);
    h.until("the rollout to succeed", |h| {
        h.count(|e| matches!(e, Event::RolloutSucceeded { app, release: 1 } if app == "shop")) == 1
    })
    .await;
    assert_eq!(h.count(|e| matches!(e, Event::InstanceStarted { .. })), 2);
    assert_eq!(h.count(|e| matches!(e, Event::InstanceHealthy { .. })), 2);
    assert_eq!(h.count(|e| matches!(e, Event::NodeReady { .. })), 2);
    assert!(
        h.count(|e| matches!(
            e,
            Event::RolloutProgress {
                healthy: 2,
                total: 2,
                ..
            }
        )) >= 1,
        "{:?}",
        h.events
    );
    // Announced once, not at every pass.
    h.until("a few more passes", |h| h.sched.passes.load(Relaxed) > 10)
        .await;
    assert_eq!(h.count(|e| matches!(e, Event::InstanceHealthy { .. })), 2);
}

#[tokio::test]
async fn a_crashed_instance_is_replaced_then_backed_off() {
    let mut h = Harness::new(&["n1"]).await;
    h.app("shop", 1).await;
    h.until("one healthy instance", |h| h.healthy() == 1).await;
    h.engine(0)
        .set_start_logs(&["listening", "boom: out of cheese"]);

    // A first crash is replaced at once.
    let first = h.engine(0).running()[0].container_id.clone();
    h.engine(0).exit(&first, 3, false);
    h.until("a replacement", |h| {
        h.engine(0)
            .running()
            .iter()
            .any(|c| c.container_id != first)
    })
    .await;
    h.until("the crash announced", |h| {
        h.count(|e| {
            matches!(
                e,
                Event::InstanceCrashed {
                    exit_code: Some(3),
                    oom: false,
                    ..
                }
            )
        }) == 1
    })
    .await;
    assert!(
        h.engine(0)
            .containers()
            .iter()
            .all(|c| c.container_id != first),
        "removed"
    );

    // A second crash in a row waits 1 s.
    let second = h.engine(0).running()[0].container_id.clone();
    h.engine(0).exit(&second, 4, false);
    let crashed_at = Instant::now();
    let starts = h.engine(0).calls(Call::Start);
    h.until("a second replacement", |h| h.engine(0).running().len() == 1)
        .await;
    assert!(
        crashed_at.elapsed() >= Duration::from_millis(900),
        "restarted after {:?}",
        crashed_at.elapsed()
    );
    assert_eq!(h.engine(0).calls(Call::Start), starts + 1);
    h.until("the second crash announced with its logs", |h| {
        h.events.iter().any(|e| {
            matches!(e, Event::InstanceCrashed { exit_code: Some(4), last_logs, .. }
                if last_logs.iter().any(|l| l.contains("out of cheese")))
        })
    })
    .await;

    // A third waits 2 s; the crash loop is shown meanwhile.
    let third = h.engine(0).running()[0].container_id.clone();
    h.engine(0).exit(&third, 5, false);
    let crashed_at = Instant::now();
    h.until("the crash loop shown", |h| {
        h.sched
            .view
            .load()
            .crashing
            .iter()
            .any(|c| c.crashes == 3 && c.last_exit_code == Some(5))
    })
    .await;
    h.until("a third replacement", |h| h.engine(0).running().len() == 1)
        .await;
    assert!(
        crashed_at.elapsed() >= Duration::from_millis(1900),
        "restarted after {:?}",
        crashed_at.elapsed()
    );

    // The operator sees the crashes later in the audit log.
    let audit = h
        .registry
        .events(&h.actor, Some("shop"), None, 100)
        .await
        .expect("audit");
    assert_eq!(
        audit
            .iter()
            .filter(|e| e.action == "instance.crashed")
            .count(),
        3
    );
    assert!(audit
        .iter()
        .all(|e| e.action != "instance.crashed" || e.actor == "escale"));
}

#[tokio::test]
async fn a_new_scheduler_adopts_running_instances() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.app("shop", 3).await;
    h.until("three healthy instances", |h| h.healthy() == 3)
        .await;
    let before: Vec<String> = {
        let mut ids: Vec<String> = h
            .engines
            .iter()
            .flat_map(|e| e.running())
            .map(|c| c.container_id)
            .collect();
        ids.sort();
        ids
    };
    let starts: u64 = h.engines.iter().map(|e| e.calls(Call::Start)).sum();
    h.sched.shutdown().await;

    // escale restarts: a new scheduler over the same engines and registry.
    h.sched = Harness::scheduler(&h.registry, &h.config, &h.engines);
    h.until("three healthy adopted instances", |h| h.healthy() == 3)
        .await;
    h.until("a few more passes", |h| h.sched.passes.load(Relaxed) > 5)
        .await;
    let mut after: Vec<String> = h
        .engines
        .iter()
        .flat_map(|e| e.running())
        .map(|c| c.container_id)
        .collect();
    after.sort();
    assert_eq!(before, after);
    let starts_after: u64 = h.engines.iter().map(|e| e.calls(Call::Start)).sum();
    assert_eq!(starts, starts_after, "nothing started");
    let stops: u64 = h.engines.iter().map(|e| e.calls(Call::Stop)).sum();
    assert_eq!(stops, 0);
}

#[tokio::test]
async fn scaling_down_drains_then_stops() {
    let mut h = Harness::new(&["n1"]).await;
    h.app("shop", 3).await;
    h.until("three healthy instances", |h| h.healthy() == 3)
        .await;
    h.scale("shop", 1).await;
    h.until("one instance left", |h| {
        h.engine(0).containers().len() == 1
            && h.count(|e| matches!(e, Event::InstanceStopped { .. })) == 2
    })
    .await;
    assert_eq!(h.engine(0).calls(Call::Stop), 2);
    let drains: Vec<&Event> = h
        .events
        .iter()
        .filter(|e| matches!(e, Event::InstanceDraining { .. }))
        .collect();
    assert_eq!(drains.len(), 2, "{drains:?}");
    assert!(drains.iter().all(|e| matches!(
        e,
        Event::InstanceDraining {
            cause: DrainCause::ScaledDown,
            ..
        }
    )));
    // Each drained instance was announced draining before it was stopped.
    for e in &drains {
        let Event::InstanceDraining { instance, .. } = e else {
            unreachable!()
        };
        let at = |want: &dyn Fn(&Event) -> bool| h.events.iter().position(want);
        let drained =
            at(&|x| matches!(x, Event::InstanceDraining { instance: i, .. } if i == instance));
        let stopped = at(&|x| matches!(x, Event::InstanceStopped { instance: i } if i == instance));
        assert!(drained < stopped, "{:?}", h.events);
    }
}

#[tokio::test]
async fn a_release_that_cannot_start_fails_its_rollout() {
    let mut h = Harness::with(&["n1"], |c| {
        c.scheduler.deploy_timeout = Duration::from_millis(1500)
    })
    .await;
    h.app("shop", 1).await;
    h.until("v1 serving", |h| {
        h.count(|e| matches!(e, Event::RolloutSucceeded { release: 1, .. })) == 1
    })
    .await;
    h.engine(0).exit_on_start(Some(1), false);
    h.engine(0).set_start_logs(&["cannot find config"]);
    let v2 = h.deploy("shop", "registry.example/shop:2").await;
    h.until("the rollout of v2 failed", |h| {
        h.count(|e| matches!(e, Event::RolloutFailed { release, .. } if *release == v2)) == 1
    })
    .await;
    // The failed starts were announced as crashes; v1 still serves.
    assert!(
        h.count(|e| matches!(e, Event::InstanceCrashed { instance, .. } if instance.release == v2))
            >= 1
    );
    assert_eq!(h.engine(0).running().len(), 1);
    assert_eq!(h.engine(0).running()[0].release, 1);
    let release = h
        .registry
        .release(&h.actor, "shop", v2)
        .await
        .expect("release");
    assert_eq!(release.status, crate::registry::ReleaseStatus::Failed);
}

#[tokio::test]
async fn a_hanging_engine_does_not_hold_up_a_pass() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.engine(1).hang(Call::List);
    h.app("shop", 2).await;
    // Every pass completes (the list call is bounded); n2 is down, both instances go to n1.
    h.until("two healthy instances on n1", |h| {
        h.engine(0).running().len() == 2 && h.healthy() == 2
    })
    .await;
    let view = h.sched.view.load();
    let n2 = view.nodes.iter().find(|n| n.name == "n2").expect("n2");
    assert!(!n2.ready);
    assert!(
        n2.error.as_deref().unwrap_or("").contains("did not finish"),
        "{n2:?}"
    );
    assert_eq!(
        h.count(|e| matches!(e, Event::NodeDown { node, .. } if node == "n2")),
        1
    );
    assert!(h.sched.engine_timeouts.load(Relaxed) >= 1);

    // A start that hangs is a task: passes go on (and the start is not made twice).
    h.engine(0).hang(Call::Start);
    h.scale("shop", 3).await;
    let passes = h.sched.passes.load(Relaxed);
    h.until("more passes", |h| h.sched.passes.load(Relaxed) > passes + 5)
        .await;
    assert_eq!(h.engine(0).running().len(), 2);
    // The start timed out (bounded) and is retried once the engine answers again.
    h.engine(0).heal(Call::Start);
    h.until("three instances", |h| h.engine(0).running().len() == 3)
        .await;

    // The node comes back.
    h.engine(1).heal(Call::List);
    h.until("n2 ready again", |h| {
        h.count(|e| matches!(e, Event::NodeReady { node } if node == "n2")) == 1
    })
    .await;
    let audit = h
        .registry
        .events(&h.actor, None, None, 100)
        .await
        .expect("audit");
    assert!(audit.iter().any(|e| e.action == "node.down"));
    assert!(audit.iter().any(|e| e.action == "node.ready"));
}

#[tokio::test]
async fn a_failing_engine_is_reported_down_and_the_pass_goes_on() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.engine(0).fail(Call::List, "connection refused");
    h.app("shop", 2).await;
    h.until("two instances on n2", |h| h.engine(1).running().len() == 2)
        .await;
    let view = h.sched.view.load();
    let n1 = view.nodes.iter().find(|n| n.name == "n1").expect("n1");
    assert!(!n1.ready);
    assert!(n1
        .error
        .as_deref()
        .unwrap_or("")
        .contains("connection refused"));
    assert_eq!(h.engine(0).calls(Call::Start), 0);
}

#[tokio::test]
async fn a_panicking_start_is_counted_and_the_reconciler_goes_on() {
    let mut h = Harness::new(&["n1"]).await;
    h.engine(0).panic_on(Call::Start);
    h.app("shop", 1).await;
    h.until("a panic", |h| h.sched.panics.load(Relaxed) >= 1)
        .await;
    // The start is no longer pending: it is tried again, and works once the engine does.
    h.until("a second try", |h| h.engine(0).calls(Call::Start) >= 2)
        .await;
    h.engine(0).heal(Call::Start);
    h.until("one running instance", |h| h.engine(0).running().len() == 1)
        .await;
}

#[tokio::test]
async fn run_survives_panics_and_ends_its_tasks_at_shutdown() {
    let h = Harness::new(&["n1"]).await;
    h.engine(0).panic_on(Call::Start);
    h.app("shop", 1).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(h.sched.clone().run(async {
        let _ = stopped.await;
    }));
    let start = Instant::now();
    while h.sched.panics.load(Relaxed) < 2 {
        assert!(start.elapsed() < DEADLINE, "no panic caught");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    h.engine(0).heal(Call::Start);
    while h.engine(0).running().len() != 1 {
        assert!(start.elapsed() < DEADLINE, "no instance after the panics");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        h.sched.tasks_running() > 0,
        "the watchers and the health checker run"
    );
    // A start that hangs is cancelled at shutdown: run returns anyway.
    h.engine(0).hang(Call::Start);
    h.scale("shop", 2).await;
    let _ = stop.send(());
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("run returns")
        .expect("run did not panic");
    assert_eq!(h.sched.tasks_running(), 0);
    // Containers survive escale.
    assert_eq!(h.engine(0).running().len(), 1);
}

#[tokio::test]
async fn an_instance_failing_its_health_check_is_announced_and_replaced() {
    // Replaced once it has been unhealthy (and not accepting connections) for 300 ms.
    let mut h = Harness::with(&["n1"], |c| {
        c.scheduler.unhealthy_replace_after = Duration::from_millis(300)
    })
    .await;
    h.engine(0).listen(true);
    h.app("shop", 1).await;
    let patch = ProcessPatch {
        health_kind: Some(HealthKind::Tcp),
        health_interval_ms: Some(50),
        health_timeout_ms: Some(200),
        health_grace_ms: Some(0),
        ..Default::default()
    };
    h.registry
        .upsert_process(&h.actor, "shop", "web", &patch, 8080, true)
        .await
        .expect("process");
    h.until("a healthy instance on a TCP check", |h| {
        h.healthy() == 1 && h.engine(0).running().len() == 1
    })
    .await;
    let sick = h.engine(0).running()[0].clone();
    h.until("its health announced", |h| {
        h.count(|e| matches!(e, Event::InstanceHealthy { instance } if instance.instance == sick.instance)) == 1
    })
    .await;

    h.engine(0).stop_listening(&sick.container_id);
    h.until("a healthy replacement", |h| {
        h.healthy() == 1
            && h.engine(0)
                .running()
                .iter()
                .all(|c| c.container_id != sick.container_id)
    })
    .await;
    assert_eq!(
        h.count(|e| matches!(e, Event::InstanceUnhealthy { instance, .. } if instance.instance == sick.instance)),
        1,
        "{:?}",
        h.events
    );
    assert!(h.events.iter().any(|e| matches!(e,
        Event::InstanceDraining { instance, cause: DrainCause::Unhealthy, .. } if instance.instance == sick.instance)));
    let audit = h
        .registry
        .events(&h.actor, Some("shop"), None, 100)
        .await
        .expect("audit");
    assert!(
        audit
            .iter()
            .any(|e| e.action == "instance.replaced" && e.actor == "escale"),
        "{audit:?}"
    );
}

/// The view of `slot`'s live instance (not draining or exited).
fn slot_view(h: &Harness, slot: u32) -> Option<super::InstanceView> {
    h.sched
        .view
        .load()
        .instances
        .iter()
        .find(|i| i.slot == slot && i.state == InstanceStatus::Running)
        .cloned()
}

#[tokio::test]
async fn restarts_are_a_running_total_per_slot_and_the_crash_note_ends_once_healthy() {
    let mut h = Harness::with(&["n1"], |c| {
        c.scheduler.unhealthy_replace_after = Duration::from_millis(300)
    })
    .await;
    h.engine(0).listen(true);
    h.app("shop", 2).await;
    h.until("two healthy instances", |h| h.healthy() == 2).await;
    let in_slot = |h: &Harness, slot: u32| {
        h.engine(0)
            .running()
            .into_iter()
            .find(|c| c.slot == slot)
            .map(|c| c.container_id)
    };

    // Two crashes of slot 2 in a row: a crash loop, shown while it lasts.
    for n in 1..=2u32 {
        let id = in_slot(&h, 2).expect("slot 2 runs");
        h.engine(0).exit(&id, 3, false);
        h.until("slot 2 replaced and healthy", |h| {
            in_slot(h, 2).is_some_and(|c| c != id)
                && slot_view(h, 2).is_some_and(|v| v.health == HealthStatus::Healthy)
        })
        .await;
        let v = slot_view(&h, 2).expect("slot 2");
        assert_eq!(v.restarts, n, "a running total: {v:?}");
        assert!(
            v.container.starts_with("escale-") && v.container.ends_with(&v.instance),
            "{v:?}"
        );
    }
    // Healthy again at once: no crashing note, although the backoff is still remembered.
    let view = h.sched.view.load_full();
    assert!(view.crashing.is_empty(), "{:?}", view.crashing);
    assert_eq!(slot_view(&h, 1).expect("slot 1").restarts, 0);

    // An unhealthy replacement counts too, and the total stays once healthy.
    let patch = ProcessPatch {
        health_kind: Some(HealthKind::Tcp),
        health_interval_ms: Some(50),
        health_timeout_ms: Some(200),
        health_grace_ms: Some(0),
        ..Default::default()
    };
    h.registry
        .upsert_process(&h.actor, "shop", "web", &patch, 8080, true)
        .await
        .expect("process");
    h.until("two healthy on a TCP check", |h| h.healthy() == 2)
        .await;
    let sick = in_slot(&h, 2).expect("slot 2 runs");
    h.engine(0).stop_listening(&sick);
    h.until("slot 2 replaced after failing its checks", |h| {
        in_slot(h, 2).is_some_and(|c| c != sick)
            && slot_view(h, 2).is_some_and(|v| v.health == HealthStatus::Healthy && v.restarts == 3)
    })
    .await;
    h.until("a few more passes", |h| {
        slot_view(h, 2).is_some_and(|v| v.restarts == 3) && h.sched.view.load().crashing.is_empty()
    })
    .await;

    // The slot goes away with its total; a new slot 2 starts from nothing.
    h.scale("shop", 1).await;
    h.until("one instance", |h| h.engine(0).running().len() == 1)
        .await;
    h.until("slot 2 forgotten", |h| {
        !h.sched.st().restarts.keys().any(|(_, _, slot)| *slot == 2)
    })
    .await;
    h.scale("shop", 2).await;
    h.until("slot 2 back, healthy", |h| {
        slot_view(h, 2).is_some_and(|v| v.health == HealthStatus::Healthy)
    })
    .await;
    assert_eq!(slot_view(&h, 2).expect("slot 2").restarts, 0);
    assert_eq!(slot_view(&h, 1).expect("slot 1").restarts, 0);
}

#[tokio::test]
async fn a_crash_loop_of_a_new_release_shows_while_the_old_one_still_serves_the_slot() {
    let mut h = Harness::with(&["n1"], |c| {
        c.scheduler.deploy_timeout = Duration::from_secs(60)
    })
    .await;
    h.app("shop", 1).await;
    h.until("v1 serving", |h| {
        h.count(|e| matches!(e, Event::RolloutSucceeded { release: 1, .. })) == 1
    })
    .await;
    h.engine(0).exit_on_start(Some(1), false);
    h.deploy("shop", "registry.example/shop:2").await;
    // Between its second and third failed start (1 s of backoff), v1 is healthy in the slot:
    // the note is about v2, and shows.
    h.until("v2's crash loop shown", |h| {
        h.sched.view.load().crashing.iter().any(|c| c.crashes >= 2)
    })
    .await;
    assert_eq!(h.engine(0).running().len(), 1);
    assert_eq!(h.engine(0).running()[0].release, 1, "v1 still serves");
    let view = h.sched.view.load_full();
    assert!(
        view.instances
            .iter()
            .any(|v| v.slot == 1 && v.release == 1 && v.restarts >= 2),
        "{:?}",
        view.instances
    );
}

#[test]
fn instance_states_serialise_as_before() {
    use crate::scheduler::InstanceView;
    let view = InstanceView {
        instance: "shop-web-1".into(),
        app: "shop".into(),
        process: "web".into(),
        release: 1,
        slot: 1,
        node: "n1".into(),
        container_id: String::new(),
        container: "escale-prod-shop-web-1".into(),
        state: InstanceStatus::Exited,
        health: HealthStatus::None,
        address: None,
        created_at: 0,
        restarts: 0,
    };
    let json = serde_json::to_value(&view).expect("json");
    assert_eq!(json["state"], "exited");
    assert_eq!(json["health"], "-");
    for (s, want) in [
        (InstanceStatus::Starting, "starting"),
        (InstanceStatus::Running, "running"),
        (InstanceStatus::Draining, "draining"),
    ] {
        assert_eq!(serde_json::to_value(s).expect("json"), want);
    }
    for (s, want) in [
        (HealthStatus::Starting, "starting"),
        (HealthStatus::Healthy, "healthy"),
        (HealthStatus::Unhealthy, "unhealthy"),
    ] {
        assert_eq!(serde_json::to_value(s).expect("json"), want);
    }
    // The API document describes them.
    let doc = crate::api::openapi();
    let schemas = &doc["components"]["schemas"];
    assert!(schemas.get("InstanceStatus").is_some(), "{schemas}");
    assert!(schemas.get("HealthStatus").is_some());
}

#[tokio::test]
async fn a_container_that_exits_later_is_replaced_on_its_event() {
    let mut h = Harness::new(&["n1"]).await;
    h.engine(0)
        .exit_after(Some((Duration::from_millis(200), 7)));
    h.app("shop", 1).await;
    h.until("one running instance", |h| h.engine(0).running().len() == 1)
        .await;
    h.engine(0).exit_after(None);
    let first = h.engine(0).running()[0].container_id.clone();
    h.until("its crash and a replacement", |h| {
        h.count(|e| {
            matches!(
                e,
                Event::InstanceCrashed {
                    exit_code: Some(7),
                    ..
                }
            )
        }) == 1
            && h.engine(0)
                .running()
                .iter()
                .any(|c| c.container_id != first)
    })
    .await;
}

#[tokio::test]
async fn a_large_deploy_queues_its_starts_instead_of_flooding_the_engine() {
    let mut h = Harness::new(&["n1"]).await;
    // Each start takes 100 ms; the engine timeout is 300 ms: 40 at once would still pass,
    // but Docker slows down with every start in flight, so escale never asks for more than
    // its per-engine parallelism.
    h.engine(0).slow_starts(Duration::from_millis(100));
    h.app("big", 40).await;
    h.until("40 running instances", |h| {
        h.engine(0).running().len() == 40
    })
    .await;
    let most = h.engine(0).most_concurrent_starts();
    assert!(
        (2..=super::ENGINE_PARALLELISM).contains(&most),
        "starts in flight at once: {most}"
    );
    assert_eq!(
        h.sched
            .engine_timeouts
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[tokio::test]
async fn a_node_that_misses_a_call_is_suspect_and_nothing_is_rescheduled() {
    let mut h = Harness::with(&["n1", "n2"], |c| {
        c.scheduler.node_down_after = Duration::from_secs(3600)
    })
    .await;
    h.app("shop", 2).await;
    h.until("one instance on each node", |h| {
        h.engine(0).running().len() == 1 && h.engine(1).running().len() == 1 && h.healthy() == 2
    })
    .await;
    let starts = h.engine(0).calls(Call::Start) + h.engine(1).calls(Call::Start);
    // n2 stops answering: a blip, not a loss.
    h.engine(1).fail(Call::List, "connection reset");
    for _ in 0..5 {
        h.sched.pass().await.expect("pass");
    }
    h.collect().await;
    let view = h.sched.view.load();
    let n2 = view.nodes.iter().find(|n| n.name == "n2").expect("n2");
    assert_eq!(n2.state, super::NodeStatus::Suspect);
    assert_eq!(
        h.engine(0).calls(Call::Start) + h.engine(1).calls(Call::Start),
        starts,
        "nothing was rescheduled"
    );
    assert_eq!(h.engine(0).running().len(), 1);
    assert!(
        !h.events.iter().any(|e| matches!(e, Event::NodeDown { .. })),
        "{:?}",
        h.events
    );
    // It answers again: ready, with nothing to say in the audit log.
    h.engine(1).heal(Call::List);
    h.until("n2 ready again", |h| {
        h.sched
            .view
            .load()
            .nodes
            .iter()
            .any(|n| n.name == "n2" && n.state == super::NodeStatus::Ready)
    })
    .await;
    let audit = h
        .registry
        .events(&h.actor, None, None, 100)
        .await
        .expect("audit");
    assert!(
        !audit.iter().any(|e| e.action.starts_with("node.")),
        "{audit:?}"
    );
}

#[tokio::test]
async fn a_node_silent_past_the_grace_is_down_and_its_instances_are_replaced() {
    let mut h = Harness::with(&["n1", "n2"], |c| {
        c.scheduler.node_down_after = Duration::from_millis(300)
    })
    .await;
    h.app("shop", 2).await;
    h.until("one instance on each node", |h| {
        h.engine(0).running().len() == 1 && h.engine(1).running().len() == 1 && h.healthy() == 2
    })
    .await;
    let lost_at = Instant::now();
    h.engine(1).fail(Call::List, "no route to host");
    h.until("both instances on n1", |h| h.engine(0).running().len() == 2)
        .await;
    assert!(
        lost_at.elapsed() >= Duration::from_millis(300),
        "replaced only once the node was down"
    );
    assert!(h
        .events
        .iter()
        .any(|e| matches!(e, Event::NodeDown { node, .. } if node == "n2")));
    let view = h.sched.view.load();
    assert_eq!(
        view.nodes
            .iter()
            .find(|n| n.name == "n2")
            .expect("n2")
            .state,
        super::NodeStatus::Down
    );
}

// ---------- placement: drain, cordon, constraints, resources, images ----------

fn meta(labels: &[(&str, &str)], cordoned: bool, draining: bool) -> super::placement::NodeMeta {
    super::placement::NodeMeta {
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        cordoned,
        draining,
    }
}

#[tokio::test]
async fn a_draining_node_is_emptied_replacements_healthy_first() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.app("shop", 2).await;
    h.until("two healthy instances", |h| h.healthy() == 2).await;
    assert_eq!(h.engine(0).running().len(), 1);
    h.sched.set_node_meta("n1", meta(&[], false, true));
    let mut lowest = usize::MAX;
    h.until("n1 emptied, two healthy on n2", |h| {
        lowest = lowest.min(h.healthy());
        h.engine(0).running().is_empty() && h.engine(1).running().len() == 2 && h.healthy() == 2
    })
    .await;
    assert_eq!(lowest, 2, "the healthy count never dropped");
    // Drained through the rolling machinery, with its cause.
    assert!(
        h.count(|e| matches!(
            e,
            Event::InstanceDraining {
                cause: DrainCause::Rollout,
                ..
            }
        )) >= 1,
        "{:?}",
        h.events
    );
    // Undrained: nothing moves back on its own (spread is for new instances).
    h.sched.set_node_meta("n1", meta(&[], false, false));
    h.sched.pass().await.expect("pass");
    assert_eq!(h.engine(1).running().len(), 2);
}

#[tokio::test]
async fn a_cordoned_node_keeps_its_instances_and_takes_nothing_new() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.app("shop", 2).await;
    h.until("two healthy instances", |h| h.healthy() == 2).await;
    h.sched.set_node_meta("n1", meta(&[], true, false));
    h.scale("shop", 4).await;
    h.until("four healthy instances", |h| h.healthy() == 4)
        .await;
    assert_eq!(h.engine(0).running().len(), 1, "kept, nothing new");
    assert_eq!(h.engine(1).running().len(), 3);
}

#[tokio::test]
async fn constraints_place_on_labelled_nodes_only() {
    let mut h = Harness::new(&["n1", "n2", "n3"]).await;
    h.sched
        .set_node_meta("n2", meta(&[("disk", "ssd")], false, false));
    h.sched
        .set_node_meta("n3", meta(&[("disk", "hdd")], false, false));
    h.registry
        .create_app(&h.actor, "shop", None, 8080)
        .await
        .expect("app");
    let patch = ProcessPatch {
        health_kind: Some(HealthKind::None),
        constraints: Some(BTreeMap::from([("disk".to_string(), "ssd".to_string())])),
        ..Default::default()
    };
    h.registry
        .upsert_process(&h.actor, "shop", "web", &patch, 8080, true)
        .await
        .expect("process");
    h.scale("shop", 2).await;
    h.deploy("shop", IMAGE).await;
    h.until("two healthy instances", |h| h.healthy() == 2).await;
    assert_eq!(h.engine(1).running().len(), 2);
    assert!(h.engine(0).running().is_empty() && h.engine(2).running().is_empty());
}

#[tokio::test]
async fn what_does_not_fit_is_not_started_and_says_why_per_node() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.engine(0).set_capacity(1, 512 << 20);
    h.engine(1).set_capacity(1, 512 << 20);
    h.sched.set_node_meta("n2", meta(&[], true, false));
    h.registry
        .create_app(&h.actor, "shop", None, 8080)
        .await
        .expect("app");
    let patch = ProcessPatch {
        health_kind: Some(HealthKind::None),
        memory_bytes: Some(Some(200 << 20)),
        ..Default::default()
    };
    h.registry
        .upsert_process(&h.actor, "shop", "web", &patch, 8080, true)
        .await
        .expect("process");
    h.scale("shop", 3).await;
    h.deploy("shop", IMAGE).await;
    h.until("two healthy instances and one unplaced", |h| {
        h.healthy() == 2 && !h.sched.view.load().unplaced.is_empty()
    })
    .await;
    let view = h.sched.view.load();
    assert_eq!(view.unplaced.len(), 1);
    let u = &view.unplaced[0];
    assert_eq!(
        (u.app.as_str(), u.process.as_str(), u.slot),
        ("shop", "web", 3)
    );
    assert_eq!(
        u.reasons,
        ["n1: 112 MiB free, needs 200 MiB", "n2: cordoned"]
    );
    // Announced once (audit log and bus), with the same reasons.
    h.until("the unplaced instance announced", |h| {
        h.count(|e| matches!(e, Event::InstancesUnplaced { .. })) > 0
    })
    .await;
    assert_eq!(
        h.count(
            |e| matches!(e, Event::InstancesUnplaced { app, process, missing: 1, reasons }
            if app == "shop" && process == "web" && reasons.len() == 2)
        ),
        1
    );
    // Capacity is asked once per node, not at every pass.
    let passes = h.sched.passes.load(Relaxed);
    assert!(passes > 1);
    assert_eq!(h.engine(0).calls(Call::Capacity), 1);
    // Uncordoned: the last one goes to n2.
    h.sched.set_node_meta("n2", meta(&[], false, false));
    h.until("three healthy instances", |h| h.healthy() == 3)
        .await;
    assert_eq!(h.engine(1).running().len(), 1);
    assert!(h.sched.view.load().unplaced.is_empty());
    h.until("placed again, announced", |h| {
        h.count(|e| matches!(e, Event::InstancesPlaced { app, process } if app == "shop" && process == "web")) == 1
    })
    .await;
    assert_eq!(
        h.count(|e| matches!(e, Event::InstancesUnplaced { .. })),
        1,
        "announced once, not every pass"
    );
}

#[tokio::test]
async fn nodes_holding_the_image_are_preferred_after_spread() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    // blog (IMAGE) on n1 by name; wiki (wiki:1) on n2, the less loaded.
    h.app("blog", 1).await;
    h.until("blog healthy", |h| h.healthy() == 1).await;
    assert_eq!(h.engine(0).running().len(), 1);
    h.app("wiki", 1).await;
    h.deploy("wiki", "registry.example/wiki:1").await;
    h.until("wiki:1 healthy on n2", |h| {
        h.healthy() == 2
            && h.engine(1)
                .running()
                .iter()
                .any(|c| c.image == "registry.example/wiki:1")
            && h.engine(1).running().len() == 1
    })
    .await;
    // docs runs wiki:1 too: equal load, so by name it would be n1; n2 holds the image.
    h.app("docs", 0).await;
    h.deploy("docs", "registry.example/wiki:1").await;
    h.scale("docs", 1).await;
    h.until("docs healthy", |h| h.healthy() == 3).await;
    assert!(
        h.engine(1).running().iter().any(|c| c.app == "docs"),
        "{:?}",
        h.engine(0).running()
    );
}

#[tokio::test]
async fn the_service_refuses_a_formation_that_cannot_be_placed_and_changes_nothing() {
    let mut h = Harness::new(&["n1", "n2"]).await;
    h.engine(0).set_capacity(2, 1 << 30);
    h.engine(1).set_capacity(2, 1 << 30);
    h.sched
        .set_node_meta("n2", meta(&[("disk", "ssd")], false, false));
    let services =
        crate::service::Services::new(h.registry.clone(), h.config.clone(), Some(h.sched.clone()));
    // blog takes 600 MiB of n1 (at its declared memory).
    h.app("blog", 0).await;
    let mem = |m: u64| ProcessPatch {
        memory_bytes: Some(Some(m << 20)),
        ..Default::default()
    };
    services
        .update_process(&h.actor, "blog", "web", &mem(600))
        .await
        .expect("fits");
    h.scale("blog", 1).await;
    h.until("blog healthy", |h| h.healthy() == 1).await;
    assert_eq!(h.engine(0).running().len(), 1, "blog on n1");

    h.app("shop", 0).await;
    let ssd = ProcessPatch {
        constraints: Some(BTreeMap::from([("disk".to_string(), "ssd".to_string())])),
        ..mem(512)
    };
    services
        .update_process(&h.actor, "shop", "web", &ssd)
        .await
        .expect("fits");
    let counts = |n: u32| BTreeMap::from([("web".to_string(), n)]);
    services
        .scale(&h.actor, "shop", &counts(2))
        .await
        .expect("two fit on n2");
    let err = services
        .scale(&h.actor, "shop", &counts(3))
        .await
        .expect_err("a third does not");
    assert_eq!(
        err.to_string(),
        "no node can run `web` of `shop` (3 instances, 512 MiB each, on disk=ssd): n1: lacks disk=ssd; n2: 0 MiB free, needs 512 MiB; nothing was changed"
    );
    let a = h.registry.app(&h.actor, "shop").await.expect("app");
    let web = h.registry.processes_of(a.id).await.expect("processes");
    assert_eq!(web[0].instances, 2, "nothing changed");
    // Without the constraint, n1 has 424 MiB free: still no.
    let any = ProcessPatch {
        constraints: Some(BTreeMap::new()),
        ..Default::default()
    };
    let err = services
        .update_process(&h.actor, "shop", "web", &any)
        .await
        .map(|_| ());
    assert_eq!(err.map_err(|e| e.to_string()), Ok(()), "2 still fit");
    let err = services
        .scale(&h.actor, "shop", &counts(4))
        .await
        .expect_err("four do not");
    assert!(
        err.to_string()
            .contains("n1: 424 MiB free, needs 512 MiB; n2: 0 MiB free, needs 512 MiB"),
        "{err}"
    );
    // Scaling down is never refused; more CPUs than a node has are, even at 0 instances.
    services
        .scale(&h.actor, "shop", &counts(0))
        .await
        .expect("down");
    let cpus = ProcessPatch {
        nano_cpus: Some(Some(3_000_000_000)),
        ..Default::default()
    };
    let err = services
        .update_process(&h.actor, "shop", "web", &cpus)
        .await
        .expect_err("3 CPUs");
    assert!(
        err.to_string()
            .contains("n1: has 2 CPU(s), needs 3; n2: has 2 CPU(s), needs 3"),
        "{err}"
    );
    // Overcommit: free memory does not limit.
    let over = ProcessPatch {
        overcommit: Some(true),
        ..Default::default()
    };
    services
        .update_process(&h.actor, "shop", "web", &over)
        .await
        .expect("overcommit");
    services
        .scale(&h.actor, "shop", &counts(4))
        .await
        .expect("overcommitted");
}

#[test]
fn the_api_document_describes_placement() {
    let doc = crate::api::openapi();
    let schemas = &doc["components"]["schemas"];
    assert!(schemas.get("UnplacedView").is_some(), "{schemas}");
    let process = &schemas["ProcessType"]["properties"];
    assert!(process.get("constraints").is_some(), "{process}");
    assert!(process.get("overcommit").is_some(), "{process}");
    let update = &schemas["ProcessUpdate"]["properties"];
    assert!(update.get("constraints").is_some(), "{update}");
}
/// Engine calls per pass do not grow with the instance count: with 3 nodes and 300 running
/// instances, a steady pass makes one list call per node and nothing else (the benchmark
/// figure of issue #16, as an invariant).
#[tokio::test]
async fn a_steady_pass_makes_one_call_per_node_at_300_instances() {
    let mut h = Harness::new(&["n1", "n2", "n3"]).await;
    h.sched.set_engine_timeout(Duration::from_secs(5));
    h.app("big", 300).await;
    h.until("300 healthy instances", |h| h.healthy() == 300)
        .await;
    let per_node: Vec<usize> = h.engines.iter().map(|e| e.running().len()).collect();
    assert_eq!(per_node, vec![100, 100, 100], "spread");
    // Let in-flight bookkeeping settle, then count.
    h.sched.pass().await.expect("pass");
    let before = h.sched.engine_calls.load(Relaxed);
    let lists: Vec<u64> = h.engines.iter().map(|e| e.calls(Call::List)).collect();
    for _ in 0..10 {
        h.sched.pass().await.expect("pass");
    }
    let calls = h.sched.engine_calls.load(Relaxed) - before;
    assert_eq!(calls, 30, "10 steady passes over 3 nodes");
    for (e, before) in h.engines.iter().zip(lists) {
        assert_eq!(
            e.calls(Call::List) - before,
            10,
            "one list per pass on {}",
            e.name()
        );
        assert_eq!(e.running().len(), 100);
    }
}

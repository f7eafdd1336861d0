//! Extra cluster nodes for tests: real `dockerd` processes on 127.0.0.N:2376 with
//! `--tlsverify` and the bundle escale issued (`escale nodes add`), as ../shared/DESIGN.md
//! describes.
//!
//! Each [`ExtraNode`] has its own bridge (`br-esc-nN`, 172.31.22N.1/24), data root, exec
//! root, pid file and containerd namespaces under `/tmp/escale-it-nodeN`, its own address
//! pool for the networks escale creates there (10.21N.0.0/16, so no two daemons pick the
//! same subnet), the host's storage driver, and no iptables changes. Ports escale publishes
//! there are bound on 127.0.0.N by the node's own docker-proxy.
//!
//! A node is stopped (its whole process group), its bridge deleted and its directory removed
//! on drop, also when the test fails; [`sweep`] removes what a crashed run left. Tests that
//! use 127.0.0.2-4:2376 hold [`ADDRESSES`] so they do not run at the same time.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Held by every test that listens on 127.0.0.2-4:2376.
pub static ADDRESSES: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Runs `argv`; its stdout when it succeeded.
pub fn run(argv: &[&str]) -> Option<String> {
    let out = Command::new(argv[0]).args(&argv[1..]).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Unmounts whatever a daemon left mounted below `root` (deepest first).
pub fn unmount_below(root: &Path) {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return;
    };
    let root = root.to_string_lossy();
    let mut points: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter(|p| p.starts_with(root.as_ref()))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in points {
        let _ = run(&["umount", "-l", p]);
    }
}

/// Whether process `pid` exists.
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// SIGTERM to the process group led by `pid`, up to 15 s, then SIGKILL.
pub fn stop_group(pid: i32) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while pid_alive(pid) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
}

fn root_of(n: u8) -> PathBuf {
    PathBuf::from(format!("/tmp/escale-it-node{n}"))
}

fn bridge_of(n: u8) -> String {
    format!("br-esc-n{n}")
}

/// Removes what a run left of node `n`: its daemon (by the pid file, if it is a dockerd),
/// its containers' processes (the daemon's group), the bridge, the directory.
pub fn sweep(n: u8) {
    let root = root_of(n);
    for pidfile in ["pid", "group"] {
        if let Ok(pid) = std::fs::read_to_string(root.join(pidfile)) {
            if let Ok(pid) = pid.trim().parse::<i32>() {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "dockerd" {
                    eprintln!("sweeping a leftover extra dockerd (node {n}, pid {pid})");
                    stop_group(pid);
                }
            }
        }
    }
    // Container processes the daemon's containerd shims left (they leave its group).
    kill_shims(&root);
    let bridge = bridge_of(n);
    if run(&["ip", "link", "show", &bridge]).is_some() {
        let _ = run(&["ip", "link", "del", &bridge]);
    }
    // Networks escale made on the node are bridges of their own (br-<id>) with our pool.
    if let Some(links) = run(&["ip", "-o", "addr", "show"]) {
        let pool = format!("inet 10.21{n}.");
        for l in links.lines().filter(|l| l.contains(&pool)) {
            if let Some(dev) = l.split_whitespace().nth(1) {
                let _ = run(&["ip", "link", "del", dev]);
            }
        }
    }
    unmount_below(&root);
    let _ = std::fs::remove_dir_all(&root);
}

/// Kills containerd shims (and so their containers) whose command line names `root`.
fn kill_shims(root: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    let root = root.to_string_lossy().into_owned();
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains("containerd-shim") && cmdline.contains(&root) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The `daemon.json` of the bundle escale wrote into `bundle_dir`, made to run beside the
/// host's engine: its certificates copied into `root`, the engine on `tcp_hosts` and on
/// `root/docker.sock`, the host's storage driver.
pub fn daemon_config(bundle_dir: &Path, root: &Path, tcp_hosts: &[String]) -> serde_json::Value {
    let host_config: serde_json::Value = std::fs::read_to_string("/etc/docker/daemon.json")
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let bundle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle_dir.join("daemon.json")).unwrap())
            .unwrap();
    let mut config = bundle.clone();
    for (key, file) in [
        ("tlscacert", "ca.pem"),
        ("tlscert", "server-cert.pem"),
        ("tlskey", "server-key.pem"),
    ] {
        assert_eq!(bundle[key], format!("/etc/docker/escale/{file}"));
        let to = root.join(file);
        std::fs::copy(bundle_dir.join(file), &to).unwrap();
        config[key] = to.to_string_lossy().into();
    }
    let mut hosts: Vec<String> = tcp_hosts.to_vec();
    hosts.push(format!("unix://{}", root.join("docker.sock").display()));
    config["hosts"] = serde_json::json!(hosts);
    // The storage driver the host's engine runs with (fuse-overlayfs here).
    let driver = host_config
        .get("storage-driver")
        .and_then(|d| d.as_str())
        .map(str::to_string)
        .or_else(|| {
            run(&["docker", "info", "--format", "{{.Driver}}"])
                .map(|d| d.trim().to_string())
                .filter(|d| !d.is_empty())
        });
    if let Some(driver) = driver {
        config["storage-driver"] = driver.into();
    }
    config
}

/// An extra node's dockerd, stopped and cleaned up on drop.
pub struct ExtraNode {
    pub n: u8,
    child: Option<Child>,
    root: PathBuf,
    config: PathBuf,
}

impl ExtraNode {
    /// The node's engine address, `127.0.0.N:2376`.
    pub fn address(n: u8) -> String {
        format!("127.0.0.{n}:2376")
    }

    /// The node's name, `nN`.
    pub fn name(n: u8) -> String {
        format!("n{n}")
    }

    /// Starts node `n` (2..=9) with the bundle escale wrote into `bundle_dir`.
    pub fn start(n: u8, bundle_dir: &Path) -> ExtraNode {
        ExtraNode::start_with(n, bundle_dir, None)
    }

    /// Starts node `n` with its whole root (data root included) on a tmpfs of `size`
    /// (`512m`): a disk small enough to fill.
    pub fn start_on_tmpfs(n: u8, bundle_dir: &Path, size: &str) -> ExtraNode {
        ExtraNode::start_with(n, bundle_dir, Some(size))
    }

    /// The directory holding the node's data root, certificates and log.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn start_with(n: u8, bundle_dir: &Path, tmpfs: Option<&str>) -> ExtraNode {
        sweep(n);
        let root = root_of(n);
        std::fs::create_dir_all(&root).unwrap();
        if let Some(size) = tmpfs {
            run(&[
                "mount",
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "escale-it-tmpfs",
                root.to_str().unwrap(),
            ])
            .expect("tmpfs mounted for the node's root");
        }
        let hosts = [format!("tcp://{}", ExtraNode::address(n))];
        let mut config = daemon_config(bundle_dir, &root, &hosts);
        config["default-address-pools"] =
            serde_json::json!([{"base": format!("10.21{n}.0.0/16"), "size": 24}]);
        let config_path = root.join("daemon.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
        let bridge = bridge_of(n);
        assert!(
            run(&["ip", "link", "add", &bridge, "type", "bridge"]).is_some(),
            "cannot create bridge {bridge}"
        );
        run(&[
            "ip",
            "addr",
            "add",
            &format!("172.31.22{n}.1/24"),
            "dev",
            &bridge,
        ])
        .expect("bridge address");
        run(&["ip", "link", "set", &bridge, "up"]).expect("bridge up");
        let mut node = ExtraNode {
            n,
            child: None,
            root,
            config: config_path,
        };
        node.spawn();
        node
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("dockerd.log"))
            .unwrap();
        let p = |name: &str| self.root.join(name).to_string_lossy().into_owned();
        use std::os::unix::process::CommandExt;
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(&self.config)
            .args(["--data-root", &p("data")])
            .args(["--exec-root", &p("exec")])
            .args(["-p", &p("pid")])
            .args(["--bridge", &bridge_of(self.n)])
            .args(["--iptables=false", "--ip-masq=false"])
            .args(["--containerd-namespace", &format!("esc-n{}", self.n)])
            .args([
                "--containerd-plugins-namespace",
                &format!("esc-n{}p", self.n),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("dockerd starts");
        std::fs::write(self.root.join("group"), child.id().to_string()).unwrap();
        self.child = Some(child);
    }

    /// The daemon's unix socket (for the docker CLI: `-H unix://...`).
    pub fn socket(&self) -> String {
        format!("unix://{}", self.root.join("docker.sock").display())
    }

    /// Runs the docker CLI against this node; stdout.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .arg("-H")
            .arg(self.socket())
            .args(args)
            .output()
            .expect("docker CLI");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (up to 30 s) until the daemon answers on its unix socket.
    pub fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("docker")
                .arg("-H")
                .arg(self.socket())
                .args(["version", "--format", "{{.Server.Version}}"])
                .output()
                .is_ok_and(|o| o.status.success());
            if ok {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {} dockerd did not answer within 30 s:\n{}",
                self.n,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Loads `image` from the host's engine into this node (`docker save | docker load`).
    pub fn load_image_from_host(&self, image: &str) {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .spawn()
            .expect("docker save");
        let load = Command::new("docker")
            .arg("-H")
            .arg(self.socket())
            .arg("load")
            .stdin(save.stdout.take().expect("piped"))
            .output()
            .expect("docker load");
        let saved = save.wait().expect("docker save");
        assert!(saved.success(), "docker save {image}: {saved}");
        assert!(
            load.status.success(),
            "loading {image} into node {}: {}",
            self.n,
            String::from_utf8_lossy(&load.stderr)
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("dockerd.log")).unwrap_or_default()
    }

    /// Panics with the daemon's log if it has exited.
    pub fn check_running(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("node {} dockerd exited ({status}):\n{}", self.n, self.log());
            }
        }
    }

    /// The daemon's process group id.
    pub fn pgid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `signal` to the daemon's whole process group.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pgid()), signal)
            .expect("signal the node's daemon");
    }

    /// Kills the daemon's process group at once (the machine is gone): its engine, its
    /// containerd and its docker-proxies; then its containers (their shims left the group).
    pub fn kill(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
        kill_shims(&self.root);
    }

    /// Starts the daemon again on the same data (the machine is back).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let _ = std::fs::remove_file(self.root.join("pid"));
        self.spawn();
    }
}

impl Drop for ExtraNode {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            use nix::sys::signal::{killpg, Signal};
            use nix::unistd::Pid;
            let group = Pid::from_raw(child.id() as i32);
            // A stopped daemon (SIGSTOP in a test) must run to end.
            let _ = killpg(group, Signal::SIGCONT);
            let _ = killpg(group, Signal::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "node {} dockerd log tail:\n{}",
                self.n,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        sweep(self.n);
    }
}

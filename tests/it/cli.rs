//! The CLI end to end against a real `escale serve`: what a user types, exit codes and
//! messages, `--json`, stored logins, host tokens, and durability across restarts and
//! `kill -9`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::server::{TestServer, ESCALE};

/// What one CLI run did.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "expected success: {self:#?}");
        &self.stdout
    }

    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:#?}"))
    }

    /// Asserts the exit code and that stderr mentions every one of `words`.
    #[track_caller]
    fn fails(&self, code: i32, words: &[&str]) {
        assert_eq!(self.code, code, "exit code: {self:#?}");
        for w in words {
            assert!(
                self.stderr.contains(w),
                "stderr should mention `{w}`: {self:#?}"
            );
        }
    }
}

/// A CLI invocation with full control of its environment.
#[derive(Clone)]
struct Run<'a> {
    s: &'a TestServer,
    token: Option<String>,
    home: PathBuf,
    env: Vec<(String, String)>,
    stdin: Option<String>,
    url: Option<String>,
}

impl<'a> Run<'a> {
    /// As the admin, with the harness' HOME (which holds the admin login stored by `setup`).
    fn admin(s: &'a TestServer) -> Run<'a> {
        Run {
            s,
            token: Some(s.token.clone()),
            home: s.dir.path().join("home"),
            env: Vec::new(),
            stdin: None,
            url: Some(s.api.clone()),
        }
    }

    /// With no token and a HOME of its own (`name`), so no stored login applies.
    fn anonymous(s: &'a TestServer, home: &str) -> Run<'a> {
        let home = s.dir.path().join(home);
        std::fs::create_dir_all(&home).expect("home");
        Run {
            s,
            token: None,
            home,
            env: Vec::new(),
            stdin: None,
            url: Some(s.api.clone()),
        }
    }

    fn token(&self, t: &str) -> Self {
        let mut r = self.clone();
        r.token = Some(t.to_string());
        r
    }

    fn env(&self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        let mut r = self.clone();
        r.env
            .push((k.to_string(), v.as_ref().to_string_lossy().into_owned()));
        r
    }

    fn stdin(&self, s: &str) -> Self {
        let mut r = self.clone();
        r.stdin = Some(s.to_string());
        r
    }

    fn no_url(&self) -> Self {
        let mut r = self.clone();
        r.url = None;
        r
    }

    fn run(&self, args: &[&str]) -> Out {
        let mut cmd = Command::new(ESCALE);
        cmd.args(args)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("ESCALE_TOKEN")
            .env_remove("ESCALE_URL")
            .env_remove("ESCALE_DATA_DIR")
            .current_dir(self.s.dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(u) = &self.url {
            cmd.env("ESCALE_URL", u);
        }
        if let Some(t) = &self.token {
            cmd.env("ESCALE_TOKEN", t);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("escale runs");
        {
            let mut input = child.stdin.take().expect("stdin");
            if let Some(s) = &self.stdin {
                let _ = writeln!(input, "{s}");
            }
        }
        let out = child.wait_with_output().expect("output");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs with `--json` appended, asserts success and parses stdout.
    #[track_caller]
    fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        self.run(&a).json()
    }
}

fn app_names(s: &TestServer) -> Vec<String> {
    Run::admin(s)
        .json(&["apps", "list"])
        .as_array()
        .expect("apps list --json is an array")
        .iter()
        .map(|a| a["name"].as_str().expect("name").to_string())
        .collect()
}

/// Config as `key -> (value or null, secret)`.
fn config_of(s: &TestServer, app: &str, reveal: bool) -> BTreeMap<String, (Value, bool)> {
    let mut args = vec!["config", "get", app];
    if reveal {
        args.push("--reveal");
    }
    Run::admin(s)
        .json(&args)
        .as_array()
        .expect("config get --json is an array")
        .iter()
        .map(|v| {
            (
                v["key"].as_str().expect("key").to_string(),
                (v["value"].clone(), v["secret"] == true),
            )
        })
        .collect()
}

fn database_path(s: &TestServer) -> PathBuf {
    s.dir.path().join("data").join("escale.db")
}

/// `PRAGMA integrity_check` on a read-only connection to the registry file.
async fn integrity_check(db: &Path) -> String {
    let mut conn = crate::support::server::read_only_registry(db).await;
    let rows: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .expect("integrity_check runs");
    rows.join("\n")
}

#[tokio::test]
async fn a_user_walks_through_the_cli() {
    let s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);

    // Apps.
    let out = admin.run(&["apps", "create", "shop"]);
    assert!(out.ok().contains("shop"), "{out:?}");
    let created = admin.json(&["apps", "create", "blog"]);
    assert_eq!(created["name"], "blog");
    let list = admin.run(&["apps", "list"]);
    let list = list.ok();
    assert!(list.starts_with("APP"), "a table with a header: {list}");
    assert!(
        list.lines().any(|l| l.starts_with("shop ")),
        "the table lists shop: {list}"
    );
    assert_eq!(app_names(&s).len(), 2);
    let info = admin.run(&["apps", "info", "shop"]);
    assert!(info.ok().contains("App:      shop"), "{info:?}");
    assert!(
        info.stdout.contains("web"),
        "info lists processes: {info:?}"
    );
    assert_eq!(admin.json(&["apps", "info", "shop"])["name"], "shop");

    // Nodes: the local engine, answering.
    let nodes = admin.run(&["nodes", "list"]);
    let nodes = nodes.ok();
    assert!(nodes.starts_with("NODE"), "{nodes}");
    assert!(
        nodes
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["local", "ready"])),
        "{nodes}"
    );
    assert_eq!(admin.json(&["nodes", "list"])[0]["state"], "ready");

    // Config.
    admin.run(&["config", "set", "shop", "K=V", "A=B"]).ok();
    let v = admin.json(&["config", "set", "shop", "C=D"]);
    assert!(v.is_object(), "{v}");
    let get = admin.run(&["config", "get", "shop"]);
    let lines: Vec<&str> = get.ok().lines().collect();
    assert!(lines.contains(&"K=V") && lines.contains(&"A=B"), "{get:?}");
    admin
        .run(&["config", "set", "shop", "S=x", "--secret"])
        .ok();
    let get = admin.run(&["config", "get", "shop"]);
    assert!(!get.ok().contains("S=x"), "secret hidden: {get:?}");
    assert!(get.stdout.contains("S="), "secret key listed: {get:?}");
    let one = admin.run(&["config", "get", "shop", "S"]);
    one.fails(1, &["secret", "--reveal"]);
    assert!(one.stdout.is_empty(), "nothing on stdout: {one:?}");

    let one = admin.run(&["config", "get", "shop", "S", "--reveal"]);
    assert_eq!(one.ok().trim(), "x");
    // Changing a secret's value without --secret keeps it secret.
    admin.run(&["config", "set", "shop", "S=x2"]).ok();
    assert_eq!(config_of(&s, "shop", false)["S"], (Value::Null, true));
    admin
        .run(&["config", "set", "shop", "S=x", "--secret"])
        .ok();

    let cfg = config_of(&s, "shop", false);
    assert_eq!(cfg["S"], (Value::Null, true), "{cfg:?}");
    assert_eq!(config_of(&s, "shop", true)["S"].0, "x");
    assert_eq!(admin.json(&["config", "get", "shop", "K"])["value"], "V");
    admin.run(&["config", "unset", "shop", "A"]).ok();
    admin.json(&["config", "unset", "shop", "C"]);
    let cfg = config_of(&s, "shop", false);
    assert!(!cfg.contains_key("A") && !cfg.contains_key("C"), "{cfg:?}");
    assert!(cfg.contains_key("K"), "{cfg:?}");

    // Domains, an international one shown as punycode.
    admin
        .run(&["domains", "add", "shop", "shop.example.eu"])
        .ok();
    let d = admin.json(&["domains", "add", "shop", "bücher.example"]);
    assert_eq!(d["domain"], "xn--bcher-kva.example", "{d}");
    let list = admin.run(&["domains", "list", "shop"]);
    assert!(
        list.ok().contains("xn--bcher-kva.example") && list.stdout.contains("shop.example.eu"),
        "{list:?}"
    );
    assert!(!list.stdout.contains("bücher"), "{list:?}");
    admin
        .run(&["domains", "remove", "shop", "shop.example.eu"])
        .ok();
    admin.json(&["domains", "remove", "shop", "xn--bcher-kva.example"]);
    let list = admin.json(&["domains", "list", "shop"]);
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list}");

    // Processes, scale, resources.
    let p = admin.run(&[
        "processes",
        "set",
        "shop",
        "worker",
        "--",
        "/bin/worker",
        "--flag",
    ]);
    assert!(p.ok().contains("/bin/worker --flag"), "{p:?}");
    let list = admin.run(&["processes", "list", "shop"]);
    let worker = list
        .ok()
        .lines()
        .find(|l| l.starts_with("worker"))
        .unwrap_or_else(|| panic!("worker listed: {list:?}"));
    assert!(worker.contains("/bin/worker --flag"), "{worker}");
    let procs = admin.json(&["processes", "list", "shop"]);
    assert!(procs
        .as_array()
        .expect("array")
        .iter()
        .any(|p| p["name"] == "worker"));
    let scale = admin.run(&["scale", "shop", "nope=1"]);
    scale.fails(1, &["nope", "web", "worker"]);
    admin
        .run(&[
            "resources",
            "shop",
            "web",
            "--memory",
            "256m",
            "--cpus",
            "0.5",
        ])
        .ok();
    let list = admin.run(&["processes", "list", "shop"]);
    let web = list
        .ok()
        .lines()
        .find(|l| l.starts_with("web"))
        .unwrap_or_else(|| panic!("web listed: {list:?}"))
        .to_string();
    assert!(web.contains("256m") && web.contains("0.5"), "{web}");
    // More CPUs or memory than any node has: refused naming the nodes, nothing changed.
    let nproc = std::thread::available_parallelism().unwrap().get();
    let too_many = (nproc * 32).to_string();
    admin
        .run(&["resources", "shop", "web", "--cpus", &too_many])
        .fails(
            1,
            &[
                "no node can run `web`",
                "local:",
                "CPU(s)",
                "nothing was changed",
            ],
        );
    admin
        .run(&["resources", "shop", "web", "--memory", "999999g"])
        .fails(1, &["no node can run `web`", "MiB"]);
    let again = admin.run(&["processes", "list", "shop"]);
    assert!(
        again.ok().lines().any(|l| l == web),
        "web unchanged: {again:?}"
    );
    let r = admin.json(&["resources", "shop", "worker", "--memory", "128m"]);
    assert_eq!(r["memory_bytes"], 128 << 20, "{r}");

    // Releases (none yet) and events.
    let rel = admin.run(&["releases", "shop"]);
    assert!(rel.ok().starts_with("VERSION"), "{rel:?}");
    assert!(admin.json(&["releases", "shop"]).is_array());
    let ev = admin.run(&["events"]);
    assert!(
        ev.ok().lines().any(|l| l.contains("admin")),
        "events by admin: {ev:?}"
    );
    let ev = admin.json(&["events", "shop"]);
    let ev = ev.as_array().expect("array");
    assert!(!ev.is_empty());
    assert!(ev.iter().all(|e| e["actor"] == "admin"), "{ev:?}");
    assert!(ev.iter().all(|e| e["app"] == "shop"), "{ev:?}");

    // Tokens.
    let t = admin.run(&["tokens", "create", "--name", "ci"]);
    let ci = t.ok().trim().to_string();
    assert!(ci.starts_with("esc_"), "{t:?}");
    assert!(
        Run::anonymous(&s, "ci-home")
            .token(&ci)
            .run(&["apps", "list"])
            .ok()
            .contains("shop"),
        "the new token works"
    );
    let tj = admin.json(&["tokens", "create", "--name", "ci2"]);
    assert!(
        tj["token"].as_str().unwrap_or("").starts_with("esc_"),
        "{tj}"
    );
    let list = admin.run(&["tokens", "list"]);
    assert!(list.ok().lines().any(|l| l.starts_with("ci ")), "{list:?}");
    assert!(
        !list.stdout.contains(&ci),
        "no secret in the list: {list:?}"
    );
    let lj = admin.json(&["tokens", "list"]);
    assert!(!lj.to_string().contains(&ci), "no secret in JSON: {lj}");
    assert!(lj
        .as_array()
        .expect("array")
        .iter()
        .any(|t| t["name"] == "ci"));
    admin.run(&["tokens", "revoke", "ci"]).ok();
    admin.json(&["tokens", "revoke", "ci2"]);
    Run::anonymous(&s, "ci-home")
        .token(&ci)
        .run(&["apps", "list"])
        .fails(4, &[]);

    // Users and teams.
    let u = admin.stdin("bob-password-1").run(&[
        "users",
        "create",
        "bob",
        "--role",
        "member",
        "--team",
        "default",
        "--password-stdin",
    ]);
    assert!(u.ok().contains("bob"), "{u:?}");
    let carol = Run::admin(&s).json(&["users", "create", "carol", "--role", "member"]);
    assert_eq!(carol["name"], "carol");
    let users = admin.run(&["users", "list"]);
    assert!(
        users.ok().lines().any(|l| l.starts_with("bob ")),
        "{users:?}"
    );
    assert!(admin.json(&["users", "list"]).is_array());
    admin.run(&["teams", "create", "blue"]).ok();
    admin.json(&["teams", "create", "green"]);
    let teams = admin.run(&["teams", "list"]);
    assert!(teams.ok().contains("blue"), "{teams:?}");
    assert!(admin.json(&["teams", "list"]).is_array());
    admin.json(&["users", "remove", "carol"]);

    // Login as bob with a HOME of its own; later commands need no ESCALE_TOKEN.
    let bob = Run::anonymous(&s, "bob-home");
    bob.run(&["apps", "list"]).fails(4, &[]);
    let login = bob
        .stdin("wrong-password")
        .run(&["login", "--name", "bob", "--password-stdin"]);
    login.fails(4, &["password"]);
    let bob = Run::anonymous(&s, "bob-home");
    let login = bob
        .stdin("bob-password-1")
        .run(&["login", "--name", "bob", "--password-stdin"]);
    login.ok();
    let creds = s
        .dir
        .path()
        .join("bob-home/.config/escale/credentials.json");
    let meta = std::fs::metadata(&creds).expect("credentials stored");
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }
    let stored: Value =
        serde_json::from_str(&std::fs::read_to_string(&creds).expect("read")).expect("JSON");
    assert!(stored["token"].as_str().unwrap_or("").starts_with("esc_"));
    let bob = Run::anonymous(&s, "bob-home");
    let me = bob.json(&["whoami"]);
    assert_eq!(me["name"], "bob", "{me}");
    assert_eq!(me["role"], "member", "{me}");
    assert!(bob.run(&["whoami"]).ok().contains("bob"));
    assert!(bob.run(&["apps", "list"]).ok().contains("shop"));
    // Without ESCALE_URL either: the stored URL is used.
    assert!(bob.no_url().run(&["apps", "list"]).ok().contains("shop"));
    let bob = Run::anonymous(&s, "bob-home");
    bob.run(&["users", "list"]).fails(4, &["admin"]);
    let out = bob.run(&["logout"]);
    assert!(out.ok().contains("credentials.json"), "{out:?}");
    assert!(!creds.exists());
    bob.run(&["apps", "list"]).fails(4, &[]);
    assert!(bob.run(&["logout"]).ok().contains("Not logged in"));
    assert_eq!(bob.json(&["logout"])["logged_out"], false);

    // Login --json prints the token.
    let lj = Run::anonymous(&s, "bob-home")
        .stdin("bob-password-1")
        .json(&["login", "--name", "bob", "--password-stdin"]);
    assert!(
        lj["token"].as_str().unwrap_or("").starts_with("esc_"),
        "{lj}"
    );
    let lo = Run::anonymous(&s, "bob-home").json(&["logout"]);
    assert_eq!(lo["logged_out"], true, "{lo}");

    // Destroy with confirmation.
    let d = admin.json(&["apps", "destroy", "blog", "--confirm", "blog"]);
    assert_eq!(d["destroyed"], "blog");
    assert_eq!(app_names(&s), vec!["shop".to_string()]);
}

#[tokio::test]
async fn exit_codes_and_messages_say_what_to_fix() {
    let s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);
    admin.run(&["apps", "create", "shop"]).ok();
    admin.run(&["config", "set", "shop", "K=V"]).ok();
    let apps_before = admin.json(&["apps", "list"]);
    let config_before = admin.json(&["config", "get", "shop"]);

    // Unreachable server.
    let out = admin.run(&["--url", "http://127.0.0.1:1", "apps", "list"]);
    out.fails(3, &["http://127.0.0.1:1"]);
    let out = admin.run(&["apps", "list", "--url", "http://127.0.0.1:1", "--json"]);
    out.fails(3, &["http://127.0.0.1:1"]);
    assert!(out.stdout.is_empty(), "{out:?}");

    // No token, a bad token.
    Run::anonymous(&s, "nobody")
        .run(&["apps", "list"])
        .fails(4, &[]);
    Run::anonymous(&s, "nobody")
        .token("esc_not-a-real-token")
        .run(&["apps", "list"])
        .fails(4, &[]);
    Run::anonymous(&s, "nobody")
        .token("esc_not-a-real-token")
        .run(&["config", "set", "shop", "X=1"])
        .fails(4, &[]);

    // Bad input: refused with a message, nothing changed.
    let cases: &[(&[&str], &[&str])] = &[
        (&["apps", "create", "Bad_Name"], &["Bad_Name", "lowercase"]),
        (
            &["config", "set", "shop", "NOEQUALS"],
            &["NOEQUALS", "KEY=VALUE"],
        ),
        (
            &["config", "set", "shop", "OK=1", "NOEQUALS"],
            &["NOEQUALS"],
        ),
        (&["config", "set", "shop", "1BAD=x"], &["1BAD"]),
        (&["scale", "shop", "web=-1"], &["web"]),
        (&["scale", "shop", "web=abc"], &["web=abc", "number"]),
        (&["scale", "shop", "web"], &["PROCESS=COUNT"]),
        (&["domains", "add", "shop", "a..b"], &["a..b"]),
        (&["rollback", "shop", "vX"], &["vX"]),
        (&["resources", "shop", "web", "--memory", "lots"], &["lots"]),
        (&["resources", "shop", "web"], &["--memory"]),
        (&["tokens", "create", "--name", "bad name"], &["token name"]),
    ];
    for (args, words) in cases {
        let out = admin.run(args);
        assert_ne!(out.code, 0, "{args:?} should fail: {out:?}");
        assert!(
            out.code == 1 || out.code == 2,
            "{args:?}: exit 1 or 2: {out:?}"
        );
        for w in *words {
            assert!(
                out.stderr.contains(w),
                "{args:?}: stderr names `{w}`: {out:?}"
            );
        }
        assert!(out.stderr.starts_with("error: "), "{args:?}: {out:?}");
    }
    assert_eq!(admin.json(&["apps", "list"]), apps_before);
    assert_eq!(admin.json(&["config", "get", "shop"]), config_before);
    assert!(admin
        .json(&["tokens", "list"])
        .as_array()
        .expect("array")
        .iter()
        .all(|t| t["name"] != "bad name"));
    // The local usage checks come before the server is asked: a bad argument with an
    // unreachable server is a usage error, not exit 3.
    admin
        .run(&["--url", "http://127.0.0.1:1", "scale", "shop", "web=abc"])
        .fails(2, &["web=abc"]);

    // Destroy without --confirm and no TTY.
    let out = admin.run(&["apps", "destroy", "shop"]);
    out.fails(2, &["--confirm shop"]);
    let out = admin.run(&["apps", "destroy", "shop", "--confirm", "shpo"]);
    out.fails(2, &["nothing destroyed"]);
    assert_eq!(app_names(&s), vec!["shop".to_string()]);

    // Unknown things: exit 1 naming them.
    admin.run(&["apps", "info", "nope"]).fails(1, &["nope"]);
    admin.run(&["config", "get", "nope"]).fails(1, &["nope"]);
    admin
        .run(&["config", "get", "shop", "MISSING"])
        .fails(1, &["MISSING"]);
    admin.run(&["tokens", "revoke", "nope"]).fails(1, &["nope"]);

    // clap usage errors.
    for args in [
        &["frobnicate"][..],
        &["apps"],
        &["scale", "shop"],
        &["apps", "create"],
        &["config", "set", "shop"],
        &["--bogus", "apps", "list"],
        &["completions", "tcsh-nope"],
    ] {
        let out = admin.run(args);
        assert_eq!(out.code, 2, "{args:?}: {out:?}");
        assert!(
            out.stderr.contains("Usage") || out.stderr.contains("--help"),
            "{args:?}: {out:?}"
        );
    }

    // Help with examples.
    for args in [
        &["--help"][..],
        &["deploy", "--help"],
        &["scale", "--help"],
        &["config", "--help"],
        &["config", "set", "--help"],
        &["help", "config"],
    ] {
        let out = admin.run(args);
        assert!(
            out.ok().contains("Example"),
            "{args:?} shows examples: {out:?}"
        );
    }
    let v = admin.run(&["--version"]);
    assert!(v.ok().contains(env!("CARGO_PKG_VERSION")), "{v:?}");

    // Completions.
    let c = admin.run(&["completions", "bash"]);
    assert!(
        c.ok().contains("_escale") && c.stdout.contains("complete "),
        "{}",
        &c.stdout[..c.stdout.len().min(300)]
    );
    assert!(c.stdout.contains("config"), "subcommands completed");
    assert!(c.stderr.is_empty(), "{c:?}");
}

#[tokio::test]
async fn tokens_create_on_the_host_makes_an_admin_token() {
    // The server's key comes from the environment: the host command must not leave a
    // `master.key` of its own in the data dir.
    let key = hex::encode(rand::random::<[u8; 32]>());
    let s = TestServer::start(&[("ESCALE_MASTER_KEY", &key)]).await;
    let master_key_file = s.dir.path().join("data").join("master.key");
    assert!(!master_key_file.exists());
    Run::admin(&s).run(&["apps", "create", "shop"]).ok();
    let data = s.dir.path().join("data");

    let host = Run::anonymous(&s, "host-home").env("ESCALE_DATA_DIR", &data);
    let out = host.run(&["tokens", "create", "--name", "x"]);
    let token = out.ok().trim().to_string();
    assert!(token.starts_with("esc_"), "{out:?}");
    assert!(out.stderr.contains("admin"), "names the user: {out:?}");

    let t = Run::anonymous(&s, "other-home").token(&token);
    assert_eq!(t.json(&["whoami"])["role"], "admin");
    assert!(t.run(&["apps", "list"]).ok().contains("shop"));
    t.run(&["users", "create", "dave", "--role", "member"]).ok();

    // --json, and a name taken already.
    let j = host.json(&["tokens", "create", "--name", "y"]);
    assert!(j["token"].as_str().unwrap_or("").starts_with("esc_"), "{j}");
    host.run(&["tokens", "create", "--name", "x"])
        .fails(1, &["`x`"]);
    assert!(!master_key_file.exists(), "a stray master.key was written");

    // No registry there: a message saying what to do.
    let empty = s.dir.path().join("no-data");
    Run::anonymous(&s, "host-home")
        .env("ESCALE_DATA_DIR", &empty)
        .run(&["tokens", "create", "--name", "z"])
        .fails(1, &["ESCALE_TOKEN", "no-data"]);
    assert!(
        !empty.exists(),
        "no data dir is created by a failed attempt"
    );
}

#[tokio::test]
async fn a_restart_keeps_everything() {
    let mut s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);
    for app in ["shop", "blog", "api"] {
        admin.run(&["apps", "create", app]).ok();
    }
    admin
        .run(&["config", "set", "shop", "A=1", "B=two words"])
        .ok();
    admin
        .run(&[
            "config",
            "set",
            "shop",
            "DATABASE_URL=postgres://u:p@db/shop",
            "--secret",
        ])
        .ok();
    admin
        .run(&["domains", "add", "shop", "shop.example.eu"])
        .ok();
    admin
        .run(&["domains", "add", "blog", "bücher.example"])
        .ok();
    admin
        .run(&[
            "processes",
            "set",
            "shop",
            "worker",
            "--",
            "/bin/worker",
            "--flag",
        ])
        .ok();
    admin
        .run(&[
            "resources",
            "shop",
            "web",
            "--memory",
            "256m",
            "--cpus",
            "0.5",
        ])
        .ok();
    admin.run(&["teams", "create", "blue"]).ok();
    admin
        .stdin("bob-password-1")
        .run(&[
            "users",
            "create",
            "bob",
            "--team",
            "blue",
            "--password-stdin",
        ])
        .ok();
    admin
        .run(&["apps", "create", "bluebird", "--team", "blue"])
        .ok();
    let ci = admin
        .run(&["tokens", "create", "--name", "ci"])
        .ok()
        .trim()
        .to_string();

    let snapshot = |s: &TestServer| -> Vec<Value> {
        let a = Run::admin(s);
        vec![
            a.json(&["apps", "list"]),
            a.json(&["apps", "info", "shop"]),
            a.json(&["config", "get", "shop"]),
            a.json(&["config", "get", "shop", "--reveal"]),
            a.json(&["domains", "list", "shop"]),
            a.json(&["domains", "list", "blog"]),
            a.json(&["processes", "list", "shop"]),
            a.json(&["users", "list"]),
            a.json(&["teams", "list"]),
        ]
    };
    let before = snapshot(&s);
    let events_before = admin.json(&["events"]);

    let status = s.terminate();
    assert!(status.success(), "SIGTERM: clean exit 0, got {status:?}");
    assert_eq!(
        integrity_check(&database_path(&s)).await,
        "ok",
        "after a clean stop"
    );
    s.restart();

    assert_eq!(snapshot(&s), before);
    let events_after = Run::admin(&s).json(&["events"]);
    assert_eq!(events_after, events_before);
    let admin = Run::admin(&s);
    assert_eq!(
        admin.json(&["config", "get", "shop", "DATABASE_URL", "--reveal"])["value"],
        "postgres://u:p@db/shop"
    );
    assert!(admin
        .run(&["config", "get", "shop"])
        .ok()
        .contains("DATABASE_URL=(secret)"));
    // Tokens and passwords still work.
    assert_eq!(
        Run::anonymous(&s, "ci-home").token(&ci).json(&["whoami"])["name"],
        "admin"
    );
    let bob = Run::anonymous(&s, "bob-home");
    bob.stdin("bob-password-1")
        .run(&["login", "--name", "bob", "--password-stdin"])
        .ok();
    let bob = Run::anonymous(&s, "bob-home");
    let apps = bob.json(&["apps", "list"]);
    let names: Vec<&str> = apps
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, vec!["bluebird"], "bob sees his team's app only");

    // And once more, SIGTERM right after start.
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    s.restart();
    assert_eq!(snapshot(&s), before);
}

/// Sends `PATCH /api/v1/apps/{app}/config` setting `key=value` over a fresh connection; true
/// when the server acknowledged it with a 2xx (and the whole response arrived).
fn patch_config(api: &str, token: &str, app: &str, key: &str, value: &str) -> bool {
    let addr = api.trim_start_matches("http://");
    let Ok(mut conn) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let body = serde_json::json!({"set": {key: value}}).to_string();
    let req = format!(
        "PATCH /api/v1/apps/{app}/config HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if conn.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut resp = Vec::new();
    if conn.read_to_end(&mut resp).is_err() {
        return false;
    }
    let text = String::from_utf8_lossy(&resp);
    let Some(status) = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
    else {
        return false;
    };
    // With `Connection: close` a complete answer ends with its JSON body.
    (200..300).contains(&status) && text.trim_end().ends_with('}')
}

#[tokio::test]
async fn kill_9_during_a_burst_of_writes_loses_no_acknowledged_write() {
    const WRITERS: usize = 6;
    const PER_WRITER: usize = 400;
    const KILL_AFTER: usize = 60;

    let mut s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);
    for app in ["a0", "a1", "a2"] {
        admin.run(&["apps", "create", app]).ok();
    }

    let acked: Arc<Mutex<Vec<(String, String, String)>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (api, token) = (s.api.clone(), s.token.clone());
        let (acked, count, killed) = (acked.clone(), count.clone(), killed.clone());
        writers.push(std::thread::spawn(move || {
            let app = format!("a{}", w % 3);
            let mut failures_after_kill = 0;
            for i in 0..PER_WRITER {
                let key = format!("K{w}_{i}");
                let value = format!("{w}-{i}");
                if patch_config(&api, &token, &app, &key, &value) {
                    acked.lock().expect("lock").push((app.clone(), key, value));
                    count.fetch_add(1, Ordering::SeqCst);
                } else if killed.load(Ordering::SeqCst) {
                    failures_after_kill += 1;
                    if failures_after_kill >= 3 {
                        return i;
                    }
                } else {
                    panic!("write {key} failed before the kill");
                }
            }
            PER_WRITER
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while count.load(Ordering::SeqCst) < KILL_AFTER {
        assert!(Instant::now() < deadline, "the burst is too slow");
        std::thread::sleep(Duration::from_millis(5));
    }
    killed.store(true, Ordering::SeqCst);
    s.kill9();
    let acked_at_kill = count.load(Ordering::SeqCst);
    let attempted: usize = writers
        .into_iter()
        .map(|w| w.join().expect("writer thread"))
        .sum();
    let acked = acked.lock().expect("lock").clone();
    assert!(acked_at_kill >= KILL_AFTER);
    assert!(
        attempted < WRITERS * PER_WRITER,
        "the kill landed before the burst ended ({attempted} writes attempted)"
    );
    assert!(
        acked.len() <= acked_at_kill + WRITERS,
        "nothing is acknowledged after the kill but requests in flight"
    );
    eprintln!(
        "{} writes acknowledged, kill after {acked_at_kill}, {attempted} attempted",
        acked.len()
    );

    s.restart();
    let mut present: BTreeMap<String, BTreeMap<String, (Value, bool)>> = BTreeMap::new();
    for app in ["a0", "a1", "a2"] {
        present.insert(app.to_string(), config_of(&s, app, false));
    }
    let lost: Vec<&(String, String, String)> = acked
        .iter()
        .filter(|(app, k, v)| present[app].get(k).map(|x| &x.0) != Some(&Value::from(v.as_str())))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    // The server works on after the crash.
    Run::admin(&s).run(&["config", "set", "a0", "AFTER=1"]).ok();
    assert_eq!(integrity_check(&database_path(&s)).await, "ok");
    let status = s.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(integrity_check(&database_path(&s)).await, "ok");
}

#[tokio::test]
async fn the_setup_token_binds_the_first_admin_once() {
    let (mut s, setup) = TestServer::start_unbound(&[]).await;
    assert!(setup.starts_with("escsetup_"), "{setup}");
    let home = "setup-home";

    // Before setup: the API wants a token, and the setup token is not one.
    Run::anonymous(&s, home)
        .token(&setup)
        .run(&["apps", "list"])
        .fails(4, &[]);

    let wrong = format!("escsetup_{}", "0".repeat(setup.len() - "escsetup_".len()));
    Run::anonymous(&s, home)
        .stdin("admin-password-1")
        .run(&[
            "setup",
            "--setup-token",
            &wrong,
            "--name",
            "admin",
            "--password-stdin",
        ])
        .fails(4, &["setup token"]);
    Run::anonymous(&s, home)
        .stdin("admin-password-1")
        .run(&[
            "setup",
            "--setup-token",
            "garbage",
            "--name",
            "admin",
            "--password-stdin",
        ])
        .fails(4, &[]);
    // A bad name or short password: refused, and the token stays usable.
    Run::anonymous(&s, home)
        .stdin("admin-password-1")
        .run(&[
            "setup",
            "--setup-token",
            &setup,
            "--name",
            "Bad Name",
            "--password-stdin",
        ])
        .fails(1, &["Bad Name"]);
    Run::anonymous(&s, home)
        .stdin("short")
        .run(&[
            "setup",
            "--setup-token",
            &setup,
            "--name",
            "admin",
            "--password-stdin",
        ])
        .fails(1, &["password"]);

    let out = Run::anonymous(&s, home).stdin("admin-password-1").json(&[
        "setup",
        "--setup-token",
        &setup,
        "--name",
        "admin",
        "--password-stdin",
    ]);
    let token = out["token"].as_str().expect("token").to_string();
    assert!(token.starts_with("esc_"), "{out}");
    assert_eq!(out["user"], "admin");

    // The stored login works; the token works.
    let me = Run::anonymous(&s, home).json(&["whoami"]);
    assert_eq!(me["name"], "admin");
    s.token = token.clone();
    Run::admin(&s).run(&["apps", "create", "shop"]).ok();

    // Only once.
    Run::anonymous(&s, "other-home")
        .stdin("admin-password-2")
        .run(&[
            "setup",
            "--setup-token",
            &setup,
            "--name",
            "mallory",
            "--password-stdin",
        ])
        .fails(4, &["setup token"]);
    // And never as an API token.
    Run::anonymous(&s, "other-home")
        .token(&setup)
        .run(&["apps", "list"])
        .fails(4, &[]);
    let users = Run::admin(&s).json(&["users", "list"]);
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");

    // A restart with an admin prints no new setup token (asserted by restart) and the
    // old one stays dead.
    s.restart();
    Run::anonymous(&s, "other-home")
        .stdin("admin-password-2")
        .run(&[
            "setup",
            "--setup-token",
            &setup,
            "--name",
            "mallory",
            "--password-stdin",
        ])
        .fails(4, &[]);
}

/// A one-shot HTTP server that records the request head and answers 401.
fn recording_server() -> (String, std::thread::JoinHandle<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    let h = std::thread::spawn(move || {
        let (mut c, _) = l.accept().expect("accept");
        let _ = c.set_read_timeout(Some(Duration::from_secs(10)));
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let body = r#"{"type":"about:blank","title":"Unauthorized","status":401,"detail":"missing token"}"#;
        let _ = write!(
            c,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/problem+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        String::from_utf8_lossy(&head).into_owned()
    });
    (url, h)
}

#[tokio::test]
async fn a_stored_login_is_only_sent_to_its_own_server() {
    let s = TestServer::start(&[]).await;
    Run::admin(&s)
        .stdin("bob-password-1")
        .run(&["users", "create", "bob", "--password-stdin"])
        .ok();
    let bob = Run::anonymous(&s, "bob-home");
    bob.stdin("bob-password-1")
        .run(&["login", "--name", "bob", "--password-stdin"])
        .ok();
    assert_eq!(bob.json(&["whoami"])["name"], "bob");
    // The same server with a trailing slash is the same server.
    let slash = format!("{}/", s.api);
    assert_eq!(
        bob.no_url().json(&["--url", &slash, "whoami"])["name"],
        "bob"
    );

    // Another server named with --url gets no token, and the message says why.
    let (other, seen) = recording_server();
    let out = bob.run(&["--url", &other, "apps", "list"]);
    let head = seen.join().expect("recording server");
    assert!(
        !head.to_ascii_lowercase().contains("authorization"),
        "the stored token went to another server:\n{head}"
    );
    out.fails(4, &["stored login", &s.api, &other]);

    // An explicit token is sent where it is told to go.
    let (other, seen) = recording_server();
    bob.token("esc_explicit")
        .run(&["--url", &other, "apps", "list"])
        .fails(4, &[]);
    assert!(seen
        .join()
        .expect("recording server")
        .contains("Bearer esc_explicit"));

    // Without a login at all the message says how to log in.
    Run::anonymous(&s, "nobody")
        .run(&["apps", "list"])
        .fails(4, &["escale login"]);
}

#[tokio::test]
async fn sigterm_is_not_held_up_by_idle_or_slow_clients() {
    let mut s = TestServer::start(&[]).await;
    let addr = s.api.trim_start_matches("http://").to_string();
    // An idle keep-alive connection after one request.
    let mut idle = std::net::TcpStream::connect(&addr).expect("connect");
    write!(idle, "GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).expect("read");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // A connection that sent half a request head.
    let mut slow = std::net::TcpStream::connect(&addr).expect("connect");
    write!(slow, "GET /api/v1/apps HTTP/1.1\r\nHost: x\r\n").expect("write");
    // And one that sent nothing.
    let _silent = std::net::TcpStream::connect(&addr).expect("connect");
    std::thread::sleep(Duration::from_millis(200));

    let status = s.terminate_within(Duration::from_secs(25));
    let status = status.unwrap_or_else(|| {
        panic!(
            "escale serve did not stop within 25 s of SIGTERM; log:\n{}",
            s.server_log()
        )
    });
    assert!(status.success(), "{status:?}");
    s.restart();
    Run::admin(&s).run(&["apps", "list"]).ok();
}

#[tokio::test]
async fn the_api_closes_connections_that_do_not_finish_their_request_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(&[("ESCALE_PROXY_HEADER_READ_TIMEOUT", "1s")]).await;
    let addr = server
        .api
        .trim_start_matches("http://")
        .trim_end_matches('/');
    // A slowloris client: part of a head, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /api/v1/apps HTTP/1.1\r\nHost: escale\r\nX-Slow: ")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "the API kept a connection with an unfinished head open for 10 s"
    );
    // A client that finishes its head is served (401: no token), on the same listener.
    let mut ok = tokio::net::TcpStream::connect(addr).await.unwrap();
    ok.write_all(b"GET /api/v1/apps HTTP/1.1\r\nHost: escale\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    ok.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

/// Every path under `dir` (itself included) whose mode gives group or others any access.
fn not_owner_only(dir: &Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_symlink() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            out.push(format!("{} {mode:o}", p.display()));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    out
}

/// Gives group and others read (and search) access to everything under `dir`, as an install
/// made before owner-only data dirs had it.
fn loosen(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(dir).unwrap();
    let mode = meta.permissions().mode() & 0o777;
    let loose = if meta.is_dir() {
        mode | 0o755
    } else {
        mode | 0o644
    };
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(loose)).unwrap();
    if meta.is_dir() {
        for e in std::fs::read_dir(dir).unwrap() {
            loosen(&e.unwrap().path());
        }
    }
}

fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Issue #11 finding 9: the data dir is 0700 and everything escale writes in it owner-only
/// (registry and its WAL, master key, git repositories), and a start fixes older installs.
#[tokio::test]
async fn the_data_dir_is_owner_only_and_a_start_fixes_older_installs() {
    let mut s = TestServer::start(&[]).await;
    s.ok(&["apps", "create", "shop"]);
    // A push of a side branch (not deployed) makes the server create the app's repository
    // and write objects and refs into it.
    let src = crate::gitpush::Repo::new();
    let push = |s: &TestServer, n: &str| {
        let url = format!(
            "{}/git/shop.git",
            s.api
                .replacen("http://", &format!("http://git:{}@", s.token), 1)
        );
        src.commit(&[("README", n)], n);
        let (ok, out) = src.push(&url, "HEAD:refs/heads/side");
        assert!(ok, "{out}");
    };
    push(&s, "one");
    let data = s.dir.path().join("data");
    let repo = crate::gitpush::app_repo(&s, "shop").await;
    for p in [
        data.join("escale.db"),
        data.join("escale.db-wal"),
        data.join("master.key"),
        repo.join("HEAD"),
        repo.join("config"),
    ] {
        assert_eq!(mode_of(&p), 0o600, "{}", p.display());
    }
    assert_eq!(mode_of(&data), 0o700);
    assert_eq!(mode_of(&repo.join("objects")), 0o700);
    assert_eq!(not_owner_only(&data), Vec::<String>::new());

    // An install from before the rule: everything readable by all, a repository without
    // core.sharedRepository. The next start makes it owner-only again.
    s.kill9();
    let unset = Command::new("git")
        .arg(format!("--git-dir={}", repo.display()))
        .args(["config", "--unset", "core.sharedRepository"])
        .output()
        .unwrap();
    assert!(unset.status.success(), "{unset:?}");
    loosen(&data);
    assert!(!not_owner_only(&data).is_empty());
    s.restart();
    assert_eq!(not_owner_only(&data), Vec::<String>::new());
    let shared = Command::new("git")
        .arg(format!("--git-dir={}", repo.display()))
        .args(["config", "core.sharedRepository"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&shared.stdout).trim(), "0600");
    // The server still works on the data dir it fixed, and what git writes stays owner-only.
    push(&s, "two");
    assert_eq!(not_owner_only(&data), Vec::<String>::new());
    s.ok(&["apps", "info", "shop"]);
}

#[tokio::test]
async fn process_types_must_exist_to_change_and_apply_prunes_only_when_asked() {
    let s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);
    admin.run(&["apps", "create", "shop"]).ok();

    // A typo in a process name creates nothing and says what the app has, as `scale` does.
    admin
        .run(&["resources", "shop", "wrker", "--memory", "256m"])
        .fails(1, &["no process type `wrker`", "it has: web"]);
    admin
        .run(&["scale", "shop", "wrker=1"])
        .fails(1, &["no process type `wrker`", "it has: web"]);
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names(&admin.json(&["processes", "list", "shop"])), ["web"]);

    // `processes set` defines one; `processes remove` removes it, once.
    admin
        .run(&[
            "processes",
            "set",
            "shop",
            "worker",
            "--health",
            "none",
            "--",
            "/app/worker",
        ])
        .ok();
    admin
        .run(&["resources", "shop", "worker", "--memory", "256m"])
        .ok();
    let out = admin.run(&["processes", "remove", "shop", "worker"]);
    assert!(
        out.ok().contains("Process type worker removed from shop"),
        "{out:?}"
    );
    admin
        .run(&["processes", "remove", "shop", "worker"])
        .fails(1, &["no process type `worker`", "it has: web"]);
    assert_eq!(names(&admin.json(&["processes", "list", "shop"])), ["web"]);

    // `apply` of a manifest without a process type says so and keeps it; `--prune` removes it.
    admin
        .run(&[
            "processes",
            "set",
            "shop",
            "worker",
            "--health",
            "none",
            "--",
            "/app/worker",
        ])
        .ok();
    let manifest = s.dir.path().join("escale.toml");
    std::fs::write(
        &manifest,
        "app = \"shop\"\n[processes.web]\ninstances = 0\n",
    )
    .unwrap();
    let file = manifest.to_str().unwrap();
    let out = admin.run(&["apply", "-f", file]);
    let text = out.ok();
    assert!(
        text.contains("left in place: process type worker") && text.contains("--prune"),
        "{out:?}"
    );
    assert_eq!(
        names(&admin.json(&["processes", "list", "shop"])),
        ["web", "worker"]
    );
    let out = admin.run(&["apply", "-f", file, "--prune"]);
    assert!(out.ok().contains("process worker: removed"), "{out:?}");
    assert_eq!(names(&admin.json(&["processes", "list", "shop"])), ["web"]);
    // Applied again: nothing to do, nothing undeclared.
    let out = admin.run(&["apply", "-f", file, "--prune"]);
    assert!(out.ok().contains("nothing changed"), "{out:?}");
    let events = admin.json(&["events", "shop"]);
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "process.remove"),
        "{events}"
    );
}

#[tokio::test]
async fn json_errors_config_shorthand_and_a_plain_server_log() {
    let s = TestServer::start(&[]).await;
    let admin = Run::admin(&s);
    admin.run(&["apps", "create", "shop"]).ok();
    admin.run(&["config", "set", "shop", "GREETING=hi"]).ok();

    // `escale config APP` lists the config, as `config get APP`.
    let out = admin.run(&["config", "shop"]);
    assert!(out.ok().contains("GREETING"), "{out:?}");
    assert_eq!(
        admin.json(&["config", "shop"]),
        admin.json(&["config", "get", "shop"])
    );
    admin
        .run(&["config", "shop", "extra"])
        .fails(2, &["escale config APP"]);

    // With --json, errors are one JSON object on stderr, with the same exit codes.
    let json_err = |out: &Out| -> Value {
        assert!(out.stdout.is_empty(), "{out:?}");
        serde_json::from_str(out.stderr.trim())
            .unwrap_or_else(|e| panic!("stderr is not JSON ({e}): {out:?}"))
    };
    for (args, code, status) in [
        (vec!["ps", "nosuch", "--json"], 1, Value::from(404)),
        (
            vec!["resources", "shop", "wrker", "--memory", "256m", "--json"],
            1,
            Value::from(404),
        ),
        (
            vec!["apps", "create", "Bad_Name", "--json"],
            1,
            Value::from(422),
        ),
        (
            vec!["apps", "list", "--url", "http://127.0.0.1:1", "--json"],
            3,
            Value::Null,
        ),
        (vec!["config", "shop", "extra", "--json"], 2, Value::Null),
    ] {
        let out = admin.run(&args);
        assert_eq!(out.code, code, "{args:?}: {out:?}");
        let e = json_err(&out);
        assert_eq!(e["status"], status, "{args:?}: {e}");
        assert_eq!(e["exit"], code, "{args:?}: {e}");
        assert!(
            e["error"].as_str().is_some_and(|m| !m.is_empty()),
            "{args:?}: {e}"
        );
    }
    let out = Run::anonymous(&s, "nobody")
        .token("esc_not-a-real-token")
        .run(&["apps", "list", "--json"]);
    assert_eq!(out.code, 4, "{out:?}");
    assert_eq!(json_err(&out)["status"], 401);
    // Without --json, the message as before.
    admin.run(&["ps", "nosuch"]).fails(1, &["error: "]);

    // `domains add` says what happens to the certificate (this server has no ACME).
    let out = admin.run(&["domains", "add", "shop", "shop.example.eu"]);
    assert!(
        out.ok().contains(
            "Next: no ACME configured: add a certificate with `escale certs add shop shop.example.eu"
        ),
        "{out:?}"
    );

    // The server's log goes to a file here: no colour codes in it.
    let log = s.server_log();
    assert!(!log.is_empty(), "the server logged nothing");
    assert!(!log.contains('\u{1b}'), "colour codes in a file log: {log}");
}

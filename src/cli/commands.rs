//! One function per CLI command. Each validates what it can locally, calls the API, and prints
//! a table or (`--json`) the API's JSON.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};

use http::Method;
use serde_json::{json, Value};

use super::client::{load_credentials, store_credentials, CliError, Client, Credentials};
use super::output::{ago, size, table};
use super::*;

const DEFAULT_URL: &str = "http://127.0.0.1:7300";

/// Runs a parsed command line.
///
/// The token stored by `escale login` belongs to the server it was issued by: it is sent only
/// to that URL, never to another one given with `--url`/`ESCALE_URL`.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let stored = load_credentials();
    let url = cli
        .url
        .clone()
        .or_else(|| stored.as_ref().map(|c| c.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let (stored_here, stored_elsewhere) = match stored {
        Some(c) if same_server(&c.url, &url) => (Some(c.token), None),
        Some(c) => (None, Some(c.url)),
        None => (None, None),
    };
    let token = cli.token.clone().or(stored_here);
    // Hints on how to authenticate, except where the command is the authentication.
    let hint =
        token.is_none() && !matches!(cli.command, Command::Setup { .. } | Command::Login { .. });
    run_with(cli, url.clone(), token).await.map_err(|e| match e {
        CliError::Auth { status, detail } if hint => CliError::Auth {
            status,
            detail: match stored_elsewhere {
                Some(other) => format!(
                    "{detail}\n  (the stored login is for {other}, not {url}: run `escale login --url {url}` or set ESCALE_TOKEN)"
                ),
                None => format!(
                    "{detail}\n  (log in with `escale login --name NAME` or set ESCALE_TOKEN)"
                ),
            },
        },
        other => other,
    })
}

/// True when two API URLs name the same server (up to trailing slashes).
fn same_server(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

async fn run_with(cli: Cli, url: String, token: Option<String>) -> Result<(), CliError> {
    // `escale config APP --json` reaches us as the external subcommand's argument.
    let json_out = cli.json
        || matches!(&cli.command, Command::Config(ConfigCommand::App(a)) if a.iter().any(|x| x == "--json"));
    let api = || Client::new(&url, token.clone());
    match cli.command {
        Command::Serve { config, reload } if reload => serve_reload(config).await,
        Command::Serve { config, .. } => serve(config).await,
        Command::Completions { .. } => unreachable!("handled before the runtime starts"),
        Command::Setup {
            setup_token,
            name,
            password_stdin,
        } => {
            let password = read_password(password_stdin, "Password for the first admin: ", true)?;
            let c = Client::new(&url, None)?;
            let out: Value = c
                .call(
                    Method::POST,
                    "/api/v1/setup",
                    Some(json!({"setup_token": setup_token, "name": name, "password": password})),
                )
                .await?;
            save_login(&url, &out)?;
            print_json_or(json_out, &out, || {
                println!(
                    "Admin `{}` created; token stored for this user. Next: escale apps create NAME",
                    out["user"].as_str().unwrap_or("")
                );
            });
            Ok(())
        }
        Command::Login {
            name,
            password_stdin,
        } => {
            let password = read_password(password_stdin, "Password: ", false)?;
            let c = Client::new(&url, None)?;
            let out: Value = c
                .call(
                    Method::POST,
                    "/api/v1/login",
                    Some(json!({"name": name, "password": password})),
                )
                .await?;
            let path = save_login(&url, &out)?;
            print_json_or(json_out, &out, || {
                println!(
                    "Logged in as {} ({}); token stored in {}",
                    out["user"].as_str().unwrap_or(""),
                    out["role"].as_str().unwrap_or(""),
                    path.display()
                )
            });
            Ok(())
        }
        Command::Logout => {
            if let Some(p) = client::credentials_path() {
                match std::fs::remove_file(&p) {
                    Ok(()) => print_json_or(
                        json_out,
                        &json!({"logged_out": true, "credentials": p.display().to_string()}),
                        || println!("Forgot the token in {}", p.display()),
                    ),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        print_json_or(json_out, &json!({"logged_out": false}), || {
                            println!("Not logged in.")
                        })
                    }
                    Err(e) => {
                        return Err(CliError::Local(format!(
                            "cannot remove {}: {e}",
                            p.display()
                        )))
                    }
                }
            }
            Ok(())
        }
        Command::Whoami => {
            let me: Value = api()?.call(Method::GET, "/api/v1/me", None).await?;
            print_json_or(json_out, &me, || {
                println!(
                    "{} ({}, team {}) at {url}",
                    s(&me["name"]),
                    s(&me["role"]),
                    s(&me["team"])
                )
            });
            Ok(())
        }
        Command::Apply { file, app, prune } => apply(&api()?, json_out, &file, app, prune).await,
        Command::Export { app } => {
            let out: Value = api()?
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/manifest", seg(&app)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || print!("{}", s(&out["manifest"])));
            Ok(())
        }
        Command::Apps(cmd) => apps(&api()?, json_out, cmd).await,
        Command::Config(cmd) => config(&api()?, json_out, cmd).await,
        Command::Processes(cmd) => processes(&api()?, json_out, cmd).await,
        Command::Scale { app, counts } => {
            let mut body = BTreeMap::new();
            for c in &counts {
                let (p, n) = c.split_once('=').ok_or_else(|| {
                    CliError::Usage(format!("`{c}`: write PROCESS=COUNT, e.g. web=7"))
                })?;
                let n: i64 = n.parse().map_err(|_| {
                    CliError::Usage(format!("`{c}`: the count must be a whole number"))
                })?;
                body.insert(p.to_string(), n);
            }
            let out: Value = api()?
                .call(
                    Method::PATCH,
                    &format!("/api/v1/apps/{}/formation", seg(&app)),
                    Some(json!(body)),
                )
                .await?;
            print_json_or(json_out, &out, || {
                let list: Vec<String> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}={}", s(&p["name"]), p["instances"]))
                    .collect();
                println!("Scaled {app}: {}", list.join(" "));
            });
            Ok(())
        }
        Command::Resources {
            app,
            process,
            memory,
            cpus,
        } => {
            if memory.is_none() && cpus.is_none() {
                return Err(CliError::Usage("give --memory and/or --cpus".into()));
            }
            let body = json!({"memory": memory, "cpus": cpus});
            let out: Value = api()?
                .call(
                    Method::PATCH,
                    &format!("/api/v1/apps/{}/processes/{}", seg(&app), seg(&process)),
                    Some(strip_nulls(body)),
                )
                .await?;
            print_json_or(json_out, &out, || {
                print_processes(std::slice::from_ref(&out))
            });
            Ok(())
        }
        Command::Deploy {
            app,
            image,
            port,
            no_wait,
            wait_timeout,
        } => {
            let c = api()?;
            let body = strip_nulls(json!({"image": image, "port": port}));
            // Subscribed before the release exists: no event of its rollout is missed.
            let mut events = if no_wait {
                None
            } else {
                Some(
                    c.events(&format!("/api/v1/events/stream?app={}", seg(&app)))
                        .await?,
                )
            };
            let rel: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/apps/{}/releases", seg(&app)),
                    Some(body),
                )
                .await?;
            let v = rel["version"].as_u64().unwrap_or(0);
            let Some(events) = events.as_mut() else {
                print_json_or(json_out, &rel, || {
                    println!("Release v{v} of {app} created; rolling out.")
                });
                return Ok(());
            };
            if !json_out {
                println!("Release v{v} of {app} created ({image}); rolling out...");
            }
            let done =
                super::commands::follow_rollout(&c, events, &app, v, *wait_timeout, json_out)
                    .await?;
            print_json_or(json_out, &done, || println!("v{v} of {app} is serving."));
            Ok(())
        }
        Command::Ps { app } => {
            let out: Value = api()?
                .list_in(
                    &format!("/api/v1/apps/{}/instances?limit=1000", seg(&app)),
                    "instances",
                )
                .await?;
            print_json_or(json_out, &out, || print_ps(&app, &out));
            Ok(())
        }
        Command::Logs {
            app,
            follow,
            process,
            tail,
        } => {
            let mut path = format!(
                "/api/v1/apps/{}/logs?tail={tail}&follow={follow}",
                seg(&app)
            );
            if let Some(p) = &process {
                path.push_str(&format!("&process={}", seg(p)));
            }
            api()?
                .stream_raw(Method::GET, &path, |chunk| {
                    use std::io::Write;
                    let mut out = std::io::stdout().lock();
                    out.write_all(chunk).and_then(|_| out.flush()).is_ok()
                })
                .await
        }
        Command::Releases { app } => {
            let out: Value = api()?
                .list(
                    &format!("/api/v1/apps/{}/releases?limit=1000", seg(&app)),
                    usize::MAX,
                )
                .await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|r| {
                        vec![
                            format!("v{}", r["version"]),
                            s(&r["status"]),
                            s(&r["image"]),
                            s(&r["description"]),
                            s(&r["created_by"]),
                            ago(r["created_at"].as_i64().unwrap_or(0)),
                        ]
                    })
                    .collect();
                table(
                    &["VERSION", "STATUS", "IMAGE", "DESCRIPTION", "BY", "CREATED"],
                    &rows,
                );
            });
            Ok(())
        }
        Command::Rollback {
            app,
            version,
            detach,
            wait_timeout,
        } => {
            let c = api()?;
            // Subscribed before the release exists, as for a deploy.
            let mut events = if detach {
                None
            } else {
                Some(
                    c.events(&format!("/api/v1/events/stream?app={}", seg(&app)))
                        .await?,
                )
            };
            let out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/apps/{}/rollback", seg(&app)),
                    Some(json!({"version": version})),
                )
                .await?;
            let v = out["version"].as_u64().unwrap_or(0);
            let Some(events) = events.as_mut() else {
                print_json_or(json_out, &out, || {
                    println!("Rolled back {app} to {version}: new release v{v}; rolling out.")
                });
                return Ok(());
            };
            if !json_out {
                println!("Rolled back {app} to {version}: new release v{v}; rolling out...");
            }
            let done =
                super::commands::follow_rollout(&c, events, &app, v, *wait_timeout, json_out)
                    .await?;
            print_json_or(json_out, &done, || println!("v{v} of {app} is serving."));
            Ok(())
        }
        Command::Domains(cmd) => domains(&api()?, json_out, cmd).await,
        Command::Certs(cmd) => certs(&api()?, json_out, cmd).await,
        Command::Webhooks(cmd) => webhooks(&api()?, json_out, cmd).await,
        Command::Tokens(cmd) => tokens(&url, token.clone(), json_out, cmd).await,
        Command::Users(cmd) => users(&api()?, json_out, cmd).await,
        Command::Nodes(cmd) => nodes(&api()?, json_out, cmd).await,
        Command::Backup(cmd) => super::backup::run(api, json_out, cmd).await,
        Command::Doctor { config } => doctor(config, json_out).await,
        Command::Install {
            root,
            binary,
            no_start,
        } => {
            let binary = match binary {
                Some(b) => b,
                None => std::env::current_exe()
                    .map_err(|e| CliError::Local(format!("cannot find this binary: {e}")))?,
            };
            let done = crate::install::install(&crate::install::InstallOptions {
                root,
                binary,
                start: !no_start,
            })
            .map_err(|e| CliError::Failed(e.to_string()))?;
            print_done(json_out, &done);
            Ok(())
        }
        Command::Uninstall { root, purge } => {
            let done = crate::install::uninstall(&crate::install::UninstallOptions { root, purge })
                .await
                .map_err(|e| CliError::Failed(e.to_string()))?;
            print_done(json_out, &done);
            Ok(())
        }
        Command::Teams(cmd) => {
            let c = api()?;
            match cmd {
                TeamsCommand::Create { name } => {
                    let out: Value = c
                        .call(Method::POST, "/api/v1/teams", Some(json!({"name": name})))
                        .await?;
                    print_json_or(json_out, &out, || println!("Team {name} created."));
                }
                TeamsCommand::List => {
                    let out: Value = c.call(Method::GET, "/api/v1/teams", None).await?;
                    print_json_or(json_out, &out, || {
                        let rows: Vec<Vec<String>> = out
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|t| {
                                vec![s(&t["name"]), ago(t["created_at"].as_i64().unwrap_or(0))]
                            })
                            .collect();
                        table(&["TEAM", "CREATED"], &rows);
                    });
                }
            }
            Ok(())
        }
        Command::Events { app, limit, follow } => {
            let page = limit.clamp(1, 1000);
            let path = match &app {
                Some(a) => format!("/api/v1/apps/{}/events?limit={page}", seg(a)),
                None => format!("/api/v1/events?limit={page}"),
            };
            let c = api()?;
            // Subscribed before the history is read: nothing falls between the two.
            let mut live = if follow {
                let stream = match &app {
                    Some(a) => format!("/api/v1/events/stream?app={}", seg(a)),
                    None => "/api/v1/events/stream".to_string(),
                };
                Some(c.events(&stream).await?)
            } else {
                None
            };
            let out: Value = c.list(&path, limit as usize).await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            ago(e["at"].as_i64().unwrap_or(0)),
                            s(&e["actor"]),
                            s(&e["app"]),
                            s(&e["action"]),
                            s(&e["detail"]),
                        ]
                    })
                    .collect();
                table(&["WHEN", "WHO", "APP", "ACTION", "DETAIL"], &rows);
            });
            if let Some(live) = live.as_mut() {
                while let Some(e) = live.next().await? {
                    if json_out {
                        println!("{e}");
                    } else {
                        let app = e["app"]
                            .as_str()
                            .or(e["instance"]["app"].as_str())
                            .unwrap_or("-");
                        println!(
                            "{} {app} {}",
                            clock(e["at"].as_i64().unwrap_or(0)),
                            s(&e["summary"])
                        );
                    }
                }
                return Err(CliError::Failed("the server ended the event stream".into()));
            }
            Ok(())
        }
    }
}

async fn serve(config: Option<PathBuf>) -> Result<(), CliError> {
    let cfg = crate::config::Config::load(config.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    crate::server::init_logging(cfg.log_format, &cfg.log_level);
    crate::server::serve(cfg, crate::server::shutdown_signal())
        .await
        .map_err(|e| CliError::Local(e.to_string()))
}

fn print_done(json_out: bool, done: &crate::install::Done) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(done).unwrap_or_default());
    } else {
        for s in &done.steps {
            println!("{s}");
        }
    }
}

async fn doctor(config: Option<PathBuf>, json_out: bool) -> Result<(), CliError> {
    let cfg = crate::config::Config::load(config.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    let report = crate::doctor::run(&cfg).await;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| CliError::Local(e.to_string()))?
        );
    } else {
        let rows: Vec<Vec<String>> = report
            .checks
            .iter()
            .map(|c| {
                vec![
                    match c.status {
                        crate::doctor::Status::Ok => "ok",
                        crate::doctor::Status::Warn => "WARN",
                        crate::doctor::Status::Fail => "FAIL",
                    }
                    .to_string(),
                    c.check.clone(),
                    c.detail.clone(),
                ]
            })
            .collect();
        table(&["STATUS", "CHECK", "DETAIL"], &rows);
        let todo: Vec<&crate::doctor::Check> =
            report.checks.iter().filter(|c| c.fix.is_some()).collect();
        if !todo.is_empty() {
            println!("\nTo fix:");
            for c in todo {
                println!("  {}: {}", c.check, c.fix.as_deref().unwrap_or_default());
            }
        }
    }
    let failed = report
        .checks
        .iter()
        .filter(|c| c.status == crate::doctor::Status::Fail)
        .map(|c| c.check.as_str())
        .collect::<Vec<_>>();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "{} check(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

/// True while process `pid` runs (not gone, not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with(|c| c != 'Z' && c != 'X'))
        })
        .unwrap_or(false)
}

/// `escale serve --reload`: a new server takes over from the running one (see
/// `crate::handover`); returns once the old one ($MAINPID, when systemd says it) exited.
async fn serve_reload(config: Option<PathBuf>) -> Result<(), CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Local(format!("cannot find this binary: {e}")))?;
    let mut cmd = std::process::Command::new(&exe);
    cmd.arg("serve");
    if let Some(c) = &config {
        cmd.arg("--config").arg(c);
    }
    cmd.stdin(std::process::Stdio::null());
    let mut child = cmd
        .spawn()
        .map_err(|e| CliError::Local(format!("cannot start {}: {e}", exe.display())))?;
    let old: Option<u32> = std::env::var("MAINPID").ok().and_then(|p| p.parse().ok());
    let Some(old) = old else {
        eprintln!("escale: a new server ({}) takes over", child.id());
        return Ok(());
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if !alive(old) {
            eprintln!("escale: server {} took over from {old}", child.id());
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CliError::Failed(format!(
                "the new server exited ({status}) before taking over; {old} keeps serving"
            )));
        }
        if std::time::Instant::now() > deadline {
            return Err(CliError::Failed(format!(
                "server {old} has not handed over after 120 s; both run: see the journal"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Follows release `v` by its events (`events` was opened before the release was made) until
/// its rollout succeeds or fails, printing progress on stderr unless `quiet`.
pub(super) async fn follow_rollout(
    c: &Client,
    events: &mut super::client::EventStream,
    app: &str,
    v: u64,
    timeout: std::time::Duration,
    quiet: bool,
) -> Result<Value, CliError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut check = true;
    loop {
        if check {
            check = false;
            let rel: Value = c
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/releases/{v}", seg(app)),
                    None,
                )
                .await?;
            match s(&rel["status"]).as_str() {
                "active" => return Ok(rel),
                "failed" | "superseded" => {
                    let reason = rel["status_reason"]
                        .as_str()
                        .unwrap_or("superseded by a newer release");
                    // The reason says whether a previous release keeps serving.
                    return Err(CliError::Failed(format!(
                        "rollout of v{v} failed: {reason}"
                    )));
                }
                _ => {}
            }
        }
        let e = match tokio::time::timeout_at(deadline, events.next()).await {
            Err(_) => {
                return Err(CliError::Failed(format!("stopped following v{v} after the wait timeout; it is still rolling out (see `escale ps {app}`)")))
            }
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) | Ok(Err(_)) => {
                return Err(CliError::Failed(format!("the server ended the event stream before v{v} finished rolling out (see `escale releases {app}`)")))
            }
        };
        let mine = e["release"].as_u64() == Some(v) || e["instance"]["release"].as_u64() == Some(v);
        match e["type"].as_str().unwrap_or("") {
            "rollout_progress" if mine && !quiet => eprintln!(
                "  v{v}: {}/{} healthy, {} old instance(s) left",
                e["healthy"], e["total"], e["old"]
            ),
            "instance_crashed" | "instance_unhealthy" if mine && !quiet => {
                eprintln!("  {}", s(&e["summary"]))
            }
            "rollout_succeeded" | "rollout_failed" | "changed" | "missed" => check = true,
            _ => {}
        }
    }
}

/// `escale apply`: checks the manifest here (so that a typo is shown with its line before
/// anything is sent), then has the server apply it in one transaction.
async fn apply(
    c: &Client,
    json_out: bool,
    file: &std::path::Path,
    app: Option<String>,
    prune: bool,
) -> Result<(), CliError> {
    use std::io::Read;
    let stdin = file.as_os_str() == "-";
    let shown = if stdin {
        "stdin".to_string()
    } else {
        file.display().to_string()
    };
    let text = if stdin {
        let mut t = String::new();
        std::io::stdin().read_to_string(&mut t).map_err(|e| {
            CliError::Local(format!("cannot read the manifest from standard input: {e}"))
        })?;
        t
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| CliError::Local(format!("cannot read {shown}: {e}")))?
    };
    let checks = crate::manifest::Checks {
        app: app.as_deref(),
        ..Default::default()
    };
    let m = crate::manifest::Manifest::parse_with(&text, &checks).map_err(|e| {
        let lines: Vec<String> = e
            .to_string()
            .lines()
            .map(|l| format!("{shown}:{l}"))
            .collect();
        CliError::Local(lines.join("\n"))
    })?;
    let app = app.or(m.app.clone()).ok_or_else(|| {
        CliError::Usage(format!(
            "which app? add `app = \"NAME\"` to {shown} or give --app NAME"
        ))
    })?;
    let out: Value = c
        .call(
            Method::PUT,
            &format!("/api/v1/apps/{}/manifest", seg(&app)),
            Some(json!({"manifest": text, "prune": prune})),
        )
        .await?;
    print_json_or(json_out, &out, || {
        let changes: Vec<String> = out["changes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let undeclared: Vec<String> = out["processes_undeclared"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        let note = || {
            if !undeclared.is_empty() {
                println!(
                    "Not in {shown}, left in place: process type{} {}. Remove {} with: escale apply -f {shown} --prune",
                    if undeclared.len() == 1 { "" } else { "s" },
                    undeclared.join(", "),
                    if undeclared.len() == 1 { "it" } else { "them" },
                );
            }
        };
        if changes.is_empty() {
            println!("{app} already matches {shown}; nothing changed.");
            note();
            return;
        }
        println!("Applied {shown} to {app}:");
        for c in &changes {
            println!("  {c}");
        }
        if let Some(v) = out["release"].as_u64() {
            println!("The config changed: release v{v} is rolling out.");
        }
        note();
    });
    Ok(())
}

async fn apps(c: &Client, json_out: bool, cmd: AppsCommand) -> Result<(), CliError> {
    match cmd {
        AppsCommand::Create { name, team, port } => {
            let out: Value = c
                .call(
                    Method::POST,
                    "/api/v1/apps",
                    Some(strip_nulls(
                        json!({"name": name, "team": team, "port": port}),
                    )),
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!("App {name} created (team {}). Deploy it with: escale deploy {name} --image IMAGE", s(&out["team"]))
            });
        }
        AppsCommand::List => {
            let out: Value = c.list("/api/v1/apps?limit=1000", usize::MAX).await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let formation: Vec<String> = a["processes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| format!("{}={}", s(&p["name"]), p["instances"]))
                            .collect();
                        vec![
                            s(&a["name"]),
                            s(&a["team"]),
                            a["release"]
                                .as_u64()
                                .map(|v| format!("v{v}"))
                                .unwrap_or_else(|| "-".into()),
                            formation.join(" "),
                            ago(a["created_at"].as_i64().unwrap_or(0)),
                        ]
                    })
                    .collect();
                table(&["APP", "TEAM", "RELEASE", "FORMATION", "CREATED"], &rows);
            });
        }
        AppsCommand::Info { name } => {
            let out: Value = c
                .call(Method::GET, &format!("/api/v1/apps/{}", seg(&name)), None)
                .await?;
            print_json_or(json_out, &out, || {
                println!("App:      {}", s(&out["name"]));
                println!("Team:     {}", s(&out["team"]));
                println!(
                    "Release:  {}",
                    out["release"]
                        .as_u64()
                        .map(|v| format!("v{v}"))
                        .unwrap_or_else(|| "- (not deployed)".into())
                );
                let domains: Vec<String> = out["domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(s)
                    .collect();
                println!(
                    "Domains:  {}",
                    if domains.is_empty() {
                        "-".into()
                    } else {
                        domains.join(", ")
                    }
                );
                if let Some(bytes) = out["disk_bytes"].as_u64() {
                    println!(
                        "Disk:     {} (images and containers, all nodes)",
                        crate::service::upkeep::human_bytes(bytes)
                    );
                }
                println!();
                print_processes(
                    out["processes"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or(&[]),
                );
            });
        }
        AppsCommand::Destroy { name, confirm } => {
            let confirmed = match confirm {
                Some(c) => c == name,
                None if std::io::stdin().is_terminal() => {
                    eprint!("This destroys {name}, its releases, config and instances. Type the app name to confirm: ");
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .map_err(|e| CliError::Local(e.to_string()))?;
                    line.trim() == name
                }
                None => {
                    return Err(CliError::Usage(format!(
                        "destroying needs confirmation: add --confirm {name}"
                    )))
                }
            };
            if !confirmed {
                return Err(CliError::Usage(
                    "confirmation did not match the app name; nothing destroyed".into(),
                ));
            }
            delete(
                c,
                &format!("/api/v1/apps/{}", seg(&name)),
                json_out,
                json!({"destroyed": name}),
                &format!("App {name} destroyed."),
            )
            .await?;
        }
    }
    Ok(())
}

async fn config(c: &Client, json_out: bool, cmd: ConfigCommand) -> Result<(), CliError> {
    let cmd = match cmd {
        // `escale config shop` (the Heroku habit): `escale config get shop`.
        ConfigCommand::App(args) => match args
            .iter()
            .filter(|a| *a != "--json")
            .collect::<Vec<_>>()
            .as_slice()
        {
            [app] => ConfigCommand::Get {
                app: app.to_string(),
                key: None,
                reveal: false,
            },
            _ => {
                return Err(CliError::Usage(format!(
                    "`escale config {}`: write `escale config APP`, or `escale config get|set|unset APP ...`",
                    args.join(" ")
                )))
            }
        },
        other => other,
    };
    match cmd {
        ConfigCommand::Get { app, key, reveal } => {
            let path = format!(
                "/api/v1/apps/{}/config{}",
                seg(&app),
                if reveal { "?reveal=true" } else { "" }
            );
            let out: Value = c.call(Method::GET, &path, None).await?;
            if let Some(k) = key {
                let var = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["key"] == k.as_str())
                    .ok_or_else(|| CliError::Server(format!("config var `{k}` not found")))?;
                if !json_out && var["value"].is_null() {
                    // Never print a placeholder where a script expects the value.
                    return Err(CliError::Failed(format!(
                        "config var `{k}` is secret: add --reveal (admins only) to print it"
                    )));
                }
                print_json_or(json_out, var, || println!("{}", s(&var["value"])));
                return Ok(());
            }
            print_json_or(json_out, &out, || {
                for v in out.as_array().into_iter().flatten() {
                    match v["value"].as_str() {
                        Some(val) => println!(
                            "{}={}{}",
                            s(&v["key"]),
                            val,
                            if v["secret"] == true {
                                "  (secret)"
                            } else {
                                ""
                            }
                        ),
                        None => println!("{}=(secret)", s(&v["key"])),
                    }
                }
            });
        }
        ConfigCommand::Set { app, pairs, secret } => {
            let mut set = BTreeMap::new();
            for p in &pairs {
                let (k, v) = p.split_once('=').ok_or_else(|| {
                    CliError::Usage(format!(
                        "`{}`: write KEY=VALUE",
                        crate::validate::printable(p)
                    ))
                })?;
                set.insert(k.to_string(), v.to_string());
            }
            let out: Value = c
                .call(
                    Method::PATCH,
                    &format!("/api/v1/apps/{}/config", seg(&app)),
                    Some(json!({"set": set, "secret": secret})),
                )
                .await?;
            print_json_or(json_out, &out, || {
                let keys: Vec<&String> = set.keys().collect();
                match out["release"].as_u64() {
                    Some(v) => {
                        println!("Set {} on {app}; release v{v} is rolling out.", join(&keys))
                    }
                    None => println!(
                        "Set {} on {app}; it applies at the first deploy.",
                        join(&keys)
                    ),
                }
            });
        }
        ConfigCommand::App(_) => unreachable!("mapped to Get above"),
        ConfigCommand::Unset { app, keys } => {
            let out: Value = c
                .call(
                    Method::PATCH,
                    &format!("/api/v1/apps/{}/config", seg(&app)),
                    Some(json!({"unset": keys})),
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!(
                    "Unset {} on {app}{}.",
                    keys.join(", "),
                    out["release"]
                        .as_u64()
                        .map(|v| format!("; release v{v} is rolling out"))
                        .unwrap_or_default()
                )
            });
        }
    }
    Ok(())
}

async fn processes(c: &Client, json_out: bool, cmd: ProcessesCommand) -> Result<(), CliError> {
    match cmd {
        ProcessesCommand::Remove { app, process } => {
            delete(
                c,
                &format!("/api/v1/apps/{}/processes/{}", seg(&app), seg(&process)),
                json_out,
                json!({"removed": process}),
                &format!("Process type {process} removed from {app}; its instances stop."),
            )
            .await?;
        }
        ProcessesCommand::List { app } => {
            let out: Value = c
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/processes", seg(&app)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                print_processes(out.as_array().map(Vec::as_slice).unwrap_or(&[]))
            });
        }
        ProcessesCommand::Set(p) => {
            let command = if p.default_command {
                Some(vec![])
            } else if p.command.is_empty() {
                None
            } else {
                Some(p.command.clone())
            };
            let ms = |d: Option<humantime::Duration>| d.map(|d| d.as_millis() as u64);
            let health = strip_nulls(json!({
                "kind": p.health,
                "path": p.health_path,
                "interval_ms": ms(p.health_interval),
                "timeout_ms": ms(p.health_timeout),
                "grace_ms": ms(p.health_grace),
            }));
            let health = health
                .as_object()
                .is_some_and(|o| !o.is_empty())
                .then_some(health);

            let constraints = constraints_arg(&p.constraints)?;
            let body = strip_nulls(json!({
                "command": command,
                "port": p.port,
                "surge": p.surge,
                "health": health,
                "constraints": constraints,
                "overcommit": p.overcommit,
            }));
            // Defines the process type when it is new (the one command that does).
            let out: Value = c
                .call(
                    Method::PUT,
                    &format!("/api/v1/apps/{}/processes/{}", seg(&p.app), seg(&p.process)),
                    Some(body),
                )
                .await?;
            print_json_or(json_out, &out, || {
                print_processes(std::slice::from_ref(&out))
            });
        }
    }
    Ok(())
}

fn print_ps(app: &str, out: &Value) {
    let rows: Vec<Vec<String>> = out["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                format!("{}.{}", s(&i["process"]), i["slot"]),
                format!("v{}", i["release"]),
                s(&i["node"]),
                s(&i["state"]),
                s(&i["health"]),
                s(&i["address"]),
                ago(i["created_at"].as_i64().unwrap_or(0))
                    .trim_end_matches(" ago")
                    .to_string(),
                i["restarts"].to_string(),
                s(&i["container"]),
            ]
        })
        .collect();
    let latest = &out["latest_release"];
    let failed = latest["status"] == "failed";
    if failed {
        // The reason's first line, then its log lines (if any) indented.
        let reason = s(&latest["status_reason"]);
        let mut lines = reason.lines();
        println!(
            "Release v{} of {app} failed: {}",
            latest["version"],
            lines.next().unwrap_or("no reason recorded")
        );
        for l in lines {
            println!("    {l}");
        }
        println!();
    }
    if !rows.is_empty() {
        table(
            &[
                "PROCESS",
                "RELEASE",
                "NODE",
                "STATE",
                "HEALTH",
                "ADDRESS",
                "UPTIME",
                "RESTARTS",
                "CONTAINER",
            ],
            &rows,
        );
    } else if failed {
        println!(
            "{app} has no instances: fix what made v{} fail, then deploy again (`escale deploy {app} --image IMAGE`).",
            latest["version"]
        );
    } else if latest.is_null() {
        println!("{app} has no instances: nothing was deployed yet (`escale deploy {app} --image IMAGE`).");
    } else if latest["status"] == "deploying" {
        println!(
            "{app} has no instances yet: v{} is rolling out.",
            latest["version"]
        );
    } else {
        println!("{app} has no instances (scale it with `escale scale {app} web=N`).");
    }
    for c in out["crashing"].as_array().into_iter().flatten() {
        println!();
        println!(
            "{app} is crashing: {}.{} crashed {} time(s) in a row (last exit code {}{}); next try {}",
            s(&c["process"]),
            c["slot"],
            c["crashes"],
            s(&c["last_exit_code"]),
            if c["oom"] == true { ", out of memory" } else { "" },
            ago(c["retry_at"].as_i64().unwrap_or(0)).replace(" ago", " from now"),
        );
        for l in c["last_logs"].as_array().into_iter().flatten() {
            println!("    | {}", s(l));
        }
    }
    for u in out["unplaced"].as_array().into_iter().flatten() {
        println!();
        println!(
            "{app}: no node can take {}.{}:",
            s(&u["process"]),
            u["slot"]
        );
        for r in u["reasons"].as_array().into_iter().flatten() {
            println!("    {}", s(r));
        }
    }
}

/// `--constraint disk=ssd` (repeated) as a JSON object; `-` alone clears; none given: `None`.
fn constraints_arg(args: &[String]) -> Result<Option<Value>, CliError> {
    if args.is_empty() {
        return Ok(None);
    }
    if args.len() == 1 && args[0] == "-" {
        return Ok(Some(json!({})));
    }
    let mut out = serde_json::Map::new();
    for a in args {
        let Some((k, v)) = a.split_once('=') else {
            return Err(CliError::Local(format!(
                "--constraint `{a}`: write KEY=VALUE, e.g. --constraint disk=ssd (or `-` alone to clear)"
            )));
        };
        out.insert(k.to_string(), json!(v));
    }
    Ok(Some(Value::Object(out)))
}

fn print_processes(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|p| {
            let cmd = p["command"]
                .as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(" "))
                .unwrap_or_else(|| "(image default)".into());
            let health = match p["health"]["kind"].as_str() {
                Some("http") => format!("http {}", s(&p["health"]["path"])),
                Some(k) => k.to_string(),
                None => "-".into(),
            };
            vec![
                s(&p["name"]),
                p["instances"].to_string(),
                p["port"].to_string(),
                p["memory_bytes"]
                    .as_u64()
                    .map(size)
                    .unwrap_or_else(|| "-".into()),
                p["nano_cpus"]
                    .as_i64()
                    .map(|n| format!("{}", n as f64 / 1e9))
                    .unwrap_or_else(|| "-".into()),
                health,
                placement(p),
                cmd,
            ]
        })
        .collect();
    table(
        &[
            "PROCESS",
            "INSTANCES",
            "PORT",
            "MEMORY",
            "CPUS",
            "HEALTH",
            "PLACEMENT",
            "COMMAND",
        ],
        &rows,
    );
}

async fn webhooks(c: &Client, json_out: bool, cmd: WebhooksCommand) -> Result<(), CliError> {
    match cmd {
        WebhooksCommand::Set {
            app,
            repo,
            branch,
            secret_stdin,
        } => {
            let mut body = json!({"repository": repo, "branch": branch});
            if secret_stdin {
                let mut sec = String::new();
                std::io::stdin()
                    .read_line(&mut sec)
                    .map_err(|e| CliError::Local(format!("reading the secret: {e}")))?;
                body["secret"] = json!(sec.trim_end_matches(['\n', '\r']));
            }
            let out: Value = c
                .call(
                    Method::PUT,
                    &format!("/api/v1/apps/{}/webhook", seg(&app)),
                    Some(body),
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!(
                    "Webhook of {app} set: pushes to `{}` of {} deploy.",
                    s(&out["branch"]),
                    s(&out["repository"])
                );
                println!(
                    "Payload URL: {}{}",
                    c.url().trim_end_matches('/'),
                    s(&out["path"])
                );
                println!("Secret (shown once): {}", s(&out["secret"]));
            });
        }
        WebhooksCommand::Show { app } => {
            let out: Value = c
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/webhook", seg(&app)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!("repository  {}", s(&out["repository"]));
                println!("branch      {}", s(&out["branch"]));
                println!(
                    "payload URL {}{}",
                    c.url().trim_end_matches('/'),
                    s(&out["path"])
                );
                println!("set by      {}", s(&out["created_by"]));
            });
        }
        WebhooksCommand::Remove { app } => {
            delete(
                c,
                &format!("/api/v1/apps/{}/webhook", seg(&app)),
                json_out,
                json!({"removed": app}),
                &format!("Webhook of {app} removed."),
            )
            .await?;
        }
    }
    Ok(())
}

/// A domain as the API takes it: an international name in its `xn--` form, lowercase. Input
/// that is no domain at all goes as typed, for the server to say what is wrong.
fn ascii_domain(domain: String) -> String {
    crate::validate::domain(&domain).unwrap_or(domain)
}

async fn domains(c: &Client, json_out: bool, cmd: DomainsCommand) -> Result<(), CliError> {
    match cmd {
        DomainsCommand::Add { app, domain } => {
            let domain = ascii_domain(domain);
            let out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/apps/{}/domains", seg(&app)),
                    Some(json!({"domain": domain})),
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!("Domain {} added to {app}.", s(&out["domain"]));
                if let Some(next) = out["next"].as_str() {
                    println!("Next: {next}.");
                }
            });
        }
        DomainsCommand::Remove { app, domain } => {
            let domain = ascii_domain(domain);
            delete(
                c,
                &format!("/api/v1/apps/{}/domains/{}", seg(&app), seg(&domain)),
                json_out,
                json!({"removed": domain}),
                &format!("Domain {domain} removed from {app}."),
            )
            .await?;
        }
        DomainsCommand::List { app } => {
            let out: Value = c
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/domains", seg(&app)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        let mut row =
                            vec![s(&d["domain"]), ago(d["created_at"].as_i64().unwrap_or(0))];
                        row.extend(cert_cells(&d["certificate"]));
                        row
                    })
                    .collect();
                table(
                    &[
                        "DOMAIN",
                        "ADDED",
                        "ISSUER",
                        "EXPIRES",
                        "SOURCE",
                        "LAST ERROR",
                    ],
                    &rows,
                );
            });
        }
    }
    Ok(())
}

/// Issuer, expiry, source and last error of a certificate state, `-` when absent.
fn cert_cells(c: &Value) -> Vec<String> {
    let or_dash = |v: &Value| match v.as_str() {
        Some(x) if !x.is_empty() => x.to_string(),
        _ => "-".into(),
    };
    let expires = match c["not_after"].as_i64() {
        Some(ms) => {
            let days = (ms - crate::registry::now_ms()) / 86_400_000;
            let date = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64),
            )
            .to_string();
            let date = date.split('T').next().unwrap_or("").to_string();
            if ms <= crate::registry::now_ms() {
                format!("{date} (expired)")
            } else {
                format!("{date} ({days}d)")
            }
        }
        None => "-".into(),
    };
    vec![
        or_dash(&c["issuer"]),
        expires,
        or_dash(&c["source"]),
        or_dash(&c["last_error"]),
    ]
}

async fn certs(c: &Client, json_out: bool, cmd: CertsCommand) -> Result<(), CliError> {
    match cmd {
        CertsCommand::Add {
            app,
            domain,
            cert,
            key,
        } => {
            let read = |p: &std::path::Path| {
                std::fs::read_to_string(p)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))
            };
            let body = json!({"domain": ascii_domain(domain), "cert_pem": read(&cert)?, "key_pem": read(&key)?});
            let out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/apps/{}/certs", seg(&app)),
                    Some(body),
                )
                .await?;
            print_json_or(json_out, &out, || {
                let cells = cert_cells(&out);
                println!(
                    "Certificate for {} added to {app}: issued by {}, expires {}.",
                    s(&out["domain"]),
                    cells[0],
                    cells[1]
                )
            });
        }
        CertsCommand::List { app } => {
            let out: Value = c
                .call(
                    Method::GET,
                    &format!("/api/v1/apps/{}/certs", seg(&app)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        let mut row = vec![s(&d["domain"])];
                        row.extend(cert_cells(d));
                        row
                    })
                    .collect();
                table(
                    &["DOMAIN", "ISSUER", "EXPIRES", "SOURCE", "LAST ERROR"],
                    &rows,
                );
            });
        }
        CertsCommand::Remove { app, domain } => {
            let domain = ascii_domain(domain);
            delete(
                c,
                &format!("/api/v1/apps/{}/certs/{}", seg(&app), seg(&domain)),
                json_out,
                json!({"removed": domain}),
                &format!("Certificate for {domain} removed from {app}."),
            )
            .await?;
        }
    }
    Ok(())
}

async fn tokens(
    url: &str,
    token: Option<String>,
    json_out: bool,
    cmd: TokensCommand,
) -> Result<(), CliError> {
    match cmd {
        TokensCommand::Create {
            name,
            local,
            config,
        } => {
            crate::validate::token_name(&name).map_err(|e| CliError::Usage(e.0))?;
            if local || token.is_none() {
                return local_token(&name, config, json_out).await;
            }
            let out: Value = Client::new(url, token)?
                .call(Method::POST, "/api/v1/tokens", Some(json!({"name": name})))
                .await?;
            print_json_or(json_out, &out, || print_token(&out));
        }
        TokensCommand::List => {
            let out: Value = Client::new(url, token)?
                .call(Method::GET, "/api/v1/tokens", None)
                .await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|t| {
                        vec![
                            s(&t["name"]),
                            format!("{}...", s(&t["prefix"])),
                            ago(t["created_at"].as_i64().unwrap_or(0)),
                            t["last_used_at"]
                                .as_i64()
                                .map(ago)
                                .unwrap_or_else(|| "never".into()),
                        ]
                    })
                    .collect();
                table(&["NAME", "PREFIX", "CREATED", "LAST USED"], &rows);
            });
        }
        TokensCommand::Revoke { name } => {
            delete(
                &Client::new(url, token)?,
                &format!("/api/v1/tokens/{}", seg(&name)),
                json_out,
                json!({"revoked": name}),
                &format!("Token {name} revoked."),
            )
            .await?;
        }
    }
    Ok(())
}

/// Creates an admin token directly in the local registry (the host owns the installation).
async fn local_token(name: &str, config: Option<PathBuf>, json_out: bool) -> Result<(), CliError> {
    let cfg = crate::config::Config::load(config.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    if !cfg.database_path().exists() {
        return Err(CliError::Local(format!(
            "no API token given and no registry at {} (set ESCALE_TOKEN, run `escale login`, or run this on the server host with its --config)",
            cfg.database_path().display()
        )));
    }
    // Tokens are stored hashed, not sealed: no master key is needed. Loading it here would
    // create a stray `master.key` in a data dir whose server takes its key from
    // ESCALE_MASTER_KEY.
    let registry = crate::registry::Registry::open_with(
        &cfg.database_path(),
        crate::secrets::MasterKey::random(),
        cfg.installation_id.as_deref(),
    )
    .await
    .map_err(|e| CliError::Local(e.to_string()))?;
    let admin = registry
        .host_admin()
        .await
        .map_err(|e| CliError::Local(e.to_string()))?;
    let t = crate::auth::generate_token();
    registry
        .create_token(
            &admin,
            crate::registry::NewToken {
                name,
                prefix: &t.prefix,
                hash: &t.hash,
            },
        )
        .await
        .map_err(|e| CliError::Server(e.to_string()))?;
    let out = json!({"name": name, "token": t.secret, "user": admin.name, "role": "admin"});
    print_json_or(json_out, &out, || print_token(&out));
    Ok(())
}

fn print_token(out: &Value) {
    println!("{}", s(&out["token"]));
    eprintln!(
        "(token `{}` for {}: store it now, it is not shown again)",
        s(&out["name"]),
        s(&out["user"])
    );
}

async fn users(c: &Client, json_out: bool, cmd: UsersCommand) -> Result<(), CliError> {
    match cmd {
        UsersCommand::Create {
            name,
            role,
            team,
            password_stdin,
        } => {
            let password = if password_stdin {
                Some(read_password(true, "", false)?)
            } else {
                None
            };
            let out: Value = c
                .call(
                    Method::POST,
                    "/api/v1/users",
                    Some(strip_nulls(
                        json!({"name": name, "role": role, "team": team, "password": password}),
                    )),
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!(
                    "User {name} ({}) created in team {}.",
                    s(&out["role"]),
                    s(&out["team"])
                )
            });
        }
        UsersCommand::List => {
            let out: Value = c.call(Method::GET, "/api/v1/users", None).await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> = out
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|u| {
                        vec![
                            s(&u["name"]),
                            s(&u["role"]),
                            s(&u["team"]),
                            ago(u["created_at"].as_i64().unwrap_or(0)),
                        ]
                    })
                    .collect();
                table(&["USER", "ROLE", "TEAM", "CREATED"], &rows);
            });
        }
        UsersCommand::Remove { name } => {
            delete(
                c,
                &format!("/api/v1/users/{}", seg(&name)),
                json_out,
                json!({"removed": name}),
                &format!("User {name} removed."),
            )
            .await?;
        }
    }
    Ok(())
}

fn save_login(url: &str, out: &Value) -> Result<std::path::PathBuf, CliError> {
    let token = out["token"]
        .as_str()
        .ok_or_else(|| CliError::Local("the server returned no token".into()))?;
    store_credentials(&Credentials {
        url: url.to_string(),
        token: token.to_string(),
    })
}

fn read_password(from_stdin: bool, prompt: &str, confirm: bool) -> Result<String, CliError> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .map_err(|e| CliError::Local(format!("cannot read the password: {e}")))?;
        return Ok(line.trim_end_matches(['\n', '\r']).to_string());
    }
    let p = rpassword::prompt_password(prompt)
        .map_err(|e| CliError::Local(format!("cannot read the password: {e}")))?;
    if confirm {
        let again =
            rpassword::prompt_password("Again: ").map_err(|e| CliError::Local(e.to_string()))?;
        if again != p {
            return Err(CliError::Usage("the passwords differ".into()));
        }
    }
    Ok(p)
}

/// Sends a DELETE and reports it: `done` as JSON with `--json`, else the human line.
async fn delete(
    c: &Client,
    path: &str,
    json_out: bool,
    done: Value,
    human: &str,
) -> Result<(), CliError> {
    c.call_raw(Method::DELETE, path, None).await?;
    print_json_or(json_out, &done, || println!("{human}"));
    Ok(())
}

async fn nodes(c: &Client, json_out: bool, cmd: NodesCommand) -> Result<(), CliError> {
    match cmd {
        NodesCommand::List => {
            let out: Value = c.call(Method::GET, "/api/v1/nodes", None).await?;
            print_json_or(json_out, &out, || {
                let rows: Vec<Vec<String>> =
                    out.as_array().into_iter().flatten().map(node_row).collect();
                table(
                    &[
                        "NODE", "STATE", "ADDRESS", "ENGINE", "CPUS", "MEMORY", "DISK", "INST",
                        "LABELS", "CERT", "SEEN",
                    ],
                    &rows,
                );
                if !rows.is_empty() {
                    println!("CPUS and MEMORY: used (measured) / placed (declared limits) / the node's capacity");
                }
                for n in out.as_array().into_iter().flatten() {
                    if let Some(e) = n["error"].as_str() {
                        println!("{}: {e}", s(&n["name"]));
                    }
                    if n["certificate"]["expiring"].as_bool() == Some(true) {
                        println!(
                            "{}: its certificate expires in {} days: run `escale nodes renew {}` and install the new bundle",
                            s(&n["name"]),
                            n["certificate"]["days_left"],
                            s(&n["name"])
                        );
                    }
                }
            });
        }
        NodesCommand::Info { node } => {
            let out: Value = c
                .call(Method::GET, &format!("/api/v1/nodes/{}", seg(&node)), None)
                .await?;
            print_json_or(json_out, &out, || print_node(&out));
        }
        NodesCommand::Add {
            node,
            address,
            advertise,
            labels,
            out,
        } => {
            let body =
                json!({"name": node, "address": address, "advertise": advertise, "labels": labels});
            let bundle: Value = c
                .call(Method::POST, "/api/v1/nodes", Some(strip_nulls(body)))
                .await?;
            if let Some(dir) = save_bundle(json_out, &node, out, &bundle)? {
                println!(
                    "Node {node} registered at {} (certificate {}, expires {}).",
                    s(&bundle["address"]),
                    s(&bundle["serial"]),
                    clock(bundle["not_after"].as_i64().unwrap_or(0))
                );
                println!(
                    "Its bundle is in {} (the node's private key is there and nowhere else: keep it safe).",
                    dir.display()
                );
                println!(
                    "On the node, as root, from a copy of that directory:\n  {}",
                    s(&bundle["install"])
                );
                println!("It joins as soon as its engine answers; until then `escale nodes list` shows it as joining, with why.");
            }
        }
        NodesCommand::Renew { node, address, out } => {
            let bundle: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/nodes/{}/renew", seg(&node)),
                    Some(strip_nulls(json!({"address": address}))),
                )
                .await?;
            if let Some(dir) = save_bundle(json_out, &node, out, &bundle)? {
                println!(
                    "New certificate {} for {node} at {} (expires {}); bundle in {}.",
                    s(&bundle["serial"]),
                    s(&bundle["address"]),
                    clock(bundle["not_after"].as_i64().unwrap_or(0)),
                    dir.display()
                );
                println!(
                    "On the node, as root, from a copy of that directory:\n  {}",
                    s(&bundle["install"])
                );
            }
        }
        NodesCommand::Cordon { node } => {
            let out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/nodes/{}/cordon", seg(&node)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!(
                    "{node} is cordoned: nothing new is placed there; its {} instance(s) stay.",
                    out["instances"]
                )
            });
        }
        NodesCommand::Uncordon { node } => {
            let out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/nodes/{}/uncordon", seg(&node)),
                    None,
                )
                .await?;
            print_json_or(json_out, &out, || {
                println!("{node} takes new instances again.")
            });
        }
        NodesCommand::Drain {
            node,
            detach,
            timeout,
        } => {
            // Subscribed before the drain starts: no instance event falls between the two.
            let mut live = if detach {
                None
            } else {
                Some(c.events("/api/v1/events/stream").await?)
            };
            let mut out: Value = c
                .call(
                    Method::POST,
                    &format!("/api/v1/nodes/{}/drain", seg(&node)),
                    None,
                )
                .await?;
            if let Some(live) = live.as_mut() {
                let deadline =
                    tokio::time::Instant::now() + std::time::Duration::from_secs(timeout);
                let mut shown = None;
                loop {
                    let left = out["instances"].as_u64().unwrap_or(0);
                    if shown != Some(left) && !json_out {
                        println!("{node}: {left} instance(s) left to move");
                        shown = Some(left);
                    }
                    if left == 0 {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return Err(CliError::Failed(format!(
                            "{node} still runs {left} instance(s) after {timeout} s; the drain goes on: see `escale nodes info {node}` and `escale events -f`"
                        )));
                    }
                    // Any event may be one of its instances moving; read the node again then,
                    // or after a second (the node's view follows the events by up to a pass).
                    let tick = (tokio::time::Instant::now() + std::time::Duration::from_secs(1))
                        .min(deadline);
                    match tokio::time::timeout_at(tick, live.next()).await {
                        Ok(Ok(Some(_))) | Err(_) => {}
                        Ok(Ok(None)) | Ok(Err(_)) => {
                            return Err(CliError::Failed(format!(
                                "lost the event stream while {node} drains; the drain goes on: see `escale nodes info {node}`"
                            )))
                        }
                    }
                    out = c
                        .call(Method::GET, &format!("/api/v1/nodes/{}", seg(&node)), None)
                        .await?;
                }
            }
            print_json_or(json_out, &out, || {
                if detach {
                    println!(
                        "{node} is draining: {} instance(s) to move; `escale nodes info {node}` follows it.",
                        out["instances"]
                    );
                } else {
                    println!("{node} is drained: nothing runs there, nothing new goes there. `escale nodes uncordon {node}` takes it back; `escale nodes remove {node}` removes it.");
                }
            });
        }
        NodesCommand::Remove { node } => {
            c.call_raw(
                Method::DELETE,
                &format!("/api/v1/nodes/{}", seg(&node)),
                None,
            )
            .await?;
            if json_out {
                println!("{}", json!({"node": node, "removed": true}));
            } else {
                println!("Node {node} removed.");
            }
        }
    }
    Ok(())
}

fn node_row(n: &Value) -> Vec<String> {
    let mut state = s(&n["state"]);
    if n["draining"].as_bool() == Some(true) {
        state.push_str(",draining");
    } else if n["cordoned"].as_bool() == Some(true) {
        state.push_str(",cordoned");
    }
    let cpus = |v: &Value| format!("{:.1}", v.as_i64().unwrap_or(0) as f64 / 1e9);
    // Used (measured) / placed (declared) / capacity.
    let used = &n["used"];
    let used_cpu = used["cpus"]
        .as_f64()
        .map_or_else(|| "-".to_string(), |c| format!("{c:.1}"));
    // Measured figures read as amounts (`1.5 GiB`); limits keep their notation (`256m`).
    let used_mem = used["memory_bytes"]
        .as_u64()
        .map_or_else(|| "-".to_string(), crate::service::upkeep::human_bytes);
    let (cpu, mem) = match n["capacity"].as_object() {
        Some(cap) => (
            format!(
                "{used_cpu}/{}/{}",
                cpus(&n["placed"]["nano_cpus"]),
                cpus(&cap["nano_cpus"])
            ),
            format!(
                "{used_mem}/{}/{}",
                size(n["placed"]["memory_bytes"].as_u64().unwrap_or(0)),
                size(cap["memory_bytes"].as_u64().unwrap_or(0))
            ),
        ),
        None => ("-".into(), "-".into()),
    };
    use crate::service::upkeep::human_bytes;
    let disk = match used["disk"].as_object() {
        None => "-".to_string(),
        Some(d) => {
            let owned = d["images_bytes"].as_u64().unwrap_or(0)
                + d["containers_bytes"].as_u64().unwrap_or(0);
            match d["filesystem"]["used_percent"].as_u64() {
                Some(p) => format!("{p}% ({} escale)", human_bytes(owned)),
                None => format!("{} escale", human_bytes(owned)),
            }
        }
    };
    let labels: Vec<String> = n["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
        .collect();
    vec![
        s(&n["name"]),
        state,
        s(&n["address"]),
        s(&n["engine_version"]),
        cpu,
        mem,
        disk,
        n["instances"].to_string(),
        if labels.is_empty() {
            "-".into()
        } else {
            labels.join(",")
        },
        match n["certificate"]["days_left"].as_i64() {
            Some(d) => format!("{d}d"),
            None => "-".into(),
        },
        match n["last_heartbeat"].as_i64() {
            Some(t) => ago(t),
            None => "never".into(),
        },
    ]
}

fn print_node(n: &Value) {
    let row = node_row(n);
    for (k, v) in [
        "Node",
        "State",
        "Address",
        "Engine",
        "CPUs used/placed/has",
        "Memory used/placed/has",
        "Disk",
        "Instances",
        "Labels",
        "Certificate left",
        "Last heartbeat",
    ]
    .iter()
    .zip(row)
    {
        println!("{k:<23} {v}");
    }
    if let Some(c) = n["certificate"].as_object() {
        println!(
            "{:<23} {} (serial {})",
            "Certificate until",
            clock(c["not_after"].as_i64().unwrap_or(0)),
            c["serial"].as_str().unwrap_or("-")
        );
    }
    if let Some(e) = n["error"].as_str() {
        println!("{:<23} {e}", "Error");
    }
}

/// Writes `bundle` into `out` (default `./escale-node-NODE`); with `--json`, prints where and
/// returns `None`, else returns the directory for the human message.
fn save_bundle(
    json_out: bool,
    node: &str,
    out: Option<std::path::PathBuf>,
    bundle: &Value,
) -> Result<Option<std::path::PathBuf>, CliError> {
    let dir = out.unwrap_or_else(|| format!("escale-node-{node}").into());
    write_bundle(&dir, bundle)?;
    if json_out {
        println!(
            "{}",
            json!({"node": node, "bundle_dir": dir, "serial": bundle["serial"], "not_after": bundle["not_after"]})
        );
        return Ok(None);
    }
    Ok(Some(dir))
}

/// Writes a node bundle's files into `dir` (made 0700; each file with its mode).
fn write_bundle(dir: &std::path::Path, bundle: &Value) -> Result<(), CliError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let local = |what: String| CliError::Local(what);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| local(format!("cannot create {}: {e}", dir.display())))?;
    for f in bundle["files"].as_array().into_iter().flatten() {
        let name = f["name"].as_str().unwrap_or_default();
        // File names come from the server: plain names only.
        if name.is_empty() || name.contains('/') || name.starts_with('.') {
            return Err(local(format!(
                "the server sent a bundle file named `{name}`"
            )));
        }
        let path = dir.join(name);
        let mode = f["mode"].as_u64().unwrap_or(0o600) as u32 & 0o777;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(mode)
                .open(&path)?;
            std::io::Write::write_all(
                &mut file,
                f["contents"].as_str().unwrap_or_default().as_bytes(),
            )?;
            file.set_permissions(std::fs::Permissions::from_mode(mode))
        };
        write().map_err(|e| local(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

fn print_json_or(json_out: bool, v: &Value, human: impl FnOnce()) {
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(v).expect("json serialises")
        );
    } else {
        human();
    }
}

/// A string field, or `-`.
/// `HH:MM:SS` (UTC) of a unix-milliseconds time.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(x) => x.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn join(keys: &[&String]) -> String {
    keys.iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes null members so optional fields are omitted (the API rejects nothing for absence).
fn strip_nulls(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.into_iter().filter(|(_, v)| !v.is_null()).collect()),
        other => other,
    }
}

/// Percent-encodes a path segment so user input cannot change the route.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A process's constraints and overcommit flag: `disk=ssd`, `disk=ssd,overcommit`, `-`.
fn placement(p: &Value) -> String {
    let mut parts: Vec<String> = p["constraints"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", s(v)))
        .collect();
    if p["overcommit"] == true {
        parts.push("overcommit".into());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

//! `escale install` and `escale uninstall`: escale under systemd on a Debian or Ubuntu host.
//!
//! Install writes the binary (`/usr/local/bin/escale`), the config (`/etc/escale/escale.toml`,
//! from the documented sample with `data_dir = "/var/lib/escale"`; an existing one is kept),
//! the unit (`/etc/systemd/system/escale.service`, from `dist/escale.service`), the data dir
//! (`/var/lib/escale`, 0700), the `escale` system user (in the `docker` group), enables the
//! unit for boot and starts it. Every path is under `--root` (default `/`): with another root
//! nothing outside it is touched (no user, no systemctl: the boot link is made by hand, as
//! `systemctl --root` would). Uninstall stops and disables the unit and removes it; config,
//! data and the running apps stay unless `--purge`, which also removes the config and data
//! dirs and the containers and networks of the installation.
//!
//! Commands run with fixed argv (never a shell), only when the root is `/`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

/// The unit as shipped; `@BINARY@` is the installed binary.
pub const UNIT: &str = include_str!("../dist/escale.service");
/// The documented sample config.
pub const SAMPLE_CONFIG: &str = include_str!("../config/escale.toml");

pub const UNIT_PATH: &str = "etc/systemd/system/escale.service";
pub const WANTS_LINK: &str = "etc/systemd/system/multi-user.target.wants/escale.service";
pub const CONFIG_PATH: &str = "etc/escale/escale.toml";
pub const DATA_DIR: &str = "var/lib/escale";
pub const BINARY_PATH: &str = "usr/local/bin/escale";

/// Install and uninstall failures.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> InstallError {
    let path = path.display().to_string();
    move |source| InstallError::Io { what, path, source }
}

/// What install or uninstall did, step by step.
#[derive(Debug, Default, Serialize)]
pub struct Done {
    pub steps: Vec<String>,
}

/// Options of `escale install`.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub root: PathBuf,
    /// The binary to install (default: this one).
    pub binary: PathBuf,
    /// Enable and start the unit (`systemctl enable --now`) when the root is `/`.
    pub start: bool,
}

/// The unit for a binary installed at `binary` (an absolute path on the target system).
pub fn unit_for(binary: &str) -> String {
    UNIT.replace("@BINARY@", binary)
}

/// The sample config with the data dir of an installed escale.
pub fn config_for_install() -> String {
    SAMPLE_CONFIG.replacen(
        "# data_dir = \"./data\"",
        "data_dir = \"/var/lib/escale\"",
        1,
    )
}

fn under(root: &Path, rel: &str) -> PathBuf {
    root.join(rel)
}

fn run(cmd: &str, args: &[&str]) -> Result<String, InstallError> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| InstallError::Command {
            command: format!("{cmd} {}", args.join(" ")),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(InstallError::Command {
            command: format!("{cmd} {}", args.join(" ")),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn write_file(path: &Path, text: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(io("cannot create", p))?;
    }
    let tmp = path.with_extension("escale-new");
    std::fs::write(&tmp, text).map_err(io("cannot write", &tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(io("cannot set the mode of", &tmp))?;
    std::fs::rename(&tmp, path).map_err(io("cannot write", path))
}

/// Installs escale under `opts.root`.
pub fn install(opts: &InstallOptions) -> Result<Done, InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let root = &opts.root;
    let real = root == Path::new("/");
    let mut done = Done::default();

    // The binary.
    let bin = under(root, BINARY_PATH);
    let same = std::fs::canonicalize(&opts.binary).ok() == std::fs::canonicalize(&bin).ok();
    if !same {
        let data = std::fs::read(&opts.binary).map_err(io("cannot read", &opts.binary))?;
        write_file(&bin, &data, 0o755)?;
        done.steps
            .push(format!("installed the binary at {}", bin.display()));
    }
    // The config, kept when it exists.
    let config = under(root, CONFIG_PATH);
    if config.exists() {
        done.steps
            .push(format!("kept the existing config {}", config.display()));
    } else {
        write_file(&config, config_for_install().as_bytes(), 0o640)?;
        done.steps.push(format!(
            "wrote the config {} (every key documented; edit apps_domain and acme.email)",
            config.display()
        ));
    }
    // The data dir.
    let data = under(root, DATA_DIR);
    std::fs::create_dir_all(&data).map_err(io("cannot create", &data))?;
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o700))
        .map_err(io("cannot set the mode of", &data))?;
    done.steps
        .push(format!("data dir {} (0700)", data.display()));
    // The unit.
    let unit = under(root, UNIT_PATH);
    write_file(
        &unit,
        unit_for(&format!("/{BINARY_PATH}")).as_bytes(),
        0o644,
    )?;
    done.steps
        .push(format!("wrote the unit {}", unit.display()));

    if real {
        // The service user, in the docker group (the engine's socket).
        if run("id", &["-u", "escale"]).is_err() {
            run(
                "useradd",
                &[
                    "--system",
                    "--user-group",
                    "--home-dir",
                    "/var/lib/escale",
                    "--shell",
                    "/usr/sbin/nologin",
                    "escale",
                ],
            )?;
            done.steps.push("created the system user escale".into());
        }
        if run("getent", &["group", "docker"]).is_ok() {
            run("usermod", &["--append", "--groups", "docker", "escale"])?;
            done.steps.push("added escale to the docker group".into());
        }
        run("chown", &["-R", "escale:escale", "/var/lib/escale"])?;
        run("chown", &["root:escale", "/etc/escale/escale.toml"])?;
        run("systemctl", &["daemon-reload"])?;
        if opts.start {
            run("systemctl", &["enable", "--now", "escale.service"])?;
            done.steps
                .push("enabled and started escale.service (`journalctl -u escale -f`)".into());
        } else {
            run("systemctl", &["enable", "escale.service"])?;
            done.steps.push("enabled escale.service for boot".into());
        }
    } else {
        // What `systemctl --root enable` does: the boot link.
        let link = under(root, WANTS_LINK);
        if let Some(p) = link.parent() {
            std::fs::create_dir_all(p).map_err(io("cannot create", p))?;
        }
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/systemd/system/escale.service", &link)
            .map_err(io("cannot link", &link))?;
        done.steps.push(format!(
            "enabled for boot ({} -> /etc/systemd/system/escale.service); not started: the root is not /",
            link.display()
        ));
    }
    Ok(done)
}

/// Options of `escale uninstall`.
#[derive(Debug, Clone)]
pub struct UninstallOptions {
    pub root: PathBuf,
    /// Also remove the config, the data dir and the installation's containers and networks.
    pub purge: bool,
}

/// Removes the unit (and with `purge`, the config, data and containers).
pub async fn uninstall(opts: &UninstallOptions) -> Result<Done, InstallError> {
    let root = &opts.root;
    let real = root == Path::new("/");
    let mut done = Done::default();
    let unit = under(root, UNIT_PATH);
    if real && unit.exists() {
        // Stopped: the apps' containers keep running (escale never stops them on exit).
        run("systemctl", &["disable", "--now", "escale.service"])?;
        done.steps
            .push("stopped and disabled escale.service".into());
    }
    for p in [under(root, WANTS_LINK), unit] {
        match std::fs::remove_file(&p) {
            Ok(()) => done.steps.push(format!("removed {}", p.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &p)(e)),
        }
    }
    if real {
        let _ = run("systemctl", &["daemon-reload"]);
    }
    let data = under(root, DATA_DIR);
    let config = under(root, CONFIG_PATH);
    if !opts.purge {
        done.steps.push(format!(
            "kept the config {} and the data {}; the apps keep running (`--purge` removes them)",
            config.display(),
            data.display()
        ));
        return Ok(done);
    }
    if real {
        // The installation's containers and networks, by its label.
        if let Some(id) = installation_id(&data.join("escale.db")).await {
            let docker_host = crate::config::Config::load(Some(&config))
                .map(|c| c.docker_host)
                .unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
            if docker_host != "off" {
                if let Ok(node) = crate::node::Node::connect_local("local", &docker_host).await {
                    match node.remove_all(&id).await {
                        Ok(n) => done.steps.push(format!(
                            "removed {n} container(s) and the networks of installation {id}"
                        )),
                        Err(e) => done.steps.push(format!(
                            "could not remove the containers of installation {id}: {e}"
                        )),
                    }
                }
            }
        }
    }
    for dir in [
        data,
        config.parent().map(Path::to_path_buf).unwrap_or_default(),
    ] {
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => done.steps.push(format!("removed {}", dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot remove", &dir)(e)),
        }
    }
    Ok(done)
}

async fn installation_id(db: &Path) -> Option<String> {
    use sqlx::ConnectOptions;
    if !db.exists() {
        return None;
    }
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .read_only(true)
        .connect()
        .await
        .ok()?;
    sqlx::query_scalar("SELECT installation_id FROM installation WHERE id = 1")
        .fetch_optional(&mut conn)
        .await
        .ok()?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_config_is_the_sample_with_the_data_dir_and_valid() {
        let text = config_for_install();
        assert!(text.contains("\ndata_dir = \"/var/lib/escale\""));
        let raw: crate::config::RawConfig = toml::from_str(&text).unwrap();
        let c = crate::config::Config::from_raw(raw, &|_| None).unwrap();
        assert_eq!(c.data_dir, Path::new("/var/lib/escale"));
    }

    #[test]
    fn the_unit_names_the_binary_and_is_hardened() {
        let u = unit_for("/usr/local/bin/escale");
        assert!(
            u.contains("ExecStart=/usr/local/bin/escale serve --config /etc/escale/escale.toml")
        );
        assert!(!u.contains("@BINARY@"));
        for line in [
            "Restart=on-failure",
            "Type=notify",
            "NotifyAccess=all",
            "ExecReload=/usr/local/bin/escale serve --config /etc/escale/escale.toml --reload",
            "WantedBy=multi-user.target",
            "User=escale",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/escale",
            "AmbientCapabilities=CAP_NET_BIND_SERVICE",
            "Environment=ESCALE_DATA_DIR=/var/lib/escale",
        ] {
            assert!(u.lines().any(|l| l == line), "the unit lacks `{line}`");
        }
    }
}

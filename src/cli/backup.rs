//! `escale backup ...`: `create` and `list` ask the server (admins only); `restore` and
//! `export-key` work offline on a data dir, on the host itself; `download` fetches a backup
//! from the bucket of `[backup.s3]` with the config alone (a new host, the old one dead).

use std::io::Write;
use std::path::{Path, PathBuf};

use http::Method;
use serde_json::Value;

use super::client::{CliError, Client};
use super::output::{ago, size, table};
use super::BackupCommand;
use crate::secrets::MasterKey;

pub(super) async fn run(
    api: impl FnOnce() -> Result<Client, CliError>,
    json_out: bool,
    cmd: BackupCommand,
) -> Result<(), CliError> {
    match cmd {
        BackupCommand::Create { to } => create(&api()?, json_out, to.as_deref()).await,
        BackupCommand::List => {
            let out: Value = api()?.call(Method::GET, "/api/v1/backups", None).await?;
            if json_out {
                println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                return Ok(());
            }
            let rows: Vec<Vec<String>> = out
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    vec![
                        b["name"].as_str().unwrap_or_default().to_string(),
                        size(b["size"].as_u64().unwrap_or(0)),
                        ago(b["created_at"].as_i64().unwrap_or(0)),
                        b["escale_version"].as_str().unwrap_or_default().to_string(),
                        b["location"].as_str().unwrap_or("local").to_string(),
                    ]
                })
                .collect();
            table(&["NAME", "SIZE", "CREATED", "ESCALE", "WHERE"], &rows);
            Ok(())
        }
        BackupCommand::Download {
            name,
            to,
            config,
            installation,
            list,
        } => download(json_out, name, &to, config, installation, list).await,
        BackupCommand::Restore {
            file,
            data_dir,
            config,
            key_file,
            force,
        } => restore(json_out, &file, data_dir, config, key_file, force).await,
        BackupCommand::ExportKey {
            config,
            data_dir,
            out,
        } => export_key(config, data_dir, out),
    }
}

async fn create(c: &Client, json_out: bool, to: Option<&Path>) -> Result<(), CliError> {
    if !json_out {
        eprintln!("taking an online backup on the server...");
    }
    let created: Value = c.call(Method::POST, "/api/v1/backups", None).await?;
    let name = created["name"].as_str().unwrap_or_default().to_string();
    let total = created["size"].as_u64().unwrap_or(0);
    if !json_out {
        eprintln!(
            "backup {name}: {} sealed ({} files, {} archived) in {:.1}s",
            size(total),
            created["files"],
            size(created["bytes"].as_u64().unwrap_or(0)),
            created["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0
        );
        for p in created["pruned"].as_array().into_iter().flatten() {
            eprintln!(
                "removed the older backup {} (backup.keep)",
                p.as_str().unwrap_or("")
            );
        }
        let up = &created["uploaded"];
        if let Some(url) = up["url"].as_str() {
            let secs = up["duration_ms"].as_f64().unwrap_or(0.0) / 1000.0;
            eprintln!(
                "uploaded to {url} ({}, {} part{}) in {secs:.1}s",
                size(up["size"].as_u64().unwrap_or(0)),
                up["parts"],
                if up["parts"].as_u64() == Some(1) {
                    ""
                } else {
                    "s"
                },
            );
        }
        for p in created["pruned_remote"].as_array().into_iter().flatten() {
            eprintln!(
                "removed the older backup {} from the bucket (backup.keep)",
                p.as_str().unwrap_or("")
            );
        }
    }
    let Some(dir) = to else {
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(&created).unwrap_or_default()
            );
        } else {
            println!("{name}");
        }
        return Ok(());
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", dir.display())))?;
    let dest = dir.join(&name);
    let partial = dir.join(format!(".{name}.partial"));
    let mut file = crate::secrets::create_private(&partial)
        .map_err(|e| CliError::Local(format!("cannot create {}: {e}", partial.display())))?;
    let mut got: u64 = 0;
    let mut last_shown = 0u64;
    let mut write_err = None;
    let path = format!("/api/v1/backups/{name}");
    let result = c
        .stream_raw(Method::GET, &path, |chunk| {
            if let Err(e) = file.write_all(chunk) {
                write_err = Some(e);
                return false;
            }
            got += chunk.len() as u64;
            if !json_out && (got - last_shown >= 8 << 20 || got == total) {
                last_shown = got;
                let pct = (got * 100).checked_div(total).unwrap_or(100);
                eprint!("\rdownloading: {} / {} ({pct}%)", size(got), size(total));
            }
            true
        })
        .await;
    if !json_out {
        eprintln!();
    }
    let done = result.and_then(|()| match write_err {
        Some(e) => Err(CliError::Local(format!(
            "cannot write {}: {e}",
            partial.display()
        ))),
        None if got != total => Err(CliError::Failed(format!(
            "the download stopped after {got} of {total} bytes"
        ))),
        None => file
            .sync_all()
            .and_then(|()| std::fs::rename(&partial, &dest))
            .map_err(|e| CliError::Local(format!("cannot write {}: {e}", dest.display()))),
    });
    if let Err(e) = done {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    if json_out {
        let mut v = created.clone();
        v["path"] = Value::String(dest.display().to_string());
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        println!("{}", dest.display());
    }
    Ok(())
}

/// `escale backup download`: the bucket of the config's `[backup.s3]`, no server.
async fn download(
    json_out: bool,
    name: Option<String>,
    to: &Path,
    config: Option<PathBuf>,
    installation: Option<String>,
    list: bool,
) -> Result<(), CliError> {
    let cfg = crate::config::Config::load(config.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    let Some(s3) = cfg.backup.s3 else {
        return Err(CliError::Usage(
            "no bucket is configured: set backup.s3.endpoint, region, bucket and access_key_id in \
             the config (--config FILE) or ESCALE_BACKUP_S3_* variables, and the secret in \
             ESCALE_BACKUP_S3_SECRET_ACCESS_KEY"
                .into(),
        ));
    };
    let failed = |e: crate::backup::s3::S3Error| CliError::Failed(e.to_string());
    let store = crate::backup::s3::Store::new(&s3).map_err(failed)?;
    let mut objects = store.list().await.map_err(failed)?;
    if let Some(inst) = &installation {
        objects.retain(|o| crate::backup::name_parts(&o.name).is_some_and(|(i, _, _)| i == inst));
    }
    // Newest first: by the time stamp in the name, then the number after it.
    objects.sort_by(|a, b| {
        let key = |n: &str| {
            crate::backup::name_parts(n)
                .map(|(_, s, k)| (s.to_string(), k))
                .unwrap_or_default()
        };
        key(&b.name).cmp(&key(&a.name))
    });
    if list {
        let mut infos = Vec::new();
        for o in &objects {
            match crate::backup::remote_info(&store, o).await {
                Ok(i) => infos.push(i),
                Err(e) => eprintln!("{}: left out: {e}", o.name),
            }
        }
        if json_out {
            println!(
                "{}",
                serde_json::to_string_pretty(&infos).unwrap_or_default()
            );
        } else {
            let rows: Vec<Vec<String>> = infos
                .iter()
                .map(|b| {
                    vec![
                        b.name.clone(),
                        size(b.size),
                        ago(b.created_at),
                        b.installation_id.clone(),
                        b.escale_version.clone(),
                    ]
                })
                .collect();
            table(
                &["NAME", "SIZE", "CREATED", "INSTALLATION", "ESCALE"],
                &rows,
            );
        }
        return Ok(());
    }
    let name = name.unwrap_or_default();
    let name = if name == "latest" {
        objects.first().map(|o| o.name.clone()).ok_or_else(|| {
            CliError::Failed(format!(
                "no backup in {}{}",
                s3.location(),
                installation
                    .as_deref()
                    .map(|i| format!(" of installation `{i}`"))
                    .unwrap_or_default()
            ))
        })?
    } else if crate::backup::is_backup_name(&name) {
        name
    } else {
        return Err(CliError::Usage(format!(
            "`{}` is not a backup name (escale-<installation>-<time>.backup) nor `latest`",
            crate::validate::printable(&name)
        )));
    };
    if !json_out {
        eprintln!("downloading {}...", store.url_of(&name));
    }
    let mut last_shown = 0u64;
    let path = store
        .download(&name, to, |got, total| {
            if !json_out && (got - last_shown >= 8 << 20 || got == total) {
                last_shown = got;
                let pct = (got * 100).checked_div(total).unwrap_or(100);
                eprint!("\rdownloading: {} / {} ({pct}%)", size(got), size(total));
            }
        })
        .await
        .map_err(failed)?;
    if !json_out {
        eprintln!();
    }
    // What was fetched is a backup (its header reads; its contents open only with the key).
    let info = crate::backup::info_of(&path).map_err(|e| {
        let _ = std::fs::remove_file(&path);
        CliError::Failed(format!("{}: {e}", store.url_of(&name)))
    })?;
    if json_out {
        let mut v = serde_json::to_value(&info).unwrap_or_default();
        v["path"] = Value::String(path.display().to_string());
        v["url"] = Value::String(store.url_of(&name));
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        eprintln!(
            "backup of installation {} ({}), made by escale {}; restore it with `escale backup restore {} --key-file FILE`",
            info.installation_id,
            size(info.size),
            info.escale_version,
            path.display()
        );
        println!("{}", path.display());
    }
    Ok(())
}

/// The data dir: `--data-dir`, else the config's (`--config`, the default paths, the
/// environment).
fn data_dir_of(config: Option<PathBuf>, data_dir: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(d) = data_dir {
        return Ok(d);
    }
    let cfg = crate::config::Config::load(config.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    Ok(cfg.data_dir)
}

async fn restore(
    json_out: bool,
    file: &Path,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
    key_file: Option<PathBuf>,
    force: bool,
) -> Result<(), CliError> {
    let data_dir = data_dir_of(config, data_dir)?;
    let key =
        match (key_file, std::env::var("ESCALE_MASTER_KEY").ok()) {
            (Some(p), _) => {
                let text = std::fs::read_to_string(&p).map_err(|e| {
                    CliError::Local(format!("cannot read the key file {}: {e}", p.display()))
                })?;
                MasterKey::parse(&text, &format!("in {}", p.display()))
            }
            (None, Some(k)) => MasterKey::parse(&k, "in ESCALE_MASTER_KEY"),
            (None, None) => return Err(CliError::Usage(
                "a restore needs the master key the backup was sealed with: pass --key-file FILE \
                 (written by `escale backup export-key`) or set ESCALE_MASTER_KEY"
                    .into(),
            )),
        }
        .map_err(|e| CliError::Local(e.to_string()))?;
    if !json_out {
        eprintln!(
            "restoring {} into {}...",
            file.display(),
            data_dir.display()
        );
    }
    let r = crate::backup::restore(file, &key, &data_dir, force)
        .await
        .map_err(|e| CliError::Failed(e.to_string()))?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        println!(
            "restored installation {} as of {}: {} apps, {} releases, {} domains, {} certificates, {} nodes, {} users, {} git repositories ({} files, {}); registry integrity check ok.\n\
             Start `escale serve` on {} with the same installation_id: the reconciler adopts the running containers or starts them again.",
            r.installation_id,
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.created_at.max(0) as u64)
            ),
            r.apps,
            r.releases,
            r.domains,
            r.certificates,
            r.nodes,
            r.users,
            r.repositories,
            r.files,
            size(r.bytes),
            data_dir.display()
        );
    }
    Ok(())
}

fn export_key(
    config: Option<PathBuf>,
    data_dir: Option<PathBuf>,
    out: Option<PathBuf>,
) -> Result<(), CliError> {
    let data_dir = data_dir_of(config, data_dir)?;
    let env_key = std::env::var("ESCALE_MASTER_KEY").ok();
    let key = MasterKey::load_existing(&data_dir, env_key.as_deref())
        .map_err(|e| CliError::Local(e.to_string()))?;
    match out {
        Some(p) => {
            let mut f = crate::secrets::create_private(&p).map_err(|e| {
                CliError::Local(format!(
                    "cannot create {} (0600, it must not exist yet): {e}",
                    p.display()
                ))
            })?;
            f.write_all(format!("{}\n", key.to_hex()).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| CliError::Local(format!("cannot write {}: {e}", p.display())))?;
            eprintln!(
                "master key written to {} (0600). Keep it apart from the backups: whoever has both reads every secret.",
                p.display()
            );
        }
        None => {
            eprintln!("the master key (keep it apart from the backups: whoever has both reads every secret):");
            println!("{}", key.to_hex());
        }
    }
    Ok(())
}

//! Backups to an S3-compatible bucket (`[backup.s3]`), against moto's server with signature
//! checking on (`support::s3`): each `escale backup create` is uploaded under the prefix, the
//! retention (`backup.keep`) removes this installation's old objects from the bucket too,
//! `backup list` says where each backup is, the object holds no canary in clear; then the host
//! "dies" and a new one fetches the newest backup with `escale backup download latest` (the
//! config alone, no server) and restores it: the apps are back. A wrong secret and a missing
//! bucket are named; a refused upload fails the backup call and keeps the local file; a large
//! file goes up in parts and comes back identical.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;
use sha2::Digest;

use crate::support::s3::{Keys, Moto, TlsFront};
use crate::support::server::{read_only_registry, TestServer, ESCALE};

/// The CLI without a server (a new host): only `env`, run in an empty directory (no config
/// file found by default).
fn offline(cwd: &std::path::Path, env: &[(String, String)], args: &[&str]) -> Output {
    let mut cmd = Command::new(ESCALE);
    cmd.args(args)
        .current_dir(cwd)
        .env("HOME", cwd)
        .env_remove("ESCALE_URL")
        .env_remove("ESCALE_TOKEN")
        .env_remove("ESCALE_MASTER_KEY")
        .env_remove("ESCALE_DATA_DIR");
    for (k, _) in std::env::vars() {
        if k.starts_with("ESCALE_BACKUP_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("escale runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

async fn metrics(s: &TestServer) -> String {
    s.api_get("/metrics").await
}

/// `escale backup create --json`, once the scheduled backup (if one runs) let it.
async fn create(s: &TestServer) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = s.cli(&["backup", "create", "--json"]);
        if out.status.success() {
            return serde_json::from_slice(&out.stdout).expect("JSON");
        }
        let err = stderr(&out);
        assert!(
            err.contains("already running") && std::time::Instant::now() < deadline,
            "backup create failed: {err}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[tokio::test]
async fn backups_go_to_the_bucket_with_retention_and_come_back_on_a_new_host() {
    let moto = Moto::start();
    let bucket = "escale-drill";
    let keys = moto.setup(bucket);
    let prefix = "drill/eu/";
    let s3_env = moto.env(bucket, &keys, "/drill/eu");
    let mut env = env_refs(&s3_env);
    env.push(("ESCALE_BACKUP_KEEP", "2"));
    // The first scheduled backup is taken at start (none of this installation yet).
    env.push(("ESCALE_BACKUP_INTERVAL", "24h"));
    let mut s = TestServer::start(&env).await;
    let work = tempfile::tempdir().unwrap();
    let scheduled = s
        .wait_for(
            "the scheduled backup in the bucket",
            Duration::from_secs(60),
            || {
                let (objects, _) = moto.list(bucket, &keys, prefix);
                objects
                    .first()
                    .map(|(k, _)| k.trim_start_matches(prefix).to_string())
            },
        )
        .await;
    let mut names: Vec<String> = vec![scheduled];

    s.ok(&["apps", "create", "shop"]);
    s.ok(&["apps", "create", "blog"]);
    let canary = format!("canary-s3-{}", hex::encode(rand::random::<[u8; 8]>()));
    s.ok(&[
        "config",
        "set",
        "shop",
        &format!("CANARY={canary}"),
        "--secret",
    ]);

    // Three backups through the API (CLI --json), then one with the human output.
    for _ in 0..3 {
        let c = create(&s).await;
        let name = c["name"].as_str().unwrap().to_string();
        assert_eq!(c["location"], "both", "{c}");
        assert_eq!(
            c["uploaded"]["url"].as_str(),
            Some(format!("s3://{bucket}/{prefix}{name}").as_str()),
            "{c}"
        );
        assert_eq!(c["uploaded"]["size"], c["size"], "{c}");
        assert_eq!(c["uploaded"]["parts"], 1, "a small backup is one PUT: {c}");
        // keep = 2: the one before the previous one leaves the bucket.
        let gone: Vec<&String> = names.iter().rev().skip(1).take(1).collect();
        assert_eq!(c["pruned_remote"], serde_json::json!(gone), "{c}");
        eprintln!(
            "backup to s3: {} bytes sealed, upload {} ms, whole call {} ms",
            c["size"], c["uploaded"]["duration_ms"], c["duration_ms"]
        );
        names.push(name);
    }
    let out = s.cli(&["backup", "create"]);
    let said = stderr(&out);
    assert!(out.status.success(), "{said}");
    let fourth = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        said.contains(&format!("uploaded to s3://{bucket}/{prefix}{fourth}"))
            && said.contains(&format!(
                "removed the older backup {} from the bucket",
                names[names.len() - 2]
            )),
        "{said}"
    );
    names.push(fourth);
    // The two the bucket keeps: the older, the newest.
    let (older, newest) = (
        names[names.len() - 2].clone(),
        names[names.len() - 1].clone(),
    );

    // In the bucket, as an independent client sees it: the newest two, whole.
    let local_dir = s.dir.path().join("data/backups");
    let (objects, unfinished) = moto.list(bucket, &keys, prefix);
    let want: Vec<(String, u64)> = [&older, &newest]
        .into_iter()
        .map(|n| {
            (
                format!("{prefix}{n}"),
                std::fs::metadata(local_dir.join(n)).unwrap().len(),
            )
        })
        .collect();
    assert_eq!(objects, want, "keep = 2 in the bucket too");
    assert_eq!(unfinished, 0);

    // `backup list`: both copies; a backup whose local file is gone is in the bucket only.
    let listed = s.json(&["backup", "list"]);
    let location = |listed: &Value, n: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["name"] == n)
            .map(|b| b["location"].as_str().unwrap().to_string())
    };
    assert_eq!(
        location(&listed, &older).as_deref(),
        Some("both"),
        "{listed}"
    );
    assert_eq!(
        location(&listed, &newest).as_deref(),
        Some("both"),
        "{listed}"
    );
    std::fs::remove_file(local_dir.join(&older)).unwrap();
    let listed = s.json(&["backup", "list"]);
    assert_eq!(location(&listed, &older).as_deref(), Some("s3"), "{listed}");
    let remote_only = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == older.as_str())
        .unwrap();
    assert_eq!(remote_only["installation_id"], s.installation.as_str());
    assert_eq!(remote_only["size"], want[0].1);
    let table = s.ok(&["backup", "list"]);
    assert!(
        table.contains("WHERE") && table.contains("both") && table.contains("s3"),
        "{table}"
    );

    // /metrics: the last upload's time.
    let m = metrics(&s).await;
    assert!(
        metric(&m, "escale_backup_upload_last_success_timestamp_seconds ") > 0.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "escale_backups_total{outcome=\"success\"} "),
        5.0
    );
    assert_eq!(
        metric(&m, "escale_backup_uploads_total{outcome=\"success\"} "),
        5.0
    );
    assert_eq!(
        metric(&m, "escale_backup_uploads_total{outcome=\"failure\"} "),
        0.0
    );

    // The object is sealed: no canary in clear, nor the apps' names.
    let fetched = work.path().join("fetched.backup");
    moto.get(bucket, &keys, &format!("{prefix}{}", newest), &fetched);
    let bytes = std::fs::read(&fetched).unwrap();
    for c in [canary.as_str(), "shop", "blog", "CANARY"] {
        assert!(
            !bytes.windows(c.len()).any(|w| w == c.as_bytes()),
            "`{c}` is readable in the object"
        );
    }

    // The host dies: its master key was exported apart, its data dir is gone.
    let data = s.dir.path().join("data");
    let key_file = work.path().join("master.key");
    let out = offline(
        work.path(),
        &[],
        &[
            "backup",
            "export-key",
            "--data-dir",
            data.to_str().unwrap(),
            "--out",
            key_file.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    s.kill9();
    std::fs::rename(&data, s.dir.path().join("dead")).unwrap();

    // A new host, the same [backup.s3] settings (the environment here), no server.
    let host = tempfile::tempdir().unwrap();
    let out = offline(
        host.path(),
        &s3_env,
        &["backup", "download", "--list", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let remote: Value = serde_json::from_slice(&out.stdout).unwrap();
    let remote_names: Vec<&str> = remote
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        remote_names,
        vec![newest.as_str(), older.as_str()],
        "{remote}"
    );
    let out = offline(
        host.path(),
        &s3_env,
        &["backup", "download", "latest", "--to", "incoming", "--json"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["name"], newest.as_str(), "{got}");
    let file = std::path::PathBuf::from(got["path"].as_str().unwrap());
    let file = if file.is_absolute() {
        file
    } else {
        host.path().join(file)
    };
    assert_eq!(
        std::fs::read(&file).unwrap(),
        bytes,
        "the download is the object"
    );

    let new_data = host.path().join("data");
    let out = offline(
        host.path(),
        &[],
        &[
            "backup",
            "restore",
            file.to_str().unwrap(),
            "--key-file",
            key_file.to_str().unwrap(),
            "--data-dir",
            new_data.to_str().unwrap(),
        ],
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("2 apps"),
        "{said}{}",
        stderr(&out)
    );
    let mut conn = read_only_registry(&new_data.join("escale.db")).await;
    let apps: Vec<String> = sqlx::query_scalar("SELECT name FROM apps ORDER BY name")
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(apps, vec!["blog".to_string(), "shop".to_string()]);
    let installation: String = sqlx::query_scalar("SELECT installation_id FROM installation")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(installation, s.installation);

    // A wrong secret, and a bucket that does not exist: named, with what to fix.
    let mut wrong = s3_env.clone();
    for (k, v) in wrong.iter_mut() {
        if k == "ESCALE_BACKUP_S3_SECRET_ACCESS_KEY" {
            *v = "not-the-secret".into();
        }
    }
    let out = offline(
        host.path(),
        &wrong,
        &["backup", "download", "latest", "--to", "x"],
    );
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains("the store refused the credentials (403 SignatureDoesNotMatch)")
            && err.contains("secret access key"),
        "{err}"
    );
    assert!(!host.path().join("x").join(&newest).exists());
    // `escale doctor` says it too, on the host, before any backup.
    let out = offline(host.path(), &wrong, &["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor --json: {e}: {}", stderr(&out)));
    let check = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "backups: bucket")
        .unwrap_or_else(|| panic!("no bucket check: {report}"))
        .clone();
    assert_eq!(check["status"], "fail", "{check}");
    assert!(
        check["detail"]
            .as_str()
            .unwrap()
            .contains("the store refused the credentials"),
        "{check}"
    );
    let out = offline(host.path(), &s3_env, &["doctor", "--json"]);
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        report["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["check"] == "backups: bucket" && c["status"] == "ok"),
        "{report}"
    );
    let mut missing = s3_env.clone();
    for (k, v) in missing.iter_mut() {
        if k == "ESCALE_BACKUP_S3_BUCKET" {
            *v = "escale-nowhere".into();
        }
    }
    let out = offline(host.path(), &missing, &["backup", "download", "--list"]);
    let err = stderr(&out);
    assert!(
        !out.status.success() && err.contains("the bucket `escale-nowhere` does not exist"),
        "{err}"
    );
    // No bucket configured at all: said too.
    let out = offline(host.path(), &[], &["backup", "download", "latest"]);
    assert!(
        !out.status.success() && stderr(&out).contains("no bucket is configured"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_refused_upload_fails_the_backup_call_and_keeps_the_local_file() {
    let moto = Moto::start();
    let bucket = "escale-refused";
    let keys = moto.setup(bucket);
    let wrong = Keys {
        secret_access_key: "not-the-secret".into(),
        ..keys.clone()
    };
    let s3_env = moto.env(bucket, &wrong, "");
    let s = TestServer::start(&env_refs(&s3_env)).await;
    // Said at start, before any backup.
    s.wait_for(
        "the start-up check of the bucket",
        Duration::from_secs(30),
        || {
            s.server_log()
                .contains("the store refused the credentials")
                .then_some(())
        },
    )
    .await;

    let out = s.cli(&["backup", "create"]);
    let err = stderr(&out);
    assert!(
        !out.status.success()
            && err.contains(
                "was written to the backup dir, but its upload to s3://escale-refused/ failed"
            )
            && err.contains("the store refused the credentials (403 SignatureDoesNotMatch)"),
        "{err}"
    );
    let local: Vec<String> = std::fs::read_dir(s.dir.path().join("data/backups"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".backup"))
        .collect();
    assert_eq!(local.len(), 1, "the local file stays: {local:?}");
    assert!(
        err.contains(&local[0]),
        "the message names the backup: {err}"
    );
    let (objects, _) = moto.list(bucket, &keys, "");
    assert!(objects.is_empty(), "{objects:?}");
    let m = metrics(&s).await;
    assert_eq!(
        metric(&m, "escale_backup_uploads_total{outcome=\"failure\"} "),
        1.0
    );
    assert!(metric(&m, "escale_backup_upload_last_failure_timestamp_seconds ") > 0.0);
    assert_eq!(
        metric(&m, "escale_backup_upload_last_success_timestamp_seconds "),
        0.0
    );
    // The API says 503 with the reason, as problem+json (the CLI's --json error).
    let out = s.cli(&["backup", "create", "--json"]);
    let err: Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|e| panic!("--json error is JSON ({e}): {}", stderr(&out)));
    assert!(!out.status.success());
    assert_eq!(err["status"], 503, "{err}");
    assert!(err.to_string().contains("SignatureDoesNotMatch"), "{err}");
    // Listing cannot show the bucket's copies: said, not silently left out.
    let out = s.cli(&["backup", "list"]);
    assert!(
        !out.status.success() && stderr(&out).contains("the store refused the credentials"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_large_backup_goes_up_in_parts_and_comes_back_identical() {
    let moto = Moto::start();
    let bucket = "escale-large";
    let keys = moto.setup(bucket);
    let settings = escale::config::S3Settings {
        endpoint: moto.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: "big/".into(),
        access_key_id: keys.access_key_id.clone(),
        secret_access_key: escale::config::SecretString(keys.secret_access_key.clone()),
        ca_file: None,
    };
    let store = escale::backup::s3::Store::new(&settings).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let name = "escale-big-20261201T031003123Z.backup";
    let path = dir.path().join(name);
    // 40 MiB + a bit: 3 parts (16 + 16 + 8 MiB and the rest).
    let size = (40 << 20) + 12345;
    let mut data = vec![0u8; size];
    for (i, chunk) in data.chunks_mut(32).enumerate() {
        let h = sha2::Sha256::digest((i as u64).to_le_bytes());
        chunk.copy_from_slice(&h[..chunk.len()]);
    }
    std::fs::write(&path, &data).unwrap();
    let t = std::time::Instant::now();
    let up = store.upload(&path, name).await.expect("multipart upload");
    let took = t.elapsed();
    assert_eq!(up.parts, 3, "{up:?}");
    assert_eq!(up.size, size as u64);
    assert_eq!(up.url, format!("s3://{bucket}/big/{name}"));
    eprintln!(
        "multipart upload to moto: {} bytes in {} parts, {:.2} s ({:.1} MiB/s)",
        size,
        up.parts,
        took.as_secs_f64(),
        size as f64 / (1 << 20) as f64 / took.as_secs_f64()
    );
    let (objects, unfinished) = moto.list(bucket, &keys, "big/");
    assert_eq!(objects, vec![(format!("big/{name}"), size as u64)]);
    assert_eq!(unfinished, 0, "the multipart upload was completed");
    let listed = store.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].size, size as u64);

    let back = tempfile::tempdir().unwrap();
    let t = std::time::Instant::now();
    let got = store.download(name, back.path(), |_, _| {}).await.unwrap();
    eprintln!("download from moto: {:.2} s", t.elapsed().as_secs_f64());
    assert_eq!(
        sha2::Sha256::digest(std::fs::read(&got).unwrap()),
        sha2::Sha256::digest(&data),
        "the same bytes came back"
    );
    store.delete(name).await.unwrap();
    assert!(store.list().await.unwrap().is_empty());
    let e = store
        .download(name, back.path(), |_, _| {})
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no object `big/"), "{e}");
}

#[tokio::test]
async fn an_https_store_behind_a_private_ca_needs_its_ca_file() {
    let moto = Moto::start();
    let bucket = "escale-tls";
    let keys = moto.setup(bucket);
    let front = TlsFront::start(&moto.endpoint).await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings = escale::config::S3Settings {
        endpoint: front.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: String::new(),
        access_key_id: keys.access_key_id.clone(),
        secret_access_key: escale::config::SecretString(keys.secret_access_key.clone()),
        ca_file: None,
    };
    // The system's roots do not know this CA: refused, naming the setting.
    let e = escale::backup::s3::Store::new(&settings)
        .unwrap()
        .check()
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("TLS with the object store at https://localhost:")
            && e.to_string().contains("backup.s3.ca_file"),
        "{e}"
    );
    // With the CA in ca_file (checked by the config as ESCALE_BACKUP_S3_CA_FILE): a backup
    // goes up and is listed over TLS.
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &front.ca_pem).unwrap();
    let raw: escale::config::RawConfig = Default::default();
    let env: Vec<(String, String)> = moto
        .env(bucket, &keys, "")
        .into_iter()
        .map(|(k, v)| match k.as_str() {
            "ESCALE_BACKUP_S3_ENDPOINT" => (k, front.endpoint.clone()),
            _ => (k, v),
        })
        .chain([(
            "ESCALE_BACKUP_S3_CA_FILE".to_string(),
            ca.display().to_string(),
        )])
        .collect();
    let config = escale::config::Config::from_raw(raw, &|k| {
        env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    })
    .expect("the settings are valid");
    settings = config.backup.s3.expect("[backup.s3] is on");
    assert_eq!(settings.ca_file.as_deref(), Some(ca.as_path()));
    let store = escale::backup::s3::Store::new(&settings).unwrap();
    store.check().await.expect("the bucket answers over TLS");
    let name = "escale-tls-20261201T031003123Z.backup";
    std::fs::write(dir.path().join(name), b"sealed bytes").unwrap();
    let up = store.upload(&dir.path().join(name), name).await.unwrap();
    assert_eq!((up.size, up.parts), (12, 1));
    let (objects, _) = moto.list(bucket, &keys, "");
    assert_eq!(objects, vec![(name.to_string(), 12)]);
}

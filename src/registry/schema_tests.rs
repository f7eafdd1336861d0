//! Migrations are forward-only and tested from every schema version released so far: for
//! each version N, a database is built migration by migration up to N, each step followed by
//! the data that version could hold ([`FIXTURES`]), then opened by this escale (which migrates
//! it to the latest); every row written at every step must still be there and readable through
//! the registry. A database newer than this escale is refused with a message.

use sqlx::Executor;

use super::*;

/// `(version, SQL)` inserted right after migration `version` ran; one per migration. Secret
/// values are sealed at run time (`{SEALED_DB}` and the like).
const FIXTURES: &[(i64, &str)] = &[
    (
        1,
        "INSERT INTO installation VALUES (1, 'inst-old', 0);
         INSERT INTO teams VALUES (1, 'default', 0);
         INSERT INTO users VALUES (1, 'admin', 'x', 'admin', 1, 0);
         INSERT INTO api_tokens VALUES (1, 1, 'cli', 'esc_ab', 'hash1', 0, NULL);
         INSERT INTO apps (id, name, team_id, target_release, created_at) VALUES (1, 'shop', 1, 1, 0);
         INSERT INTO process_types (app_id, name, command, port, instances) VALUES (1, 'web', '[\"/app\"]', 8080, 2);
         INSERT INTO config_vars VALUES (1, 'PLAIN', 'hello', 0);
         INSERT INTO config_vars VALUES (1, 'DB', '{SEALED_DB}', 1);
         INSERT INTO releases (app_id, version, image, config, source, description, created_by, created_at, status)
             VALUES (1, 1, 'shop:1', '[]', 'image', 'first', 'admin', 0, 'active');
         INSERT INTO domains VALUES ('shop.example.eu', 1, 0);
         INSERT INTO nodes (name, docker_host, advertise, created_at) VALUES ('n1', 'tcp://10.0.0.2:2376', '10.0.0.2', 0);
         INSERT INTO certificates VALUES ('shop.example.eu', 'PEM', 'sealed', 'issuer', 123, 'manual', NULL, 0);
         INSERT INTO events (at, actor, app, action, detail) VALUES (0, 'admin', 'shop', 'app.create', '');",
    ),
    (
        2,
        "INSERT INTO webhooks VALUES (1, 'https://git.example.eu/shop.git', 'main', 'sealed', 'admin', 0);
         INSERT INTO webhook_deliveries VALUES (1, 'd1', 0);",
    ),
    (
        3,
        "INSERT INTO acme_accounts VALUES ('https://acme.example/dir', 'https://acme.example/acct/1', 'sealed', 0, 0);",
    ),
    (
        4,
        "INSERT INTO apps (id, name, team_id, target_release, created_at, uid) VALUES (2, 'blog', 1, NULL, 0, 'uid-blog');",
    ),
    (
        5,
        "INSERT INTO cluster_ca VALUES (1, 'escale inst-old', 'PEM', 'sealed', 999, 0);
         INSERT INTO cluster_client_cert VALUES (1, 'PEM', 'sealed', '01', 999, 0);
         INSERT INTO cluster_node_certs VALUES ('n1', '10.0.0.2:2376', '02', 'PEM', 999, 0);",
    ),
    (
        6,
        "INSERT INTO nodes (name, docker_host, advertise, created_at, labels, cordoned, draining)
             VALUES ('n2', 'tcp://10.0.0.3:2376', '10.0.0.3', 0, '{\"disk\":\"ssd\"}', 1, 0);",
    ),
    (
        7,
        "INSERT INTO process_types (app_id, name, port, instances, constraints, overcommit)
             VALUES (2, 'web', 8080, 1, '{\"disk\":\"ssd\"}', 1);",
    ),
    (
        8,
        "INSERT INTO web_sessions (hash, user_id, created_at, expires_at) VALUES ('sess1', 1, 5, 9);",
    ),
    (
        9,
        "INSERT INTO apps (id, name, team_id, target_release, created_at, uid) VALUES (3, 'news', 1, NULL, 0, 'uid-news');",
    ),
];

/// What must hold after migrating, for the data of fixture `version`: `(SQL, expected)`.
fn checks(version: i64) -> Vec<(&'static str, &'static str)> {
    match version {
        1 => vec![
            ("SELECT installation_id FROM installation", "inst-old"),
            ("SELECT name FROM users", "admin"),
            ("SELECT hash FROM api_tokens", "hash1"),
            ("SELECT name FROM apps WHERE id = 1", "shop"),
            ("SELECT length(uid) > 0 FROM apps WHERE id = 1", "1"),
            (
                "SELECT command FROM process_types WHERE app_id = 1",
                "[\"/app\"]",
            ),
            ("SELECT value FROM config_vars WHERE key = 'PLAIN'", "hello"),
            (
                "SELECT image || ' ' || status FROM releases",
                "shop:1 active",
            ),
            ("SELECT domain FROM domains", "shop.example.eu"),
            (
                "SELECT docker_host FROM nodes WHERE name = 'n1'",
                "tcp://10.0.0.2:2376",
            ),
            (
                "SELECT labels || cordoned FROM nodes WHERE name = 'n1'",
                "{}0",
            ),
            ("SELECT not_after FROM certificates", "123"),
            ("SELECT action FROM events", "app.create"),
        ],
        2 => vec![
            (
                "SELECT repo_url FROM webhooks",
                "https://git.example.eu/shop.git",
            ),
            ("SELECT delivery_id FROM webhook_deliveries", "d1"),
        ],
        3 => vec![(
            "SELECT account_url FROM acme_accounts",
            "https://acme.example/acct/1",
        )],
        4 => vec![("SELECT uid FROM apps WHERE name = 'blog'", "uid-blog")],
        5 => vec![
            ("SELECT common_name FROM cluster_ca", "escale inst-old"),
            ("SELECT serial FROM cluster_client_cert", "01"),
            ("SELECT serial FROM cluster_node_certs", "02"),
        ],
        6 => vec![(
            "SELECT labels || cordoned FROM nodes WHERE name = 'n2'",
            "{\"disk\":\"ssd\"}1",
        )],
        7 => vec![(
            "SELECT constraints || overcommit FROM process_types WHERE app_id = 2",
            "{\"disk\":\"ssd\"}1",
        )],
        8 => vec![(
            "SELECT hash || ' ' || user_id || ' ' || expires_at FROM web_sessions",
            "sess1 1 9",
        )],
        9 => vec![
            ("SELECT uid FROM apps WHERE name = 'news'", "uid-news"),
            // The fixture's insert moved the app list's version.
            ("SELECT version > 0 FROM app_list_version", "1"),
        ],
        _ => vec![],
    }
}

#[test]
fn every_migration_has_its_fixture() {
    let versions: Vec<i64> = migrations().iter().map(|m| m.version).collect();
    let fixtures: Vec<i64> = FIXTURES.iter().map(|(v, _)| *v).collect();
    assert_eq!(
        versions, fixtures,
        "a new migration needs a fixture (data a database at that version holds) and checks"
    );
    for v in versions {
        assert!(!checks(v).is_empty(), "migration {v} has no checks");
    }
}

async fn build_at(path: &Path, key: &MasterKey, n: i64) {
    let opts = SqliteConnectOptions::from_str("sqlite:")
        .unwrap()
        .filename(path)
        .create_if_missing(true)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .unwrap();
    for (v, sql) in FIXTURES.iter().filter(|(v, _)| *v <= n) {
        MIGRATOR.run_to(*v, &pool).await.unwrap();
        let sql = sql.replace(
            "{SEALED_DB}",
            &key.seal(&config_place("shop", "DB"), b"postgres://secret"),
        );
        pool.execute(sqlx::AssertSqlSafe(sql))
            .await
            .unwrap_or_else(|e| panic!("fixture {v}: {e}"));
    }
    pool.close().await;
}

#[tokio::test]
async fn a_database_from_every_earlier_version_migrates_with_its_data() {
    for n in 1..=schema_version() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("escale.db");
        let key = MasterKey::random();
        build_at(&path, &key, n).await;
        let reg = Registry::open(&path, key)
            .await
            .unwrap_or_else(|e| panic!("a database at version {n} does not open: {e}"));
        assert_eq!(reg.installation_id(), "inst-old", "from version {n}");
        let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
            .fetch_one(reg.pool())
            .await
            .unwrap();
        assert_eq!(newest, schema_version(), "from version {n}");
        for v in 1..=n {
            for (sql, want) in checks(v) {
                let got: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "SELECT CAST(({sql}) AS TEXT)"
                )))
                .fetch_one(reg.pool())
                .await
                .unwrap_or_else(|e| panic!("from version {n}, `{sql}`: {e}"));
                assert_eq!(got, want, "from version {n}, `{sql}`");
            }
        }
        // Readable through the registry, the secret opened with the same key.
        let admin = Actor {
            user_id: 1,
            name: "admin".into(),
            role: Role::Admin,
            team_id: 1,
            team: "default".into(),
        };
        let vars = reg.config(&admin, "shop", true).await.unwrap();
        let db = vars.iter().find(|v| v.key == "DB").expect("DB survives");
        assert_eq!(
            db.value.as_deref(),
            Some("postgres://secret"),
            "from version {n}"
        );
        let nodes = reg.nodes().await.unwrap();
        assert_eq!(nodes.len(), if n >= 6 { 2 } else { 1 }, "from version {n}");
        let check: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(reg.pool())
            .await
            .unwrap();
        assert_eq!(check, "ok");
    }
}

#[tokio::test]
async fn a_database_newer_than_this_escale_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("escale.db");
    let key = MasterKey::random();
    drop(Registry::open(&path, key.clone()).await.unwrap());
    {
        let reg = Registry::open(&path, key.clone()).await.unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, installed_on, success, checksum, execution_time)
             VALUES (?, 'from the future', CURRENT_TIMESTAMP, 1, x'00', 0)",
        )
        .bind(schema_version() + 2)
        .execute(reg.pool())
        .await
        .unwrap();
    }
    let err = Registry::open(&path, key).await.unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, RegistryError::TooNew { .. }), "{msg}");
    assert!(
        msg.contains(&format!("schema version {}", schema_version() + 2))
            && msg.contains("newer escale")
            && msg.contains("never migrates backwards"),
        "{msg}"
    );
}

//! Upgrades: an escale older than its database refuses to start, saying why.

use std::process::Command;

use crate::support::server::ESCALE;

#[tokio::test]
async fn an_escale_older_than_its_database_refuses_to_start() {
    use sqlx::ConnectOptions;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(data.join("escale.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "CREATE TABLE _sqlx_migrations (version BIGINT PRIMARY KEY, description TEXT NOT NULL,
             installed_on TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, success BOOLEAN NOT NULL,
             checksum BLOB NOT NULL, execution_time BIGINT NOT NULL)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (99990101, 'from a newer escale', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let out = Command::new(ESCALE)
        .arg("serve")
        .env("ESCALE_DATA_DIR", &data)
        .env("ESCALE_API_ADDR", "127.0.0.1:0")
        .env("ESCALE_HTTP_ADDR", "off")
        .env("ESCALE_HTTPS_ADDR", "off")
        .env("ESCALE_DOCKER_HOST", "off")
        .env("ESCALE_ACME_DIRECTORY_URL", "off")
        .env_remove("ESCALE_MASTER_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "it started: {err}");
    assert!(
        err.contains("schema version 99990101") && err.contains("newer escale"),
        "{err}"
    );
}

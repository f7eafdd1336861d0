-- The registry: desired state of the whole installation.
-- Timestamps are unix milliseconds (INTEGER). Secret values are sealed (AES-256-GCM) by the application.

CREATE TABLE installation (
    id              INTEGER PRIMARY KEY CHECK (id = 1),
    installation_id TEXT NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE teams (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);

CREATE TABLE users (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    password_hash TEXT,
    role          TEXT NOT NULL CHECK (role IN ('admin', 'member')),
    team_id       INTEGER NOT NULL REFERENCES teams(id),
    created_at    INTEGER NOT NULL
);

CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    user_id      INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    prefix       TEXT NOT NULL,
    hash         TEXT NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    UNIQUE (user_id, name)
);

-- One-time token that binds the first admin. Only its hash is kept.
CREATE TABLE setup_tokens (
    hash       TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL,
    used_at    INTEGER
);

CREATE TABLE apps (
    id              INTEGER PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    team_id         INTEGER NOT NULL REFERENCES teams(id),
    -- the release the scheduler converges to (NULL until the first deploy)
    target_release  INTEGER,
    created_at      INTEGER NOT NULL
);

CREATE TABLE process_types (
    app_id             INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    name               TEXT NOT NULL,
    command            TEXT,              -- JSON array of argv, NULL = image default
    port               INTEGER NOT NULL,
    instances          INTEGER NOT NULL,
    memory_bytes       INTEGER,
    nano_cpus          INTEGER,
    surge              INTEGER NOT NULL DEFAULT 1,
    health_kind        TEXT NOT NULL DEFAULT 'http' CHECK (health_kind IN ('http', 'tcp', 'none')),
    health_path        TEXT NOT NULL DEFAULT '/',
    health_interval_ms INTEGER NOT NULL DEFAULT 5000,
    health_timeout_ms  INTEGER NOT NULL DEFAULT 2000,
    health_grace_ms    INTEGER NOT NULL DEFAULT 30000,
    PRIMARY KEY (app_id, name)
);

CREATE TABLE config_vars (
    app_id INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    key    TEXT NOT NULL,
    value  TEXT NOT NULL,                  -- sealed when secret = 1
    secret INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, key)
);

-- Releases are immutable once created, but for their status.
CREATE TABLE releases (
    app_id        INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    version       INTEGER NOT NULL,
    image         TEXT NOT NULL,
    config        TEXT NOT NULL,           -- JSON [{key, value, secret}], secret values sealed
    source        TEXT NOT NULL,           -- e.g. "image", "config", "rollback v3", "git 1a2b3c"
    description   TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'deploying', 'active', 'failed', 'superseded')),
    status_reason TEXT,
    deadline_ms   INTEGER,                 -- rollout deadline while deploying
    build_log     TEXT,
    PRIMARY KEY (app_id, version)
);

CREATE TABLE domains (
    domain     TEXT PRIMARY KEY,
    app_id     INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL
);

CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,
    docker_host TEXT NOT NULL,
    advertise   TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE certificates (
    domain     TEXT PRIMARY KEY,
    cert_pem   TEXT NOT NULL,
    key_sealed TEXT NOT NULL,
    issuer     TEXT NOT NULL,
    not_after  INTEGER NOT NULL,
    source     TEXT NOT NULL CHECK (source IN ('manual', 'acme')),
    last_error TEXT,
    updated_at INTEGER NOT NULL
);

-- Audit log of every change: who, what, when.
CREATE TABLE events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    at     INTEGER NOT NULL,
    actor  TEXT NOT NULL,
    app    TEXT,
    action TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_app ON events (app, id);

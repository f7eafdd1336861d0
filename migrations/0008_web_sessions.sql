-- Dashboard sessions (issue #12): one row per logged-in browser. Only the SHA-256 of the
-- session id is kept (the id itself lives in the browser's HttpOnly cookie); a session
-- ends at `expires_at`, at logout (row deleted), or with its user.

CREATE TABLE web_sessions (
    hash        TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE INDEX web_sessions_expiry ON web_sessions (expires_at);

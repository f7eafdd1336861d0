-- Push webhooks: per-app settings, and the delivery ids already seen (replays are refused).

CREATE TABLE webhooks (
    app_id        INTEGER PRIMARY KEY REFERENCES apps(id) ON DELETE CASCADE,
    repo_url      TEXT NOT NULL,
    branch        TEXT NOT NULL,
    -- the shared secret, sealed by the master key (bound to `webhook/<app_id>`)
    secret_sealed TEXT NOT NULL,
    created_by    TEXT NOT NULL,
    updated_at    INTEGER NOT NULL
);

CREATE TABLE webhook_deliveries (
    app_id      INTEGER NOT NULL REFERENCES apps(id) ON DELETE CASCADE,
    delivery_id TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (app_id, delivery_id)
);
CREATE INDEX webhook_deliveries_age ON webhook_deliveries (received_at);

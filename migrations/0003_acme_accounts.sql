-- The ACME account of each directory escale orders certificates from, registered once and
-- reused across restarts (CAs rate-limit account creation).

CREATE TABLE acme_accounts (
    directory_url      TEXT PRIMARY KEY,
    -- the account URL at the CA (its id; not a secret)
    account_url        TEXT NOT NULL,
    -- instant-acme's AccountCredentials JSON (holds the account's private key), sealed by the
    -- master key, bound to `acme-account:<directory_url>`
    credentials_sealed TEXT NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);

-- The cluster's certificate authority and the certificates it issued (issue #16).
--
-- One CA per installation, made on first use and reused across restarts. Its private key is
-- sealed by the master key, bound to `cluster-ca`. escale's own client certificate (the one it
-- presents to nodes) is kept with its key sealed, bound to `cluster-client`. Node server keys
-- are never kept: they leave in the node's bundle; only what was issued is recorded.

CREATE TABLE cluster_ca (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    -- the CA's subject common name (names the installation)
    common_name TEXT NOT NULL,
    cert_pem    TEXT NOT NULL,
    key_sealed  TEXT NOT NULL,
    -- unix milliseconds
    not_after   INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE cluster_client_cert (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    cert_pem   TEXT NOT NULL,
    key_sealed TEXT NOT NULL,
    serial     TEXT NOT NULL,
    not_after  INTEGER NOT NULL,
    issued_at  INTEGER NOT NULL
);

-- The latest server certificate issued for each node (metadata only, no key).
CREATE TABLE cluster_node_certs (
    node      TEXT PRIMARY KEY,
    -- HOST:PORT the certificate was issued for
    address   TEXT NOT NULL,
    serial    TEXT NOT NULL,
    cert_pem  TEXT NOT NULL,
    not_after INTEGER NOT NULL,
    issued_at INTEGER NOT NULL
);

-- Registered nodes (issue #16): Docker engines escale reaches over mutual TLS, added with
-- `escale nodes add`. The local engine (`local`, from the config) is not a row here.
--
-- `docker_host` keeps the node's `HOST:PORT` (the address its server certificate names);
-- `advertise` the IP the proxy and health probes reach its published ports on.

-- JSON object of the node's labels (`{"disk": "ssd"}`), matched by process constraints.
ALTER TABLE nodes ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
-- Nothing new is placed on a cordoned node; what runs there stays.
ALTER TABLE nodes ADD COLUMN cordoned INTEGER NOT NULL DEFAULT 0;
-- A draining node is cordoned and its instances are moved to other nodes.
ALTER TABLE nodes ADD COLUMN draining INTEGER NOT NULL DEFAULT 0;

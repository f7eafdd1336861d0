-- Placement (issue #16): a process type's node constraints (labels a node must carry, as a
-- JSON object such as {"disk":"ssd"}) and whether its instances may overcommit a node's
-- memory and CPUs.

ALTER TABLE process_types ADD COLUMN constraints TEXT NOT NULL DEFAULT '{}';
ALTER TABLE process_types ADD COLUMN overcommit INTEGER NOT NULL DEFAULT 0;

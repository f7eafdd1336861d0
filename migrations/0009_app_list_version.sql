-- What `GET /apps` shows (apps, their process types and domains, team names) has a version,
-- bumped by triggers in the very transaction that changes it: the API's app list is served
-- from a cache (src/registry/apps.rs, `list_apps_json`) while the version has not moved,
-- whichever code path or process wrote. Writes to anything else (config, releases, events,
-- sessions...) leave the cache alone.
CREATE TABLE app_list_version (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO app_list_version (id, version) VALUES (1, 0);

CREATE TRIGGER app_list_apps_insert AFTER INSERT ON apps
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_apps_update AFTER UPDATE ON apps
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_apps_delete AFTER DELETE ON apps
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER app_list_processes_insert AFTER INSERT ON process_types
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_processes_update AFTER UPDATE ON process_types
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_processes_delete AFTER DELETE ON process_types
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER app_list_domains_insert AFTER INSERT ON domains
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_domains_update AFTER UPDATE ON domains
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_domains_delete AFTER DELETE ON domains
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;

CREATE TRIGGER app_list_teams_update AFTER UPDATE ON teams
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;
CREATE TRIGGER app_list_teams_delete AFTER DELETE ON teams
BEGIN UPDATE app_list_version SET version = version + 1 WHERE id = 1; END;

-- An app's domains are read by app (its page, the app list): without this, each read scanned
-- every domain.
CREATE INDEX domains_app_id ON domains (app_id);

-- An identity per app that is never reused. `apps.id` is an INTEGER PRIMARY KEY without
-- AUTOINCREMENT, so SQLite hands a destroyed app's id to the next app; everything kept outside
-- the database (the git repository, built images and their labels) is keyed by `uid` instead,
-- so an app created later under the same name or id never inherits any of it.

ALTER TABLE apps ADD COLUMN uid TEXT;
UPDATE apps SET uid = lower(hex(randomblob(16))) WHERE uid IS NULL;
CREATE UNIQUE INDEX apps_uid ON apps (uid);

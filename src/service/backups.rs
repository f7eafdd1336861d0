//! Backups through the service layer: admins only; the files live in `backup.dir` on the
//! server and, with `[backup.s3]`, in a bucket too (see [`crate::backup`]).

use std::path::PathBuf;

use super::{Result, Services};
use crate::backup::{self, BackupError, BackupInfo, Created};
use crate::registry::Actor;

impl Services {
    /// The directory the server writes backups to.
    pub fn backup_dir(&self) -> PathBuf {
        self.config.backup.dir_for(&self.config.data_dir)
    }

    /// Takes a backup now (an online snapshot), then applies the retention.
    pub async fn create_backup(&self, actor: &Actor) -> Result<Created> {
        actor.require_admin("taking a backup (every team's apps and secrets)")?;
        Ok(backup::create(
            &self.registry,
            &self.config.data_dir,
            &self.config.backup,
            &self.backups,
        )
        .await?)
    }

    /// The backups in the backup dir and the bucket (`[backup.s3]`), newest first, each
    /// with where it is.
    pub async fn list_backups(&self, actor: &Actor) -> Result<Vec<BackupInfo>> {
        actor.require_admin("listing backups")?;
        Ok(backup::list_everywhere(&self.backup_dir(), self.config.backup.s3.as_ref()).await?)
    }

    /// Where the backup `name` is, for downloading it; only names escale gives backups.
    pub fn backup_file(&self, actor: &Actor, name: &str) -> Result<PathBuf> {
        actor.require_admin("downloading a backup")?;
        let path = self.backup_dir().join(name);
        if !backup::is_backup_name(name) || !path.is_file() {
            return Err(BackupError::NotFound(crate::validate::printable(name).to_string()).into());
        }
        Ok(path)
    }
}

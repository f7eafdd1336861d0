//! Backups through the service layer: admins only; the files live in `backup.dir` on the
//! server (see [`crate::backup`]).

use std::path::PathBuf;

use super::{Result, ServiceError, Services};
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
            &self.backup_dir(),
            self.config.backup.keep,
            &self.backups,
        )
        .await?)
    }

    /// The backups in the backup dir, newest first.
    pub async fn list_backups(&self, actor: &Actor) -> Result<Vec<BackupInfo>> {
        actor.require_admin("listing backups")?;
        let dir = self.backup_dir();
        tokio::task::spawn_blocking(move || backup::list(&dir))
            .await
            .map_err(|e| ServiceError::Invalid(format!("listing backups failed: {e}")))?
            .map_err(Into::into)
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

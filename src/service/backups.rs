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

    /// Takes a backup now (an online snapshot), uploads it (`[backup.s3]`), then applies the
    /// retention. Runs as its own task: a client that hangs up does not cut an upload short
    /// (a multipart upload left half done would stay in the bucket).
    pub async fn create_backup(&self, actor: &Actor) -> Result<Created> {
        actor.require_admin("taking a backup (every team's apps and secrets)")?;
        let (registry, config, status) = (
            self.registry.clone(),
            self.config.clone(),
            self.backups.clone(),
        );
        let task = tokio::spawn(async move {
            backup::create(&registry, &config.data_dir, &config.backup, &status).await
        });
        match task.await {
            Ok(r) => Ok(r?),
            Err(e) => Err(BackupError::Damaged(format!("the backup task failed: {e}")).into()),
        }
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

//! Deploys as one transaction each: an image deploy with its `web` port, a push's release
//! with its manifest. What the service layer ([`crate::service`]) writes.

use super::apps::{apply_manifest_in, upsert_process_in};
use super::{insert_release, Actor, AppRef, ManifestApplied, ProcessPatch, Registry, Result};

impl Registry {
    /// Releases `image` for `app` (with its current config) and, when `port` is
    /// `Some((port, default_port))` and differs from the `web` process's, sets it, in one
    /// transaction (an unchanged port writes nothing and no `process.update` event).
    pub async fn deploy_image(
        &self,
        actor: &Actor,
        app: &AppRef,
        image: &str,
        description: &str,
        port: Option<(u16, u16)>,
    ) -> Result<u32> {
        let mut tx = self.write().await?;
        let current: Option<i64> =
            sqlx::query_scalar("SELECT port FROM process_types WHERE app_id = ? AND name = 'web'")
                .bind(app.id)
                .fetch_optional(&mut *tx)
                .await?;
        if let Some((port, default_port)) = port.filter(|(p, _)| current != Some(i64::from(*p))) {
            let patch = ProcessPatch {
                port: Some(port),
                ..Default::default()
            };
            upsert_process_in(&mut tx, app, &actor.name, "web", &patch, default_port).await?;
        }
        let v =
            insert_release(&mut tx, app, image, "image", description, &actor.name, None).await?;
        tx.commit().await?;
        Ok(v)
    }

    /// Releases an image built from a push, with its build log, after applying the pushed
    /// manifest (if any), in one transaction: the release carries the manifest's config.
    #[allow(clippy::too_many_arguments)]
    pub async fn release_push(
        &self,
        actor: &Actor,
        app: &AppRef,
        manifest: Option<(&crate::manifest::Manifest, u16)>,
        image: &str,
        source: &str,
        description: &str,
        build_log: &str,
    ) -> Result<(Option<ManifestApplied>, u32)> {
        let mut tx = self.write().await?;
        let applied = match manifest {
            Some((m, default_port)) => {
                Some(apply_manifest_in(&mut tx, app, actor, m, default_port, false, false).await?)
            }
            None => None,
        };
        let v = insert_release(
            &mut tx,
            app,
            image,
            source,
            description,
            &actor.name,
            Some(build_log),
        )
        .await?;
        tx.commit().await?;
        Ok((applied, v))
    }
}

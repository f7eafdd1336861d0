//! Encryption at rest of secret config vars and private keys (AES-256-GCM).
//!
//! The master key never enters the database: it is read from `ESCALE_MASTER_KEY` (64 hex
//! digits) or from `master.key` in the data dir (created 0600 on first start). Each sealed value
//! is `v1:` + base64(nonce ‖ ciphertext ‖ tag) and is bound to its place by associated data
//! (e.g. `config/shop/DATABASE_URL`), so a ciphertext copied to another place does not open.

use std::io::Write;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use rand::RngCore;

/// Errors from loading the key or opening a sealed value.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read or create the master key at {path}: {source}")]
    KeyFile {
        path: String,
        source: std::io::Error,
    },
    #[error("the master key {origin} is invalid: expected 64 hex digits (32 bytes)")]
    BadKey { origin: String },
    #[error(
        "a sealed value could not be decrypted: wrong master key, or the value was tampered with"
    )]
    Open,
}

/// The installation's master key.
#[derive(Clone)]
pub struct MasterKey {
    cipher: Aes256Gcm,
    /// The key itself, for deriving the backup keys and for `escale backup export-key`.
    raw: [u8; 32],
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

const PREFIX: &str = "v1:";

impl MasterKey {
    /// From `ESCALE_MASTER_KEY` when given, else `data_dir/master.key`, created if absent.
    pub fn load_or_create(
        data_dir: &Path,
        from_env: Option<&str>,
    ) -> Result<MasterKey, SecretsError> {
        if let Some(hex_key) = from_env {
            return MasterKey::from_hex(hex_key, "in ESCALE_MASTER_KEY");
        }
        let path = data_dir.join("master.key");
        let io = |source| SecretsError::KeyFile {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => MasterKey::from_hex(text.trim(), &format!("in {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                rand::rngs::OsRng.fill_bytes(&mut key);
                let mut f = create_private(&path).map_err(io)?;
                f.write_all(hex::encode(key).as_bytes()).map_err(io)?;
                f.sync_all().map_err(io)?;
                Ok(MasterKey::from_bytes(&key))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The key as written in `master.key` (64 hex digits): only for `escale backup export-key`.
    pub fn to_hex(&self) -> String {
        hex::encode(self.raw)
    }

    /// Reads the key without ever creating one: `ESCALE_MASTER_KEY` when given, else
    /// `data_dir/master.key` (for commands that must not invent a key, such as exporting it).
    pub fn load_existing(
        data_dir: &Path,
        from_env: Option<&str>,
    ) -> Result<MasterKey, SecretsError> {
        if let Some(hex_key) = from_env {
            return MasterKey::from_hex(hex_key, "in ESCALE_MASTER_KEY");
        }
        let path = data_dir.join("master.key");
        let text = std::fs::read_to_string(&path).map_err(|source| SecretsError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
        MasterKey::from_hex(text.trim(), &format!("in {}", path.display()))
    }

    /// Parses a key given as 64 hex digits; `origin` says where it came from, for the error.
    pub fn parse(text: &str, origin: &str) -> Result<MasterKey, SecretsError> {
        MasterKey::from_hex(text.trim(), origin)
    }

    /// A 32-byte key for `purpose`, derived from the master key with HKDF-SHA256 (RFC 5869)
    /// and `salt`: each backup has its own salt, so its own key.
    pub fn derive(&self, purpose: &str, salt: &[u8]) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        type H = Hmac<sha2::Sha256>;
        let mut extract = <H as Mac>::new_from_slice(salt).expect("HMAC takes any key length");
        extract.update(&self.raw);
        let prk = extract.finalize().into_bytes();
        let mut expand = <H as Mac>::new_from_slice(&prk).expect("HMAC takes any key length");
        expand.update(purpose.as_bytes());
        expand.update(&[1]);
        expand.finalize().into_bytes().into()
    }

    fn from_hex(text: &str, origin: &str) -> Result<MasterKey, SecretsError> {
        let bytes = hex::decode(text)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| SecretsError::BadKey {
                origin: origin.to_string(),
            })?;
        Ok(MasterKey::from_bytes(&bytes))
    }

    fn from_bytes(key: &[u8]) -> MasterKey {
        let mut raw = [0u8; 32];
        raw.copy_from_slice(key);
        MasterKey {
            cipher: Aes256Gcm::new_from_slice(key).expect("32-byte key"),
            raw,
        }
    }

    /// A key for tests.
    pub fn random() -> MasterKey {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        MasterKey::from_bytes(&key)
    }

    /// Encrypts `plain`, bound to `place`.
    pub fn seal(&self, place: &str, plain: &[u8]) -> String {
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: place.as_bytes(),
                },
            )
            .expect("AES-GCM encryption does not fail for in-memory buffers");
        let mut out = Vec::with_capacity(12 + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        format!(
            "{PREFIX}{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(out)
        )
    }

    /// Decrypts a value made by [`MasterKey::seal`] for the same `place`.
    pub fn open(&self, place: &str, sealed: &str) -> Result<Vec<u8>, SecretsError> {
        let raw = sealed
            .strip_prefix(PREFIX)
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(b)
                    .ok()
            })
            .filter(|r| r.len() > 12)
            .ok_or(SecretsError::Open)?;
        let (nonce, ct) = raw.split_at(12);
        self.cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| SecretsError::Open)
    }

    /// [`MasterKey::open`] for UTF-8 text.
    pub fn open_string(&self, place: &str, sealed: &str) -> Result<String, SecretsError> {
        String::from_utf8(self.open(place, sealed)?).map_err(|_| SecretsError::Open)
    }
}

/// Creates a new file readable by its owner only (0600), failing if it exists.
pub fn create_private(path: &Path) -> std::io::Result<std::fs::File> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_binding() {
        let k = MasterKey::random();
        let s = k.seal("config/shop/DB", b"postgres://secret");
        assert!(s.starts_with("v1:") && !s.contains("secret"));
        assert_eq!(k.open("config/shop/DB", &s).unwrap(), b"postgres://secret");
        assert!(k.open("config/other/DB", &s).is_err(), "bound to its place");
        assert!(
            MasterKey::random().open("config/shop/DB", &s).is_err(),
            "other key"
        );
        assert!(k.open("x", "garbage").is_err());
        assert_ne!(
            s,
            k.seal("config/shop/DB", b"postgres://secret"),
            "random nonce"
        );
    }

    #[test]
    fn key_file_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = MasterKey::load_or_create(dir.path(), None).unwrap();
        let sealed = k1.seal("p", b"v");
        let k2 = MasterKey::load_or_create(dir.path(), None).unwrap();
        assert_eq!(k2.open("p", &sealed).unwrap(), b"v");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("master.key"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            MasterKey::load_or_create(dir.path(), Some("abc")),
            Err(SecretsError::BadKey { .. })
        ));
    }
}

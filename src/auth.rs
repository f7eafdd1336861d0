//! Credentials: API tokens, passwords (argon2id), the setup token, and the login rate limiter.
//!
//! API tokens are 160 random bits with the recognisable prefix `esc_`; only their SHA-256 is
//! stored (they are random, so a fast hash is right). Passwords are hashed with argon2id.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// Prefix of every API token, so that leaked tokens are easy to recognise and scan for.
pub const TOKEN_PREFIX: &str = "esc_";
/// Prefix of the one-time setup token.
pub const SETUP_PREFIX: &str = "escsetup_";

/// Credential failures.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password must be 8 to 1024 characters")]
    WeakPassword,
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// A freshly generated secret: what is shown once, what is stored, and a display prefix.
pub struct GeneratedToken {
    pub secret: String,
    pub hash: String,
    pub prefix: String,
}

/// A new API token.
pub fn generate_token() -> GeneratedToken {
    generate(TOKEN_PREFIX)
}

/// A new setup token.
pub fn generate_setup_token() -> GeneratedToken {
    generate(SETUP_PREFIX)
}

fn generate(prefix: &str) -> GeneratedToken {
    let secret = format!("{prefix}{}", random_hex(20));
    GeneratedToken {
        hash: token_hash(&secret),
        prefix: secret[..prefix.len() + 6].to_string(),
        secret,
    }
}

/// SHA-256 of a token, hex.
pub fn token_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Hashes a password with argon2id and a random salt.
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    if password.chars().count() < 8 || password.len() > 1024 {
        return Err(AuthError::WeakPassword);
    }
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Checks a password against a stored hash. Runs the hash even when there is no stored hash,
/// so timing does not tell whether a user exists.
pub fn verify_password(password: &str, stored: Option<&str>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy =
        DUMMY.get_or_init(|| hash_password("dummy-password-for-timing").expect("hashing works"));
    let (hash, real) = match stored {
        Some(h) => (h, true),
        None => (dummy.as_str(), false),
    };
    let ok = PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false);
    ok && real
}

/// Limits failed logins per (user, address): at most `max_failures` in `window`.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<(String, IpAddr), Vec<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: usize, window: Duration) -> LoginLimiter {
        LoginLimiter {
            max_failures,
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when this user and address must wait before trying again.
    pub fn check(&self, user: &str, addr: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("limiter lock");
        let key = (user.to_string(), addr);
        if let Some(times) = map.get_mut(&key) {
            times.retain(|t| now.duration_since(*t) < self.window);
            if times.len() >= self.max_failures {
                let oldest = times[0];
                return Err(self.window.saturating_sub(now.duration_since(oldest)));
            }
        }
        Ok(())
    }

    /// Records a failed attempt.
    pub fn failed(&self, user: &str, addr: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().expect("limiter lock");
        if map.len() > 100_000 {
            // Bound memory under a spray of user names: forget windows that have passed.
            map.retain(|_, v| {
                v.last()
                    .is_some_and(|t| now.duration_since(*t) < self.window)
            });
        }
        map.entry((user.to_string(), addr)).or_default().push(now);
    }

    /// Forgets failures after a success.
    pub fn succeeded(&self, user: &str, addr: IpAddr) {
        self.failures
            .lock()
            .expect("limiter lock")
            .remove(&(user.to_string(), addr));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let a = generate_token();
        let b = generate_token();
        assert!(a.secret.starts_with("esc_") && a.secret.len() == 4 + 40);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, token_hash(&a.secret));
        assert!(!a.hash.contains(&a.secret[4..]));
        assert!(a.secret.starts_with(&a.prefix));
    }

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("correct horse", Some(&h)));
        assert!(!verify_password("wrong horse!", Some(&h)));
        assert!(!verify_password("correct horse", None));
        assert!(hash_password("short").is_err());
    }

    #[test]
    fn limiter_blocks_after_failures_per_user_and_address() {
        let l = LoginLimiter::new(3, Duration::from_secs(60));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check("ann", a).is_ok());
            l.failed("ann", a);
        }
        assert!(l.check("ann", a).is_err());
        assert!(l.check("ann", b).is_ok(), "other address");
        assert!(l.check("bob", a).is_ok(), "other user");
        l.succeeded("ann", a);
        assert!(l.check("ann", a).is_ok());
    }
}

//! Credentials: API tokens, passwords (argon2id), the setup token, and the login rate limiter.
//!
//! API tokens are 160 random bits with the recognisable prefix `esc_`; only their SHA-256 is
//! stored (they are random, so a fast hash is right). Passwords are hashed with argon2id.
//!
//! Argon2id is made to be expensive (about 19 MiB of memory and tens of milliseconds of CPU
//! per hash), so hashing is a resource an unauthenticated caller can spend. Every password
//! hash and check in escale goes through one [`Hashing`]: at most one hash per core at a
//! time, on blocking threads; a request that cannot get a turn within a short wait is refused
//! with [`AuthError::Busy`] (the API answers 503 with `Retry-After`), so memory stays bounded
//! at `cores x 19 MiB` whatever the number of concurrent logins. A login for an unknown user
//! is checked against a dummy hash through the same bound, so it costs the same.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, SaltString};
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
    /// Every hashing slot stayed busy for the whole wait: try again after the given time.
    #[error("the server is busy checking passwords; try again in {} seconds", .0.as_secs().max(1))]
    Busy(Duration),
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

/// Argon2 working memory (`m_cost` blocks of 1 KiB), reused from one hash to the next: a
/// fresh 19 MiB allocation per hash, freed on a pool thread, is kept by the allocator in that
/// thread's arena, and the blocking pool has many threads (measured: 850 MiB resident after
/// 200 concurrent logins with only 2 hashes at a time).
type Memory = Vec<argon2::Block>;

/// Runs argon2 with `memory` as its working memory (grown when the parameters need more).
fn argon2_into(
    memory: &mut Memory,
    argon: &Argon2<'_>,
    params: &argon2::Params,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), AuthError> {
    let need = params.block_count();
    if memory.len() < need {
        memory.resize(need, argon2::Block::default());
    }
    argon
        .hash_password_into_with_memory(password, salt, out, &mut memory[..need])
        .map_err(|e| AuthError::Hash(e.to_string()))
}

/// Hashes a password with argon2id (default parameters) and a random salt, into a PHC string
/// (`$argon2id$v=19$m=19456,t=2,p=1$SALT$HASH`). Synchronous and expensive: callers go
/// through [`Hashing::hash`], which bounds how many run at once.
fn hash_password(password: &str, memory: &mut Memory) -> Result<String, AuthError> {
    if password.chars().count() < 8 || password.chars().count() > 1024 {
        return Err(AuthError::WeakPassword);
    }
    let herr = |e: argon2::password_hash::Error| AuthError::Hash(e.to_string());
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let salt_string = SaltString::encode_b64(&salt).map_err(herr)?;
    let params = argon2::Params::default();
    let argon = Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        params.clone(),
    );
    let mut out = [0u8; argon2::Params::DEFAULT_OUTPUT_LEN];
    argon2_into(
        memory,
        &argon,
        &params,
        password.as_bytes(),
        &salt,
        &mut out,
    )?;
    Ok(PasswordHash {
        algorithm: argon2::Algorithm::Argon2id.ident(),
        version: Some(argon2::Version::V0x13.into()),
        params: argon2::password_hash::ParamsString::try_from(&params).map_err(herr)?,
        salt: Some(salt_string.as_salt()),
        hash: Some(argon2::password_hash::Output::new(&out).map_err(herr)?),
    }
    .to_string())
}

/// Checks `password` against a PHC argon2 hash (any variant, version and parameters), in
/// constant time. A hash that does not parse never matches.
fn check_hash(password: &str, stored: &str, memory: &mut Memory) -> bool {
    let mut run = || -> Option<bool> {
        let hash = PasswordHash::new(stored).ok()?;
        let algorithm = argon2::Algorithm::try_from(hash.algorithm).ok()?;
        let version = match hash.version {
            Some(v) => argon2::Version::try_from(v).ok()?,
            None => argon2::Version::default(),
        };
        let params = argon2::Params::try_from(&hash).ok()?;
        let mut salt = [0u8; 64];
        let salt = hash.salt?.decode_b64(&mut salt).ok()?;
        let expected = hash.hash?;
        let mut out = vec![0u8; expected.len()];
        let argon = Argon2::new(algorithm, version, params.clone());
        argon2_into(memory, &argon, &params, password.as_bytes(), salt, &mut out).ok()?;
        Some(bool::from(subtle::ConstantTimeEq::ct_eq(
            expected.as_bytes(),
            &out[..],
        )))
    };
    run().unwrap_or(false)
}

/// Checks a password against a stored hash. Runs the hash even when there is no stored hash,
/// so timing does not tell whether a user exists. Callers go through [`Hashing::verify`].
fn verify_password(password: &str, stored: Option<&str>, memory: &mut Memory) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let dummy = DUMMY
        .get_or_init(|| hash_password("dummy-password-for-timing", memory).expect("hashing works"));
    match stored {
        Some(h) => check_hash(password, h, memory),
        None => {
            check_hash(password, dummy, memory);
            false
        }
    }
}

/// The one gate to argon2: at most `slots` hashes run at once, each on a blocking thread.
///
/// A caller waits at most `wait` for a slot, then gets [`AuthError::Busy`]. The slot is held by
/// the blocking task itself, so a request abandoned by its client still counts until its hash
/// finishes: the bound is on work actually running, not on requests still connected.
#[derive(Debug)]
pub struct Hashing {
    slots: Arc<tokio::sync::Semaphore>,
    size: usize,
    wait: Duration,
    runs: AtomicU64,
    /// Working memory of finished hashes, for the next ones: never more buffers than slots.
    memory: Arc<Mutex<Vec<Memory>>>,
}

impl Hashing {
    /// `slots` concurrent hashes (at least 1); callers wait at most `wait` for one.
    pub fn new(slots: usize, wait: Duration) -> Hashing {
        let size = slots.max(1);
        Hashing {
            slots: Arc::new(tokio::sync::Semaphore::new(size)),
            size,
            wait,
            runs: AtomicU64::new(0),
            memory: Arc::default(),
        }
    }

    /// One slot per core, waiting at most 2 seconds: the server's default.
    pub fn per_core() -> Hashing {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Hashing::new(cores, Duration::from_secs(2))
    }

    /// How many hashes may run at once.
    pub fn slots(&self) -> usize {
        self.size
    }

    /// How many hashes or checks have run (started) so far.
    pub fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// Takes every slot until the returned guard is dropped, waiting for running hashes
    /// to finish: an operator's or a test's way to see what callers get when hashing is
    /// saturated.
    pub async fn hold_all(&self) -> tokio::sync::OwnedSemaphorePermit {
        self.slots
            .clone()
            .acquire_many_owned(u32::try_from(self.size).unwrap_or(u32::MAX))
            .await
            .expect("the hashing semaphore is never closed")
    }

    /// Hashes a new password (its length is checked first, without a slot).
    pub async fn hash(&self, password: &str) -> Result<String, AuthError> {
        if password.chars().count() < 8 || password.chars().count() > 1024 {
            return Err(AuthError::WeakPassword);
        }
        let password = password.to_string();
        self.run(move |memory| hash_password(&password, memory))
            .await?
    }

    /// Checks a password against a user's stored hash; `None` (unknown user, or a user
    /// without password) is checked against a dummy hash and is always `false`.
    pub async fn verify(&self, password: &str, stored: Option<String>) -> Result<bool, AuthError> {
        // Passwords longer than any we accept cannot match; bound the work all the same.
        let password: String = password.chars().take(1025).collect();
        self.run(move |memory| verify_password(&password, stored.as_deref(), memory))
            .await
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Memory) -> T + Send + 'static,
    ) -> Result<T, AuthError> {
        let permit = tokio::time::timeout(self.wait, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| AuthError::Busy(self.wait.max(Duration::from_secs(1))))?
            .expect("the hashing semaphore is never closed");
        self.runs.fetch_add(1, Ordering::Relaxed);
        let pool = self.memory.clone();
        tokio::task::spawn_blocking(move || {
            let _slot = permit;
            let mut memory = pool
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop()
                .unwrap_or_default();
            let out = f(&mut memory);
            pool.lock().unwrap_or_else(|e| e.into_inner()).push(memory);
            out
        })
        .await
        .map_err(|e| AuthError::Hash(e.to_string()))
    }
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
    use argon2::password_hash::{PasswordHasher, PasswordVerifier};

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
        let m = &mut Memory::new();
        let h = hash_password("correct horse", m).unwrap();
        assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
        assert!(verify_password("correct horse", Some(&h), m));
        assert!(!verify_password("wrong horse!", Some(&h), m));
        assert!(!verify_password("correct horse", None, m));
        assert!(!verify_password("correct horse", Some("not a hash"), m));
        assert!(hash_password("short", m).is_err());
        // Compatible with the argon2 crate both ways (hashes stored by earlier versions).
        let theirs = Argon2::default()
            .hash_password(
                b"correct horse",
                &SaltString::generate(&mut rand::rngs::OsRng),
            )
            .unwrap()
            .to_string();
        assert!(verify_password("correct horse", Some(&theirs), m));
        assert!(!verify_password("correct horsf", Some(&theirs), m));
        Argon2::default()
            .verify_password(b"correct horse", &PasswordHash::new(&h).unwrap())
            .unwrap();
        // Other parameters and variants verify too, with the memory they need.
        let small = Argon2::new(
            argon2::Algorithm::Argon2i,
            argon2::Version::V0x10,
            argon2::Params::new(4096, 3, 1, None).unwrap(),
        )
        .hash_password(
            b"correct horse",
            &SaltString::generate(&mut rand::rngs::OsRng),
        )
        .unwrap()
        .to_string();
        assert!(verify_password("correct horse", Some(&small), m));
        assert_eq!(m.len(), 19456, "memory is kept for reuse");
    }

    #[tokio::test]
    async fn hashing_is_bounded_and_refuses_when_saturated() {
        let h = Hashing::new(1, Duration::from_millis(50));
        let stored = h.hash("correct horse").await.unwrap();
        assert!(h
            .verify("correct horse", Some(stored.clone()))
            .await
            .unwrap());
        assert!(!h.verify("correct horse", None).await.unwrap());
        assert_eq!(h.runs(), 3);
        let held = h.hold_all().await;
        let t = Instant::now();
        assert!(matches!(
            h.hash("correct horse").await,
            Err(AuthError::Busy(_))
        ));
        assert!(matches!(h.verify("x", None).await, Err(AuthError::Busy(_))));
        assert!(t.elapsed() < Duration::from_secs(2), "waits briefly");
        // A weak password is refused without a slot.
        assert!(matches!(
            h.hash("short").await,
            Err(AuthError::WeakPassword)
        ));
        assert_eq!(h.runs(), 3, "nothing ran while saturated");
        drop(held);
        assert!(h.verify("correct horse", Some(stored)).await.unwrap());
        assert_eq!(
            h.memory.lock().unwrap().len(),
            1,
            "one buffer per slot, reused"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_hashes_run_than_slots() {
        let h = Arc::new(Hashing::new(2, Duration::from_secs(60)));
        let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (h, running, peak) = (h.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                h.run(move |_| {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
                .unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 2);
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

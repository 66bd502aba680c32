//! Password hashing: argon2id for new hashes; the legacy PBKDF2 format verified and
//! flagged for upgrade.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::Sha256;
use subtle::ConstantTimeEq as _;

use crate::error::{Error, Result};

/// Iterations of the legacy PBKDF2-HMAC-SHA256 format.
pub const LEGACY_PBKDF2_ITERATIONS: u32 = 100_000;

/// The longest password accepted, in bytes (hashing cost must stay bounded).
pub const MAX_PASSWORD_BYTES: usize = 1024;

/// The outcome of a password check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PasswordCheck {
    /// Wrong password (or an unreadable hash).
    Invalid,
    /// Right password.
    Valid {
        /// The stored hash is legacy or weaker than the current parameters: store a new one.
        needs_rehash: bool,
    },
}

/// Bounds how many password hashes run at once, and how many wait for a turn.
///
/// One argon2id hash at OWASP's cost holds 19 MiB for its whole run, so unbounded
/// concurrent logins are unbounded memory. Hashes beyond `concurrent` wait, at most
/// `queued` of them and at most [`HashGate::MAX_WAIT`]; beyond that a hash fails at once
/// with `rate_limit_exceeded`. Every [`PasswordHasher`] shares
/// [`HashGate::process`] unless given its own.
#[derive(Debug)]
pub struct HashGate {
    permits: tokio::sync::Semaphore,
    queued: usize,
    waiting: AtomicUsize,
    running: AtomicUsize,
    peak: AtomicUsize,
    started: AtomicU64,
    refused: AtomicU64,
}

/// What a [`HashGate`] has let through so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashGateStats {
    /// Hashes started.
    pub started: u64,
    /// The most hashes that ran at the same time.
    pub peak_running: usize,
    /// Hashes refused because too many were waiting (or waited too long).
    pub refused: u64,
}

impl HashGate {
    /// The longest a hash waits for a turn before it is refused.
    pub const MAX_WAIT: Duration = Duration::from_secs(5);

    /// A gate running at most `concurrent` hashes (at least 1) with at most `queued`
    /// waiting.
    pub fn new(concurrent: usize, queued: usize) -> Arc<Self> {
        Arc::new(Self {
            permits: tokio::sync::Semaphore::new(concurrent.max(1)),
            queued,
            waiting: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// The process-wide gate: one hash per CPU, eight per CPU waiting.
    pub fn process() -> Arc<Self> {
        static GATE: OnceLock<Arc<HashGate>> = OnceLock::new();
        GATE.get_or_init(|| {
            let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
            Self::new(cpus, cpus * 8)
        })
        .clone()
    }

    /// Counters since the gate was made.
    pub fn stats(&self) -> HashGateStats {
        HashGateStats {
            started: self.started.load(Ordering::Relaxed),
            peak_running: self.peak.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    fn busy() -> Error {
        Error::rate_limited(
            "Too many logins at once; try again in a second",
            Some(Duration::from_secs(1)),
        )
    }

    async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let permit = match self.permits.try_acquire() {
            Ok(permit) => permit,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queued {
                    self.waiting.fetch_sub(1, Ordering::AcqRel);
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    return Err(Self::busy());
                }
                let acquired = tokio::time::timeout(Self::MAX_WAIT, self.permits.acquire()).await;
                self.waiting.fetch_sub(1, Ordering::AcqRel);
                match acquired {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(Self::busy());
                    }
                }
            }
        };
        self.started.fetch_add(1, Ordering::Relaxed);
        let running = self.running.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak.fetch_max(running, Ordering::AcqRel);
        let result = off_executor(work).await;
        self.running.fetch_sub(1, Ordering::AcqRel);
        drop(permit);
        result
    }
}

/// Hashes and verifies passwords. Hashing runs on tokio's blocking pool, off the async
/// executor, through a [`HashGate`] that bounds how many run at once.
#[derive(Debug, Clone)]
pub struct PasswordHasher {
    params: Params,
    gate: Arc<HashGate>,
}

impl Default for PasswordHasher {
    fn default() -> Self {
        Self::owasp()
    }
}

impl PasswordHasher {
    /// argon2id with OWASP's recommended minimum: 19 MiB of memory, 2 iterations,
    /// 1 lane.
    pub fn owasp() -> Self {
        Self::new(19 * 1024, 2, 1).expect("valid argon2 parameters")
    }

    /// argon2id with explicit parameters (memory in KiB).
    pub fn new(memory_kib: u32, iterations: u32, lanes: u32) -> Result<Self> {
        let params = Params::new(memory_kib, iterations, lanes, None)
            .map_err(|e| Error::validation("argon2", "invalid argon2 parameters").with_source(e))?;
        Ok(Self {
            params,
            gate: HashGate::process(),
        })
    }

    /// This hasher with its own gate instead of the process-wide one.
    pub fn with_gate(mut self, gate: Arc<HashGate>) -> Self {
        self.gate = gate;
        self
    }

    /// The gate this hasher's async hashes pass through.
    pub fn gate(&self) -> &Arc<HashGate> {
        &self.gate
    }

    /// The parameters in force: (memory KiB, iterations, lanes).
    pub fn parameters(&self) -> (u32, u32, u32) {
        (
            self.params.m_cost(),
            self.params.t_cost(),
            self.params.p_cost(),
        )
    }

    fn argon2(&self) -> Argon2<'static> {
        Argon2::new(Algorithm::Argon2id, Version::V0x13, self.params.clone())
    }

    /// A new argon2id PHC hash of `password`, computed right here (blocking).
    pub fn hash_blocking(&self, password: &str) -> Result<String> {
        check_length(password)?;
        let salt: [u8; 16] = crate::random::secret_bytes()?;
        let salt =
            SaltString::encode_b64(&salt).map_err(|e| Error::internal("salt").with_source(e))?;
        self.argon2()
            .hash_password(password.as_bytes(), &salt)
            .map(|hash| hash.to_string())
            .map_err(|e| Error::internal("argon2 hashing failed").with_source(e))
    }

    /// Checks `password` against a stored hash, computed right here (blocking).
    pub fn verify_blocking(&self, password: &str, stored: &str) -> PasswordCheck {
        if password.len() > MAX_PASSWORD_BYTES {
            return PasswordCheck::Invalid;
        }
        if let Some((salt, hash)) = parse_legacy(stored) {
            let computed = legacy_digest(password, salt);
            return if bool::from(computed.as_slice().ct_eq(&hash)) {
                PasswordCheck::Valid { needs_rehash: true }
            } else {
                PasswordCheck::Invalid
            };
        }
        let Ok(parsed) = PasswordHash::new(stored) else {
            tracing::warn!("stored password hash is in an unknown format");
            return PasswordCheck::Invalid;
        };
        // The verifier compares in constant time and uses the hash's own parameters.
        if self
            .argon2()
            .verify_password(password.as_bytes(), &parsed)
            .is_err()
        {
            return PasswordCheck::Invalid;
        }
        let current = parsed.algorithm.as_str() == "argon2id"
            && Params::try_from(&parsed).is_ok_and(|p| {
                p.m_cost() >= self.params.m_cost()
                    && p.t_cost() >= self.params.t_cost()
                    && p.p_cost() >= self.params.p_cost()
            });
        PasswordCheck::Valid {
            needs_rehash: !current,
        }
    }

    /// [`hash_blocking`](Self::hash_blocking) on the blocking pool, through the gate
    /// (`rate_limit_exceeded` when it is full).
    pub async fn hash(&self, password: &str) -> Result<String> {
        check_length(password)?;
        let hasher = self.clone();
        let password = password.to_owned();
        self.gate
            .run(move || hasher.hash_blocking(&password))
            .await?
    }

    /// [`verify_blocking`](Self::verify_blocking) on the blocking pool, through the gate
    /// (`rate_limit_exceeded` when it is full).
    pub async fn verify(&self, password: &str, stored: &str) -> Result<PasswordCheck> {
        if password.len() > MAX_PASSWORD_BYTES {
            return Ok(PasswordCheck::Invalid);
        }
        let hasher = self.clone();
        let (password, stored) = (password.to_owned(), stored.to_owned());
        self.gate
            .run(move || hasher.verify_blocking(&password, &stored))
            .await
    }
}

fn check_length(password: &str) -> Result<()> {
    if password.len() > MAX_PASSWORD_BYTES {
        return Err(Error::validation(
            "password",
            format!("password is longer than {MAX_PASSWORD_BYTES} bytes"),
        ));
    }
    Ok(())
}

async fn off_executor<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Ok(work());
    }
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal("password hashing task failed").with_source(e))
}

fn parse_legacy(stored: &str) -> Option<(&str, Vec<u8>)> {
    let (salt, hash) = stored.split_once(':')?;
    let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
    if salt.len() != 32 || hash.len() != 64 || !is_hex(salt) || !is_hex(hash) {
        return None;
    }
    Some((salt, hex::decode(hash).ok()?))
}

fn legacy_digest(password: &str, salt_hex: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    // The legacy code used the salt's hex *string* as the salt bytes.
    pbkdf2::pbkdf2_hmac::<Sha256>(
        password.as_bytes(),
        salt_hex.as_bytes(),
        LEGACY_PBKDF2_ITERATIONS,
        &mut out,
    );
    out
}

/// A hash in the legacy format `<salt hex>:<PBKDF2 hex>`, as the Python stack wrote them.
/// For migrations and tests; new hashes should be argon2id.
pub fn legacy_hash(password: &str, salt_hex: &str) -> Result<String> {
    if salt_hex.len() != 32 || !salt_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::validation(
            "salt",
            "the legacy salt is 32 hex characters",
        ));
    }
    Ok(format!(
        "{salt_hex}:{}",
        hex::encode(legacy_digest(password, salt_hex))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast() -> PasswordHasher {
        PasswordHasher::new(1024, 1, 1).unwrap()
    }

    #[test]
    fn argon2id_round_trip() {
        let hasher = fast();
        let hash = hasher.hash_blocking("correct horse").unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=1024,t=1,p=1$"), "{hash}");
        assert_eq!(
            hasher.verify_blocking("correct horse", &hash),
            PasswordCheck::Valid {
                needs_rehash: false
            }
        );
        assert_eq!(
            hasher.verify_blocking("wrong horse", &hash),
            PasswordCheck::Invalid
        );
        assert_ne!(
            hash,
            hasher.hash_blocking("correct horse").unwrap(),
            "salted"
        );
        // Stronger parameters now: the old hash still verifies, and asks to be redone.
        let stronger = PasswordHasher::new(2048, 2, 1).unwrap();
        assert_eq!(
            stronger.verify_blocking("correct horse", &hash),
            PasswordCheck::Valid { needs_rehash: true }
        );
    }

    #[test]
    fn legacy_pbkdf2_matches_the_python_format() {
        // Known answer from Python: hashlib.pbkdf2_hmac('sha256', b'admin123',
        //     b'00112233445566778899aabbccddeeff', 100000).hex()
        let python = "00112233445566778899aabbccddeeff:407588de40042df09900a60a6f663282d6e036dcf07ee7b62672157e4d210fde";
        assert_eq!(
            legacy_hash("admin123", "00112233445566778899aabbccddeeff").unwrap(),
            python
        );
        let hasher = fast();
        assert_eq!(
            hasher.verify_blocking("admin123", python),
            PasswordCheck::Valid { needs_rehash: true }
        );
        assert_eq!(
            hasher.verify_blocking("admin124", python),
            PasswordCheck::Invalid
        );
        assert_eq!(
            hasher.verify_blocking("admin123", "zz:yy"),
            PasswordCheck::Invalid
        );
        assert_eq!(
            hasher.verify_blocking("admin123", ""),
            PasswordCheck::Invalid
        );
        assert_eq!(
            hasher.verify_blocking(&"x".repeat(2000), python),
            PasswordCheck::Invalid
        );
        assert_eq!(
            fast().hash_blocking(&"x".repeat(2000)).unwrap_err().code(),
            "validation_error"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_gate_bounds_running_and_waiting_hashes() {
        let gate = HashGate::new(2, 3);
        let hasher = PasswordHasher::new(4096, 2, 1)
            .unwrap()
            .with_gate(gate.clone());
        let stored = hasher.hash_blocking("right").unwrap();
        let checks = (0..20).map(|_| {
            let (hasher, stored) = (hasher.clone(), stored.clone());
            tokio::spawn(async move { hasher.verify("wrong", &stored).await })
        });
        let results = futures::future::join_all(checks).await;
        let refused = results
            .iter()
            .filter(|r| matches!(r, Ok(Err(e)) if e.code() == "rate_limit_exceeded"))
            .count();
        let stats = gate.stats();
        assert!(stats.peak_running <= 2, "{stats:?}");
        assert_eq!(stats.started + stats.refused, 20, "{stats:?}");
        assert!(refused > 0, "2 running and 3 waiting at most: {stats:?}");
        assert_eq!(refused as u64, stats.refused);
    }
}

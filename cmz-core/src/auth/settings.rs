//! Settings of the auth service: keys, lifetimes, login limits, hashing, from the legacy
//! variables.

use super::*;

/// Limits on login attempts, counted per window before the password is checked.
///
/// The policy:
/// - **Per account and client** (`per_account`, default 5): the attempts one client (an
///   IP address or API key) makes on one account. This is the limit an attacker meets;
///   it locks nobody else out, so the owner logging in from another address still gets
///   in. A successful login clears it.
/// - **Per account** (`per_account_total`, default 100): attempts on one account from all
///   clients together, so spreading a guessing attack over many addresses only slows to
///   this rate. It is high enough that a handful of hostile clients cannot reach it by
///   accident.
/// - **Per client** (`per_client`, default 300): attempts from one client across all
///   accounts (credential stuffing). It is sized for a school group behind one NAT
///   address: a class of 30 children mistyping their passwords several times each stays
///   well under it.
///
/// Every attempt is counted before its password is hashed, so concurrent attempts cannot
/// all pass a check made before any of them was counted; a successful login gives its
/// attempt back on the account-wide and per-client counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginLimits {
    /// Attempts allowed per account from one client in a window. Default 5.
    pub per_account: u32,
    /// Attempts allowed per account from all clients together in a window. Default 100.
    pub per_account_total: u32,
    /// Attempts allowed per client key across all accounts in a window. Default 300.
    pub per_client: u32,
    /// The window. Default 15 minutes.
    pub window: Duration,
}

impl Default for LoginLimits {
    fn default() -> Self {
        Self {
            per_account: 5,
            per_account_total: 100,
            per_client: 300,
            window: Duration::from_secs(15 * 60),
        }
    }
}

/// Auth settings, usually from the legacy environment variables.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    /// Signing and verification keys.
    pub keys: TokenKeys,
    /// Access-token lifetime (`TOKEN_EXPIRATION_SECONDS`, default 86,400).
    pub access_ttl: Duration,
    /// Refresh-token lifetime (`CMZ_REFRESH_TOKEN_SECONDS`, default 30 days).
    pub refresh_ttl: Duration,
    /// Clock leeway for `exp`/`nbf` (`CMZ_JWT_LEEWAY_SECONDS`, default 30, at most 300).
    pub leeway: Duration,
    /// Whether `register` works (`CMZ_ALLOW_REGISTRATION`, default off).
    pub registration: bool,
    /// Development users to seed (`CMZ_DEV_USERS`); `None` in production.
    pub dev_users: Option<DevDirectory>,
    /// Failed-login limits.
    pub login_limits: LoginLimits,
    /// Password hashing parameters.
    pub hasher: PasswordHasher,
    /// Keep legacy PBKDF2 hashes as they are after a successful login instead of replacing
    /// them with argon2id (`CMZ_KEEP_LEGACY_PASSWORD_HASHES`, default off). Set it while
    /// the legacy login still runs on the same user table: it only reads PBKDF2, so an
    /// upgraded user could no longer log in there.
    pub keep_legacy_hashes: bool,
}

pub(super) fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    crate::random::secret_bytes()
}

fn seconds_var(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
    default: u64,
) -> Result<Duration> {
    match lookup(name) {
        None => Ok(Duration::from_secs(default)),
        Some(value) => value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
            .ok_or_else(|| {
                Error::validation(
                    name,
                    format!("{name} must be a positive number of seconds, got {value:?}"),
                )
            }),
    }
}

fn flag_var(lookup: &dyn Fn(&str) -> Option<String>, name: &'static str) -> Result<bool> {
    match lookup(name).as_deref().map(str::trim) {
        None | Some("") | Some("0") | Some("false") | Some("off") | Some("no") => Ok(false),
        Some("1") | Some("true") | Some("on") | Some("yes") => Ok(true),
        Some(other) => Err(Error::validation(
            name,
            format!("{name} must be true or false, got {other:?}"),
        )),
    }
}

impl AuthSettings {
    /// Development settings: the embedded dev users, registration on, and a random secret
    /// for this process (tokens do not survive a restart).
    pub fn development() -> Self {
        let secret = random_bytes::<32>().expect("system randomness");
        Self {
            keys: TokenKeys::hs256(&secret).expect("32-byte secret"),
            access_ttl: Duration::from_secs(86_400),
            refresh_ttl: Duration::from_secs(30 * 86_400),
            leeway: Duration::from_secs(30),
            registration: true,
            dev_users: Some(DevDirectory::embedded()),
            login_limits: LoginLimits::default(),
            hasher: PasswordHasher::owasp(),
            keep_legacy_hashes: false,
        }
    }

    /// Production settings from a shared secret, with nothing seeded.
    pub fn with_secret(secret: &[u8]) -> Result<Self> {
        Ok(Self {
            keys: TokenKeys::hs256(secret)?,
            dev_users: None,
            registration: false,
            ..Self::development()
        })
    }

    /// Settings from the process environment; see [`AuthSettings::from_lookup`].
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Settings from environment-style variables read through `lookup`:
    ///
    /// - `JWT_ALGORITHM` (HS256, EdDSA, RS256, ES256; default HS256).
    /// - `JWT_SECRET`: the HS256 secret, at least 32 bytes. Required in production with
    ///   HS256; with an asymmetric algorithm it is still accepted for verification, so
    ///   tokens signed by the legacy services keep working during the move.
    /// - `JWT_PRIVATE_KEY_FILE`, `JWT_PUBLIC_KEY_FILE`, `JWT_KEY_ID`: the asymmetric key.
    /// - `TOKEN_EXPIRATION_SECONDS`, `CMZ_REFRESH_TOKEN_SECONDS`, `CMZ_JWT_LEEWAY_SECONDS`.
    /// - `CMZ_ALLOW_REGISTRATION` (true/false).
    /// - `CMZ_KEEP_LEGACY_PASSWORD_HASHES` (true/false): see
    ///   [`keep_legacy_hashes`](Self::keep_legacy_hashes).
    /// - `CMZ_DEV_USERS`: `embedded` or a JSON file; development mode. Without it, a
    ///   missing or short `JWT_SECRET` is an error, not a silent default.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let dev_users = get("CMZ_DEV_USERS")
            .map(|source| DevDirectory::load(&source))
            .transpose()?;
        let algorithm: TokenAlgorithm =
            get("JWT_ALGORITHM").as_deref().unwrap_or("HS256").parse()?;
        let secret = get("JWT_SECRET");
        let keys = match algorithm {
            TokenAlgorithm::Hs256 => match (&secret, &dev_users) {
                (Some(secret), _) => TokenKeys::hs256(secret.as_bytes())?,
                (None, Some(_)) => TokenKeys::hs256(&random_bytes::<32>()?)?,
                (None, None) => {
                    return Err(Error::validation(
                        "JWT_SECRET",
                        format!(
                            "JWT_SECRET must be set (at least {MIN_SECRET_BYTES} bytes); set CMZ_DEV_USERS=embedded for development"
                        ),
                    ));
                }
            },
            asymmetric => {
                let read = |name: &'static str| -> Result<Vec<u8>> {
                    let path = get(name).ok_or_else(|| {
                        Error::validation(
                            name,
                            format!("{name} must be set for JWT_ALGORITHM={asymmetric:?}"),
                        )
                    })?;
                    std::fs::read(&path).map_err(|e| {
                        Error::validation(name, format!("cannot read {name} {path:?}"))
                            .with_source(e)
                    })
                };
                let kid = get("JWT_KEY_ID").unwrap_or_else(|| "cmz-1".to_owned());
                let keys = TokenKeys::asymmetric(
                    asymmetric,
                    &kid,
                    &read("JWT_PRIVATE_KEY_FILE")?,
                    &read("JWT_PUBLIC_KEY_FILE")?,
                )?;
                match &secret {
                    Some(secret) => keys.with_secret(secret.as_bytes())?,
                    None => keys,
                }
            }
        };
        let leeway = seconds_var(&get, "CMZ_JWT_LEEWAY_SECONDS", 30)?;
        if leeway > MAX_LEEWAY {
            return Err(Error::validation(
                "CMZ_JWT_LEEWAY_SECONDS",
                "CMZ_JWT_LEEWAY_SECONDS is at most 300",
            ));
        }
        Ok(Self {
            keys,
            access_ttl: seconds_var(&get, "TOKEN_EXPIRATION_SECONDS", 86_400)?,
            refresh_ttl: seconds_var(&get, "CMZ_REFRESH_TOKEN_SECONDS", 30 * 86_400)?,
            leeway,
            registration: flag_var(&get, "CMZ_ALLOW_REGISTRATION")?,
            dev_users,
            login_limits: LoginLimits::default(),
            hasher: PasswordHasher::owasp(),
            keep_legacy_hashes: flag_var(&get, "CMZ_KEEP_LEGACY_PASSWORD_HASHES")?,
        })
    }
}

//! Authentication and authorization: access tokens, passwords, login throttling, refresh
//! rotation, logout, development users, and the platform's access policy.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use cmz_core::auth::{AuthService, AuthSettings, AuthStores};
//!
//! // Development settings: the embedded dev users and a random per-process secret.
//! let auth = AuthService::new(AuthSettings::development(), AuthStores::in_memory()).await?;
//! let login = auth.login("admin@cmz.org", "admin123", Some("127.0.0.1")).await?;
//! let principal = auth.authenticate(&login.token).await?;
//! assert_eq!(principal.user_id.as_str(), "user_admin");
//! let rotated = auth.refresh(&login.refresh_token).await?;
//! auth.logout(&rotated.token).await?;
//! assert_eq!(auth.authenticate(&rotated.token).await.unwrap_err().code(), "unauthorized");
//! # Ok::<_, cmz_core::Error>(())
//! # }).unwrap();
//! ```

mod audit;
mod claims;
mod dev;
mod directory;
mod memory;
mod model;
mod password;
mod policy;
mod settings;
mod stores;
mod tokens;
mod verified;

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tracing::Instrument as _;

pub use audit::{
    AuditEvent, AuditKind, AuditOutcome, AuditSink, DynAuditSink, InMemoryAuditSink,
    MAX_AUDIT_REASON_CHARS, TracingAuditSink, audit_text,
};
pub use dev::{DevDirectory, DevUser, EMBEDDED_DEV_USERS};
pub use directory::TokenRequest;
pub use memory::{
    InMemoryFamilyDirectory, InMemoryRateLimitStore, InMemoryRevocationStore, InMemoryUserStore,
};
pub use model::{Family, RefreshRecord, RefreshState, User, UserType, normalize_email};
pub use password::{
    HashGate, HashGateStats, LEGACY_PBKDF2_ITERATIONS, MAX_PASSWORD_BYTES, PasswordCheck,
    PasswordHasher, legacy_hash,
};
pub use policy::PlatformPolicy;
use settings::random_bytes;
pub use settings::{AuthSettings, LoginLimits};
pub use stores::{
    DynFamilyDirectory, DynRateLimitStore, DynRevocationStore, DynUserStore, FamilyDirectory,
    RateCount, RateLimitStore, RateLimitStoreExt, RevocationStore, Tally, UserStore,
};
pub use tokens::{
    AccessClaims, DEFAULT_ISSUER, IssuedToken, MAX_LEEWAY, MAX_TOKEN_BYTES, MIN_SECRET_BYTES,
    TokenAlgorithm, TokenCodec, TokenKeys, TokenRejection,
};

use crate::access::{Principal, UserRole};
use crate::error::{Error, Result};
use crate::ids::UserId;

/// The stores auth uses.
#[derive(Debug, Clone)]
pub struct AuthStores {
    /// Users.
    pub users: DynUserStore,
    /// Families.
    pub families: DynFamilyDirectory,
    /// Refresh tokens and revocations.
    pub revocations: DynRevocationStore,
    /// Login-throttle counters.
    pub limits: DynRateLimitStore,
    /// Audit events.
    pub audit: DynAuditSink,
}

impl AuthStores {
    /// In-memory stores, auditing to `tracing`.
    pub fn in_memory() -> Self {
        Self {
            users: Arc::new(InMemoryUserStore::new()),
            families: Arc::new(InMemoryFamilyDirectory::new()),
            revocations: Arc::new(InMemoryRevocationStore::new()),
            limits: Arc::new(InMemoryRateLimitStore::new()),
            audit: Arc::new(TracingAuditSink),
        }
    }
}

/// A user as clients see it (no password hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PublicUser {
    /// The user id.
    pub user_id: UserId,
    /// Email.
    pub email: String,
    /// Display name.
    pub display_name: String,
    /// Role.
    pub role: UserRole,
    /// Place in a family.
    pub user_type: UserType,
    /// Family.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family_id: Option<crate::ids::FamilyId>,
}

impl From<&User> for PublicUser {
    fn from(user: &User) -> Self {
        Self {
            user_id: user.user_id.clone(),
            email: user.email.clone(),
            display_name: user.display_name.clone(),
            role: user.role,
            user_type: user.user_type,
            family_id: user.family_id.clone(),
        }
    }
}

/// A successful login or refresh (the legacy `AuthResponse` plus `refreshToken`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoginResponse {
    /// The access token (a JWT).
    pub token: String,
    /// The refresh token: opaque, single use.
    pub refresh_token: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Who logged in.
    pub user: PublicUser,
}

/// Logins, tokens and the access policy.
#[derive(Debug, Clone)]
pub struct AuthService {
    inner: Arc<AuthInner>,
}

/// What [`AuthService::erase_user_records`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AccountErasure {
    /// The account was there and is gone.
    pub account: bool,
    /// Families the user was taken out of.
    pub families: u64,
    /// Refresh token records removed.
    pub refresh_tokens: u64,
}

/// The name a login counter gives an account: a digest of its email.
fn account_digest(email: &str) -> String {
    use sha2::Digest as _;
    hex::encode(&sha2::Sha256::digest(email.as_bytes())[..16])
}

#[derive(Debug)]
struct AuthInner {
    stores: AuthStores,
    codec: TokenCodec,
    hasher: PasswordHasher,
    refresh_ttl: Duration,
    registration: bool,
    keep_legacy_hashes: bool,
    limits: LoginLimits,
    /// Verified against when the account does not exist, so a login takes as long either way.
    dummy_hash: String,
    /// Access tokens whose signature and claims were checked already.
    verified: verified::VerifiedTokens,
}

fn invalid_credentials() -> Error {
    Error::unauthorized("Invalid email or password")
}

fn hash_refresh(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn span(op: &'static str) -> tracing::Span {
    tracing::debug_span!("cmz.backend", kind = "auth", op)
}

impl AuthService {
    /// Builds the service; seeds the development users when the settings have them.
    pub async fn new(settings: AuthSettings, stores: AuthStores) -> Result<Self> {
        let codec =
            TokenCodec::new(settings.keys, settings.access_ttl).with_leeway(settings.leeway)?;
        let dummy_hash = settings.hasher.hash("not a real password").await?;
        if let Some(dev) = &settings.dev_users {
            dev.seed(&*stores.users, &*stores.families, &settings.hasher)
                .await?;
        }
        Ok(Self {
            inner: Arc::new(AuthInner {
                stores,
                codec,
                hasher: settings.hasher,
                refresh_ttl: settings.refresh_ttl,
                registration: settings.registration,
                keep_legacy_hashes: settings.keep_legacy_hashes,
                limits: settings.login_limits,
                dummy_hash,
                verified: verified::VerifiedTokens::default(),
            }),
        })
    }

    /// The stores (for this crate's tests; front ends go through this service's methods
    /// and [`ConversationService`](crate::service::ConversationService)'s).
    #[cfg(test)]
    pub(crate) fn stores(&self) -> &AuthStores {
        &self.inner.stores
    }

    /// The platform access policy over this service's families and audit sink, for
    /// [`ConversationService`](crate::service::ConversationService).
    pub fn policy(&self) -> PlatformPolicy {
        PlatformPolicy::new(
            self.inner.stores.families.clone(),
            self.inner.stores.audit.clone(),
        )
    }

    async fn audit(
        &self,
        kind: AuditKind,
        outcome: AuditOutcome,
        actor: Option<&UserId>,
        reason: &str,
    ) {
        let mut event = AuditEvent::new(kind, outcome, reason);
        event.actor = actor.cloned();
        self.inner.stores.audit.record(event).await;
    }

    /// Counts one attempt on each key (in order) and refuses once a key is over its limit;
    /// the count is taken before any password work, so concurrent attempts are all seen.
    async fn reserve_attempt(&self, keys: &[(String, u32)]) -> Result<()> {
        let window = self.inner.limits.window;
        for (key, max) in keys {
            self.inner
                .stores
                .limits
                .check(key, *max, window, "Too many failed logins; try again later")
                .instrument(span("rate_hit"))
                .await?;
        }
        Ok(())
    }

    /// Counts one request of `kind` (a registration, a token refresh, …) from `client` (an
    /// address or API key; `None` shares one bucket) in the shared rate-limit store, and
    /// refuses it with `rate_limit_exceeded` (and the wait) once there were more than
    /// `limit` in `window`. Front ends bound per-client work with it without reaching the
    /// store; the count holds across servers sharing the store.
    #[tracing::instrument(name = "cmz.limit_client", skip_all, fields(kind))]
    pub async fn limit_client(
        &self,
        kind: &str,
        client: Option<&str>,
        limit: u32,
        window: Duration,
        message: &str,
    ) -> Result<()> {
        let key = format!("{kind}:{}", client.unwrap_or("unknown"));
        self.inner
            .stores
            .limits
            .check(&key, limit, window, message)
            .instrument(span("rate_hit"))
            .await
            .map(drop)
    }

    /// Logs in with email and password. `client` (an IP address or API key) keys the
    /// attempt limits of [`LoginLimits`]; an unknown account costs one hash like a known one.
    ///
    /// Errors: `unauthorized` for a wrong email or password (the same message for both),
    /// `rate_limit_exceeded` with a retry time after too many attempts, or when too many
    /// password hashes are running or waiting already ([`HashGate`]).
    #[tracing::instrument(name = "cmz.login", skip_all)]
    pub async fn login(
        &self,
        email: &str,
        password: &str,
        client: Option<&str>,
    ) -> Result<LoginResponse> {
        let inner = &self.inner;
        let email = normalize_email(email).map_err(|_| invalid_credentials())?;
        // Per account and client first: the attacker's own counter fills before the shared ones.
        let limits = &inner.limits;
        let client = client.unwrap_or("-");
        // Counters name the account by a digest of its email: a counter store (DynamoDB's
        // meta table) never holds who tried to log in.
        let account = account_digest(&email);
        let keys = [
            (
                format!("login:account:{account}:client:{client}"),
                limits.per_account,
            ),
            (format!("login:client:{client}"), limits.per_client),
            (format!("login:account:{account}"), limits.per_account_total),
        ];
        self.reserve_attempt(&keys).await?;
        let user = inner
            .stores
            .users
            .find_by_email(&email)
            .instrument(span("find_by_email"))
            .await?;
        let stored = user
            .as_ref()
            .filter(|u| !u.soft_delete)
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| inner.dummy_hash.clone());
        let check = inner.hasher.verify(password, &stored).await?;
        let (user, needs_rehash) = match (user, check) {
            (Some(user), PasswordCheck::Valid { needs_rehash })
                if !user.soft_delete && user.password_hash.is_some() =>
            {
                (user, needs_rehash)
            }
            (user, _) => {
                self.audit(
                    AuditKind::LoginFailed,
                    AuditOutcome::Denied,
                    user.as_ref().map(|u| &u.user_id),
                    "wrong email or password",
                )
                .await;
                return Err(invalid_credentials());
            }
        };
        let throttle = &inner.stores.limits;
        throttle
            .reset(&keys[0].0)
            .instrument(span("rate_reset"))
            .await?;
        for (key, _) in &keys[1..] {
            throttle
                .release(key)
                .instrument(span("rate_release"))
                .await?;
        }
        let legacy_hash = user
            .password_hash
            .as_deref()
            .is_some_and(|h| !h.starts_with("$argon2"));
        if needs_rehash && !(legacy_hash && inner.keep_legacy_hashes) {
            // Upgrade legacy PBKDF2 (or weaker argon2) hashes while we have the password.
            match inner.hasher.hash(password).await {
                Ok(hash) => {
                    if let Err(e) = inner
                        .stores
                        .users
                        .set_password_hash(&user.user_id, &hash)
                        .instrument(span("set_password_hash"))
                        .await
                    {
                        tracing::warn!(code = e.code().as_str(), error = %e, "password hash upgrade failed; will retry at next login");
                    } else {
                        tracing::info!(user = %user.user_id, "password hash upgraded to argon2id");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "password rehash failed"),
            }
        }
        self.issue_pair(&user, None).await
    }

    /// A new access token and refresh token, in `chain` (a refresh) or a new chain (a login).
    async fn issue_pair(&self, user: &User, chain: Option<String>) -> Result<LoginResponse> {
        let inner = &self.inner;
        let chain = match chain {
            Some(chain) => chain,
            None => hex::encode(random_bytes::<16>()?),
        };
        let access = inner.codec.issue(user, Some(&chain))?;
        let refresh_token = format!("cmzr_{}", URL_SAFE_NO_PAD.encode(random_bytes::<32>()?));
        let now = Utc::now();
        let record = RefreshRecord {
            token_hash: hash_refresh(&refresh_token),
            chain_id: chain,
            user_id: user.user_id.clone(),
            issued_at: now,
            expires_at: now
                + chrono::TimeDelta::from_std(inner.refresh_ttl)
                    .unwrap_or(chrono::TimeDelta::days(30)),
        };
        inner
            .stores
            .revocations
            .insert_refresh(&record)
            .instrument(span("insert_refresh"))
            .await?;
        Ok(LoginResponse {
            token: access.token,
            refresh_token,
            expires_in: inner.codec.ttl().as_secs(),
            user: PublicUser::from(user),
        })
    }

    /// Whether `user` has an account. For callers that already checked the principal may
    /// act on the user (an erasure): the answer says who exists.
    pub async fn has_account(&self, user: &UserId) -> Result<bool> {
        Ok(self.inner.stores.users.get_user(user).await?.is_some())
    }

    /// Removes what the auth stores hold about `user` for an erasure of their data: their
    /// refresh tokens (so no session of theirs can be renewed), their place in every family,
    /// their account, and their turn counter. `principal` needs the policy's delete right
    /// on the user (the user, their parent, an administrator); the erasure is audited with
    /// counts only. Repeating it is harmless. `cmz_env::Services::erase_user` runs it
    /// after deleting the user's conversations.
    #[tracing::instrument(name = "cmz.erase_user_records", skip_all, fields(user = %principal.user_id, subject = %user))]
    pub async fn erase_user_records(
        &self,
        principal: &Principal,
        user: &UserId,
    ) -> Result<AccountErasure> {
        use crate::access::AccessPolicy as _;
        self.policy()
            .authorize(principal, crate::access::Action::Delete, user)
            .await?;
        let stores = &self.inner.stores;
        let tokens = stores
            .revocations
            .forget_user(user)
            .instrument(span("forget_user"))
            .await?;
        stores
            .limits
            .reset(&crate::service::turn_limit_key(user))
            .await?;
        let mut families = 0;
        for mut family in stores.families.families_of(user).await? {
            family.parents.retain(|p| p != user);
            family.students.retain(|s| s != user);
            stores.families.put_family(&family).await?;
            families += 1;
        }
        // The account last: a store may find the user's families through it, so an
        // erasure interrupted before this point finds them again when it is run again (by
        // an administrator: the parent's link to the child is gone).
        let account = match stores.users.get_user(user).await? {
            Some(record) => stores.users.delete_user(&record).await?,
            None => false,
        };
        let erasure = AccountErasure {
            account,
            families,
            refresh_tokens: tokens,
        };
        let mut event = AuditEvent::new(
            AuditKind::Erasure,
            AuditOutcome::Allowed,
            format!(
                "erasure: account {}, {families} families, {tokens} refresh tokens",
                if account { "removed" } else { "absent" }
            ),
        );
        event.actor = Some(principal.user_id.clone());
        event.actor_role = Some(principal.role);
        event.subject = Some(user.clone());
        stores.audit.record(event).await;
        Ok(erasure)
    }

    /// Exchanges a refresh token for a new access token and a new refresh token (the old
    /// one stops working). Presenting a refresh token a second time revokes its whole
    /// family, including access tokens issued from it: someone has a copy.
    #[tracing::instrument(name = "cmz.refresh", skip_all)]
    pub async fn refresh(&self, refresh_token: &str) -> Result<LoginResponse> {
        let inner = &self.inner;
        let rejected = || Error::unauthorized("Invalid or expired refresh token");
        if refresh_token.len() > 256 || !refresh_token.starts_with("cmzr_") {
            return Err(rejected());
        }
        let state = inner
            .stores
            .revocations
            .consume_refresh(&hash_refresh(refresh_token))
            .instrument(span("consume_refresh"))
            .await?;
        let record = match state {
            RefreshState::Unknown => return Err(rejected()),
            RefreshState::Reused(record) => {
                let until = record.expires_at.max(
                    Utc::now()
                        + chrono::TimeDelta::from_std(inner.codec.ttl())
                            .unwrap_or(chrono::TimeDelta::days(1)),
                );
                inner
                    .stores
                    .revocations
                    .revoke_chain(&record.chain_id, until)
                    .instrument(span("revoke_chain"))
                    .await?;
                self.audit(
                    AuditKind::RefreshReuse,
                    AuditOutcome::Denied,
                    Some(&record.user_id),
                    "rotated refresh token presented again; every token of this login revoked",
                )
                .await;
                return Err(rejected());
            }
            RefreshState::Fresh(record) => record,
        };
        if record.expires_at <= Utc::now()
            || inner
                .stores
                .revocations
                .is_revoked(None, Some(&record.chain_id))
                .instrument(span("is_revoked"))
                .await?
        {
            return Err(rejected());
        }
        let user = inner
            .stores
            .users
            .get_user(&record.user_id)
            .instrument(span("get_user"))
            .await?
            .filter(|u| !u.soft_delete)
            .ok_or_else(rejected)?;
        self.issue_pair(&user, Some(record.chain_id)).await
    }

    /// Verifies an access token (signature, claims, revocation) and returns the caller.
    ///
    /// A token seen before is not decoded again: its signature and claims were checked the
    /// first time; its expiry and revocation are checked on every call.
    pub async fn authenticate(&self, access_token: &str) -> Result<Principal> {
        let inner = &self.inner;
        let known = match inner.verified.get(access_token) {
            Some(known) if inner.codec.check_lifetime(known.exp, known.nbf).is_ok() => known,
            stale => {
                if stale.is_some() {
                    inner.verified.remove(access_token);
                }
                let (principal, claims) = self.decode(access_token)?;
                let known = verified::Verified {
                    principal,
                    exp: claims.exp,
                    nbf: claims.nbf,
                    jti: claims.jti,
                    sid: claims.sid,
                };
                inner.verified.insert(access_token, known.clone());
                known
            }
        };
        self.check_revocation(known.jti.as_deref(), known.sid.as_deref())
            .await?;
        Ok(known.principal)
    }

    async fn check_revocation(&self, jti: Option<&str>, sid: Option<&str>) -> Result<()> {
        if (jti.is_some() || sid.is_some())
            && self
                .inner
                .stores
                .revocations
                .is_revoked(jti, sid)
                .instrument(span("is_revoked"))
                .await?
        {
            return Err(TokenRejection::Revoked.into_error());
        }
        Ok(())
    }

    /// The caller and claims of a token whose signature and claims verify (revocation not
    /// checked).
    fn decode(&self, access_token: &str) -> Result<(Principal, AccessClaims)> {
        let claims = self.inner.codec.verify(access_token)?;
        let principal = claims.principal().map_err(TokenRejection::into_error)?;
        Ok((principal, claims))
    }

    /// Verifies an access token and returns the caller and the token's claims.
    pub async fn verify(&self, access_token: &str) -> Result<(Principal, AccessClaims)> {
        let (principal, claims) = self.decode(access_token)?;
        self.check_revocation(claims.jti.as_deref(), claims.sid.as_deref())
            .await?;
        Ok((principal, claims))
    }

    /// Logs out: revokes this access token (by `jti`) and its refresh chain until they
    /// expire. Tokens without those claims (minted by the legacy services) cannot be
    /// revoked and simply expire.
    #[tracing::instrument(name = "cmz.logout", skip_all)]
    pub async fn logout(&self, access_token: &str) -> Result<()> {
        let (principal, claims) = self.verify(access_token).await?;
        let revocations = &self.inner.stores.revocations;
        let until = chrono::DateTime::from_timestamp(claims.exp, 0).unwrap_or_else(Utc::now)
            + chrono::TimeDelta::seconds(MAX_LEEWAY.as_secs() as i64);
        if let Some(jti) = &claims.jti {
            revocations
                .revoke_token_id(jti, until)
                .instrument(span("revoke_token_id"))
                .await?;
        }
        if let Some(chain) = &claims.sid {
            let refresh_until = until.max(
                Utc::now()
                    + chrono::TimeDelta::from_std(self.inner.refresh_ttl)
                        .unwrap_or(chrono::TimeDelta::days(30)),
            );
            revocations
                .revoke_chain(chain, refresh_until)
                .instrument(span("revoke_chain"))
                .await?;
        }
        self.audit(
            AuditKind::Logout,
            AuditOutcome::Allowed,
            Some(&principal.user_id),
            "logout",
        )
        .await;
        Ok(())
    }

    /// Registers a new user (role `visitor`) and logs them in, when registration is on.
    ///
    /// Errors: `forbidden` when registration is off, `validation_error` for a bad email or
    /// a password under 8 characters, `conflict` when the email is taken.
    #[tracing::instrument(name = "cmz.register", skip_all)]
    pub async fn register(
        &self,
        email: &str,
        password: &str,
        display_name: &str,
    ) -> Result<LoginResponse> {
        let inner = &self.inner;
        if !inner.registration {
            return Err(Error::forbidden("registration is disabled"));
        }
        let email = normalize_email(email)?;
        if password.chars().count() < 8 {
            return Err(Error::validation(
                "password",
                "password must be at least 8 characters",
            ));
        }
        if display_name.chars().count() > 100 {
            return Err(Error::validation(
                "displayName",
                "display name is at most 100 characters",
            ));
        }
        let user = User {
            user_id: UserId::new(format!("user_{}", hex::encode(random_bytes::<8>()?)))?,
            email,
            display_name: display_name.trim().to_owned(),
            role: UserRole::Visitor,
            user_type: UserType::None,
            family_id: None,
            password_hash: Some(inner.hasher.hash(password).await?),
            soft_delete: false,
        };
        inner
            .stores
            .users
            .create_user(&user)
            .instrument(span("create_user"))
            .await
            .map_err(|e| match e {
                Error::Conflict { .. } => {
                    Error::conflict("an account with this email already exists")
                }
                other => other,
            })?;
        self.issue_pair(&user, None).await
    }
}

#[cfg(test)]
mod tests;

//! What the front ends read about users and families, and the tokens and hashes trusted
//! server code makes: through the service, under the policy, so no front end needs the
//! raw stores.

use std::collections::HashMap;
use std::time::Duration;

use futures::{StreamExt as _, TryStreamExt as _};
use tracing::Instrument as _;

use super::{AuthService, Family, IssuedToken, PasswordCheck, User, UserType, span};
use crate::access::{Principal, UserRole};
use crate::error::{Error, Result};
use crate::ids::{FamilyId, UserId};

/// How many user lookups run at once when naming the owners of a listing.
const CONCURRENT_LOOKUPS: usize = 8;

/// A token for a user described by trusted server code (the user need not be stored):
/// see [`AuthService::issue_token`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct TokenRequest {
    /// The user id (`user_id`, `userId` and `sub` claims).
    pub user_id: UserId,
    /// The email claim.
    pub email: String,
    /// The role claim.
    pub role: UserRole,
    /// The user's family, if any.
    pub family_id: Option<FamilyId>,
    /// The token's lifetime; `None` is the configured one.
    pub expires_in: Option<Duration>,
    /// Extra claims (see [`TokenCodec::issue_with`](super::TokenCodec::issue_with)).
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl TokenRequest {
    /// A token for `user_id` with `email` in `role`, the configured lifetime, no extras.
    pub fn new(user_id: UserId, email: impl Into<String>, role: UserRole) -> Self {
        Self {
            user_id,
            email: email.into(),
            role,
            family_id: None,
            expires_in: None,
            claims: serde_json::Map::new(),
        }
    }
}

impl AuthService {
    /// The caller's own user record (`GET /me`); `not_found` if it is not stored (a token
    /// issued for a user that was never saved, or deleted since).
    #[tracing::instrument(name = "cmz.me", skip_all, fields(user = %principal.user_id))]
    pub async fn me(&self, principal: &Principal) -> Result<User> {
        self.inner
            .stores
            .users
            .get_user(&principal.user_id)
            .instrument(span("get_user"))
            .await?
            .ok_or_else(|| Error::not_found("user"))
    }

    /// The families the caller may see: every family for the roles that see everything,
    /// otherwise the families the caller belongs to. Deleted families are left out.
    #[tracing::instrument(name = "cmz.visible_families", skip_all, fields(user = %principal.user_id))]
    pub async fn visible_families(&self, principal: &Principal) -> Result<Vec<Family>> {
        let families = &self.inner.stores.families;
        let listed = if principal.role.sees_everything() {
            families
                .list_families()
                .instrument(span("list_families"))
                .await?
        } else {
            families
                .families_of(&principal.user_id)
                .instrument(span("families_of"))
                .await?
        };
        Ok(listed.into_iter().filter(|f| !f.soft_delete).collect())
    }

    /// The live families that chose a retention of their own: what a retention job reads
    /// (no principal: the deployment's own rule; backends may scan).
    pub async fn families_with_retention(&self) -> Result<Vec<Family>> {
        let listed = self
            .inner
            .stores
            .families
            .list_families()
            .instrument(span("list_families"))
            .await?;
        Ok(listed
            .into_iter()
            .filter(|f| !f.soft_delete && f.retention_days.is_some())
            .collect())
    }

    /// The longest a family may choose to keep its conversations, in days (ten years); a
    /// deployment that keeps them less still deletes them sooner.
    pub const MAX_RETENTION_DAYS: u32 = 3650;

    /// Sets how long `family`'s conversations are kept (`None`: as long as the deployment
    /// keeps them; `Some(0)`: only until each conversation ends), for a parent of that
    /// family or a role that sees everything (`forbidden` for anyone else, `not_found` for
    /// an unknown or deleted family). Audited. `cmz_env::Services::apply_family_retention`
    /// applies it.
    #[tracing::instrument(name = "cmz.set_family_retention", skip_all, fields(user = %principal.user_id, family = %family))]
    pub async fn set_family_retention(
        &self,
        principal: &Principal,
        family: &FamilyId,
        days: Option<u32>,
    ) -> Result<Family> {
        if days.is_some_and(|d| d > Self::MAX_RETENTION_DAYS) {
            return Err(Error::validation(
                "days",
                format!("days is at most {}", Self::MAX_RETENTION_DAYS),
            ));
        }
        let families = &self.inner.stores.families;
        let mut found = families
            .get_family(family)
            .instrument(span("get_family"))
            .await?
            .filter(|f| !f.soft_delete)
            .ok_or_else(|| Error::not_found(format!("family {family}")))?;
        if !principal.role.sees_everything() && !found.parents.contains(&principal.user_id) {
            return Err(Error::forbidden(
                "only the family's parents choose how long its conversations are kept",
            ));
        }
        found.retention_days = days;
        families
            .put_family(&found)
            .instrument(span("put_family"))
            .await?;
        let mut event = super::AuditEvent::new(
            super::AuditKind::Retention,
            super::AuditOutcome::Allowed,
            match days {
                Some(0) => format!("family {family}: conversations kept until they end"),
                Some(d) => format!("family {family}: conversations kept {d} days"),
                None => format!("family {family}: conversations kept as the deployment keeps them"),
            },
        );
        event.actor = Some(principal.user_id.clone());
        event.actor_role = Some(principal.role);
        self.inner.stores.audit.record(event).await;
        Ok(found)
    }

    /// The students of `parent`'s families (deleted families left out), for a caller who
    /// is that parent or sees everything; `forbidden` for anyone else. Reading their
    /// conversations still passes the conversation policy, student by student.
    #[tracing::instrument(name = "cmz.students_of", skip_all, fields(user = %principal.user_id, parent = %parent))]
    pub async fn students_of(&self, principal: &Principal, parent: &UserId) -> Result<Vec<UserId>> {
        if parent != &principal.user_id && !principal.role.sees_everything() {
            return Err(Error::forbidden(
                "you may only read your own family's conversations",
            ));
        }
        let families = self
            .inner
            .stores
            .families
            .families_of(parent)
            .instrument(span("families_of"))
            .await?;
        let mut students: Vec<UserId> = families
            .into_iter()
            .filter(|f| !f.soft_delete && f.parents.contains(parent))
            .flat_map(|f| f.students)
            .collect();
        students.sort();
        students.dedup();
        Ok(students)
    }

    /// The display names of `users` that have one, for listings the caller was already
    /// allowed to read (so only names of owners the caller may see are asked for).
    pub async fn display_names(&self, users: &[UserId]) -> Result<HashMap<UserId, String>> {
        let store = self.inner.stores.users.clone();
        futures::stream::iter(users.to_vec())
            .map(move |user| {
                let store = store.clone();
                async move {
                    let name = store
                        .get_user(&user)
                        .instrument(span("get_user"))
                        .await?
                        .map(|u| u.display_name)
                        .filter(|n| !n.is_empty());
                    Ok::<_, Error>(name.map(|n| (user, n)))
                }
            })
            .buffer_unordered(CONCURRENT_LOOKUPS)
            .try_filter_map(|found| async move { Ok(found) })
            .try_collect()
            .await
    }

    /// Issues an access token for a user described by trusted server code (the legacy
    /// `generate_jwt_token`); the user need not be stored. Only server code that already
    /// decided who the user is should call this: the token is proof of identity.
    pub fn issue_token(&self, request: TokenRequest) -> Result<IssuedToken> {
        let user = User {
            user_id: request.user_id,
            email: request.email,
            display_name: String::new(),
            role: request.role,
            user_type: match request.role {
                UserRole::Parent => UserType::Parent,
                UserRole::Student => UserType::Student,
                _ => UserType::None,
            },
            family_id: request.family_id,
            password_hash: None,
            soft_delete: false,
        };
        self.inner
            .codec
            .issue_with(&user, None, request.expires_in, request.claims)
    }

    /// Hashes a password with this service's argon2id parameters.
    pub async fn hash_password(&self, password: &str) -> Result<String> {
        self.inner.hasher.hash(password).await
    }

    /// Checks a password against an argon2id or a legacy PBKDF2 hash.
    pub async fn verify_password(&self, password: &str, stored_hash: &str) -> Result<bool> {
        Ok(matches!(
            self.inner.hasher.verify(password, stored_hash).await?,
            PasswordCheck::Valid { .. }
        ))
    }
}

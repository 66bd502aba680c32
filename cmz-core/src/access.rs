//! Who is asking, and what they may see: the principal and the access-policy hook.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{FamilyId, UserId};

/// A platform role, as carried in the legacy `role` claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum UserRole {
    /// Full administrator.
    Admin,
    /// Legacy synonym of admin.
    Administrator,
    /// Zoo staff who see every conversation.
    Zookeeper,
    /// Content editor.
    Editor,
    /// Member.
    Member,
    /// Plain user.
    User,
    /// A parent of a family.
    Parent,
    /// A student (child) of a family.
    Student,
    /// A visitor without an account history.
    Visitor,
}

impl UserRole {
    /// Roles that may read every user's conversations.
    pub fn sees_everything(self) -> bool {
        matches!(
            self,
            UserRole::Admin | UserRole::Administrator | UserRole::Zookeeper
        )
    }

    /// The lowercase wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::Admin => "admin",
            UserRole::Administrator => "administrator",
            UserRole::Zookeeper => "zookeeper",
            UserRole::Editor => "editor",
            UserRole::Member => "member",
            UserRole::User => "user",
            UserRole::Parent => "parent",
            UserRole::Student => "student",
            UserRole::Visitor => "visitor",
        }
    }
}

impl std::str::FromStr for UserRole {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        serde_json::from_value(serde_json::Value::String(value.to_ascii_lowercase()))
            .map_err(|_| Error::validation("role", format!("unknown role {value:?}")))
    }
}

/// A verified caller: who they are and in what role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The caller's user id.
    pub user_id: UserId,
    /// The caller's role.
    pub role: UserRole,
    /// The caller's family, if they belong to one.
    pub family_id: Option<FamilyId>,
}

impl Principal {
    /// A principal without a family.
    pub fn new(user_id: UserId, role: UserRole) -> Self {
        Self {
            user_id,
            role,
            family_id: None,
        }
    }
}

/// What a principal wants to do with a user's conversations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Action {
    /// Read history, sessions, session details; summarize (derived from what is read).
    Read,
    /// Take a turn.
    Write,
    /// Delete conversations.
    Delete,
}

/// Decides whether a principal may act on the conversations owned by a user.
///
/// # Contract
/// - Returns `Ok(())` to allow and `forbidden` to deny; deny by default for anything the
///   policy does not recognise.
/// - May consult backends (family membership); their failures are `unavailable`.
#[async_trait]
pub trait AccessPolicy: Debug + Send + Sync + 'static {
    /// Whether `principal` may perform `action` on data owned by `owner`.
    async fn authorize(&self, principal: &Principal, action: Action, owner: &UserId) -> Result<()>;

    /// Whether `principal` may perform `action` across every user's conversations at once
    /// (delete everything with an animal, or older than a date). The default allows
    /// admin-like roles only.
    async fn authorize_all(&self, principal: &Principal, _action: Action) -> Result<()> {
        if principal.role.sees_everything() {
            Ok(())
        } else {
            Err(Error::forbidden("this needs an administrator"))
        }
    }
}

/// A shared, type-erased access policy.
pub type DynAccessPolicy = Arc<dyn AccessPolicy>;

/// The built-in policy: a user acts on their own conversations; admin-like roles
/// (`admin`, `administrator`, `zookeeper`) may also read and delete everyone's. Nobody
/// writes turns into another user's conversation.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnerOrAdminPolicy;

#[async_trait]
impl AccessPolicy for OwnerOrAdminPolicy {
    async fn authorize(&self, principal: &Principal, action: Action, owner: &UserId) -> Result<()> {
        if &principal.user_id == owner {
            return Ok(());
        }
        match action {
            Action::Read | Action::Delete if principal.role.sees_everything() => Ok(()),
            _ => Err(Error::forbidden(
                "you do not have access to this user's conversations",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(user: &str, role: UserRole) -> Principal {
        Principal::new(UserId::new(user).unwrap(), role)
    }

    #[tokio::test]
    async fn owner_or_admin() {
        let owner = UserId::new("kid").unwrap();
        let policy = OwnerOrAdminPolicy;
        assert!(
            policy
                .authorize(&p("kid", UserRole::Student), Action::Write, &owner)
                .await
                .is_ok()
        );
        for role in [
            UserRole::Admin,
            UserRole::Administrator,
            UserRole::Zookeeper,
        ] {
            assert!(
                policy
                    .authorize(&p("boss", role), Action::Read, &owner)
                    .await
                    .is_ok()
            );
            assert!(
                policy
                    .authorize(&p("boss", role), Action::Delete, &owner)
                    .await
                    .is_ok()
            );
            let err = policy
                .authorize(&p("boss", role), Action::Write, &owner)
                .await
                .unwrap_err();
            assert_eq!(err.code(), "forbidden");
        }
        for role in [
            UserRole::Student,
            UserRole::Parent,
            UserRole::Visitor,
            UserRole::Editor,
        ] {
            let err = policy
                .authorize(&p("other", role), Action::Read, &owner)
                .await
                .unwrap_err();
            assert_eq!(err.code(), "forbidden");
        }
    }

    #[test]
    fn roles_parse() {
        assert_eq!("Admin".parse::<UserRole>().unwrap(), UserRole::Admin);
        assert_eq!(
            "zookeeper".parse::<UserRole>().unwrap(),
            UserRole::Zookeeper
        );
        assert_eq!(
            "root".parse::<UserRole>().unwrap_err().code(),
            "validation_error"
        );
    }
}

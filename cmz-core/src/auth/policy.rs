//! The access policy of the platform: roles, own data, families; every denial audited.

use async_trait::async_trait;

use super::audit::{AuditEvent, AuditKind, AuditOutcome, DynAuditSink};
use super::stores::DynFamilyDirectory;
use crate::access::{AccessPolicy, Action, Principal, UserRole};
use crate::error::{Error, Result};
use crate::ids::UserId;

/// Who may do what with whose conversations:
///
/// | principal | own | a student of their family | anyone else |
/// | --- | --- | --- | --- |
/// | admin, administrator, zookeeper | read, write, delete | read, delete (audited) | read, delete (audited) |
/// | parent | read, write, delete | read, delete (audited) | — |
/// | student, visitor, user, member, editor | read, write, delete | — | — |
///
/// Nobody writes turns into another user's conversation. A parent may delete their
/// children's conversations and erase their data (what parents are owed under COPPA and
/// GDPR-K), never another family's. Anything not in the table is denied, and every denial
/// is audited; so is every admin access to another user's data and every parent's delete.
#[derive(Debug, Clone)]
pub struct PlatformPolicy {
    families: DynFamilyDirectory,
    audit: DynAuditSink,
}

impl PlatformPolicy {
    /// The policy, looking families up in `families` and auditing to `audit`.
    pub fn new(families: DynFamilyDirectory, audit: DynAuditSink) -> Self {
        Self { families, audit }
    }

    async fn record(
        &self,
        kind: AuditKind,
        outcome: AuditOutcome,
        principal: &Principal,
        subject: Option<&UserId>,
        reason: &str,
    ) {
        let mut event = AuditEvent::new(kind, outcome, reason);
        event.actor = Some(principal.user_id.clone());
        event.actor_role = Some(principal.role);
        event.subject = subject.cloned();
        self.audit.record(event).await;
    }

    async fn is_parent_of(&self, parent: &UserId, student: &UserId) -> Result<bool> {
        let families = self.families.families_of(parent).await?;
        Ok(families.iter().any(|f| f.is_parent_of(parent, student)))
    }
}

#[async_trait]
impl AccessPolicy for PlatformPolicy {
    async fn authorize(&self, principal: &Principal, action: Action, owner: &UserId) -> Result<()> {
        if &principal.user_id == owner {
            return Ok(());
        }
        let kind = AuditKind::Access(action);
        if principal.role.sees_everything() && action != Action::Write {
            self.record(
                kind,
                AuditOutcome::Allowed,
                principal,
                Some(owner),
                "admin access to another user's data",
            )
            .await;
            return Ok(());
        }
        if principal.role == UserRole::Parent
            && matches!(action, Action::Read | Action::Delete)
            && self.is_parent_of(&principal.user_id, owner).await?
        {
            if action == Action::Delete {
                self.record(
                    kind,
                    AuditOutcome::Allowed,
                    principal,
                    Some(owner),
                    "a parent deletes their child's data",
                )
                .await;
            }
            return Ok(());
        }
        let reason = match (principal.role, action) {
            (_, Action::Write) => "only the owner takes turns in a conversation",
            (UserRole::Parent, _) => "not a student of the parent's family",
            _ => "not the owner",
        };
        self.record(kind, AuditOutcome::Denied, principal, Some(owner), reason)
            .await;
        Err(Error::forbidden(
            "you do not have access to this user's conversations",
        ))
    }

    async fn authorize_all(&self, principal: &Principal, action: Action) -> Result<()> {
        let kind = AuditKind::BulkAccess(action);
        if principal.role.sees_everything() {
            self.record(
                kind,
                AuditOutcome::Allowed,
                principal,
                None,
                "admin bulk operation",
            )
            .await;
            Ok(())
        } else {
            self.record(
                kind,
                AuditOutcome::Denied,
                principal,
                None,
                "bulk operations need an administrator",
            )
            .await;
            Err(Error::forbidden("this needs an administrator"))
        }
    }
}

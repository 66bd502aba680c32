//! Users, families and the records behind refresh tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::access::UserRole;
use crate::error::{Error, Result};
use crate::ids::{FamilyId, UserId};

/// The legacy `userType`: where a user sits in a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UserType {
    /// A parent of a family.
    Parent,
    /// A student (child) of a family.
    Student,
    /// Not part of a family.
    #[default]
    None,
}

/// A platform user (the legacy user table's item, camelCase on the wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// The user id.
    pub user_id: UserId,
    /// Login name, stored lowercased.
    pub email: String,
    /// Name shown in the UI.
    #[serde(default)]
    pub display_name: String,
    /// Platform role.
    pub role: UserRole,
    /// Place in a family.
    #[serde(default)]
    pub user_type: UserType,
    /// The user's family, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family_id: Option<FamilyId>,
    /// Password hash: argon2id PHC string, or the legacy PBKDF2 `salt:hash` format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_hash: Option<String>,
    /// Soft-deleted users cannot log in.
    #[serde(default)]
    pub soft_delete: bool,
}

/// Normalizes and checks an email used as a login name.
pub fn normalize_email(email: &str) -> Result<String> {
    let email = email.trim().to_lowercase();
    let valid = email.len() <= 254
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        })
        && !email.chars().any(|c| c.is_whitespace() || c.is_control());
    if valid {
        Ok(email)
    } else {
        Err(Error::validation(
            "email",
            "a valid email address is required",
        ))
    }
}

/// A family: parents who may read their students' conversations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Family {
    /// The family id.
    pub family_id: FamilyId,
    /// Display name.
    pub family_name: String,
    /// Parent user ids.
    #[serde(default)]
    pub parents: Vec<UserId>,
    /// Student user ids.
    #[serde(default)]
    pub students: Vec<UserId>,
    /// Soft-deleted families grant nothing.
    #[serde(default)]
    pub soft_delete: bool,
    /// How long the family's conversations are kept, in days, when the family chose less
    /// than the deployment keeps (`CMZ_RETENTION_DAYS`); `Some(0)` keeps them only until
    /// the conversation ends (see `cmz_env::Services::apply_family_retention`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_days: Option<u32>,
}

impl Family {
    /// Whether `parent` is a parent and `student` a student of this (live) family.
    pub fn is_parent_of(&self, parent: &UserId, student: &UserId) -> bool {
        !self.soft_delete && self.parents.contains(parent) && self.students.contains(student)
    }
}

/// A stored refresh token (only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshRecord {
    /// SHA-256 of the token, hex.
    pub token_hash: String,
    /// The refresh chain: every token issued from one login, each refresh rotating to the
    /// next (the "token family" of OAuth's reuse detection; not a user's family).
    pub chain_id: String,
    /// Whose token it is.
    pub user_id: UserId,
    /// When it was issued.
    pub issued_at: DateTime<Utc>,
    /// When it stops working.
    pub expires_at: DateTime<Utc>,
}

/// What consuming a refresh token found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshState {
    /// No such token.
    Unknown,
    /// The token was unused; it is now marked used.
    Fresh(RefreshRecord),
    /// The token had been used before: a replay (theft, or a client bug).
    Reused(RefreshRecord),
}

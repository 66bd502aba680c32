//! Development users and families, from one configuration source.
//!
//! The embedded set (`dev-users.json` beside this file) holds `admin@cmz.org` /
//! `admin123` (admin), a parent and two students of one family, and a student of another
//! family. `CMZ_DEV_USERS` chooses the source: `embedded`, or the path of a JSON file of the
//! same shape. Without it (production), nothing is seeded.

use serde::Deserialize;

use super::model::{Family, User, UserType, normalize_email};
use super::password::PasswordHasher;
use super::stores::{FamilyDirectory, UserStore};
use crate::access::UserRole;
use crate::error::{Error, Result};
use crate::ids::{FamilyId, UserId};

/// The embedded development users, as JSON.
pub const EMBEDDED_DEV_USERS: &str = include_str!("dev-users.json");

/// One development user, with a plain password (hashed when seeded).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DevUser {
    /// The user id.
    pub user_id: UserId,
    /// Login email.
    pub email: String,
    /// Plain password (development only).
    pub password: String,
    /// Display name.
    #[serde(default)]
    pub display_name: String,
    /// Role.
    pub role: UserRole,
    /// Place in a family.
    #[serde(default)]
    pub user_type: UserType,
    /// Family.
    #[serde(default)]
    pub family_id: Option<FamilyId>,
}

/// Development users and families.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DevDirectory {
    /// Users to create.
    pub users: Vec<DevUser>,
    /// Families to create.
    #[serde(default)]
    pub families: Vec<Family>,
}

impl DevDirectory {
    /// The embedded set.
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEV_USERS, "embedded dev users").expect("the embedded dev users parse")
    }

    /// Parses a JSON document of the embedded set's shape; `origin` names it in errors.
    pub fn parse(json: &str, origin: &str) -> Result<Self> {
        let directory: Self = serde_json::from_str(json)
            .map_err(|e| Error::validation("CMZ_DEV_USERS", origin).with_source(e))?;
        for user in &directory.users {
            normalize_email(&user.email)?;
        }
        Ok(directory)
    }

    /// Loads the source named by `CMZ_DEV_USERS`: `embedded` (or `1`/`true`) or a file path.
    pub fn load(source: &str) -> Result<Self> {
        match source.trim() {
            "embedded" | "1" | "true" => Ok(Self::embedded()),
            path => {
                let json = std::fs::read_to_string(path).map_err(|e| {
                    Error::validation(
                        "CMZ_DEV_USERS",
                        format!("cannot read dev users file {path:?}"),
                    )
                    .with_source(e)
                })?;
                Self::parse(&json, path)
            }
        }
    }

    /// Creates the users (passwords hashed with `hasher`) and families; users and families
    /// that already exist are left as they are (a family's chosen retention, a parent's
    /// changes survive a restart).
    pub async fn seed(
        &self,
        users: &dyn UserStore,
        families: &dyn FamilyDirectory,
        hasher: &PasswordHasher,
    ) -> Result<()> {
        for dev in &self.users {
            if users.get_user(&dev.user_id).await?.is_some() {
                continue;
            }
            let user = User {
                user_id: dev.user_id.clone(),
                email: normalize_email(&dev.email)?,
                display_name: dev.display_name.clone(),
                role: dev.role,
                user_type: dev.user_type,
                family_id: dev.family_id.clone(),
                password_hash: Some(hasher.hash(&dev.password).await?),
                soft_delete: false,
            };
            match users.create_user(&user).await {
                Ok(()) | Err(Error::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        for family in &self.families {
            if families.get_family(&family.family_id).await?.is_none() {
                families.put_family(family).await?;
            }
        }
        tracing::info!(
            users = self.users.len(),
            families = self.families.len(),
            "development users seeded"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_set_has_what_the_demo_needs() {
        let dev = DevDirectory::embedded();
        let admin = dev
            .users
            .iter()
            .find(|u| u.email == "admin@cmz.org")
            .unwrap();
        assert_eq!(
            (admin.password.as_str(), admin.role),
            ("admin123", UserRole::Admin)
        );
        let rivera = dev
            .families
            .iter()
            .find(|f| f.family_id.as_str() == "family_rivera")
            .unwrap();
        assert_eq!(rivera.parents.len(), 1);
        assert_eq!(rivera.students.len(), 2);
        assert!(dev.users.iter().any(|u| {
            u.family_id
                .as_ref()
                .is_some_and(|f| f.as_str() == "family_chen")
        }));
    }

    #[test]
    fn bad_sources_are_clear_errors() {
        let err = DevDirectory::load("/nonexistent/dev.json").unwrap_err();
        assert_eq!(err.code(), "validation_error");
        assert!(err.to_string().contains("/nonexistent/dev.json"));
        let err = DevDirectory::parse(
            r#"{"users":[{"userId":"u","email":"nope","password":"p","role":"admin"}]}"#,
            "x",
        )
        .unwrap_err();
        assert_eq!(err.code(), "validation_error");
        assert!(DevDirectory::parse(r#"{"users":[], "extra": 1}"#, "x").is_err());
    }
}

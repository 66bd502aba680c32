//! Validated identifiers.
//!
//! Every id is checked once, where it enters the library: 1 to [`MAX_ID_LEN`] printable
//! ASCII characters other than `/` and `\` (so no whitespace, no control characters, no
//! path separators). That takes every id the legacy services make, such as user ids derived
//! from emails (`test+tag_cmz_org`), UUIDs and `session_<milliseconds>`. Past that point an
//! id is known to be safe to put in a key or a log line, and to put in a URL once
//! percent-encoded.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// The longest session id accepted: room for `conv_{animal}_{user}_{8 hex}` with the
/// longest animal and user ids.
pub const MAX_SESSION_ID_LEN: usize = 2 * MAX_ID_LEN + 16;

/// Printable ASCII except the path separators.
fn is_id_char(c: char) -> bool {
    c.is_ascii_graphic() && c != '/' && c != '\\'
}

fn validate(kind: &'static str, value: &str, max: usize) -> Result<()> {
    if value.is_empty() {
        return Err(Error::validation(kind, format!("{kind} must not be empty")));
    }
    if value.len() > max {
        return Err(Error::validation(
            kind,
            format!("{kind} is longer than {max} characters"),
        ));
    }
    // Ids are ASCII: a byte scan settles the common case, chars only name the culprit.
    if value
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'/' && b != b'\\')
    {
        return Ok(());
    }
    if let Some(bad) = value.chars().find(|c| !is_id_char(*c)) {
        return Err(Error::validation(
            kind,
            format!(
                "{kind} may only contain printable ASCII characters other than '/' and '\\' \
                 (no spaces or control characters; found {bad:?})"
            ),
        ));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$meta:meta])* $name:ident, $kind:literal) => {
        id_type!($(#[$meta])* $name, $kind, MAX_ID_LEN);
    };
    ($(#[$meta:meta])* $name:ident, $kind:literal, $max:expr) => {
        $(#[$meta])*
        ///
        /// Shared, not copied, when cloned: an id is cloned many times in a turn (into the
        /// session, both messages, the reply, spans and keys).
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(std::sync::Arc<str>);

        // Written as the plain string it is, without the copy `serde(into)` would make.
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl $name {
            /// Validates `value` and wraps it; a `validation_error` names the field.
            pub fn new(value: impl AsRef<str>) -> Result<Self> {
                let value = value.as_ref();
                validate($kind, value, $max)?;
                Ok(Self(value.into()))
            }

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = Error;
            fn try_from(value: String) -> Result<Self> {
                Self::new(value)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(value: &str) -> Result<Self> {
                Self::new(value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(value: &str) -> Result<Self> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0.as_ref().to_owned()
            }
        }
    };
}

id_type!(
    /// A user of the platform (`userId` on the wire).
    UserId,
    "userId"
);
id_type!(
    /// An animal ambassador, and so the persona that speaks for it (`animalId`).
    AnimalId,
    "animalId"
);
id_type!(
    /// A conversation session; it is also the conversation id (`sessionId`).
    SessionId,
    "sessionId",
    MAX_SESSION_ID_LEN
);
id_type!(
    /// One stored message (`messageId`).
    MessageId,
    "messageId"
);
id_type!(
    /// A family grouping parents and students (`familyId`).
    FamilyId,
    "familyId"
);

impl SessionId {
    /// A new session id in the legacy format `conv_{animal}_{user}_{8 hex}`, with random hex.
    pub fn generate(animal: &AnimalId, user: &UserId) -> Result<Self> {
        let random: u32 = fastrand::u32(..);
        Self::with_suffix(animal, user, random)
    }

    /// A session id in the legacy format with a chosen 32-bit suffix (as 8 hex digits),
    /// used to derive the same id from the same idempotency key.
    pub fn with_suffix(animal: &AnimalId, user: &UserId, suffix: u32) -> Result<Self> {
        let mut id = String::with_capacity("conv___".len() + 8 + animal.0.len() + user.0.len());
        id.push_str("conv_");
        id.push_str(&animal.0);
        id.push('_');
        id.push_str(&user.0);
        id.push('_');
        for shift in (0..8).rev() {
            id.push(char::from(HEX[(suffix >> (shift * 4)) as usize & 0xf]));
        }
        Self::new(id)
    }
}

/// A random UUID v4, hyphenated, from a fast thread-local generator rather than a system
/// call: for ids that must be unique but need not be unguessable (message ids, request ids).
pub fn fast_uuid_v4() -> String {
    fast_uuid_v4_with(str::to_owned)
}

/// A fast random UUID v4 handed to `make` as text, without an intermediate `String`.
fn fast_uuid_v4_with<T>(make: impl FnOnce(&str) -> T) -> T {
    let bytes = fastrand::u128(..).to_le_bytes();
    let mut text = uuid::Uuid::encode_buffer();
    make(
        uuid::Builder::from_random_bytes(bytes)
            .into_uuid()
            .hyphenated()
            .encode_lower(&mut text),
    )
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl MessageId {
    /// A new random message id (a UUID v4, as the legacy store wrote).
    ///
    /// Ids only need to be unique, not unguessable (access is checked on the session), so
    /// they come from [`fast_uuid_v4`].
    pub fn generate() -> Self {
        Self(fast_uuid_v4_with(|text| std::sync::Arc::from(text)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_legacy_shapes() {
        for ok in [
            "user_123-abc",
            "test+tag_cmz_org",
            "o'brien_cmz_org",
            "session_1730000000000",
            "a.b@c:d~e!f",
        ] {
            assert!(UserId::new(ok).is_ok(), "{ok}");
        }
        assert!(MessageId::new(uuid::Uuid::new_v4().to_string()).is_ok());
        let id = SessionId::generate(&AnimalId::new("lion").unwrap(), &UserId::new("u1").unwrap())
            .unwrap();
        let s = id.as_str();
        assert!(s.starts_with("conv_lion_u1_"), "{s}");
        let hex = &s["conv_lion_u1_".len()..];
        assert_eq!(hex.len(), 8);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn rejects_bad_ids_with_the_field_named() {
        for bad in [
            "",
            "a b",
            "x/../y",
            "x\\y",
            "ünï",
            "a\0b",
            "a\nb",
            "a\tb",
            "a\u{7f}b",
            "a\u{202e}b",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            let err = UserId::new(bad).unwrap_err();
            assert_eq!(err.code(), "validation_error", "{bad:?}");
            assert!(matches!(
                err,
                Error::Validation {
                    field: Some("userId"),
                    ..
                }
            ));
        }
        assert!(UserId::new("x".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn the_longest_ids_make_a_valid_session_id() {
        let animal = AnimalId::new("a".repeat(MAX_ID_LEN)).unwrap();
        let user = UserId::new("u".repeat(MAX_ID_LEN)).unwrap();
        assert!(SessionId::generate(&animal, &user).is_ok());
        assert!(SessionId::new("s".repeat(MAX_SESSION_ID_LEN + 1)).is_err());
    }

    #[test]
    fn serde_validates() {
        let ok: AnimalId = serde_json::from_str("\"lion\"").unwrap();
        assert_eq!(ok.as_str(), "lion");
        assert!(serde_json::from_str::<AnimalId>("\"li on\"").is_err());
        assert_eq!(serde_json::to_string(&ok).unwrap(), "\"lion\"");
    }
}

//! The claims of an access token, and why a token was refused.

use serde::{Deserialize, Deserializer, Serialize};

use crate::access::{Principal, UserRole};
use crate::error::Error;
use crate::ids::{FamilyId, UserId};

/// The claims of a cmz access token: the legacy set plus `jti`, `sid` and `familyId`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user id (legacy snake_case claim).
    pub user_id: String,
    /// The user id again (legacy camelCase claim).
    #[serde(rename = "userId", default, skip_serializing_if = "Option::is_none")]
    pub user_id_camel: Option<String>,
    /// The user's email.
    #[serde(default)]
    pub email: String,
    /// The user's role.
    pub role: String,
    /// Same as role in the legacy tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_type: Option<String>,
    /// Expiry, seconds since the epoch (a non-negative number; fractions are rounded).
    #[serde(deserialize_with = "numeric_date")]
    pub exp: i64,
    /// Issued at, seconds since the epoch.
    #[serde(default, deserialize_with = "seconds")]
    pub iat: i64,
    /// Not valid before, seconds since the epoch (as `exp`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_numeric_date"
    )]
    pub nbf: Option<i64>,
    /// Issuer (`cmz-api`).
    pub iss: String,
    /// Subject: the user id.
    pub sub: String,
    /// Token id, for logout revocation (absent in legacy tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The refresh chain the token was issued in (absent in legacy tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    /// The user's family, if any.
    #[serde(rename = "familyId", default, skip_serializing_if = "Option::is_none")]
    pub family_id: Option<String>,
    /// Any other claims (legacy tokens carry extra user fields).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn seconds<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<i64, D::Error> {
    let value = serde_json::Number::deserialize(deserializer)?;
    value
        .as_i64()
        .or_else(|| value.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
        .ok_or_else(|| serde::de::Error::custom("a time claim must be a number of seconds"))
}

/// `exp` and `nbf` as jsonwebtoken reads them (RFC 7519's NumericDate): an unsigned
/// integer, or a finite float from 0 up to 2^64, rounded. Anything else (a negative number,
/// a string, a number past 2^64) is refused, so that both verification paths accept and
/// refuse the same tokens. Values past `i64::MAX` are kept as `i64::MAX` (never expired).
fn numeric_date<'de, D: Deserializer<'de>>(deserializer: D) -> std::result::Result<i64, D::Error> {
    struct NumericDate;
    impl serde::de::Visitor<'_> for NumericDate {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a non-negative number of seconds")
        }
        fn visit_u64<E: serde::de::Error>(self, value: u64) -> std::result::Result<i64, E> {
            Ok(i64::try_from(value).unwrap_or(i64::MAX))
        }
        fn visit_f64<E: serde::de::Error>(self, value: f64) -> std::result::Result<i64, E> {
            if value.is_finite() && value >= 0.0 && value < u64::MAX as f64 {
                // Saturates past i64::MAX, as the integer case.
                Ok(value.round() as i64)
            } else {
                Err(E::custom(
                    "a time claim must be a non-negative number of seconds",
                ))
            }
        }
    }
    deserializer.deserialize_any(NumericDate)
}

fn optional_numeric_date<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> std::result::Result<Option<i64>, D::Error> {
    numeric_date(deserializer).map(Some)
}

impl AccessClaims {
    /// The verified caller these claims describe.
    pub fn principal(&self) -> std::result::Result<Principal, TokenRejection> {
        if self.user_id != self.sub
            || self
                .user_id_camel
                .as_ref()
                .is_some_and(|id| id != &self.sub)
        {
            return Err(TokenRejection::InconsistentClaims);
        }
        let user_id =
            UserId::new(self.sub.as_str()).map_err(|_| TokenRejection::InconsistentClaims)?;
        let role: UserRole = self.role.parse().map_err(|_| TokenRejection::UnknownRole)?;
        Ok(Principal {
            user_id,
            role,
            family_id: self
                .family_id
                .as_deref()
                .and_then(|f| FamilyId::new(f).ok()),
        })
    }
}

/// Why a token was rejected. Logged, never sent to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenRejection {
    /// Longer than [`MAX_TOKEN_BYTES`](super::tokens::MAX_TOKEN_BYTES).
    Oversized,
    /// Not three base64url parts with a JSON header (includes `alg: none`).
    Malformed,
    /// The header's algorithm is not one this verifier was configured with.
    AlgorithmNotAllowed,
    /// No configured key has the header's `kid` (or several could match without one).
    UnknownKey,
    /// The signature does not verify.
    BadSignature,
    /// Past `exp` (plus leeway).
    Expired,
    /// Before `nbf` (minus leeway).
    NotYetValid,
    /// `iss` is not the configured issuer.
    WrongIssuer,
    /// A required claim is missing or has the wrong type.
    MissingClaim,
    /// `sub`, `user_id` and `userId` disagree, or the id is invalid.
    InconsistentClaims,
    /// The role is not a known one.
    UnknownRole,
    /// Revoked by logout or refresh-token theft detection.
    Revoked,
}

impl TokenRejection {
    /// A short reason for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRejection::Oversized => "oversized token",
            TokenRejection::Malformed => "malformed token",
            TokenRejection::AlgorithmNotAllowed => "algorithm not allowed",
            TokenRejection::UnknownKey => "unknown key id",
            TokenRejection::BadSignature => "bad signature",
            TokenRejection::Expired => "expired",
            TokenRejection::NotYetValid => "not yet valid",
            TokenRejection::WrongIssuer => "wrong issuer",
            TokenRejection::MissingClaim => "missing or invalid claim",
            TokenRejection::InconsistentClaims => "inconsistent subject claims",
            TokenRejection::UnknownRole => "unknown role",
            TokenRejection::Revoked => "revoked",
        }
    }

    /// The error sent to the client: the same for every reason.
    pub fn into_error(self) -> Error {
        tracing::warn!(reason = self.as_str(), "access token rejected");
        Error::unauthorized("Invalid or expired token")
    }
}

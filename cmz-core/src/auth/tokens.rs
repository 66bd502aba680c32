//! Access tokens: JWTs with the legacy claim set, HS256 by default, asymmetric keys with
//! `kid` for rotation, and a verifier that pins what it accepts.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use hmac::{Hmac, Mac as _};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::Deserialize;
use sha2::Sha256;

pub use super::claims::{AccessClaims, TokenRejection};
use super::model::User;
use crate::error::{Error, Result};

/// The legacy issuer claim.
pub const DEFAULT_ISSUER: &str = "cmz-api";
/// The shortest HS256 secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 32;
/// Tokens longer than this are rejected before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// The largest clock leeway allowed.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// A signature algorithm cmz signs or accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenAlgorithm {
    /// HMAC-SHA256 with a shared secret (the legacy default; Python services can verify).
    Hs256,
    /// Ed25519 (recommended for new deployments).
    EdDsa,
    /// RSA PKCS#1 v1.5 with SHA-256.
    Rs256,
    /// ECDSA P-256 with SHA-256.
    Es256,
}

impl TokenAlgorithm {
    fn jwt(self) -> Algorithm {
        match self {
            TokenAlgorithm::Hs256 => Algorithm::HS256,
            TokenAlgorithm::EdDsa => Algorithm::EdDSA,
            TokenAlgorithm::Rs256 => Algorithm::RS256,
            TokenAlgorithm::Es256 => Algorithm::ES256,
        }
    }
}

impl std::str::FromStr for TokenAlgorithm {
    type Err = Error;
    fn from_str(value: &str) -> Result<Self> {
        match value.to_ascii_uppercase().as_str() {
            "HS256" => Ok(TokenAlgorithm::Hs256),
            "EDDSA" => Ok(TokenAlgorithm::EdDsa),
            "RS256" => Ok(TokenAlgorithm::Rs256),
            "ES256" => Ok(TokenAlgorithm::Es256),
            _ => Err(Error::validation(
                "JWT_ALGORITHM",
                format!("unsupported JWT algorithm {value:?} (HS256, EdDSA, RS256 or ES256)"),
            )),
        }
    }
}

#[derive(Clone)]
struct VerificationKey {
    algorithm: TokenAlgorithm,
    kid: Option<String>,
    key: DecodingKey,
    /// For HS256: the MAC already keyed, cloned per verification (the fast path).
    hmac: Option<Hmac<Sha256>>,
}

fn keyed_hmac(secret: &[u8]) -> Option<Hmac<Sha256>> {
    Hmac::<Sha256>::new_from_slice(secret).ok()
}

/// Signing and verification keys.
///
/// One key signs; any number verify, so keys rotate without logging everyone out: add the
/// new key as the signer, keep the old public key as a verification key until the last
/// token it signed has expired.
#[derive(Clone)]
pub struct TokenKeys {
    algorithm: TokenAlgorithm,
    kid: Option<String>,
    signing: EncodingKey,
    verifying: Vec<VerificationKey>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .field(
                "verification_keys",
                &self
                    .verifying
                    .iter()
                    .map(|k| (k.algorithm, k.kid.clone()))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

fn ensure_crypto_provider() {
    // jsonwebtoken picks its provider from its features; installing it explicitly keeps
    // that true even if another crate in the build enables a second backend.
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

fn key_error(what: &str, error: jsonwebtoken::errors::Error) -> Error {
    Error::validation("jwtKey", format!("invalid {what}")).with_source(error)
}

impl TokenKeys {
    /// HS256 with a shared secret of at least [`MIN_SECRET_BYTES`] bytes (no `kid`, as the
    /// legacy tokens).
    pub fn hs256(secret: &[u8]) -> Result<Self> {
        ensure_crypto_provider();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::validation(
                "JWT_SECRET",
                format!(
                    "JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (it has {}); set a longer \
                     secret, e.g. the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`, \
                     in every service that shares it",
                    secret.len()
                ),
            ));
        }
        Ok(Self {
            algorithm: TokenAlgorithm::Hs256,
            kid: None,
            signing: EncodingKey::from_secret(secret),
            verifying: vec![VerificationKey {
                algorithm: TokenAlgorithm::Hs256,
                kid: None,
                key: DecodingKey::from_secret(secret),
                hmac: keyed_hmac(secret),
            }],
        })
    }

    /// An asymmetric signing key (PEM: PKCS#8 private key, SPKI public key) named `kid`.
    pub fn asymmetric(
        algorithm: TokenAlgorithm,
        kid: &str,
        private_pem: &[u8],
        public_pem: &[u8],
    ) -> Result<Self> {
        ensure_crypto_provider();
        let signing = match algorithm {
            TokenAlgorithm::EdDsa => EncodingKey::from_ed_pem(private_pem),
            TokenAlgorithm::Rs256 => EncodingKey::from_rsa_pem(private_pem),
            TokenAlgorithm::Es256 => EncodingKey::from_ec_pem(private_pem),
            TokenAlgorithm::Hs256 => {
                return Err(Error::validation(
                    "JWT_ALGORITHM",
                    "HS256 uses TokenKeys::hs256",
                ));
            }
        }
        .map_err(|e| key_error("private key", e))?;
        Self {
            algorithm,
            kid: Some(kid.to_owned()),
            signing,
            verifying: Vec::new(),
        }
        .with_public_key(algorithm, kid, public_pem)
    }

    /// Also accepts tokens signed with this public key (PEM) and `kid`.
    pub fn with_public_key(
        mut self,
        algorithm: TokenAlgorithm,
        kid: &str,
        public_pem: &[u8],
    ) -> Result<Self> {
        let key = match algorithm {
            TokenAlgorithm::EdDsa => DecodingKey::from_ed_pem(public_pem),
            TokenAlgorithm::Rs256 => DecodingKey::from_rsa_pem(public_pem),
            TokenAlgorithm::Es256 => DecodingKey::from_ec_pem(public_pem),
            TokenAlgorithm::Hs256 => {
                return Err(Error::validation(
                    "JWT_ALGORITHM",
                    "HS256 keys are secrets: use with_secret",
                ));
            }
        }
        .map_err(|e| key_error("public key", e))?;
        if self.verifying.iter().any(|k| k.kid.as_deref() == Some(kid)) {
            return Err(Error::validation(
                "jwtKey",
                format!("two verification keys named {kid:?}"),
            ));
        }
        self.verifying.push(VerificationKey {
            algorithm,
            kid: Some(kid.to_owned()),
            key,
            hmac: None,
        });
        Ok(self)
    }

    /// Also accepts HS256 tokens signed with this secret (for example the legacy
    /// `JWT_SECRET` while moving to asymmetric keys).
    pub fn with_secret(mut self, secret: &[u8]) -> Result<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(Error::validation(
                "JWT_SECRET",
                format!(
                    "JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes (it has {}); set a longer \
                     secret, e.g. the output of `python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`, \
                     in every service that shares it",
                    secret.len()
                ),
            ));
        }
        self.verifying.push(VerificationKey {
            algorithm: TokenAlgorithm::Hs256,
            kid: None,
            key: DecodingKey::from_secret(secret),
            hmac: keyed_hmac(secret),
        });
        Ok(self)
    }

    fn find(
        &self,
        algorithm: Algorithm,
        kid: Option<&str>,
    ) -> std::result::Result<&VerificationKey, TokenRejection> {
        let mut candidates = self
            .verifying
            .iter()
            .filter(|k| k.algorithm.jwt() == algorithm);
        let found = match kid {
            Some(kid) => candidates.find(|k| k.kid.as_deref() == Some(kid)),
            None => {
                let first = candidates.next();
                if candidates.next().is_some() {
                    return Err(TokenRejection::UnknownKey);
                }
                first
            }
        };
        found.ok_or(TokenRejection::UnknownKey)
    }
}

/// Issues and verifies access tokens.
#[derive(Debug, Clone)]
pub struct TokenCodec {
    keys: TokenKeys,
    issuer: String,
    ttl: Duration,
    leeway: Duration,
    allowed: HashSet<TokenAlgorithm>,
    /// One prepared `Validation` per accepted algorithm (building one allocates).
    validations: Vec<(Algorithm, Validation)>,
}

/// A freshly issued access token.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Its claims.
    pub claims: AccessClaims,
}

fn random_id() -> Result<String> {
    crate::random::secret_hex(16)
}

impl TokenCodec {
    /// A codec issuing tokens valid for `ttl`, with the legacy issuer and 30 s of leeway.
    pub fn new(keys: TokenKeys, ttl: Duration) -> Self {
        let allowed = keys.verifying.iter().map(|k| k.algorithm).collect();
        let mut codec = Self {
            keys,
            issuer: DEFAULT_ISSUER.to_owned(),
            ttl,
            leeway: Duration::from_secs(30),
            allowed,
            validations: Vec::new(),
        };
        codec.prepare_validations();
        codec
    }

    fn prepare_validations(&mut self) {
        self.validations = self
            .allowed
            .iter()
            .map(|algorithm| {
                let mut validation = Validation::new(algorithm.jwt());
                validation.leeway = self.leeway.as_secs();
                validation.validate_exp = true;
                validation.validate_nbf = true;
                validation.validate_aud = false;
                validation.set_issuer(&[self.issuer.as_str()]);
                validation.set_required_spec_claims(&["exp", "iss", "sub"]);
                (algorithm.jwt(), validation)
            })
            .collect();
    }

    /// Sets the clock leeway for `exp` and `nbf` (at most [`MAX_LEEWAY`]).
    pub fn with_leeway(mut self, leeway: Duration) -> Result<Self> {
        if leeway > MAX_LEEWAY {
            return Err(Error::validation(
                "leeway",
                format!("clock leeway is at most {MAX_LEEWAY:?}"),
            ));
        }
        self.leeway = leeway;
        self.prepare_validations();
        Ok(self)
    }

    /// Sets the issuer written and required (default `cmz-api`).
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self.prepare_validations();
        self
    }

    /// How long issued tokens live.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a token for `user`, in refresh chain `chain` if any.
    pub fn issue(&self, user: &User, chain: Option<&str>) -> Result<IssuedToken> {
        self.issue_with(user, chain, None, serde_json::Map::new())
    }

    /// Issues a token as [`issue`](Self::issue) does, valid for `ttl` instead of the
    /// codec's lifetime when given, with `extra` claims copied in (the legacy
    /// `generate_jwt_token` copies every other key of its `user_data`). Extra claims may
    /// replace the descriptive ones (`user_type`, `familyId`, ...), never those that
    /// decide validity or identity: `exp`, `iat`, `nbf`, `iss`, `sub`, `aud`, `jti`,
    /// `sid`, `user_id`, `userId`, `email` and `role` are ignored in `extra`.
    pub fn issue_with(
        &self,
        user: &User,
        chain: Option<&str>,
        ttl: Option<Duration>,
        mut extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<IssuedToken> {
        const RESERVED: &[&str] = &[
            "exp", "iat", "nbf", "iss", "sub", "aud", "jti", "sid", "user_id", "userId", "email",
            "role",
        ];
        extra.retain(|key, _| !RESERVED.contains(&key.as_str()));
        // These two are typed claims: a string replaces cmz's value; anything else is
        // dropped (kept in `extra` it would be written as a second key of the same name).
        let mut take = |key: &str| match extra.remove(key) {
            Some(serde_json::Value::String(value)) => Some(value),
            _ => None,
        };
        let user_type = take("user_type");
        let family_claim = take("familyId");
        let mut claims = self.claims_for(user, chain, ttl.unwrap_or(self.ttl), extra)?;
        claims.user_type = user_type.or(claims.user_type);
        claims.family_id = family_claim.or(claims.family_id);
        let token = self.sign(&claims)?;
        Ok(IssuedToken { token, claims })
    }

    fn claims_for(
        &self,
        user: &User,
        chain: Option<&str>,
        ttl: Duration,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<AccessClaims> {
        let now = Utc::now().timestamp();
        let role = user.role.as_str().to_owned();
        Ok(AccessClaims {
            user_id: user.user_id.to_string(),
            user_id_camel: Some(user.user_id.to_string()),
            email: user.email.clone(),
            role: role.clone(),
            user_type: Some(role),
            exp: now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            iat: now,
            nbf: None,
            iss: self.issuer.clone(),
            sub: user.user_id.to_string(),
            jti: Some(random_id()?),
            sid: chain.map(str::to_owned),
            family_id: user.family_id.as_ref().map(ToString::to_string),
            extra,
        })
    }

    /// Signs arbitrary claims with the signing key (for compatibility helpers and tests).
    pub fn sign(&self, claims: &AccessClaims) -> Result<String> {
        let mut header = Header::new(self.keys.algorithm.jwt());
        header.kid = self.keys.kid.clone();
        jsonwebtoken::encode(&header, claims, &self.keys.signing)
            .map_err(|e| Error::internal("signing the access token failed").with_source(e))
    }

    /// HS256, the common case, verified in one pass: the header and the claims are each
    /// decoded once, the MAC comes pre-keyed, and the claims are checked here with the same
    /// rules as the general path (exact `alg`, signature first, then `exp`/`nbf` with
    /// leeway and `iss`). `None` when the token is not HS256 (the general path decides).
    pub(super) fn verify_hs256(
        &self,
        token: &str,
    ) -> Option<std::result::Result<AccessClaims, TokenRejection>> {
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Some(Err(TokenRejection::Malformed));
        };
        // jsonwebtoken's own header type, so both paths read every header alike (types of
        // the registered fields, repeated fields, extra fields).
        let header: Header = match URL_SAFE_NO_PAD
            .decode(header_b64)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
        {
            Some(header) => header,
            None => return Some(Err(TokenRejection::Malformed)),
        };
        if header.alg != Algorithm::HS256 {
            return None;
        }
        let check = || {
            if header.crit.is_some() {
                // No critical header extensions are understood, so none may be required.
                return Err(TokenRejection::Malformed);
            }
            if !self.allowed.contains(&TokenAlgorithm::Hs256) {
                return Err(TokenRejection::AlgorithmNotAllowed);
            }
            let key = self.keys.find(Algorithm::HS256, header.kid.as_deref())?;
            let mut mac = key.hmac.clone().ok_or(TokenRejection::UnknownKey)?;
            let signature = URL_SAFE_NO_PAD
                .decode(signature_b64)
                .map_err(|_| TokenRejection::Malformed)?;
            mac.update(header_b64.as_bytes());
            mac.update(b".");
            mac.update(payload_b64.as_bytes());
            // Constant-time comparison.
            mac.verify_slice(&signature)
                .map_err(|_| TokenRejection::BadSignature)?;
            let payload = URL_SAFE_NO_PAD
                .decode(payload_b64)
                .map_err(|_| TokenRejection::Malformed)?;
            let claims: AccessClaims =
                serde_json::from_slice(&payload).map_err(|_| TokenRejection::MissingClaim)?;
            if claims.extra.contains_key("aud") {
                // `aud` is kept among the extra claims, where a repeated key is not an
                // error; jsonwebtoken reads it as a claim of its own and refuses a repeat.
                #[derive(Deserialize)]
                struct Audience {
                    #[serde(default)]
                    #[allow(dead_code)]
                    aud: Option<serde::de::IgnoredAny>,
                }
                serde_json::from_slice::<Audience>(&payload)
                    .map_err(|_| TokenRejection::MissingClaim)?;
            }
            self.check_lifetime(claims.exp, claims.nbf)?;
            if claims.iss != self.issuer {
                return Err(TokenRejection::WrongIssuer);
            }
            Ok(claims)
        };
        Some(check())
    }

    /// Verifies a token's signature and claims (not revocation), saying why it failed.
    pub fn verify_detailed(
        &self,
        token: &str,
    ) -> std::result::Result<AccessClaims, TokenRejection> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenRejection::Oversized);
        }
        if let Some(outcome) = self.verify_hs256(token) {
            return outcome;
        }
        self.verify_general(token)
    }

    /// Every algorithm, through jsonwebtoken.
    pub(super) fn verify_general(
        &self,
        token: &str,
    ) -> std::result::Result<AccessClaims, TokenRejection> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenRejection::Malformed)?;
        if header.crit.is_some() {
            // As on the fast path: no critical header extensions are understood, so none
            // may be required (RFC 7515, 4.1.11); jsonwebtoken does not check them.
            return Err(TokenRejection::Malformed);
        }
        let Some((_, validation)) = self.validations.iter().find(|(alg, _)| *alg == header.alg)
        else {
            return Err(TokenRejection::AlgorithmNotAllowed);
        };
        let key = self.keys.find(header.alg, header.kid.as_deref())?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.key, validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => TokenRejection::BadSignature,
                ErrorKind::ExpiredSignature => TokenRejection::Expired,
                ErrorKind::ImmatureSignature => TokenRejection::NotYetValid,
                ErrorKind::InvalidIssuer => TokenRejection::WrongIssuer,
                ErrorKind::MissingRequiredClaim(_) | ErrorKind::Json(_) => {
                    TokenRejection::MissingClaim
                }
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
                    TokenRejection::AlgorithmNotAllowed
                }
                _ => TokenRejection::Malformed,
            },
        )?;
        Ok(data.claims)
    }

    /// The time checks of [`TokenCodec::verify`]: `exp` and `nbf` against now, with the
    /// leeway.
    pub(super) fn check_lifetime(
        &self,
        exp: i64,
        nbf: Option<i64>,
    ) -> std::result::Result<(), TokenRejection> {
        let now = Utc::now().timestamp();
        let leeway = i64::try_from(self.leeway.as_secs()).unwrap_or(0);
        if exp < now - leeway {
            return Err(TokenRejection::Expired);
        }
        if nbf.is_some_and(|nbf| nbf > now + leeway) {
            return Err(TokenRejection::NotYetValid);
        }
        Ok(())
    }

    /// The HS256 fast path's outcome (`None` when it leaves the token to the general path)
    /// and the general path's, for the differential fuzz target in `fuzz/`: the two must
    /// agree on every token. Not a public API.
    #[cfg(feature = "fuzzing")]
    #[doc(hidden)]
    #[allow(clippy::type_complexity)]
    pub fn verify_both_paths(
        &self,
        token: &str,
    ) -> (
        Option<std::result::Result<AccessClaims, TokenRejection>>,
        std::result::Result<AccessClaims, TokenRejection>,
    ) {
        (self.verify_hs256(token), self.verify_general(token))
    }

    /// Verifies a token's signature and claims; any failure is `unauthorized` (the reason
    /// is logged).
    pub fn verify(&self, token: &str) -> Result<AccessClaims> {
        self.verify_detailed(token)
            .map_err(TokenRejection::into_error)
    }
}

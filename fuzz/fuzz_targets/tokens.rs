//! Access-token verification: the HS256 fast path and the jsonwebtoken path must agree on
//! every token, on accepting it and on the claims they return.
//!
//! Tokens are either any string, or a header and a payload (any text, usually JSON from the
//! seeds) that the target base64url-encodes and signs with HMAC-SHA256 itself, with the
//! right secret, the legacy second secret or a wrong one, so both paths get past the
//! signature and compare their claim checks. See `token_of` for the input format.

#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cmz_core::auth::{AccessClaims, TokenAlgorithm, TokenCodec, TokenKeys, TokenRejection};
use hmac::{Hmac, Mac as _};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret-0123";
const LEGACY_SECRET: &[u8] = b"legacy-secret-legacy-secret-legacy-0123";
const WRONG_SECRET: &[u8] = b"wrong-secret-wrong-secret-wrong-secret-0";
const ED_KEY: &[u8] = include_bytes!("../../cmz-core/src/auth/testdata/ed25519-a.key");
const ED_PUB: &[u8] = include_bytes!("../../cmz-core/src/auth/testdata/ed25519-a.pub");

/// Verifier set-ups: each differs in what the fast path must check.
fn codecs() -> &'static [TokenCodec] {
    static CODECS: OnceLock<Vec<TokenCodec>> = OnceLock::new();
    CODECS.get_or_init(|| {
        let hour = Duration::from_secs(3600);
        let eddsa = || TokenKeys::asymmetric(TokenAlgorithm::EdDsa, "a", ED_KEY, ED_PUB).unwrap();
        vec![
            // The default: one HS256 secret, 30 s of leeway.
            TokenCodec::new(TokenKeys::hs256(SECRET).unwrap(), hour),
            // No leeway, another issuer.
            TokenCodec::new(TokenKeys::hs256(SECRET).unwrap(), hour)
                .with_leeway(Duration::ZERO)
                .unwrap()
                .with_issuer("fuzz-issuer"),
            // Asymmetric signer that still accepts the legacy secret.
            TokenCodec::new(eddsa().with_secret(LEGACY_SECRET).unwrap(), hour),
            // Asymmetric only: HS256 is not allowed at all.
            TokenCodec::new(eddsa(), hour),
            // Two kid-less HS256 secrets: no key can be chosen.
            TokenCodec::new(
                TokenKeys::hs256(SECRET)
                    .unwrap()
                    .with_secret(LEGACY_SECRET)
                    .unwrap(),
                hour,
            )
            .with_leeway(Duration::from_secs(300))
            .unwrap(),
        ]
    })
}

/// The input: one byte choosing the verifier (`b % 5`) and the signer (`b / 5 % 4`:
/// the secret, the legacy secret, a wrong secret, or none: the text is the whole token),
/// then text. Signed inputs are `header \n payload \n suffix`: header and payload are
/// base64url-encoded and signed, the suffix is appended to the signature as is.
fn token_of(data: &[u8]) -> Option<(usize, String)> {
    let (&first, rest) = data.split_first()?;
    let codec = usize::from(first % 5);
    let text = String::from_utf8_lossy(rest);
    let secret = match first / 5 % 4 {
        0 => SECRET,
        1 => LEGACY_SECRET,
        2 => WRONG_SECRET,
        _ => return Some((codec, text.into_owned())),
    };
    let mut parts = text.splitn(3, '\n');
    let header = parts.next().unwrap_or_default();
    let payload = parts.next().unwrap_or_default();
    let suffix = parts.next().unwrap_or_default();
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(message.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    Some((codec, format!("{message}.{signature}{suffix}")))
}

type Outcome = Result<AccessClaims, TokenRejection>;

fn agree(fast: &Outcome, general: &Outcome) -> bool {
    match (fast, general) {
        (Ok(a), Ok(b)) => a == b,
        (Err(_), Err(_)) => true,
        _ => false,
    }
}

fn brief(outcome: &Outcome) -> String {
    match outcome {
        Ok(_) => "accepted".into(),
        Err(reason) => format!("rejected ({})", reason.as_str()),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((codec, token)) = token_of(data) else {
        return;
    };
    let codec = &codecs()[codec];

    // The public entry point never panics, whatever the input.
    if let Ok(claims) = codec.verify_detailed(&token) {
        let _ = claims.principal();
    }

    let (fast, general) = codec.verify_both_paths(&token);
    let Some(fast) = fast else {
        return; // Not HS256: the general path alone decides.
    };
    if agree(&fast, &general) {
        return;
    }
    // The two paths read the clock separately; a token that expires between the two
    // reads is not a disagreement. Ask again once.
    let (again, general_again) = codec.verify_both_paths(&token);
    if again.is_some_and(|again| agree(&again, &general_again)) {
        return;
    }
    // The outcomes only: the input itself is in the crash file.
    panic!(
        "the HS256 fast path and the jsonwebtoken path disagree: fast {}, general {}{}",
        brief(&fast),
        brief(&general),
        if fast.is_ok() && general.is_ok() {
            " (different claims)"
        } else {
            ""
        }
    );
});

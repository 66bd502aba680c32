use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;

use super::*;
use crate::access::{AccessPolicy, Action, Principal};
use crate::ids::FamilyId;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";

fn testdata(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/src/auth/testdata/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn user(id: &str, role: UserRole) -> User {
    User {
        user_id: UserId::new(id).unwrap(),
        email: format!("{id}@cmz.org"),
        display_name: id.into(),
        role,
        user_type: UserType::None,
        family_id: None,
        password_hash: None,
        soft_delete: false,
    }
}

fn hs_codec() -> TokenCodec {
    TokenCodec::new(TokenKeys::hs256(SECRET).unwrap(), Duration::from_secs(3600))
}

fn claims_for(codec: &TokenCodec) -> AccessClaims {
    codec
        .issue(&user("kid1", UserRole::Student), Some("fam"))
        .unwrap()
        .claims
}

fn b64(json: &str) -> String {
    URL_SAFE_NO_PAD.encode(json)
}

#[test]
fn a_cmz_token_has_the_legacy_claims_and_verifies() {
    let codec = hs_codec();
    let issued = codec
        .issue(&user("kid1", UserRole::Student), Some("fam1"))
        .unwrap();
    let payload: serde_json::Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(issued.token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    for (claim, value) in [
        ("user_id", "kid1"),
        ("userId", "kid1"),
        ("sub", "kid1"),
        ("role", "student"),
        ("user_type", "student"),
        ("iss", "cmz-api"),
        ("email", "kid1@cmz.org"),
    ] {
        assert_eq!(payload[claim], value, "{claim}");
    }
    assert!(payload["exp"].as_i64().unwrap() > Utc::now().timestamp());
    assert!(payload["iat"].is_i64() && payload["jti"].is_string());
    let claims = codec.verify(&issued.token).unwrap();
    let principal = claims.principal().unwrap();
    assert_eq!(
        (principal.user_id.as_str(), principal.role),
        ("kid1", UserRole::Student)
    );
}

#[test]
fn every_bad_token_is_rejected_for_its_own_reason_with_one_message() {
    let codec = hs_codec();
    let now = Utc::now().timestamp();
    let good = codec
        .issue(&user("kid1", UserRole::Student), None)
        .unwrap()
        .token;
    let mut cases: Vec<(String, TokenRejection, &str)> = Vec::new();

    let payload = good.split('.').nth(1).unwrap();
    cases.push((
        format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#)),
        TokenRejection::Malformed,
        "alg none",
    ));
    cases.push((
        format!("{}.{payload}.", b64(r#"{"alg":"None"}"#)),
        TokenRejection::Malformed,
        "alg None",
    ));
    cases.push((
        "abc.def.ghi".into(),
        TokenRejection::Malformed,
        "not base64 json",
    ));
    cases.push((
        "!!!.@@@.###".into(),
        TokenRejection::Malformed,
        "bad base64",
    ));
    cases.push(("".into(), TokenRejection::Malformed, "empty"));
    cases.push(("onlyonepart".into(), TokenRejection::Malformed, "one part"));
    cases.push((
        format!("{good}x{}", "A".repeat(MAX_TOKEN_BYTES)),
        TokenRejection::Oversized,
        "oversized",
    ));

    let other = TokenCodec::new(
        TokenKeys::hs256(b"another-secret-another-secret-0123456789").unwrap(),
        Duration::from_secs(60),
    );
    cases.push((
        other
            .issue(&user("kid1", UserRole::Admin), None)
            .unwrap()
            .token,
        TokenRejection::BadSignature,
        "other secret",
    ));

    // Tampered payload: promote to admin, keep the signature.
    let parts: Vec<&str> = good.split('.').collect();
    let mut forged: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    forged["role"] = "admin".into();
    cases.push((
        format!("{}.{}.{}", parts[0], b64(&forged.to_string()), parts[2]),
        TokenRejection::BadSignature,
        "tampered",
    ));

    let mut c = claims_for(&codec);
    c.exp = now - 3600;
    cases.push((codec.sign(&c).unwrap(), TokenRejection::Expired, "expired"));
    let mut c = claims_for(&codec);
    c.nbf = Some(now + 3600);
    cases.push((
        codec.sign(&c).unwrap(),
        TokenRejection::NotYetValid,
        "not yet valid",
    ));
    let mut c = claims_for(&codec);
    c.iss = "someone-else".into();
    cases.push((
        codec.sign(&c).unwrap(),
        TokenRejection::WrongIssuer,
        "issuer",
    ));
    let mut c = claims_for(&codec);
    c.user_id = "admin".into();
    cases.push((
        codec.sign(&c).unwrap(),
        TokenRejection::InconsistentClaims,
        "user_id != sub",
    ));
    let mut c = claims_for(&codec);
    c.role = "root".into();
    cases.push((codec.sign(&c).unwrap(), TokenRejection::UnknownRole, "role"));
    // No `sub` at all.
    let header = b64(r#"{"alg":"HS256","typ":"JWT"}"#);
    let body = b64(&format!(
        r#"{{"user_id":"kid1","role":"student","exp":{},"iss":"cmz-api"}}"#,
        now + 60
    ));
    let signature = {
        use hmac::{Hmac, Mac as _};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{header}.{body}").as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    cases.push((
        format!("{header}.{body}.{signature}"),
        TokenRejection::MissingClaim,
        "no sub",
    ));

    // A header with a critical extension nobody understands.
    let crit_header = b64(r#"{"alg":"HS256","typ":"JWT","crit":["exp"]}"#);
    let crit_sig = {
        use hmac::{Hmac, Mac as _};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
        mac.update(format!("{crit_header}.{payload}").as_bytes());
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    };
    let crit = format!("{crit_header}.{payload}.{crit_sig}");
    assert_eq!(
        codec.verify_detailed(&crit).unwrap_err(),
        TokenRejection::Malformed
    );

    // The HS256 fast path and the general (jsonwebtoken) path agree on every case.
    for (token, reason, name) in &cases {
        if *reason == TokenRejection::Oversized {
            continue;
        }
        let general = codec.verify_general(token).and_then(|c| c.principal());
        assert_eq!(general.unwrap_err(), *reason, "general path: {name}");
    }
    assert_eq!(
        codec.verify_general(&good).unwrap(),
        codec.verify_detailed(&good).unwrap()
    );

    for (token, reason, name) in cases {
        let outcome = codec.verify_detailed(&token).and_then(|c| c.principal());
        assert_eq!(outcome.unwrap_err(), reason, "{name}");
        let err = codec
            .verify(&token)
            .and_then(|c| c.principal().map_err(TokenRejection::into_error))
            .unwrap_err();
        assert_eq!(err.code(), "unauthorized", "{name}");
        assert_eq!(
            err.to_string(),
            "Invalid or expired token",
            "{name}: no reason leaks"
        );
    }
}

/// A token with this header and payload text, signed with `SECRET`.
fn signed(header: &str, payload: &str) -> String {
    use hmac::{Hmac, Mac as _};
    let message = format!("{}.{}", b64(header), b64(payload));
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(message.as_bytes());
    format!(
        "{message}.{}",
        URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
    )
}

/// Inputs on which the `tokens` fuzz target (fuzz/) found the HS256 fast path and the
/// jsonwebtoken path disagreeing, and the neighbours of each: both paths must refuse them
/// (or accept them with the same claims).
#[test]
fn fuzz_findings_both_paths_agree() {
    let codec = hs_codec();
    let header = r#"{"alg":"HS256","typ":"JWT"}"#;
    let claims = |extra: &str| {
        format!(
            r#"{{"user_id":"kid1","userId":"kid1","email":"kid1@cmz.org","role":"student","iat":1700000000,"iss":"cmz-api","sub":"kid1"{extra}}}"#
        )
    };
    let refused = [
        // A critical header extension: the fast path refused it, jsonwebtoken accepted it.
        (
            r#"{"alg":"HS256","typ":"JWT","crit":["exp"]}"#.to_owned(),
            claims(r#","exp":4102444800"#),
        ),
        // `exp` past 2^64: the fast path saturated it and accepted the token.
        (header.to_owned(), claims(r#","exp":41024102444800444800"#)),
        // A repeated header field: the fast path ignored it, jsonwebtoken refuses it.
        (
            r#"{"alg":"HS256","typ":"JWT","typ":"JWT"}"#.to_owned(),
            claims(r#","exp":4102444800"#),
        ),
        // Neighbours: times jsonwebtoken does not read as a NumericDate, a repeated `aud`.
        (header.to_owned(), claims(r#","exp":4102444800,"nbf":-5"#)),
        (header.to_owned(), claims(r#","exp":4102444800,"nbf":-0.5"#)),
        (header.to_owned(), claims(r#","exp":1e300"#)),
        (header.to_owned(), claims(r#","exp":-1"#)),
        (
            header.to_owned(),
            claims(r#","exp":4102444800,"aud":"a","aud":"b""#),
        ),
    ];
    for (header, payload) in &refused {
        let token = signed(header, payload);
        let fast = codec.verify_hs256(&token).expect("an HS256 token");
        let general = codec.verify_general(&token);
        assert!(
            fast.is_err() && general.is_err(),
            "{header} {payload}: fast {fast:?}, general {general:?}"
        );
    }
    // Fractions are rounded, as jsonwebtoken does; both paths accept, with equal claims.
    for payload in [
        claims(r#","exp":4102444800.4,"nbf":1.5"#),
        claims(r#","exp":4102444800,"aud":["a","b"]"#),
        claims(r#","exp":18446744073709551615"#),
    ] {
        let token = signed(header, &payload);
        let fast = codec.verify_hs256(&token).expect("an HS256 token").unwrap();
        assert_eq!(fast, codec.verify_general(&token).unwrap(), "{payload}");
    }
    let token = signed(header, &claims(r#","exp":4102444800.4,"nbf":1.5"#));
    let verified = codec.verify(&token).unwrap();
    assert_eq!((verified.exp, verified.nbf), (4102444800, Some(2)));
}

#[test]
fn clock_leeway_is_bounded_and_applied() {
    let codec = hs_codec().with_leeway(Duration::from_secs(30)).unwrap();
    let mut c = claims_for(&codec);
    c.exp = Utc::now().timestamp() - 10;
    assert!(
        codec.verify(&codec.sign(&c).unwrap()).is_ok(),
        "10 s late is within 30 s of leeway"
    );
    c.exp = Utc::now().timestamp() - 60;
    assert_eq!(
        codec.verify_detailed(&codec.sign(&c).unwrap()).unwrap_err(),
        TokenRejection::Expired
    );
    assert_eq!(
        hs_codec()
            .with_leeway(Duration::from_secs(3600))
            .unwrap_err()
            .code(),
        "validation_error"
    );
}

#[test]
fn short_secrets_are_refused() {
    assert_eq!(
        TokenKeys::hs256(b"short").unwrap_err().code(),
        "validation_error"
    );
}

#[test]
fn asymmetric_keys_rotate_and_pin_the_algorithm() {
    let ttl = Duration::from_secs(600);
    let old = TokenCodec::new(
        TokenKeys::asymmetric(
            TokenAlgorithm::EdDsa,
            "ed-a",
            &testdata("ed25519-a.key"),
            &testdata("ed25519-a.pub"),
        )
        .unwrap(),
        ttl,
    );
    let old_token = old
        .issue(&user("kid1", UserRole::Student), None)
        .unwrap()
        .token;
    let header = jsonwebtoken::decode_header(&old_token).unwrap();
    assert_eq!(header.kid.as_deref(), Some("ed-a"));

    // The new signer keeps the old public key: old tokens still verify, new ones too.
    let rotated = TokenCodec::new(
        TokenKeys::asymmetric(
            TokenAlgorithm::EdDsa,
            "ed-b",
            &testdata("ed25519-b.key"),
            &testdata("ed25519-b.pub"),
        )
        .unwrap()
        .with_public_key(TokenAlgorithm::EdDsa, "ed-a", &testdata("ed25519-a.pub"))
        .unwrap(),
        ttl,
    );
    assert!(rotated.verify(&old_token).is_ok());
    let new_token = rotated
        .issue(&user("kid1", UserRole::Student), None)
        .unwrap()
        .token;
    assert!(rotated.verify(&new_token).is_ok());
    assert_eq!(
        old.verify_detailed(&new_token).unwrap_err(),
        TokenRejection::UnknownKey,
        "the old verifier does not know ed-b"
    );

    // A kid that names a configured key but whose signature is another key's.
    let mut parts: Vec<String> = new_token.split('.').map(str::to_owned).collect();
    parts[0] = b64(r#"{"alg":"EdDSA","typ":"JWT","kid":"ed-a"}"#);
    assert_eq!(
        rotated.verify_detailed(&parts.join(".")).unwrap_err(),
        TokenRejection::BadSignature
    );

    // RS256, ES256 round trips.
    for (alg, key, public) in [
        (TokenAlgorithm::Rs256, "rsa.key", "rsa.pub"),
        (TokenAlgorithm::Es256, "ec.key", "ec.pub"),
    ] {
        let codec = TokenCodec::new(
            TokenKeys::asymmetric(alg, "k1", &testdata(key), &testdata(public)).unwrap(),
            ttl,
        );
        let token = codec
            .issue(&user("kid1", UserRole::Student), None)
            .unwrap()
            .token;
        assert!(codec.verify(&token).is_ok(), "{alg:?}");
        assert_eq!(
            hs_codec().verify_detailed(&token).unwrap_err(),
            TokenRejection::AlgorithmNotAllowed
        );
    }

    // HS/RS confusion: an HS256 token "signed" with the RSA public key as the secret.
    let rs = TokenCodec::new(
        TokenKeys::asymmetric(
            TokenAlgorithm::Rs256,
            "rsa-1",
            &testdata("rsa.key"),
            &testdata("rsa.pub"),
        )
        .unwrap(),
        ttl,
    );
    let confused_codec = TokenCodec::new(TokenKeys::hs256(&testdata("rsa.pub")).unwrap(), ttl);
    let mut claims = claims_for(&confused_codec);
    claims.role = "admin".into();
    let confused = confused_codec.sign(&claims).unwrap();
    assert_eq!(
        rs.verify_detailed(&confused).unwrap_err(),
        TokenRejection::AlgorithmNotAllowed
    );
    let mut parts: Vec<String> = confused.split('.').map(str::to_owned).collect();
    parts[0] = b64(r#"{"alg":"HS256","typ":"JWT","kid":"rsa-1"}"#);
    assert_eq!(
        rs.verify_detailed(&parts.join(".")).unwrap_err(),
        TokenRejection::AlgorithmNotAllowed
    );

    // Bad key material is a clear error.
    assert_eq!(
        TokenKeys::asymmetric(TokenAlgorithm::EdDsa, "x", b"not a pem", b"nope")
            .unwrap_err()
            .code(),
        "validation_error"
    );
}

fn fast_settings() -> AuthSettings {
    AuthSettings {
        hasher: PasswordHasher::new(1024, 1, 1).unwrap(),
        login_limits: LoginLimits {
            per_account: 3,
            per_account_total: 8,
            per_client: 5,
            window: Duration::from_secs(60),
        },
        ..AuthSettings::with_secret(SECRET).unwrap()
    }
}

struct Fixture {
    auth: AuthService,
    audit: Arc<InMemoryAuditSink>,
}

async fn fixture(mut settings: AuthSettings) -> Fixture {
    let audit = Arc::new(InMemoryAuditSink::new());
    let stores = AuthStores {
        audit: audit.clone(),
        ..AuthStores::in_memory()
    };
    settings.dev_users = Some(DevDirectory::embedded());
    let auth = AuthService::new(settings, stores).await.unwrap();
    Fixture { auth, audit }
}

#[tokio::test]
async fn login_issues_tokens_for_the_dev_admin_and_rejects_wrong_passwords_alike() {
    let f = fixture(fast_settings()).await;
    let login = f
        .auth
        .login("Admin@CMZ.org ", "admin123", None)
        .await
        .unwrap();
    assert_eq!(login.user.role, UserRole::Admin);
    assert_eq!(login.expires_in, 86_400);
    let principal = f.auth.authenticate(&login.token).await.unwrap();
    assert_eq!(principal.user_id.as_str(), "user_admin");
    let json = serde_json::to_value(&login).unwrap();
    assert!(
        json["token"].is_string() && json["refreshToken"].is_string() && json["expiresIn"].is_u64()
    );
    assert_eq!(json["user"]["email"], "admin@cmz.org");
    assert!(json["user"].get("passwordHash").is_none());

    let wrong = f
        .auth
        .login("admin@cmz.org", "nope", None)
        .await
        .unwrap_err();
    let unknown = f
        .auth
        .login("ghost@cmz.org", "nope", None)
        .await
        .unwrap_err();
    let malformed = f
        .auth
        .login("not-an-email", "nope", None)
        .await
        .unwrap_err();
    for err in [&wrong, &unknown, &malformed] {
        assert_eq!(err.code(), "unauthorized");
        assert_eq!(err.to_string(), "Invalid email or password");
    }
    assert!(
        f.audit
            .events()
            .iter()
            .any(|e| e.kind == AuditKind::LoginFailed)
    );
}

#[tokio::test]
async fn failed_logins_are_throttled_per_account_and_client_without_locking_the_owner_out() {
    let f = fixture(fast_settings()).await;
    for _ in 0..3 {
        assert_eq!(
            f.auth
                .login("parent@cmz.org", "guess", Some("10.0.0.1"))
                .await
                .unwrap_err()
                .code(),
            "unauthorized"
        );
    }
    // The client that failed waits, even with the right password, with a retry time.
    let err = f
        .auth
        .login("parent@cmz.org", "parent123", Some("10.0.0.1"))
        .await
        .unwrap_err();
    let Error::RateLimited {
        retry_after: Some(retry),
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert!(*retry <= Duration::from_secs(60) && *retry > Duration::ZERO);
    assert_eq!(err.code(), "rate_limit_exceeded");
    // The owner on another client still gets in.
    assert!(
        f.auth
            .login("parent@cmz.org", "parent123", Some("10.0.0.2"))
            .await
            .is_ok()
    );
    // The failing client reached its per-client ceiling (5 attempts): other accounts wait
    // too, from that client only. (The refused attempt above stopped at its first limit.)
    for _ in 0..2 {
        f.auth
            .login("student1@cmz.org", "guess", Some("10.0.0.1"))
            .await
            .unwrap_err();
    }
    let err = f
        .auth
        .login("student2@cmz.org", "student123", Some("10.0.0.1"))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        "rate_limit_exceeded",
        "6 attempts from 10.0.0.1"
    );
    assert!(
        f.auth
            .login("student2@cmz.org", "student123", Some("10.0.0.9"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn an_account_wide_ceiling_slows_attacks_spread_over_clients() {
    let f = fixture(fast_settings()).await;
    // 8 attempts on the account from 4 clients: each under its own limit of 3.
    for client in ["10.0.1.1", "10.0.1.2", "10.0.1.3", "10.0.1.4"] {
        for _ in 0..2 {
            assert_eq!(
                f.auth
                    .login("admin@cmz.org", "guess", Some(client))
                    .await
                    .unwrap_err()
                    .code(),
                "unauthorized"
            );
        }
    }
    assert_eq!(
        f.auth
            .login("admin@cmz.org", "admin123", Some("10.0.1.5"))
            .await
            .unwrap_err()
            .code(),
        "rate_limit_exceeded",
        "the 9th attempt on the account in the window"
    );
    // Other accounts are not affected.
    assert!(
        f.auth
            .login("parent@cmz.org", "parent123", Some("10.0.1.5"))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn a_school_behind_one_address_is_not_locked_out_by_default() {
    let mut settings = fast_settings();
    settings.login_limits = LoginLimits::default();
    let f = fixture(settings).await;
    // 30 children behind one NAT address, each mistyping twice: 60 failures.
    for _ in 0..30 {
        for _ in 0..2 {
            f.auth
                .login("student1@cmz.org", "typo", Some("198.51.100.7"))
                .await
                .unwrap_err();
        }
        f.auth
            .login("student2@cmz.org", "oops", Some("198.51.100.7"))
            .await
            .unwrap_err();
        f.auth
            .login("student2@cmz.org", "student123", Some("198.51.100.7"))
            .await
            .unwrap();
    }
    // student1's own counter from this address is full, but another account is fine.
    assert!(
        f.auth
            .login("parent@cmz.org", "parent123", Some("198.51.100.7"))
            .await
            .is_ok()
    );
}

/// 100 simultaneous wrong logins for one account from one client: the attempt count is
/// taken before the hash, so only the limit's worth are hashed, and the hash gate bounds
/// how many run at once (argon2id at OWASP's cost holds 19 MiB each).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_wrong_logins_cannot_pass_the_limit_or_the_hash_gate() {
    let gate = HashGate::new(2, 4);
    let mut settings = fast_settings();
    settings.hasher = PasswordHasher::new(8 * 1024, 1, 1)
        .unwrap()
        .with_gate(gate.clone());
    settings.login_limits = LoginLimits::default();
    let f = fixture(settings).await;
    let before = gate.stats();
    let attempts = (0..100).map(|_| {
        let auth = f.auth.clone();
        tokio::spawn(async move {
            auth.login("student1@cmz.org", "guess", Some("203.0.113.5"))
                .await
                .unwrap_err()
                .code()
        })
    });
    let codes = futures::future::join_all(attempts).await;
    let checked = codes
        .iter()
        .filter(|c| *c.as_ref().unwrap() == "unauthorized")
        .count();
    let throttled = codes
        .iter()
        .filter(|c| *c.as_ref().unwrap() == "rate_limit_exceeded")
        .count();
    let after = gate.stats();
    assert_eq!(checked + throttled, 100, "{codes:?}");
    assert!(checked <= 5, "{checked} checked");
    assert!(after.started - before.started <= 5, "{after:?}");
    assert!(after.peak_running <= 2, "{after:?}");

    // 100 simultaneous logins on 100 accounts from 100 clients: every one is within its
    // limits, so the gate alone bounds the work: at most 2 running, 4 waiting, the rest
    // refused at once.
    let attempts = (0..100).map(|i| {
        let auth = f.auth.clone();
        tokio::spawn(async move {
            auth.login(
                &format!("ghost{i}@cmz.org"),
                "guess",
                Some(&format!("192.0.2.{i}")),
            )
            .await
            .unwrap_err()
            .code()
        })
    });
    let codes = futures::future::join_all(attempts).await;
    let stats = gate.stats();
    assert!(stats.peak_running <= 2, "{stats:?}");
    assert!(
        codes.iter().all(|c| matches!(
            c.as_ref().unwrap().as_str(),
            "unauthorized" | "rate_limit_exceeded"
        )),
        "{codes:?}"
    );
}

#[tokio::test]
async fn a_successful_login_resets_the_account_counter() {
    let f = fixture(fast_settings()).await;
    for _ in 0..2 {
        f.auth.login("admin@cmz.org", "x", None).await.unwrap_err();
    }
    f.auth
        .login("admin@cmz.org", "admin123", None)
        .await
        .unwrap();
    for _ in 0..2 {
        f.auth.login("admin@cmz.org", "x", None).await.unwrap_err();
    }
    assert!(
        f.auth
            .login("admin@cmz.org", "admin123", None)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn refresh_rotates_and_reuse_revokes_the_family() {
    let f = fixture(fast_settings()).await;
    let first = f
        .auth
        .login("student1@cmz.org", "student123", None)
        .await
        .unwrap();
    let second = f.auth.refresh(&first.refresh_token).await.unwrap();
    assert_ne!(second.refresh_token, first.refresh_token);
    assert!(f.auth.authenticate(&second.token).await.is_ok());
    let third = f.auth.refresh(&second.refresh_token).await.unwrap();
    // A thief replays the first token: rejected, and the whole family goes.
    assert_eq!(
        f.auth
            .refresh(&first.refresh_token)
            .await
            .unwrap_err()
            .code(),
        "unauthorized"
    );
    assert_eq!(
        f.auth
            .refresh(&third.refresh_token)
            .await
            .unwrap_err()
            .code(),
        "unauthorized"
    );
    assert_eq!(
        f.auth.authenticate(&third.token).await.unwrap_err().code(),
        "unauthorized"
    );
    assert!(f.audit.events().iter().any(|e| {
        e.kind == AuditKind::RefreshReuse
            && e.actor
                .as_ref()
                .is_some_and(|a| a.as_str() == "user_student_ana")
    }));
    // Other logins of the same user are untouched.
    let other = f
        .auth
        .login("student1@cmz.org", "student123", None)
        .await
        .unwrap();
    assert!(f.auth.refresh(&other.refresh_token).await.is_ok());
    for bad in [
        "",
        "cmzr_",
        "cmzr_unknown",
        "eyJhbGciOi.x.y",
        &"x".repeat(5000),
    ] {
        assert_eq!(
            f.auth.refresh(bad).await.unwrap_err().code(),
            "unauthorized",
            "{bad:?}"
        );
    }
}

#[tokio::test]
async fn a_remembered_token_still_expires_and_a_forged_twin_is_refused() {
    let f = fixture(AuthSettings {
        access_ttl: Duration::from_secs(1),
        leeway: Duration::ZERO,
        ..fast_settings()
    })
    .await;
    let login = f
        .auth
        .login("student1@cmz.org", "student123", None)
        .await
        .unwrap();
    let first = f.auth.authenticate(&login.token).await.unwrap();
    assert_eq!(f.auth.authenticate(&login.token).await.unwrap(), first);
    // Same header and claims, another signature: not the remembered token.
    let (signed, _) = login.token.rsplit_once('.').unwrap();
    let forged = format!("{signed}.{}", "A".repeat(43));
    assert_eq!(
        f.auth.authenticate(&forged).await.unwrap_err().code(),
        "unauthorized"
    );
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    assert_eq!(
        f.auth.authenticate(&login.token).await.unwrap_err().code(),
        "unauthorized",
        "expiry is checked on every use"
    );
}

#[tokio::test]
async fn logout_revokes_the_access_token_and_its_refresh_family() {
    let f = fixture(fast_settings()).await;
    let login = f
        .auth
        .login("parent@cmz.org", "parent123", None)
        .await
        .unwrap();
    let other_device = f
        .auth
        .login("parent@cmz.org", "parent123", None)
        .await
        .unwrap();
    assert!(
        f.auth.authenticate(&login.token).await.is_ok(),
        "verified once, so remembered"
    );
    f.auth.logout(&login.token).await.unwrap();
    assert_eq!(
        f.auth.authenticate(&login.token).await.unwrap_err().code(),
        "unauthorized"
    );
    assert_eq!(
        f.auth
            .refresh(&login.refresh_token)
            .await
            .unwrap_err()
            .code(),
        "unauthorized"
    );
    assert!(
        f.auth.authenticate(&other_device.token).await.is_ok(),
        "other sessions stay logged in"
    );
    assert_eq!(
        f.auth.logout(&login.token).await.unwrap_err().code(),
        "unauthorized"
    );
}

#[tokio::test]
async fn legacy_pbkdf2_hashes_verify_and_are_upgraded_on_login() {
    let f = fixture(fast_settings()).await;
    let mut legacy = user("legacy_user", UserRole::Member);
    legacy.password_hash =
        Some(legacy_hash("old-password", "00112233445566778899aabbccddeeff").unwrap());
    f.auth.stores().users.create_user(&legacy).await.unwrap();
    assert_eq!(
        f.auth
            .login("legacy_user@cmz.org", "wrong", None)
            .await
            .unwrap_err()
            .code(),
        "unauthorized"
    );
    let stored = f
        .auth
        .stores()
        .users
        .get_user(&legacy.user_id)
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored.password_hash.unwrap().contains(':'),
        "a failed login changes nothing"
    );
    f.auth
        .login("legacy_user@cmz.org", "old-password", None)
        .await
        .unwrap();
    let upgraded = f
        .auth
        .stores()
        .users
        .get_user(&legacy.user_id)
        .await
        .unwrap()
        .unwrap()
        .password_hash
        .unwrap();
    assert!(upgraded.starts_with("$argon2id$"), "{upgraded}");
    assert!(
        f.auth
            .login("legacy_user@cmz.org", "old-password", None)
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn registration_follows_its_switch() {
    let off = fixture(fast_settings()).await;
    assert_eq!(
        off.auth
            .register("new@cmz.org", "long enough", "New")
            .await
            .unwrap_err()
            .code(),
        "forbidden"
    );
    let on = fixture(AuthSettings {
        registration: true,
        ..fast_settings()
    })
    .await;
    let created = on
        .auth
        .register("New@cmz.org", "long enough", "New")
        .await
        .unwrap();
    assert_eq!(created.user.role, UserRole::Visitor);
    assert!(
        on.auth
            .login("new@cmz.org", "long enough", None)
            .await
            .is_ok()
    );
    assert_eq!(
        on.auth
            .register("new@cmz.org", "long enough", "Again")
            .await
            .unwrap_err()
            .code(),
        "conflict"
    );
    assert_eq!(
        on.auth
            .register("admin@cmz.org", "long enough", "Me")
            .await
            .unwrap_err()
            .code(),
        "conflict"
    );
    assert_eq!(
        on.auth
            .register("bad", "long enough", "x")
            .await
            .unwrap_err()
            .code(),
        "validation_error"
    );
    assert_eq!(
        on.auth
            .register("ok@cmz.org", "short", "x")
            .await
            .unwrap_err()
            .code(),
        "validation_error"
    );
}

#[test]
fn settings_come_from_the_legacy_variables_and_refuse_unsafe_production() {
    let env = |pairs: &'static [(&'static str, &'static str)]| {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    };
    let err = AuthSettings::from_lookup(&env(&[])).unwrap_err();
    assert_eq!(err.code(), "validation_error");
    assert!(err.to_string().contains("JWT_SECRET"));
    assert!(AuthSettings::from_lookup(&env(&[("JWT_SECRET", "short")])).is_err());
    let prod = AuthSettings::from_lookup(&env(&[
        ("JWT_SECRET", "0123456789abcdef0123456789abcdef"),
        ("TOKEN_EXPIRATION_SECONDS", "3600"),
    ]))
    .unwrap();
    assert_eq!(prod.access_ttl, Duration::from_secs(3600));
    assert!(prod.dev_users.is_none() && !prod.registration);
    let dev = AuthSettings::from_lookup(&env(&[("CMZ_DEV_USERS", "embedded")])).unwrap();
    assert_eq!(dev.dev_users.unwrap().users.len(), 5);
    assert!(
        AuthSettings::from_lookup(&env(&[
            ("CMZ_DEV_USERS", "embedded"),
            ("TOKEN_EXPIRATION_SECONDS", "soon")
        ]))
        .is_err()
    );
    assert!(
        AuthSettings::from_lookup(&env(&[
            ("CMZ_DEV_USERS", "embedded"),
            ("JWT_ALGORITHM", "HS512")
        ]))
        .is_err()
    );
    assert!(
        AuthSettings::from_lookup(&env(&[
            ("CMZ_DEV_USERS", "embedded"),
            ("JWT_ALGORITHM", "EdDSA")
        ]))
        .unwrap_err()
        .to_string()
        .contains("JWT_PRIVATE_KEY_FILE")
    );
    assert!(
        AuthSettings::from_lookup(&env(&[
            ("CMZ_DEV_USERS", "embedded"),
            ("CMZ_ALLOW_REGISTRATION", "maybe")
        ]))
        .is_err()
    );
}

#[test]
fn production_without_dev_users_seeds_nothing() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let settings = AuthSettings {
            hasher: PasswordHasher::new(1024, 1, 1).unwrap(),
            ..AuthSettings::with_secret(SECRET).unwrap()
        };
        let auth = AuthService::new(settings, AuthStores::in_memory())
            .await
            .unwrap();
        assert!(
            auth.stores()
                .users
                .find_by_email("admin@cmz.org")
                .await
                .unwrap()
                .is_none()
        );
        assert_eq!(
            auth.login("admin@cmz.org", "admin123", None)
                .await
                .unwrap_err()
                .code(),
            "unauthorized"
        );
    });
}

// ---- the access policy table ----

async fn policy_fixture() -> (
    PlatformPolicy,
    Arc<InMemoryAuditSink>,
    Arc<InMemoryFamilyDirectory>,
) {
    let families = Arc::new(InMemoryFamilyDirectory::new());
    for (id, parents, students) in [
        ("fam_r", vec!["parent_r"], vec!["ana", "leo"]),
        ("fam_c", vec!["parent_c"], vec!["kim"]),
    ] {
        families
            .put_family(&Family {
                family_id: FamilyId::new(id).unwrap(),
                family_name: id.into(),
                parents: parents
                    .into_iter()
                    .map(|p| UserId::new(p).unwrap())
                    .collect(),
                students: students
                    .into_iter()
                    .map(|s| UserId::new(s).unwrap())
                    .collect(),
                soft_delete: false,
                retention_days: None,
            })
            .await
            .unwrap();
    }
    let audit = Arc::new(InMemoryAuditSink::new());
    (
        PlatformPolicy::new(families.clone(), audit.clone()),
        audit,
        families,
    )
}

#[tokio::test]
async fn the_policy_table_with_its_audit_events() {
    use AuditOutcome::{Allowed, Denied};
    let (policy, audit, families) = policy_fixture().await;
    let p = |id: &str, role| Principal::new(UserId::new(id).unwrap(), role);
    // (principal, action, owner, allowed, expected audit outcome if any)
    let table: Vec<(Principal, Action, &str, bool, Option<AuditOutcome>)> = vec![
        // own data: always, never audited
        (p("ana", UserRole::Student), Action::Read, "ana", true, None),
        (
            p("ana", UserRole::Student),
            Action::Write,
            "ana",
            true,
            None,
        ),
        (
            p("ana", UserRole::Student),
            Action::Delete,
            "ana",
            true,
            None,
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Read,
            "parent_r",
            true,
            None,
        ),
        (p("v1", UserRole::Visitor), Action::Write, "v1", true, None),
        // admin-like roles: read and delete anyone's, audited; never write
        (
            p("boss", UserRole::Admin),
            Action::Read,
            "ana",
            true,
            Some(Allowed),
        ),
        (
            p("boss", UserRole::Administrator),
            Action::Read,
            "kim",
            true,
            Some(Allowed),
        ),
        (
            p("keeper", UserRole::Zookeeper),
            Action::Read,
            "leo",
            true,
            Some(Allowed),
        ),
        (
            p("boss", UserRole::Admin),
            Action::Delete,
            "ana",
            true,
            Some(Allowed),
        ),
        (
            p("boss", UserRole::Admin),
            Action::Write,
            "ana",
            false,
            Some(Denied),
        ),
        // parents: read their own family's students only
        (
            p("parent_r", UserRole::Parent),
            Action::Read,
            "ana",
            true,
            None,
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Read,
            "leo",
            true,
            None,
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Read,
            "kim",
            false,
            Some(Denied),
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Read,
            "parent_c",
            false,
            Some(Denied),
        ),
        (
            p("parent_c", UserRole::Parent),
            Action::Read,
            "ana",
            false,
            Some(Denied),
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Write,
            "ana",
            false,
            Some(Denied),
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Delete,
            "ana",
            true,
            Some(Allowed),
        ),
        (
            p("parent_r", UserRole::Parent),
            Action::Delete,
            "kim",
            false,
            Some(Denied),
        ),
        // a student who claims the parent role without being one in the family
        (
            p("leo", UserRole::Parent),
            Action::Read,
            "ana",
            false,
            Some(Denied),
        ),
        // students, visitors and other roles: nobody else's
        (
            p("ana", UserRole::Student),
            Action::Read,
            "leo",
            false,
            Some(Denied),
        ),
        (
            p("ana", UserRole::Student),
            Action::Read,
            "kim",
            false,
            Some(Denied),
        ),
        (
            p("v1", UserRole::Visitor),
            Action::Read,
            "ana",
            false,
            Some(Denied),
        ),
        (
            p("e1", UserRole::Editor),
            Action::Read,
            "ana",
            false,
            Some(Denied),
        ),
        (
            p("m1", UserRole::Member),
            Action::Delete,
            "ana",
            false,
            Some(Denied),
        ),
        (
            p("u1", UserRole::User),
            Action::Read,
            "ana",
            false,
            Some(Denied),
        ),
    ];
    for (principal, action, owner, allowed, audited) in table {
        audit.take();
        let owner = UserId::new(owner).unwrap();
        let result = policy.authorize(&principal, action, &owner).await;
        assert_eq!(result.is_ok(), allowed, "{principal:?} {action:?} {owner}");
        if let Err(e) = &result {
            assert_eq!(e.code(), "forbidden");
        }
        let events = audit.take();
        match audited {
            None => assert!(
                events.is_empty(),
                "{principal:?} {action:?} {owner}: {events:?}"
            ),
            Some(outcome) => {
                assert_eq!(events.len(), 1, "{principal:?} {action:?} {owner}");
                let e = &events[0];
                assert_eq!((e.kind, e.outcome), (AuditKind::Access(action), outcome));
                assert_eq!(e.actor.as_ref(), Some(&principal.user_id));
                assert_eq!(e.actor_role, Some(principal.role));
                assert_eq!(e.subject.as_ref(), Some(&owner));
            }
        }
    }
    // Bulk operations: administrators only, both outcomes audited.
    assert!(
        policy
            .authorize_all(&p("boss", UserRole::Admin), Action::Delete)
            .await
            .is_ok()
    );
    assert_eq!(audit.take()[0].outcome, Allowed);
    assert!(
        policy
            .authorize_all(&p("parent_r", UserRole::Parent), Action::Delete)
            .await
            .is_err()
    );
    assert_eq!(audit.take()[0].outcome, Denied);
    // A soft-deleted family grants nothing.
    let mut family = families
        .get_family(&FamilyId::new("fam_r").unwrap())
        .await
        .unwrap()
        .unwrap();
    family.soft_delete = true;
    families.put_family(&family).await.unwrap();
    assert!(
        policy
            .authorize(
                &p("parent_r", UserRole::Parent),
                Action::Read,
                &UserId::new("ana").unwrap()
            )
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_conversation_service_enforces_the_platform_policy() {
    use crate::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
    use crate::service::{ConversationConfig, ConversationService, TurnRequest};
    use crate::store::PageRequest;
    use crate::testing::ScriptedModel;
    use crate::types::Persona;

    let f = fixture(fast_settings()).await;
    let lion = crate::ids::AnimalId::new("lion").unwrap();
    let personas = InMemoryPersonaDirectory::with_personas([Persona {
        personality: String::new(),
        facts: vec![],
        guidelines: vec![],
        ..Persona::new(lion.clone(), "Leo")
    }]);
    let service = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(personas),
        Arc::new(ScriptedModel::echo()),
        Arc::new(f.auth.policy()),
        ConversationConfig::default(),
    );
    let login = |email: &'static str, password: &'static str| {
        let auth = f.auth.clone();
        async move {
            auth.authenticate(&auth.login(email, password, None).await.unwrap().token)
                .await
                .unwrap()
        }
    };
    let ana = login("student1@cmz.org", "student123").await;
    let parent = login("parent@cmz.org", "parent123").await;
    let kim = login("other@cmz.org", "other123").await;
    let admin = login("admin@cmz.org", "admin123").await;
    let session = service
        .turn(&ana, TurnRequest::new(lion, "hi"))
        .await
        .unwrap()
        .session_id;
    f.audit.take();
    assert_eq!(
        service
            .history(&parent, &session, PageRequest::first(10))
            .await
            .unwrap()
            .items
            .len(),
        2
    );
    // Another family's session answers like a missing one; the denial is still audited.
    assert_eq!(
        service
            .history(&kim, &session, PageRequest::first(10))
            .await
            .unwrap_err()
            .code(),
        "not_found"
    );
    assert!(
        service
            .history(&admin, &session, PageRequest::first(10))
            .await
            .is_ok()
    );
    let events = f.audit.take();
    assert_eq!(
        events.iter().map(|e| e.outcome).collect::<Vec<_>>(),
        vec![AuditOutcome::Denied, AuditOutcome::Allowed]
    );
}

#[tokio::test]
async fn the_in_memory_auth_stores_pass_the_conformance_suite() {
    crate::testing::run_auth_store_suite(
        &InMemoryUserStore::new(),
        &InMemoryFamilyDirectory::new(),
        &InMemoryRevocationStore::new(),
        &InMemoryRateLimitStore::new(),
    )
    .await;
}

#[tokio::test]
async fn legacy_hashes_can_be_kept_while_the_legacy_login_still_runs() {
    let f = fixture(AuthSettings {
        keep_legacy_hashes: true,
        ..fast_settings()
    })
    .await;
    let mut legacy = user("legacy_keeper", UserRole::Member);
    let hash = legacy_hash("old-password", "00112233445566778899aabbccddeeff").unwrap();
    legacy.password_hash = Some(hash.clone());
    f.auth.stores().users.create_user(&legacy).await.unwrap();
    for _ in 0..2 {
        f.auth
            .login("legacy_keeper@cmz.org", "old-password", None)
            .await
            .unwrap();
    }
    let stored = f
        .auth
        .stores()
        .users
        .get_user(&legacy.user_id)
        .await
        .unwrap()
        .unwrap()
        .password_hash
        .unwrap();
    assert_eq!(stored, hash, "the legacy login can still read it");
    let from_env = AuthSettings::from_lookup(&|name| match name {
        "JWT_SECRET" => Some("x".repeat(40)),
        "CMZ_KEEP_LEGACY_PASSWORD_HASHES" => Some("true".into()),
        _ => None,
    })
    .unwrap();
    assert!(from_env.keep_legacy_hashes);
}

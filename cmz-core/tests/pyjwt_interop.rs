//! Tokens and password hashes cross the boundary with the Python services: checked against
//! the real PyJWT and hashlib (installed by `.ci/run`: `pip install 'pyjwt[crypto]'`).

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use cmz_core::access::UserRole;
use cmz_core::auth::{
    AuthService, AuthSettings, AuthStores, PasswordCheck, PasswordHasher, TokenAlgorithm,
    TokenCodec, TokenKeys, TokenRejection, User, UserType,
};
use cmz_core::ids::UserId;

const SECRET: &str = "interop-secret-interop-secret-0123456789";

fn testdata(name: &str) -> String {
    format!("{}/src/auth/testdata/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a Python snippet with `input` on stdin; returns its stdout. Fails loudly when PyJWT
/// is missing (CI installs it), never skips.
fn python(script: &str, input: &str) -> String {
    let python = std::env::var("CMZ_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut child = Command::new(&python)
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "python failed (is PyJWT installed? pip install 'pyjwt[crypto]'):\n{stderr}"
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// The legacy `generate_jwt_token`: HS256 with the legacy claim set.
const PYJWT_MINT: &str = r#"
import jwt, json, sys, time
args = json.load(sys.stdin)
now = int(time.time())
payload = {"user_id": args["user"], "userId": args["user"], "email": args["user"] + "@cmz.org",
           "role": args["role"], "user_type": args["role"], "exp": now + args.get("ttl", 3600),
           "iat": now, "iss": args.get("iss", "cmz-api"), "sub": args["user"], "displayName": "From Python"}
key = args["key"]
if args["alg"] in ("EdDSA", "RS256", "ES256"):
    key = open(key).read()
headers = {"kid": args["kid"]} if args.get("kid") else None
print(jwt.encode(payload, key, algorithm=args["alg"], headers=headers))
"#;

const PYJWT_DECODE: &str = r#"
import jwt, json, sys
args = json.load(sys.stdin)
key = args["key"]
if args["alg"] != "HS256":
    key = open(key).read()
claims = jwt.decode(args["token"], key, algorithms=[args["alg"]], issuer="cmz-api")
print(json.dumps(claims))
"#;

fn mint(alg: &str, key: &str, user: &str, role: &str, kid: Option<&str>) -> String {
    let input = serde_json::json!({"alg": alg, "key": key, "user": user, "role": role, "kid": kid});
    python(PYJWT_MINT, &input.to_string())
}

/// A codec with the service's secret (what the legacy services hold too).
fn codec() -> TokenCodec {
    TokenCodec::new(
        TokenKeys::hs256(SECRET.as_bytes()).unwrap(),
        Duration::from_secs(3600),
    )
}

async fn auth() -> AuthService {
    let settings = AuthSettings {
        hasher: PasswordHasher::new(1024, 1, 1).unwrap(),
        ..AuthSettings::with_secret(SECRET.as_bytes()).unwrap()
    };
    AuthService::new(settings, AuthStores::in_memory())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pyjwt_token_with_the_legacy_claims_verifies_in_cmz() {
    let auth = auth().await;
    let token = mint("HS256", SECRET, "user_parent_1", "parent", None);
    let (principal, claims) = auth.verify(&token).await.expect("PyJWT token verifies");
    assert_eq!(
        (principal.user_id.as_str(), principal.role),
        ("user_parent_1", UserRole::Parent)
    );
    assert_eq!(
        claims.extra["displayName"], "From Python",
        "extra legacy fields survive"
    );
    assert!(claims.jti.is_none());
}

#[tokio::test]
async fn a_cmz_token_decodes_in_pyjwt() {
    let user = User {
        user_id: UserId::new("user_student_1").unwrap(),
        email: "s1@cmz.org".into(),
        display_name: "S1".into(),
        role: UserRole::Student,
        user_type: UserType::Student,
        family_id: None,
        password_hash: None,
        soft_delete: false,
    };
    let token = codec().issue(&user, Some("fam")).unwrap().token;
    auth().await.authenticate(&token).await.unwrap();
    let out = python(
        PYJWT_DECODE,
        &serde_json::json!({"token": token, "key": SECRET, "alg": "HS256"}).to_string(),
    );
    let claims: serde_json::Value = serde_json::from_str(&out).unwrap();
    for (name, value) in [
        ("user_id", "user_student_1"),
        ("userId", "user_student_1"),
        ("sub", "user_student_1"),
        ("role", "student"),
        ("user_type", "student"),
        ("email", "s1@cmz.org"),
        ("iss", "cmz-api"),
    ] {
        assert_eq!(claims[name], value, "{name}");
    }
}

#[tokio::test]
async fn forged_pyjwt_tokens_are_rejected() {
    let auth = auth().await;
    let codec = codec();
    let other_secret = mint(
        "HS256",
        "some-other-secret-some-other-secret-000",
        "user_x",
        "admin",
        None,
    );
    assert_eq!(
        codec.verify_detailed(&other_secret).unwrap_err(),
        TokenRejection::BadSignature
    );
    let none = python(
        r#"
import jwt, time
print(jwt.encode({"user_id": "x", "sub": "x", "role": "admin", "iss": "cmz-api", "exp": int(time.time()) + 60}, None, algorithm="none"))
"#,
        "",
    );
    assert_eq!(
        codec.verify_detailed(&none).unwrap_err(),
        TokenRejection::Malformed
    );
    let hs512 = python(
        &format!(
            r#"
import jwt, time
print(jwt.encode({{"user_id": "x", "sub": "x", "role": "admin", "iss": "cmz-api", "exp": int(time.time()) + 60}}, "{SECRET}", algorithm="HS512"))
"#
        ),
        "",
    );
    assert_eq!(
        codec.verify_detailed(&hs512).unwrap_err(),
        TokenRejection::AlgorithmNotAllowed
    );
    for token in [&other_secret, &none, &hs512] {
        assert_eq!(
            auth.authenticate(token).await.unwrap_err().code(),
            "unauthorized"
        );
    }
}

#[test]
fn eddsa_tokens_cross_both_ways() {
    let codec = TokenCodec::new(
        TokenKeys::asymmetric(
            TokenAlgorithm::EdDsa,
            "ed-a",
            &std::fs::read(testdata("ed25519-a.key")).unwrap(),
            &std::fs::read(testdata("ed25519-a.pub")).unwrap(),
        )
        .unwrap(),
        Duration::from_secs(600),
    );
    let from_python = mint(
        "EdDSA",
        &testdata("ed25519-a.key"),
        "user_1",
        "student",
        Some("ed-a"),
    );
    assert_eq!(codec.verify(&from_python).unwrap().sub, "user_1");
    let wrong_key = mint(
        "EdDSA",
        &testdata("ed25519-b.key"),
        "user_1",
        "admin",
        Some("ed-a"),
    );
    assert_eq!(
        codec.verify_detailed(&wrong_key).unwrap_err(),
        TokenRejection::BadSignature
    );

    let user = User {
        user_id: UserId::new("user_2").unwrap(),
        email: "u2@cmz.org".into(),
        display_name: String::new(),
        role: UserRole::Visitor,
        user_type: UserType::None,
        family_id: None,
        password_hash: None,
        soft_delete: false,
    };
    let ours = codec.issue(&user, None).unwrap().token;
    let out = python(
        PYJWT_DECODE,
        &serde_json::json!({"token": ours, "key": testdata("ed25519-a.pub"), "alg": "EdDSA"})
            .to_string(),
    );
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["sub"],
        "user_2"
    );
}

#[test]
fn legacy_password_hashes_made_by_python_verify() {
    let stored = python(
        r#"
import hashlib, secrets
salt = secrets.token_hex(16)
print(salt + ":" + hashlib.pbkdf2_hmac("sha256", "zoo-pässword".encode(), salt.encode(), 100000).hex())
"#,
        "",
    );
    let hasher = PasswordHasher::new(1024, 1, 1).unwrap();
    assert_eq!(
        hasher.verify_blocking("zoo-pässword", &stored),
        PasswordCheck::Valid { needs_rehash: true }
    );
    assert_eq!(
        hasher.verify_blocking("zoo-password", &stored),
        PasswordCheck::Invalid
    );
}

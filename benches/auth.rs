//! Verifying one access token in cmz vs PyJWT's `jwt.decode` on the same token, in the
//! same run; and the cost of a login at the chosen argon2id parameters.
//!
//! `cargo bench -p cmz-benches --bench auth` (needs `pip install 'pyjwt[crypto]'`).

use std::process::Command;
use std::time::{Duration, Instant};

use cmz_benches::median;
use cmz_core::access::UserRole;
use cmz_core::auth::{
    AuthService, AuthSettings, AuthStores, PasswordHasher, TokenCodec, TokenKeys, User, UserType,
};
use cmz_core::ids::UserId;
use criterion::{Criterion, black_box};

const SECRET: &str = "bench-secret-bench-secret-bench-secret-0123";

fn user() -> User {
    User {
        user_id: UserId::new("user_student_ana").expect("id"),
        email: "student1@cmz.org".into(),
        display_name: "Ana".into(),
        role: UserRole::Student,
        user_type: UserType::Student,
        family_id: None,
        password_hash: None,
        soft_delete: false,
    }
}

/// PyJWT decodes per second on `token`: the median of 5 timed runs of 20,000 decodes.
fn pyjwt_ops_per_sec(token: &str) -> Option<f64> {
    let script = format!(
        r#"
import jwt, time, statistics
token = "{token}"
rates = []
for _ in range(5):
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        jwt.decode(token, "{SECRET}", algorithms=["HS256"], issuer="cmz-api")
    rates.append(n / (time.perf_counter() - start))
print(statistics.median(rates))
"#
    );
    let output = Command::new("python3")
        .args(["-c", &script])
        .output()
        .ok()?;
    if !output.status.success() {
        eprintln!(
            "PyJWT run failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        return None;
    }
    String::from_utf8(output.stdout).ok()?.trim().parse().ok()
}

/// cmz verifications per second: the median of 5 timed runs of 200,000.
fn cmz_ops_per_sec(codec: &TokenCodec, token: &str) -> f64 {
    let rates: Vec<f64> = (0..5)
        .map(|_| {
            let n = 200_000;
            let start = Instant::now();
            for _ in 0..n {
                black_box(codec.verify(black_box(token)).expect("valid"));
            }
            n as f64 / start.elapsed().as_secs_f64()
        })
        .collect();
    median(rates)
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let codec = TokenCodec::new(
        TokenKeys::hs256(SECRET.as_bytes()).expect("secret"),
        Duration::from_secs(3600),
    );
    let token = codec.issue(&user(), Some("family")).expect("token").token;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let settings = AuthSettings::with_secret(SECRET.as_bytes()).expect("settings");
    let auth = rt
        .block_on(AuthService::new(settings, AuthStores::in_memory()))
        .expect("auth");

    let mut group = criterion.benchmark_group("auth");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("verify_hs256_signature_and_claims", |b| {
        b.iter(|| codec.verify(black_box(&token)).expect("valid"))
    });
    group.bench_function("authenticate_with_revocation_check", |b| {
        b.iter(|| {
            rt.block_on(auth.authenticate(black_box(&token)))
                .expect("valid")
        })
    });
    group.finish();

    let ours = cmz_ops_per_sec(&codec, &token);
    println!("\ntoken verification (HS256, same token, median of 5 runs):");
    println!("  cmz   TokenCodec::verify : {ours:>12.0} ops/s");
    match pyjwt_ops_per_sec(&token) {
        Some(theirs) => {
            println!("  PyJWT jwt.decode       : {theirs:>12.0} ops/s");
            println!("  cmz / PyJWT            : {:>12.1}x", ours / theirs);
        }
        None => println!("  PyJWT not available: pip install 'pyjwt[crypto]'"),
    }

    let hasher = PasswordHasher::owasp();
    let (m, t, p) = hasher.parameters();
    let hash = hasher.hash_blocking("admin123").expect("hash");
    let times: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            black_box(hasher.verify_blocking("admin123", &hash));
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!(
        "\nargon2id password check at m={m} KiB, t={t}, p={p} (OWASP minimum): median {:.1} ms",
        median(times)
    );

    let mut dev = AuthSettings::development();
    dev.keys = TokenKeys::hs256(SECRET.as_bytes()).expect("secret");
    let auth = rt
        .block_on(AuthService::new(dev, AuthStores::in_memory()))
        .expect("auth");
    let logins: Vec<f64> = (0..7)
        .map(|i| {
            let start = Instant::now();
            rt.block_on(auth.login("admin@cmz.org", "admin123", Some(&format!("10.0.0.{i}"))))
                .expect("login");
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    println!(
        "full login (lookup, argon2id check, access + refresh token): median {:.1} ms",
        median(logins)
    );
    criterion.final_summary();
}

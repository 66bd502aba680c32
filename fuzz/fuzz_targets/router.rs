//! Every route of `cmz_tower::router`, driven in process (tower's `oneshot`, no socket)
//! with any method, path, query string, headers and body, with or without a valid access
//! token: the answer is never a 5xx, an error answer always has a JSON body, and nothing
//! panics (the fuzzer aborts on any panic, the ones the catch-panic layer turns into 500
//! included).
//!
//! The app runs on in-memory stores with the scripted echo model (no network), cheap
//! argon2 settings, no turn limit, and is rebuilt every few thousand requests so the stores
//! stay small. Tokens are minted with the app's secret; a logout gets a token of its own.

#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use cmz_core::access::UserRole;
use cmz_core::auth::{
    AuthService, AuthSettings, AuthStores, DevDirectory, PasswordHasher, TokenCodec, TokenKeys,
    User, UserType,
};
use cmz_core::ids::{FamilyId, UserId};
use cmz_core::memory::{InMemoryCareStore, InMemoryConversationStore, InMemoryPersonaDirectory};
use cmz_core::service::{ConversationConfig, ConversationService};
use cmz_core::testing::ScriptedModel;
use cmz_core::types::Persona;
use cmz_tower::{AppState, HttpSettings, Services};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;

const SECRET: &[u8] = b"router-fuzz-secret-router-fuzz-secret-0123";
const PERSONAS: &str = include_str!("../../cmz-env/src/sample-personas.json");
/// Requests served by one app before it is built again.
const REBUILD_EVERY: u32 = 20_000;

/// The development users (embedded in cmz-core) as token subjects.
const USERS: &[(&str, UserRole, Option<&str>)] = &[
    ("user_admin", UserRole::Admin, None),
    (
        "user_parent_rivera",
        UserRole::Parent,
        Some("family_rivera"),
    ),
    ("user_student_ana", UserRole::Student, Some("family_rivera")),
    ("user_student_leo", UserRole::Student, Some("family_rivera")),
    ("user_student_kim", UserRole::Student, Some("family_chen")),
];

struct App {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
    /// Access tokens of `USERS`, in order.
    tokens: Vec<String>,
    codec: TokenCodec,
    served: u32,
}

fn user(index: usize) -> User {
    let (id, role, family) = USERS[index % USERS.len()];
    User {
        user_id: UserId::new(id).unwrap(),
        email: format!("{id}@cmz.org"),
        display_name: id.into(),
        role,
        user_type: UserType::None,
        family_id: family.map(|f| FamilyId::new(f).unwrap()),
        password_hash: None,
        soft_delete: false,
    }
}

fn build() -> App {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let router = runtime.block_on(async {
        let stores = AuthStores::in_memory();
        let rate_limits = stores.limits.clone();
        let settings = AuthSettings {
            // The smallest argon2id cost: logins stay out of the way of the fuzzer.
            hasher: PasswordHasher::new(8, 1, 1).unwrap(),
            dev_users: Some(DevDirectory::embedded()),
            ..AuthSettings::with_secret(SECRET).unwrap()
        };
        let auth = AuthService::new(settings, stores).await.unwrap();
        let personas: Vec<Persona> = serde_json::from_str(PERSONAS).unwrap();
        let personas = Arc::new(InMemoryPersonaDirectory::with_personas(personas));
        let conversations = ConversationService::with(
            Arc::new(InMemoryConversationStore::new()),
            personas.clone(),
            Arc::new(ScriptedModel::echo()),
            Arc::new(auth.policy()),
            ConversationConfig::default(),
        )
        .with_turn_limit(rate_limits.clone(), u32::MAX, Duration::from_secs(3600))
        // Feedback, the review queue and usage reports answer as in a deployment (without
        // a care store they are a 503, which this target counts as a crash).
        .with_care(Arc::new(InMemoryCareStore::new()));
        let services = Services::new(conversations, auth, cmz_tower::offline_health());
        cmz_tower::router(AppState::new(services, HttpSettings::default()))
    });
    let codec = TokenCodec::new(TokenKeys::hs256(SECRET).unwrap(), Duration::from_secs(3600));
    let tokens = (0..USERS.len())
        .map(|i| codec.issue(&user(i), None).unwrap().token)
        .collect();
    App {
        runtime,
        router,
        tokens,
        codec,
        served: 0,
    }
}

fn verbose() -> bool {
    static VERBOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("CMZ_FUZZ_VERBOSE").is_some())
}

thread_local! {
    static APP: RefCell<Option<App>> = const { RefCell::new(None) };
}

/// Placeholders replaced by a valid access token of the user, anywhere in the request
/// line and headers (`Authorization: Bearer $ana`, `?token=$ana`).
const PLACEHOLDERS: &[&str] = &["$admin", "$parent", "$ana", "$leo", "$kim"];

/// The input is an HTTP/1-like request: `METHOD TARGET` on the first line, then
/// `name: value` headers, an empty line, and the body (any bytes).
fn request(data: &[u8], app: &App) -> Option<http::Request<Body>> {
    let split = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .map_or((data, &[][..]), |at| (&data[..at], &data[at + 2..]));
    let (head, body) = split;
    let head = String::from_utf8_lossy(head);
    let mut lines = head.split('\n');
    let (method, target) = lines.next()?.split_once(' ')?;
    let is_logout = target.starts_with("/auth/logout");
    // A logout revokes its token: it gets a fresh one, so the shared ones stay valid.
    let with_tokens = |text: &str| {
        let mut text = text.to_owned();
        for (index, placeholder) in PLACEHOLDERS.iter().enumerate() {
            while let Some(at) = text.find(placeholder) {
                let token = if is_logout {
                    app.codec.issue(&user(index), None).unwrap().token
                } else {
                    app.tokens[index].clone()
                };
                text.replace_range(at..at + placeholder.len(), &token);
            }
        }
        text
    };
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).ok()?)
        .uri(with_tokens(target));
    for line in lines {
        let (name, value) = line.split_once(':')?;
        builder = builder.header(name.trim(), with_tokens(value.trim()));
    }
    // A URI or header the http crate refuses never reaches a server.
    builder.body(Body::from(body.to_vec())).ok()
}

fuzz_target!(|data: &[u8]| {
    APP.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|app| app.served >= REBUILD_EVERY) {
            *slot = Some(build());
        }
        let app = slot.as_mut().unwrap();
        app.served += 1;
        let Some(request) = request(data, app) else {
            return;
        };
        let is_head = request.method() == http::Method::HEAD;
        // CMZ_FUZZ_VERBOSE=1 prints each request's method, path and status (never the
        // query or headers: they hold tokens), to check what the seeds reach.
        let shown = verbose().then(|| format!("{} {}", request.method(), request.uri().path()));
        let router = app.router.clone();
        app.runtime.block_on(async move {
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            if let Some(shown) = shown {
                eprintln!("{shown} -> {status}");
            }
            let json_body = response
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("application/json"));
            // Read the whole body: an SSE reply runs the turn while it is read.
            let body = axum::body::to_bytes(response.into_body(), 16 * 1024 * 1024)
                .await
                .expect("the body can be read to its end");
            assert!(
                !status.is_server_error(),
                "{status} answered (body: {})",
                String::from_utf8_lossy(&body)
            );
            // A HEAD answer has no body (the headers are a GET's).
            if status.is_client_error() && !is_head {
                assert!(json_body, "a {status} without a JSON error body");
                let parsed: serde_json::Value =
                    serde_json::from_slice(&body).expect("an error body is JSON");
                assert!(parsed.is_object(), "an error body is a JSON object");
            }
        });
    });
});

//! The demo server: cmz's HTTP API on 127.0.0.1:8080 with a small chat page at `/`.
//!
//! `cargo run -p cmz-examples --bin demo` runs it on its embedded defaults: in-memory
//! store, the development users (`admin@cmz.org` / `admin123`, …), sample animals and the
//! offline persona model. Every setting comes from the legacy variables (see the README);
//! `CMZ_BIND` moves it.
//!
//! `cargo run -p cmz-examples --features dynamo --bin demo` keeps everything in DynamoDB:
//! with `DYNAMODB_ENDPOINT_URL` set it uses that server (and the legacy table variables);
//! without, it starts Amazon's DynamoDB Local itself (fetched once with `npm`, run with
//! Java, data kept in `target/demo-dynamodb`) and creates the tables.

use axum::http::{HeaderValue, header};
use axum::response::Html;
use axum::routing::get;
use cmz_tower::SecurityHeadersLayer;

// A server allocates and frees on every request from several threads; mimalloc's
// per-thread heaps avoid the contended arena locks of the system allocator. Feature
// `system-allocator` leaves it out for heap profilers.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The chat page.
const PAGE: &str = include_str!("static/index.html");
/// Its script and styles, served as files: the page's policy allows no inline code.
const SCRIPT: &str = include_str!("static/chat.js");
const STYLES: &str = include_str!("static/chat.css");

/// What the page may do: load its own script and styles, talk to its own origin (`fetch`
/// and `EventSource`), nothing else; no inline code, no plugins, no framing.
const PAGE_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; \
     form-action 'self'; frame-ancestors 'none'";

/// The page, its script and its styles, with the security headers and the page's policy.
fn page() -> axum::Router {
    let file = |content_type: &'static str, body: &'static str| {
        get(move || async move { ([(header::CONTENT_TYPE, content_type)], body) })
    };
    axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route("/chat.js", file("text/javascript; charset=utf-8", SCRIPT))
        .route("/chat.css", file("text/css; charset=utf-8", STYLES))
        // `POST /` and the like: the API's JSON 405, not an empty one.
        .method_not_allowed_fallback(cmz_tower::method_not_allowed)
        .layer(
            SecurityHeadersLayer::new()
                .with_content_security_policy(HeaderValue::from_static(PAGE_POLICY)),
        )
}

/// How long an idle blocking thread lives (tokio's default is ten seconds). Password
/// checks (argon2id, 19 MiB each) run on blocking threads, and mimalloc returns a thread's
/// freed pages to the system when the thread ends: with a short life the demo is back to
/// its idle size (about 7 MB) a second after a login, instead of holding ~20 MB more for
/// ten. Starting a thread again costs microseconds; a password check takes milliseconds.
const BLOCKING_THREAD_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_keep_alive(BLOCKING_THREAD_KEEP_ALIVE)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run()),
        Err(error) => {
            eprintln!("cmz demo: cannot start the async runtime: {error}");
            std::process::exit(1);
        }
    }
}

async fn run() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=info".into()),
        )
        .init();
    let env = demo_backend();
    let state = match cmz_tower::state_from_env(&|name| env.lookup(name)).await {
        Ok(state) => state,
        Err(error) => {
            eprintln!("cmz demo: {}", error.report());
            std::process::exit(1);
        }
    };
    let bind = state.settings().bind;
    let mut app = page().merge(cmz_tower::router(state));
    if cmz_tower::demo_env("CMZ_METRICS").is_some_and(|v| v == "1" || v == "true") {
        match cmz_tower::prometheus_router() {
            Ok(metrics) => app = app.merge(metrics),
            Err(error) => eprintln!("cmz demo: metrics disabled: {}", error.report()),
        }
    }
    println!("cmz demo on http://{bind}/  (log in as admin@cmz.org / admin123)");
    if let Some(endpoint) = env.endpoint() {
        println!("conversations are kept in DynamoDB at {endpoint}");
    }
    if let Err(error) = cmz_tower::serve(app, bind).await {
        eprintln!("cmz demo: {}", error.report());
        std::process::exit(1);
    }
}

/// The environment the demo reads, and the DynamoDB Local it started, if any.
struct DemoEnv {
    #[cfg(feature = "dynamo")]
    local: Option<cmz_dynamo::testing::DynamoLocal>,
}

impl DemoEnv {
    fn lookup(&self, name: &str) -> Option<String> {
        #[cfg(feature = "dynamo")]
        if let Some(local) = &self.local {
            match name {
                "DYNAMODB_ENDPOINT_URL" => return Some(local.endpoint()),
                "CMZ_DYNAMODB_CREATE_TABLES" => return Some("1".into()),
                _ => {}
            }
        }
        cmz_tower::demo_env(name)
    }

    fn endpoint(&self) -> Option<String> {
        self.lookup("DYNAMODB_ENDPOINT_URL")
    }
}

#[cfg(feature = "dynamo")]
fn demo_backend() -> DemoEnv {
    if cmz_tower::demo_env("DYNAMODB_ENDPOINT_URL").is_some() {
        return DemoEnv { local: None };
    }
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/demo-dynamodb");
    println!("starting DynamoDB Local (data in {})", data.display());
    DemoEnv {
        local: Some(cmz_dynamo::testing::DynamoLocal::start(Some(&data))),
    }
}

#[cfg(not(feature = "dynamo"))]
fn demo_backend() -> DemoEnv {
    DemoEnv {}
}

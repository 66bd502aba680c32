//! The demo server: cmz's HTTP API on 127.0.0.1:8080 with a small chat page at `/`.
//!
//! `cargo run -p cmz-examples --bin demo` runs it on its embedded defaults: in-memory
//! store, the development users (`admin@cmz.org` / `admin123`, …), sample animals and the
//! offline persona model. Every setting comes from the legacy variables (see the README);
//! `CMZ_BIND` moves it.

use axum::response::Html;
use axum::routing::get;

/// The chat page.
const PAGE: &str = include_str!("static/index.html");

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=info".into()),
        )
        .init();
    let state = match cmz_tower::state_from_env(&cmz_tower::demo_env).await {
        Ok(state) => state,
        Err(error) => {
            eprintln!("cmz demo: {error}");
            std::process::exit(1);
        }
    };
    let bind = state.settings().bind;
    let mut app = axum::Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .merge(cmz_tower::router(state));
    if cmz_tower::demo_env("CMZ_METRICS").is_some_and(|v| v == "1" || v == "true") {
        match cmz_tower::prometheus_router() {
            Ok(metrics) => app = app.merge(metrics),
            Err(error) => eprintln!("cmz demo: metrics disabled: {error}"),
        }
    }
    println!("cmz demo on http://{bind}/  (log in as admin@cmz.org / admin123)");
    if let Err(error) = cmz_tower::serve(app, bind).await {
        eprintln!("cmz demo: {error}");
        std::process::exit(1);
    }
}

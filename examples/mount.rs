//! Mounting cmz inside your own axum app: cmz's API under `/api`, next to your own routes,
//! with cmz's `RequireAuthLayer` protecting one of yours.
//!
//! `cargo run -p cmz-examples --bin mount`, then `curl http://127.0.0.1:8080/hello`.

use axum::routing::get;
use axum::{Extension, Router};
use cmz_core::access::Principal;

#[tokio::main]
async fn main() {
    let state = match cmz_tower::state_from_env(&cmz_tower::demo_env).await {
        Ok(state) => state,
        Err(error) => {
            eprintln!("mount example: {}", error.report());
            std::process::exit(1);
        }
    };
    let bind = state.settings().bind;
    let auth = state.auth().clone();
    let mine = Router::new()
        .route("/hello", get(|| async { "hello from my own app\n" }))
        .route(
            "/my/profile",
            get(|Extension(me): Extension<Principal>| async move {
                format!("you are {} ({})\n", me.user_id, me.role.as_str())
            })
            .layer(cmz_tower::RequireAuthLayer::new(auth)),
        );
    let app = mine.nest("/api", cmz_tower::router(state));
    println!("my app on http://{bind}/hello, cmz under http://{bind}/api/");
    if let Err(error) = cmz_tower::serve(app, bind).await {
        eprintln!("mount example: {}", error.report());
        std::process::exit(1);
    }
}

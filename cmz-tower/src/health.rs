//! The health routes (`/chatgpt/health`, `/system_health`) and the JSON answers for an
//! unknown route and a method a route does not serve.

use axum::Json;
use axum::extract::State;
use chrono::Utc;
use serde_json::{Value, json};

use crate::error::ApiError;
use crate::state::AppState;

pub(crate) async fn chatgpt_health(State(state): State<AppState>) -> Json<Value> {
    let health = (state.inner.services.health())().await;
    Json(json!({
        "status": if health.status == "ok" { "healthy" } else { "error" },
        "api_key_configured": !health.offline,
        "model": health.model,
        "offline": health.offline,
        "latencyMs": health.latency_ms,
        "error": health.error,
        "timestamp": Utc::now(),
    }))
}

pub(crate) async fn system_health(State(state): State<AppState>) -> Json<Value> {
    let store = if state
        .inner
        .services
        .conversations()
        .store_is_reachable()
        .await
    {
        "ok"
    } else {
        "error"
    };
    let model = (state.inner.services.health())().await;
    let ai = if model.status == "ok" { "ok" } else { "error" };
    Json(json!({
        "status": if store == "ok" && ai == "ok" { "ok" } else { "degraded" },
        "timestamp": Utc::now(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": state.inner.started.elapsed().as_secs(),
        "checks": [{ "name": "db", "status": store }, { "name": "ai", "status": ai }],
    }))
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new("not_found", "no such route")
}

/// The JSON `405` (`method_not_allowed`) of a route asked with a method it does not
/// serve. For the routes an application serves beside cmz's
/// (`Router::method_not_allowed_fallback`), so every error it answers has the same body.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new("method_not_allowed", "method not allowed on this route")
}

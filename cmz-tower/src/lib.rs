#![doc = include_str!("../README.md")]

mod auth_layer;
mod config;
mod error;
mod routes;
mod sse;
mod state;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

pub use auth_layer::{AccessToken, AuthLayer, RequireAuth};
pub use config::{SAMPLE_PERSONAS, offline_health, sample_personas, serve, state_from_env};
pub use error::{ApiError, ApiJson, ApiQuery, status_for};
pub use state::{AppState, HealthCheck, HttpSettings, ModelHealth};

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new("internal_error", "internal error").into_response()
}

/// The whole HTTP API as an axum [`Router`]: a `tower::Service<http::Request<B>>` with
/// `Error = Infallible`, so it mounts in any axum, hyper or tower server (nest it under a
/// prefix with `Router::nest`).
///
/// Public: `POST /auth`, `POST /auth/refresh`, `GET /chatgpt/health`, `GET /system_health`.
/// Everything else goes through [`AuthLayer`]. Every failure, including unknown routes,
/// bad bodies, oversized bodies, timeouts and panics, is a JSON `Error` body.
pub fn router(state: AppState) -> Router {
    let settings = state.settings().clone();
    let protected = Router::new()
        .route("/auth/logout", post(routes::logout))
        .route("/me", get(routes::me))
        .route("/animals", get(routes::animals))
        .route("/convo_turn", post(routes::convo_turn))
        .route(
            "/convo_turn/stream",
            get(sse::stream_get).post(sse::stream_post),
        )
        .route(
            "/convo_history",
            get(routes::convo_history).delete(routes::delete_history),
        )
        .route("/conversations/sessions", get(routes::list_sessions))
        .route(
            "/conversations/sessions/{session_id}",
            get(routes::session_detail),
        )
        .route("/summarize_convo", post(routes::summarize))
        .route("/family_list", get(routes::family_list))
        .route_layer(AuthLayer::new(state.auth().clone()));
    let public = Router::new()
        .route("/auth", post(routes::login))
        .route("/auth/refresh", post(routes::refresh))
        .route("/chatgpt/health", get(routes::chatgpt_health))
        .route("/system_health", get(routes::system_health));
    let app = public
        .merge(protected)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .with_state(state);
    with_layers(app, &settings)
}

/// Wraps any router in cmz's HTTP stack: body-size limit, a catch-panic layer that answers
/// 500 with the `Error` body, the request timeout, JSON error bodies for every failure,
/// CORS for the configured origins, tracing and `x-request-id`. [`router`] uses it; use it
/// for routes of your own that should behave the same.
pub fn with_layers(app: Router, settings: &HttpSettings) -> Router {
    let mut app = app
        .layer(DefaultBodyLimit::max(settings.body_limit))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(TimeoutLayer::with_status_code(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            settings.request_timeout,
        ))
        .layer(middleware::map_response(error::ensure_error_body));
    if !settings.cors_origins.is_empty() {
        app = app.layer(
            CorsLayer::new()
                .allow_origin(settings.cors_origins.clone())
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
                .max_age(Duration::from_secs(600)),
        );
    }
    app.layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

#![doc = include_str!("../README.md")]

mod animals;
mod auth_layer;
mod body_timeout;
mod care;
mod client_ip;
mod config;
mod cors;
mod error;
mod headers;
mod health;
mod metrics;
mod privacy;
mod request_id;
mod routes;
mod security_headers;
mod serve;
mod sessions;
mod sse;
mod state;
mod wire;

use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Method, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

#[allow(deprecated)]
pub use auth_layer::AuthLayer;
pub use auth_layer::{AccessToken, RequireAuth, RequireAuthLayer};
pub use body_timeout::{BodyTimeout, BodyTimeoutFuture, BodyTimeoutLayer};
pub use client_ip::TrustedProxies;
pub use cmz_env::{HealthCheck, ModelHealth, Services, cached, offline_health};
#[cfg(feature = "dev")]
pub use cmz_env::{SAMPLE_PERSONAS, sample_personas};
pub use config::{LEGACY_FRONTEND_ORIGINS, demo_env, serve, state_from_env};
pub use error::{ApiError, ApiJson, ApiQuery, HTTP_CODES, status_for, status_of};
pub use headers::AddHeadersFuture;
pub use health::method_not_allowed;
#[cfg(feature = "prometheus")]
pub use metrics::prometheus_router;
pub use security_headers::{API_CONTENT_SECURITY_POLICY, SecurityHeaders, SecurityHeadersLayer};
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub use serve::check_request;
pub use serve::{ConnectionLimits, MAX_HEAD_BYTES, MAX_HEADERS, serve_with};
pub use state::{AppState, HttpSettings};

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new("internal_error", "internal error").into_response()
}

/// The whole HTTP API as an axum [`Router`]: a `tower::Service<http::Request<B>>` with
/// `Error = Infallible`, so it mounts in any axum, hyper or tower server (nest it under a
/// prefix with `Router::nest`).
///
/// Public: `POST /auth`, `POST /auth/refresh`, `GET /chatgpt/health`, `GET /system_health`,
/// `GET /animal_list` and `GET /animal/{animalId}` (the offered animals: no personal data).
/// Everything else goes through [`RequireAuthLayer`], which reads `?token=` only on
/// `GET /convo_turn/stream` (EventSource). Every failure, including unknown routes, bad
/// bodies, oversized bodies, timeouts and panics, is a JSON `Error` body.
pub fn router(state: AppState) -> Router {
    let settings = state.settings().clone();
    let header_token = RequireAuthLayer::new(state.auth().clone());
    let query_token = header_token.clone().with_query_token();
    let mut app = Router::new();
    for (route, handler) in TABLE {
        let handler = handler();
        let handler = match (route.public, route.query_token) {
            (true, _) => handler,
            (false, true) => handler.route_layer(query_token.clone()),
            (false, false) => handler.route_layer(header_token.clone()),
        };
        app = app.route(route.path, handler);
    }
    let app = app
        .fallback(health::not_found)
        .method_not_allowed_fallback(health::method_not_allowed)
        .with_state(state);
    with_layers(app, &settings)
}

/// One route the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method, uppercase.
    pub method: &'static str,
    /// The path, with `{parameters}` as axum writes them.
    pub path: &'static str,
    /// Served without an access token.
    pub public: bool,
    /// Takes the access token from `?token=` too (an EventSource stream, whose browser
    /// client cannot send headers); every other route ignores that parameter.
    pub query_token: bool,
}

const fn route(method: &'static str, path: &'static str, public: bool) -> Route {
    Route {
        method,
        path,
        public,
        query_token: false,
    }
}

/// A protected route an `EventSource` opens: the token may come as `?token=`.
const fn event_source_route(path: &'static str) -> Route {
    Route {
        method: "GET",
        path,
        public: false,
        query_token: true,
    }
}

type MakeHandler = fn() -> axum::routing::MethodRouter<AppState>;

/// The routes and their handlers, in one table: [`router`] is built from it and
/// [`routes`] lists it (a test checks that list against `openapi.yaml`).
const TABLE: &[(Route, MakeHandler)] = &[
    (route("POST", "/auth", true), || post(routes::login)),
    (route("POST", "/auth/refresh", true), || {
        post(routes::refresh)
    }),
    (route("GET", "/chatgpt/health", true), || {
        get(health::chatgpt_health)
    }),
    (route("GET", "/system_health", true), || {
        get(health::system_health)
    }),
    (route("GET", "/animal_list", true), || {
        get(animals::animal_list)
    }),
    (route("GET", "/animal/{animalId}", true), || {
        get(animals::animal_get)
    }),
    (route("POST", "/auth/logout", false), || {
        post(routes::logout)
    }),
    (route("GET", "/me", false), || get(routes::me)),
    (route("GET", "/me/limits", false), || get(care::my_limits)),
    (route("GET", "/animals", false), || get(animals::animals)),
    (route("POST", "/convo_turn", false), || {
        post(routes::convo_turn)
    }),
    (event_source_route("/convo_turn/stream"), || {
        get(sse::stream_get)
    }),
    (route("POST", "/convo_turn/stream", false), || {
        post(sse::stream_post)
    }),
    (
        route("POST", "/convo_turn/stream/{streamId}/stop", false),
        || post(sse::stop),
    ),
    (route("GET", "/convo_history", false), || {
        get(routes::convo_history)
    }),
    (route("DELETE", "/convo_history", false), || {
        axum::routing::delete(routes::delete_history)
    }),
    (route("GET", "/conversations/sessions", false), || {
        get(sessions::list_sessions)
    }),
    (
        route("GET", "/conversations/sessions/{sessionId}", false),
        || get(sessions::session_detail),
    ),
    (route("POST", "/summarize_convo", false), || {
        post(routes::summarize)
    }),
    (route("GET", "/family_list", false), || {
        get(routes::family_list)
    }),
    (route("GET", "/conversations/export", false), || {
        get(privacy::export)
    }),
    (route("DELETE", "/users/{userId}/data", false), || {
        axum::routing::delete(privacy::erase_user)
    }),
    (
        route("PUT", "/families/{familyId}/retention", false),
        || axum::routing::put(privacy::set_retention),
    ),
    (
        route(
            "POST",
            "/conversations/sessions/{sessionId}/messages/{messageId}/feedback",
            false,
        ),
        || post(care::give_feedback),
    ),
    (
        route(
            "GET",
            "/conversations/sessions/{sessionId}/messages/{messageId}/feedback",
            false,
        ),
        || get(care::my_feedback),
    ),
    (route("GET", "/review/queue", false), || {
        get(care::review_queue)
    }),
    (route("GET", "/review/queue/{itemId}", false), || {
        get(care::review_item)
    }),
    (
        route("POST", "/review/queue/{itemId}/reviewed", false),
        || post(care::mark_reviewed),
    ),
    (route("GET", "/usage", false), || get(care::usage)),
];

/// Every route [`router`] serves, and only those.
pub fn routes() -> impl Iterator<Item = Route> {
    TABLE.iter().map(|(route, _)| *route)
}

/// Wraps any router in cmz's HTTP stack: body-size limit, a catch-panic layer that answers
/// 500 with the `Error` body, the body timeout (408), the request timeout, JSON error
/// bodies for every failure, CORS for the configured origins, tracing, `x-request-id` and
/// the security headers of [`SecurityHeadersLayer`] (with the API's strict
/// `Content-Security-Policy`, unless a route sets its own). [`router`] uses it; use it
/// for routes of your own that should behave the same.
pub fn with_layers(app: Router, settings: &HttpSettings) -> Router {
    // Spans carry the path only: query strings can hold access tokens (`?token=`) and
    // children's messages, which stay out of logs.
    let trace = TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<axum::body::Body>| {
        let id = request
            .headers()
            .get(&request_id::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        tracing::info_span!("http", method = %request.method(), path = %request.uri().path(), request_id = id)
    });
    // Each `Router::layer` call boxes every route again and costs an allocation per layer
    // per request, so the layers are composed here and applied once. Outermost first; CORS
    // (when configured) sits inside the request id and trace layers, so preflight answers
    // carry an id and are traced, and outside the error-body layer, so errors carry CORS
    // headers.
    let outer = ServiceBuilder::new()
        .layer(SecurityHeadersLayer::new())
        .layer(request_id::RequestIdLayer)
        .layer(trace);
    // tower's `map_response`, not axum's: axum's clones the services inside it and boxes
    // its future on every request.
    let inner = ServiceBuilder::new()
        .map_response(error::ensure_error_body)
        .map_response(IntoResponse::into_response)
        .layer(TimeoutLayer::with_status_code(
            // 504, not 408: the server (a model, a store) was slow, not the client, and
            // clients may repeat a 408 on their own.
            axum::http::StatusCode::GATEWAY_TIMEOUT,
            settings.request_timeout,
        ))
        .layer(BodyTimeoutLayer::new(settings.body_timeout))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(DefaultBodyLimit::max(settings.body_limit));
    if settings.cors_origins.is_empty() {
        return app.layer(outer.layer(inner));
    }
    let cors = CorsLayer::new()
        .allow_origin(settings.cors_origins.clone())
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600));
    app.layer(outer.layer(cors::CorsIfOriginLayer::new(cors)).layer(inner))
}

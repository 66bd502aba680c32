//! A server on the in-memory stores with a scripted model, and a client for it.

use std::sync::Arc;
use std::time::Duration;

use cmz_core::auth::{
    AuthService, AuthSettings, AuthStores, DevDirectory, InMemoryAuditSink, PasswordHasher,
};
use cmz_core::memory::{InMemoryConversationStore, InMemoryPersonaDirectory};
use cmz_core::service::{ConversationConfig, ConversationService};
use cmz_core::testing::ScriptedModel;
use cmz_tower::{AppState, HttpSettings};
use serde_json::Value;

const SECRET: &[u8] = b"memory-test-secret-memory-test-secret-012345";

/// A running server: its base URL, a client, its state and its audit events.
pub(crate) struct MemoryServer {
    pub(crate) base: String,
    pub(crate) client: reqwest::Client,
    pub(crate) state: AppState,
    pub(crate) audit: Arc<InMemoryAuditSink>,
}

/// Serves cmz's router over the in-memory stores, the development users and the sample
/// animals, with `model` and `settings`.
pub(crate) async fn start(model: ScriptedModel, settings: HttpSettings) -> MemoryServer {
    let audit = Arc::new(InMemoryAuditSink::new());
    let stores = AuthStores {
        audit: audit.clone(),
        ..AuthStores::in_memory()
    };
    let rate_limits = stores.limits.clone();
    let auth_settings = AuthSettings {
        hasher: PasswordHasher::new(1024, 1, 1).unwrap(),
        dev_users: Some(DevDirectory::embedded()),
        ..AuthSettings::with_secret(SECRET).unwrap()
    };
    let auth = AuthService::new(auth_settings, stores).await.unwrap();
    let personas = Arc::new(InMemoryPersonaDirectory::with_personas(
        cmz_tower::sample_personas(),
    ));
    let conversations = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        personas.clone(),
        Arc::new(model),
        Arc::new(auth.policy()),
        ConversationConfig::default(),
    )
    .with_turn_limit(rate_limits.clone(), 1000, Duration::from_secs(3600));
    let services = cmz_tower::Services::new(conversations, auth, cmz_tower::offline_health());
    let state = AppState::new(services, settings);
    MemoryServer {
        base: super::serve(cmz_tower::router(state.clone())).await,
        client: reqwest::Client::new(),
        state,
        audit,
    }
}

impl MemoryServer {
    /// The URL of `path`.
    pub(crate) fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `host:port` of the server.
    pub(crate) fn address(&self) -> &str {
        self.base.trim_start_matches("http://")
    }

    /// Sends `request`; the status and the JSON body (`Null` when empty).
    pub(crate) async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"))
        };
        (status, body)
    }

    /// POSTs `body` as JSON, with a bearer `token` when given.
    pub(crate) async fn post_json(
        &self,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> (u16, Value) {
        let mut request = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body.to_string());
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// GETs `path`, with a bearer `token` when given.
    pub(crate) async fn get(&self, path: &str, token: Option<&str>) -> (u16, Value) {
        let mut request = self.client.get(self.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.send(request).await
    }

    /// Logs in; the access token.
    pub(crate) async fn login(&self, email: &str, password: &str) -> String {
        let body = serde_json::json!({"username": email, "password": password});
        let (status, body) = self.post_json("/auth", None, body).await;
        assert_eq!(status, 200, "{body}");
        body["token"].as_str().unwrap().to_owned()
    }
}

/// Asserts an `Error` body with `status` and `code`.
pub(crate) fn assert_error(response: &(u16, Value), status: u16, code: &str) {
    assert_eq!(response.0, status, "{response:?}");
    assert_eq!(response.1["code"], code, "{response:?}");
    assert!(response.1["message"].is_string(), "{response:?}");
}

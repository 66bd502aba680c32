//! What the HTTP layer needs: the services, the personas, the limits and a model health check.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use cmz_core::auth::{AuthService, DynRateLimitStore};
use cmz_core::ids::AnimalId;
use cmz_core::persona::DynPersonaDirectory;
use cmz_core::service::ConversationService;
use cmz_core::{Error, Result};
use futures::future::BoxFuture;
use serde::Serialize;

/// The outcome of a model health check (`GET /chatgpt/health`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelHealth {
    /// `ok`, `degraded` or `unavailable`.
    pub status: String,
    /// The model name.
    pub model: String,
    /// True for the offline persona model (no LLM behind it).
    pub offline: bool,
    /// How long the check took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// Why it is not ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Checks the chat model.
pub type HealthCheck = Arc<dyn Fn() -> BoxFuture<'static, ModelHealth> + Send + Sync>;

/// HTTP settings, from `CMZ_*` variables.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where the demo server listens (`CMZ_BIND`, default `127.0.0.1:8080`).
    pub bind: SocketAddr,
    /// Origins allowed by CORS (`CMZ_CORS_ORIGINS`, comma-separated; default none: same
    /// origin only).
    pub cors_origins: Vec<HeaderValue>,
    /// Turns per user per window (`CMZ_TURN_RATE_LIMIT`, default 50, the legacy limit).
    pub turn_limit: u32,
    /// The rate-limit window (`CMZ_TURN_RATE_WINDOW_SECONDS`, default 3,600).
    pub turn_window: Duration,
    /// Largest request body (`CMZ_BODY_LIMIT_BYTES`, default 64 KiB).
    pub body_limit: usize,
    /// Time to produce a response head (`CMZ_REQUEST_TIMEOUT_SECONDS`, default 60).
    pub request_timeout: Duration,
    /// Pause between the offline model's streamed words (`CMZ_OFFLINE_CHUNK_DELAY_MS`,
    /// default 0), to demo or load-test long-lived streams.
    pub offline_chunk_delay: Duration,
    /// The animal a turn with `animalId: "default"` talks to (`CMZ_DEFAULT_ANIMAL_ID`; the
    /// legacy chat page sends `default` when it is opened without an animal). Unset: an
    /// animal whose id is `default` if there is one, else the offered animal with the
    /// smallest id.
    pub default_animal: Option<AnimalId>,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cors_origins: Vec::new(),
            turn_limit: 50,
            turn_window: Duration::from_secs(3600),
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(60),
            offline_chunk_delay: Duration::ZERO,
            default_animal: None,
        }
    }
}

fn number<T: std::str::FromStr>(
    lookup: &dyn Fn(&str) -> Option<String>,
    name: &'static str,
) -> Result<Option<T>> {
    lookup(name)
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim().parse::<T>().map_err(|_| {
                Error::validation(name, format!("{name} must be a positive number, got {v:?}"))
            })
        })
        .transpose()
}

impl HttpSettings {
    /// Settings from environment-style variables (see the field docs).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut settings = Self::default();
        if let Some(bind) = lookup("CMZ_BIND").filter(|v| !v.trim().is_empty()) {
            settings.bind = bind.trim().parse().map_err(|_| {
                Error::validation(
                    "CMZ_BIND",
                    format!("CMZ_BIND must be an address like 127.0.0.1:8080, got {bind:?}"),
                )
            })?;
        }
        if let Some(origins) = lookup("CMZ_CORS_ORIGINS") {
            settings.cors_origins = origins
                .split(',')
                .map(str::trim)
                .filter(|o| !o.is_empty())
                .map(|o| {
                    HeaderValue::from_str(o).map_err(|_| {
                        Error::validation("CMZ_CORS_ORIGINS", format!("bad origin {o:?}"))
                    })
                })
                .collect::<Result<_>>()?;
        }
        if let Some(limit) = number::<u32>(lookup, "CMZ_TURN_RATE_LIMIT")? {
            settings.turn_limit = limit.max(1);
        }
        if let Some(window) = number::<u64>(lookup, "CMZ_TURN_RATE_WINDOW_SECONDS")? {
            settings.turn_window = Duration::from_secs(window.max(1));
        }
        if let Some(limit) = number::<usize>(lookup, "CMZ_BODY_LIMIT_BYTES")? {
            settings.body_limit = limit.max(1024);
        }
        if let Some(ms) = number::<u64>(lookup, "CMZ_OFFLINE_CHUNK_DELAY_MS")? {
            settings.offline_chunk_delay = Duration::from_millis(ms);
        }
        if let Some(timeout) = number::<u64>(lookup, "CMZ_REQUEST_TIMEOUT_SECONDS")? {
            settings.request_timeout = Duration::from_secs(timeout.max(1));
        }
        if let Some(animal) = lookup("CMZ_DEFAULT_ANIMAL_ID").filter(|v| !v.trim().is_empty()) {
            settings.default_animal = Some(AnimalId::new(animal.trim()).map_err(|_| {
                Error::validation(
                    "CMZ_DEFAULT_ANIMAL_ID",
                    format!("CMZ_DEFAULT_ANIMAL_ID must be an animal id, got {animal:?}"),
                )
            })?);
        }
        Ok(settings)
    }
}

/// Everything the routes need. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<StateInner>,
}

pub(crate) struct StateInner {
    pub(crate) conversations: ConversationService,
    pub(crate) auth: AuthService,
    pub(crate) personas: DynPersonaDirectory,
    pub(crate) limits: DynRateLimitStore,
    pub(crate) health: HealthCheck,
    pub(crate) settings: HttpSettings,
    pub(crate) started: Instant,
    #[cfg(feature = "dynamo")]
    pub(crate) dynamo: Option<cmz_dynamo::Dynamo>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over these services. `health` checks the chat model for `/chatgpt/health`.
    pub fn new(
        conversations: ConversationService,
        auth: AuthService,
        personas: DynPersonaDirectory,
        health: HealthCheck,
        settings: HttpSettings,
    ) -> Self {
        let limits = auth.stores().limits.clone();
        Self {
            inner: Arc::new(StateInner {
                conversations,
                auth,
                personas,
                limits,
                health,
                settings,
                started: Instant::now(),
                #[cfg(feature = "dynamo")]
                dynamo: None,
            }),
        }
    }

    /// The HTTP settings.
    pub fn settings(&self) -> &HttpSettings {
        &self.inner.settings
    }

    /// The conversation service.
    pub fn conversations(&self) -> &ConversationService {
        &self.inner.conversations
    }

    /// The auth service.
    pub fn auth(&self) -> &AuthService {
        &self.inner.auth
    }

    /// The DynamoDB connection behind the stores, when they are DynamoDB's (its
    /// [`capacity`](cmz_dynamo::Dynamo::capacity) sums what the calls consumed).
    #[cfg(feature = "dynamo")]
    pub fn dynamo(&self) -> Option<&cmz_dynamo::Dynamo> {
        self.inner.dynamo.as_ref()
    }

    /// Records the DynamoDB connection the stores use (see [`dynamo`](Self::dynamo)).
    #[cfg(feature = "dynamo")]
    pub fn with_dynamo(self, dynamo: cmz_dynamo::Dynamo) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| StateInner {
            conversations: shared.conversations.clone(),
            auth: shared.auth.clone(),
            personas: shared.personas.clone(),
            limits: shared.limits.clone(),
            health: shared.health.clone(),
            settings: shared.settings.clone(),
            started: shared.started,
            dynamo: shared.dynamo.clone(),
        });
        inner.dynamo = Some(dynamo);
        Self {
            inner: Arc::new(inner),
        }
    }

    /// The animal personas.
    pub fn personas(&self) -> &DynPersonaDirectory {
        &self.inner.personas
    }
}

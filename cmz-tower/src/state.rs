//! What the HTTP layer needs: the services and its own settings.

use crate::client_ip::TrustedProxies;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use cmz_core::auth::AuthService;
use cmz_core::ids::AnimalId;
use cmz_core::service::ConversationService;
use cmz_core::{Error, Result};
use cmz_env::{Services, number};

/// HTTP settings, from `CMZ_*` variables.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where the demo server listens (`CMZ_BIND`, default `127.0.0.1:8080`).
    pub bind: SocketAddr,
    /// Origins allowed by CORS (`CMZ_CORS_ORIGINS`, comma-separated; default none: same
    /// origin only).
    pub cors_origins: Vec<HeaderValue>,
    /// Largest request body (`CMZ_BODY_LIMIT_BYTES`, default 64 KiB).
    pub body_limit: usize,
    /// Time to produce a response head (`CMZ_REQUEST_TIMEOUT_SECONDS`, default 60).
    pub request_timeout: Duration,
    /// Time for a request body to arrive in full, counted from the end of its head
    /// (`CMZ_BODY_TIMEOUT_MS`, default 10,000); a slower body gets `408 request_timeout`.
    pub body_timeout: Duration,
    /// The animal a turn with `animalId: "default"` talks to (`CMZ_DEFAULT_ANIMAL_ID`; the
    /// legacy chat page sends `default` when it is opened without an animal). Unset: an
    /// animal whose id is `default` if there is one, else the offered animal with the
    /// smallest id.
    pub default_animal: Option<AnimalId>,
    /// Proxies whose `Forwarded` / `X-Forwarded-For` headers name the client
    /// (`CMZ_TRUSTED_PROXIES`, addresses or CIDR ranges; default none: the client is the
    /// peer). Login and registration throttles, audit events and logs use that address.
    pub trusted_proxies: TrustedProxies,
    /// Token refreshes (`POST /auth/refresh`) allowed per client address in 15 minutes
    /// (`CMZ_REFRESH_RATE_LIMIT`, default 300: a class behind one NAT address refreshing
    /// several times each stays well under it); past it `429 rate_limit_exceeded`. Counted
    /// in the shared rate-limit store, so it holds across servers.
    pub refresh_limit: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            cors_origins: Vec::new(),
            body_limit: 64 * 1024,
            request_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(10),
            default_animal: None,
            trusted_proxies: TrustedProxies::none(),
            refresh_limit: 300,
        }
    }
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
        if let Some(limit) = number::<usize>(lookup, "CMZ_BODY_LIMIT_BYTES")? {
            settings.body_limit = limit.max(1024);
        }
        if let Some(timeout) = number::<u64>(lookup, "CMZ_REQUEST_TIMEOUT_SECONDS")? {
            settings.request_timeout = Duration::from_secs(timeout.max(1));
        }
        if let Some(timeout) = number::<u64>(lookup, "CMZ_BODY_TIMEOUT_MS")? {
            settings.body_timeout = Duration::from_millis(timeout.max(1));
        }
        if let Some(animal) = lookup("CMZ_DEFAULT_ANIMAL_ID").filter(|v| !v.trim().is_empty()) {
            settings.default_animal = Some(AnimalId::new(animal.trim()).map_err(|_| {
                Error::validation(
                    "CMZ_DEFAULT_ANIMAL_ID",
                    format!("CMZ_DEFAULT_ANIMAL_ID must be an animal id, got {animal:?}"),
                )
            })?);
        }
        if let Some(limit) = number::<u32>(lookup, "CMZ_REFRESH_RATE_LIMIT")? {
            settings.refresh_limit = limit.max(1);
        }
        if let Some(list) = lookup("CMZ_TRUSTED_PROXIES") {
            settings.trusted_proxies = TrustedProxies::parse(&list)?;
        }
        Ok(settings)
    }
}

/// Everything the routes need: the services and the HTTP settings. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<StateInner>,
}

pub(crate) struct StateInner {
    pub(crate) services: Services,
    pub(crate) settings: HttpSettings,
    pub(crate) started: Instant,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over these services (see [`cmz_env::services_from_env`], or
    /// [`Services::new`] to assemble them by hand).
    pub fn new(services: Services, settings: HttpSettings) -> Self {
        Self {
            inner: Arc::new(StateInner {
                services,
                settings,
                started: Instant::now(),
            }),
        }
    }

    /// The HTTP settings.
    pub fn settings(&self) -> &HttpSettings {
        &self.inner.settings
    }

    /// The services.
    pub fn services(&self) -> &Services {
        &self.inner.services
    }

    /// The conversation service.
    pub fn conversations(&self) -> &ConversationService {
        self.inner.services.conversations()
    }

    /// The auth service.
    pub fn auth(&self) -> &AuthService {
        self.inner.services.auth()
    }
}

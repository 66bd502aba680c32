//! Building the server from the environment, with embedded defaults, and serving it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use cmz_core::auth::{AuthService, AuthSettings, AuthStores};
use cmz_core::chat::DynChatModel;
use cmz_core::memory::{InMemoryConversationStore, InMemoryPersonaDirectory, OfflinePersonaModel};
use cmz_core::service::{ConversationConfig, ConversationService};
use cmz_core::types::Persona;
use cmz_core::{Error, Result};

use crate::state::{AppState, HealthCheck, HttpSettings, ModelHealth};

/// The sample animal personas (JSON) used when no persona store is configured.
pub const SAMPLE_PERSONAS: &str = include_str!("sample-personas.json");

/// The sample animal personas.
pub fn sample_personas() -> Vec<Persona> {
    serde_json::from_str(SAMPLE_PERSONAS).expect("the sample personas parse")
}

/// The health check of the offline persona model: always ok, labelled offline.
pub fn offline_health() -> HealthCheck {
    Arc::new(|| {
        Box::pin(async {
            ModelHealth {
                status: "ok".into(),
                model: OfflinePersonaModel::NAME.into(),
                offline: true,
                latency_ms: Some(0),
                error: None,
            }
        })
    })
}

#[cfg(feature = "openai")]
fn openai_model(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(DynChatModel, HealthCheck)>> {
    use cmz_openai::{OpenAiChatModel, OpenAiConfig};
    if !OpenAiConfig::configured_in(lookup) {
        return Ok(None);
    }
    let model = OpenAiChatModel::new(OpenAiConfig::from_lookup(lookup)?)?;
    let checked = model.clone();
    let health: HealthCheck = Arc::new(move || {
        let model = checked.clone();
        Box::pin(async move {
            let name = model.config().model.clone();
            match model.health().await {
                Ok(health) => ModelHealth {
                    status: "ok".into(),
                    model: name,
                    offline: false,
                    latency_ms: Some(health.latency.as_millis() as u64),
                    error: None,
                },
                Err(error) => ModelHealth {
                    status: "unavailable".into(),
                    model: name,
                    offline: false,
                    latency_ms: None,
                    // The code only: upstream messages can name internal hosts.
                    error: Some(error.code().to_owned()),
                },
            }
        })
    });
    Ok(Some((
        Arc::new(model),
        cached(health, std::time::Duration::from_secs(15)),
    )))
}

#[cfg(not(feature = "openai"))]
fn openai_model(
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Option<(DynChatModel, HealthCheck)>> {
    if lookup("OPENAI_API_KEY").is_some() || lookup("OPENAI_BASE_URL").is_some() {
        tracing::warn!(
            "OPENAI_API_KEY/OPENAI_BASE_URL are set but this build has no `openai` feature; using the offline persona model"
        );
    }
    Ok(None)
}

/// The origins the legacy React frontend is served from in development (its Vite dev
/// server's port 3000, and the other ports the legacy backend allowed); it calls the API
/// on `http://localhost:8080` from there.
pub const LEGACY_FRONTEND_ORIGINS: &str =
    "http://localhost:3000,http://localhost:3001,http://localhost:3005";

/// The process environment with the demos' defaults, each used only when its variable is
/// unset: development users (`CMZ_DEV_USERS=embedded`) and CORS for the legacy frontend's
/// development origins (`CMZ_CORS_ORIGINS=`[`LEGACY_FRONTEND_ORIGINS`]). For examples and
/// local runs; production passes the plain environment to [`state_from_env`].
pub fn demo_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(value) => Some(value),
        Err(_) if name == "CMZ_DEV_USERS" => Some("embedded".into()),
        Err(_) if name == "CMZ_CORS_ORIGINS" => Some(LEGACY_FRONTEND_ORIGINS.into()),
        Err(_) => None,
    }
}

/// A health check answered from a cache for `ttl`: the health routes are public, and each
/// uncached check is a request to the model provider.
pub fn cached(check: HealthCheck, ttl: std::time::Duration) -> HealthCheck {
    let last: Arc<tokio::sync::Mutex<Option<(Instant, ModelHealth)>>> = Arc::default();
    Arc::new(move || {
        let (check, last) = (check.clone(), last.clone());
        Box::pin(async move {
            // Holding the lock while checking makes concurrent callers share one check.
            let mut last = last.lock().await;
            if let Some((at, health)) = last.as_ref() {
                if at.elapsed() < ttl {
                    return health.clone();
                }
            }
            let health = check().await;
            *last = Some((Instant::now(), health.clone()));
            health
        })
    })
}

/// The stores behind the services.
struct Backends {
    store: cmz_core::store::DynConversationStore,
    personas: cmz_core::persona::DynPersonaDirectory,
    auth: AuthStores,
    #[cfg(feature = "dynamo")]
    dynamo: Option<cmz_dynamo::Dynamo>,
}

fn in_memory_backends() -> Backends {
    Backends {
        store: Arc::new(InMemoryConversationStore::new()),
        personas: Arc::new(InMemoryPersonaDirectory::with_personas(sample_personas())),
        auth: AuthStores::in_memory(),
        #[cfg(feature = "dynamo")]
        dynamo: None,
    }
}

/// The DynamoDB stores, when `DYNAMODB_ENDPOINT_URL` or a table variable is set. The tables
/// must exist (a missing one is an error naming it and similar names), unless
/// `CMZ_DYNAMODB_CREATE_TABLES=1` creates them and fills an empty animal table with the
/// sample personas (for development).
#[cfg(feature = "dynamo")]
async fn dynamo_backends(
    lookup: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Backends>> {
    use cmz_core::persona::PersonaDirectory as _;
    use cmz_dynamo::{Dynamo, DynamoSettings};
    if !DynamoSettings::configured(lookup) {
        return Ok(None);
    }
    let settings = DynamoSettings::from_env(lookup)?;
    let dynamo = Dynamo::connect(settings).await;
    if lookup("CMZ_DYNAMODB_CREATE_TABLES").is_some_and(|v| v == "1" || v == "true") {
        dynamo.ensure_tables().await?;
        let personas = dynamo.personas();
        if personas.list().await?.is_empty() {
            for persona in sample_personas() {
                personas.put(&persona).await?;
            }
        }
    } else {
        dynamo.check_tables().await?;
    }
    tracing::info!(tables = ?dynamo.tables(), "conversations, users and personas in DynamoDB");
    Ok(Some(Backends {
        store: Arc::new(dynamo.conversations()),
        personas: Arc::new(dynamo.personas()),
        auth: AuthStores {
            users: Arc::new(dynamo.users()),
            families: Arc::new(dynamo.families()),
            revocations: Arc::new(dynamo.revocations()),
            limits: Arc::new(dynamo.rate_limits()),
            audit: Arc::new(cmz_core::auth::TracingAuditSink),
        },
        dynamo: Some(dynamo),
    }))
}

#[cfg(not(feature = "dynamo"))]
async fn dynamo_backends(
    lookup: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Option<Backends>> {
    if lookup("DYNAMODB_ENDPOINT_URL").is_some() {
        tracing::warn!(
            "DYNAMODB_ENDPOINT_URL is set but this build has no `dynamo` feature; using the in-memory store"
        );
    }
    Ok(None)
}

/// Builds the whole state from environment-style variables, with embedded defaults:
/// the in-memory store, the sample personas, and the offline persona model unless
/// `OPENAI_API_KEY` / `OPENAI_BASE_URL` are set (and the `openai` feature is on). With
/// the `dynamo` feature and `DYNAMODB_ENDPOINT_URL` or a legacy table variable set,
/// conversations, users, families, personas, revocations and rate limits live in
/// DynamoDB instead (see `cmz_dynamo::DynamoSettings::from_env`).
/// Auth comes from [`AuthSettings::from_lookup`] (so production needs `JWT_SECRET`, and
/// development users need `CMZ_DEV_USERS`), HTTP settings from
/// [`HttpSettings::from_lookup`].
pub async fn state_from_env(lookup: &(dyn Fn(&str) -> Option<String> + Sync)) -> Result<AppState> {
    let settings = HttpSettings::from_lookup(lookup)?;
    let backends = match dynamo_backends(lookup).await? {
        Some(backends) => backends,
        None => in_memory_backends(),
    };
    let audit = backends.auth.audit.clone();
    let auth = AuthService::new(AuthSettings::from_lookup(lookup)?, backends.auth).await?;
    let personas = backends.personas;
    let (model, health) = match openai_model(lookup)? {
        Some(found) => found,
        None => (
            Arc::new(OfflinePersonaModel::with_chunk_delay(
                settings.offline_chunk_delay,
            )) as DynChatModel,
            offline_health(),
        ),
    };
    tracing::info!(model = model.name(), "chat model");
    let conversations = ConversationService::with(
        backends.store,
        personas.clone(),
        model,
        Arc::new(auth.policy()),
        ConversationConfig::default(),
    )
    .with_audit(audit);
    let state = AppState::new(conversations, auth, personas, health, settings);
    #[cfg(feature = "dynamo")]
    let state = match backends.dynamo {
        Some(dynamo) => state.with_dynamo(dynamo),
        None => state,
    };
    Ok(state)
}

/// Serves `app` on `bind` until Ctrl-C (or SIGTERM), finishing requests in flight.
/// A port already in use is a one-line error naming `CMZ_BIND`.
pub async fn serve(app: Router, bind: SocketAddr) -> Result<()> {
    let listener = listen(bind).map_err(|e| Error::Unavailable {
        message: format!("cannot listen on {bind}: {e}; set CMZ_BIND to another address (for example 127.0.0.1:8081)"),
        source: Some(Box::new(e)),
    })?;
    let started = Instant::now();
    tracing::info!(%bind, "listening");
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .map_err(|e| Error::Unavailable {
        message: "the server stopped".into(),
        source: Some(Box::new(e)),
    })?;
    tracing::info!(uptime_seconds = started.elapsed().as_secs(), "stopped");
    Ok(())
}

/// How many connections may wait to be accepted: a burst of clients (a class opening the
/// chat page at once) is queued rather than refused and retried a second later.
const LISTEN_BACKLOG: u32 = 2048;

fn listen(bind: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if bind.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(bind)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = futures::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

//! Choosing the stores: DynamoDB when configured (and built with `dynamo`), else memory.

use std::sync::Arc;

use cmz_core::Result;
use cmz_core::auth::AuthStores;
use cmz_core::care::DynCareStore;
use cmz_core::memory::{InMemoryCareStore, InMemoryConversationStore, InMemoryPersonaDirectory};
use cmz_core::persona::DynPersonaDirectory;
use cmz_core::store::DynConversationStore;

use crate::settings::{Lookup, ServiceSettings};

/// The stores behind the services.
pub(crate) struct Backends {
    pub(crate) store: DynConversationStore,
    pub(crate) personas: DynPersonaDirectory,
    pub(crate) auth: AuthStores,
    pub(crate) care: DynCareStore,
    #[cfg(feature = "dynamo")]
    pub(crate) dynamo: Option<cmz_dynamo::Dynamo>,
}

/// The animals offered by an in-memory persona directory: the sample ones in development
/// builds, none otherwise.
fn default_personas() -> Vec<cmz_core::types::Persona> {
    #[cfg(feature = "dev")]
    return crate::dev::sample_personas();
    #[cfg(not(feature = "dev"))]
    Vec::new()
}

pub(crate) fn in_memory() -> Backends {
    Backends {
        store: Arc::new(InMemoryConversationStore::new()),
        personas: Arc::new(InMemoryPersonaDirectory::with_personas(default_personas())),
        auth: AuthStores::in_memory(),
        care: Arc::new(InMemoryCareStore::new()),
        #[cfg(feature = "dynamo")]
        dynamo: None,
    }
}

/// The DynamoDB stores, when `DYNAMODB_ENDPOINT_URL` or a table variable is set. The tables
/// must exist (a missing one is an error naming it and similar names), unless
/// `CMZ_DYNAMODB_CREATE_TABLES=1` creates them (and, in `dev` builds, fills an empty animal
/// table with the sample personas).
#[cfg(feature = "dynamo")]
pub(crate) async fn dynamo(
    lookup: &Lookup<'_>,
    settings: &ServiceSettings,
) -> Result<Option<Backends>> {
    use cmz_dynamo::{Dynamo, DynamoSettings};
    if !DynamoSettings::configured(lookup) {
        return Ok(None);
    }
    let dynamo = Dynamo::connect(DynamoSettings::from_env(lookup)?).await;
    if settings.create_tables {
        dynamo.ensure_tables().await?;
        #[cfg(feature = "dev")]
        {
            use cmz_core::persona::PersonaDirectory as _;
            let personas = dynamo.personas();
            if personas.list().await?.is_empty() {
                for persona in crate::dev::sample_personas() {
                    personas.put(&persona).await?;
                }
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
        care: Arc::new(dynamo.care()),
        dynamo: Some(dynamo),
    }))
}

#[cfg(not(feature = "dynamo"))]
pub(crate) async fn dynamo(
    lookup: &Lookup<'_>,
    _settings: &ServiceSettings,
) -> Result<Option<Backends>> {
    if lookup("DYNAMODB_ENDPOINT_URL").is_some() {
        tracing::warn!(
            "DYNAMODB_ENDPOINT_URL is set but this build has no `dynamo` feature; using the in-memory store"
        );
    }
    Ok(None)
}

/// Redis, when `REDIS_URL` is set (and the build has the `redis` feature): streams, turn
/// limits and token budgets are shared through it.
#[cfg(feature = "redis")]
pub(crate) async fn redis(lookup: &Lookup<'_>) -> Result<Option<cmz_redis::Redis>> {
    let Some(url) = lookup("REDIS_URL").filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let redis = cmz_redis::Redis::connect(url.trim()).await?;
    tracing::info!("streams, turn limits and budgets shared through Redis");
    Ok(Some(redis))
}

#[cfg(not(feature = "redis"))]
pub(crate) async fn redis(lookup: &Lookup<'_>) -> Result<Option<std::convert::Infallible>> {
    if lookup("REDIS_URL").is_some_and(|v| !v.trim().is_empty()) {
        tracing::warn!(
            "REDIS_URL is set but this build has no `redis` feature; streams and limits stay in this process"
        );
    }
    Ok(None)
}

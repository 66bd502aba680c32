//! Choosing the chat model: OpenAI(-compatible) when configured, else the offline one.

use std::sync::Arc;
use std::time::Duration;

use cmz_core::Result;
use cmz_core::chat::DynChatModel;
use cmz_core::memory::OfflinePersonaModel;

use crate::health::{HealthCheck, offline_health};
use crate::settings::Lookup;

#[cfg(feature = "openai")]
fn openai_model(lookup: &Lookup<'_>) -> Result<Option<(DynChatModel, HealthCheck)>> {
    use crate::health::{ModelHealth, cached};
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
                    error: Some(error.code().as_str().to_owned()),
                },
            }
        })
    });
    Ok(Some((
        Arc::new(model),
        cached(health, Duration::from_secs(15)),
    )))
}

#[cfg(not(feature = "openai"))]
fn openai_model(lookup: &Lookup<'_>) -> Result<Option<(DynChatModel, HealthCheck)>> {
    if lookup("OPENAI_API_KEY").is_some() || lookup("OPENAI_BASE_URL").is_some() {
        tracing::warn!(
            "OPENAI_API_KEY/OPENAI_BASE_URL are set but this build has no `openai` feature; using the offline persona model"
        );
    }
    Ok(None)
}

/// The OpenAI model when `OPENAI_API_KEY` / `OPENAI_BASE_URL` select it, else the offline
/// persona model pausing `offline_chunk_delay` between streamed words.
pub(crate) fn chat_model(
    lookup: &Lookup<'_>,
    offline_chunk_delay: Duration,
) -> Result<(DynChatModel, HealthCheck)> {
    Ok(match openai_model(lookup)? {
        Some(found) => found,
        None => (
            Arc::new(OfflinePersonaModel::with_chunk_delay(offline_chunk_delay)) as DynChatModel,
            offline_health(),
        ),
    })
}

//! Choosing the chat model: OpenAI(-compatible) when configured, else the offline one.

use std::sync::Arc;
use std::time::Duration;

use cmz_core::chat::DynChatModel;
use cmz_core::memory::OfflinePersonaModel;
use cmz_core::moderation::DynModerator;
use cmz_core::{Error, Result};

use crate::health::{HealthCheck, offline_health};
use crate::settings::Lookup;

/// The chosen model, its health check, and the moderator when one is configured.
pub(crate) struct ChosenModel {
    pub(crate) model: DynChatModel,
    pub(crate) health: HealthCheck,
    pub(crate) moderator: Option<DynModerator>,
}

#[cfg(feature = "openai")]
fn openai_model(lookup: &Lookup<'_>, moderation: bool) -> Result<Option<ChosenModel>> {
    use crate::health::{ModelHealth, cached};
    use cmz_openai::{OpenAiChatModel, OpenAiConfig, OpenAiModerator};
    if !OpenAiConfig::configured_in(lookup) {
        return Ok(None);
    }
    let model = OpenAiChatModel::new(OpenAiConfig::from_lookup(lookup)?)?;
    let moderator =
        moderation.then(|| Arc::new(OpenAiModerator::new(model.clone())) as DynModerator);
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
    Ok(Some(ChosenModel {
        model: Arc::new(model),
        health: cached(health, Duration::from_secs(15)),
        moderator,
    }))
}

#[cfg(not(feature = "openai"))]
fn openai_model(lookup: &Lookup<'_>, _moderation: bool) -> Result<Option<ChosenModel>> {
    if lookup("OPENAI_API_KEY").is_some() || lookup("OPENAI_BASE_URL").is_some() {
        tracing::warn!(
            "OPENAI_API_KEY/OPENAI_BASE_URL are set but this build has no `openai` feature; using the offline persona model"
        );
    }
    Ok(None)
}

/// The OpenAI model when `OPENAI_API_KEY` / `OPENAI_BASE_URL` select it (with its
/// moderation endpoint when `moderation` asks for it), else the offline persona model
/// pausing `offline_chunk_delay` between streamed words. Moderation asked for without the
/// OpenAI model is a configuration error: children's messages would go unchecked.
pub(crate) fn chat_model(
    lookup: &Lookup<'_>,
    offline_chunk_delay: Duration,
    moderation: bool,
) -> Result<ChosenModel> {
    match openai_model(lookup, moderation)? {
        Some(found) => Ok(found),
        None if moderation => Err(Error::validation(
            "CMZ_MODERATION",
            "CMZ_MODERATION=openai needs the OpenAI model (OPENAI_API_KEY or OPENAI_BASE_URL, and a build with the `openai` feature)",
        )),
        None => Ok(ChosenModel {
            model: Arc::new(OfflinePersonaModel::with_chunk_delay(offline_chunk_delay)),
            health: offline_health(),
            moderator: None,
        }),
    }
}

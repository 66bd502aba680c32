//! The OpenAI moderation endpoint as a [`Moderator`].

use async_trait::async_trait;
use bytes::Bytes;
use serde::Deserialize;
use tracing::Instrument as _;

use cmz_core::chat::Priority;
use cmz_core::moderation::{ModerationVerdict, Moderator};
use cmz_core::{Error, Result};

use crate::client::OpenAiChatModel;
use crate::error::{OpenAiError, OpenAiErrorKind};

/// Checks messages with `POST /moderations` on the same server, key and request queue as
/// the chat model. Off unless you pass it to the turn engine.
#[derive(Debug, Clone)]
pub struct OpenAiModerator {
    model: OpenAiChatModel,
    moderation_model: String,
}

#[derive(Debug, Deserialize)]
struct ModerationResponse {
    #[serde(default)]
    results: Vec<ModerationResult>,
}

#[derive(Debug, Deserialize)]
struct ModerationResult {
    #[serde(default)]
    flagged: bool,
    #[serde(default)]
    categories: std::collections::BTreeMap<String, serde_json::Value>,
}

impl OpenAiModerator {
    /// A moderator using `omni-moderation-latest` through `model`'s connection settings.
    pub fn new(model: OpenAiChatModel) -> Self {
        Self {
            model,
            moderation_model: "omni-moderation-latest".into(),
        }
    }

    /// Uses another moderation model.
    pub fn with_model(mut self, moderation_model: impl Into<String>) -> Self {
        self.moderation_model = moderation_model.into();
        self
    }
}

#[async_trait]
impl Moderator for OpenAiModerator {
    async fn check(&self, text: &str) -> Result<ModerationVerdict> {
        let config = self.model.config();
        let url = crate::client::endpoint(config, "moderations");
        let body = serde_json::json!({ "model": self.moderation_model, "input": text });
        let span = tracing::debug_span!("cmz.backend", kind = "moderation", op = "moderations");
        let result = async {
            let (_permit, response) = self
                .model
                .send_with_retries(&url, Bytes::from(body.to_string()), false, Priority::Normal)
                .await?;
            let bytes = response.bytes().await.map_err(|e| {
                OpenAiError::new(
                    OpenAiErrorKind::Connection,
                    "reading the moderation response failed",
                )
                .with_source(e)
            })?;
            serde_json::from_slice::<ModerationResponse>(&bytes).map_err(|e| {
                OpenAiError::new(
                    OpenAiErrorKind::Decode,
                    format!("moderation JSON did not parse: {e}"),
                )
                .with_source(e)
            })
        }
        .instrument(span)
        .await
        .map_err(|e| e.into_error(&self.moderation_model, config.request_timeout))?;
        let Some(first) = result.results.into_iter().next() else {
            return Err(Error::Unavailable {
                message: "the moderation response had no result".into(),
                source: None,
            });
        };
        Ok(ModerationVerdict {
            flagged: first.flagged,
            categories: first
                .categories
                .into_iter()
                .filter(|(_, v)| v.as_bool() == Some(true))
                .map(|(k, _)| k)
                .collect(),
        })
    }
}

//! The Chat Completions wire format, parsed tolerantly: unknown fields are ignored and
//! every field a real server may leave out is optional.

use serde::{Deserialize, Serialize};

use cmz_core::chat::{ChatMessage, ChatRequest};
use cmz_core::types::{Role, Usage};

use crate::config::{MaxTokensField, OpenAiConfig};

/// One prompt message on the wire.
#[derive(Debug, Serialize)]
pub(crate) struct WireMessage<'a> {
    pub(crate) role: &'static str,
    pub(crate) content: &'a str,
}

#[derive(Debug, Serialize)]
pub(crate) struct StreamOptions {
    pub(crate) include_usage: bool,
}

/// A Chat Completions request body.
#[derive(Debug, Serialize)]
pub(crate) struct WireRequest<'a> {
    pub(crate) model: &'a str,
    pub(crate) messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) max_completion_tokens: Option<u32>,
    pub(crate) stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) stream_options: Option<StreamOptions>,
}

pub(crate) fn role_name(role: Role) -> &'static str {
    role.as_str()
}

impl<'a> WireRequest<'a> {
    pub(crate) fn new(config: &'a OpenAiConfig, request: &'a ChatRequest, stream: bool) -> Self {
        let limit = request.max_tokens.or(config.max_tokens);
        let (max_tokens, max_completion_tokens) = match config.max_tokens_field {
            MaxTokensField::MaxTokens => (limit, None),
            MaxTokensField::MaxCompletionTokens => (None, limit),
        };
        Self {
            model: request.model.as_deref().unwrap_or(&config.model),
            messages: request
                .messages
                .iter()
                .map(|m: &ChatMessage| WireMessage {
                    role: role_name(m.role),
                    content: &m.content,
                })
                .collect(),
            temperature: request.temperature.or(config.temperature),
            max_tokens,
            max_completion_tokens,
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct WireUsage {
    #[serde(default)]
    pub(crate) prompt_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) completion_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) prompt_tokens_details: Option<PromptDetails>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PromptDetails {
    #[serde(default)]
    pub(crate) cached_tokens: Option<u32>,
}

impl WireUsage {
    pub(crate) fn into_usage(self) -> Option<Usage> {
        Some(Usage {
            prompt_tokens: self.prompt_tokens?,
            completion_tokens: self.completion_tokens.unwrap_or(0),
            cached_prompt_tokens: self.prompt_tokens_details.and_then(|d| d.cached_tokens),
        })
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct WireReplyMessage {
    #[serde(default)]
    pub(crate) content: Option<String>,
    #[serde(default)]
    pub(crate) refusal: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireChoice {
    #[serde(default)]
    pub(crate) message: Option<WireReplyMessage>,
    #[serde(default)]
    pub(crate) delta: Option<WireReplyMessage>,
    #[serde(default)]
    pub(crate) finish_reason: Option<String>,
}

/// A whole response, or one streamed chunk (same shape, `delta` instead of `message`).
#[derive(Debug, Deserialize)]
pub(crate) struct WireResponse {
    #[serde(default)]
    pub(crate) choices: Option<Vec<WireChoice>>,
    #[serde(default)]
    pub(crate) usage: Option<WireUsage>,
    #[serde(default)]
    pub(crate) model: Option<String>,
    #[serde(default)]
    pub(crate) error: Option<WireError>,
}

/// The API's error object.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct WireError {
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default, rename = "type")]
    pub(crate) kind: Option<String>,
    #[serde(default, deserialize_with = "string_or_number")]
    pub(crate) code: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct WireErrorBody {
    pub(crate) error: WireError,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(match value {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_from_real_servers_parse() {
        // OpenAI: role-only first chunk, content chunks, finish chunk, usage with empty choices.
        for raw in [
            r#"{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11,"prompt_tokens_details":{"cached_tokens":0}}}"#,
            // LiteLLM: usage chunk with a non-empty choices list and extra usage fields.
            r#"{"choices":[{"index":0,"delta":{}}],"usage":{"prompt_tokens":9,"completion_tokens":2,"cost":0.1,"text_tokens":null}}"#,
            // Ollama-style: no usage at all, extra fields.
            r#"{"id":"x","choices":[{"delta":{"content":" there"},"index":0,"finish_reason":null}],"x_groq":{"id":"q"}}"#,
        ] {
            let parsed: WireResponse =
                serde_json::from_str(raw).unwrap_or_else(|e| panic!("{raw}: {e}"));
            assert!(parsed.error.is_none());
        }
        let usage: WireResponse = serde_json::from_str(r#"{"usage":{"prompt_tokens":9,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":4}}}"#).unwrap();
        let usage = usage.usage.unwrap().into_usage().unwrap();
        assert_eq!(
            (
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_prompt_tokens
            ),
            (9, 2, Some(4))
        );
        let err: WireErrorBody =
            serde_json::from_str(r#"{"error":{"message":"m","type":"t","param":null,"code":429}}"#)
                .unwrap();
        assert_eq!(err.error.code.as_deref(), Some("429"));
    }
}

//! Settings of the OpenAI(-compatible) backend, and where they come from.

use std::fmt;
use std::time::Duration;

use cmz_core::{Error, Result};

/// The default API base (OpenAI itself).
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
/// The default model.
pub const DEFAULT_MODEL: &str = "gpt-4o-mini";

/// An API key. Never shown by `Debug` or `Display`, so it stays out of logs.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the request header only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// How the key is sent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>` (OpenAI and most compatible servers).
    #[default]
    Bearer,
    /// `api-key: <key>` and an `api-version` query parameter (Azure OpenAI).
    Azure {
        /// The `api-version` query parameter, for example `2024-10-21`.
        api_version: String,
    },
}

/// Which request field carries the reply-token limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxTokensField {
    /// `max_tokens` (what most compatible servers understand).
    #[default]
    MaxTokens,
    /// `max_completion_tokens` (OpenAI's newer models).
    MaxCompletionTokens,
}

/// An optional response cache for identical requests.
///
/// **Off by default, and unsuitable for personal data unless you mean it**: a cached
/// reply is served to anyone who sends the same persona, history window and message, so
/// enable it only where conversations carry nothing personal (for example canned
/// greetings in a kiosk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Entries kept at most.
    pub capacity: u64,
    /// How long an entry lives.
    pub ttl: Duration,
}

/// Settings of [`OpenAiChatModel`](crate::OpenAiChatModel).
#[derive(Debug, Clone)]
pub struct OpenAiConfig {
    /// API base URL, up to and including the version path (`.../v1`; for Azure
    /// `https://NAME.openai.azure.com/openai/deployments/DEPLOYMENT`).
    pub base_url: String,
    /// The API key; `None` for servers that need none.
    pub api_key: Option<ApiKey>,
    /// How the key is sent.
    pub auth: AuthStyle,
    /// The model name sent with each request.
    pub model: String,
    /// Sampling temperature, unless the request sets one.
    pub temperature: Option<f32>,
    /// Reply-token limit, unless the request sets one.
    pub max_tokens: Option<u32>,
    /// The request field for the token limit.
    pub max_tokens_field: MaxTokensField,
    /// `OpenAI-Organization` header.
    pub organization: Option<String>,
    /// `OpenAI-Project` header.
    pub project: Option<String>,
    /// Time to establish a connection. Default 10 s.
    pub connect_timeout: Duration,
    /// Time for a whole non-streamed request, and for a streamed response to start.
    /// Default 60 s.
    pub request_timeout: Duration,
    /// Retries after the first attempt (408, 409, 429, 5xx, connection errors). Default 2.
    pub max_retries: u32,
    /// First backoff delay; doubles each retry, with full jitter. Default 500 ms.
    pub retry_base_delay: Duration,
    /// Longest single backoff, and the longest `retry-after` honoured before giving up.
    /// Default 20 s.
    pub retry_max_delay: Duration,
    /// Requests in flight at once. Default 16.
    pub max_concurrency: usize,
    /// Requests allowed to wait for a slot; more fail at once with `rate_limit_exceeded`.
    /// Default 64.
    pub max_queue: usize,
    /// The response cache; `None` (off) by default.
    pub cache: Option<CacheSettings>,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            api_key: None,
            auth: AuthStyle::Bearer,
            model: DEFAULT_MODEL.to_owned(),
            temperature: None,
            max_tokens: None,
            max_tokens_field: MaxTokensField::MaxTokens,
            organization: None,
            project: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            max_retries: 2,
            retry_base_delay: Duration::from_millis(500),
            retry_max_delay: Duration::from_secs(20),
            max_concurrency: 16,
            max_queue: 64,
            cache: None,
        }
    }
}

impl OpenAiConfig {
    /// Settings for `base_url` and `model`, the rest default.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            ..Self::default()
        }
    }

    /// Sets the API key.
    pub fn with_api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(ApiKey::new(key));
        self
    }

    /// Whether the environment asks for this backend: `OPENAI_API_KEY` or
    /// `OPENAI_BASE_URL` is set.
    pub fn configured_in(lookup: &dyn Fn(&str) -> Option<String>) -> bool {
        ["OPENAI_API_KEY", "OPENAI_BASE_URL", "AZURE_OPENAI_API_KEY"]
            .iter()
            .any(|name| lookup(name).is_some_and(|v| !v.trim().is_empty()))
    }

    /// Settings from the process environment; see [`OpenAiConfig::from_lookup`].
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(&|name| std::env::var(name).ok())
    }

    /// Settings from environment-style variables:
    ///
    /// - `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `OPENAI_MODEL` (default `gpt-4o-mini`),
    ///   `OPENAI_ORGANIZATION` (or `OPENAI_ORG_ID`), `OPENAI_PROJECT` (or
    ///   `OPENAI_PROJECT_ID`), `OPENAI_TEMPERATURE`, `OPENAI_MAX_TOKENS`,
    ///   `OPENAI_TIMEOUT_SECONDS`, `OPENAI_MAX_RETRIES`.
    /// - Azure: `AZURE_OPENAI_API_KEY` (or `OPENAI_API_TYPE=azure` with `OPENAI_API_KEY`)
    ///   and `OPENAI_API_VERSION`.
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let parse_num = |name: &'static str| -> Result<Option<f64>> {
            get(name)
                .map(|v| {
                    v.parse::<f64>().map_err(|_| {
                        Error::validation(name, format!("{name} must be a number, got {v:?}"))
                    })
                })
                .transpose()
        };
        let mut config = Self::default();
        if let Some(url) = get("OPENAI_BASE_URL") {
            config.base_url = url;
        }
        if !(config.base_url.starts_with("http://") || config.base_url.starts_with("https://")) {
            return Err(Error::validation(
                "OPENAI_BASE_URL",
                format!(
                    "OPENAI_BASE_URL must be an http(s) URL, got {:?}",
                    config.base_url
                ),
            ));
        }
        if let Some(model) = get("OPENAI_MODEL") {
            config.model = model;
        }
        let azure_key = get("AZURE_OPENAI_API_KEY");
        let azure = azure_key.is_some()
            || get("OPENAI_API_TYPE").is_some_and(|t| t.eq_ignore_ascii_case("azure"));
        config.api_key = azure_key.or_else(|| get("OPENAI_API_KEY")).map(ApiKey::new);
        if azure {
            let api_version = get("OPENAI_API_VERSION").ok_or_else(|| {
                Error::validation(
                    "OPENAI_API_VERSION",
                    "OPENAI_API_VERSION must be set for Azure OpenAI",
                )
            })?;
            config.auth = AuthStyle::Azure { api_version };
        }
        config.organization = get("OPENAI_ORGANIZATION").or_else(|| get("OPENAI_ORG_ID"));
        config.project = get("OPENAI_PROJECT").or_else(|| get("OPENAI_PROJECT_ID"));
        config.temperature = parse_num("OPENAI_TEMPERATURE")?.map(|t| t as f32);
        if let Some(t) = config.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(Error::validation(
                    "OPENAI_TEMPERATURE",
                    "OPENAI_TEMPERATURE must be between 0 and 2",
                ));
            }
        }
        config.max_tokens = parse_num("OPENAI_MAX_TOKENS")?.map(|n| n.max(1.0) as u32);
        if let Some(seconds) = parse_num("OPENAI_TIMEOUT_SECONDS")? {
            config.request_timeout = Duration::try_from_secs_f64(seconds)
                .ok()
                .filter(|d| !d.is_zero() && seconds <= 86_400.0)
                .ok_or_else(|| {
                    Error::validation(
                        "OPENAI_TIMEOUT_SECONDS",
                        "OPENAI_TIMEOUT_SECONDS must be a number of seconds between 0 and 86400",
                    )
                })?;
        }
        if let Some(retries) = parse_num("OPENAI_MAX_RETRIES")? {
            config.max_retries = retries.clamp(0.0, 10.0) as u32;
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn the_key_never_shows_in_debug_output() {
        let config = OpenAiConfig::default().with_api_key("sk-secret-123");
        let debug = format!("{config:?}");
        assert!(!debug.contains("sk-secret-123"), "{debug}");
        assert!(debug.contains("<redacted>"));
    }

    #[test]
    fn from_the_legacy_and_openai_variables() {
        let config = OpenAiConfig::from_lookup(&env(&[
            ("OPENAI_API_KEY", "sk-x"),
            ("OPENAI_BASE_URL", "http://127.0.0.1:4000/v1"),
            ("OPENAI_MODEL", "gpt-4o"),
            ("OPENAI_ORG_ID", "org-1"),
            ("OPENAI_TEMPERATURE", "0.4"),
        ]))
        .unwrap();
        assert_eq!(config.base_url, "http://127.0.0.1:4000/v1");
        assert_eq!(config.model, "gpt-4o");
        assert_eq!(config.api_key.unwrap().expose(), "sk-x");
        assert_eq!(config.organization.as_deref(), Some("org-1"));
        assert_eq!(config.temperature, Some(0.4));
        assert_eq!(config.auth, AuthStyle::Bearer);
        let azure = OpenAiConfig::from_lookup(&env(&[
            ("AZURE_OPENAI_API_KEY", "az"),
            ("OPENAI_API_VERSION", "2024-10-21"),
        ]))
        .unwrap();
        assert_eq!(
            azure.auth,
            AuthStyle::Azure {
                api_version: "2024-10-21".into()
            }
        );
        assert!(OpenAiConfig::from_lookup(&env(&[("AZURE_OPENAI_API_KEY", "az")])).is_err());
        assert!(OpenAiConfig::from_lookup(&env(&[("OPENAI_BASE_URL", "ftp://x")])).is_err());
        assert!(OpenAiConfig::from_lookup(&env(&[("OPENAI_TEMPERATURE", "hot")])).is_err());
        for bad in ["NaN", "inf", "1e30", "0", "-1"] {
            let lookup =
                move |name: &str| (name == "OPENAI_TIMEOUT_SECONDS").then(|| bad.to_owned());
            assert!(OpenAiConfig::from_lookup(&lookup).is_err(), "{bad}");
        }
        assert!(OpenAiConfig::configured_in(&env(&[(
            "OPENAI_BASE_URL",
            "http://x"
        )])));
        assert!(!OpenAiConfig::configured_in(&env(&[])));
    }
}

//! The service settings read from the environment (the HTTP ones live in cmz-tower).

use std::time::Duration;

use cmz_core::moderation::ModerationLevel;
use cmz_core::privacy::{RedactionMode, Redactor};
use cmz_core::service::Budgets;
use cmz_core::{Error, Result};

/// Where settings come from: a function from a variable name to its value, such as
/// `|name| std::env::var(name).ok()` or a lookup in a map.
pub type Lookup<'a> = dyn Fn(&str) -> Option<String> + Sync + 'a;

/// The settings of the services that are not the backends' own (the backends read
/// theirs: `cmz_core::auth::AuthSettings`, `cmz_dynamo::DynamoSettings`,
/// `cmz_openai::OpenAiConfig`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Model calls (turns and summaries) per user per window (`CMZ_TURN_RATE_LIMIT`,
    /// default 50, the legacy limit).
    pub turn_limit: u32,
    /// The turn limit's window (`CMZ_TURN_RATE_WINDOW_SECONDS`, default 3,600).
    pub turn_window: Duration,
    /// Pause between the offline model's streamed words (`CMZ_OFFLINE_CHUNK_DELAY_MS`,
    /// default 0), to demo or load-test long-lived streams.
    pub offline_chunk_delay: Duration,
    /// Create missing DynamoDB tables, and fill an empty animal table with the sample
    /// animals when built with `dev` (`CMZ_DYNAMODB_CREATE_TABLES=1`; development).
    pub create_tables: bool,
    /// Check children's messages with the model provider's moderation endpoint before the
    /// model sees them (`CMZ_MODERATION=openai`; needs the OpenAI model and feature
    /// `openai`). Default off (`CMZ_MODERATION=off`).
    pub moderation: bool,
    /// The least moderation every turn gets (`CMZ_MODERATION_LEVEL`: `standard`, the
    /// default, or `strict`, which also checks replies); requests may raise it.
    pub moderation_level: ModerationLevel,
    /// The most prompt tokens a turn sends the model (`CMZ_CONTEXT_BUDGET_TOKENS`, at least
    /// 256; default `ConversationConfig`'s 16,384). Counted in the encoding of the
    /// configured model (`OPENAI_MODEL`).
    pub context_budget_tokens: Option<u32>,
    /// Fold turns that left the context window into the running summary every this many
    /// turns (`CMZ_SUMMARY_EVERY_TURNS`; 0 turns it off; default 4).
    pub summary_every_turns: Option<usize>,
    /// What happens to personal details in children's messages (`CMZ_PERSONAL_DETAILS`:
    /// `redact`, the default, `block` or `off`; see `cmz_core::privacy`).
    pub personal_details: RedactionMode,
    /// Whose phone numbers count as personal details (`CMZ_PHONE_REGION`, an ISO 3166
    /// code; default `US`). International numbers (`+44 …`) always do.
    pub redactor: Redactor,
    /// Daily token budgets (`CMZ_DAILY_TOKEN_BUDGET_USER`, `CMZ_DAILY_TOKEN_BUDGET_FAMILY`,
    /// `CMZ_DAILY_TOKEN_BUDGET_DEPLOYMENT`; unset or 0: none, the default), counted in the
    /// rate-limit store so every server shares them.
    pub budgets: Budgets,
    /// How long a streamed turn whose client went away keeps generating, waiting for the
    /// client to come back, and how long a finished one can be replayed
    /// (`CMZ_STREAM_RESUME_GRACE_MS`, default 20,000; 0 cancels at once).
    pub stream_resume_grace: Duration,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            turn_limit: 50,
            turn_window: Duration::from_secs(3600),
            offline_chunk_delay: Duration::ZERO,
            create_tables: false,
            moderation: false,
            moderation_level: ModerationLevel::Standard,
            context_budget_tokens: None,
            summary_every_turns: None,
            personal_details: RedactionMode::Redact,
            redactor: Redactor::default(),
            budgets: Budgets::default(),
            stream_resume_grace: Duration::from_secs(20),
        }
    }
}

/// A number variable, when set and not blank.
pub fn number<T: std::str::FromStr>(
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

impl ServiceSettings {
    /// Settings from environment-style variables (see the field docs).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let mut settings = Self::default();
        if let Some(limit) = number::<u32>(lookup, "CMZ_TURN_RATE_LIMIT")? {
            settings.turn_limit = limit.max(1);
        }
        if let Some(window) = number::<u64>(lookup, "CMZ_TURN_RATE_WINDOW_SECONDS")? {
            settings.turn_window = Duration::from_secs(window.max(1));
        }
        if let Some(ms) = number::<u64>(lookup, "CMZ_STREAM_RESUME_GRACE_MS")? {
            settings.stream_resume_grace = Duration::from_millis(ms);
        }
        if let Some(ms) = number::<u64>(lookup, "CMZ_OFFLINE_CHUNK_DELAY_MS")? {
            settings.offline_chunk_delay = Duration::from_millis(ms);
        }
        settings.create_tables =
            lookup("CMZ_DYNAMODB_CREATE_TABLES").is_some_and(|v| v == "1" || v == "true");
        settings.moderation = match lookup("CMZ_MODERATION").as_deref().map(str::trim) {
            None | Some("" | "off" | "0" | "false") => false,
            Some("openai") => true,
            Some(other) => {
                return Err(Error::validation(
                    "CMZ_MODERATION",
                    format!("CMZ_MODERATION must be off or openai, got {other:?}"),
                ));
            }
        };
        if let Some(level) = lookup("CMZ_MODERATION_LEVEL").filter(|v| !v.trim().is_empty()) {
            settings.moderation_level = level.trim().parse().map_err(|_| {
                Error::validation(
                    "CMZ_MODERATION_LEVEL",
                    format!(
                        "CMZ_MODERATION_LEVEL must be permissive, standard or strict, got {level:?}"
                    ),
                )
            })?;
        }
        let budget = |name| -> Result<Option<u64>> {
            Ok(number::<u64>(lookup, name)?.filter(|tokens| *tokens > 0))
        };
        settings.budgets = Budgets {
            user: budget("CMZ_DAILY_TOKEN_BUDGET_USER")?,
            family: budget("CMZ_DAILY_TOKEN_BUDGET_FAMILY")?,
            deployment: budget("CMZ_DAILY_TOKEN_BUDGET_DEPLOYMENT")?,
        };
        if let Some(budget) = number::<u32>(lookup, "CMZ_CONTEXT_BUDGET_TOKENS")? {
            settings.context_budget_tokens = Some(budget.max(256));
        }
        settings.summary_every_turns = number::<usize>(lookup, "CMZ_SUMMARY_EVERY_TURNS")?;
        if let Some(mode) = lookup("CMZ_PERSONAL_DETAILS") {
            settings.personal_details = mode.parse().map_err(|_| {
                Error::validation(
                    "CMZ_PERSONAL_DETAILS",
                    format!("CMZ_PERSONAL_DETAILS must be redact, block or off, got {mode:?}"),
                )
            })?;
        }
        if let Some(region) = lookup("CMZ_PHONE_REGION").filter(|v| !v.trim().is_empty()) {
            settings.redactor = Redactor::for_region(&region).map_err(|_| {
                Error::validation(
                    "CMZ_PHONE_REGION",
                    format!(
                        "CMZ_PHONE_REGION must be a region code such as US or GB, got {region:?}"
                    ),
                )
            })?;
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_bounds_and_bad_numbers() {
        let none = ServiceSettings::from_lookup(&|_| None).unwrap();
        assert_eq!(none, ServiceSettings::default());
        let set = ServiceSettings::from_lookup(&|name| match name {
            "CMZ_TURN_RATE_LIMIT" => Some("0".into()),
            "CMZ_TURN_RATE_WINDOW_SECONDS" => Some(" 60 ".into()),
            "CMZ_DYNAMODB_CREATE_TABLES" => Some("1".into()),
            "CMZ_CONTEXT_BUDGET_TOKENS" => Some("100".into()),
            "CMZ_SUMMARY_EVERY_TURNS" => Some("0".into()),
            "CMZ_PERSONAL_DETAILS" => Some("block".into()),
            "CMZ_PHONE_REGION" => Some("gb".into()),
            "CMZ_DAILY_TOKEN_BUDGET_USER" => Some("20000".into()),
            "CMZ_STREAM_RESUME_GRACE_MS" => Some("0".into()),
            "CMZ_DAILY_TOKEN_BUDGET_FAMILY" => Some("0".into()),
            "CMZ_DAILY_TOKEN_BUDGET_DEPLOYMENT" => Some(" 5000000 ".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(
            set.budgets,
            Budgets {
                user: Some(20_000),
                family: None,
                deployment: Some(5_000_000)
            },
            "0 is no budget"
        );
        assert_eq!(set.stream_resume_grace, Duration::ZERO);
        assert_eq!(set.turn_limit, 1);
        assert_eq!(set.turn_window, Duration::from_secs(60));
        assert!(set.create_tables);
        assert_eq!(set.context_budget_tokens, Some(256), "at least 256");
        assert_eq!(set.summary_every_turns, Some(0));
        assert_eq!(set.personal_details, RedactionMode::Block);
        assert_eq!(set.redactor, Redactor::for_region("GB").unwrap());
        for (name, value) in [
            ("CMZ_PERSONAL_DETAILS", "sometimes"),
            ("CMZ_PHONE_REGION", "Narnia"),
            ("CMZ_DAILY_TOKEN_BUDGET_FAMILY", "lots"),
        ] {
            let bad =
                ServiceSettings::from_lookup(&|n| (n == name).then(|| value.into())).unwrap_err();
            assert_eq!(bad.code(), "validation_error");
            assert!(bad.to_string().contains(name), "{bad}");
        }
        let bad = ServiceSettings::from_lookup(&|name| {
            (name == "CMZ_TURN_RATE_LIMIT").then(|| "many".into())
        })
        .unwrap_err();
        assert_eq!(bad.code(), "validation_error");
    }
}

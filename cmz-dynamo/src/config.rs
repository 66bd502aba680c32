//! Where the tables are and how to reach them, from the legacy environment variables.

use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::{Credentials, Region};
use cmz_core::{Error, Result};

/// The names of the tables cmz reads and writes.
///
/// Defaults are the legacy names; each can be changed with the legacy variable (see
/// [`TableNames::from_env`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableNames {
    /// Legacy conversations, one item per conversation (`CONVERSATION_DYNAMO_TABLE_NAME`,
    /// default `quest-dev-conversation`). Read for legacy data; cmz never appends to it.
    pub conversations: String,
    /// Sessions, one item per conversation (`CONVERSATION_SESSION_TABLE_NAME`, default
    /// `quest-dev-session`), with GSIs by user and by animal.
    pub sessions: String,
    /// Messages, one item per message (`CONVERSATION_MESSAGE_TABLE_NAME`, default
    /// `quest-dev-conversation-message`).
    pub messages: String,
    /// Users (`USER_DYNAMO_TABLE_NAME`, default `quest-dev-user`).
    pub users: String,
    /// Families (`FAMILY_DYNAMO_TABLE_NAME`, default `quest-dev-family`).
    pub families: String,
    /// Animal personas (`ANIMAL_DYNAMO_TABLE_NAME`, default `quest-dev-animal`).
    pub animals: String,
    /// cmz's own small items: refresh tokens, revocations, rate-limit counters, email
    /// claims, family membership and migration progress (`CMZ_META_TABLE_NAME`, default
    /// `quest-dev-cmz`).
    pub meta: String,
    /// Cost and care: daily usage counters, feedback and the review queue
    /// (`CMZ_CARE_TABLE_NAME`, default `quest-dev-cmz-care`).
    pub care: String,
}

impl Default for TableNames {
    fn default() -> Self {
        Self {
            conversations: "quest-dev-conversation".into(),
            sessions: "quest-dev-session".into(),
            messages: "quest-dev-conversation-message".into(),
            users: "quest-dev-user".into(),
            families: "quest-dev-family".into(),
            animals: "quest-dev-animal".into(),
            meta: "quest-dev-cmz".into(),
            care: "quest-dev-cmz-care".into(),
        }
    }
}

/// The environment variable behind each table name, in [`TableNames::all`] order.
pub const TABLE_VARIABLES: [&str; 8] = [
    "CONVERSATION_DYNAMO_TABLE_NAME",
    "CONVERSATION_SESSION_TABLE_NAME",
    "CONVERSATION_MESSAGE_TABLE_NAME",
    "USER_DYNAMO_TABLE_NAME",
    "FAMILY_DYNAMO_TABLE_NAME",
    "ANIMAL_DYNAMO_TABLE_NAME",
    "CMZ_META_TABLE_NAME",
    "CMZ_CARE_TABLE_NAME",
];

impl TableNames {
    /// Every name with `prefix` put in front (for tests that want tables of their own).
    pub fn with_prefix(prefix: &str) -> Self {
        let mut names = Self::default();
        for name in names.all_mut() {
            *name = format!("{prefix}{name}");
        }
        names
    }

    /// Reads the legacy variables through `lookup`, keeping defaults for unset ones.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let mut names = Self::default();
        for (var, name) in TABLE_VARIABLES.iter().zip(names.all_mut()) {
            if let Some(value) = lookup(var)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
            {
                if !valid_table_name(&value) {
                    return Err(Error::validation(
                        "table",
                        format!(
                            "{var}={value:?} is not a DynamoDB table name (3-255 characters of a-z, A-Z, 0-9, '_', '-', '.')"
                        ),
                    ));
                }
                *name = value;
            }
        }
        Ok(names)
    }

    /// The names in a fixed order, with the variable that sets each.
    pub fn all(&self) -> [(&'static str, &str); 8] {
        [
            (TABLE_VARIABLES[0], &self.conversations),
            (TABLE_VARIABLES[1], &self.sessions),
            (TABLE_VARIABLES[2], &self.messages),
            (TABLE_VARIABLES[3], &self.users),
            (TABLE_VARIABLES[4], &self.families),
            (TABLE_VARIABLES[5], &self.animals),
            (TABLE_VARIABLES[6], &self.meta),
            (TABLE_VARIABLES[7], &self.care),
        ]
    }

    fn all_mut(&mut self) -> [&mut String; 8] {
        [
            &mut self.conversations,
            &mut self.sessions,
            &mut self.messages,
            &mut self.users,
            &mut self.families,
            &mut self.animals,
            &mut self.meta,
            &mut self.care,
        ]
    }
}

fn valid_table_name(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// How to reach DynamoDB.
#[derive(Debug, Clone)]
pub struct DynamoSettings {
    /// `AWS_REGION` (default `us-west-2`).
    pub region: String,
    /// `DYNAMODB_ENDPOINT_URL`: a local DynamoDB; unset in production.
    pub endpoint_url: Option<String>,
    /// The tables.
    pub tables: TableNames,
    /// Attempts per call, the first included, for throttling, 5xx and connection errors
    /// (`CMZ_DYNAMODB_MAX_ATTEMPTS`, default 3); backoff is exponential with full jitter.
    pub max_attempts: u32,
    /// Limit for one attempt (`CMZ_DYNAMODB_ATTEMPT_TIMEOUT_MS`, default 3 s).
    pub attempt_timeout: Duration,
    /// Limit for a call with all its retries (`CMZ_DYNAMODB_TIMEOUT_MS`, default 10 s), so
    /// a dead endpoint is `unavailable` after a bounded time.
    pub operation_timeout: Duration,
    /// Limit for opening a connection (default 2 s).
    pub connect_timeout: Duration,
    /// Days to keep conversations (`CMZ_RETENTION_DAYS`); sets the `ttl` attribute.
    pub retention: Option<Duration>,
    /// Key for signing pagination cursors (`CMZ_CURSOR_SECRET`, else derived from
    /// `JWT_SECRET`, else random per process).
    pub cursor_secret: Option<Vec<u8>>,
}

impl Default for DynamoSettings {
    fn default() -> Self {
        Self {
            region: "us-west-2".into(),
            endpoint_url: None,
            tables: TableNames::default(),
            max_attempts: 3,
            attempt_timeout: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            retention: None,
            cursor_secret: None,
        }
    }
}

impl DynamoSettings {
    /// Settings for a local DynamoDB at `endpoint` (dummy credentials, default tables).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint_url: Some(endpoint.into()),
            ..Self::default()
        }
    }

    /// Reads the legacy variables (`AWS_REGION`, `DYNAMODB_ENDPOINT_URL`, the table names)
    /// and cmz's own (`CMZ_DYNAMODB_*`, `CMZ_RETENTION_DAYS`, `CMZ_CURSOR_SECRET`).
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let number = |name: &'static str, min: u64, max: u64| -> Result<Option<u64>> {
            get(name)
                .map(|v| {
                    v.parse::<u64>()
                        .ok()
                        .filter(|n| (min..=max).contains(n))
                        .ok_or_else(|| {
                            Error::validation(
                                name,
                                format!("{name}={v:?} must be a whole number from {min} to {max}"),
                            )
                        })
                })
                .transpose()
        };
        let mut settings = Self {
            tables: TableNames::from_env(&lookup)?,
            ..Self::default()
        };
        if let Some(region) = get("AWS_REGION").or_else(|| get("AWS_DEFAULT_REGION")) {
            settings.region = region;
        }
        settings.endpoint_url = get("DYNAMODB_ENDPOINT_URL");
        if let Some(url) = &settings.endpoint_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::validation(
                    "DYNAMODB_ENDPOINT_URL",
                    format!("DYNAMODB_ENDPOINT_URL={url:?} must start with http:// or https://"),
                ));
            }
        }
        if let Some(n) = number("CMZ_DYNAMODB_MAX_ATTEMPTS", 1, 10)? {
            settings.max_attempts = n as u32;
        }
        if let Some(ms) = number("CMZ_DYNAMODB_ATTEMPT_TIMEOUT_MS", 10, 600_000)? {
            settings.attempt_timeout = Duration::from_millis(ms);
        }
        if let Some(ms) = number("CMZ_DYNAMODB_TIMEOUT_MS", 10, 3_600_000)? {
            settings.operation_timeout = Duration::from_millis(ms);
        }
        if let Some(days) = number("CMZ_RETENTION_DAYS", 1, 36_500)? {
            settings.retention = Some(Duration::from_secs(days * 86_400));
        }
        settings.cursor_secret = get("CMZ_CURSOR_SECRET")
            .or_else(|| get("JWT_SECRET").map(|s| format!("cmz-cursor:{s}")))
            .map(String::into_bytes);
        Ok(settings)
    }

    /// Whether `lookup` configures DynamoDB at all (an endpoint or any table variable).
    pub fn configured(lookup: impl Fn(&str) -> Option<String>) -> bool {
        lookup("DYNAMODB_ENDPOINT_URL").is_some_and(|v| !v.trim().is_empty())
            || TABLE_VARIABLES
                .iter()
                .any(|v| lookup(v).is_some_and(|v| !v.trim().is_empty()))
    }

    /// Builds an SDK client with these settings. With an endpoint URL and no AWS
    /// credentials in the environment, dummy credentials are used (DynamoDB Local ignores
    /// them).
    pub async fn client(&self) -> Client {
        let retry = RetryConfig::standard()
            .with_max_attempts(self.max_attempts)
            .with_initial_backoff(Duration::from_millis(25))
            .with_max_backoff(Duration::from_secs(2));
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(self.connect_timeout)
            .operation_attempt_timeout(self.attempt_timeout)
            .operation_timeout(self.operation_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(self.region.clone()))
            .retry_config(retry)
            .timeout_config(timeouts);
        if let Some(url) = &self.endpoint_url {
            loader = loader.endpoint_url(url);
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                loader = loader.credentials_provider(Credentials::new(
                    "cmz",
                    "local",
                    None,
                    None,
                    "cmz-local",
                ));
            }
        }
        Client::new(&loader.load().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn legacy_names_and_overrides() {
        let s = DynamoSettings::from_env(env(&[])).unwrap();
        assert_eq!(s.tables, TableNames::default());
        assert_eq!(s.region, "us-west-2");
        assert!(s.endpoint_url.is_none() && s.retention.is_none());
        let s = DynamoSettings::from_env(env(&[
            ("CONVERSATION_SESSION_TABLE_NAME", "prod-session"),
            ("AWS_REGION", "eu-west-1"),
            ("DYNAMODB_ENDPOINT_URL", "http://127.0.0.1:8000"),
            ("CMZ_RETENTION_DAYS", "30"),
        ]))
        .unwrap();
        assert_eq!(s.tables.sessions, "prod-session");
        assert_eq!(s.tables.conversations, "quest-dev-conversation");
        assert_eq!(s.region, "eu-west-1");
        assert_eq!(s.retention, Some(Duration::from_secs(30 * 86_400)));
        assert!(DynamoSettings::configured(env(&[(
            "USER_DYNAMO_TABLE_NAME",
            "u1x"
        )])));
        assert!(!DynamoSettings::configured(env(&[("JWT_SECRET", "x")])));
    }

    #[test]
    fn bad_values_are_named() {
        for (var, value) in [
            ("CONVERSATION_DYNAMO_TABLE_NAME", "has space"),
            ("DYNAMODB_ENDPOINT_URL", "localhost:8000"),
            ("CMZ_DYNAMODB_MAX_ATTEMPTS", "0"),
            ("CMZ_RETENTION_DAYS", "-1"),
        ] {
            let err = DynamoSettings::from_env(env(&[(var, value)])).unwrap_err();
            assert_eq!(err.code(), "validation_error");
            assert!(err.to_string().contains(var), "{err} names {var}");
        }
    }
}

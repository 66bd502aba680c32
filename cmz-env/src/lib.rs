#![doc = include_str!("../README.md")]

mod backends;
#[cfg(feature = "dev")]
mod dev;
mod health;
mod model;
mod settings;

use std::sync::Arc;

use cmz_core::access::{Principal, UserRole};
use cmz_core::auth::{AuthService, AuthSettings};
use cmz_core::ids::UserId;
use cmz_core::service::{ConversationConfig, ConversationService, ExportItem, ExportRange};
use cmz_core::store::DeleteScope;
use cmz_core::tokens::Tokenizer;
use cmz_core::{Error, Result};
use futures::stream::BoxStream;

#[cfg(feature = "dev")]
pub use dev::{SAMPLE_PERSONAS, sample_personas};
pub use health::{HealthCheck, ModelHealth, cached, offline_health};
pub use settings::{Lookup, ServiceSettings, number};

/// Capacity a DynamoDB backend reported for the calls made so far.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Capacity {
    /// Read capacity units.
    pub read_units: f64,
    /// Write capacity units.
    pub write_units: f64,
    /// Requests sent.
    pub requests: u64,
}

/// The services over one set of backends: what a front end (HTTP, Python, your own)
/// translates to and from. Cheap to clone.
#[derive(Clone)]
pub struct Services {
    conversations: ConversationService,
    auth: AuthService,
    health: HealthCheck,
    #[cfg(feature = "dynamo")]
    dynamo: Option<cmz_dynamo::Dynamo>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("conversations", &self.conversations)
            .finish_non_exhaustive()
    }
}

/// How long a conversation must be idle to have ended, for a family that keeps
/// conversations only until they end: 30 minutes.
pub const CONVERSATION_ENDS_AFTER: chrono::TimeDelta = chrono::TimeDelta::minutes(30);

/// What [`Services::apply_family_retention`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RetentionReport {
    /// Families with a retention of their own.
    pub families: u64,
    /// Sessions deleted.
    pub sessions: u64,
    /// Messages deleted.
    pub messages: u64,
}

/// What [`Services::erase_user`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Erasure {
    /// Sessions deleted.
    pub sessions: u64,
    /// Messages deleted.
    pub messages: u64,
    /// The account was there and is gone.
    pub account: bool,
    /// Families the user was taken out of.
    pub families: u64,
    /// Refresh token records removed.
    pub refresh_tokens: u64,
}

impl Services {
    /// Services assembled by hand. `health` checks the chat model. Everything a front end
    /// does goes through `conversations` and `auth` (the offered animals, per-client limits
    /// such as registrations per address included).
    pub fn new(conversations: ConversationService, auth: AuthService, health: HealthCheck) -> Self {
        Self {
            conversations,
            auth,
            health,
            #[cfg(feature = "dynamo")]
            dynamo: None,
        }
    }

    /// Turns, history, sessions, deletes and summaries, under the access policy and the
    /// turn limit.
    pub fn conversations(&self) -> &ConversationService {
        &self.conversations
    }

    /// Logins, tokens, passwords and the access policy.
    pub fn auth(&self) -> &AuthService {
        &self.auth
    }

    /// An export of conversations for the people they belong to (see
    /// [`ConversationService::export`]): `parent`'s family's students (a parent's own
    /// family, or any for roles that see everything; `forbidden` otherwise), or one
    /// `user`'s, or, with neither, a parent's own family and anyone else's own. The one
    /// place both front ends resolve whose conversations an export holds.
    pub async fn export(
        &self,
        principal: &Principal,
        parent: Option<UserId>,
        user: Option<UserId>,
        range: ExportRange,
    ) -> Result<BoxStream<'static, Result<ExportItem>>> {
        let owners = match (parent, user) {
            (Some(_), Some(_)) => {
                return Err(Error::validation(
                    "userId",
                    "give a parent or a user, not both",
                ));
            }
            (Some(parent), None) => self.auth.students_of(principal, &parent).await?,
            (None, Some(user)) => vec![user],
            (None, None) if principal.role == UserRole::Parent => {
                self.auth.students_of(principal, &principal.user_id).await?
            }
            (None, None) => vec![principal.user_id.clone()],
        };
        self.conversations.export(principal, owners, range).await
    }

    /// Erases a user's data, everything derived from it, in every store: their
    /// conversations (sessions, messages, turn keys, summaries; a tombstone that holds only
    /// the user id keeps turns already running from writing any of it back), then their
    /// refresh tokens, their place in families, their account and their counters. One call,
    /// batched; an interrupted erasure is finished by calling it again (`not_found` once
    /// nothing is left: no account, no conversations). `principal` needs
    /// the policy's delete right on the user (themselves, their parent, an administrator);
    /// `reason` (a request number, say) goes to the audit log with the counts.
    pub async fn erase_user(
        &self,
        principal: &Principal,
        user: &UserId,
        reason: Option<&str>,
    ) -> Result<Erasure> {
        // Who may, first; then whether there is anything to erase (so nobody learns which
        // users exist from a refusal).
        use cmz_core::access::AccessPolicy as _;
        self.auth
            .policy()
            .authorize(principal, cmz_core::access::Action::Delete, user)
            .await?;
        let has_conversations = !self
            .conversations
            .sessions_of(principal, user, cmz_core::store::PageRequest::first(1))
            .await?
            .items
            .is_empty();
        if !has_conversations && !self.auth.has_account(user).await? {
            return Err(cmz_core::Error::not_found(format!(
                "no data is held for user {user}"
            )));
        }
        let conversations = self
            .conversations
            .delete_with_reason(principal, DeleteScope::User(user.clone()), reason)
            .await?;
        let account = self.auth.erase_user_records(principal, user).await?;
        Ok(Erasure {
            sessions: conversations.sessions,
            messages: conversations.messages,
            account: account.account,
            families: account.families,
            refresh_tokens: account.refresh_tokens,
        })
    }

    /// Applies every family's own retention: deletes their students' conversations
    /// inactive for longer than the family keeps them (a family that keeps them only until
    /// they end: inactive for [`CONVERSATION_ENDS_AFTER`]). The deployment's own retention
    /// (`CMZ_RETENTION_DAYS`) is DynamoDB's TTL; this is the shorter one a family chose. The
    /// HTTP server runs it every `CMZ_RETENTION_SWEEP_SECONDS` (default 600); it is safe to
    /// run from several servers at once.
    pub async fn apply_family_retention(
        &self,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<RetentionReport> {
        let mut report = RetentionReport::default();
        for family in self.auth.families_with_retention().await? {
            let Some(days) = family.retention_days else {
                continue;
            };
            let cutoff = if days == 0 {
                now - CONVERSATION_ENDS_AFTER
            } else {
                now - chrono::TimeDelta::days(i64::from(days))
            };
            report.families += 1;
            for student in &family.students {
                let deleted = self.conversations.expire_sessions(student, cutoff).await?;
                report.sessions += deleted.sessions;
                report.messages += deleted.messages;
            }
        }
        Ok(report)
    }

    /// The chat model's health check.
    pub fn health(&self) -> &HealthCheck {
        &self.health
    }

    /// Capacity DynamoDB reported for these services' calls so far, or None when the
    /// stores are not DynamoDB's.
    pub fn capacity(&self) -> Option<Capacity> {
        #[cfg(feature = "dynamo")]
        if let Some(dynamo) = &self.dynamo {
            let report = dynamo.capacity();
            return Some(Capacity {
                read_units: report.read_units,
                write_units: report.write_units,
                requests: report.requests,
            });
        }
        None
    }
}

/// Development users (`CMZ_DEV_USERS`) are seeded only by builds with the `dev` feature;
/// elsewhere the variable is a startup error rather than silently ignored.
fn check_dev_users(lookup: &Lookup<'_>) -> Result<()> {
    let wanted = lookup("CMZ_DEV_USERS").is_some_and(|v| !v.trim().is_empty());
    if wanted && !cfg!(feature = "dev") {
        return Err(Error::validation(
            "CMZ_DEV_USERS",
            "CMZ_DEV_USERS is set but this build has no `dev` feature (development users)",
        ));
    }
    Ok(())
}

/// Builds the services from environment-style variables, with embedded defaults.
///
/// - Stores: in memory, unless the `dynamo` feature is on and `DYNAMODB_ENDPOINT_URL` or a
///   legacy table variable is set (then conversations, users, families, personas,
///   revocations and rate limits live in DynamoDB; see `cmz_dynamo::DynamoSettings`).
///   In memory, the `dev` feature offers the sample animals.
/// - Model: OpenAI(-compatible) when the `openai` feature is on and `OPENAI_API_KEY` /
///   `OPENAI_BASE_URL` are set, else the offline persona model.
/// - Auth: [`AuthSettings::from_lookup`] (production needs `JWT_SECRET`; development
///   users need `CMZ_DEV_USERS` and the `dev` feature).
/// - Redis (feature `redis`, `REDIS_URL`): turn limits, login throttles and token budgets
///   counted in Redis, and resumable streams mirrored there so a reconnect that lands on
///   another server resumes the same turn.
/// - Cost and care: usage counters, feedback and the review queue in the same backend as
///   the conversations; daily token budgets from [`ServiceSettings::budgets`].
/// - Policy and defaults: the platform policy, [`ConversationConfig::default`] with the
///   context budget and summary cadence of [`ServiceSettings`], counted in the encoding of
///   the chosen model ([`Tokenizer::for_model`]), and the per-user turn limit.
///
/// Reads no HTTP settings: a front end parses its own.
pub async fn services_from_env(lookup: &Lookup<'_>) -> Result<Services> {
    let settings = ServiceSettings::from_lookup(lookup)?;
    check_dev_users(lookup)?;
    #[cfg_attr(not(feature = "redis"), allow(unused_mut))]
    let mut backends = match backends::dynamo(lookup, &settings).await? {
        Some(backends) => backends,
        None => backends::in_memory(),
    };
    let redis = backends::redis(lookup).await?;
    #[cfg(feature = "redis")]
    if let Some(redis) = &redis {
        backends.auth.limits = Arc::new(redis.rate_limits());
    }
    let audit = backends.auth.audit.clone();
    let rate_limits = backends.auth.limits.clone();
    let care = backends.care.clone();
    let auth = AuthService::new(AuthSettings::from_lookup(lookup)?, backends.auth).await?;
    let chosen = model::chat_model(lookup, settings.offline_chunk_delay, settings.moderation)?;
    tracing::info!(
        model = chosen.model.name(),
        moderation = chosen.moderator.is_some(),
        "chat model"
    );
    let defaults = ConversationConfig::default();
    let config = ConversationConfig {
        moderation_level: settings.moderation_level,
        // The budget is counted the way the configured model counts.
        tokenizer: Tokenizer::for_model(chosen.model.name()),
        context_budget_tokens: settings
            .context_budget_tokens
            .unwrap_or(defaults.context_budget_tokens),
        summary_every_turns: settings
            .summary_every_turns
            .unwrap_or(defaults.summary_every_turns),
        personal_details: settings.personal_details,
        redactor: settings.redactor,
        stream_resume_grace: settings.stream_resume_grace,
        ..defaults
    };
    let mut conversations = ConversationService::with(
        backends.store,
        backends.personas.clone(),
        chosen.model,
        Arc::new(auth.policy()),
        config,
    )
    .with_audit(audit.clone())
    .with_turn_limit(
        rate_limits.clone(),
        settings.turn_limit,
        settings.turn_window,
    )
    .with_budgets(rate_limits.clone(), settings.budgets)
    .with_care(care);
    if let Some(moderator) = chosen.moderator {
        conversations = conversations.with_moderation(moderator, audit);
    }
    #[cfg(feature = "redis")]
    if let Some(redis) = &redis {
        conversations = conversations.with_stream_mirror(Arc::new(redis.stream_mirror()));
    }
    #[cfg(not(feature = "redis"))]
    let _ = redis;
    let health = chosen.health;
    #[cfg_attr(not(feature = "dynamo"), allow(unused_mut))]
    let mut services = Services::new(conversations, auth, health);
    #[cfg(feature = "dynamo")]
    {
        services.dynamo = backends.dynamo;
    }
    Ok(services)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use cmz_core::moderation::ModerationLevel;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[tokio::test]
    async fn http_variables_are_not_read() {
        let env = env(&[
            ("JWT_SECRET", "a-test-secret-a-test-secret-0123456789ab"),
            ("CMZ_BIND", "not an address"),
            ("CMZ_CORS_ORIGINS", "\u{7f}"),
            ("CMZ_BODY_LIMIT_BYTES", "lots"),
            ("CMZ_CONTEXT_BUDGET_TOKENS", "3000"),
            ("CMZ_SUMMARY_EVERY_TURNS", "6"),
        ]);
        let services = services_from_env(&|name| env.get(name).cloned())
            .await
            .unwrap();
        assert!(services.capacity().is_none());
        assert!((services.health())().await.offline);
        let config = services.conversations().config();
        assert_eq!(config.context_budget_tokens, 3000);
        assert_eq!(config.summary_every_turns, 6);
        // The offline model has no published encoding: the budget is an estimate.
        assert_eq!(config.tokenizer, Tokenizer::Estimate);
    }

    #[tokio::test]
    async fn moderation_is_wired_from_the_environment() {
        let fake = cmz_openai::testing::FakeOpenAi::start().await;
        let vars = env(&[
            ("OPENAI_BASE_URL", fake.base_url().as_str()),
            ("OPENAI_API_KEY", "sk-test"),
            ("CMZ_MODERATION", "openai"),
            ("CMZ_MODERATION_LEVEL", "strict"),
            ("JWT_SECRET", "a-test-secret-a-test-secret-0123456789ab"),
        ]);
        let built = services_from_env(&|name| vars.get(name).cloned()).await;
        if !cfg!(feature = "openai") {
            // Asked-for moderation that cannot run is refused, never silently off.
            assert_eq!(built.unwrap_err().code(), "validation_error");
            return;
        }
        let services = built.unwrap();
        assert_eq!(
            services.conversations().config().moderation_level,
            ModerationLevel::Strict
        );
        // The default model is gpt-4o-mini: its encoding counts the budget.
        assert_eq!(
            services.conversations().config().tokenizer,
            Tokenizer::O200kBase
        );
        assert!(
            ServiceSettings::from_lookup(&|name| (name == "CMZ_MODERATION").then(|| "on".into()))
                .is_err(),
            "an unknown value is an error"
        );
        // The moderator runs on the provider's endpoint; the verdict reaches the reply (the
        // sample animals come with `dev`).
        let Some(animal) = services
            .conversations()
            .animals()
            .await
            .unwrap()
            .into_iter()
            .next()
        else {
            if cfg!(feature = "dev") {
                panic!("dev offers the sample animals");
            }
            return;
        };
        let principal = cmz_core::access::Principal::new(
            cmz_core::ids::UserId::new("kid1").unwrap(),
            cmz_core::access::UserRole::Student,
        );
        let reply = services
            .conversations()
            .turn(
                &principal,
                cmz_core::service::TurnRequest::new(animal.animal_id, "something FLAGGED"),
            )
            .await
            .unwrap();
        assert!(reply.moderation.flagged);
        assert_eq!(reply.moderation.categories, vec!["violence".to_owned()]);
        let paths: Vec<String> = fake.requests().into_iter().map(|r| r.path).collect();
        assert_eq!(paths, vec!["/v1/moderations".to_owned()], "no model call");
    }

    #[tokio::test]
    async fn dev_users_need_the_dev_feature() {
        let env = env(&[("CMZ_DEV_USERS", "embedded")]);
        let built = services_from_env(&|name| env.get(name).cloned()).await;
        if cfg!(feature = "dev") {
            let services = built.unwrap();
            assert!(!services.conversations().animals().await.unwrap().is_empty());
        } else {
            assert_eq!(built.unwrap_err().code(), "validation_error");
        }
    }
}

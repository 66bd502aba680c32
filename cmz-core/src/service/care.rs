//! Cost and care in the engine: budgets around the model call, usage counters and
//! review flags as turns are stored, feedback, the review queue and the usage report.

use chrono::{NaiveDate, Utc};

use super::budget::{BudgetHold, BudgetLimits, BudgetStatus, Budgets};
use super::*;
use crate::care::{
    DynCareStore, Feedback, MAX_NOTE_CHARS, ReviewItem, ReviewMark, ReviewReason, ReviewState,
    UsageCounts, UsageKey, UsageRow, Vote,
};
use crate::ids::{FamilyId, MessageId};

/// How far back an erasure looks for a user's usage counters, in days.
pub const USAGE_FORGET_DAYS: i64 = 400;
/// The longest usage report, in days.
pub const MAX_REPORT_DAYS: i64 = 366;
/// The model name usage counters use for turns no model answered (fallbacks, refusals).
pub const NO_MODEL: &str = "none";

/// Where a caller stands after a turn: the legacy reply's `rateLimit` block and the token
/// budgets.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Quota {
    /// The turn limit after this call (when there is one).
    pub turn_limit: Option<TurnLimitStatus>,
    /// Turns the caller took today (UTC), this one included, from the usage counters
    /// (with a care store).
    pub calls_today: Option<u64>,
    /// Each token budget that applies, after this turn was settled.
    pub budgets: Vec<BudgetStatus>,
}

/// Which dimensions a usage report keeps apart (the others are summed over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UsageGrouping {
    /// One row per day.
    pub day: bool,
    /// One row per family.
    pub family: bool,
    /// One row per user.
    pub user: bool,
    /// One row per animal.
    pub animal: bool,
    /// One row per model.
    pub model: bool,
}

impl std::str::FromStr for UsageGrouping {
    type Err = Error;
    /// A comma-separated list of `day`, `family`, `user`, `animal`, `model` (empty: one
    /// total row).
    fn from_str(value: &str) -> Result<Self> {
        let mut grouping = UsageGrouping::default();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "day" => grouping.day = true,
                "family" => grouping.family = true,
                "user" => grouping.user = true,
                "animal" => grouping.animal = true,
                "model" => grouping.model = true,
                other => {
                    return Err(Error::validation(
                        "groupBy",
                        format!("groupBy takes day, family, user, animal and model, not {other:?}"),
                    ));
                }
            }
        }
        Ok(grouping)
    }
}

/// One row of a usage report: the dimensions it was grouped by, and the sums.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReportRow {
    /// The day, when grouped by day.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub day: Option<NaiveDate>,
    /// The family (`None` also for users without one), when grouped by family.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub family_id: Option<FamilyId>,
    /// The user, when grouped by user.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
    /// The animal, when grouped by animal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub animal_id: Option<AnimalId>,
    /// The model, when grouped by model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The sums.
    #[serde(flatten)]
    pub counts: UsageCounts,
    /// Prompt plus completion tokens.
    pub total_tokens: u64,
}

/// A usage report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageReport {
    /// The first day (UTC).
    pub from: NaiveDate,
    /// The last day, included.
    pub to: NaiveDate,
    /// The rows, ordered by their dimensions.
    pub rows: Vec<UsageReportRow>,
    /// The sums over every row.
    pub total: UsageCounts,
}

impl UsageReport {
    /// The report as CSV: a header and one line per row (`day,familyId,userId,animalId,
    /// model,promptTokens,completionTokens,totalTokens,turns,fallbacks`; a dimension the
    /// report was not grouped by is empty).
    pub fn to_csv(&self) -> String {
        let mut out = String::from(
            "day,familyId,userId,animalId,model,promptTokens,completionTokens,totalTokens,turns,fallbacks\n",
        );
        for row in &self.rows {
            let text = |v: Option<&str>| csv_field(v.unwrap_or(""));
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{}\n",
                row.day.map(|d| d.to_string()).unwrap_or_default(),
                text(row.family_id.as_ref().map(FamilyId::as_str)),
                text(row.user_id.as_ref().map(UserId::as_str)),
                text(row.animal_id.as_ref().map(AnimalId::as_str)),
                text(row.model.as_deref()),
                row.counts.prompt_tokens,
                row.counts.completion_tokens,
                row.total_tokens,
                row.counts.turns,
                row.counts.fallbacks,
            ));
        }
        out
    }
}

/// A CSV field: quoted when it holds a separator or a quote, and never read as a formula
/// by a spreadsheet (a leading `=`, `+`, `-`, `@` gets a `'`).
fn csv_field(value: &str) -> String {
    let value = if value.starts_with(['=', '+', '-', '@']) {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    if value.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", value.replace('"', "\"\""))
    } else {
        value
    }
}

/// A review item and the conversation around its message.
#[derive(Debug, Clone, PartialEq)]
pub struct ReviewContext {
    /// The item.
    pub item: ReviewItem,
    /// The messages around it, oldest first (empty when the conversation was deleted).
    pub messages: Vec<Message>,
}

/// Review flags for a stored reply.
fn reasons_of(message: &Message) -> Vec<ReviewReason> {
    let metadata = &message.metadata;
    let mut reasons = Vec::new();
    if metadata.moderated {
        reasons.push(ReviewReason::Moderated);
    }
    if metadata.fallback {
        reasons.push(ReviewReason::Fallback);
    }
    if metadata.interrupted {
        reasons.push(ReviewReason::Interrupted);
    }
    if !metadata.redacted.is_empty() {
        reasons.push(ReviewReason::Redacted);
    }
    reasons
}

/// The queue item of a reply of `session`.
fn review_item(session: &Session, message: &Message, reasons: Vec<ReviewReason>) -> ReviewItem {
    ReviewItem {
        id: ReviewItem::id_for(message.created_at, &session.id, message.seq),
        session_id: session.id.clone(),
        message_id: message.id.clone(),
        seq: message.seq,
        owner_id: session.user_id.clone(),
        animal_id: session.animal_id.clone(),
        reasons,
        flagged_at: message.created_at,
        review: None,
    }
}

fn check_note(note: Option<String>) -> Result<Option<String>> {
    let note = note.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty());
    if let Some(note) = &note {
        let chars = note.chars().count();
        if chars > MAX_NOTE_CHARS {
            return Err(Error::validation(
                "note",
                format!("note is {chars} characters; the limit is {MAX_NOTE_CHARS}"),
            ));
        }
    }
    Ok(note)
}

/// What a stored turn needs for its usage counter and budgets.
#[derive(Debug)]
pub(super) struct TurnCosts {
    pub(super) budget: Option<BudgetHold>,
    pub(super) family: Option<FamilyId>,
    pub(super) turn_limit: Option<TurnLimitStatus>,
}

impl ConversationService {
    /// Keeps usage counters and the review queue in `care` as turns are stored, and lets
    /// users give feedback and staff work the queue. Without it, those operations are
    /// `unavailable`.
    pub fn with_care(self, care: DynCareStore) -> Self {
        self.rebuilt(|inner| inner.care = Some(care))
    }

    /// Daily token budgets, counted in `store` (shared by every process that uses it). A
    /// turn that would start over a budget fails with `rate_limit_exceeded` before the model
    /// is called, its error's source a [`BudgetExceeded`] (see
    /// [`Error::budget_exceeded`]); nothing is stored for it.
    pub fn with_budgets(self, store: DynRateLimitStore, budgets: Budgets) -> Self {
        self.rebuilt(|inner| {
            inner.budgets = budgets.any().then_some(BudgetLimits { store, budgets });
        })
    }

    /// Where the caller's token budgets stand today (empty without budgets).
    pub async fn budget_status(&self, principal: &Principal) -> Result<Vec<BudgetStatus>> {
        match &self.inner.budgets {
            Some(limits) => limits.status(principal).await,
            None => Ok(Vec::new()),
        }
    }

    fn care(&self) -> Result<&DynCareStore> {
        self.inner.care.as_ref().ok_or_else(|| Error::Unavailable {
            message: "feedback, the review queue and usage reports need a care store".into(),
            source: None,
        })
    }

    /// Reserves the turn's tokens in every budget (before the model call).
    pub(super) async fn reserve_budget(
        &self,
        principal: &Principal,
        prepared: &mut ReadyTurn,
    ) -> Result<()> {
        let Some(limits) = &self.inner.budgets else {
            return Ok(());
        };
        if prepared.privacy_block {
            // The reminder is answered without the model.
            return Ok(());
        }
        let prompt = u64::from(self.inner.counts.framing(&prepared.prompt.messages));
        let reply = u64::from(
            prepared
                .prompt
                .max_tokens
                .unwrap_or(self.inner.config.max_reply_tokens),
        );
        prepared.costs.budget = Some(limits.reserve(principal, prompt, prompt + reply).await?);
        Ok(())
    }

    /// After a turn is stored: settles its budget, adds to its usage counter and puts the
    /// reply in the review queue when it needs a look. None of this fails the turn (it is
    /// stored); a failure is logged.
    pub(super) async fn account_turn(
        &self,
        session: &Session,
        costs: TurnCosts,
        reply: &mut TurnReply,
    ) {
        let assistant = &reply.assistant_message;
        let metadata = &assistant.metadata;
        let answered_by_model = !metadata.fallback && !metadata.moderated;
        let (prompt_tokens, completion_tokens) = match metadata.usage() {
            Some(usage) => (
                u64::from(usage.prompt_tokens),
                u64::from(usage.completion_tokens),
            ),
            None if answered_by_model && assistant.id != reply.user_message.id => (
                costs.budget.as_ref().map_or(0, |b| b.prompt_estimate),
                u64::from(
                    metadata
                        .token_count
                        .unwrap_or_else(|| self.inner.config.tokenizer.count(&assistant.content)),
                ),
            ),
            None => (0, 0),
        };
        let mut quota = Quota {
            budgets: Vec::new(),
            turn_limit: costs.turn_limit,
            calls_today: None,
        };
        if let Some(hold) = costs.budget {
            quota.budgets = hold.settle(prompt_tokens + completion_tokens).await;
        }
        if let Some(care) = &self.inner.care {
            let key = UsageKey {
                day: assistant.created_at.date_naive(),
                user_id: session.user_id.clone(),
                family_id: costs.family,
                animal_id: session.animal_id.clone(),
                // A reply refused at the strict level was still the model's work.
                model: metadata
                    .model
                    .clone()
                    .filter(|_| answered_by_model || metadata.usage().is_some())
                    .unwrap_or_else(|| NO_MODEL.to_owned()),
            };
            let counts = UsageCounts {
                prompt_tokens,
                completion_tokens,
                turns: 1,
                fallbacks: u64::from(metadata.fallback),
            };
            if let Err(error) = care.add_usage(&key, &counts).await {
                tracing::warn!(code = error.code().as_str(), error = %error.report(), "could not count the turn's usage");
            }
            // The legacy `dailyUsage`: a read of the counters just written, no write of its
            // own.
            match care.user_usage(&session.user_id, key.day).await {
                Ok(today) => quota.calls_today = Some(today.turns),
                Err(error) => {
                    tracing::warn!(
                        code = error.code().as_str(),
                        "could not read the day's turns"
                    );
                }
            }
            let mut reasons = if assistant.role == Role::Assistant {
                reasons_of(assistant)
            } else {
                Vec::new()
            };
            if !reply.user_message.metadata.redacted.is_empty()
                && assistant.role == Role::Assistant
                && !reasons.contains(&ReviewReason::Redacted)
            {
                reasons.push(ReviewReason::Redacted);
            }
            if !reasons.is_empty() {
                let item = review_item(session, assistant, reasons);
                if let Err(error) = care.flag(&item).await {
                    tracing::warn!(code = error.code().as_str(), error = %error.report(), "could not queue the reply for review");
                }
            }
        }
        reply.quota = Some(quota);
    }

    /// Counts a running summary's model call: its tokens in the usage counters (no turn)
    /// and in the budgets of the session's user, `family` and the deployment (always
    /// added: the turn that caused it was already admitted). Failures are logged.
    pub(super) async fn account_summary(
        &self,
        session: &Session,
        family: Option<FamilyId>,
        model: String,
        prompt_tokens: u64,
        completion_tokens: u64,
    ) {
        if let Some(limits) = &self.inner.budgets {
            let owner = Principal {
                family_id: family.clone(),
                ..Principal::new(session.user_id.clone(), crate::access::UserRole::User)
            };
            limits
                .charge(&owner, prompt_tokens + completion_tokens)
                .await;
        }
        if let Some(care) = &self.inner.care {
            let key = UsageKey {
                day: Utc::now().date_naive(),
                user_id: session.user_id.clone(),
                family_id: family,
                animal_id: session.animal_id.clone(),
                model,
            };
            let counts = UsageCounts {
                prompt_tokens,
                completion_tokens,
                turns: 0,
                fallbacks: 0,
            };
            if let Err(error) = care.add_usage(&key, &counts).await {
                tracing::warn!(code = error.code().as_str(), error = %error.report(), "could not count the running summary's usage");
            }
        }
    }

    /// Records `principal`'s thumbs up or down (and an optional note of at most
    /// [`MAX_NOTE_CHARS`] characters, personal details taken out) on an assistant message
    /// of a session they may read. A second vote by the same user replaces the first. A
    /// thumbs down puts the reply in the review queue.
    ///
    /// Errors: `not_found` (no such session or message, or one the caller may not read),
    /// `validation_error` (a user's message, a note too long), `unavailable` (no care store).
    #[tracing::instrument(name = "cmz.feedback", skip_all, fields(user = %principal.user_id, session = %session_id))]
    pub async fn give_feedback(
        &self,
        principal: &Principal,
        session_id: &SessionId,
        message_id: &MessageId,
        vote: Vote,
        note: Option<String>,
    ) -> Result<Feedback> {
        let care = self.care()?;
        let note = check_note(note)?.map(|note| self.redact(note).0);
        let session = self
            .readable_session(principal, session_id, Action::Read)
            .await?;
        let message = self.find_message(session_id, message_id).await?;
        if message.role != Role::Assistant {
            return Err(Error::validation(
                "messageId",
                "feedback is given on the animal's replies only",
            ));
        }
        let feedback = Feedback {
            user_id: principal.user_id.clone(),
            session_id: session.id.clone(),
            message_id: message.id.clone(),
            seq: message.seq,
            owner_id: session.user_id.clone(),
            vote,
            note,
            animal_id: session.animal_id.clone(),
            persona: session.animal_name.clone(),
            model: message.metadata.model.clone(),
            at: Utc::now(),
        };
        care.put_feedback(&feedback).await?;
        if vote == Vote::Down {
            care.flag(&review_item(
                &session,
                &message,
                vec![ReviewReason::ThumbsDown],
            ))
            .await?;
        }
        Ok(feedback)
    }

    /// The caller's own vote on a message, if they gave one.
    pub async fn my_feedback(
        &self,
        principal: &Principal,
        session_id: &SessionId,
        message_id: &MessageId,
    ) -> Result<Option<Feedback>> {
        let care = self.care()?;
        self.readable_session(principal, session_id, Action::Read)
            .await?;
        let message = self.find_message(session_id, message_id).await?;
        care.get_feedback(&principal.user_id, session_id, message.seq)
            .await
    }

    /// A message of a session by id: the recent ones first (where feedback usually goes),
    /// then the whole history.
    async fn find_message(&self, session: &SessionId, id: &MessageId) -> Result<Message> {
        let store = &self.inner.store;
        let recent = store.recent_messages(session, 40).await?;
        if let Some(found) = recent.into_iter().find(|m| &m.id == id) {
            return Ok(found);
        }
        let mut page = PageRequest::first(crate::store::MAX_PAGE_SIZE);
        loop {
            let listed = store.history(session, page.clone()).await?;
            if let Some(found) = listed.items.into_iter().find(|m| &m.id == id) {
                return Ok(found);
            }
            match listed.next {
                Some(next) => page.cursor = Some(next),
                None => {
                    return Err(Error::not_found(format!(
                        "message {id} in session {session}"
                    )));
                }
            }
        }
    }

    /// Staff (a role the policy lets read everyone's conversations) list the review queue,
    /// newest first.
    #[tracing::instrument(name = "cmz.review_queue", skip_all, fields(user = %principal.user_id))]
    pub async fn review_queue(
        &self,
        principal: &Principal,
        state: ReviewState,
        page: PageRequest,
    ) -> Result<Page<ReviewItem>> {
        let care = self.care()?;
        self.inner
            .policy
            .authorize_all(principal, Action::Read)
            .await?;
        care.review_items(state, page).await
    }

    /// Staff open one queue item with up to `around` messages on each side of it.
    #[tracing::instrument(name = "cmz.review_item", skip_all, fields(user = %principal.user_id))]
    pub async fn review_item(
        &self,
        principal: &Principal,
        id: &str,
        around: usize,
    ) -> Result<ReviewContext> {
        let care = self.care()?;
        ReviewItem::check_id(id)?;
        self.inner
            .policy
            .authorize_all(principal, Action::Read)
            .await?;
        let item = care
            .get_review_item(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("review item {id}")))?;
        self.inner
            .policy
            .authorize(principal, Action::Read, &item.owner_id)
            .await?;
        let around = around.min(20);
        let first = item.seq.saturating_sub(around as u64 + 1);
        let messages = match self.get_session(&item.session_id).await? {
            Some(_) => {
                self.inner
                    .store
                    .messages_after(&item.session_id, first, around * 2 + 1)
                    .await?
            }
            None => Vec::new(),
        };
        self.audit_review(principal, &item, "opened").await;
        Ok(ReviewContext { item, messages })
    }

    /// Staff mark an open item reviewed, with an optional note (at most
    /// [`MAX_NOTE_CHARS`] characters). Audited.
    #[tracing::instrument(name = "cmz.mark_reviewed", skip_all, fields(user = %principal.user_id))]
    pub async fn mark_reviewed(
        &self,
        principal: &Principal,
        id: &str,
        note: Option<String>,
    ) -> Result<ReviewItem> {
        let care = self.care()?;
        ReviewItem::check_id(id)?;
        let note = check_note(note)?;
        self.inner
            .policy
            .authorize_all(principal, Action::Read)
            .await?;
        let mark = ReviewMark {
            by: principal.user_id.clone(),
            at: Utc::now(),
            note,
        };
        let item = care.mark_reviewed(id, &mark).await?;
        self.audit_review(principal, &item, "marked reviewed").await;
        Ok(item)
    }

    async fn audit_review(&self, principal: &Principal, item: &ReviewItem, what: &str) {
        if let Some(audit) = &self.inner.audit {
            let mut event = AuditEvent::new(
                AuditKind::Review,
                AuditOutcome::Allowed,
                format!("review item {} {what}", item.id),
            );
            event.actor = Some(principal.user_id.clone());
            event.actor_role = Some(principal.role);
            event.subject = Some(item.owner_id.clone());
            audit.record(event).await;
        }
    }

    /// Administrators (the policy's every-user read) read usage of the days `from..=to`
    /// (a longer range than [`MAX_REPORT_DAYS`] is cut to its newest days; the report's
    /// `from` is where it starts), summed by `grouping`, from the counters kept as turns
    /// were stored.
    #[tracing::instrument(name = "cmz.usage_report", skip_all, fields(user = %principal.user_id))]
    pub async fn usage_report(
        &self,
        principal: &Principal,
        from: NaiveDate,
        to: NaiveDate,
        grouping: UsageGrouping,
    ) -> Result<UsageReport> {
        let care = self.care()?;
        if to < from {
            return Err(Error::validation("to", "to must not be before from"));
        }
        // A longer range is cut to its newest days (the report's `from` says so).
        let from = from.max(to - chrono::TimeDelta::days(MAX_REPORT_DAYS - 1));
        self.inner
            .policy
            .authorize_all(principal, Action::Read)
            .await?;
        let rows = care.usage(from, to).await?;
        Ok(summarize_usage(from, to, rows, grouping))
    }

    /// Forgets what the care store and the budgets keep about `user` (their erasure).
    pub(super) async fn forget_care(&self, user: &UserId) -> Result<u64> {
        let today = Utc::now().date_naive();
        if let Some(limits) = &self.inner.budgets {
            limits
                .store
                .reset(&super::budget::user_budget_key(user, today))
                .await?;
        }
        if let Some(limit) = &self.inner.turn_limit {
            limit.forget(user).await?;
        }
        match &self.inner.care {
            Some(care) => {
                care.forget_user(user, today - chrono::TimeDelta::days(USAGE_FORGET_DAYS))
                    .await
            }
            None => Ok(0),
        }
    }
}

fn summarize_usage(
    from: NaiveDate,
    to: NaiveDate,
    rows: Vec<UsageRow>,
    grouping: UsageGrouping,
) -> UsageReport {
    type Group = (
        Option<NaiveDate>,
        Option<FamilyId>,
        Option<UserId>,
        Option<AnimalId>,
        Option<String>,
    );
    let mut groups: std::collections::BTreeMap<Group, UsageCounts> = Default::default();
    let mut total = UsageCounts::default();
    for row in rows {
        let key = row.key;
        let group = (
            grouping.day.then_some(key.day),
            key.family_id.filter(|_| grouping.family),
            grouping.user.then_some(key.user_id),
            grouping.animal.then_some(key.animal_id),
            grouping.model.then_some(key.model),
        );
        groups.entry(group).or_default().add(&row.counts);
        total.add(&row.counts);
    }
    let rows = groups
        .into_iter()
        .map(
            |((day, family_id, user_id, animal_id, model), counts)| UsageReportRow {
                day,
                family_id,
                user_id,
                animal_id,
                model,
                total_tokens: counts.total_tokens(),
                counts,
            },
        )
        .collect();
    UsageReport {
        from,
        to,
        rows,
        total,
    }
}

#[cfg(test)]
mod tests;

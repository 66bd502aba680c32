//! Daily token budgets per user, per family and for the whole deployment, shared across
//! processes through a [`RateLimitStore`](crate::auth::RateLimitStore).
//!
//! A turn reserves what it may cost (the prompt's tokens plus the reply-token limit)
//! before the model is called, with the store's atomic "add if below the budget": of
//! many concurrent turns at the edge only those that saw room get in, so a day's spend
//! passes a budget by at most one turn. When the turn is stored the reservation is
//! settled to what the model reported (estimated with the tokenizer when it reported
//! nothing); a turn that ends without being stored gives its reservation back.
//! Days are UTC days: every budget resets at midnight UTC.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;

use crate::access::Principal;
use crate::auth::{DynRateLimitStore, Tally};
use crate::error::{Error, Result};
use crate::ids::UserId;

/// Daily token budgets (prompt + completion tokens); `None` is no budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Budgets {
    /// Tokens one user may spend a day (`CMZ_DAILY_TOKEN_BUDGET_USER`).
    pub user: Option<u64>,
    /// Tokens one family (all its members together) may spend a day
    /// (`CMZ_DAILY_TOKEN_BUDGET_FAMILY`).
    pub family: Option<u64>,
    /// Tokens the whole deployment may spend a day (`CMZ_DAILY_TOKEN_BUDGET_DEPLOYMENT`).
    pub deployment: Option<u64>,
}

impl Budgets {
    /// Whether any budget is set.
    pub fn any(&self) -> bool {
        self.user.is_some() || self.family.is_some() || self.deployment.is_some()
    }
}

/// Whose budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetScope {
    /// The caller's own.
    User,
    /// The caller's family's.
    Family,
    /// The deployment's.
    Deployment,
}

impl BudgetScope {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BudgetScope::User => "user",
            BudgetScope::Family => "family",
            BudgetScope::Deployment => "deployment",
        }
    }
}

/// Where one budget stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BudgetStatus {
    /// Whose budget.
    pub scope: BudgetScope,
    /// Tokens allowed today.
    pub budget: u64,
    /// Tokens used (and reserved by turns still running) today.
    pub used: u64,
    /// When the day ends (midnight UTC).
    pub resets_at: DateTime<Utc>,
}

impl BudgetStatus {
    /// Tokens left today.
    pub fn remaining(&self) -> u64 {
        self.budget.saturating_sub(self.used)
    }
}

/// The budget that refused a turn: the source of its `rate_limit_exceeded` error (see
/// [`Error::budget_exceeded`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the {} daily token budget ({} tokens) is used up until {}", .0.scope.as_str(), .0.budget, .0.resets_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))]
pub struct BudgetExceeded(pub BudgetStatus);

/// The message a turn refused by a budget gets.
pub const BUDGET_MESSAGE: &str =
    "Today's chat budget is used up. Please come back tomorrow to talk with the animals again.";

impl Error {
    /// The budget that refused the call, when this is a budget's `rate_limit_exceeded`.
    pub fn budget_exceeded(&self) -> Option<&BudgetExceeded> {
        match self {
            Error::RateLimited {
                source: Some(source),
                ..
            } => source.downcast_ref::<BudgetExceeded>(),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub(super) struct BudgetLimits {
    pub(super) store: DynRateLimitStore,
    pub(super) budgets: Budgets,
}

/// One scope's counter for one day.
#[derive(Debug, Clone)]
struct Counter {
    scope: BudgetScope,
    key: String,
    budget: u64,
}

/// A turn's reservation, settled when the turn is stored; given back (in the
/// background) when the turn ends any other way.
#[derive(Debug)]
pub(super) struct BudgetHold {
    store: DynRateLimitStore,
    counters: Vec<(Counter, Tally)>,
    reserved: u64,
    /// The prompt's tokens, for estimating a reply the model reported no usage for.
    pub(super) prompt_estimate: u64,
    settled: bool,
}

/// The end of the UTC day `now` is in.
pub(super) fn day_end(now: DateTime<Utc>) -> DateTime<Utc> {
    let tomorrow = now.date_naive().succ_opt().unwrap_or(NaiveDate::MAX);
    tomorrow.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc()
}

/// The counters' window: they are per day (the key names it), kept a little past it.
const WINDOW: Duration = Duration::from_secs(25 * 3600);

fn budget_key(scope: &str, who: Option<&str>, day: NaiveDate) -> String {
    match who {
        Some(who) => format!("budget:{scope}:{who}:{day}"),
        None => format!("budget:{scope}:{day}"),
    }
}

/// The key of a user's budget counter on `day` (forgotten when their data is erased).
pub(super) fn user_budget_key(user: &UserId, day: NaiveDate) -> String {
    budget_key("user", Some(user.as_str()), day)
}

impl BudgetLimits {
    fn counters(&self, principal: &Principal, day: NaiveDate) -> Vec<Counter> {
        let budgets = &self.budgets;
        let mut counters = Vec::with_capacity(3);
        if let Some(budget) = budgets.user {
            counters.push(Counter {
                scope: BudgetScope::User,
                key: user_budget_key(&principal.user_id, day),
                budget,
            });
        }
        if let (Some(budget), Some(family)) = (budgets.family, &principal.family_id) {
            counters.push(Counter {
                scope: BudgetScope::Family,
                key: budget_key("family", Some(family.as_str()), day),
                budget,
            });
        }
        if let Some(budget) = budgets.deployment {
            counters.push(Counter {
                scope: BudgetScope::Deployment,
                key: budget_key("deployment", None, day),
                budget,
            });
        }
        counters
    }

    /// Reserves `estimate` tokens (of which `prompt` are the prompt's) in every budget that
    /// applies, or refuses with the first budget that has no room (giving back what was
    /// reserved in the others).
    pub(super) async fn reserve(
        &self,
        principal: &Principal,
        prompt: u64,
        estimate: u64,
    ) -> Result<BudgetHold> {
        let now = Utc::now();
        let amount = i64::try_from(estimate).unwrap_or(i64::MAX);
        let mut hold = BudgetHold {
            store: self.store.clone(),
            counters: Vec::new(),
            reserved: estimate,
            prompt_estimate: prompt,
            settled: false,
        };
        // Every budget at once (one round trip to a remote store, not one per budget).
        let counters = self.counters(principal, now.date_naive());
        let tallies = futures::future::join_all(
            counters
                .iter()
                .map(|counter| self.store.add(&counter.key, amount, counter.budget, WINDOW)),
        )
        .await;
        let mut refused = None;
        let mut failed = None;
        for (counter, tally) in counters.into_iter().zip(tallies) {
            match tally {
                Ok(tally) if tally.added => hold.counters.push((counter, tally)),
                Ok(tally) => {
                    refused.get_or_insert(BudgetStatus {
                        scope: counter.scope,
                        budget: counter.budget,
                        used: tally.total,
                        resets_at: day_end(now),
                    });
                }
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        if let Some(error) = failed {
            hold.give_back().await;
            return Err(error);
        }
        if let Some(status) = refused {
            // The reservations made in the other budgets go back now, not when `hold` drops.
            hold.give_back().await;
            let wait = (status.resets_at - now)
                .to_std()
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_secs(1));
            return Err(
                Error::rate_limited(BUDGET_MESSAGE, Some(wait)).with_source(BudgetExceeded(status))
            );
        }
        Ok(hold)
    }

    /// Adds `tokens` spent outside a turn (a running summary) to every budget that applies,
    /// whatever room is left. Failures are logged.
    pub(super) async fn charge(&self, principal: &Principal, tokens: u64) {
        let amount = i64::try_from(tokens).unwrap_or(i64::MAX);
        for counter in self.counters(principal, Utc::now().date_naive()) {
            if let Err(error) = self.store.add(&counter.key, amount, u64::MAX, WINDOW).await {
                tracing::warn!(
                    code = error.code().as_str(),
                    scope = counter.scope.as_str(),
                    "could not count tokens in a budget"
                );
            }
        }
    }

    /// Where the caller's budgets stand today (read without reserving).
    pub(super) async fn status(&self, principal: &Principal) -> Result<Vec<BudgetStatus>> {
        let now = Utc::now();
        let mut statuses = Vec::new();
        for counter in self.counters(principal, now.date_naive()) {
            // Adding nothing reads the total in one call every backend has.
            let tally = self.store.add(&counter.key, 0, u64::MAX, WINDOW).await?;
            statuses.push(BudgetStatus {
                scope: counter.scope,
                budget: counter.budget,
                used: tally.total,
                resets_at: day_end(now),
            });
        }
        Ok(statuses)
    }
}

/// Adds `amount` (whatever the budget) to every counter at once.
async fn add_to_all(
    store: &DynRateLimitStore,
    counters: &[(Counter, Tally)],
    amount: i64,
) -> Vec<Result<Tally>> {
    futures::future::join_all(
        counters
            .iter()
            .map(|(counter, _)| store.add(&counter.key, amount, u64::MAX, WINDOW)),
    )
    .await
}

impl BudgetHold {
    /// Settles the reservation to `actual` tokens and says where each budget stands.
    pub(super) async fn settle(mut self, actual: u64) -> Vec<BudgetStatus> {
        self.settled = true;
        let delta = i128::from(actual) - i128::from(self.reserved);
        let delta = i64::try_from(delta).unwrap_or(if delta < 0 { i64::MIN } else { i64::MAX });
        let resets_at = day_end(Utc::now());
        let mut statuses = Vec::with_capacity(self.counters.len());
        let counters = std::mem::take(&mut self.counters);
        // A settlement always applies: it only moves what this turn already holds.
        let settled = add_to_all(&self.store, &counters, delta).await;
        for ((counter, tally), after) in counters.into_iter().zip(settled) {
            let used = match after {
                Ok(after) => after.total,
                Err(error) => {
                    tracing::warn!(
                        code = error.code().as_str(),
                        scope = counter.scope.as_str(),
                        "could not settle a token budget; it keeps the reservation"
                    );
                    tally.total
                }
            };
            statuses.push(BudgetStatus {
                scope: counter.scope,
                budget: counter.budget,
                used,
                resets_at,
            });
        }
        statuses
    }

    async fn give_back(&mut self) {
        self.settled = true;
        let amount = -i64::try_from(self.reserved).unwrap_or(i64::MAX);
        let counters = std::mem::take(&mut self.counters);
        let given = add_to_all(&self.store, &counters, amount).await;
        for ((counter, _), result) in counters.iter().zip(given) {
            if let Err(error) = result {
                tracing::warn!(
                    code = error.code().as_str(),
                    scope = counter.scope.as_str(),
                    "could not give back a token reservation"
                );
            }
        }
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        if self.settled || self.counters.is_empty() {
            return;
        }
        let mut rest = BudgetHold {
            store: self.store.clone(),
            counters: std::mem::take(&mut self.counters),
            reserved: self.reserved,
            prompt_estimate: self.prompt_estimate,
            settled: true,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { rest.give_back().await });
        }
    }
}

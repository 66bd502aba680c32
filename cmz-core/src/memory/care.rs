//! Usage counters, feedback and the review queue, in memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::NaiveDate;

use crate::care::{
    CareStore, Feedback, ReviewItem, ReviewMark, ReviewState, UsageCounts, UsageKey, UsageRow,
};
use crate::error::{Error, Result};
use crate::ids::{AnimalId, FamilyId, SessionId, UserId};
use crate::store::{Cursor, Page, PageRequest};

/// The care store of one process (the embedded default; the reference for other backends).
#[derive(Debug, Default)]
pub struct InMemoryCareStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By day, user, animal and model; the family is the latest one seen.
    usage: BTreeMap<CounterId, (Option<FamilyId>, UsageCounts)>,
    feedback: HashMap<(UserId, SessionId, u64), Feedback>,
    open: BTreeMap<String, ReviewItem>,
    reviewed: BTreeMap<String, ReviewItem>,
}

impl InMemoryCareStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

const CURSOR_KIND: &str = "review";

/// A usage counter's identity: day, user, animal, model.
type CounterId = (NaiveDate, UserId, AnimalId, String);

#[async_trait]
impl CareStore for InMemoryCareStore {
    async fn add_usage(&self, key: &UsageKey, counts: &UsageCounts) -> Result<()> {
        let mut state = self.state();
        let (family, total) = state
            .usage
            .entry((
                key.day,
                key.user_id.clone(),
                key.animal_id.clone(),
                key.model.clone(),
            ))
            .or_default();
        family.clone_from(&key.family_id);
        total.add(counts);
        Ok(())
    }

    async fn usage(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<UsageRow>> {
        Ok(self
            .state()
            .usage
            .iter()
            .filter(|((day, ..), _)| (from..=to).contains(day))
            .map(|((day, user, animal, model), (family, counts))| UsageRow {
                key: UsageKey {
                    day: *day,
                    user_id: user.clone(),
                    family_id: family.clone(),
                    animal_id: animal.clone(),
                    model: model.clone(),
                },
                counts: *counts,
            })
            .collect())
    }

    async fn user_usage(&self, user: &UserId, day: NaiveDate) -> Result<UsageCounts> {
        let mut total = UsageCounts::default();
        for (_, (_, counts)) in self
            .state()
            .usage
            .iter()
            .filter(|((d, owner, ..), _)| *d == day && owner == user)
        {
            total.add(counts);
        }
        Ok(total)
    }

    async fn put_feedback(&self, feedback: &Feedback) -> Result<()> {
        self.state().feedback.insert(
            (
                feedback.user_id.clone(),
                feedback.session_id.clone(),
                feedback.seq,
            ),
            feedback.clone(),
        );
        Ok(())
    }

    async fn get_feedback(
        &self,
        user: &UserId,
        session: &SessionId,
        seq: u64,
    ) -> Result<Option<Feedback>> {
        Ok(self
            .state()
            .feedback
            .get(&(user.clone(), session.clone(), seq))
            .cloned())
    }

    async fn flag(&self, item: &ReviewItem) -> Result<()> {
        let mut state = self.state();
        let entry = state
            .open
            .entry(item.id.clone())
            .or_insert_with(|| ReviewItem {
                reasons: Vec::new(),
                review: None,
                ..item.clone()
            });
        entry.reasons.extend(item.reasons.iter().copied());
        entry.reasons.sort_unstable();
        entry.reasons.dedup();
        Ok(())
    }

    async fn review_items(
        &self,
        state: ReviewState,
        page: PageRequest,
    ) -> Result<Page<ReviewItem>> {
        let before = match &page.cursor {
            Some(cursor) => {
                let id = cursor.decode(CURSOR_KIND, 1)?.remove(0);
                ReviewItem::check_id(&id)?;
                Some(id)
            }
            None => None,
        };
        let limit = page.effective_limit();
        let guard = self.state();
        let items = match state {
            ReviewState::Open => &guard.open,
            ReviewState::Reviewed => &guard.reviewed,
        };
        let mut found: Vec<ReviewItem> = items
            .iter()
            .rev()
            .filter(|(id, _)| before.as_ref().is_none_or(|b| *id < b))
            .take(limit + 1)
            .map(|(_, item)| item.clone())
            .collect();
        let next = (found.len() > limit).then(|| {
            found.truncate(limit);
            Cursor::encode(CURSOR_KIND, &[&found[limit - 1].id])
        });
        Ok(Page { items: found, next })
    }

    async fn get_review_item(&self, id: &str) -> Result<Option<ReviewItem>> {
        let state = self.state();
        Ok(state
            .open
            .get(id)
            .or_else(|| state.reviewed.get(id))
            .cloned())
    }

    async fn mark_reviewed(&self, id: &str, mark: &ReviewMark) -> Result<ReviewItem> {
        let mut state = self.state();
        let mut item = state
            .open
            .remove(id)
            .ok_or_else(|| Error::not_found(format!("open review item {id}")))?;
        item.review = Some(mark.clone());
        state.reviewed.insert(id.to_owned(), item.clone());
        Ok(item)
    }

    async fn forget_user(&self, user: &UserId, usage_since: NaiveDate) -> Result<u64> {
        let mut state = self.state();
        let before =
            state.usage.len() + state.feedback.len() + state.open.len() + state.reviewed.len();
        state
            .usage
            .retain(|(day, owner, ..), _| !(owner == user && *day >= usage_since));
        state.feedback.retain(|(voter, _, _), _| voter != user);
        state.open.retain(|_, item| &item.owner_id != user);
        state.reviewed.retain(|_, item| &item.owner_id != user);
        let after =
            state.usage.len() + state.feedback.len() + state.open.len() + state.reviewed.len();
        Ok((before - after) as u64)
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn the_in_memory_care_store_meets_the_contract() {
        crate::testing::run_care_store_suite(&super::InMemoryCareStore::new()).await;
    }
}

//! `DynamoCareStore`: usage counters, feedback and the review queue in one table.
//!
//! Layout of the care table (`CMZ_CARE_TABLE_NAME`: hash key `pk`, range key `sk`, both
//! strings, no index, TTL on `ttl`):
//!
//! | item | `pk` | `sk` | attributes |
//! | --- | --- | --- | --- |
//! | usage counter | `usage#<YYYY-MM-DD>` | `<userId>/<animalId>/<model>` | `userId`, `animalId`, `model`, `familyId` (the latest), `promptTokens`, `completionTokens`, `turns`, `fallbacks`, `ttl` (the day + 400 days) |
//! | feedback | `feedback#<userId>` | `<sessionId>#<seq, 20 digits>` | every field of the vote |
//! | review item | `review#open`, `review#reviewed` | the item id | `sessionId`, `messageId`, `seq`, `ownerId`, `animalId`, `reasons` (a string set), `flaggedAt`, `flags` (open items: how often flagged); reviewed items add `reviewedBy`, `reviewedAt`, `reviewNote` |
//!
//! The real values are kept as attributes and read from there; keys only make items
//! unique and findable. A usage counter's parts are separated by `/`, the one printable
//! character ids never contain ([`cmz_core::ids`]), so no two users, animals or models
//! share a counter, and the counters of one user of one day are the keys beginning with
//! `<userId>/`. A day's counters are one partition: a report reads one `Query` a day.
//! Review ids sort by time ([`ReviewItem::id_for`]), so the queue is a descending `Query`.

mod feedback;
mod forget;
mod review;
mod usage;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::query::builders::QueryFluentBuilder;
use aws_sdk_dynamodb::types::ReturnConsumedCapacity;
use chrono::NaiveDate;
use cmz_core::Result;
use cmz_core::care::{
    CareStore, Feedback, ReviewItem, ReviewMark, ReviewState, UsageCounts, UsageKey, UsageRow,
};
use cmz_core::ids::{SessionId, UserId};
use cmz_core::store::{Page, PageRequest};

use crate::attr::{Item, s};
use crate::backend::Dynamo;
use crate::error::map_sdk;

#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use feedback::feedback_from;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use review::review_from;
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) use usage::usage_from;

/// Queries of a day each (a report, an erasure) sent at the same time.
const DAYS_AT_ONCE: usize = 8;

/// Usage counters, feedback and the review queue in the care table (see the module
/// source for the layout). Adding usage is one `UpdateItem`; a report is one `Query` per
/// day; the queue is read newest first with one `Query` a page; marking an item reviewed
/// is one `TransactWriteItems`. Every read is strongly consistent.
#[derive(Debug, Clone)]
pub struct DynamoCareStore {
    db: Dynamo,
}

impl DynamoCareStore {
    /// The store on `db`'s care table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }

    fn table(&self) -> &str {
        &self.db.inner.tables.care
    }

    fn client(&self) -> &aws_sdk_dynamodb::Client {
        &self.db.inner.client
    }

    /// One strongly consistent `GetItem`.
    async fn get(&self, pk: &str, sk: &str) -> Result<Option<Item>> {
        let table = self.table();
        let out = self
            .client()
            .get_item()
            .table_name(table)
            .key("pk", s(pk))
            .key("sk", s(sk))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), false);
        Ok(out.item.filter(|item| !item.is_empty()))
    }

    /// A `Query` on the care table, strongly consistent; conditions come from the caller.
    fn query(&self) -> QueryFluentBuilder {
        self.client()
            .query()
            .table_name(self.table())
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
    }

    /// Every item `query` finds, page after page.
    async fn query_all(&self, query: QueryFluentBuilder) -> Result<Vec<Item>> {
        let table = self.table();
        let mut found = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = query
                .clone()
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            found.extend(page.items.unwrap_or_default());
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(found),
            }
        }
    }
}

/// The days `from..=to`, in order.
fn days(from: NaiveDate, to: NaiveDate) -> impl Iterator<Item = NaiveDate> {
    from.iter_days().take_while(move |day| *day <= to)
}

#[async_trait]
impl CareStore for DynamoCareStore {
    #[tracing::instrument(name = "dynamodb.care_add_usage", skip_all)]
    async fn add_usage(&self, key: &UsageKey, counts: &UsageCounts) -> Result<()> {
        self.add_usage_counts(key, counts).await
    }

    #[tracing::instrument(name = "dynamodb.care_usage", skip_all, fields(%from, %to))]
    async fn usage(&self, from: NaiveDate, to: NaiveDate) -> Result<Vec<UsageRow>> {
        self.usage_rows(from, to).await
    }

    #[tracing::instrument(name = "dynamodb.care_user_usage", skip_all)]
    async fn user_usage(&self, user: &UserId, day: NaiveDate) -> Result<UsageCounts> {
        self.user_usage_counts(user, day).await
    }

    #[tracing::instrument(name = "dynamodb.care_put_feedback", skip_all)]
    async fn put_feedback(&self, feedback: &Feedback) -> Result<()> {
        self.put_vote(feedback).await
    }

    #[tracing::instrument(name = "dynamodb.care_get_feedback", skip_all)]
    async fn get_feedback(
        &self,
        user: &UserId,
        session: &SessionId,
        seq: u64,
    ) -> Result<Option<Feedback>> {
        self.get_vote(user, session, seq).await
    }

    #[tracing::instrument(name = "dynamodb.care_flag", skip_all)]
    async fn flag(&self, item: &ReviewItem) -> Result<()> {
        self.flag_item(item).await
    }

    #[tracing::instrument(name = "dynamodb.care_review_items", skip_all)]
    async fn review_items(
        &self,
        state: ReviewState,
        page: PageRequest,
    ) -> Result<Page<ReviewItem>> {
        self.review_page(state, page).await
    }

    #[tracing::instrument(name = "dynamodb.care_get_review_item", skip_all)]
    async fn get_review_item(&self, id: &str) -> Result<Option<ReviewItem>> {
        self.review_item(id).await
    }

    #[tracing::instrument(name = "dynamodb.care_mark_reviewed", skip_all)]
    async fn mark_reviewed(&self, id: &str, mark: &ReviewMark) -> Result<ReviewItem> {
        self.mark_item_reviewed(id, mark).await
    }

    #[tracing::instrument(name = "dynamodb.care_forget_user", skip_all, fields(user = %user))]
    async fn forget_user(&self, user: &UserId, usage_since: NaiveDate) -> Result<u64> {
        self.forget(user, usage_since).await
    }
}

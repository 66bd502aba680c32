//! Erasure: everything the care table keeps about one user.

use chrono::{TimeDelta, Utc};
use futures::{StreamExt as _, TryStreamExt as _};

use super::feedback::feedback_pk;
use super::review::{OPEN, REVIEWED};
use super::usage::{day_pk, user_prefix};
use super::*;
use crate::batch::delete_keys;

impl DynamoCareStore {
    /// Finds the keys with `Query`s only: the user's feedback partition; the items of both
    /// review partitions whose `ownerId` is the user (a filter: the queue is read whole,
    /// which an erasure can afford); the user's counters in each day's partition from
    /// `since` to tomorrow (a server whose clock runs ahead may have started it). Then
    /// deletes them with `BatchWriteItem`s and counts them. Nothing found, nothing
    /// deleted: a repeat is harmless.
    pub(super) async fn forget(&self, user: &UserId, since: NaiveDate) -> Result<u64> {
        let mut keys = self
            .query_all(
                self.query()
                    .key_condition_expression("pk = :pk")
                    .expression_attribute_values(":pk", s(feedback_pk(user)))
                    .projection_expression("pk, sk"),
            )
            .await?;
        for pk in [OPEN, REVIEWED] {
            keys.extend(
                self.query_all(
                    self.query()
                        .key_condition_expression("pk = :pk")
                        .filter_expression("#owner = :user")
                        .expression_attribute_names("#owner", "ownerId")
                        .expression_attribute_values(":pk", s(pk))
                        .expression_attribute_values(":user", s(user.as_str()))
                        .projection_expression("pk, sk"),
                )
                .await?,
            );
        }
        let tomorrow = Utc::now().date_naive() + TimeDelta::days(1);
        let counters: Vec<Vec<Item>> = futures::stream::iter(days(since, tomorrow).map(|day| {
            self.query_all(
                self.query()
                    .key_condition_expression("pk = :pk AND begins_with(sk, :user)")
                    .expression_attribute_values(":pk", s(day_pk(day)))
                    .expression_attribute_values(":user", s(user_prefix(user)))
                    .projection_expression("pk, sk"),
            )
        }))
        .buffer_unordered(DAYS_AT_ONCE)
        .try_collect()
        .await?;
        keys.extend(counters.into_iter().flatten());
        let count = keys.len() as u64;
        delete_keys(&self.db, self.table(), keys).await?;
        Ok(count)
    }
}

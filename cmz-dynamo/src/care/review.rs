//! The review queue: open and reviewed items, each state one partition in id order.

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{AttributeValue, Delete, Put, TransactWriteItem};
use cmz_core::Error;
use cmz_core::care::ReviewReason;
use cmz_core::ids::{AnimalId, MessageId};
use cmz_core::store::Cursor;

use super::*;
use crate::attr::{Reader, n, time};
use crate::error::map_service;

const CURSOR_KIND: &str = "review";

/// How often `mark_reviewed` starts again when the open item changed (a new reason) or
/// another transaction touched it between its read and its write.
const MARK_ROUNDS: usize = 5;

/// The partition of an open item.
pub(super) const OPEN: &str = "review#open";
/// The partition of a reviewed item.
pub(super) const REVIEWED: &str = "review#reviewed";

fn state_pk(state: ReviewState) -> &'static str {
    match state {
        ReviewState::Open => OPEN,
        ReviewState::Reviewed => REVIEWED,
    }
}

fn key(pk: &str, id: &str) -> Item {
    [("pk".to_owned(), s(pk)), ("sk".to_owned(), s(id))]
        .into_iter()
        .collect()
}

fn not_found(id: &str) -> Error {
    Error::not_found(format!("open review item {id}"))
}

/// A stored item, open or reviewed. Reasons come back sorted and without repeats; a
/// reason this version does not know is left out.
pub(crate) fn review_from(item: &Item) -> Result<ReviewItem> {
    let reader = Reader::new(item, "review item");
    let mut reasons: Vec<ReviewReason> = reader
        .str_list("reasons")
        .iter()
        .filter_map(|reason| ReviewReason::parse(reason))
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    let review = match reader.opt_str("reviewedBy") {
        Some(by) => Some(ReviewMark {
            by: UserId::new(by)?,
            at: reader.time("reviewedAt")?,
            note: reader.opt_str("reviewNote").map(str::to_owned),
        }),
        None => None,
    };
    Ok(ReviewItem {
        id: reader.str("sk")?.to_owned(),
        session_id: SessionId::new(reader.str("sessionId")?)?,
        message_id: MessageId::new(reader.str("messageId")?)?,
        seq: reader.u64("seq")?,
        owner_id: UserId::new(reader.str("ownerId")?)?,
        animal_id: AnimalId::new(reader.str("animalId")?)?,
        reasons,
        flagged_at: reader.time("flaggedAt")?,
        review,
    })
}

/// The reviewed copy of an open item.
fn reviewed_item(open: &Item, mark: &ReviewMark) -> Item {
    let mut item: Item = open
        .iter()
        .filter(|(name, _)| name.as_str() != "flags")
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    item.insert("pk".into(), s(REVIEWED));
    item.insert("reviewedBy".into(), s(mark.by.as_str()));
    item.insert("reviewedAt".into(), time(mark.at));
    if let Some(note) = &mark.note {
        item.insert("reviewNote".into(), s(note.clone()));
    }
    item
}

impl DynamoCareStore {
    /// One `UpdateItem` of the open item: the reasons are `ADD`ed to a string set (so
    /// concurrent flags all count), the rest is set where the item is new. `flags` counts
    /// the calls, so `mark_reviewed` notices a reason that came in after it read the item.
    pub(super) async fn flag_item(&self, item: &ReviewItem) -> Result<()> {
        ReviewItem::check_id(&item.id)?;
        let table = self.table();
        let mut update = String::from(
            "SET #session = if_not_exists(#session, :session), \
             #message = if_not_exists(#message, :message), \
             #seq = if_not_exists(#seq, :seq), \
             #owner = if_not_exists(#owner, :owner), \
             #animal = if_not_exists(#animal, :animal), \
             #flagged = if_not_exists(#flagged, :flagged) \
             ADD #flags :one",
        );
        let reasons: Vec<String> = item
            .reasons
            .iter()
            .map(|reason| reason.as_str().to_owned())
            .collect();
        let mut request = self
            .client()
            .update_item()
            .table_name(table)
            .key("pk", s(OPEN))
            .key("sk", s(item.id.clone()))
            .expression_attribute_names("#session", "sessionId")
            .expression_attribute_names("#message", "messageId")
            .expression_attribute_names("#seq", "seq")
            .expression_attribute_names("#owner", "ownerId")
            .expression_attribute_names("#animal", "animalId")
            .expression_attribute_names("#flagged", "flaggedAt")
            .expression_attribute_names("#flags", "flags")
            .expression_attribute_values(":session", s(item.session_id.as_str()))
            .expression_attribute_values(":message", s(item.message_id.as_str()))
            .expression_attribute_values(":seq", n(item.seq))
            .expression_attribute_values(":owner", s(item.owner_id.as_str()))
            .expression_attribute_values(":animal", s(item.animal_id.as_str()))
            .expression_attribute_values(":flagged", time(item.flagged_at))
            .expression_attribute_values(":one", n(1))
            .return_consumed_capacity(ReturnConsumedCapacity::Total);
        // DynamoDB has no empty sets: without reasons, only the item is made.
        if !reasons.is_empty() {
            update.push_str(", #reasons :reasons");
            request = request
                .expression_attribute_names("#reasons", "reasons")
                .expression_attribute_values(":reasons", AttributeValue::Ss(reasons));
        }
        let out = request
            .update_expression(update)
            .send()
            .await
            .map_err(|e| map_sdk("UpdateItem", table, e))?;
        self.db.inner.meter.record(out.consumed_capacity(), true);
        Ok(())
    }

    /// One descending `Query` of the state's partition (more only when DynamoDB cuts a
    /// page short), from the item after the cursor's.
    pub(super) async fn review_page(
        &self,
        state: ReviewState,
        page: PageRequest,
    ) -> Result<Page<ReviewItem>> {
        let pk = state_pk(state);
        let mut start = match &page.cursor {
            Some(cursor) => {
                let id = cursor.decode(CURSOR_KIND, 1)?.remove(0);
                ReviewItem::check_id(&id)?;
                Some(key(pk, &id))
            }
            None => None,
        };
        let limit = page.effective_limit();
        let table = self.table();
        let mut found: Vec<ReviewItem> = Vec::new();
        // One more than the page, to know whether there is a next one.
        while found.len() <= limit {
            let out = self
                .query()
                .key_condition_expression("pk = :pk")
                .expression_attribute_values(":pk", s(pk))
                .scan_index_forward(false)
                .limit(i32::try_from(limit + 1 - found.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(out.consumed_capacity(), false);
            for item in out.items() {
                found.push(review_from(item)?);
            }
            match out.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        let next = (found.len() > limit).then(|| {
            found.truncate(limit);
            Cursor::encode(CURSOR_KIND, &[&found[limit - 1].id])
        });
        Ok(Page { items: found, next })
    }

    /// The open item, else the reviewed one.
    pub(super) async fn review_item(&self, id: &str) -> Result<Option<ReviewItem>> {
        if ReviewItem::check_id(id).is_err() {
            return Ok(None);
        }
        for pk in [OPEN, REVIEWED] {
            if let Some(item) = self.get(pk, id).await? {
                return review_from(&item).map(Some);
            }
        }
        Ok(None)
    }

    /// Reads the open item, then moves it in one `TransactWriteItems`: the open item is
    /// deleted if it is still as read (same `flags`), and its reviewed copy put (replacing
    /// an earlier review of the same message). A lost race starts again; an item gone
    /// meanwhile is `not_found`.
    pub(super) async fn mark_item_reviewed(
        &self,
        id: &str,
        mark: &ReviewMark,
    ) -> Result<ReviewItem> {
        if ReviewItem::check_id(id).is_err() {
            return Err(not_found(id));
        }
        let table = self.table();
        for _ in 0..MARK_ROUNDS {
            let Some(open) = self.get(OPEN, id).await? else {
                return Err(not_found(id));
            };
            let reviewed = reviewed_item(&open, mark);
            let result = review_from(&reviewed)?;
            let mut delete = Delete::builder()
                .table_name(table)
                .set_key(Some(key(OPEN, id)));
            delete = match open.get("flags") {
                Some(flags) => delete
                    .condition_expression("attribute_exists(pk) AND #flags = :flags")
                    .expression_attribute_names("#flags", "flags")
                    .expression_attribute_values(":flags", flags.clone()),
                None => delete.condition_expression("attribute_exists(pk)"),
            };
            let delete = delete
                .build()
                .map_err(|e| Error::internal("review delete").with_source(e))?;
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(reviewed))
                .build()
                .map_err(|e| Error::internal("review put").with_source(e))?;
            let sent = self
                .client()
                .transact_write_items()
                .transact_items(TransactWriteItem::builder().delete(delete).build())
                .transact_items(TransactWriteItem::builder().put(put).build())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await;
            let raw = match sent {
                Ok(out) => {
                    self.db.inner.meter.record(out.consumed_capacity(), true);
                    return Ok(result);
                }
                Err(SdkError::ServiceError(service)) => service.into_err(),
                Err(other) => return Err(map_sdk("TransactWriteItems", table, other)),
            };
            self.db.inner.meter.record(None, true);
            let lost_race = match &raw {
                TransactWriteItemsError::TransactionCanceledException(cancelled) => {
                    cancelled.cancellation_reasons().iter().any(|r| {
                        matches!(
                            r.code(),
                            Some("ConditionalCheckFailed" | "TransactionConflict")
                        )
                    })
                }
                _ => false,
            };
            if !lost_race {
                return Err(map_service("TransactWriteItems", table, raw));
            }
        }
        Err(Error::conflict(format!(
            "review item {id} changed {MARK_ROUNDS} times while it was being marked"
        )))
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone as _, Utc};

    use super::*;

    #[test]
    fn an_item_reads_back_with_sorted_known_reasons() {
        let at = Utc.timestamp_nanos(1_780_000_000_123_456_789);
        let session = SessionId::new("conv_lion_kid_0000abcd").unwrap();
        let id = ReviewItem::id_for(at, &session, 2);
        let mut item = key(OPEN, &id);
        item.insert("sessionId".into(), s(session.as_str()));
        item.insert("messageId".into(), s("m1"));
        item.insert("seq".into(), n(2));
        item.insert("ownerId".into(), s("kid"));
        item.insert("animalId".into(), s("lion"));
        item.insert("flaggedAt".into(), time(at));
        item.insert("flags".into(), n(3));
        item.insert(
            "reasons".into(),
            AttributeValue::Ss(vec![
                "redacted".into(),
                "sarcasm".into(),
                "thumbs_down".into(),
            ]),
        );
        let open = review_from(&item).unwrap();
        assert_eq!(open.id, id);
        assert_eq!(
            open.reasons,
            [ReviewReason::ThumbsDown, ReviewReason::Redacted]
        );
        assert_eq!(open.review, None);
        let mark = ReviewMark {
            by: UserId::new("staff").unwrap(),
            at,
            note: None,
        };
        let reviewed = reviewed_item(&item, &mark);
        assert_eq!(reviewed["pk"], s(REVIEWED));
        assert!(!reviewed.contains_key("flags"));
        assert_eq!(
            review_from(&reviewed).unwrap(),
            ReviewItem {
                review: Some(mark),
                ..open
            }
        );
    }
}

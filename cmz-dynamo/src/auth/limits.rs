//! Shared rate-limit counters in the meta table.

use super::*;

/// Fixed-window counters in the meta table (`rate#<key>`: `count`, `resetsAt`, `ttl`), so
/// login throttling and turn limits hold across server instances. A hit is one
/// conditional `UpdateItem` (`ADD count 1` while the window is open), or a conditional
/// `PutItem` that opens a new window.
///
/// Totals of [`add`](RateLimitStore::add) (token budgets, say) are items of their own
/// (`total#<key>`: `total`, `resetsAt`, `ttl`). Adding is one conditional `UpdateItem`
/// (`ADD total` while the window is open and the total below the ceiling); when its
/// condition fails, the item it failed on (returned with the failure, so no second read)
/// says whether the add was refused or a new window is to be opened with a conditional
/// `PutItem`. Taking back is `ADD` of the negative amount while the total covers it, else
/// a conditional `SET total = 0`; reading (amount 0) is one consistent `GetItem`.
#[derive(Debug, Clone)]
pub struct DynamoRateLimitStore {
    db: Dynamo,
}

impl DynamoRateLimitStore {
    /// The store on `db`'s meta table.
    pub fn new(db: Dynamo) -> Self {
        Self { db }
    }
}

/// How many times a call retries after losing a race (another instance opened a window, or
/// changed a total between two conditional writes).
const CONTENDED_ROUNDS: usize = 8;

/// The end (epoch ms) of a window of length `window` opened at `now`.
fn window_end(now: DateTime<Utc>, window: Duration) -> i64 {
    let window_ms = i64::try_from(window.as_millis())
        .unwrap_or(i64::MAX / 4)
        .min(i64::MAX / 4);
    now.timestamp_millis().saturating_add(window_ms)
}

fn millis(at: i64, fallback: DateTime<Utc>) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(at).single().unwrap_or(fallback)
}

/// A stored total and the end of its window (epoch ms), if `item` is one.
fn total_from(item: &Item) -> Option<(u64, i64)> {
    let reader = Reader::new(item, "rate total");
    Some((reader.opt_u64("total")?, reader.opt_i64("resetsAt")?))
}

/// The total of `item` (as `UpdateItem` returned it) after an applied add.
fn applied(item: Option<Item>, now: DateTime<Utc>) -> Result<Tally> {
    let (total, resets) = item
        .as_ref()
        .and_then(total_from)
        .ok_or_else(|| Error::internal("stored rate total is malformed"))?;
    Ok(Tally {
        total,
        added: true,
        resets_at: millis(resets, now),
    })
}

/// The item a failed conditional `UpdateItem` was checked against (`None`: no item).
fn failed_on(error: aws_sdk_dynamodb::error::SdkError<UpdateItemError>) -> Option<Item> {
    match error.into_service_error() {
        UpdateItemError::ConditionalCheckFailedException(failed) => {
            failed.item.filter(|item| !item.is_empty())
        }
        _ => None,
    }
}

impl DynamoRateLimitStore {
    /// Reads a total (an `add` of 0): no write.
    async fn read_total(&self, pk: &str, ceiling: u64, window: Duration) -> Result<Tally> {
        let now = Utc::now();
        let item = self
            .db
            .get_item(&self.db.inner.tables.meta, "pk", pk)
            .await?;
        let (total, resets) = item
            .as_ref()
            .and_then(total_from)
            .filter(|(_, resets)| *resets > now.timestamp_millis())
            .unwrap_or((0, window_end(now, window)));
        Ok(Tally {
            total,
            added: total < ceiling,
            resets_at: millis(resets, now),
        })
    }

    /// Adds a positive `amount` while the total is below `ceiling`.
    async fn add_below(
        &self,
        pk: &str,
        amount: i64,
        ceiling: u64,
        window: Duration,
    ) -> Result<Tally> {
        let meta = &self.db.inner.tables.meta;
        for _ in 0..CONTENDED_ROUNDS {
            let now = Utc::now();
            let added = self
                .db
                .inner
                .client
                .update_item()
                .table_name(meta)
                .key("pk", s(pk))
                .update_expression("ADD #total :amount")
                .condition_expression("resetsAt > :now AND #total < :ceiling")
                .expression_attribute_names("#total", "total")
                .expression_attribute_values(":amount", n(amount))
                .expression_attribute_values(":ceiling", n(ceiling))
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let old = match added {
                Ok(out) => return applied(out.attributes, now),
                Err(e) if is_condition_failure(&e) => failed_on(e),
                Err(e) => return Err(map_sdk("UpdateItem", meta, e)),
            };
            // The window is open, so the total was at the ceiling: refused.
            if let Some((total, resets)) = old
                .as_ref()
                .and_then(total_from)
                .filter(|(_, resets)| *resets > now.timestamp_millis())
            {
                return Ok(Tally {
                    total,
                    added: false,
                    resets_at: millis(resets, now),
                });
            }
            let resets = window_end(now, window);
            if ceiling == 0 {
                // A new window starts at 0, which is not below a ceiling of 0.
                return Ok(Tally {
                    total: 0,
                    added: false,
                    resets_at: millis(resets, now),
                });
            }
            let mut item = Item::new();
            item.insert("pk".into(), s(pk));
            item.insert("total".into(), n(amount));
            item.insert("resetsAt".into(), n(resets));
            item.insert(TTL_ATTRIBUTE.into(), n(resets / 1000 + 60));
            let opened = self
                .db
                .inner
                .client
                .put_item()
                .table_name(meta)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk) OR resetsAt <= :now")
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .send()
                .await;
            match opened {
                Ok(_) => {
                    return Ok(Tally {
                        total: amount.unsigned_abs(),
                        added: true,
                        resets_at: millis(resets, now),
                    });
                }
                // Another instance opened the window first: add in it.
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(map_sdk("PutItem", meta, e)),
            }
        }
        Err(Error::conflict(format!("rate total {pk} is too contended")))
    }

    /// Takes `back` off the total of the open window, stopping at 0.
    async fn take_back(&self, pk: &str, back: u64, window: Duration) -> Result<Tally> {
        let meta = &self.db.inner.tables.meta;
        for _ in 0..CONTENDED_ROUNDS {
            let now = Utc::now();
            let subtracted = self
                .db
                .inner
                .client
                .update_item()
                .table_name(meta)
                .key("pk", s(pk))
                .update_expression("ADD #total :minus")
                .condition_expression("resetsAt > :now AND #total >= :back")
                .expression_attribute_names("#total", "total")
                .expression_attribute_values(":minus", n(format!("-{back}")))
                .expression_attribute_values(":back", n(back))
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .return_values(ReturnValue::AllNew)
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .send()
                .await;
            let old = match subtracted {
                Ok(out) => return applied(out.attributes, now),
                Err(e) if is_condition_failure(&e) => failed_on(e),
                Err(e) => return Err(map_sdk("UpdateItem", meta, e)),
            };
            let open = old
                .as_ref()
                .and_then(total_from)
                .is_some_and(|(_, resets)| resets > now.timestamp_millis());
            if !open {
                // No open window: its total is 0 already, and stays 0.
                return Ok(Tally {
                    total: 0,
                    added: true,
                    resets_at: millis(window_end(now, window), now),
                });
            }
            // The total is below `back`: it goes to 0, unless it grew meanwhile.
            let zeroed = self
                .db
                .inner
                .client
                .update_item()
                .table_name(meta)
                .key("pk", s(pk))
                .update_expression("SET #total = :zero")
                .condition_expression("resetsAt > :now AND #total < :back")
                .expression_attribute_names("#total", "total")
                .expression_attribute_values(":zero", n(0))
                .expression_attribute_values(":back", n(back))
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            match zeroed {
                Ok(out) => return applied(out.attributes, now),
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(map_sdk("UpdateItem", meta, e)),
            }
        }
        Err(Error::conflict(format!("rate total {pk} is too contended")))
    }
}

pub(crate) fn count_from(item: &Item) -> Option<RateCount> {
    let reader = Reader::new(item, "rate counter");
    Some(RateCount {
        count: u32::try_from(reader.opt_u64("count")?).unwrap_or(u32::MAX),
        resets_at: Utc
            .timestamp_millis_opt(reader.opt_i64("resetsAt")?)
            .single()?,
    })
}

#[async_trait]
impl RateLimitStore for DynamoRateLimitStore {
    #[tracing::instrument(name = "dynamodb.rate_hit", skip_all)]
    async fn hit(&self, key: &str, window: Duration) -> Result<RateCount> {
        let meta = &self.db.inner.tables.meta;
        let pk = format!("rate#{key}");
        for _ in 0..CONTENDED_ROUNDS {
            let now = Utc::now();
            let counted = self
                .db
                .inner
                .client
                .update_item()
                .table_name(meta)
                .key("pk", s(pk.clone()))
                .update_expression("ADD #count :one")
                .condition_expression("resetsAt > :now")
                .expression_attribute_names("#count", "count")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .return_values(ReturnValue::AllNew)
                .send()
                .await;
            match counted {
                Ok(out) => {
                    return count_from(&out.attributes.unwrap_or_default())
                        .ok_or_else(|| Error::internal("stored rate counter is malformed"));
                }
                Err(e) if is_condition_failure(&e) => {}
                Err(e) => return Err(map_sdk("UpdateItem", meta, e)),
            }
            let resets = window_end(now, window);
            let mut item = Item::new();
            item.insert("pk".into(), s(pk.clone()));
            item.insert("count".into(), n(1));
            item.insert("resetsAt".into(), n(resets));
            item.insert(TTL_ATTRIBUTE.into(), n(resets / 1000 + 60));
            let opened = self
                .db
                .inner
                .client
                .put_item()
                .table_name(meta)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(pk) OR resetsAt <= :now")
                .expression_attribute_values(":now", n(now.timestamp_millis()))
                .send()
                .await;
            match opened {
                Ok(_) => {
                    return Ok(RateCount {
                        count: 1,
                        resets_at: Utc.timestamp_millis_opt(resets).single().unwrap_or(now),
                    });
                }
                // Another instance opened the window first: count in it.
                Err(e) if is_condition_failure(&e) => continue,
                Err(e) => return Err(map_sdk("PutItem", meta, e)),
            }
        }
        Err(Error::conflict(format!(
            "rate counter {key} is too contended"
        )))
    }

    #[tracing::instrument(name = "dynamodb.rate_peek", skip_all)]
    async fn peek(&self, key: &str, _window: Duration) -> Result<RateCount> {
        let meta = &self.db.inner.tables.meta;
        let now = Utc::now();
        let out = self
            .db
            .inner
            .client
            .get_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| map_sdk("GetItem", meta, e))?;
        Ok(out
            .item
            .as_ref()
            .and_then(count_from)
            .filter(|c| c.resets_at > now)
            .unwrap_or(RateCount {
                count: 0,
                resets_at: now,
            }))
    }

    #[tracing::instrument(name = "dynamodb.rate_reset", skip_all)]
    async fn reset(&self, key: &str) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        // The hit counter and the total of the key (the contract clears both).
        for pk in [format!("rate#{key}"), format!("total#{key}")] {
            self.db
                .inner
                .client
                .delete_item()
                .table_name(meta)
                .key("pk", s(pk))
                .send()
                .await
                .map_err(|e| map_sdk("DeleteItem", meta, e))?;
        }
        Ok(())
    }

    #[tracing::instrument(name = "dynamodb.rate_release", skip_all)]
    async fn release(&self, key: &str) -> Result<()> {
        let meta = &self.db.inner.tables.meta;
        let released = self
            .db
            .inner
            .client
            .update_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .update_expression("ADD #count :minus")
            .condition_expression("#count > :zero AND resetsAt > :now")
            .expression_attribute_names("#count", "count")
            .expression_attribute_values(":minus", n(-1))
            .expression_attribute_values(":zero", n(0))
            .expression_attribute_values(":now", n(Utc::now().timestamp_millis()))
            .send()
            .await;
        match released {
            Ok(_) => Ok(()),
            // Nothing to give back: the window ended or the count is 0.
            Err(e) if is_condition_failure(&e) => Ok(()),
            Err(e) => Err(map_sdk("UpdateItem", meta, e)),
        }
    }

    #[tracing::instrument(name = "dynamodb.rate_add", skip_all)]
    async fn add(&self, key: &str, amount: i64, ceiling: u64, window: Duration) -> Result<Tally> {
        let pk = format!("total#{key}");
        match amount.cmp(&0) {
            std::cmp::Ordering::Equal => self.read_total(&pk, ceiling, window).await,
            std::cmp::Ordering::Greater => self.add_below(&pk, amount, ceiling, window).await,
            std::cmp::Ordering::Less => self.take_back(&pk, amount.unsigned_abs(), window).await,
        }
    }
}

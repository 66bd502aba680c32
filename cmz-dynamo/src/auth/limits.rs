//! Shared rate-limit counters in the meta table.

use super::*;

/// Fixed-window counters in the meta table (`rate#<key>`: `count`, `resetsAt`, `ttl`), so
/// login throttling and turn limits hold across server instances. A hit is one
/// conditional `UpdateItem` (`ADD count 1` while the window is open), or a conditional
/// `PutItem` that opens a new window.
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
        for _ in 0..8 {
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
            let window_ms = i64::try_from(window.as_millis())
                .unwrap_or(i64::MAX / 4)
                .min(i64::MAX / 4);
            let resets = now.timestamp_millis().saturating_add(window_ms);
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
        self.db
            .inner
            .client
            .delete_item()
            .table_name(meta)
            .key("pk", s(format!("rate#{key}")))
            .send()
            .await
            .map_err(|e| map_sdk("DeleteItem", meta, e))?;
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
}

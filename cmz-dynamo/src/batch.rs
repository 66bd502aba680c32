//! Batched deletes: `BatchWriteItem` in groups of 25, retrying unprocessed items.

use std::time::Duration;

use aws_sdk_dynamodb::types::{DeleteRequest, ReturnConsumedCapacity, WriteRequest};
use cmz_core::{Error, Result};

use crate::attr::Item;
use crate::backend::Dynamo;
use crate::error::map_sdk;

/// Items per `BatchWriteItem`, DynamoDB's limit.
pub(crate) const BATCH_SIZE: usize = 25;
const MAX_ROUNDS: u32 = 10;

/// Deletes the items with these primary `keys` from `table`, 25 per request. Unprocessed
/// items (throttling) are sent again with exponential backoff and full jitter; after ten
/// rounds the delete fails with `unavailable` (what was deleted stays deleted).
#[tracing::instrument(name = "dynamodb.batch_delete", skip_all, fields(table, items = keys.len()))]
pub(crate) async fn delete_keys(db: &Dynamo, table: &str, keys: Vec<Item>) -> Result<()> {
    for chunk in keys.chunks(BATCH_SIZE) {
        let mut pending: Vec<WriteRequest> = chunk
            .iter()
            .map(|key| {
                DeleteRequest::builder()
                    .set_key(Some(key.clone()))
                    .build()
                    .map(|d| WriteRequest::builder().delete_request(d).build())
                    .map_err(|e| Error::internal(format!("delete request: {e}")))
            })
            .collect::<Result<_>>()?;
        let mut round = 0;
        while !pending.is_empty() {
            if round > 0 {
                let cap = 50u64 << round.min(6);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(cap / 2..=cap))).await;
            }
            if round >= MAX_ROUNDS {
                return Err(Error::unavailable(
                    format!(
                        "dynamodb BatchWriteItem on {table}: {} items still unprocessed after {MAX_ROUNDS} rounds",
                        pending.len()
                    ),
                    std::io::Error::other("unprocessed items"),
                ));
            }
            let out = db
                .inner
                .client
                .batch_write_item()
                .request_items(table, std::mem::take(&mut pending))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| map_sdk("BatchWriteItem", table, e))?;
            db.inner.meter.record(out.consumed_capacity(), true);
            pending = out
                .unprocessed_items
                .and_then(|mut u| u.remove(table))
                .unwrap_or_default();
            round += 1;
        }
    }
    Ok(())
}

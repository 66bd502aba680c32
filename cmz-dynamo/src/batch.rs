//! Batched reads and writes: `BatchGetItem` in groups of 100 and `BatchWriteItem` in
//! groups of 25, retrying unprocessed keys and items; all or `unavailable`, never part.

use std::time::Duration;

use aws_sdk_dynamodb::types::{
    DeleteRequest, KeysAndAttributes, PutRequest, ReturnConsumedCapacity, WriteRequest,
};
use cmz_core::{Error, Result};

use crate::attr::Item;
use crate::backend::Dynamo;
use crate::error::map_sdk;

/// Keys per `BatchGetItem`, DynamoDB's limit.
const GET_BATCH_SIZE: usize = 100;

/// Reads the items with these primary `keys` from `table` (consistently), 100 keys per
/// `BatchGetItem`. Unprocessed keys (throttling, response size) are asked for again with
/// exponential backoff and jitter; after ten rounds the read fails with `unavailable`:
/// a caller gets every item that exists, or an error, never a silently shorter list.
/// Missing items are simply absent; order is not kept.
#[tracing::instrument(name = "dynamodb.batch_get", skip_all, fields(table, keys = keys.len()))]
pub(crate) async fn get_all(db: &Dynamo, table: &str, keys: Vec<Item>) -> Result<Vec<Item>> {
    let mut found = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(GET_BATCH_SIZE) {
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(chunk.to_vec()))
                .consistent_read(true)
                .build()
                .map_err(|e| Error::internal("batch keys").with_source(e))?,
        );
        let mut round = 0;
        while let Some(request) = pending.take() {
            if round >= MAX_ROUNDS {
                return Err(Error::unavailable(
                    format!(
                        "dynamodb BatchGetItem on {table}: {} keys still unprocessed after {MAX_ROUNDS} rounds",
                        request.keys().len()
                    ),
                    std::io::Error::other("unprocessed keys"),
                ));
            }
            if round > 0 {
                let cap = 50u64 << round.min(6);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(cap / 2..=cap))).await;
            }
            round += 1;
            let out = db
                .inner
                .client
                .batch_get_item()
                .request_items(table, request)
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| map_sdk("BatchGetItem", table, e))?;
            db.inner.meter.record(out.consumed_capacity(), false);
            if let Some(items) = out.responses.and_then(|mut r| r.remove(table)) {
                found.extend(items);
            }
            pending = out
                .unprocessed_keys
                .and_then(|mut u| u.remove(table))
                .filter(|k| !k.keys().is_empty());
        }
    }
    Ok(found)
}

/// Items per `BatchWriteItem`, DynamoDB's limit.
pub(crate) const BATCH_SIZE: usize = 25;
const MAX_ROUNDS: u32 = 10;

/// Deletes the items with these primary `keys` from `table` (see [`write_all`]).
#[tracing::instrument(name = "dynamodb.batch_delete", skip_all, fields(table, items = keys.len()))]
pub(crate) async fn delete_keys(db: &Dynamo, table: &str, keys: Vec<Item>) -> Result<()> {
    let requests = keys
        .into_iter()
        .map(|key| {
            DeleteRequest::builder()
                .set_key(Some(key))
                .build()
                .map(|d| WriteRequest::builder().delete_request(d).build())
                .map_err(|e| Error::internal("delete request").with_source(e))
        })
        .collect::<Result<Vec<_>>>()?;
    write_all(db, table, requests).await
}

/// Puts these items into `table` unconditionally (see [`write_all`]).
#[tracing::instrument(name = "dynamodb.batch_put", skip_all, fields(table, items = items.len()))]
pub(crate) async fn put_items(db: &Dynamo, table: &str, items: Vec<Item>) -> Result<()> {
    let requests = items
        .into_iter()
        .map(|item| {
            PutRequest::builder()
                .set_item(Some(item))
                .build()
                .map(|p| WriteRequest::builder().put_request(p).build())
                .map_err(|e| Error::internal("put request").with_source(e))
        })
        .collect::<Result<Vec<_>>>()?;
    write_all(db, table, requests).await
}

/// Sends `requests` to `table`, 25 per `BatchWriteItem`. Unprocessed items (throttling)
/// are sent again with exponential backoff and jitter; after ten rounds the write fails
/// with `unavailable` (what was written stays written).
async fn write_all(db: &Dynamo, table: &str, requests: Vec<WriteRequest>) -> Result<()> {
    for chunk in requests.chunks(BATCH_SIZE) {
        let mut pending: Vec<WriteRequest> = chunk.to_vec();
        let mut round = 0;
        while !pending.is_empty() {
            if round >= MAX_ROUNDS {
                return Err(Error::unavailable(
                    format!(
                        "dynamodb BatchWriteItem on {table}: {} items still unprocessed after {MAX_ROUNDS} rounds",
                        pending.len()
                    ),
                    std::io::Error::other("unprocessed items"),
                ));
            }
            if round > 0 {
                let cap = 50u64 << round.min(6);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(cap / 2..=cap))).await;
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

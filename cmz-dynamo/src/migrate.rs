//! Moving legacy conversations (one item with a `messages` list) into the v2 layout.
//!
//! For each legacy conversation the migration
//! 1. writes its messages as turn items at their own positions `1..=n` (a user message and
//!    the reply that follows it share an item), with `BatchWriteItem`. The keys are below
//!    every message cmz has appended since (those start at `n + 1`), and the content and
//!    ids are taken from the legacy item, so writing them again changes nothing;
//! 2. then flips the session to v2 (`legacyCount = 0`, `cmzV = 2`) with a conditional
//!    write. Until this step readers keep using the legacy item, so a run killed at any
//!    point leaves every conversation readable and complete.
//!
//! Progress (the scan position) is kept in the meta table after every page, so a killed
//! run resumes where it stopped; a finished run clears it. A second run finds everything
//! migrated and writes nothing. The legacy items are left in place (for a rollback); a
//! conversation's delete removes them too.

use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use chrono::Utc;
use cmz_core::ids::SessionId;
use cmz_core::types::{Message, NewMessage, Role};
use cmz_core::{Error, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::attr::{Item, Reader, s};
use crate::backend::Dynamo;
use crate::batch::put_items;
use crate::conversations::{legacy_messages, legacy_session, session_item, turn_item};
use crate::error::map_sdk;

const CHECKPOINT: &str = "migration#legacy-conversations";

/// What a migration run does.
#[derive(Debug, Clone)]
pub struct MigrationOptions {
    /// Count what would be migrated; write nothing (not even progress).
    pub dry_run: bool,
    /// Legacy items read per Scan page (and per checkpoint).
    pub page_size: i32,
    /// Draw a progress bar on standard error.
    pub progress: bool,
    /// Wait this long after each page (to go easy on a production table).
    pub pause: Duration,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            page_size: 100,
            progress: false,
            pause: Duration::ZERO,
        }
    }
}

/// What a run found and did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Legacy conversation items read.
    pub scanned: u64,
    /// Conversations moved to v2 by this run (or, in a dry run, that would be).
    pub migrated: u64,
    /// Conversations already in v2 (a previous run, or never legacy).
    pub already_migrated: u64,
    /// Items that were not legacy conversations (no `messages` list, bad ids) and were left alone.
    pub skipped: u64,
    /// Messages copied by this run (or that would be).
    pub messages: u64,
    /// Whether this run continued one that had been stopped.
    pub resumed: bool,
}

/// Migrates every legacy conversation of `db`'s conversation table; see the module docs.
#[tracing::instrument(name = "dynamodb.migrate", skip_all, fields(dry_run = options.dry_run))]
pub async fn migrate_legacy(db: &Dynamo, options: &MigrationOptions) -> Result<MigrationReport> {
    let table = db.inner.tables.conversations.clone();
    let mut report = MigrationReport::default();
    let mut start = if options.dry_run {
        None
    } else {
        load_checkpoint(db).await?
    };
    report.resumed = start.is_some();
    let total = db
        .inner
        .client
        .describe_table()
        .table_name(&table)
        .send()
        .await
        .map_err(|e| map_sdk("DescribeTable", &table, e))?
        .table()
        .and_then(|t| t.item_count())
        .unwrap_or(0);
    let bar = if options.progress {
        let bar =
            ProgressBar::with_draw_target(Some(total.max(0) as u64), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} {bar:30} {pos}/{len} conversations ({per_sec}) {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };
    loop {
        let page = db
            .inner
            .client
            .scan()
            .table_name(&table)
            .limit(options.page_size.clamp(1, 1000))
            .consistent_read(true)
            .set_exclusive_start_key(start.take())
            .return_consumed_capacity(ReturnConsumedCapacity::Total)
            .send()
            .await
            .map_err(|e| map_sdk("Scan", &table, e))?;
        db.inner.meter.record(page.consumed_capacity(), false);
        for item in page.items() {
            report.scanned += 1;
            bar.inc(1);
            match migrate_one(db, item, options.dry_run).await {
                Ok(Some(messages)) => {
                    report.migrated += 1;
                    report.messages += messages;
                }
                Ok(None) => report.already_migrated += 1,
                Err(e) if e.code() == "validation_error" => {
                    tracing::warn!(error = %e, "skipping an item that is not a legacy conversation");
                    report.skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
        bar.set_message(format!(
            "{} migrated, {} already",
            report.migrated, report.already_migrated
        ));
        match page.last_evaluated_key {
            Some(key) if !key.is_empty() => {
                if !options.dry_run {
                    save_checkpoint(db, &key).await?;
                }
                start = Some(key);
                if !options.pause.is_zero() {
                    tokio::time::sleep(options.pause).await;
                }
            }
            _ => break,
        }
    }
    if !options.dry_run {
        clear_checkpoint(db).await?;
    }
    bar.finish_and_clear();
    Ok(report)
}

/// Moves one conversation; `Some(messages copied)`, or `None` if it was already in v2.
async fn migrate_one(db: &Dynamo, legacy: &Item, dry_run: bool) -> Result<Option<u64>> {
    if !matches!(legacy.get("messages"), Some(AttributeValue::L(_))) {
        return Err(Error::validation("messages", "no messages list"));
    }
    let session = legacy_session(legacy)?;
    let id = session.id.clone();
    let messages = legacy_messages(&id, legacy)?;
    let n = messages.len() as u64;
    let store = db.conversations();
    let sessions_table = db.inner.tables.sessions.clone();
    let current = store.load(&id).await?;
    let has_item = current.as_ref().is_some_and(|s| s.has_item);
    let continued = current.as_ref().is_some_and(|s| s.continued);
    if continued && current.as_ref().is_some_and(|s| s.legacy_count == 0) {
        return Ok(None);
    }
    if n == 0 && !has_item && !continued {
        // An empty legacy conversation: only its session needs to exist.
        if dry_run {
            return Ok(Some(0));
        }
    }
    if dry_run {
        return Ok(Some(n));
    }
    write_messages(db, &id, &messages).await?;
    // Step 2: readers switch to the copied items.
    let client = &db.inner.client;
    let result = if continued {
        client
            .update_item()
            .table_name(&sessions_table)
            .key("sessionId", s(id.as_str()))
            .update_expression("SET legacyCount = :zero")
            .condition_expression("legacyCount = :n")
            .expression_attribute_values(":zero", crate::attr::n(0))
            .expression_attribute_values(":n", crate::attr::n(n))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk("UpdateItem", &sessions_table, e))
    } else if has_item {
        client
            .update_item()
            .table_name(&sessions_table)
            .key("sessionId", s(id.as_str()))
            .update_expression(
                "SET cmzV = :v, legacyCount = :zero, messageCount = :n, animalName = if_not_exists(animalName, :name)",
            )
            .condition_expression("attribute_not_exists(cmzV)")
            .expression_attribute_values(":v", s("2"))
            .expression_attribute_values(":zero", crate::attr::n(0))
            .expression_attribute_values(":n", crate::attr::n(n))
            .expression_attribute_values(":name", s(session.animal_name.clone()))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk("UpdateItem", &sessions_table, e))
    } else {
        client
            .put_item()
            .table_name(&sessions_table)
            .set_item(Some(session_item(&session, 0, db.ttl())))
            .condition_expression("attribute_not_exists(sessionId)")
            .send()
            .await
            .map(|_| ())
            .map_err(|e| map_sdk("PutItem", &sessions_table, e))
    };
    match result {
        Ok(()) => Ok(Some(n)),
        // A writer continued the conversation meanwhile: its session now says where the
        // legacy messages are; migrate it again with what it says.
        Err(e) if e.code() == "conflict" => {
            let Some(item) = store.load(&id).await? else {
                return Ok(None);
            };
            if item.continued && item.legacy_count == n {
                Box::pin(migrate_one(db, legacy, false)).await
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(e),
    }
}

/// Writes a legacy conversation's messages as turn items (a user message with the reply
/// that follows it).
async fn write_messages(db: &Dynamo, id: &SessionId, messages: &[Message]) -> Result<()> {
    let mut items = Vec::new();
    let mut i = 0;
    while i < messages.len() {
        let take = if messages[i].role == Role::User
            && messages
                .get(i + 1)
                .is_some_and(|m| m.role == Role::Assistant)
        {
            2
        } else {
            1
        };
        let group: Vec<NewMessage> = messages[i..i + take]
            .iter()
            .map(|m| NewMessage {
                id: m.id.clone(),
                role: m.role,
                content: m.content.clone(),
                created_at: m.created_at,
                metadata: m.metadata.clone(),
            })
            .collect();
        items.push(turn_item(
            id,
            messages[i].seq,
            &group,
            take,
            None,
            db.ttl(),
        )?);
        i += take;
    }
    put_items(db, &db.inner.tables.messages, items).await
}

async fn load_checkpoint(db: &Dynamo) -> Result<Option<Item>> {
    let item = db.get_item(&db.inner.tables.meta, "pk", CHECKPOINT).await?;
    Ok(item.and_then(|item| {
        Reader::new(&item, "checkpoint")
            .opt_str("after")
            .map(|after| {
                [("conversationId".to_owned(), s(after))]
                    .into_iter()
                    .collect()
            })
    }))
}

async fn save_checkpoint(db: &Dynamo, key: &Item) -> Result<()> {
    let Some(after) = Reader::new(key, "scan key").opt_str("conversationId") else {
        return Ok(());
    };
    let meta = &db.inner.tables.meta;
    db.inner
        .client
        .put_item()
        .table_name(meta)
        .item("pk", s(CHECKPOINT))
        .item("after", s(after))
        .item("savedAt", crate::attr::time(Utc::now()))
        .send()
        .await
        .map_err(|e| map_sdk("PutItem", meta, e))?;
    Ok(())
}

async fn clear_checkpoint(db: &Dynamo) -> Result<()> {
    let meta = &db.inner.tables.meta;
    db.inner
        .client
        .delete_item()
        .table_name(meta)
        .key("pk", s(CHECKPOINT))
        .send()
        .await
        .map_err(|e| map_sdk("DeleteItem", meta, e))?;
    Ok(())
}

/// Whether a migration was stopped before it finished (its progress is saved).
pub async fn migration_in_progress(db: &Dynamo) -> Result<bool> {
    Ok(load_checkpoint(db).await?.is_some())
}

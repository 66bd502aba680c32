//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`): the decoders of stored
//! items and the signed cursors, which are otherwise reached only through DynamoDB. Not a
//! public API; nothing here sends a request.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;
use cmz_core::Result;
use cmz_core::ids::SessionId;
use cmz_core::store::Cursor;

use crate::backend::Dynamo;
use crate::config::DynamoSettings;
use crate::conversations as conv;

/// Runs every decoder of stored items on `item`: turn items, legacy conversations,
/// sessions, personas, users, families, refresh tokens, rate counters, usage counters,
/// feedback and review items. Each may answer an error for an item it cannot read; none
/// may panic.
pub fn decode_item(item: &HashMap<String, AttributeValue>) {
    let id = SessionId::new("conv_fuzz_user_00000000").ok();
    if let Some(id) = &id {
        let _ = conv::messages_from_item(id, item);
        let _ = conv::legacy_messages(id, item);
    }
    let _ = conv::item_end(item);
    let _ = conv::legacy_messages_len(item);
    let _ = conv::legacy_session(item);
    let _ = conv::session_from_item(item);
    let _ = crate::personas::persona_from_item(item);
    let _ = crate::DynamoUserStore::user_from(item);
    let _ = crate::DynamoFamilyDirectory::family_from(item);
    let _ = crate::DynamoRevocationStore::record_from(item, "fuzz");
    let _ = crate::auth::count_from(item);
    let _ = crate::care::usage_from(item);
    let _ = crate::care::feedback_from(item);
    let _ = crate::care::review_from(item);
    let _ = crate::attr::to_json(&AttributeValue::M(item.clone()));
}

/// The signed cursors of [`DynamoConversationStore`](crate::DynamoConversationStore),
/// written and read as the store does, with a fixed key and a client that is never used.
#[derive(Debug, Clone)]
pub struct Cursors {
    db: Dynamo,
}

impl Cursors {
    /// Cursors signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let config = aws_sdk_dynamodb::Config::builder()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-west-2"))
            .build();
        let settings = DynamoSettings {
            cursor_secret: Some(secret.to_vec()),
            ..DynamoSettings::default()
        };
        Self {
            db: Dynamo::with_client(aws_sdk_dynamodb::Client::from_conf(config), settings),
        }
    }

    /// A history cursor after message `seq`, the next message in item `key`.
    pub fn history(&self, id: &SessionId, seq: u64, key: u64) -> Result<Cursor> {
        conv::history_cursor(&self.db, id, seq, key)
    }

    /// What the store reads from a history cursor for session `id`: `(seq, key)`.
    pub fn read_history(&self, id: &SessionId, cursor: &Cursor) -> Result<(u64, u64)> {
        conv::read_history_cursor(&self.db, id, cursor)
    }

    /// A session-listing cursor for listing `scope_tag` after session `id` at `at`.
    pub fn sessions(&self, scope_tag: &str, at: &str, id: &SessionId) -> Result<Cursor> {
        conv::sessions_cursor(&self.db, scope_tag, at, id)
    }

    /// What the store reads from a session-listing cursor for `scope_tag`: `(at, id)`.
    pub fn read_sessions(&self, scope_tag: &str, cursor: &Cursor) -> Result<(String, String)> {
        conv::read_sessions_cursor(&self.db, scope_tag, cursor)
    }
}

//! Reading a session and where its messages live: the session item cmz writes, a legacy
//! session item, and the legacy conversation item (one item with a `messages` list), which
//! is read as it is and continued in the messages table.

use super::*;

impl DynamoConversationStore {
    /// Reads a session and where its messages live: the session item, else a legacy
    /// conversation item.
    pub(crate) async fn load(&self, id: &SessionId) -> Result<Option<Stored>> {
        let item = self
            .get_item(self.sessions_table(), "sessionId", id.as_str())
            .await?
            .filter(|item| !is_tombstone(item));
        match item {
            Some(item) => {
                let continued = Reader::new(&item, "session").opt_str("cmzV").is_some();
                let summary_kept = item.contains_key(summary::SUMMARY_THROUGH);
                if continued {
                    let session = session_from_item(&item)?;
                    let legacy_count = Reader::new(&item, "session")
                        .opt_u64("legacyCount")
                        .unwrap_or(0);
                    return Ok(Some(Stored {
                        session,
                        legacy_count,
                        continued,
                        has_item: true,
                        summary_kept,
                    }));
                }
                let mut session = session_from_item(&item)?;
                let legacy = self.legacy_item(id).await?;
                let legacy_count = legacy.as_ref().map_or(0, |l| legacy_messages_len(l) as u64);
                if let Some(legacy) = &legacy {
                    if session.animal_name.is_empty() {
                        session.animal_name = Reader::new(legacy, "conversation")
                            .opt_str("animalName")
                            .unwrap_or_default()
                            .to_owned();
                    }
                }
                session.message_count = legacy_count;
                Ok(Some(Stored {
                    session,
                    legacy_count,
                    continued: false,
                    has_item: true,
                    summary_kept,
                }))
            }
            None => {
                let Some(legacy) = self.legacy_item(id).await? else {
                    return Ok(None);
                };
                let session = legacy_session(&legacy)?;
                let legacy_count = session.message_count;
                Ok(Some(Stored {
                    session,
                    legacy_count,
                    continued: false,
                    has_item: false,
                    summary_kept: false,
                }))
            }
        }
    }

    pub(super) async fn get_item(
        &self,
        table: &str,
        key: &str,
        value: &str,
    ) -> Result<Option<Item>> {
        self.db.get_item(table, key, value).await
    }

    /// The legacy conversation item, if there is one (an item with a `messages` list).
    pub(crate) async fn legacy_item(&self, id: &SessionId) -> Result<Option<Item>> {
        let item = self
            .get_item(self.legacy_table(), "conversationId", id.as_str())
            .await?;
        Ok(item.filter(|i| i.contains_key("messages") || i.contains_key("userId")))
    }

    pub(super) async fn legacy_messages(&self, id: &SessionId) -> Result<Vec<Message>> {
        match self.legacy_item(id).await? {
            Some(item) => legacy_messages(id, &item),
            None => Ok(Vec::new()),
        }
    }
}

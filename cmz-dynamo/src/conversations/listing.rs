//! Listing sessions by user, animal or age through the GSIs, with signed cursors.

use std::collections::HashMap;

use super::*;

/// How a listing's index orders and what it holds.
#[derive(Debug, Clone, Copy)]
pub(super) struct ListingIndex {
    pub(super) name: &'static str,
    /// The index's hash key attribute.
    pub(super) attribute: &'static str,
    /// The index's range key attribute: the time the listing orders by.
    pub(super) order: &'static str,
    /// Whether the index projects only keys, so the sessions are read from the table.
    pub(super) keys_only: bool,
}

/// A user's sessions, newest activity first, from an index holding whole sessions.
pub(super) const BY_USER: ListingIndex = ListingIndex {
    name: USER_INDEX,
    attribute: "userId",
    order: "lastActivity",
    keys_only: false,
};

/// An animal's sessions, newest start first, from an index holding only keys.
pub(super) const BY_ANIMAL: ListingIndex = ListingIndex {
    name: ANIMAL_INDEX,
    attribute: "animalId",
    order: "startTime",
    keys_only: true,
};

/// One listed session: its ordering time, its id, and the session when the index holds it.
struct Listed {
    at: String,
    id: String,
    session: Option<Session>,
}

impl DynamoConversationStore {
    pub(super) async fn session_page(
        &self,
        index: ListingIndex,
        value: &str,
        scope_tag: &str,
        page: PageRequest,
    ) -> Result<Page<Session>> {
        let after = match &page.cursor {
            None => None,
            Some(cursor) => Some(read_sessions_cursor(&self.db, scope_tag, cursor)?),
        };
        let limit = page.effective_limit();
        let table = self.sessions_table();
        let mut out: Vec<Listed> = Vec::new();
        let mut group: Vec<Listed> = Vec::new();
        let mut group_key: Option<String> = None;
        let mut start: Option<Item> = None;
        // Equal times list by id, descending: a group of equal times is sorted whole.
        let flush = |group: &mut Vec<Listed>, out: &mut Vec<Listed>| {
            group.sort_by(|a, b| b.id.cmp(&a.id));
            for listed in group.drain(..) {
                let keep = match &after {
                    None => true,
                    Some((a_at, a_id)) => {
                        listed.at < *a_at || (listed.at == *a_at && listed.id < *a_id)
                    }
                };
                if keep {
                    out.push(listed);
                }
            }
        };
        'pages: loop {
            let mut query = self
                .client()
                .query()
                .table_name(table)
                .index_name(index.name)
                .expression_attribute_names("#k", index.attribute)
                .expression_attribute_values(":k", s(value))
                .scan_index_forward(false)
                .limit(((limit + 1) as i32).max(10))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            query = match &after {
                Some((at, _)) => query
                    .key_condition_expression("#k = :k AND #at <= :at")
                    .expression_attribute_names("#at", index.order)
                    .expression_attribute_values(":at", s(at.clone())),
                None => query.key_condition_expression("#k = :k"),
            };
            let result = query.send().await.map_err(|e| map_sdk("Query", table, e))?;
            self.db
                .inner
                .meter
                .record(result.consumed_capacity(), false);
            for item in result.items() {
                let reader = Reader::new(item, "session");
                let at = reader.str(index.order)?.to_owned();
                let id = reader.str("sessionId")?.to_owned();
                if group_key.as_deref() != Some(at.as_str()) {
                    flush(&mut group, &mut out);
                    if out.len() > limit {
                        break 'pages;
                    }
                    group_key = Some(at.clone());
                }
                let session = (!index.keys_only)
                    .then(|| session_from_item(item))
                    .transpose()?;
                group.push(Listed { at, id, session });
            }
            match result.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => {
                    flush(&mut group, &mut out);
                    break;
                }
            }
        }
        let more = out.len() > limit;
        out.truncate(limit);
        let next = match (more, out.last()) {
            (true, Some(last)) => match SessionId::new(last.id.clone()) {
                Ok(id) => Some(sessions_cursor(&self.db, scope_tag, &last.at, &id)?),
                Err(e) => return Err(Error::internal("a listed session id").with_source(e)),
            },
            _ => None,
        };
        let items = if index.keys_only {
            self.sessions_in_order(&out).await?
        } else {
            out.into_iter()
                .filter_map(|listed| listed.session)
                .collect()
        };
        Ok(Page { items, next })
    }

    /// The session items of `listed`, read from the table in one batch, in `listed`'s
    /// order. A session deleted since the index was read is left out.
    async fn sessions_in_order(&self, listed: &[Listed]) -> Result<Vec<Session>> {
        if listed.is_empty() {
            return Ok(Vec::new());
        }
        let keys = listed
            .iter()
            .map(|l| Item::from([("sessionId".to_owned(), s(l.id.as_str()))]))
            .collect();
        let mut found: HashMap<String, Item> =
            crate::batch::get_all(&self.db, self.sessions_table(), keys)
                .await?
                .into_iter()
                .filter_map(|item| {
                    let id = Reader::new(&item, "session")
                        .str("sessionId")
                        .ok()?
                        .to_owned();
                    Some((id, item))
                })
                .collect();
        listed
            .iter()
            .filter_map(|l| found.remove(&l.id))
            .map(|item| session_from_item(&item))
            .collect()
    }

    /// Session ids from an index, with their start times, for deletes.
    pub(super) async fn index_ids(
        &self,
        index: &'static str,
        attribute: &'static str,
        value: &str,
    ) -> Result<Vec<(SessionId, Option<DateTime<Utc>>)>> {
        let table = self.sessions_table();
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .query()
                .table_name(table)
                .index_name(index)
                .key_condition_expression("#k = :k")
                .expression_attribute_names("#k", attribute)
                .expression_attribute_values(":k", s(value))
                .projection_expression("sessionId, startTime")
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Query", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                let reader = Reader::new(item, "session");
                if let Ok(id) = SessionId::new(reader.str("sessionId")?) {
                    ids.push((id, reader.opt_time("startTime")));
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }

    /// Sessions whose last activity is before `before`: a parallel-free Scan of the
    /// sessions table. The one Scan of this store; it serves retention sweeps (an
    /// administrator's bulk delete), never a user's request.
    pub(super) async fn older_ids(&self, before: DateTime<Utc>) -> Result<Vec<SessionId>> {
        let table = self.sessions_table();
        let mut ids = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client()
                .scan()
                .table_name(table)
                .filter_expression("lastActivity < :t")
                .expression_attribute_values(":t", s(time_string(before)))
                .projection_expression("sessionId, lastActivity")
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| map_sdk("Scan", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                let reader = Reader::new(item, "session");
                // Legacy timestamps may lack the zone or the fraction: compare as times.
                if reader.opt_time("lastActivity").is_some_and(|t| t < before) {
                    if let Ok(id) = SessionId::new(reader.str("sessionId")?) {
                        ids.push(id);
                    }
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => return Ok(ids),
            }
        }
    }
}

//! Listing sessions by user, animal or age through the GSIs, with signed cursors.

use super::*;

impl DynamoConversationStore {
    pub(super) async fn session_page(
        &self,
        index: &'static str,
        attribute: &'static str,
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
        let mut out: Vec<(String, Session)> = Vec::new();
        let mut group: Vec<(String, Session)> = Vec::new();
        let mut group_key: Option<String> = None;
        let mut start: Option<Item> = None;
        let flush = |group: &mut Vec<(String, Session)>, out: &mut Vec<(String, Session)>| {
            group.sort_by(|a, b| b.1.id.cmp(&a.1.id));
            for (at, session) in group.drain(..) {
                let keep = match &after {
                    None => true,
                    Some((a_at, a_id)) => {
                        at < *a_at || (at == *a_at && session.id.as_str() < a_id.as_str())
                    }
                };
                if keep {
                    out.push((at, session));
                }
            }
        };
        'pages: loop {
            let mut query = self
                .client()
                .query()
                .table_name(table)
                .index_name(index)
                .expression_attribute_names("#k", attribute)
                .expression_attribute_values(":k", s(value))
                .scan_index_forward(false)
                .limit(((limit + 1) as i32).max(10))
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .set_exclusive_start_key(start.take());
            query = match &after {
                Some((at, _)) => query
                    .key_condition_expression("#k = :k AND lastActivity <= :at")
                    .expression_attribute_values(":at", s(at.clone())),
                None => query.key_condition_expression("#k = :k"),
            };
            let result = query.send().await.map_err(|e| map_sdk("Query", table, e))?;
            self.db
                .inner
                .meter
                .record(result.consumed_capacity(), false);
            for item in result.items() {
                let at = Reader::new(item, "session").str("lastActivity")?.to_owned();
                if group_key.as_deref() != Some(at.as_str()) {
                    flush(&mut group, &mut out);
                    if out.len() > limit {
                        break 'pages;
                    }
                    group_key = Some(at.clone());
                }
                group.push((at, session_from_item(item)?));
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
            (true, Some((at, session))) => {
                Some(sessions_cursor(&self.db, scope_tag, at, &session.id)?)
            }
            _ => None,
        };
        Ok(Page {
            items: out.into_iter().map(|(_, s)| s).collect(),
            next,
        })
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

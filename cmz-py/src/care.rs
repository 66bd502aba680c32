//! `Conversations`' methods for cost and care (feedback, the review queue, usage, budgets)
//! and for parents' exports: a second `#[pymethods]` block of the same class.

// Python methods take their keyword arguments one by one.
#![allow(clippy::too_many_arguments)]

use cmz_core::care::{ReviewState, Vote};
use cmz_core::ids::{MessageId, SessionId, UserId};
use cmz_core::service::{ExportFormat, ExportItem, ExportRange, ExportWriter, UsageGrouping};
use cmz_core::{Error, Result};
use pyo3::prelude::*;
use serde_json::{Value, json};

use crate::conversations::Conversations;
use crate::convert::*;
use crate::principal::Principal;

#[pymethods]
impl Conversations {
    /// Gives a thumbs up (`vote="up"`) or down (`"down"`) on one of the animal's replies in a
    /// session the principal may read, with an optional note (at most 500 characters;
    /// personal details taken out). One vote per user and message: a second replaces the
    /// first; a thumbs down puts the reply in the staff review queue. Returns the stored
    /// vote (`userId`, `sessionId`, `messageId`, `seq`, `vote`, `note`, `animalId`,
    /// `persona`, `model`, `at`, ...).
    #[pyo3(signature = (principal, session_id, message_id, vote, *, note=None))]
    fn feedback(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
        message_id: String,
        vote: &str,
        note: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let vote: Vote = vote.parse().map_err(crate::errors::to_py)?;
        let session = id(SessionId::new, session_id)?;
        let message = id(MessageId::new, message_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            to_json(
                &state
                    .conversations()
                    .give_feedback(&principal, &session, &message, vote, note)
                    .await?,
            )
        })
    }

    /// The principal's own vote on a reply, or `None`.
    fn my_feedback(
        &self,
        py: Python<'_>,
        principal: &Principal,
        session_id: String,
        message_id: String,
    ) -> PyResult<Py<PyAny>> {
        let session = id(SessionId::new, session_id)?;
        let message = id(MessageId::new, message_id)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            to_json(
                &state
                    .conversations()
                    .my_feedback(&principal, &session, &message)
                    .await?,
            )
        })
    }

    /// Staff: a page of the review queue, newest first (`state` `"open"` or `"reviewed"`):
    /// `{"items": [...], "nextCursor": str | None}`.
    #[pyo3(signature = (principal, *, state="open", limit=20, cursor=None))]
    fn review_queue(
        &self,
        py: Python<'_>,
        principal: &Principal,
        state: &str,
        limit: i128,
        cursor: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let review_state: ReviewState = state.parse().map_err(crate::errors::to_py)?;
        let page = page(limit, cursor)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            let listed = state
                .conversations()
                .review_queue(&principal, review_state, page)
                .await?;
            Ok(json!({
                "items": to_json(&listed.items)?,
                "nextCursor": listed.next.map(|c| c.as_str().to_owned()),
            }))
        })
    }

    /// Staff: one queue item and up to `around` messages on each side of it (audited):
    /// `{"item": {...}, "messages": [...]}`.
    #[pyo3(signature = (principal, item_id, *, around=3))]
    fn review_item(
        &self,
        py: Python<'_>,
        principal: &Principal,
        item_id: String,
        around: i128,
    ) -> PyResult<Py<PyAny>> {
        let around = usize::try_from(around)
            .ok()
            .filter(|a| *a <= 20)
            .ok_or_else(|| {
                crate::errors::to_py(Error::validation(
                    "around",
                    format!("around must be from 0 to 20, got {around}"),
                ))
            })?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            let opened = state
                .conversations()
                .review_item(&principal, &item_id, around)
                .await?;
            Ok(json!({
                "item": to_json(&opened.item)?,
                "messages": opened.messages.iter().map(message_json).collect::<Result<Vec<_>>>()?,
            }))
        })
    }

    /// Staff: marks an open queue item reviewed, with an optional note (audited); returns
    /// the item with its `review`.
    #[pyo3(signature = (principal, item_id, *, note=None))]
    fn mark_reviewed(
        &self,
        py: Python<'_>,
        principal: &Principal,
        item_id: String,
        note: Option<String>,
    ) -> PyResult<Py<PyAny>> {
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            to_json(
                &state
                    .conversations()
                    .mark_reviewed(&principal, &item_id, note)
                    .await?,
            )
        })
    }

    /// Administrators: tokens, turns and fallbacks of the UTC days `start..=end`
    /// (`YYYY-MM-DD`, default today), grouped by `group_by` (comma-separated `day`,
    /// `family`, `user`, `animal`, `model`): `{"from", "to", "rows": [...], "total": {...}}`.
    /// With `csv=True` the report as CSV text instead.
    #[pyo3(signature = (principal, *, start=None, end=None, group_by="day", csv=false))]
    fn usage(
        &self,
        py: Python<'_>,
        principal: &Principal,
        start: Option<String>,
        end: Option<String>,
        group_by: &str,
        csv: bool,
    ) -> PyResult<Py<PyAny>> {
        let day =
            |field: &'static str, value: Option<String>, default: chrono::NaiveDate| match value
                .filter(|v| !v.is_empty())
            {
                None => Ok(default),
                Some(v) => chrono::NaiveDate::parse_from_str(&v, "%Y-%m-%d").map_err(|_| {
                    crate::errors::to_py(Error::validation(
                        field,
                        format!("{field} must be a date (YYYY-MM-DD), got {v:?}"),
                    ))
                }),
            };
        let to = day("end", end, chrono::Utc::now().date_naive())?;
        let from = day("start", start, to)?;
        let grouping: UsageGrouping = group_by.parse().map_err(crate::errors::to_py)?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            let report = state
                .conversations()
                .usage_report(&principal, from, to, grouping)
                .await?;
            if csv {
                Ok(Value::String(report.to_csv()))
            } else {
                to_json(&report)
            }
        })
    }

    /// Where the principal's daily token budgets stand (a list of `{scope, budget, used,
    /// resetsAt}`; empty without budgets).
    fn budgets(&self, py: Python<'_>, principal: &Principal) -> PyResult<Py<PyAny>> {
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            to_json(&state.conversations().budget_status(&principal).await?)
        })
    }

    /// Writes an export of conversations to the file at `path`, a page at a time: a
    /// parent's family (`parent_user_id`, or nothing for a parent), one user's
    /// (`user_id`), or the caller's own; sessions with activity between `start` and `end`
    /// (RFC 3339); `format` `json` or `html` (a printable page). Audited. Returns
    /// `{"sessions": n, "messages": n, "path": path}`.
    #[pyo3(signature = (principal, path, *, parent_user_id=None, user_id=None, start=None, end=None, format="json"))]
    fn export(
        &self,
        py: Python<'_>,
        principal: &Principal,
        path: std::path::PathBuf,
        parent_user_id: Option<String>,
        user_id: Option<String>,
        start: Option<String>,
        end: Option<String>,
        format: &str,
    ) -> PyResult<Py<PyAny>> {
        let format = match format {
            "json" => ExportFormat::Json,
            "html" => ExportFormat::Html,
            other => {
                return Err(crate::errors::to_py(Error::validation(
                    "format",
                    format!("format must be json or html, got {other:?}"),
                )));
            }
        };
        let range = ExportRange {
            from: date("start", start)?,
            to: date("end", end)?,
        };
        let parent = parent_user_id.map(|p| id(UserId::new, p)).transpose()?;
        let user = user_id.map(|u| id(UserId::new, u)).transpose()?;
        let (state, principal) = (self.state.clone(), principal.inner.clone());
        sync_value(py, async move {
            use futures::StreamExt as _;
            use std::io::Write as _;
            let mut items = state.export(&principal, parent, user, range).await?;
            let io = |e: std::io::Error| Error::unavailable("export file", e);
            let mut file = std::io::BufWriter::new(std::fs::File::create(&path).map_err(io)?);
            let mut writer = ExportWriter::new(format, range);
            let (mut sessions, mut messages) = (0u64, 0u64);
            file.write_all(writer.begin().as_bytes()).map_err(io)?;
            while let Some(item) = items.next().await {
                let item = item?;
                match &item {
                    ExportItem::Session(_) => sessions += 1,
                    ExportItem::Message(_) => messages += 1,
                }
                file.write_all(writer.item(&item).as_bytes()).map_err(io)?;
            }
            file.write_all(writer.end().as_bytes()).map_err(io)?;
            file.flush().map_err(io)?;
            Ok(json!({"sessions": sessions, "messages": messages, "path": path.to_string_lossy()}))
        })
    }
}

/// An RFC 3339 date-time argument, or `validation_error` naming it.
fn date(
    field: &'static str,
    value: Option<String>,
) -> PyResult<Option<chrono::DateTime<chrono::Utc>>> {
    value
        .filter(|v| !v.is_empty())
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(&v)
                .map(|d| d.with_timezone(&chrono::Utc))
                .map_err(|_| {
                    crate::errors::to_py(Error::validation(
                        field,
                        format!("{field} must be an RFC 3339 date-time"),
                    ))
                })
        })
        .transpose()
}

//! Exports of conversations for the people they belong to: a parent's copy of their
//! children's conversations, as JSON for machines or a printable HTML page, streamed a
//! page at a time so a long history never sits whole in memory.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

use super::*;

/// Messages read from the store at a time while exporting.
const EXPORT_PAGE: usize = 200;

/// Which conversations an export holds: those with activity in `from..=to`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportRange {
    /// Sessions whose last activity is before this are left out.
    pub from: Option<DateTime<Utc>>,
    /// Sessions that started after this are left out.
    pub to: Option<DateTime<Utc>>,
}

impl ExportRange {
    fn holds(&self, session: &Session) -> bool {
        self.from.is_none_or(|from| session.last_activity >= from)
            && self.to.is_none_or(|to| session.started_at <= to)
    }
}

/// How an export is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExportFormat {
    /// One JSON document: `{exportedAt, from, to, sessions: [{session, messages}]}`.
    Json,
    /// A printable HTML page, one section per conversation.
    Html,
}

impl ExportFormat {
    /// The media type (`application/json`, `text/html; charset=utf-8`).
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Html => "text/html; charset=utf-8",
        }
    }
}

/// One piece of an export, in order: each session, then its messages oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportItem {
    /// A conversation begins.
    Session(Box<Session>),
    /// One of its messages.
    Message(Box<Message>),
}

impl ConversationService {
    /// The conversations of `owners` in `range`, as a stream of items: each session (newest
    /// activity first, owner by owner) followed by its messages. Every owner passes the
    /// access policy before anything of theirs is read (a parent reads their family's
    /// students, an admin anyone's; `forbidden` otherwise), and each owner's export is
    /// audited with its counts. The policy is asked for every owner before the stream
    /// begins, so a refusal is an error here, not a broken stream.
    pub async fn export(
        &self,
        principal: &Principal,
        owners: Vec<UserId>,
        range: ExportRange,
    ) -> Result<BoxStream<'static, Result<ExportItem>>> {
        for owner in &owners {
            self.inner
                .policy
                .authorize(principal, Action::Read, owner)
                .await?;
        }
        let service = self.clone();
        let principal = principal.clone();
        let (tx, rx) = mpsc::channel::<Result<ExportItem>>(64);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(Error::internal("an export needs a tokio runtime"));
        };
        runtime.spawn(
            async move {
                for owner in owners {
                    if let Err(error) = service.export_owner(&principal, &owner, range, &tx).await {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                }
            }
            .in_current_span(),
        );
        Ok(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed())
    }

    async fn export_owner(
        &self,
        principal: &Principal,
        owner: &UserId,
        range: ExportRange,
        tx: &mpsc::Sender<Result<ExportItem>>,
    ) -> Result<()> {
        // The policy was asked for every owner before the stream began (`export`): asking
        // again would only audit an administrator's export twice.
        let inner = &self.inner;
        let store = &inner.store;
        let (mut sessions, mut messages) = (0u64, 0u64);
        let mut listing = crate::store::paged(|cursor| {
            store.list_sessions(
                SessionScope::User(owner.clone()),
                PageRequest { limit: 100, cursor },
            )
        });
        'sessions: while let Some(session) = listing.next().await {
            let session = session?;
            if !range.holds(&session) {
                continue;
            }
            let id = session.id.clone();
            sessions += 1;
            if tx
                .send(Ok(ExportItem::Session(Box::new(session))))
                .await
                .is_err()
            {
                break; // the reader went away
            }
            let mut history = crate::store::paged(|cursor| {
                store.history(
                    &id,
                    PageRequest {
                        limit: EXPORT_PAGE,
                        cursor,
                    },
                )
            });
            while let Some(message) = history.next().await {
                let message = message?;
                messages += 1;
                if tx
                    .send(Ok(ExportItem::Message(Box::new(message))))
                    .await
                    .is_err()
                {
                    break 'sessions;
                }
            }
        }
        if let Some(audit) = &inner.audit {
            let mut event = AuditEvent::new(
                AuditKind::Export,
                AuditOutcome::Allowed,
                format!("export: {sessions} sessions, {messages} messages"),
            );
            event.actor = Some(principal.user_id.clone());
            event.actor_role = Some(principal.role);
            event.subject = Some(owner.clone());
            audit.record(event).await;
        }
        Ok(())
    }
}

/// Writes an export's items as text, piece by piece (what an HTTP body or a file gets).
///
/// ```
/// use cmz_core::service::{ExportFormat, ExportWriter};
///
/// let mut writer = ExportWriter::new(ExportFormat::Json, Default::default());
/// let mut out = writer.begin();
/// out.push_str(&writer.end());
/// let json: serde_json::Value = serde_json::from_str(&out).unwrap();
/// assert_eq!(json["sessions"], serde_json::json!([]));
/// ```
#[derive(Debug)]
pub struct ExportWriter {
    format: ExportFormat,
    range: ExportRange,
    in_session: bool,
    sessions: u64,
    messages_in_session: u64,
}

impl ExportWriter {
    /// A writer of `format` for an export of `range`.
    pub fn new(format: ExportFormat, range: ExportRange) -> Self {
        Self {
            format,
            range,
            in_session: false,
            sessions: 0,
            messages_in_session: 0,
        }
    }

    /// The text before the first item.
    pub fn begin(&self) -> String {
        let now = Utc::now();
        match self.format {
            ExportFormat::Json => format!(
                "{{\"exportedAt\":{},\"from\":{},\"to\":{},\"sessions\":[",
                json(&now),
                json(&self.range.from),
                json(&self.range.to)
            ),
            ExportFormat::Html => format!(
                "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Conversations with the zoo's animals</title>\
<style>body{{font-family:sans-serif;max-width:48rem;margin:2rem auto;color:#222}}section{{break-inside:avoid-page;border-top:1px solid #999;margin-top:1.5rem}}\
.user{{margin:.4rem 0}}.assistant{{margin:.4rem 0 .4rem 1.5rem;color:#234}}.when{{color:#666;font-size:.8rem}}@media print{{body{{margin:0}}}}</style></head>\
<body><h1>Conversations with the zoo's animals</h1><p class=\"when\">Exported {}{}</p>\n",
                now.format("%Y-%m-%d %H:%M UTC"),
                match (self.range.from, self.range.to) {
                    (None, None) => String::new(),
                    (from, to) => format!(
                        "; conversations from {} to {}",
                        from.map_or("the start".into(), |d| d.format("%Y-%m-%d").to_string()),
                        to.map_or("now".into(), |d| d.format("%Y-%m-%d").to_string())
                    ),
                }
            ),
        }
    }

    /// The text of one item.
    pub fn item(&mut self, item: &ExportItem) -> String {
        let mut out = String::new();
        match item {
            ExportItem::Session(session) => {
                out.push_str(self.close_session());
                self.in_session = true;
                self.messages_in_session = 0;
                let first = self.sessions == 0;
                self.sessions += 1;
                match self.format {
                    ExportFormat::Json => {
                        if !first {
                            out.push(',');
                        }
                        let _ = write!(out, "{{\"session\":{},\"messages\":[", json(session));
                    }
                    ExportFormat::Html => {
                        let _ = writeln!(
                            out,
                            "<section><h2>{}</h2><p class=\"when\">{} to {} · {} messages · {}</p>",
                            html(&session.animal_name),
                            session.started_at.format("%Y-%m-%d %H:%M UTC"),
                            session.last_activity.format("%Y-%m-%d %H:%M UTC"),
                            session.message_count,
                            html(session.user_id.as_str()),
                        );
                    }
                }
            }
            ExportItem::Message(message) => {
                let first = self.messages_in_session == 0;
                self.messages_in_session += 1;
                match self.format {
                    ExportFormat::Json => {
                        if !first {
                            out.push(',');
                        }
                        out.push_str(&json(message));
                    }
                    ExportFormat::Html => {
                        let (class, who) = match message.role {
                            Role::User => ("user", "Visitor"),
                            _ => ("assistant", "Animal"),
                        };
                        let _ = writeln!(
                            out,
                            "<p class=\"{class}\"><strong>{who}:</strong> {} <span class=\"when\">{}</span></p>",
                            html(&message.content),
                            message.created_at.format("%H:%M"),
                        );
                    }
                }
            }
        }
        out
    }

    fn close_session(&mut self) -> &'static str {
        if !std::mem::take(&mut self.in_session) {
            return "";
        }
        match self.format {
            ExportFormat::Json => "]}",
            ExportFormat::Html => "</section>\n",
        }
    }

    /// The text after the last item.
    pub fn end(&mut self) -> String {
        let mut out = self.close_session().to_owned();
        match self.format {
            ExportFormat::Json => out.push_str("]}"),
            ExportFormat::Html => {
                if self.sessions == 0 {
                    out.push_str("<p>No conversations.</p>\n");
                }
                out.push_str("</body></html>\n");
            }
        }
        out
    }
}

fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

/// `text` safe inside HTML element content and attribute values.
fn html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

//! The conversation store: sessions and their messages.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::ids::{AnimalId, SessionId, UserId};
use crate::types::{Message, NewMessage, RollingSummary, Session};

/// The largest page a store returns; larger `limit`s are clamped to it.
pub const MAX_PAGE_SIZE: usize = 1000;

/// How long a store remembers a delete for the appends that began before it (see
/// *Deletes are final* in [`ConversationStore`]): an hour, far longer than any turn runs
/// (the engine gives a model call 30 seconds by default, and a streamed reply that long
/// between chunks). Stores may forget a delete after this; they may also keep it longer.
pub const TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(60 * 60);

/// An opaque position in a listing, handed back to continue where a page ended.
///
/// Callers treat it as an opaque string. A cursor a store did not make (edited, truncated,
/// from another listing) is rejected with `validation_error`; it never widens what a caller
/// may read.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Cursor(String);

impl Cursor {
    /// Wraps a cursor string received from a client (validated by the store that reads it).
    pub fn from_client(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The string to hand to clients.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Encodes backend-specific position `parts` under a `kind` tag. For store implementers.
    pub fn encode(kind: &str, parts: &[&str]) -> Self {
        let mut raw = String::from(kind);
        for part in parts {
            raw.push('\n');
            raw.push_str(part);
        }
        Self(URL_SAFE_NO_PAD.encode(raw))
    }

    /// Decodes a cursor made by [`Cursor::encode`] with the same `kind` and `n` parts.
    /// For store implementers; anything else is a `validation_error`.
    pub fn decode(&self, kind: &str, n: usize) -> Result<Vec<String>> {
        let invalid = || Error::validation("cursor", "invalid or expired cursor");
        let bytes = URL_SAFE_NO_PAD.decode(&self.0).map_err(|_| invalid())?;
        let raw = String::from_utf8(bytes).map_err(|_| invalid())?;
        let mut parts = raw.split('\n');
        if parts.next() != Some(kind) {
            return Err(invalid());
        }
        let parts: Vec<String> = parts.map(str::to_owned).collect();
        if parts.len() != n {
            return Err(invalid());
        }
        Ok(parts)
    }
}

impl Debug for Cursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Cursor({})", self.0)
    }
}

/// Which page of a listing to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    /// At most this many items (1 to [`MAX_PAGE_SIZE`]; larger values are clamped).
    pub limit: usize,
    /// Where the previous page ended; `None` for the first page.
    pub cursor: Option<Cursor>,
}

impl PageRequest {
    /// The first page of at most `limit` items.
    pub fn first(limit: usize) -> Self {
        Self {
            limit,
            cursor: None,
        }
    }

    /// The page after `cursor`.
    pub fn after(limit: usize, cursor: Cursor) -> Self {
        Self {
            limit,
            cursor: Some(cursor),
        }
    }

    /// The limit clamped to `1..=MAX_PAGE_SIZE`.
    pub fn effective_limit(&self) -> usize {
        self.limit.clamp(1, MAX_PAGE_SIZE)
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    /// The items, in the listing's order.
    pub items: Vec<T>,
    /// Where to continue; `None` when this was the last page.
    pub next: Option<Cursor>,
}

/// Whose sessions to list, and so in which order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionScope {
    /// Sessions of one user, newest activity first (what a user and their parent see).
    User(UserId),
    /// Sessions with one animal, newest **start** first: a staff listing, ordered by when
    /// each session began so that a turn never moves it (keeping an index in activity
    /// order costs a write on every turn; see cmz-dynamo's cost figures).
    Animal(AnimalId),
}

/// What to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteScope {
    /// One session and its messages.
    Session(SessionId),
    /// Every session of a user.
    User(UserId),
    /// Every session with an animal.
    Animal(AnimalId),
    /// Every session whose last activity is strictly before this instant.
    OlderThan(DateTime<Utc>),
}

/// What a delete removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteReport {
    /// Sessions removed.
    pub sessions: u64,
    /// Messages removed.
    pub messages: u64,
}

/// One atomic append: the messages of a turn, guarded by the sequence they expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnAppend {
    /// The session appended to.
    pub session_id: SessionId,
    /// The session's `message_count` the writer saw; the append fails with `conflict` if
    /// another append happened since.
    pub expected_count: u64,
    /// One or two messages (user, then assistant) stored as `expected_count + 1, + 2`.
    pub messages: Vec<NewMessage>,
    /// The client's idempotency key for this turn, recorded with it.
    pub turn_key: Option<String>,
    /// Creates the session in the same atomic step (its `message_count` must be 0 and
    /// `expected_count` 0), so a session never exists without its first message.
    pub new_session: Option<Session>,
    /// When the turn began, before it read the session it appends to. A delete of the
    /// session, or of its user's sessions, at or after this instant refuses the append
    /// (*Deletes are final*). An append that depends on no earlier read uses `Utc::now()`.
    pub began_at: DateTime<Utc>,
}

impl TurnAppend {
    /// What every store checks before it writes: at least one message, each valid, and a
    /// new session that starts empty with the append's id (`validation_error` otherwise).
    pub fn validate(&self) -> Result<()> {
        if self.messages.is_empty() {
            return Err(Error::validation(
                "messages",
                "an append needs at least one message",
            ));
        }
        for message in &self.messages {
            message.validate()?;
        }
        if let Some(session) = &self.new_session {
            if session.id != self.session_id
                || self.expected_count != 0
                || session.message_count != 0
            {
                return Err(Error::validation(
                    "session",
                    "a new session starts empty, with the append's id",
                ));
            }
        }
        Ok(())
    }
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The messages were stored; here they are with their sequence numbers.
    Appended(Vec<Message>),
    /// The turn key was already recorded: nothing was written; here is the earlier turn.
    Duplicate(Vec<Message>),
}

/// Stores sessions and their messages.
///
/// # Contract
/// Every implementation guarantees, and `cmz_core::testing` checks:
/// - **Sessions**: `create_session` stores a new session and fails with `conflict` if the id
///   exists; `get_session` returns `None` for an unknown id.
/// - **Atomic, guarded appends**: `append_turn` stores all of its messages or none. It
///   succeeds only if the session's `message_count` equals `expected_count`; otherwise it
///   fails with `conflict` and writes nothing. Messages get consecutive sequence numbers
///   from `expected_count + 1`; `message_count` and `last_activity` are updated in the same
///   atomic step. An unknown session is `not_found`; content over
///   [`MAX_CONTENT_BYTES`](crate::types::MAX_CONTENT_BYTES) or a system message is
///   `validation_error` and writes nothing.
/// - **Creation with the first turn**: with `new_session` set, the session and the
///   messages are stored together or not at all; if the session already exists the append
///   fails with `conflict` (or is a duplicate, below).
/// - **Idempotency**: an append whose `turn_key` is already recorded for the session writes
///   nothing and returns [`AppendOutcome::Duplicate`] with the messages of the first append,
///   whatever its `expected_count`. `find_turn` returns them too.
/// - **Windows**: `recent_messages(id, n)` returns the last `n` messages, oldest first, at a
///   cost that does not grow with the length of the session.
/// - **History**: `history` pages through all messages oldest first. A cursor stays valid
///   while messages are appended (appends show up on later pages, nothing is repeated or
///   skipped). Malformed or foreign cursors are `validation_error`.
/// - **Listing**: `list_sessions` returns the scope's sessions newest `last_activity` first
///   (ties broken by id, descending). A cursor is a position in that order: later pages
///   never repeat a session, but a session that gets a turn while a client pages moves to
///   the top and is not seen again until a fresh listing.
/// - **Deletes**: a deleted session and its messages are gone for every method; deleting
///   nothing is not an error (an empty report).
/// - **Deletes are final**: a turn that began before a delete cannot write back what the
///   delete removed, whichever process runs it. An append whose `began_at` is not after
///   the delete of its session stores nothing and fails with `not_found`, even when a
///   session with that id exists again by then (created by an append that began after the
///   delete); and an append with `new_session` whose `began_at` is not after a
///   [`DeleteScope::User`] delete of that session's user stores nothing and fails with
///   `not_found`. Appends that began after the delete are stored as usual (the user may
///   start again, the same id may be used again). A store remembers deletes for at least
///   [`TOMBSTONE_TTL`]; comparing `began_at` with a delete may use the clocks of two
///   processes, so they are expected to agree to well within a second.
/// - **Errors**: a backend failure is `unavailable` (or `timeout`) with the backend's error
///   as its source; never a panic, never a half-written turn.
/// - Every method may be called concurrently from many tasks.
#[async_trait]
pub trait ConversationStore: Debug + Send + Sync + 'static {
    /// Stores a new session (usually with `message_count` 0).
    async fn create_session(&self, session: &Session) -> Result<()>;

    /// Reads a session.
    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>>;

    /// Appends a turn's messages atomically under the sequence guard.
    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome>;

    /// The messages recorded for `turn_key` in a session, if any.
    async fn find_turn(&self, id: &SessionId, turn_key: &str) -> Result<Option<Vec<Message>>>;

    /// The last `limit` messages of a session, oldest first.
    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>>;

    /// A page of a session's messages, oldest first.
    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>>;

    /// A page of sessions in the scope's order: a user's newest activity first, an
    /// animal's newest start first; equal times by id, descending.
    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>>;

    /// Up to `limit` messages of a session with `seq > after`, oldest first (the turns a
    /// rolling summary has not covered yet).
    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>>;

    /// Sets (or replaces) a session's summary; `not_found` for an unknown session.
    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()>;

    /// Stores a session's rolling summary if it covers more than the one stored (its
    /// `through` is greater): `true` when stored, `false` when the stored one already
    /// covers as much (another writer got there first). `not_found` for an unknown session.
    async fn set_rolling_summary(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool>;

    /// Sets (or replaces) the external thread id kept with a session (the legacy
    /// `store_thread_id`); `not_found` for an unknown session.
    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()>;

    /// Deletes sessions and their messages.
    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport>;
}

/// A shared, type-erased conversation store.
pub type DynConversationStore = Arc<dyn ConversationStore>;

/// Conveniences on every [`ConversationStore`] (a blanket implementation: nothing to
/// implement).
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use cmz_core::memory::InMemoryConversationStore;
/// use cmz_core::store::{ConversationStore, ConversationStoreExt};
/// use cmz_core::types::Session;
/// use cmz_core::ids::{AnimalId, SessionId, UserId};
/// use futures::TryStreamExt as _;
///
/// let store = InMemoryConversationStore::new();
/// let id = SessionId::new("conv_lion_u1_0a1b2c3d").unwrap();
/// assert_eq!(store.require_session(&id).await.unwrap_err().code(), "not_found");
/// let session = Session::new(id.clone(), UserId::new("u1").unwrap(), AnimalId::new("lion").unwrap(), "Leo");
/// store.create_session(&session).await.unwrap();
/// assert_eq!(store.require_session(&id).await.unwrap().id, id);
/// let messages: Vec<cmz_core::types::Message> =
///     store.history_stream(&id, 50).try_collect().await.unwrap();
/// assert!(messages.is_empty());
/// # });
/// ```
#[async_trait]
pub trait ConversationStoreExt: ConversationStore {
    /// The session, or `not_found` naming it.
    async fn require_session(&self, id: &SessionId) -> Result<Session> {
        self.get_session(id)
            .await?
            .ok_or_else(|| Error::not_found(format!("session {id}")))
    }

    /// Every message of a session, oldest first, read `page_size` at a time (so a long
    /// history never sits whole in memory). Ends at the first error.
    fn history_stream<'a>(
        &'a self,
        id: &'a SessionId,
        page_size: usize,
    ) -> futures::stream::BoxStream<'a, Result<Message>>
    where
        Self: Sized,
    {
        paged(move |cursor| {
            self.history(
                id,
                PageRequest {
                    limit: page_size,
                    cursor,
                },
            )
        })
    }

    /// Every session in `scope`, in the listing's order, read `page_size` at a time.
    fn sessions_stream<'a>(
        &'a self,
        scope: SessionScope,
        page_size: usize,
    ) -> futures::stream::BoxStream<'a, Result<Session>>
    where
        Self: Sized,
    {
        paged(move |cursor| {
            self.list_sessions(
                scope.clone(),
                PageRequest {
                    limit: page_size,
                    cursor,
                },
            )
        })
    }
}

impl<T: ConversationStore + ?Sized> ConversationStoreExt for T {}

/// The items of every page `read` returns, following each page's cursor to the end.
pub fn paged<'a, T, F, Fut>(read: F) -> futures::stream::BoxStream<'a, Result<T>>
where
    T: Send + 'a,
    F: Fn(Option<Cursor>) -> Fut + Send + 'a,
    Fut: std::future::Future<Output = Result<Page<T>>> + Send + 'a,
{
    use futures::StreamExt as _;
    enum State {
        Next(Option<Cursor>),
        Done,
    }
    futures::stream::try_unfold((State::Next(None), read), |(state, read)| async move {
        let State::Next(cursor) = state else {
            return Ok(None);
        };
        let page = read(cursor).await?;
        let state = page
            .next
            .map_or(State::Done, |next| State::Next(Some(next)));
        Ok(Some((
            futures::stream::iter(page.items.into_iter().map(Ok)),
            (state, read),
        )))
    })
    .map(|pages: Result<_>| match pages {
        Ok(items) => items.left_stream(),
        Err(error) => futures::stream::once(async move { Err(error) }).right_stream(),
    })
    .flatten()
    .boxed()
}

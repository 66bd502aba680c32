// foldhash: several lookups per turn, keyed by ids; seeded per process like std's.
use foldhash::HashMap;
use foldhash::fast::RandomState;
use std::collections::BTreeSet;
use std::hash::BuildHasher as _;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::error::{Error, Result};
use crate::ids::{AnimalId, SessionId, UserId};
use crate::store::{
    AppendOutcome, ConversationStore, Cursor, DeleteReport, DeleteScope, Page, PageRequest,
    SessionScope, TOMBSTONE_TTL, TurnAppend,
};
use crate::types::{Message, RollingSummary, Session};

use super::log::MessageLog;

const HISTORY_CURSOR: &str = "mem-history-v1";
const SESSIONS_CURSOR: &str = "mem-sessions-v1";

/// Lock shards: sessions are spread over this many independently locked maps, so turns on
/// different sessions rarely wait for each other and no single map grows so large that
/// growing it stalls every request.
const SHARDS: usize = 32;

/// Sessions and messages held in memory (the embedded default).
///
/// Each session lives in one of 32 locked shards, so every single-session method
/// is atomic; listings and bulk deletes visit every shard. No lock is held across an
/// `.await`. Windows and appends cost the same whatever the length of the session.
/// Deletes are remembered for [`TOMBSTONE_TTL`], so turns that began before them cannot
/// write back what they removed (the store's contract; several services may share it).
#[derive(Debug)]
pub struct InMemoryConversationStore {
    shards: Box<[RwLock<State>]>,
    hasher: RandomState,
    /// Users whose sessions were deleted, and when. Locked after a shard (never before).
    deleted_users: Mutex<HashMap<UserId, DateTime<Utc>>>,
}

impl Default for InMemoryConversationStore {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(State::default())).collect(),
            hasher: RandomState::default(),
            deleted_users: Mutex::default(),
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Boxed, so growing the map moves pointers, not whole entries.
    sessions: HashMap<SessionId, Box<Entry>>,
    by_user: HashMap<UserId, ByStart>,
    by_animal: HashMap<AnimalId, ByStart>,
    /// Deleted sessions of this shard, and when.
    deleted: HashMap<SessionId, DateTime<Utc>>,
}

/// A listing's sessions in the order they started (ties by id). Sessions start at the
/// time they are made, so a new one goes in at the end, along a path of the tree that
/// the last insert left in the cache; a hash set grows into a table as large as the
/// scope's history, where every insert lands on a cold line and growing copies it all.
/// A session's start never changes, so the key found at insert is the key to remove.
type ByStart = BTreeSet<(StartKey, SessionId)>;

/// A start time as the indexes order it: nanoseconds since 1970, one integer to compare
/// where a `DateTime` compares its day, second and nanosecond in turn (the descent to
/// the tree's right edge compares a new key with every key of each node on the way).
type StartKey = i128;

fn start_key(at: &DateTime<Utc>) -> StartKey {
    i128::from(at.timestamp()) * 1_000_000_000 + i128::from(at.timestamp_subsec_nanos())
}

/// Adds a session to a listing's index, making the scope's set on its first session
/// (the key is copied only then).
fn index<K: std::hash::Hash + Eq + Clone>(
    index: &mut HashMap<K, ByStart>,
    scope: &K,
    by_start: (StartKey, SessionId),
) {
    match index.get_mut(scope) {
        Some(sessions) => {
            sessions.insert(by_start);
        }
        None => {
            index.insert(scope.clone(), ByStart::from([by_start]));
        }
    }
}

/// Keeps the deletes of the last [`TOMBSTONE_TTL`].
fn forget_old<K>(deletes: &mut HashMap<K, DateTime<Utc>>, now: DateTime<Utc>) {
    let ttl = chrono::Duration::from_std(TOMBSTONE_TTL).unwrap_or(chrono::Duration::MAX);
    deletes.retain(|_, at| now - *at < ttl);
}

#[derive(Debug)]
struct Entry {
    session: Session,
    messages: MessageLog,
    /// turn key → (index of its first message, how many messages); boxed and made on the
    /// first key, so a session without keys holds one pointer (and an entry fits
    /// allocator's 256-byte class).
    turn_keys: Option<Box<HashMap<String, (usize, usize)>>>,
}

impl Entry {
    fn turn(&self, key: &str) -> Option<Vec<Message>> {
        let &(start, len) = self.turn_keys.as_ref()?.get(key)?;
        Some(self.messages.range(start, start + len))
    }
}

impl InMemoryConversationStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn shard(&self, id: &SessionId) -> &RwLock<State> {
        let index = (self.hasher.hash_one(id) % SHARDS as u64) as usize;
        &self.shards[index]
    }

    // A panic while holding a lock cannot leave a half-applied change: every mutation
    // validates first and then only pushes/inserts, so a poisoned lock is still sound.
    fn read(&self, id: &SessionId) -> RwLockReadGuard<'_, State> {
        self.shard(id).read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, id: &SessionId) -> RwLockWriteGuard<'_, State> {
        self.shard(id).write().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes one session in place; `not_found` if there is none.
    fn update_session(&self, id: &SessionId, change: impl FnOnce(&mut Session)) -> Result<()> {
        let mut state = self.write(id);
        let entry = state
            .sessions
            .get_mut(id)
            .ok_or_else(|| session_not_found(id))?;
        change(&mut entry.session);
        Ok(())
    }

    fn all_read(&self) -> impl Iterator<Item = RwLockReadGuard<'_, State>> {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn all_write(&self) -> impl Iterator<Item = RwLockWriteGuard<'_, State>> {
        self.shards
            .iter()
            .map(|s| s.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Whether `user`'s sessions were deleted at or after `since`.
    fn user_deleted_since(&self, user: &UserId, since: DateTime<Utc>) -> bool {
        self.deleted_users
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(user)
            .is_some_and(|at| *at >= since)
    }
}

fn session_not_found(id: &SessionId) -> Error {
    Error::not_found(format!("session {id}"))
}

impl State {
    /// Adds a session that is not in the shard yet, and returns its entry.
    fn insert(&mut self, session: Session) -> &mut Entry {
        let by_start = (start_key(&session.started_at), session.id.clone());
        index(&mut self.by_user, &session.user_id, by_start.clone());
        index(&mut self.by_animal, &session.animal_id, by_start.clone());
        let entry = Box::new(Entry {
            session,
            messages: MessageLog::default(),
            turn_keys: None,
        });
        self.sessions
            .entry(by_start.1)
            .insert_entry(entry)
            .into_mut()
    }

    fn remove(&mut self, id: &SessionId) -> Option<Box<Entry>> {
        let entry = self.sessions.remove(id)?;
        let by_start = (start_key(&entry.session.started_at), id.clone());
        if let Some(set) = self.by_user.get_mut(&entry.session.user_id) {
            set.remove(&by_start);
            if set.is_empty() {
                self.by_user.remove(&entry.session.user_id);
            }
        }
        if let Some(set) = self.by_animal.get_mut(&entry.session.animal_id) {
            set.remove(&by_start);
            if set.is_empty() {
                self.by_animal.remove(&entry.session.animal_id);
            }
        }
        Some(entry)
    }
}

fn scope_tag(scope: &SessionScope) -> String {
    match scope {
        SessionScope::User(user) => format!("user:{user}"),
        SessionScope::Animal(animal) => format!("animal:{animal}"),
    }
}

#[async_trait]
impl ConversationStore for InMemoryConversationStore {
    async fn create_session(&self, session: &Session) -> Result<()> {
        let mut state = self.write(&session.id);
        if state.sessions.contains_key(&session.id) {
            return Err(Error::conflict(format!(
                "session {} already exists",
                session.id
            )));
        }
        state.insert(session.clone());
        Ok(())
    }

    async fn get_session(&self, id: &SessionId) -> Result<Option<Session>> {
        Ok(self.read(id).sessions.get(id).map(|e| e.session.clone()))
    }

    async fn append_turn(&self, append: TurnAppend) -> Result<AppendOutcome> {
        append.validate()?;
        let mut state = self.write(&append.session_id);
        // Deletes are final: a turn that began before one writes nothing back.
        if state
            .deleted
            .get(&append.session_id)
            .is_some_and(|at| *at >= append.began_at)
        {
            return Err(session_not_found(&append.session_id));
        }
        let entry = match append.new_session {
            Some(session) => {
                if self.user_deleted_since(&session.user_id, append.began_at) {
                    return Err(session_not_found(&session.id));
                }
                if let Some(existing) = state.sessions.get(&session.id) {
                    if let Some(previous) =
                        append.turn_key.as_deref().and_then(|k| existing.turn(k))
                    {
                        return Ok(AppendOutcome::Duplicate(previous));
                    }
                    return Err(Error::conflict(format!(
                        "session {} already exists",
                        session.id
                    )));
                }
                state.insert(session)
            }
            None => state
                .sessions
                .get_mut(&append.session_id)
                .ok_or_else(|| session_not_found(&append.session_id))?,
        };
        if let Some(key) = &append.turn_key {
            if let Some(previous) = entry.turn(key) {
                return Ok(AppendOutcome::Duplicate(previous));
            }
        }
        if entry.session.message_count != append.expected_count {
            return Err(Error::conflict(format!(
                "session {} has {} messages, the append expected {}",
                append.session_id, entry.session.message_count, append.expected_count
            )));
        }
        let start = entry.messages.len();
        let mut seq = append.expected_count;
        let mut last_at = entry.session.last_activity;
        entry.messages.reserve_first(append.messages.len());
        for message in append.messages {
            seq += 1;
            last_at = last_at.max(message.created_at);
            entry
                .messages
                .push(message.into_message(append.session_id.clone(), seq));
        }
        let stored = entry.messages.range(start, usize::MAX);
        if let Some(key) = append.turn_key {
            entry
                .turn_keys
                .get_or_insert_default()
                .insert(key, (start, stored.len()));
        }
        entry.session.message_count = seq;
        entry.session.last_activity = last_at;
        Ok(AppendOutcome::Appended(stored))
    }

    async fn find_turn(&self, id: &SessionId, turn_key: &str) -> Result<Option<Vec<Message>>> {
        let state = self.read(id);
        let entry = state
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        Ok(entry.turn(turn_key))
    }

    async fn recent_messages(&self, id: &SessionId, limit: usize) -> Result<Vec<Message>> {
        let state = self.read(id);
        let entry = state
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        let start = entry.messages.len().saturating_sub(limit);
        Ok(entry.messages.range(start, usize::MAX))
    }

    async fn history(&self, id: &SessionId, page: PageRequest) -> Result<Page<Message>> {
        let after_seq = match &page.cursor {
            None => 0,
            Some(cursor) => {
                let parts = cursor.decode(HISTORY_CURSOR, 2)?;
                if parts[0] != id.as_str() {
                    return Err(Error::validation(
                        "cursor",
                        "cursor belongs to another session",
                    ));
                }
                parts[1]
                    .parse::<u64>()
                    .map_err(|_| Error::validation("cursor", "invalid or expired cursor"))?
            }
        };
        let limit = page.effective_limit();
        let state = self.read(id);
        let entry = state
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        // Sequence numbers are 1..=len without gaps, so seq n sits at index n - 1.
        let start = usize::try_from(after_seq)
            .unwrap_or(usize::MAX)
            .min(entry.messages.len());
        let end = start.saturating_add(limit).min(entry.messages.len());
        let items = entry.messages.range(start, end);
        let next = (end < entry.messages.len()).then(|| {
            let last = items.last().map_or(after_seq, |m| m.seq);
            Cursor::encode(HISTORY_CURSOR, &[id.as_str(), &last.to_string()])
        });
        Ok(Page { items, next })
    }

    async fn list_sessions(&self, scope: SessionScope, page: PageRequest) -> Result<Page<Session>> {
        let tag = scope_tag(&scope);
        let after: Option<(DateTime<Utc>, String)> = match &page.cursor {
            None => None,
            Some(cursor) => {
                let parts = cursor.decode(SESSIONS_CURSOR, 3)?;
                if parts[0] != tag {
                    return Err(Error::validation(
                        "cursor",
                        "cursor belongs to another listing",
                    ));
                }
                let at = DateTime::parse_from_rfc3339(&parts[1])
                    .map_err(|_| Error::validation("cursor", "invalid or expired cursor"))?
                    .with_timezone(&Utc);
                Some((at, parts[2].clone()))
            }
        };
        let limit = page.effective_limit();
        // The time a listing orders by: see `SessionScope`.
        let order_at = |s: &Session| match &scope {
            SessionScope::User(_) => s.last_activity,
            SessionScope::Animal(_) => s.started_at,
        };
        let keep = |s: &Session| match &after {
            None => true,
            Some((at, id)) => (order_at(s), s.id.as_str()) < (*at, id.as_str()),
        };
        let mut sessions: Vec<Session> = Vec::new();
        for state in self.all_read() {
            let ids = match &scope {
                SessionScope::User(user) => state.by_user.get(user),
                SessionScope::Animal(animal) => state.by_animal.get(animal),
            };
            sessions.extend(
                ids.into_iter()
                    .flatten()
                    .filter_map(|(_, id)| state.sessions.get(id).map(|e| &e.session))
                    .filter(|s| keep(s))
                    .cloned(),
            );
        }
        sessions.sort_by(|a, b| (order_at(b), b.id.as_str()).cmp(&(order_at(a), a.id.as_str())));
        let more = sessions.len() > limit;
        sessions.truncate(limit);
        let items = sessions;
        let next = match items.last() {
            Some(last) if more => Some(Cursor::encode(
                SESSIONS_CURSOR,
                &[
                    &tag,
                    &order_at(last).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true),
                    last.id.as_str(),
                ],
            )),
            _ => None,
        };
        Ok(Page { items, next })
    }

    async fn messages_after(
        &self,
        id: &SessionId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Message>> {
        let state = self.read(id);
        let entry = state
            .sessions
            .get(id)
            .ok_or_else(|| session_not_found(id))?;
        // Sequence numbers are 1..=len without gaps, so seq n sits at index n - 1.
        let start = usize::try_from(after)
            .unwrap_or(usize::MAX)
            .min(entry.messages.len());
        let end = start.saturating_add(limit).min(entry.messages.len());
        Ok(entry.messages.range(start, end))
    }

    async fn set_summary(&self, id: &SessionId, summary: &str) -> Result<()> {
        self.update_session(id, |s| s.summary = Some(summary.to_owned()))
    }

    async fn set_rolling_summary(&self, id: &SessionId, summary: &RollingSummary) -> Result<bool> {
        let mut stored = false;
        self.update_session(id, |s| {
            if s.rolling_summary
                .as_ref()
                .is_none_or(|current| current.through < summary.through)
            {
                s.rolling_summary = Some(summary.clone());
                stored = true;
            }
        })?;
        Ok(stored)
    }

    async fn set_thread_id(&self, id: &SessionId, thread_id: &str) -> Result<()> {
        self.update_session(id, |s| s.thread_id = Some(thread_id.to_owned()))
    }

    async fn delete(&self, scope: DeleteScope) -> Result<DeleteReport> {
        let mut report = DeleteReport::default();
        let now = Utc::now();
        if let DeleteScope::User(user) = &scope {
            // Before any session goes: a first turn of the user that checks after this
            // sees it, and one that checked before has stored its session where the loop
            // below finds it.
            let mut users = self.deleted_users.lock().unwrap_or_else(|p| p.into_inner());
            forget_old(&mut users, now);
            users.insert(user.clone(), now);
        }
        let mut remove = |state: &mut State, doomed: Vec<SessionId>| {
            forget_old(&mut state.deleted, now);
            for id in doomed {
                state.deleted.insert(id.clone(), now);
                if let Some(entry) = state.remove(&id) {
                    report.sessions += 1;
                    report.messages += entry.messages.len() as u64;
                }
            }
        };
        if let DeleteScope::Session(id) = &scope {
            remove(&mut self.write(id), vec![id.clone()]);
            return Ok(report);
        }
        for mut state in self.all_write() {
            let doomed: Vec<SessionId> = match &scope {
                DeleteScope::Session(_) => Vec::new(),
                DeleteScope::User(user) => state
                    .by_user
                    .get(user)
                    .map(|set| set.iter().map(|(_, id)| id.clone()).collect())
                    .unwrap_or_default(),
                DeleteScope::Animal(animal) => state
                    .by_animal
                    .get(animal)
                    .map(|set| set.iter().map(|(_, id)| id.clone()).collect())
                    .unwrap_or_default(),
                DeleteScope::OlderThan(cutoff) => state
                    .sessions
                    .values()
                    .filter(|e| e.session.last_activity < *cutoff)
                    .map(|e| e.session.id.clone())
                    .collect(),
            };
            remove(&mut state, doomed);
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A session's entry fits the allocator's 256-byte class: it is kept for every session.
    #[test]
    fn an_entry_takes_at_most_256_bytes() {
        assert!(
            std::mem::size_of::<Entry>() <= 256,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    /// An index's entries as (session, scope, start), sorted.
    fn index_entries<K: std::fmt::Display>(
        index: &HashMap<K, ByStart>,
    ) -> Vec<(SessionId, String, StartKey)> {
        let mut all: Vec<_> = index
            .iter()
            .flat_map(|(scope, set)| {
                set.iter()
                    .map(move |(at, id)| (id.clone(), scope.to_string(), *at))
            })
            .collect();
        all.sort();
        all
    }

    /// Every shard's listing indexes name exactly its sessions, under the right user and
    /// animal and at their start: a delete that missed its index entry would not show in
    /// any listing (they look sessions up) but would keep it forever.
    fn assert_indexes_match(store: &InMemoryConversationStore) -> usize {
        let mut total = 0;
        for state in store.all_read() {
            let by_user = index_entries(&state.by_user);
            let by_animal = index_entries(&state.by_animal);
            let sessions = |scope: fn(&Session) -> String| {
                let mut all: Vec<_> = state
                    .sessions
                    .values()
                    .map(|e| {
                        (
                            e.session.id.clone(),
                            scope(&e.session),
                            start_key(&e.session.started_at),
                        )
                    })
                    .collect();
                all.sort();
                all
            };
            assert_eq!(by_user, sessions(|s| s.user_id.to_string()));
            assert_eq!(by_animal, sessions(|s| s.animal_id.to_string()));
            assert!(
                state
                    .by_user
                    .values()
                    .chain(state.by_animal.values())
                    .all(|s| !s.is_empty())
            );
            total += state.sessions.len();
        }
        total
    }

    #[tokio::test]
    async fn the_listing_indexes_follow_every_kind_of_delete() {
        let store = InMemoryConversationStore::new();
        let started = Utc::now() - chrono::Duration::days(10);
        let mut made = 0;
        for (user, animal) in [
            ("ana", "lion"),
            ("ana", "otter"),
            ("ben", "lion"),
            ("cy", "owl"),
        ] {
            for n in 0..40 {
                let id = SessionId::new(format!("{user}-{animal}-{n}")).unwrap();
                let mut session = Session::new(
                    id,
                    UserId::new(user).unwrap(),
                    AnimalId::new(animal).unwrap(),
                    animal,
                );
                // Ties on the start time, and old sessions for the age delete.
                session.started_at = started + chrono::Duration::seconds(n / 4);
                session.last_activity = if n % 2 == 0 { started } else { Utc::now() };
                store.create_session(&session).await.unwrap();
                made += 1;
            }
        }
        assert_eq!(assert_indexes_match(&store), made);
        // Each delete, and the sessions left after it (ana-lion-7 is one of the recent ones).
        for (scope, left) in [
            (
                DeleteScope::Session(SessionId::new("ana-lion-7").unwrap()),
                made - 1,
            ),
            (
                DeleteScope::OlderThan(started + chrono::Duration::days(1)),
                79,
            ),
            (DeleteScope::User(UserId::new("ana").unwrap()), 40),
            (DeleteScope::Animal(AnimalId::new("lion").unwrap()), 20),
            (DeleteScope::User(UserId::new("cy").unwrap()), 0),
        ] {
            store.delete(scope.clone()).await.unwrap();
            assert_eq!(assert_indexes_match(&store), left, "after {scope:?}");
        }
        for state in store.all_read() {
            assert!(state.by_user.is_empty() && state.by_animal.is_empty());
        }
    }

    #[tokio::test]
    async fn passes_the_conformance_suite() {
        crate::testing::run_conversation_store_suite(
            std::sync::Arc::new(InMemoryConversationStore::new()),
            &Default::default(),
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_long_conversation_stays_within_budget_and_remembers() {
        crate::testing::check_long_conversation(std::sync::Arc::new(
            InMemoryConversationStore::new(),
        ))
        .await;
    }
}

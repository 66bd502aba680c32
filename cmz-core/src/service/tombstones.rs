//! Recently deleted sessions and users, so a turn that was already running when its
//! conversation was deleted cannot write it back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use foldhash::HashMap;
use tokio::sync::{RwLock, RwLockReadGuard};
use tokio::time::Instant;

use crate::error::{Error, Result};
use crate::ids::{SessionId, UserId};
use crate::store::DeleteScope;
use crate::types::Session;

/// How long a delete is remembered: longer than any turn runs.
const KEEP: Duration = Duration::from_secs(60 * 60);

/// The most deletes remembered; beyond it the oldest are forgotten first.
const MAX_ENTRIES: usize = 100_000;

/// Deletes that in-flight turns must not undo, in this process.
///
/// A turn notes the [`generation`](Self::generation) before it reads its session; when it
/// stores, it holds a [`write_guard`](Self::write_guard) (shared among writers) and is
/// refused if its session or its user was deleted since. A delete [`record`](Self::record)s
/// itself under the exclusive side before it touches the store, so a write is either
/// finished before the delete starts (and the delete removes it) or sees the tombstone.
#[derive(Debug, Default)]
pub(crate) struct Tombstones {
    generation: AtomicU64,
    deleted: RwLock<Deleted>,
}

#[derive(Debug, Default)]
pub(crate) struct Deleted {
    sessions: HashMap<SessionId, (u64, Instant)>,
    users: HashMap<UserId, (u64, Instant)>,
}

impl Deleted {
    fn prune(&mut self, now: Instant, generation: u64) {
        // One generation per delete: keeping the last MAX_ENTRIES generations bounds both maps.
        let oldest = generation.saturating_sub(MAX_ENTRIES as u64);
        let keep = |(g, at): &mut (u64, Instant)| *g > oldest && now.duration_since(*at) < KEEP;
        self.sessions.retain(|_, entry| keep(entry));
        self.users.retain(|_, entry| keep(entry));
    }
}

impl Tombstones {
    /// The current generation: deletes recorded after this call have a larger one.
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Records a delete of `scope` (sessions and users only: the scopes a GDPR request
    /// names), waiting for writes in progress to finish first.
    pub(crate) async fn record(&self, scope: &DeleteScope) {
        let mut deleted = self.deleted.write().await;
        let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
        let now = Instant::now();
        match scope {
            DeleteScope::Session(id) => {
                deleted.sessions.insert(id.clone(), (generation, now));
            }
            DeleteScope::User(user) => {
                deleted.users.insert(user.clone(), (generation, now));
            }
            DeleteScope::Animal(_) | DeleteScope::OlderThan(_) => {}
        }
        deleted.prune(now, generation);
    }

    /// Shared permission to write `session` for a turn that started at generation `since`;
    /// `not_found` if the session or its user was deleted after that.
    pub(crate) async fn write_guard(
        &self,
        since: u64,
        session: &Session,
    ) -> Result<RwLockReadGuard<'_, Deleted>> {
        let deleted = self.deleted.read().await;
        let after = |entry: Option<&(u64, Instant)>| entry.is_some_and(|(g, _)| *g > since);
        if after(deleted.sessions.get(&session.id)) || after(deleted.users.get(&session.user_id)) {
            return Err(Error::not_found(format!(
                "session {} was deleted while this turn ran; nothing was stored",
                session.id
            )));
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str, user: &str) -> Session {
        Session::new(
            SessionId::new(id).unwrap(),
            UserId::new(user).unwrap(),
            crate::ids::AnimalId::new("leo").unwrap(),
            "Leo",
        )
    }

    #[tokio::test]
    async fn only_turns_started_before_a_delete_are_refused() {
        let tombstones = Tombstones::default();
        let s = session("s1", "user_a");
        let before = tombstones.generation();
        tombstones
            .record(&DeleteScope::User(UserId::new("user_a").unwrap()))
            .await;
        let err = tombstones.write_guard(before, &s).await.unwrap_err();
        assert_eq!(err.code(), "not_found");
        // A turn that starts after the delete writes normally.
        let after = tombstones.generation();
        assert!(tombstones.write_guard(after, &s).await.is_ok());
        // Other users and sessions are untouched.
        assert!(
            tombstones
                .write_guard(before, &session("s2", "user_b"))
                .await
                .is_ok()
        );
        tombstones
            .record(&DeleteScope::Session(SessionId::new("s2").unwrap()))
            .await;
        assert!(
            tombstones
                .write_guard(after, &session("s2", "user_b"))
                .await
                .is_err()
        );
    }
}

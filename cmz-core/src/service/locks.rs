//! One in-process queue per session, so turns on a session run one after another.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;

use crate::ids::SessionId;

type SessionMutex = Arc<tokio::sync::Mutex<()>>;

/// Per-session async locks; entries disappear when nobody holds or waits for them.
#[derive(Debug, Default)]
pub(crate) struct SessionLocks {
    locks: Mutex<HashMap<SessionId, SessionMutex>>,
}

/// Held while a turn runs on a session.
#[derive(Debug)]
pub(crate) struct SessionLease {
    guard: Option<OwnedMutexGuard<()>>,
    id: SessionId,
    locks: Arc<SessionLocks>,
}

impl SessionLocks {
    /// Waits for the session's turn (FIFO among waiters).
    pub(crate) async fn lock(self: &Arc<Self>, id: &SessionId) -> SessionLease {
        let mutex = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(locks.entry(id.clone()).or_default())
        };
        let guard = mutex.lock_owned().await;
        SessionLease {
            guard: Some(guard),
            id: id.clone(),
            locks: Arc::clone(self),
        }
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.locks.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        // Release first, then look: if only the map still holds the mutex, nobody holds or
        // waits for it (waiters clone it under the map lock), so the entry can go.
        drop(self.guard.take());
        let mut locks = self.locks.locks.lock().unwrap_or_else(|p| p.into_inner());
        if locks
            .get(&self.id)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            locks.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn entries_are_removed_when_free() {
        let locks = Arc::new(SessionLocks::default());
        let id = SessionId::new("s1").unwrap();
        let lease = locks.lock(&id).await;
        assert_eq!(locks.len(), 1);
        let waiter = {
            let locks = Arc::clone(&locks);
            let id = id.clone();
            tokio::spawn(async move {
                let _lease = locks.lock(&id).await;
            })
        };
        tokio::task::yield_now().await;
        drop(lease);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }
}

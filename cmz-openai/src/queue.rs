//! A bounded request queue: at most N requests in flight, at most M waiting. Under load a
//! request's [`Priority`] decides whether it may wait: `Low` only while the queue is less
//! than half full, `Normal` up to M, `High` up to M plus a quarter (at least one more).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use cmz_core::chat::Priority;

use crate::error::{OpenAiError, OpenAiErrorKind};

#[derive(Debug)]
pub(crate) struct RequestQueue {
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements the waiting count however the wait ends (including cancellation).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RequestQueue {
    pub(crate) fn new(in_flight: usize, max_waiting: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(in_flight.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// A slot, held until the permit is dropped (for a stream: until the stream ends or is
    /// dropped).
    pub(crate) async fn acquire(
        &self,
        priority: Priority,
    ) -> Result<OwnedSemaphorePermit, OpenAiError> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.places_for(priority) {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(OpenAiError::new(
                OpenAiErrorKind::QueueFull,
                format!(
                    "the model request queue is full ({} waiting)",
                    self.max_waiting
                ),
            ));
        }
        let _waiting = Waiting(&self.waiting);
        Arc::clone(&self.slots).acquire_owned().await.map_err(|e| {
            OpenAiError::new(OpenAiErrorKind::QueueFull, "the request queue was closed")
                .with_source(e)
        })
    }

    /// How many may be waiting, counting this request, for it to wait.
    fn places_for(&self, priority: Priority) -> usize {
        match priority {
            Priority::Low => self.max_waiting / 2,
            Priority::High => self.max_waiting + (self.max_waiting / 4).max(1),
            _ => self.max_waiting,
        }
    }

    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn full_queues_fail_fast_and_cancelled_waiters_leave() {
        let queue = Arc::new(RequestQueue::new(1, 1));
        let held = queue.acquire(Priority::Normal).await.unwrap();
        let waiter = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.acquire(Priority::Normal).await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(queue.waiting(), 1);
        let err = queue.acquire(Priority::Normal).await.unwrap_err();
        assert_eq!(err.kind, OpenAiErrorKind::QueueFull);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(queue.waiting(), 0, "a cancelled waiter frees its place");
        drop(held);
        assert!(queue.acquire(Priority::Normal).await.is_ok());
    }

    #[tokio::test]
    async fn low_priority_is_shed_first_and_high_priority_last() {
        let queue = Arc::new(RequestQueue::new(1, 4));
        let held = queue.acquire(Priority::Normal).await.unwrap();
        let mut waiters = Vec::new();
        let mut wait = |priority| {
            let queue = Arc::clone(&queue);
            waiters.push(tokio::spawn(async move {
                queue.acquire(priority).await.map(drop)
            }));
        };
        wait(Priority::Low);
        wait(Priority::Low);
        tokio::task::yield_now().await;
        assert_eq!(
            queue.waiting(),
            2,
            "low waits while the queue is under half full"
        );
        let refused = queue.acquire(Priority::Low).await.unwrap_err();
        assert_eq!(refused.kind, OpenAiErrorKind::QueueFull);
        wait(Priority::Normal);
        wait(Priority::Normal);
        tokio::task::yield_now().await;
        assert_eq!(queue.waiting(), 4);
        let refused = queue.acquire(Priority::Normal).await.unwrap_err();
        assert_eq!(refused.kind, OpenAiErrorKind::QueueFull);
        wait(Priority::High);
        tokio::task::yield_now().await;
        assert_eq!(queue.waiting(), 5, "high may wait past the normal limit");
        let refused = queue.acquire(Priority::High).await.unwrap_err();
        assert_eq!(refused.kind, OpenAiErrorKind::QueueFull, "within a margin");
        drop(held);
        for waiter in waiters {
            assert!(
                waiter.await.unwrap().is_ok(),
                "every admitted request gets its turn"
            );
        }
    }
}

//! A bounded request queue: at most N requests in flight, at most M waiting.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    pub(crate) async fn acquire(&self) -> Result<OwnedSemaphorePermit, OpenAiError> {
        if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.max_waiting {
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
        let held = queue.acquire().await.unwrap();
        let waiter = {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move { queue.acquire().await.map(drop) })
        };
        tokio::task::yield_now().await;
        assert_eq!(queue.waiting(), 1);
        let err = queue.acquire().await.unwrap_err();
        assert_eq!(err.kind, OpenAiErrorKind::QueueFull);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(queue.waiting(), 0, "a cancelled waiter frees its place");
        drop(held);
        assert!(queue.acquire().await.is_ok());
    }
}

//! An append-only list of messages stored in fixed-size blocks.

use crate::types::Message;

const BLOCK: usize = 256;

/// Messages in blocks of [`BLOCK`]: an append never moves earlier messages, so its cost
/// does not depend on how long the session already is (a plain `Vec` would copy the whole
/// history each time it doubles).
#[derive(Debug, Default)]
pub(super) struct MessageLog {
    /// Every block but the last is full.
    blocks: Vec<Vec<Message>>,
}

impl MessageLog {
    pub(super) fn len(&self) -> usize {
        match self.blocks.last() {
            Some(last) => (self.blocks.len() - 1) * BLOCK + last.len(),
            None => 0,
        }
    }

    /// Sizes a new log's first block for the `count` messages about to be pushed: most
    /// sessions hold one turn, and a block grown by `push` would keep room for four.
    pub(super) fn reserve_first(&mut self, count: usize) {
        if self.blocks.is_empty() {
            // One block's room (a `Vec` would take four); a long session grows it.
            self.blocks.reserve_exact(1);
            self.blocks.push(Vec::with_capacity(count.min(BLOCK)));
        }
    }

    pub(super) fn push(&mut self, message: Message) {
        match self.blocks.last_mut() {
            Some(block) if block.len() < BLOCK => block.push(message),
            _ => {
                // Most sessions are short: the first block grows as needed instead of
                // reserving room for BLOCK messages up front.
                let mut block = if self.blocks.is_empty() {
                    Vec::new()
                } else {
                    Vec::with_capacity(BLOCK)
                };
                block.push(message);
                self.blocks.push(block);
            }
        }
    }

    /// Clones of the messages at indexes `start..end` (clamped to the log).
    pub(super) fn range(&self, start: usize, end: usize) -> Vec<Message> {
        let end = end.min(self.len());
        let mut out = Vec::with_capacity(end.saturating_sub(start));
        let mut index = start;
        while index < end {
            let block = &self.blocks[index / BLOCK];
            let offset = index % BLOCK;
            let take = (BLOCK - offset).min(end - index);
            out.extend_from_slice(&block[offset..offset + take]);
            index += take;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SessionId;
    use crate::types::{NewMessage, Role};

    #[test]
    fn ranges_cross_blocks() {
        let id = SessionId::new("s").unwrap();
        let mut log = MessageLog::default();
        for seq in 1..=1000u64 {
            log.push(NewMessage::new(Role::User, seq.to_string()).into_message(id.clone(), seq));
        }
        assert_eq!(log.len(), 1000);
        let seqs = |v: Vec<Message>| v.into_iter().map(|m| m.seq).collect::<Vec<_>>();
        assert_eq!(seqs(log.range(250, 260)), (251..=260).collect::<Vec<_>>());
        assert_eq!(seqs(log.range(0, 1000)), (1..=1000).collect::<Vec<_>>());
        assert_eq!(seqs(log.range(990, 5000)), (991..=1000).collect::<Vec<_>>());
        assert!(log.range(1000, 1000).is_empty());
        assert!(log.range(2000, 3000).is_empty());
    }

    #[test]
    fn a_first_turn_takes_the_room_it_needs() {
        let id = SessionId::new("s").unwrap();
        let mut log = MessageLog::default();
        log.reserve_first(2);
        for seq in 1..=2u64 {
            log.push(NewMessage::new(Role::User, seq.to_string()).into_message(id.clone(), seq));
        }
        assert_eq!((log.blocks.capacity(), log.blocks[0].capacity()), (1, 2));
        // Only a new log is sized: later turns grow the block as a Vec grows.
        log.reserve_first(1);
        log.push(NewMessage::new(Role::User, "3").into_message(id.clone(), 3));
        assert_eq!((log.blocks.len(), log.len()), (1, 3));
        assert_eq!(log.range(0, 3).len(), 3);
    }
}

//! What the model sees of a conversation: the turns that fit the token budget, and which
//! older turns are due to be folded into the running summary.

use std::hash::BuildHasher as _;
use std::sync::Mutex;

use foldhash::HashMap;

use crate::chat::ChatMessage;
use crate::error::{Error, Result};
use crate::tokens::{TOKENS_PER_REPLY, Tokenizer};
use crate::types::{Message, Role, Session};

use super::ConversationConfig;

/// The most messages one fold reads and summarizes; of a longer backlog (a long
/// conversation from before cmz) only the newest this many are summarized.
pub(super) const MAX_FOLD_MESSAGES: usize = 40;

/// The tokens of a stored message: the count kept with it, or counted now for a message
/// stored without one (a legacy item).
pub(super) fn message_tokens(tokenizer: Tokenizer, message: &Message) -> u32 {
    message
        .metadata
        .token_count
        .unwrap_or_else(|| tokenizer.count(&message.content))
}

/// The recent turns chosen for a prompt.
#[derive(Debug)]
pub(super) struct Window {
    /// The turns' messages, oldest first.
    pub(super) messages: Vec<ChatMessage>,
    /// The sequence number of the oldest message in the window (the new message's when
    /// the window is empty): everything before it is outside.
    pub(super) first_seq: u64,
}

/// The turns to fold into the running summary: the messages after `through` up to and
/// including `up_to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FoldPlan {
    /// What the stored summary covers (0 for none).
    pub(crate) through: u64,
    /// The last message that left the window.
    pub(crate) up_to: u64,
}

/// Token counts of the texts every turn repeats (persona prompts, running summaries),
/// remembered so a turn does not tokenize its persona prompt again.
#[derive(Debug)]
pub(super) struct TokenCounts {
    tokenizer: Tokenizer,
    hasher: foldhash::quality::RandomState,
    known: Mutex<HashMap<u64, u32>>,
}

/// Texts remembered before the memory starts over.
const REMEMBERED_COUNTS: usize = 4096;

impl TokenCounts {
    pub(super) fn new(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            hasher: Default::default(),
            known: Mutex::default(),
        }
    }

    /// The tokens of `text`.
    pub(super) fn count(&self, text: &str) -> u32 {
        let key = self.hasher.hash_one(text);
        if let Some(&count) = self
            .known
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return count;
        }
        let count = self.tokenizer.count(text);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.len() >= REMEMBERED_COUNTS {
            known.clear();
        }
        known.insert(key, count);
        count
    }

    /// The prompt tokens of `fixed` messages and the reply priming.
    pub(super) fn framing(&self, fixed: &[ChatMessage]) -> u32 {
        fixed
            .iter()
            .map(|m| Tokenizer::message_cost(self.count(&m.content)))
            .fold(TOKENS_PER_REPLY, u32::saturating_add)
    }
}

/// Whether the `fixed` messages, `extra` and a new message of `new_tokens` fit the budget.
pub(super) fn fits(
    config: &ConversationConfig,
    counts: &TokenCounts,
    fixed: &[ChatMessage],
    extra: &ChatMessage,
    new_tokens: u32,
) -> bool {
    counts
        .framing(fixed)
        .saturating_add(Tokenizer::message_cost(counts.count(&extra.content)))
        .saturating_add(Tokenizer::message_cost(new_tokens))
        <= config.context_budget_tokens
}

/// Chooses the newest whole turns of `history` (oldest first, the messages before the new
/// one) that fit the budget beside the `fixed` messages (persona prompt and summaries) and
/// the new message of `new_tokens`. A user message and its reply go in together or not at
/// all; a question whose reply was never stored goes alone. `next_seq` is the new
/// message's sequence number (every message of `history` comes before it).
pub(super) fn choose_window(
    config: &ConversationConfig,
    counts: &TokenCounts,
    fixed: &[ChatMessage],
    new_tokens: u32,
    history: Vec<Message>,
    next_seq: u64,
) -> Result<Window> {
    let tokenizer = config.tokenizer;
    let budget = config.context_budget_tokens;
    let framing = counts.framing(fixed);
    let mut used = framing.saturating_add(Tokenizer::message_cost(new_tokens));
    if used > budget {
        let room = budget.saturating_sub(framing.saturating_add(Tokenizer::message_cost(0)));
        return Err(Error::validation(
            "message",
            format!(
                "the message is {new_tokens} tokens; beside the animal's instructions and the conversation summary there is room for {room}"
            ),
        ));
    }
    let cost = |m: &Message| {
        // Empty replies (a stream dropped before any text) are left out of the prompt:
        // they carry nothing, and some providers reject empty assistant messages.
        if m.content.trim().is_empty() {
            0
        } else {
            Tokenizer::message_cost(message_tokens(tokenizer, m))
        }
    };
    // Whole turns from the newest back, as long as they fit.
    let mut first_index = history.len();
    let mut i = history.len();
    while i > 0 {
        let last = &history[i - 1];
        let start = match last.role {
            Role::Assistant
                if i >= 2
                    && history[i - 2].role == Role::User
                    && history[i - 2].seq + 1 == last.seq =>
            {
                i - 2
            }
            Role::User => i - 1,
            // A reply whose question is outside the window: never half a turn.
            _ => break,
        };
        let turn_cost = history[start..i]
            .iter()
            .map(cost)
            .fold(0, u32::saturating_add);
        if used.saturating_add(turn_cost) > budget {
            break;
        }
        used += turn_cost;
        first_index = start;
        i = start;
    }
    let first_seq = history.get(first_index).map_or(next_seq, |m| m.seq);
    let messages = history
        .into_iter()
        .skip(first_index)
        .filter(|m| !m.content.trim().is_empty())
        .map(|m| ChatMessage::new(m.role, m.content))
        .collect();
    Ok(Window {
        messages,
        first_seq,
    })
}

/// Whether enough turns have left the window, uncovered by the session's running summary,
/// to fold them in now.
pub(super) fn fold_plan(
    config: &ConversationConfig,
    session: &Session,
    first_seq: u64,
) -> Option<FoldPlan> {
    if config.summary_every_turns == 0 {
        return None;
    }
    let through = session.rolling_summary.as_ref().map_or(0, |r| r.through);
    let up_to = first_seq.saturating_sub(1);
    let due = (config.summary_every_turns as u64).saturating_mul(2);
    (up_to.saturating_sub(through) >= due).then_some(FoldPlan { through, up_to })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{AnimalId, MessageId, SessionId, UserId};

    fn message(seq: u64, role: Role, content: &str) -> Message {
        Message {
            id: MessageId::generate(),
            session_id: SessionId::new("s1").unwrap(),
            seq,
            role,
            content: content.into(),
            created_at: chrono::Utc::now(),
            metadata: Default::default(),
        }
    }

    fn turns(n: u64, words: usize) -> Vec<Message> {
        let text = vec!["word"; words].join(" ");
        (1..=n)
            .flat_map(|t| {
                [
                    message(2 * t - 1, Role::User, &text),
                    message(2 * t, Role::Assistant, &text),
                ]
            })
            .collect()
    }

    fn choose_window_with(
        config: &ConversationConfig,
        fixed: &[ChatMessage],
        new_tokens: u32,
        history: Vec<Message>,
        next_seq: u64,
    ) -> Result<Window> {
        let counts = TokenCounts::new(config.tokenizer);
        choose_window(config, &counts, fixed, new_tokens, history, next_seq)
    }

    fn config(budget: u32) -> ConversationConfig {
        ConversationConfig {
            context_budget_tokens: budget,
            ..ConversationConfig::default()
        }
    }

    #[test]
    fn whole_turns_newest_first_within_the_budget() {
        let fixed = [ChatMessage::new(Role::System, "You are Leo.")];
        // Each message: 10 tokens of words + 3 framing.
        let history = turns(5, 10);
        let fixed_cost = TOKENS_PER_REPLY + 3 + 4;
        let new_cost = 3 + 5;
        // Room for exactly two turns (52 tokens), not two and a half.
        let budget = fixed_cost + new_cost + 52 + 13;
        let window = choose_window_with(&config(budget), &fixed, 5, history.clone(), 11).unwrap();
        assert_eq!(window.messages.len(), 4);
        assert_eq!(window.first_seq, 7);
        assert_eq!(window.messages[0].role, Role::User);
        // A huge budget takes everything; a tight one nothing, never half a turn.
        let all = choose_window_with(&config(100_000), &fixed, 5, history.clone(), 11).unwrap();
        assert_eq!((all.messages.len(), all.first_seq), (10, 1));
        let none = choose_window_with(&config(fixed_cost + new_cost + 20), &fixed, 5, history, 11)
            .unwrap();
        assert_eq!((none.messages.len(), none.first_seq), (0, 11));
    }

    #[test]
    fn an_orphan_reply_and_an_unanswered_question() {
        let fixed = [ChatMessage::new(Role::System, "You are Leo.")];
        let mut history = turns(3, 2);
        history.remove(0); // the window's read began with a reply
        history.push(message(7, Role::User, "are you there"));
        let window = choose_window_with(&config(10_000), &fixed, 2, history, 8).unwrap();
        assert_eq!(window.first_seq, 3);
        assert_eq!(window.messages.len(), 5);
        assert_eq!(window.messages.last().unwrap().content, "are you there");
    }

    #[test]
    fn an_oversized_message_is_a_validation_error() {
        let fixed = [ChatMessage::new(Role::System, "You are Leo.")];
        let error = choose_window_with(&config(100), &fixed, 200, Vec::new(), 1).unwrap_err();
        assert_eq!(error.code(), "validation_error");
        assert!(error.to_string().contains("200 tokens"), "{error}");
    }

    #[test]
    fn folds_are_due_every_few_turns() {
        let mut session = Session::new(
            SessionId::new("s1").unwrap(),
            UserId::new("u1").unwrap(),
            AnimalId::new("lion").unwrap(),
            "Leo",
        );
        let config = ConversationConfig::default();
        assert_eq!(fold_plan(&config, &session, 7), None);
        assert_eq!(
            fold_plan(&config, &session, 9),
            Some(FoldPlan {
                through: 0,
                up_to: 8
            })
        );
        session.rolling_summary = Some(crate::types::RollingSummary {
            text: "x".into(),
            through: 8,
            tokens: 1,
            updated_at: chrono::Utc::now(),
            folds: 1,
            tokens_spent: 0,
            fallback: false,
        });
        assert_eq!(fold_plan(&config, &session, 15), None);
        let off = ConversationConfig {
            summary_every_turns: 0,
            ..config
        };
        assert_eq!(fold_plan(&off, &session, 500), None);
    }
}

//! Counting tokens the way the model will: the encoding of the configured model, or a
//! documented estimate for models whose encoding cmz does not know.
//!
//! The turn engine counts each message once, when it is stored (the count is kept in
//! [`MessageMetadata::token_count`](crate::types::MessageMetadata::token_count)), so
//! choosing a context window never tokenizes history again.
//!
//! ```
//! use cmz_core::tokens::Tokenizer;
//!
//! let tokenizer = Tokenizer::for_model("gpt-4o-mini");
//! assert_eq!(tokenizer, Tokenizer::O200kBase);
//! assert_eq!(tokenizer.count("Hello there, Leo!"), 5);
//! // Unknown models get an estimate: a token per four bytes, rounded up.
//! assert_eq!(Tokenizer::for_model("my-local-llama").count("12345678"), 2);
//! ```

use crate::chat::{ChatMessage, ChatRequest};

/// Tokens every chat message costs beyond its content (OpenAI's chat format: the role and
/// the message delimiters).
pub const TOKENS_PER_MESSAGE: u32 = 3;

/// Tokens the model is primed with before its reply, once per request.
pub const TOKENS_PER_REPLY: u32 = 3;

/// A model's token encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Tokenizer {
    /// `o200k_base`: GPT-4o, GPT-4o mini, GPT-4.1, GPT-5 and the o-series (the default, as
    /// the default model is gpt-4o-mini).
    #[default]
    O200kBase,
    /// `cl100k_base`: GPT-4 and GPT-3.5 Turbo.
    Cl100kBase,
    /// Any other model: one token per four bytes of UTF-8, rounded up. Models with
    /// other vocabularies split text differently; for English this is within about 20% of
    /// the real count, and it errs high for non-Latin scripts.
    Estimate,
}

impl Tokenizer {
    /// The encoding of a model name (as given to an OpenAI-compatible server, with or
    /// without a provider prefix such as `openai/`).
    pub fn for_model(model: &str) -> Self {
        let name = model
            .rsplit('/')
            .next()
            .unwrap_or(model)
            .to_ascii_lowercase();
        let starts = |prefixes: &[&str]| prefixes.iter().any(|p| name.starts_with(p));
        if starts(&[
            "gpt-4o",
            "gpt-4.1",
            "gpt-4.5",
            "gpt-5",
            "o1",
            "o3",
            "o4",
            "chatgpt-4o",
            "gpt-oss",
        ]) {
            Self::O200kBase
        } else if starts(&[
            "gpt-4",
            "gpt-3.5",
            "gpt-35",
            "text-embedding-3",
            "text-embedding-ada",
        ]) {
            Self::Cl100kBase
        } else {
            Self::Estimate
        }
    }

    /// The encoding's name (`o200k_base`, `cl100k_base`, `estimate`).
    pub fn name(self) -> &'static str {
        match self {
            Self::O200kBase => "o200k_base",
            Self::Cl100kBase => "cl100k_base",
            Self::Estimate => "estimate",
        }
    }

    /// The tokens of `text` (special-token text counts as ordinary text, as a user's
    /// message would be sent).
    pub fn count(self, text: &str) -> u32 {
        let count = match self {
            Self::O200kBase => tiktoken_rs::o200k_base_singleton()
                .encode_ordinary(text)
                .len(),
            Self::Cl100kBase => tiktoken_rs::cl100k_base_singleton()
                .encode_ordinary(text)
                .len(),
            Self::Estimate => text.len().div_ceil(4),
        };
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// What a chat message of `content_tokens` costs in a request.
    pub fn message_cost(content_tokens: u32) -> u32 {
        content_tokens.saturating_add(TOKENS_PER_MESSAGE)
    }

    /// The prompt tokens of a whole request (every message and the reply priming), as the
    /// context budget counts them.
    pub fn count_request(self, request: &ChatRequest) -> u32 {
        request
            .messages
            .iter()
            .map(|m: &ChatMessage| Self::message_cost(self.count(&m.content)))
            .fold(TOKENS_PER_REPLY, u32::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Role;

    #[test]
    fn encodings_by_model() {
        assert_eq!(Tokenizer::for_model("gpt-4o-mini"), Tokenizer::O200kBase);
        assert_eq!(
            Tokenizer::for_model("openai/gpt-4.1-nano"),
            Tokenizer::O200kBase
        );
        assert_eq!(Tokenizer::for_model("o3-mini"), Tokenizer::O200kBase);
        assert_eq!(Tokenizer::for_model("gpt-4-turbo"), Tokenizer::Cl100kBase);
        assert_eq!(Tokenizer::for_model("gpt-3.5-turbo"), Tokenizer::Cl100kBase);
        assert_eq!(Tokenizer::for_model("llama3"), Tokenizer::Estimate);
        assert_eq!(Tokenizer::for_model("offline-persona"), Tokenizer::Estimate);
    }

    #[test]
    fn counts_match_the_published_encodings() {
        // Counts from OpenAI's tiktoken for these strings.
        assert_eq!(Tokenizer::O200kBase.count("hello world"), 2);
        assert_eq!(Tokenizer::Cl100kBase.count("hello world"), 2);
        assert_eq!(Tokenizer::O200kBase.count(""), 0);
        // Special-token text is ordinary text, never a control token.
        assert!(Tokenizer::O200kBase.count("<|endoftext|>") > 1);
        assert_eq!(Tokenizer::Estimate.count("abcde"), 2);
        let request = ChatRequest {
            messages: vec![
                ChatMessage::new(Role::System, "hello world"),
                ChatMessage::new(Role::User, "hello world"),
            ],
            max_tokens: None,
            temperature: None,
            model: None,
            priority: Default::default(),
        };
        assert_eq!(
            Tokenizer::O200kBase.count_request(&request),
            2 + 3 + 2 + 3 + TOKENS_PER_REPLY
        );
    }
}

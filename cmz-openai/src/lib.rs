#![doc = include_str!("../README.md")]

mod client;
mod config;
mod error;
mod moderation;
mod queue;
mod wire;

#[cfg(feature = "testing")]
pub mod testing;

pub use client::{Health, OpenAiChatModel};
pub use config::{
    ApiKey, AuthStyle, CacheSettings, DEFAULT_BASE_URL, DEFAULT_MODEL, MaxTokensField, OpenAiConfig,
};
pub use error::{OpenAiError, OpenAiErrorKind};
pub use moderation::OpenAiModerator;

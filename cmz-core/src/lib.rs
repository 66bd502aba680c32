#![doc = include_str!("../README.md")]

pub mod access;
pub mod auth;
pub mod care;
pub mod chat;
pub mod error;
pub mod ids;
pub mod memory;
pub mod moderation;
pub mod persona;
pub mod privacy;
pub mod random;
pub mod relay;
pub mod service;
pub mod store;
pub mod tokens;
pub mod traced;
pub mod types;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{BoxError, Code, Error, Result};

/// The names most programs need, in one import.
pub mod prelude {
    pub use crate::access::{AccessPolicy, Action, OwnerOrAdminPolicy, Principal, UserRole};
    pub use crate::chat::{ChatChunk, ChatCompletion, ChatMessage, ChatModel, ChatRequest};
    pub use crate::error::{Error, Result};
    pub use crate::ids::{AnimalId, FamilyId, MessageId, SessionId, UserId};
    pub use crate::memory::{
        InMemoryConversationStore, InMemoryPersonaDirectory, OfflinePersonaModel,
    };
    pub use crate::persona::{PersonaDirectory, PersonaDirectoryExt};
    pub use crate::service::{
        ConversationConfig, ConversationService, ModelFailurePolicy, Summary, TurnEvent, TurnReply,
        TurnRequest, TurnStream,
    };
    pub use crate::store::{
        ConversationStore, ConversationStoreExt, Cursor, DeleteReport, DeleteScope, Page,
        PageRequest, SessionScope,
    };
    pub use crate::types::{
        Message, MessageMetadata, Persona, Role, Session, SessionStatus, Usage,
    };
}

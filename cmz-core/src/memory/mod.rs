//! In-memory backends: the embedded default, and the reference for every other backend.
//!
//! [`InMemoryConversationStore`] and [`InMemoryPersonaDirectory`] keep everything in the
//! process; [`OfflinePersonaModel`] answers without a network or an LLM.

mod care;
mod conversations;
mod log;
mod offline;
mod personas;

pub use care::InMemoryCareStore;
pub use conversations::InMemoryConversationStore;
pub use offline::OfflinePersonaModel;
pub use personas::InMemoryPersonaDirectory;

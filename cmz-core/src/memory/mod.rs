//! In-memory backends: the embedded default, and the reference for every other backend.

mod conversations;
mod log;
mod personas;

pub use conversations::InMemoryConversationStore;
pub use personas::InMemoryPersonaDirectory;

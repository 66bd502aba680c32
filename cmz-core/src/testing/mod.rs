//! Test support shared by every backend: the store conformance suite and a scripted chat
//! model. Enabled by the `testing` feature (and in cmz-core's own tests).
//!
//! A backend's test calls the whole suite against its own store:
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! use cmz_core::memory::InMemoryConversationStore;
//! use cmz_core::testing::{run_conversation_store_suite, SuiteOptions};
//!
//! let store = InMemoryConversationStore::new();
//! let options = SuiteOptions { long_session_messages: 200, ..SuiteOptions::default() };
//! run_conversation_store_suite(std::sync::Arc::new(store), &options).await;
//! # });
//! ```

mod auth_suite;
mod care_suite;
mod long_conversation;
mod model_suite;
mod relay_suite;
mod scripted;
mod store_suite;

pub use auth_suite::*;
pub use care_suite::*;
pub use long_conversation::*;
pub use model_suite::*;
pub use relay_suite::*;
pub use scripted::{Failure, ScriptedModel, Step};
pub use store_suite::*;

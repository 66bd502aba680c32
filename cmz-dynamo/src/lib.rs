#![doc = include_str!("../README.md")]

mod attr;
mod auth;
mod backend;
mod batch;
mod care;
mod config;
mod conversations;
mod error;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod migrate;
mod personas;
mod tables;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use auth::{
    DynamoFamilyDirectory, DynamoRateLimitStore, DynamoRevocationStore, DynamoUserStore,
};
pub use backend::{CapacityReport, Dynamo};
pub use care::DynamoCareStore;
pub use config::{DynamoSettings, TABLE_VARIABLES, TableNames};
pub use conversations::DynamoConversationStore;
pub use personas::DynamoPersonaDirectory;
pub use tables::{
    ANIMAL_INDEX, EMAIL_INDEX, ENSURE_TABLES_COMMAND, EnsureOptions, IndexBilling, RETIRED_INDEXES,
    TTL_ATTRIBUTE, TURN_KEY_INDEX, TableChange, TableEvent, TableProblem, TablesReport, USER_INDEX,
    check_tables, ensure_tables, ensure_tables_with_options, ensure_tables_with_progress,
};

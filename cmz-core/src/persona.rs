//! Where animal personas come from.

use std::fmt::Debug;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::AnimalId;
use crate::types::Persona;

/// Looks up the persona that speaks for an animal.
///
/// # Contract
/// - `persona` returns `None` for an unknown animal (the caller turns that into
///   `not_found`), never an error.
/// - `list` returns every persona, ordered by animal id.
/// - A backend failure is `unavailable` with the backend's error as its source.
/// - Every method may be called concurrently.
#[async_trait]
pub trait PersonaDirectory: Debug + Send + Sync + 'static {
    /// The persona of `animal`, if there is one.
    async fn persona(&self, animal: &AnimalId) -> Result<Option<Persona>>;

    /// All personas, ordered by animal id.
    async fn list(&self) -> Result<Vec<Persona>>;
}

/// A shared, type-erased persona directory.
pub type DynPersonaDirectory = Arc<dyn PersonaDirectory>;

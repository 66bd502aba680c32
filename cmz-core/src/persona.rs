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

/// Conveniences on every [`PersonaDirectory`] (a blanket implementation).
#[async_trait]
pub trait PersonaDirectoryExt: PersonaDirectory {
    /// The persona of an animal children may chat with now (one that exists and is
    /// [offered](Persona::is_offered)), else `not_found` naming the animal.
    async fn require(&self, animal: &AnimalId) -> Result<Persona> {
        self.persona(animal)
            .await?
            .filter(Persona::is_offered)
            .ok_or_else(|| crate::Error::not_found(format!("animal {animal}")))
    }

    /// The animals children may chat with now, ordered by animal id.
    async fn offered(&self) -> Result<Vec<Persona>> {
        let mut personas = self.list().await?;
        personas.retain(Persona::is_offered);
        Ok(personas)
    }
}

impl<T: PersonaDirectory + ?Sized> PersonaDirectoryExt for T {}

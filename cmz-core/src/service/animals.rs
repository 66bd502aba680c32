//! The animals children may chat with: the persona directory read through the service, so
//! every front end offers the same ones (deleted and hidden animals never).

use super::*;

impl ConversationService {
    /// The animals offered for chat now, ordered by animal id. Public data: anyone may
    /// list them (the legacy animal list needs no login).
    #[tracing::instrument(name = "cmz.animals", skip_all)]
    pub async fn animals(&self) -> Result<Vec<Persona>> {
        self.inner.personas.offered().await
    }

    /// One offered animal; `not_found` for an unknown, hidden or deleted one.
    #[tracing::instrument(name = "cmz.animal", skip_all, fields(animal = %animal))]
    pub async fn animal(&self, animal: &AnimalId) -> Result<Persona> {
        self.inner.personas.require(animal).await
    }
}

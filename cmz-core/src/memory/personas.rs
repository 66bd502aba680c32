use std::collections::BTreeMap;
use std::sync::RwLock;

use async_trait::async_trait;

use crate::error::Result;
use crate::ids::AnimalId;
use crate::persona::PersonaDirectory;
use crate::types::Persona;

/// Personas held in memory, ordered by animal id.
#[derive(Debug, Default)]
pub struct InMemoryPersonaDirectory {
    personas: RwLock<BTreeMap<AnimalId, Persona>>,
}

impl InMemoryPersonaDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory holding `personas`.
    pub fn with_personas(personas: impl IntoIterator<Item = Persona>) -> Self {
        let directory = Self::new();
        for persona in personas {
            directory.upsert(persona);
        }
        directory
    }

    /// Adds or replaces a persona.
    pub fn upsert(&self, persona: Persona) {
        self.personas
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(persona.animal_id.clone(), persona);
    }
}

#[async_trait]
impl PersonaDirectory for InMemoryPersonaDirectory {
    async fn persona(&self, animal: &AnimalId) -> Result<Option<Persona>> {
        let personas = self.personas.read().unwrap_or_else(|p| p.into_inner());
        Ok(personas.get(animal).cloned())
    }

    async fn list(&self) -> Result<Vec<Persona>> {
        let personas = self.personas.read().unwrap_or_else(|p| p.into_inner());
        Ok(personas.values().cloned().collect())
    }
}

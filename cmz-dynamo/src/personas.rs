//! `DynamoPersonaDirectory`: animal personas from the legacy animal table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::ReturnConsumedCapacity;
use cmz_core::Result;
use cmz_core::ids::AnimalId;
use cmz_core::persona::PersonaDirectory;
use cmz_core::types::Persona;
use tokio::sync::Mutex;

use crate::attr::{Item, Reader, from_json, s};
use crate::backend::Dynamo;
use crate::error::map_sdk;

/// How long the full listing is reused before the table is read again.
const LIST_CACHE: Duration = Duration::from_secs(60);

/// The full listing and when it was read.
type CachedList = (Instant, Vec<Persona>);

/// Personas from the animal table (`ANIMAL_DYNAMO_TABLE_NAME`, hash key `animalId`):
/// `name`, `personality`, `facts` (a list, or one string with a fact per line) and
/// optional `guidelines`.
///
/// `persona` is one `GetItem`. `list` reads the whole (small) table and keeps the result
/// for a minute, so a page that lists animals does not scan on every request.
#[derive(Debug, Clone)]
pub struct DynamoPersonaDirectory {
    db: Dynamo,
    listed: Arc<Mutex<Option<CachedList>>>,
}

impl DynamoPersonaDirectory {
    /// The directory on `db`'s animal table.
    pub fn new(db: Dynamo) -> Self {
        Self {
            db,
            listed: Arc::new(Mutex::new(None)),
        }
    }

    /// Creates or replaces a persona (for seeding and tests).
    #[tracing::instrument(name = "dynamodb.put_persona", skip_all, fields(animal = %persona.animal_id))]
    pub async fn put(&self, persona: &Persona) -> Result<()> {
        let table = &self.db.inner.tables.animals;
        let mut item = Item::new();
        item.insert("animalId".into(), s(persona.animal_id.as_str()));
        item.insert("name".into(), s(persona.name.clone()));
        item.insert("personality".into(), s(persona.personality.clone()));
        item.insert("facts".into(), from_json(&serde_json::json!(persona.facts)));
        if !persona.guidelines.is_empty() {
            item.insert(
                "guidelines".into(),
                from_json(&serde_json::json!(persona.guidelines)),
            );
        }
        self.db
            .inner
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        *self.listed.lock().await = None;
        Ok(())
    }
}

fn lines(reader: &Reader<'_>, key: &str) -> Vec<String> {
    match reader.opt_str(key) {
        Some(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
        None => reader.str_list(key),
    }
}

fn persona_from_item(item: &Item) -> Result<Persona> {
    let reader = Reader::new(item, "animal");
    let animal_id = AnimalId::new(reader.str("animalId")?)?;
    Ok(Persona {
        name: reader
            .opt_str("name")
            .unwrap_or(animal_id.as_str())
            .to_owned(),
        animal_id,
        personality: reader.opt_str("personality").unwrap_or_default().to_owned(),
        facts: lines(&reader, "facts"),
        guidelines: lines(&reader, "guidelines"),
        species: None,
        description: None,
        status: Default::default(),
        system_prompt: None,
        temperature: None,
        model: None,
    })
}

#[async_trait]
impl PersonaDirectory for DynamoPersonaDirectory {
    #[tracing::instrument(name = "dynamodb.persona", skip_all, fields(animal = %animal))]
    async fn persona(&self, animal: &AnimalId) -> Result<Option<Persona>> {
        let item = self
            .db
            .get_item(&self.db.inner.tables.animals, "animalId", animal.as_str())
            .await?;
        item.as_ref().map(persona_from_item).transpose()
    }

    #[tracing::instrument(name = "dynamodb.list_personas", skip_all)]
    async fn list(&self) -> Result<Vec<Persona>> {
        let mut cached = self.listed.lock().await;
        if let Some((at, personas)) = cached.as_ref() {
            if at.elapsed() < LIST_CACHE {
                return Ok(personas.clone());
            }
        }
        let table = &self.db.inner.tables.animals;
        let mut personas = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .db
                .inner
                .client
                .scan()
                .table_name(table)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Total)
                .send()
                .await
                .map_err(|e| map_sdk("Scan", table, e))?;
            self.db.inner.meter.record(page.consumed_capacity(), false);
            for item in page.items() {
                match persona_from_item(item) {
                    Ok(persona) => personas.push(persona),
                    Err(e) => tracing::warn!(error = %e, "skipping an animal item cmz cannot read"),
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        personas.sort_by(|a, b| a.animal_id.cmp(&b.animal_id));
        *cached = Some((Instant::now(), personas.clone()));
        Ok(personas)
    }
}

//! `DynamoPersonaDirectory`: animal personas from the legacy animal table.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use cmz_core::Result;
use cmz_core::ids::AnimalId;
use cmz_core::persona::PersonaDirectory;
use cmz_core::types::{AnimalStatus, Persona};
use tokio::sync::Mutex;

use crate::attr::{Item, Reader, from_json, s};
use crate::backend::Dynamo;
use crate::error::map_sdk;

/// How long the full listing is reused before the table is read again.
const LIST_CACHE: Duration = Duration::from_secs(60);

/// The full listing and when it was read.
type CachedList = (Instant, Vec<Persona>);

/// Personas from the animal table (`ANIMAL_DYNAMO_TABLE_NAME`, hash key `animalId`), read
/// as the legacy animal service writes them: `name`, `species`, `description`,
/// `personality` (a map `{description}`, or a plain string in older items),
/// `configuration.systemPrompt` (the persona text when set), `configuration.temperature`
/// and `configuration.aiModel` (passed to the model), and the status (`softDelete`,
/// `status`, `configuration.status`, `active`: only active animals are offered). cmz's own
/// `facts` (a list, or one string with a fact per line) and `guidelines` are read too.
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

    /// Creates or replaces a persona (for seeding and tests), in the legacy animal item
    /// shape: `personality` as a map `{description}`, the configured prompt, temperature and
    /// model under `configuration`, plus cmz's `facts` and `guidelines`.
    #[tracing::instrument(name = "dynamodb.put_persona", skip_all, fields(animal = %persona.animal_id))]
    pub async fn put(&self, persona: &Persona) -> Result<()> {
        let table = &self.db.inner.tables.animals;
        self.db
            .inner
            .client
            .put_item()
            .table_name(table)
            .set_item(Some(persona_item(persona)))
            .send()
            .await
            .map_err(|e| map_sdk("PutItem", table, e))?;
        *self.listed.lock().await = None;
        Ok(())
    }
}

fn persona_item(persona: &Persona) -> Item {
    let mut item = Item::new();
    item.insert("animalId".into(), s(persona.animal_id.as_str()));
    item.insert("name".into(), s(persona.name.clone()));
    item.insert(
        "personality".into(),
        from_json(&serde_json::json!({ "description": persona.personality })),
    );
    item.insert("facts".into(), from_json(&serde_json::json!(persona.facts)));
    if !persona.guidelines.is_empty() {
        item.insert(
            "guidelines".into(),
            from_json(&serde_json::json!(persona.guidelines)),
        );
    }
    if let Some(species) = &persona.species {
        item.insert("species".into(), s(species.clone()));
    }
    if let Some(description) = &persona.description {
        item.insert("description".into(), s(description.clone()));
    }
    item.insert("status".into(), s(persona.status.as_str()));
    item.insert(
        "softDelete".into(),
        AttributeValue::Bool(persona.status == AnimalStatus::Deleted),
    );
    let mut configuration = serde_json::Map::new();
    if let Some(prompt) = &persona.system_prompt {
        configuration.insert("systemPrompt".into(), prompt.clone().into());
    }
    if let Some(temperature) = persona.temperature {
        configuration.insert("temperature".into(), f64::from(temperature).into());
    }
    if let Some(model) = &persona.model {
        configuration.insert("aiModel".into(), model.clone().into());
    }
    if !configuration.is_empty() {
        item.insert(
            "configuration".into(),
            from_json(&serde_json::Value::Object(configuration)),
        );
    }
    item
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

fn non_empty(value: Option<&str>) -> Option<String> {
    value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// A number stored as `N`, or as a string of one (forms sometimes save `"0.7"`).
fn number(value: Option<&AttributeValue>) -> Option<f64> {
    match value? {
        AttributeValue::N(n) | AttributeValue::S(n) => n.trim().parse().ok(),
        _ => None,
    }
}

/// Whether the legacy item says the animal is offered. Not offered: `softDelete: true`,
/// `active: false`, or a `status` (top level or under `configuration`) other than
/// `active`; an unknown status counts as hidden.
fn status_of(reader: &Reader<'_>, configuration: &Reader<'_>) -> AnimalStatus {
    if reader.bool("softDelete") {
        return AnimalStatus::Deleted;
    }
    let mut status = AnimalStatus::Active;
    for value in [reader.opt_str("status"), configuration.opt_str("status")]
        .into_iter()
        .flatten()
    {
        match AnimalStatus::parse(value).unwrap_or(AnimalStatus::Hidden) {
            AnimalStatus::Deleted => return AnimalStatus::Deleted,
            AnimalStatus::Active => {}
            other => status = other,
        }
    }
    if matches!(reader.get("active"), Some(AttributeValue::Bool(false))) {
        status = AnimalStatus::Hidden;
    }
    status
}

/// Reads an animal item as the legacy animal service writes it (`personality` a map
/// `{description}` or a plain string, `configuration.{systemPrompt, temperature, aiModel,
/// status}`, `species`, `description`, `status`, `active`, `softDelete`), and cmz's own
/// `facts` and `guidelines`.
pub(crate) fn persona_from_item(item: &Item) -> Result<Persona> {
    let reader = Reader::new(item, "animal");
    let animal_id = AnimalId::new(reader.str("animalId")?)?;
    let empty = Item::new();
    let configuration = match reader.get("configuration") {
        Some(AttributeValue::M(map)) => map,
        _ => &empty,
    };
    let configuration = Reader::new(configuration, "animal configuration");
    let personality = match reader.get("personality") {
        Some(AttributeValue::M(map)) => Reader::new(map, "animal personality")
            .opt_str("description")
            .unwrap_or_default()
            .to_owned(),
        Some(AttributeValue::S(text)) => text.clone(),
        _ => String::new(),
    };
    let status = status_of(&reader, &configuration);
    Ok(Persona {
        name: non_empty(reader.opt_str("name")).unwrap_or_else(|| animal_id.as_str().to_owned()),
        animal_id,
        personality,
        facts: lines(&reader, "facts"),
        guidelines: lines(&reader, "guidelines"),
        species: non_empty(reader.opt_str("species")),
        description: non_empty(reader.opt_str("description")),
        status,
        system_prompt: non_empty(configuration.opt_str("systemPrompt")),
        // Out-of-range values are not passed on: the provider would refuse the request.
        temperature: number(configuration.get("temperature"))
            .filter(|t| (0.0..=2.0).contains(t))
            .map(|t| t as f32),
        model: non_empty(configuration.opt_str("aiModel")),
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

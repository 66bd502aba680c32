//! The animals: the legacy public list (`GET /animal_list`, `GET /animal/{animalId}`),
//! cmz's own `GET /animals`, and what `animalId: "default"` means in a turn.

use axum::Json;
use axum::extract::{Path, State};
use cmz_core::ids::AnimalId;
use cmz_core::types::{AnimalStatus, Persona};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ApiError, ApiQuery};
use crate::state::AppState;

type ApiResult<T> = Result<T, ApiError>;

/// The animal id the legacy chat page sends when it was opened without one.
pub(crate) const DEFAULT_ANIMAL: &str = "default";

/// One animal as the legacy `Animal` schema has it: public persona data only (no prompt,
/// model or other configuration).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublicAnimal<'a> {
    animal_id: &'a AnimalId,
    name: &'a str,
    /// Empty when the directory does not know it (the legacy schema requires the field).
    species: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    /// A plain string, as the legacy list sends it and the page shows it.
    personality: &'a str,
    soft_delete: bool,
}

impl<'a> PublicAnimal<'a> {
    fn of(persona: &'a Persona) -> Self {
        Self {
            animal_id: &persona.animal_id,
            name: &persona.name,
            species: persona.species.as_deref().unwrap_or(""),
            status: persona.status.as_str(),
            description: persona.description.as_deref(),
            personality: &persona.personality,
            soft_delete: persona.status == AnimalStatus::Deleted,
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct AnimalListQuery {
    status: Option<String>,
}

/// `GET /animal_list`: the offered animals as a bare array (public, as in the legacy
/// service: the first screen a visitor sees, before any login).
pub(crate) async fn animal_list(
    State(state): State<AppState>,
    ApiQuery(q): ApiQuery<AnimalListQuery>,
) -> ApiResult<Json<Value>> {
    let status = q.status.filter(|s| !s.is_empty());
    if let Some(status) = &status {
        if !matches!(
            status.as_str(),
            "active" | "inactive" | "hidden" | "breeding" | "retired"
        ) {
            return Err(ApiError::validation(
                "status",
                "status must be active, inactive, hidden, breeding or retired",
            ));
        }
    }
    // Only offered animals are public; asking for any other status lists none.
    let wanted = status.is_none_or(|s| s == "active");
    let personas = if wanted {
        state.conversations().animals().await?
    } else {
        Vec::new()
    };
    let animals: Vec<PublicAnimal<'_>> = personas.iter().map(PublicAnimal::of).collect();
    Ok(Json(json!(animals)))
}

/// `GET /animal/{animalId}`: one offered animal (public, the same fields as the list);
/// `404` for an unknown, hidden or deleted one.
pub(crate) async fn animal_get(
    State(state): State<AppState>,
    Path(animal): Path<String>,
) -> ApiResult<Json<Value>> {
    let animal = AnimalId::new(animal)?;
    let persona = state.conversations().animal(&animal).await?;
    Ok(Json(json!(PublicAnimal::of(&persona))))
}

/// `GET /animals`: the personas one can chat with (the offered ones), in cmz's shape.
pub(crate) async fn animals(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let personas = state.conversations().animals().await?;
    Ok(Json(json!({ "animals": personas })))
}

/// The animal a turn talks to: `default` means the configured default animal
/// ([`HttpSettings::default_animal`](crate::HttpSettings::default_animal)), else an animal
/// whose id is `default`, else the offered animal with the smallest id.
pub(crate) async fn resolve_animal(state: &AppState, animal: String) -> ApiResult<String> {
    if animal != DEFAULT_ANIMAL {
        return Ok(animal);
    }
    if let Some(configured) = &state.inner.settings.default_animal {
        return Ok(configured.to_string());
    }
    let conversations = state.conversations();
    match conversations.animal(&AnimalId::new(DEFAULT_ANIMAL)?).await {
        Ok(_) => return Ok(animal),
        Err(error) if error.code() != cmz_core::Code::NotFound => return Err(error.into()),
        Err(_) => {}
    }
    // Offered animals come ordered by id.
    conversations
        .animals()
        .await?
        .into_iter()
        .next()
        .map(|p| p.animal_id.to_string())
        .ok_or_else(|| ApiError::new("not_found", "no animal is offered"))
}

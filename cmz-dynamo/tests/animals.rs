//! Animal items as the legacy animal service writes them (written here by boto3, the way
//! the legacy service's pynamodb model stores them) are read by the persona directory, and
//! their configuration reaches the model.

use std::process::Command;
use std::sync::Arc;

use cmz_core::access::{OwnerOrAdminPolicy, Principal, UserRole};
use cmz_core::ids::{AnimalId, UserId};
use cmz_core::memory::InMemoryConversationStore;
use cmz_core::persona::PersonaDirectory;
use cmz_core::service::{ConversationConfig, ConversationService, TurnRequest};
use cmz_core::testing::ScriptedModel;
use cmz_core::types::AnimalStatus;
use cmz_dynamo::DynamoPersonaDirectory;
use cmz_dynamo::testing::{isolated, shared_endpoint};

/// Puts the legacy-shaped animal items with boto3's low-level client (numbers as `N`,
/// maps as `M`, as pynamodb writes them).
const WRITE_ANIMALS: &str = r#"
import sys, boto3
endpoint, table = sys.argv[1], sys.argv[2]
db = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-west-2",
                  aws_access_key_id="local", aws_secret_access_key="local")
S = lambda v: {"S": v}
N = lambda v: {"N": str(v)}
B = lambda v: {"BOOL": v}
M = lambda **kv: {"M": kv}
audit = M(at=S("2025-10-01T10:00:00Z"), by=M(userId=S("admin"), email=S("admin@cmz.org")))
items = [
    {"animalId": S("leo_001"), "name": S("Leo"), "species": S("Panthera leo"),
     "description": S("Our pride leader."), "status": S("active"), "softDelete": B(False),
     "personality": M(description=S("Proud and warm, a little sleepy.")),
     "configuration": M(systemPrompt=S("You are Leo the lion at Cougar Mountain Zoo. Roar softly."),
                        aiModel=S("gpt-4o"), temperature=N("0.3"), topP=N(1),
                        voice=S("alloy"), toolsEnabled={"L": []}, guardrails=M()),
     "created": audit, "modified": audit},
    {"animalId": S("pokey"), "name": S("Pokey"), "personality": S("Shy, proud of his quills.")},
    {"animalId": S("charlie_003"), "name": S("Charlie"), "species": S("Elephant"),
     "status": S("active"), "softDelete": B(True),
     "personality": M(description=S("Gentle.")), "configuration": M(status=S("deleted")),
     "deleted": audit},
    {"animalId": S("bella_002"), "name": S("Bella"), "species": S("Black bear"),
     "status": S("hidden"), "softDelete": B(False), "personality": M(description=S("Curious."))},
    {"animalId": S("otto_004"), "name": S("Otto"), "species": S("Otter"), "active": B(False),
     "personality": M(description=S("Playful.")),
     "configuration": M(temperature=S("0.9"), aiModel=S("")) },
    {"animalId": S("rex_005"), "name": S("Rex"), "species": S("Red fox"),
     "personality": M(), "configuration": M(temperature=N("7"), systemPrompt=S("   "))},
]
for item in items:
    db.put_item(TableName=table, Item=item)
"#;

fn write_animals(table: &str) {
    let out = Command::new("python3")
        .args(["-c", WRITE_ANIMALS, &shared_endpoint(), table])
        .output()
        .expect("python3 with boto3 (pip install boto3)");
    assert!(
        out.status.success(),
        "boto3 failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn animal(id: &str) -> AnimalId {
    AnimalId::new(id).unwrap()
}

#[tokio::test]
async fn legacy_animal_items_are_read_with_their_configuration_and_status() {
    let dynamo = isolated().await;
    write_animals(&dynamo.tables().animals);
    let directory = DynamoPersonaDirectory::new(dynamo.clone());

    let leo = directory
        .persona(&animal("leo_001"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(leo.name, "Leo");
    assert_eq!(leo.personality, "Proud and warm, a little sleepy.");
    assert_eq!(leo.species.as_deref(), Some("Panthera leo"));
    assert_eq!(leo.description.as_deref(), Some("Our pride leader."));
    assert_eq!(leo.status, AnimalStatus::Active);
    assert_eq!(
        leo.system_prompt.as_deref(),
        Some("You are Leo the lion at Cougar Mountain Zoo. Roar softly.")
    );
    assert_eq!(leo.temperature, Some(0.3));
    assert_eq!(leo.model.as_deref(), Some("gpt-4o"));

    let pokey = directory.persona(&animal("pokey")).await.unwrap().unwrap();
    assert_eq!(pokey.personality, "Shy, proud of his quills.");
    assert_eq!(pokey.status, AnimalStatus::Active, "no status means active");
    assert_eq!(
        (pokey.system_prompt, pokey.temperature, pokey.model),
        (None, None, None)
    );

    let status = |id: &'static str| {
        let directory = directory.clone();
        async move {
            directory
                .persona(&animal(id))
                .await
                .unwrap()
                .unwrap()
                .status
        }
    };
    assert_eq!(status("charlie_003").await, AnimalStatus::Deleted);
    assert_eq!(status("bella_002").await, AnimalStatus::Hidden);
    assert_eq!(
        status("otto_004").await,
        AnimalStatus::Hidden,
        "active: false"
    );

    let otto = directory
        .persona(&animal("otto_004"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        otto.temperature,
        Some(0.9),
        "a temperature saved as a string"
    );
    assert_eq!(otto.model, None, "an empty model is no model");
    let rex = directory
        .persona(&animal("rex_005"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        rex.temperature, None,
        "an out-of-range temperature is not passed on"
    );
    assert_eq!(rex.system_prompt, None, "a blank prompt is no prompt");
    assert_eq!(rex.personality, "");

    let listed = directory.list().await.unwrap();
    let ids: Vec<_> = listed.iter().map(|p| p.animal_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "bella_002",
            "charlie_003",
            "leo_001",
            "otto_004",
            "pokey",
            "rex_005"
        ]
    );
    let offered: Vec<_> = listed
        .iter()
        .filter(|p| p.is_offered())
        .map(|p| p.animal_id.as_str())
        .collect();
    assert_eq!(offered, ["leo_001", "pokey", "rex_005"]);

    // A persona written by cmz reads back the same.
    let mut copy = leo.clone();
    copy.animal_id = animal("leo_copy");
    directory.put(&copy).await.unwrap();
    assert_eq!(
        directory.persona(&animal("leo_copy")).await.unwrap(),
        Some(copy)
    );
}

#[tokio::test]
async fn a_turn_uses_the_configured_prompt_model_and_temperature_and_refuses_deleted_animals() {
    let dynamo = isolated().await;
    write_animals(&dynamo.tables().animals);
    let model = ScriptedModel::echo();
    let service = ConversationService::with(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(DynamoPersonaDirectory::new(dynamo.clone())),
        Arc::new(model.clone()),
        Arc::new(OwnerOrAdminPolicy),
        ConversationConfig::default(),
    );
    let child = Principal::new(UserId::new("test+tag_cmz_org").unwrap(), UserRole::Student);
    service
        .turn(&child, TurnRequest::new(animal("leo_001"), "Do you roar?"))
        .await
        .unwrap();
    let request = model.last_request().unwrap();
    assert_eq!(request.model.as_deref(), Some("gpt-4o"));
    assert_eq!(request.temperature, Some(0.3));
    let system = &request.messages[0].content;
    assert!(system.starts_with("You are Leo the lion at Cougar Mountain Zoo. Roar softly."));
    assert!(
        system.contains("GUIDELINES:"),
        "safety rules appended: {system}"
    );

    let calls = model.calls();
    for gone in ["charlie_003", "bella_002", "otto_004", "nobody"] {
        let err = service
            .turn(&child, TurnRequest::new(animal(gone), "hello?"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "not_found", "{gone}");
    }
    assert_eq!(model.calls(), calls);
}

#[tokio::test]
async fn the_dynamodb_persona_directory_meets_the_persona_contract() {
    let dynamo = isolated().await;
    let directory = DynamoPersonaDirectory::new(dynamo);
    let mut hidden = cmz_core::types::Persona::new(animal("bella_002"), "Bella");
    hidden.status = AnimalStatus::Hidden;
    let mut configured = cmz_core::types::Persona::new(animal("leo_001"), "Leo");
    configured.personality = "Proud and warm.".into();
    configured.facts = vec!["Lions sleep twenty hours a day.".into()];
    configured.species = Some("Panthera leo".into());
    configured.temperature = Some(0.3);
    let expected = [
        configured,
        hidden,
        cmz_core::types::Persona::new(animal("charlie_003"), "Charlie"),
    ];
    for persona in &expected {
        directory.put(persona).await.unwrap();
    }
    cmz_core::testing::check_persona_directory(&directory, &expected).await;
}

//! A short conversation with an animal persona on the in-memory store and the scripted
//! model, printing the history and the token usage.
//!
//! Run it with `cargo run -p cmz-examples --bin conversation`.

use std::sync::Arc;

use cmz_core::prelude::*;
use cmz_core::testing::ScriptedModel;
use futures::StreamExt as _;

#[tokio::main]
async fn main() -> Result<()> {
    let otter = AnimalId::new("otter")?;
    let personas = InMemoryPersonaDirectory::with_personas([Persona {
        personality: "playful, quick and a little bit silly".into(),
        facts: vec![
            "Otters hold hands while they sleep so they don't drift apart.".into(),
            "My fur has about a million hairs per square inch.".into(),
        ],
        guidelines: vec![],
        ..Persona::new(otter.clone(), "Ollie the River Otter")
    }]);
    // Scripted replies stand in for an LLM, in order: three turns, then the summary.
    let model = ScriptedModel::echo();
    for reply in [
        "Hi there! I'm Ollie! I love sliding down muddy banks. What's your name?",
        "Nice to meet you! Did you know otters hold hands while they sleep?",
        "My fur is super thick: about a million hairs in a space the size of a stamp!",
        "Sam met Ollie the otter and learned how otters sleep and why their fur is so thick.",
    ] {
        model.push(cmz_core::testing::Step::Reply(reply.into()));
    }
    let service = ConversationService::new(
        Arc::new(InMemoryConversationStore::new()),
        Arc::new(personas),
        Arc::new(model),
    );
    let child = Principal::new(UserId::new("demo_child")?, UserRole::Student);

    let first = service
        .turn(&child, TurnRequest::new(otter.clone(), "Hello Ollie!"))
        .await?;
    let session = first.session_id.clone();
    service
        .turn(
            &child,
            TurnRequest::new(otter.clone(), "I'm Sam. Do otters sleep?")
                .in_session(session.clone()),
        )
        .await?;

    // The third turn streams, as a chat page would show it.
    print!("streaming turn 3: ");
    let mut stream = service
        .stream_turn(
            &child,
            TurnRequest::new(otter.clone(), "Why are you so fluffy?").in_session(session.clone()),
        )
        .await?;
    while let Some(event) = stream.next().await {
        match event? {
            TurnEvent::Delta(text) => print!("{text}"),
            TurnEvent::Complete(reply) => println!("\n(stored as turn {})", reply.turn),
        }
    }

    println!("\nSession {session}");
    let history = service
        .history(&child, &session, PageRequest::first(100))
        .await?;
    let mut total = Usage::default();
    for message in &history.items {
        let who = match message.role {
            Role::User => "Sam",
            _ => "Ollie",
        };
        println!("  #{:<2} {who:>5}: {}", message.seq, message.content);
        if let Some(usage) = message.metadata.usage() {
            total.prompt_tokens += usage.prompt_tokens;
            total.completion_tokens += usage.completion_tokens;
        }
    }
    let summary = service.summarize(&child, &session).await?;
    println!("Summary: {}", summary.text);
    println!(
        "Usage: {} prompt + {} completion = {} tokens over {} messages",
        total.prompt_tokens,
        total.completion_tokens,
        total.total(),
        history.items.len()
    );
    Ok(())
}

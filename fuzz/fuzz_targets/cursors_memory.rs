//! The in-memory store's cursors (history pages and session listings), on a small store:
//! any cursor string is refused with `validation_error` or continues the listing it was
//! made for, never widening it (a user's listing shows only that user's sessions, a
//! session's history only its messages); the store's own cursors page through everything
//! exactly once; nothing panics.

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cmz_core::ids::{AnimalId, SessionId, UserId};
use cmz_core::memory::InMemoryConversationStore;
use cmz_core::store::{ConversationStore, Cursor, Page, PageRequest, SessionScope, TurnAppend};
use cmz_core::types::{NewMessage, Role, Session};
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;

const USERS: &[&str] = &["ana", "leo", "kim"];
const ANIMALS: &[&str] = &["cougar", "porcupine"];

struct Fixture {
    store: InMemoryConversationStore,
    sessions: Vec<Session>,
}

/// Six sessions (each user with each animal), with 0 to 7 turns each.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let store = InMemoryConversationStore::new();
        let mut sessions = Vec::new();
        for (i, user) in USERS.iter().enumerate() {
            for (j, animal) in ANIMALS.iter().enumerate() {
                let user = UserId::new(*user).unwrap();
                let animal = AnimalId::new(*animal).unwrap();
                let id = SessionId::with_suffix(&animal, &user, (i * 2 + j) as u32).unwrap();
                let session = Session::new(id.clone(), user, animal, "Animal");
                block_on(store.create_session(&session)).unwrap();
                for turn in 0..(i * 3 + j * 2) as u64 {
                    block_on(store.append_turn(TurnAppend {
                        session_id: id.clone(),
                        expected_count: turn * 2,
                        messages: vec![
                            NewMessage::new(Role::User, "question"),
                            NewMessage::new(Role::Assistant, "answer"),
                        ],
                        turn_key: None,
                        new_session: None,
                        began_at: chrono::Utc::now(),
                    }))
                    .unwrap();
                }
                sessions.push(block_on(store.get_session(&id)).unwrap().unwrap());
            }
        }
        Fixture { store, sessions }
    })
}

#[derive(Debug)]
enum CursorText {
    /// Any string.
    Raw(String),
    /// The base64url of any text (lines become the cursor's parts).
    Encoded(String),
    /// The cursor the store handed out after `pages` pages of another listing.
    FromListing { listing: u8, limit: u8, pages: u8 },
}

/// The input: bytes `listing`, `limit` and `mode`, then text. Listings are the six
/// sessions' histories, then the users', then the animals' session lists. `mode % 3`: 0
/// the text is the cursor; 1 it is base64url-encoded into one; 2 three more bytes choose
/// another listing, a page size and a number of pages, and the cursor is the one the store
/// handed out there.
fn parse(data: &[u8]) -> Option<(u8, usize, CursorText)> {
    let [listing, limit, mode, rest @ ..] = data else {
        return None;
    };
    let text = || String::from_utf8_lossy(rest).into_owned();
    let cursor = match mode % 3 {
        0 => CursorText::Raw(text()),
        1 => CursorText::Encoded(text()),
        _ => {
            let [from, from_limit, pages, ..] = rest else {
                return None;
            };
            CursorText::FromListing {
                listing: *from,
                limit: *from_limit,
                pages: *pages,
            }
        }
    };
    Some((*listing, usize::from(*limit), cursor))
}

enum Listing {
    History(SessionId),
    Sessions(SessionScope),
}

fn listing(index: u8) -> Listing {
    let f = fixture();
    let index = usize::from(index) % (f.sessions.len() + USERS.len() + ANIMALS.len());
    if index < f.sessions.len() {
        Listing::History(f.sessions[index].id.clone())
    } else if index < f.sessions.len() + USERS.len() {
        let user = USERS[index - f.sessions.len()];
        Listing::Sessions(SessionScope::User(UserId::new(user).unwrap()))
    } else {
        let animal = ANIMALS[index - f.sessions.len() - USERS.len()];
        Listing::Sessions(SessionScope::Animal(AnimalId::new(animal).unwrap()))
    }
}

/// One page: the item keys (history: sequence numbers; sessions: ids) and the next cursor.
fn page(
    listing: &Listing,
    request: PageRequest,
) -> cmz_core::Result<(Vec<String>, Option<Cursor>)> {
    let store = &fixture().store;
    match listing {
        Listing::History(id) => {
            let Page { items, next } = block_on(store.history(id, request))?;
            for message in &items {
                assert_eq!(&message.session_id, id, "a message of another session");
            }
            let seqs: Vec<u64> = items.iter().map(|m| m.seq).collect();
            assert!(seqs.windows(2).all(|w| w[0] < w[1]), "history out of order");
            Ok((seqs.iter().map(u64::to_string).collect(), next))
        }
        Listing::Sessions(scope) => {
            let Page { items, next } = block_on(store.list_sessions(scope.clone(), request))?;
            for session in &items {
                match scope {
                    SessionScope::User(user) => {
                        assert_eq!(&session.user_id, user, "another user's session")
                    }
                    SessionScope::Animal(animal) => {
                        assert_eq!(&session.animal_id, animal, "another animal's session")
                    }
                }
            }
            Ok((items.iter().map(|s| s.id.to_string()).collect(), next))
        }
    }
}

/// Every key of a listing, paging with `limit`; checks each item comes exactly once.
fn walk(
    listing: &Listing,
    limit: usize,
    stop_after: Option<usize>,
) -> (Vec<String>, Option<Cursor>) {
    let mut all = Vec::new();
    let mut cursor = None;
    for pages in 0.. {
        if stop_after == Some(pages) {
            return (all, cursor);
        }
        let request = PageRequest {
            limit,
            cursor: cursor.take(),
        };
        let (keys, next) = page(listing, request).expect("the store's own cursor is accepted");
        all.extend(keys);
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
        assert!(pages < 1000, "paging does not end");
    }
    (all, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((target, limit, cursor)) = parse(data) else {
        return;
    };
    let target = listing(target);
    let cursor = match cursor {
        CursorText::Raw(text) => Cursor::from_client(text),
        CursorText::Encoded(text) => Cursor::from_client(URL_SAFE_NO_PAD.encode(text)),
        CursorText::FromListing {
            listing: from,
            limit: from_limit,
            pages,
        } => {
            let from = listing(from);
            let from_limit = usize::from(from_limit % 8).max(1);
            let (_, cursor) = walk(&from, from_limit, Some(usize::from(pages % 4) + 1));
            let Some(cursor) = cursor else {
                return;
            };
            // The store's own cursors page through their listing exactly once.
            let (everything, _) = walk(&from, 1000, None);
            let (paged, _) = walk(&from, from_limit, None);
            assert_eq!(paged, everything, "paging lost or repeated items");
            cursor
        }
    };
    match page(&target, PageRequest::after(limit, cursor)) {
        Ok((keys, _)) => {
            // An accepted cursor continues within its listing: everything it shows is in
            // the listing read from the start.
            let (everything, _) = walk(&target, 1000, None);
            for key in keys {
                assert!(
                    everything.contains(&key),
                    "a cursor showed an item outside its listing"
                );
            }
        }
        Err(error) => assert_eq!(error.code(), "validation_error"),
    }
});

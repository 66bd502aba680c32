//! The signed DynamoDB cursors (history pages and session listings), read as the store
//! reads them: any string is either refused with `validation_error` or was signed by the
//! store for exactly that session or listing; what the store signs reads back unchanged;
//! nothing panics.

#![no_main]

use std::sync::OnceLock;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use cmz_core::ids::SessionId;
use cmz_core::store::Cursor;
use cmz_dynamo::fuzzing::Cursors;
use libfuzzer_sys::fuzz_target;

fn cursors() -> &'static Cursors {
    static CURSORS: OnceLock<Cursors> = OnceLock::new();
    CURSORS.get_or_init(|| Cursors::new(b"fuzz-cursor-secret-fuzz-cursor-secret"))
}

/// What the input asks for.
#[derive(Debug)]
enum Made {
    /// Any string.
    Raw(String),
    /// The base64url of any text (reaches the part splitting).
    Encoded(String),
    /// A history cursor the store signed, read for `read_as` (or its own session).
    History {
        session: String,
        seq: u64,
        key: u64,
        read_as: Option<String>,
    },
    /// A listing cursor the store signed, read for `read_as` (or its own listing).
    Sessions {
        tag: String,
        at: String,
        session: String,
        read_as: Option<String>,
    },
    /// A signed cursor with its text changed at one byte.
    Tampered {
        inner: Box<Made>,
        at: usize,
        byte: u8,
    },
}

fn number(text: Option<&str>) -> u64 {
    text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// The input: one byte `m`, then text. `m % 5`: 0 the text is a cursor; 1 it is encoded as
/// one; 2 `session \n seq \n key [\n read_as]` is signed as a history cursor; 3 `tag \n
/// at \n session [\n read_as]` as a listing cursor; 4 two more bytes (position, new byte)
/// then as 1 (`m / 5` even) or 2, and the signed cursor is changed at that position.
fn parse(data: &[u8]) -> Option<Made> {
    let (&mode, rest) = data.split_first()?;
    let signed = |kind: u8, text: &[u8]| {
        let text = String::from_utf8_lossy(text);
        let mut lines = text.split('\n');
        let mut next = || lines.next().map(str::to_owned);
        if kind == 0 {
            Made::History {
                session: next().unwrap_or_default(),
                seq: number(next().as_deref()),
                key: number(next().as_deref()),
                read_as: next(),
            }
        } else {
            Made::Sessions {
                tag: next().unwrap_or_default(),
                at: next().unwrap_or_default(),
                session: next().unwrap_or_default(),
                read_as: next(),
            }
        }
    };
    Some(match mode % 5 {
        0 => Made::Raw(String::from_utf8_lossy(rest).into_owned()),
        1 => Made::Encoded(String::from_utf8_lossy(rest).into_owned()),
        2 => signed(0, rest),
        3 => signed(1, rest),
        _ => {
            let [at, byte, rest @ ..] = rest else {
                return None;
            };
            Made::Tampered {
                inner: Box::new(signed(mode / 5 % 2, rest)),
                at: usize::from(*at),
                byte: *byte,
            }
        }
    })
}

fn session(value: &str) -> SessionId {
    SessionId::new(value).unwrap_or_else(|_| SessionId::new("conv_lion_user_00000000").unwrap())
}

fn check_any(cursor: &Cursor, id: &SessionId, tag: &str) {
    if let Err(error) = cursors().read_history(id, cursor) {
        assert_eq!(error.code(), "validation_error");
    }
    if let Err(error) = cursors().read_sessions(tag, cursor) {
        assert_eq!(error.code(), "validation_error");
    }
}

fn run(made: Made) {
    let c = cursors();
    match made {
        Made::Raw(text) => check_any(&Cursor::from_client(text), &session(""), "u:user"),
        Made::Encoded(text) => check_any(
            &Cursor::from_client(URL_SAFE_NO_PAD.encode(text)),
            &session(""),
            "u:user",
        ),
        Made::History {
            session: s,
            seq,
            key,
            read_as,
        } => {
            let id = session(&s);
            let cursor = c.history(&id, seq, key).unwrap();
            let reader = read_as.as_deref().map_or_else(|| id.clone(), session);
            match c.read_history(&reader, &cursor) {
                Ok(read) => {
                    assert_eq!(reader, id, "a history cursor read for another session");
                    assert_eq!(read, (seq, key), "a history cursor reads back unchanged");
                }
                Err(error) => {
                    assert_eq!(error.code(), "validation_error");
                    // Refused only when it is for another session or not a position the
                    // store could have written (the next item is never past `seq + 1`).
                    // A cursor after the last sequence number continues nothing.
                    assert!(
                        reader != id
                            || key == 0
                            || seq == u64::MAX
                            || u128::from(key) > u128::from(seq) + 1
                    );
                }
            }
        }
        Made::Sessions {
            tag,
            at,
            session: s,
            read_as,
        } => {
            let id = session(&s);
            let cursor = c.sessions(&tag, &at, &id).unwrap();
            let reader = read_as.unwrap_or_else(|| tag.clone());
            match c.read_sessions(&reader, &cursor) {
                Ok((read_at, read_id)) => {
                    assert_eq!(reader, tag, "a listing cursor read for another listing");
                    assert_eq!(
                        (read_at.as_str(), read_id.as_str()),
                        (at.as_str(), id.as_str())
                    );
                }
                Err(error) => {
                    assert_eq!(error.code(), "validation_error");
                    // Parts are newline-separated: a tag or time with a newline cannot be
                    // told apart from more parts, and is refused.
                    assert!(reader != tag || tag.contains('\n') || at.contains('\n'));
                }
            }
        }
        Made::Tampered { inner, at, byte } => {
            // What the original cursor says, read back as the store reads it.
            let (cursor, read): (Cursor, Box<dyn Fn(&Cursor) -> Option<String>>) = match *inner {
                Made::History {
                    session: s,
                    seq,
                    key,
                    ..
                } => {
                    let id = session(&s);
                    let cursor = c.history(&id, seq, key).unwrap();
                    (
                        cursor,
                        Box::new(move |cursor| {
                            c.read_history(&id, cursor).ok().map(|r| format!("{r:?}"))
                        }),
                    )
                }
                Made::Sessions {
                    tag,
                    at,
                    session: s,
                    ..
                } => {
                    let id = session(&s);
                    let cursor = c.sessions(&tag, &at, &id).unwrap();
                    (
                        cursor,
                        Box::new(move |cursor| {
                            c.read_sessions(&tag, cursor).ok().map(|r| format!("{r:?}"))
                        }),
                    )
                }
                other => return run(other),
            };
            let original = read(&cursor);
            let mut text = cursor.as_str().as_bytes().to_vec();
            if text.is_empty() {
                return;
            }
            let at = at % text.len();
            text[at] = byte;
            let Ok(text) = String::from_utf8(text) else {
                return;
            };
            // A changed cursor is refused, or (base64's spare bits, hex's letter case)
            // still says exactly what the original said: it never moves a reader.
            if let Some(tampered) = read(&Cursor::from_client(text)) {
                assert_eq!(
                    Some(tampered),
                    original,
                    "a tampered cursor moved the reader"
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(made) = parse(data) {
        run(made);
    }
});

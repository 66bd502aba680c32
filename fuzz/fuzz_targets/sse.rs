//! The OpenAI Chat Completions SSE stream parser (eventsource-stream framing plus cmz's
//! chunk decoding), on any response body cut into any chunks:
//! - it never panics;
//! - a stream is zero or more deltas, then exactly one final item (`Done` or an error),
//!   then nothing;
//! - for a body that is valid UTF-8, where the network cuts it does not change the reply.

#![no_main]

use std::sync::OnceLock;

use bytes::Bytes;
use cmz_core::chat::ChatChunk;
use cmz_openai::{OpenAiChatModel, OpenAiConfig};
use futures::StreamExt as _;
use libfuzzer_sys::fuzz_target;

fn model() -> &'static OpenAiChatModel {
    static MODEL: OnceLock<OpenAiChatModel> = OnceLock::new();
    MODEL.get_or_init(|| OpenAiChatModel::new(OpenAiConfig::default()).unwrap())
}

/// What a consumer sees, comparable across runs: delta texts joined, then the end.
#[derive(Debug, PartialEq)]
struct Reply {
    text: String,
    end: String,
}

fn read(chunks: Vec<Bytes>) -> Reply {
    let items = futures::executor::block_on(
        model()
            .stream_from_body(chunks)
            .unwrap()
            .collect::<Vec<_>>(),
    );
    let (last, deltas) = items
        .split_last()
        .expect("a stream always ends with an item");
    let mut text = String::new();
    for item in deltas {
        match item {
            Ok(ChatChunk::Delta(delta)) => text.push_str(delta),
            Ok(ChatChunk::Done { .. }) => panic!("`Done` before the end of the stream"),
            Err(error) => panic!("an item after the error {}", error.code()),
        }
    }
    let end = match last {
        Ok(ChatChunk::Delta(_)) => panic!("the stream ended without `Done` or an error"),
        Ok(ChatChunk::Done { usage, model }) => format!("done {usage:?} {model:?}"),
        Err(error) => format!("error {}", error.code()),
    };
    Reply { text, end }
}

// The input: one byte, then the response body. The body is read whole, and cut into
// chunks: of `n` = the byte's low 7 bits (0: 1) bytes each, or, when its high bit is
// set, of `n`, `n` + 1, `n` + 2, ... bytes; at most 64 chunks (eventsource-stream parses
// its whole buffer again for each chunk, so tiny chunks of a long body are slow to read).
fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    let n = usize::from(first & 0x7f)
        .max(body.len().div_ceil(64))
        .max(1);
    let growing = first & 0x80 != 0;
    let mut chunks = Vec::new();
    let (mut from, mut size) = (0, n);
    while from < body.len() {
        let to = (from + size).min(body.len());
        chunks.push(body.slice(from..to));
        from = to;
        size += usize::from(growing);
    }

    let whole = read(vec![body.clone()]);
    let pieces = read(chunks);
    if std::str::from_utf8(&body).is_ok() {
        assert_eq!(whole, pieces, "the reply depends on where the body was cut");
    }
});

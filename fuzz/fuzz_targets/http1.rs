//! The HTTP/1.1 connection's request reading (`serve_with`), on any bytes a client may send:
//! - parsing a request head never panics, and keeps to the header limit;
//! - a body framed by `Content-Length` or `chunked` reads the same (the same bytes, the
//!   same end, the same bytes left for the next request, or the same refusal) whether it
//!   arrives at once or a few bytes at a time.
//!
//! The first byte sets how many bytes arrive at a time (1 to 256); the rest is the request.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&step, request)) = data.split_first() else {
        return;
    };
    cmz_tower::check_request(request, usize::from(step) + 1);
});

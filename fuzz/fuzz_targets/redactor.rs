//! The redactor, on any text a child could send: it never panics (a panic would fail the
//! turn), it changes nothing when it finds nothing, what it returns holds a placeholder for
//! every kind it reports, and an email address or a phone number written after the text,
//! as a child would write them, never survives.
//!
//! Redacting twice may find more in run-on text without spaces (`a@b.org/x*c.venmo.org/y`:
//! the first pass reads one link where a second reads two); the fixture table checks that
//! ordinary sentences are stable (`cmz-core/tests/privacy_fixtures.txt`).

#![no_main]

use cmz_core::privacy::Redactor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let redactor = Redactor::default();
    let out = redactor.redact(text);
    if out.kinds.is_empty() {
        assert_eq!(out.text, text, "nothing found, nothing changed");
    }
    for kind in &out.kinds {
        assert!(
            out.text.contains(kind.placeholder()),
            "{kind:?} has its placeholder"
        );
    }
    let _ = redactor.redact(&out.text);
    let planted = format!("{text} \nwrite to kid.one@example.org or call 206-555-0142 please");
    let redacted = redactor.redact(&planted);
    assert!(
        redacted
            .text
            .ends_with("\nwrite to [email] or call [phone] please"),
        "{:?}",
        redacted.text
    );
});

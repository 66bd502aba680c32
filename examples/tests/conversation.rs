//! Runs the example program as a user would and checks what it prints.

use std::process::Command;

#[test]
fn conversation_example_prints_history_and_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_conversation"))
        .output()
        .expect("run the example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "example failed: {stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("streaming turn 3: My fur is super thick"),
        "{stdout}"
    );
    assert!(stdout.contains("(stored as turn 3)"), "{stdout}");
    for line in [
        "#1    Sam: Hello Ollie!",
        "#2  Ollie: Hi there! I'm Ollie!",
        "#6  Ollie: My fur is super thick",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in:\n{stdout}");
    }
    assert!(
        stdout.contains("Usage: 30 prompt + 15 completion = 45 tokens over 6 messages"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Summary: Sam met Ollie the otter"),
        "{stdout}"
    );
}

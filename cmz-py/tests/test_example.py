"""The example script runs as a user would run it."""

import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.py")


def test_quickstart_runs():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DYNAMODB_", "OPENAI_"))}
    out = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert "logged in as user_student_ana (student)" in out.stdout or "logged in as" in out.stdout
    assert "Cora: Hi, I'm Cora the Cougar!" in out.stdout
    assert "turns so far: 3" in out.stdout
    assert "another family's user gets NotFound (not_found)" in out.stdout
    assert "compat history: ['Do quills hurt?', 'Only if you poke them!']" in out.stdout
    assert "compat verify of our token: student1@cmz.org" in out.stdout

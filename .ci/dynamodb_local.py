"""Amazon's DynamoDB Local, started one way for every Python user of it: the CI script,
the legacy-deployment check and the Python tests (the Rust tests use
``cmz_dynamo::testing::DynamoLocal``, which starts it with the same arguments).

Always in memory, with telemetry off and its working directory in the emulator's folder
(it writes an id file there even with telemetry off). The emulator's folder is
``CMZ_DYNAMODB_LOCAL_DIR``, else ``target/dynamodb-local/package/emulator``.

    python3 .ci/dynamodb_local.py --port 8000      # runs it in the foreground
"""

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emulator_dir():
    return os.environ.get("CMZ_DYNAMODB_LOCAL_DIR") or os.path.join(
        ROOT, "target", "dynamodb-local", "package", "emulator")


def command(port, heap="512m"):
    root = emulator_dir()
    jar = os.path.join(root, "DynamoDBLocal.jar")
    if not os.path.isfile(jar):
        raise RuntimeError(f"no DynamoDB Local at {jar}: set CMZ_DYNAMODB_LOCAL_DIR (bash .ci/run fetches it)")
    return [
        "java", f"-Xmx{heap}", f"-Djava.library.path={os.path.join(root, 'DynamoDBLocal_lib')}",
        "-jar", jar, "-inMemory", "-sharedDb", "-disableTelemetry", "-port", str(port),
    ]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(log=None, heap="512m", timeout=60.0):
    """Starts a fresh server on a free port; returns (process, endpoint) once it accepts
    connections. ``log`` is a file for its output (discarded when None)."""
    port = free_port()
    process = subprocess.Popen(
        command(port, heap),
        stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT,
        cwd=emulator_dir(), env=dict(os.environ, DDB_LOCAL_TELEMETRY="0"),
    )
    deadline = time.time() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"DynamoDB Local exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return process, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline:
                stop(process)
                raise RuntimeError("DynamoDB Local did not start in time")
            time.sleep(0.2)


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main():
    parser = argparse.ArgumentParser(description="Run DynamoDB Local in the foreground.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--heap", default="768m")
    args = parser.parse_args()
    os.chdir(emulator_dir())
    os.environ["DDB_LOCAL_TELEMETRY"] = "0"
    argv = command(args.port, args.heap)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    sys.exit(main())

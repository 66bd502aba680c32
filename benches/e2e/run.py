#!/usr/bin/env python3
"""End to end on DynamoDB: the cmz demo server against the legacy Flask turn, same run.

    python3 benches/e2e/run.py

Both servers run on one DynamoDB Local (started here) with an instant model:
- cmz: the release demo built with DynamoDB (`cargo build --release -p cmz-examples
  --features dynamo --bin demo`, copied to `target/release/demo-dynamo`; this script builds
  it when it is missing), on its embedded defaults plus the legacy table variables;
- legacy: `legacy_dynamo_flask.py` under gunicorn (2 workers, 16 threads each), the legacy
  handler's DynamoDB calls with boto3.

For each conversation length (1, 100 and 400 turns by default), each server gets K
conversations grown to that length over HTTP, then K clients run T turns each on their own
conversation: turns/s, p50 and p99 latency, and server CPU per turn (utime + stime of the
server's process tree). Then a second instance of each server, whose DynamoDB traffic goes
through a metering proxy (`capacity_proxy.py`), runs C more turns on the same conversations:
WCU and RCU per turn as DynamoDB Local reported them. Prints one table with the ratios and
writes `target/e2e.json`. Needs Java 17 and npm (DynamoDB Local), and pip: flask gunicorn
boto3 pyjwt. All traffic stays on 127.0.0.1.
"""

import argparse
import importlib.util
import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / ".ci"))
sys.path.insert(0, str(HERE))
import capacity_proxy  # noqa: E402
import dynamodb_local  # noqa: E402

_spec = importlib.util.spec_from_file_location("http_run", ROOT / "benches" / "http" / "run.py")
http_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(http_run)
log, Server, free_port = http_run.log, http_run.Server, http_run.free_port

DEMO = ROOT / "target" / "release" / "demo-dynamo"
QUESTION = "What do cougars eat when they hunt at night?"
TABLES = ["CONVERSATION_DYNAMO_TABLE_NAME", "CONVERSATION_SESSION_TABLE_NAME",
          "CONVERSATION_MESSAGE_TABLE_NAME", "USER_DYNAMO_TABLE_NAME", "FAMILY_DYNAMO_TABLE_NAME",
          "ANIMAL_DYNAMO_TABLE_NAME", "CMZ_META_TABLE_NAME", "CMZ_CARE_TABLE_NAME"]


def build_demo():
    if DEMO.exists():
        return
    log("building the release demo with DynamoDB (once)")
    subprocess.run(["cargo", "build", "--release", "--locked", "-p", "cmz-examples", "--features", "dynamo",
                    "--bin", "demo"], cwd=ROOT, check=True)
    (ROOT / "target" / "release" / "demo").replace(DEMO)


class Client:
    """One keep-alive HTTP connection, posting turns."""

    def __init__(self, base, token):
        import http.client

        host, port = base.split("//")[1].split(":")
        self.connection = http.client.HTTPConnection(host, int(port), timeout=60)
        self.headers = {"content-type": "application/json", "authorization": "Bearer " + token}

    def turn(self, session_id=None):
        body = {"animalId": "cougar", "message": QUESTION}
        if session_id:
            body["sessionId"] = session_id
        started = time.perf_counter()
        self.connection.request("POST", "/convo_turn", json.dumps(body), self.headers)
        response = self.connection.getresponse()
        data = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"turn failed: {response.status} {data[:300]!r}")
        return json.loads(data)["sessionId"], elapsed


def in_threads(jobs):
    """Runs each job in its own thread; returns their results in order."""
    results = [None] * len(jobs)
    errors = []

    def run(i, job):
        try:
            results[i] = job()
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def grow(base, token, sessions, turns):
    """`sessions` new conversations of `turns` turns each; returns their ids."""
    def one():
        client = Client(base, token)
        session_id, _ = client.turn()
        for _ in range(turns - 1):
            client.turn(session_id)
        return session_id
    return in_threads([one for _ in range(sessions)])


def measure(server, token, session_ids, turns):
    """K clients, T turns each, on their own conversations (new ones when `session_ids` is
    None): turns/s, latencies, CPU per turn."""
    def one(session_id):
        def job():
            client = Client(server.base, token)
            return [client.turn(session_id)[1] for _ in range(turns)]
        return job
    cpu_before = http_run.tree_cpu_seconds(server.pids())
    started = time.perf_counter()
    latencies = sum(in_threads([one(s) for s in session_ids]), [])
    wall = time.perf_counter() - started
    cpu = http_run.tree_cpu_seconds(server.pids()) - cpu_before
    latencies.sort()
    count = len(latencies)
    return {
        "turnsPerSecond": count / wall,
        "p50Ms": latencies[count // 2] * 1000,
        "p99Ms": latencies[min(count - 1, int(count * 0.99))] * 1000,
        "cpuMsPerTurn": cpu * 1000 / count,
        "turns": count,
    }


def metered(server, proxy, token, session_ids, turns):
    """WCU and RCU per turn through the metering proxy."""
    before = proxy.snapshot()
    for session_id in session_ids:
        client = Client(server.base, token)
        for _ in range(turns):
            client.turn(session_id)
    after = proxy.snapshot()
    count = len(session_ids) * turns
    return {
        "wcuPerTurn": (after["writeUnits"] - before["writeUnits"]) / count,
        "rcuPerTurn": (after["readUnits"] - before["readUnits"]) / count,
        "requestsPerTurn": (after["requests"] - before["requests"]) / count,
    }


def login(base):
    status, body = http_run.http_json(
        "POST", base + "/auth", json.dumps({"username": "student1@cmz.org", "password": "student123"}).encode(),
        {"content-type": "application/json"})
    if status != 200:
        raise RuntimeError(f"login failed: {status} {body}")
    return body["token"]


def create_legacy_tables(endpoint, names):
    import boto3

    client = boto3.client("dynamodb", endpoint_url=endpoint, region_name="us-west-2",
                          aws_access_key_id="bench", aws_secret_access_key="local")
    for name, key in names:
        client.create_table(TableName=name, KeySchema=[{"AttributeName": key, "KeyType": "HASH"}],
                            AttributeDefinitions=[{"AttributeName": key, "AttributeType": "S"}],
                            BillingMode="PAY_PER_REQUEST")
    for name, _ in names:
        client.get_waiter("table_exists").wait(TableName=name)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1,100,400")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent conversations (K)")
    parser.add_argument("--turns", type=int, default=20, help="measured turns per conversation (T)")
    parser.add_argument("--capacity-turns", type=int, default=5, help="metered turns per conversation (C)")
    args = parser.parse_args()
    lengths = [int(v) for v in args.lengths.split(",")]
    build_demo()

    logs = ROOT / "target" / "e2e-logs"
    logs.mkdir(parents=True, exist_ok=True)
    ddb_log = open(logs / "dynamodb-local.log", "w")
    ddb, endpoint = dynamodb_local.start(log=ddb_log, heap="1g")
    host, port = endpoint.split("//")[1].split(":")
    servers = []
    try:
        secret = secrets.token_hex(32)
        prefix = "e2e" + secrets.token_hex(3) + "-"
        cmz_tables = {var: f"{prefix}cmz-{i}" for i, var in enumerate(TABLES)}
        legacy_names = {"conversations": prefix + "legacy-conversation", "sessions": prefix + "legacy-session"}
        create_legacy_tables(endpoint, [(legacy_names["conversations"], "conversationId"),
                                        (legacy_names["sessions"], "sessionId")])
        cmz_proxy = capacity_proxy.CapacityProxy((host, int(port)))
        legacy_proxy = capacity_proxy.CapacityProxy((host, int(port)))

        def cmz(name, ddb_endpoint):
            env = {"JWT_SECRET": secret, "DYNAMODB_ENDPOINT_URL": ddb_endpoint, "CMZ_DYNAMODB_CREATE_TABLES": "1",
                   "CMZ_TURN_RATE_LIMIT": "1000000000", "RUST_LOG": "warn", **cmz_tables}
            port = free_port()
            return Server(name, [str(DEMO)], {**env, "CMZ_BIND": f"127.0.0.1:{port}"}, port, logs)

        def legacy(name, ddb_endpoint, workers):
            port = free_port()
            env = {"JWT_SECRET": secret, "DYNAMODB_ENDPOINT_URL": ddb_endpoint,
                   "CONVERSATION_DYNAMO_TABLE_NAME": legacy_names["conversations"],
                   "CONVERSATION_SESSION_TABLE_NAME": legacy_names["sessions"]}
            command = [sys.executable, "-m", "gunicorn", "-k", "gthread", "-w", str(workers), "--threads", "16",
                       "-b", f"127.0.0.1:{port}", "--chdir", str(HERE), "legacy_dynamo_flask:app"]
            return Server(name, command, env, port, logs)

        cmz_direct, cmz_metered = cmz("cmz", endpoint), cmz("cmz-metered", cmz_proxy.endpoint)
        legacy_direct = legacy("legacy", endpoint, 2)
        legacy_metered = legacy("legacy-metered", legacy_proxy.endpoint, 1)
        for server in (cmz_direct, cmz_metered, legacy_direct, legacy_metered):
            servers.append(server)
            server.start()
            server.wait_ready(timeout=120)
        token = login(cmz_direct.base)  # the same secret and issuer: the legacy app takes it too

        results = []
        for length in lengths:
            row = {"length": length}
            for name, direct, meter_server, proxy in (("cmz", cmz_direct, cmz_metered, cmz_proxy),
                                                      ("legacy", legacy_direct, legacy_metered, legacy_proxy)):
                if length == 1:
                    ids = [None] * args.sessions
                    capacity_ids = [None] * 2
                else:
                    log(f"{name}: growing {args.sessions} conversations to {length - 1} turns")
                    ids = grow(direct.base, token, args.sessions, length - 1)
                    capacity_ids = grow(direct.base, token, 2, length - 1)
                log(f"{name}: measuring at length {length}")
                row[name] = measure(direct, token, ids, args.turns)
                # At length 1 every metered turn starts a conversation: one each.
                row[name].update(metered(meter_server, proxy, token, capacity_ids,
                                         args.capacity_turns if length > 1 else 1))
            results.append(row)
            log(json.dumps(row))
        report(results, args)
        (ROOT / "target" / "e2e.json").write_text(json.dumps(results, indent=2))
    finally:
        for server in servers:
            server.stop()
        dynamodb_local.stop(ddb)


def report(results, args):
    print()
    print(f"End to end on DynamoDB Local: {args.sessions} concurrent conversations, {args.turns} turns each")
    print("| turn | server | turns/s | p50 ms | p99 ms | server CPU ms/turn | WCU/turn | RCU/turn | DynamoDB requests/turn |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        for name in ("cmz", "legacy"):
            r = row[name]
            print(f"| {row['length']} | {name} | {r['turnsPerSecond']:.0f} | {r['p50Ms']:.1f} | {r['p99Ms']:.1f} | "
                  f"{r['cpuMsPerTurn']:.2f} | {r['wcuPerTurn']:.1f} | {r['rcuPerTurn']:.1f} | {r['requestsPerTurn']:.1f} |")
    print()
    print("| turn | throughput cmz/legacy | p50 legacy/cmz | p99 legacy/cmz | CPU legacy/cmz | WCU legacy/cmz | RCU legacy/cmz |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in results:
        c, g = row["cmz"], row["legacy"]

        def ratio(a, b):
            return f"{a / b:.1f}x" if b else "n/a"
        print(f"| {row['length']} | {ratio(c['turnsPerSecond'], g['turnsPerSecond'])} | {ratio(g['p50Ms'], c['p50Ms'])} | "
              f"{ratio(g['p99Ms'], c['p99Ms'])} | {ratio(g['cpuMsPerTurn'], c['cpuMsPerTurn'])} | "
              f"{ratio(g['wcuPerTurn'], c['wcuPerTurn'])} | {ratio(g['rcuPerTurn'], c['rcuPerTurn'])} |")


if __name__ == "__main__":
    main()

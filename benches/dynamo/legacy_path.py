"""The legacy boto3 write path, timed: turns appended with list_append until DynamoDB refuses.

    python3 legacy_path.py --endpoint URL --conversations T --sessions S --turns 1000 \
        --checkpoints 1,100,400,1000

Prints one JSON object: per checkpoint turn the write capacity, requests and latency of the
turn, and the read capacity of reading a 10-turn window (the legacy code reads the whole
item); and the turn at which DynamoDB refused the write, if it did.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "cmz-dynamo", "tests", "fixtures"))
from legacy_conversation_dynamo import LegacyConversations  # noqa: E402

QUESTION = "q" * 90
ANSWER = "a" * 600


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--conversations", required=True)
    parser.add_argument("--sessions", required=True)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--checkpoints", default="1,100,400,1000")
    args = parser.parse_args()
    checkpoints = {int(c) for c in args.checkpoints.split(",")}

    legacy = LegacyConversations(args.endpoint, args.conversations, args.sessions)
    cid = legacy.create_conversation_session("bench_user", "lion", "Leo the Lion")
    out = {"checkpoints": [], "failedAt": None, "error": None}
    for turn in range(1, args.turns + 1):
        started = time.perf_counter()
        try:
            wcu = legacy.store_conversation_turn(cid, QUESTION, ANSWER)
        except Exception as error:  # the item-size limit
            out["failedAt"] = turn
            out["error"] = str(error)[:200]
            break
        latency_ms = (time.perf_counter() - started) * 1000
        if turn in checkpoints:
            # The session update is a second request of 1 WCU (its item stays small).
            _, rcu = legacy.get_conversation_history(cid)
            out["checkpoints"].append(
                {"turn": turn, "wcu": float(wcu) + 1.0, "requests": 2, "latencyMs": latency_ms, "windowRcu": float(rcu)}
            )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()

"""Eight Python threads running turns at once: the GIL is released around the Rust work,
every turn is stored once, in order."""

import threading
import time

from conftest import login, make_client


def test_eight_threads_lose_nothing(backend):
    # 97 turns by one user: above the default turn limit of 50 an hour.
    client = make_client(backend, {"CMZ_TURN_RATE_LIMIT": "1000"})
    kid = login(client, "student1@cmz.org", "student123")
    shared = client.conversations.turn(kid, "cougar", "shared start")["sessionId"]
    own = {}
    errors = []

    def worker(n):
        try:
            session = None
            for t in range(6):
                reply = client.conversations.turn(kid, "porcupine", f"thread {n} turn {t}", session_id=session)
                session = reply["sessionId"]
                client.conversations.turn(kid, "cougar", f"shared {n}.{t}", session_id=shared)
            own[n] = session
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert time.perf_counter() - started < 120
    for n, session in own.items():
        texts = [m["text"] for m in client.conversations.history(kid, session, limit=100)["messages"]]
        assert texts[0::2] == [f"thread {n} turn {t}" for t in range(6)]
    messages = []
    cursor = None
    while True:
        page = client.conversations.history(kid, shared, limit=40, cursor=cursor)
        messages += page["messages"]
        cursor = page["nextCursor"]
        if not cursor:
            break
    assert len(messages) == 2 + 8 * 6 * 2
    assert [m["seq"] for m in messages] == list(range(1, len(messages) + 1))
    questions = sorted(m["text"] for m in messages[2::2])
    assert questions == sorted(f"shared {n}.{t}" for n in range(8) for t in range(6))
    # Each question is followed by its own reply.
    assert all(messages[i]["role"] == "user" and messages[i + 1]["role"] == "assistant" for i in range(0, len(messages), 2))


def test_the_gil_is_released_during_calls(client):
    kid = login(client, "student2@cmz.org", "student123")
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    # Hashing with argon2id takes milliseconds of Rust work; the ticker keeps running.
    for _ in range(5):
        client.auth.hash_password("slow on purpose")
    stop.set()
    thread.join()
    assert len(ticks) > 5

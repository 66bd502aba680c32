#!/usr/bin/env python3
"""cmz's HTTP API against the legacy way (Flask + gunicorn, FastAPI + uvicorn), same run.

    python3 benches/http/run.py

Needs a release build of the demo server (`cargo build --release -p cmz-examples --bin demo`,
at target/release/demo). Installs what it needs if missing: flask gunicorn fastapi
uvicorn[standard] pyjwt aiohttp (pip) and wrk (apt-get). Starts the three servers on free
loopback ports with the same JWT_SECRET, then on each:

  a. throughput: wrk -c64 -d10s --latency -s post.lua on POST /convo_turn, three rounds that
     interleave the servers, with the server and wrk on separate cores and on shared cores
     (a new conversation per request);
  b. 1,000 concurrent SSE streams of GET /convo_turn/stream (500 ms between words, so a
     stream lasts ~11 s), opened at once by an asyncio + aiohttp client; the server's RSS
     (summed over its process tree) before opening and at the peak.

The stream test and each layout's rounds start from freshly started servers (the demo's
in-memory store keeps every conversation, and a bigger process serves a turn more slowly);
`--same-servers` keeps them running from one to the next instead.

Prints one table with the figures and the cmz/Flask and cmz/FastAPI ratios, and stops every
server it started, on errors too. All traffic stays on 127.0.0.1.
"""

import argparse
import asyncio
import importlib
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DEMO = ROOT / "target" / "release" / "demo"
HOST = "127.0.0.1"
QUESTION = "What do cougars eat?"
BODY = json.dumps({"animalId": "cougar", "message": QUESTION}).encode()
EXPECTED_REPLY = (
    "Hi, I'm Cora the Cougar! Cougars can leap about 6 metres in a single bound. "
    "What else would you like to know?"
)
# What a browser's EventSource sends; cmz takes `?token=` only from such requests.
SSE_HEADERS = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------- setup


def ensure_dependencies():
    modules = ["flask", "gunicorn", "fastapi", "uvicorn", "jwt", "aiohttp", "httptools", "uvloop"]
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        log(f"installing Python packages (missing: {', '.join(missing)})")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "flask", "gunicorn", "fastapi",
             "uvicorn[standard]", "pyjwt", "aiohttp"],
            check=True,
        )
        importlib.invalidate_caches()
    if shutil.which("wrk") is None:
        log("installing wrk (apt-get)")
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        if subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "wrk"]).returncode != 0:
            subprocess.run(sudo + ["apt-get", "update", "-q"], check=True)
            subprocess.run(sudo + ["apt-get", "install", "-y", "-q", "wrk"], check=True)
    for tool in ("gunicorn", "uvicorn"):
        if shutil.which(tool) is None and not Path(sys.executable).with_name(tool).exists():
            raise SystemExit(f"{tool} is not on PATH after installing it")
    if not DEMO.exists():
        raise SystemExit(f"{DEMO} is missing: cargo build --release -p cmz-examples --bin demo")


def tool(name):
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


def _die_with_parent():
    """In the child before exec: SIGTERM when run.py dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- /proc


def _children_map():
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def process_tree(root):
    children = _children_map()
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_memory(pids):
    """(RSS KiB, PSS KiB) summed over `pids`."""
    rss = pss = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss += int(f.read().split()[1]) * PAGE_KB
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                        break
        except OSError:
            pass
    return rss, pss


def tree_threads(pids):
    """Threads of each process of `pids`."""
    counts = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                counts.append(int(f.read().rsplit(")", 1)[1].split()[17]))
        except OSError:
            pass
    return counts


def tree_cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / CLK_TCK


def listen_overflows():
    """The kernel's count of connections dropped because an accept queue was full
    (TcpExt ListenOverflows, machine-wide); each costs the client a SYN retry 1 s later."""
    with open("/proc/net/netstat") as f:
        lines = f.read().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:]))
            return int(table.get("ListenOverflows", 0))
    return 0


def machine_cpu_seconds():
    """(busy, total) CPU seconds of the whole machine."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


# --------------------------------------------------------------------------- servers


class Server:
    def __init__(self, name, command, env, port, logdir):
        self.name, self.command, self.port = name, command, port
        self.env = {**os.environ, **env}
        self.log_path = Path(logdir) / f"{name.split()[0].lower()}.log"
        self.process = None

    @property
    def base(self):
        return f"http://{HOST}:{self.port}"

    def start(self):
        # Appended: a server restarted between tests keeps the log of its earlier life.
        self.log_file = open(self.log_path, "a")
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=self.log_file,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )

    def wait_ready(self, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.base + "/system_health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def pids(self):
        return process_tree(self.process.pid)

    def log_tail(self, lines=20):
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)  # its own group: start_new_session
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)
            except ProcessLookupError:
                pass
        self.log_file.close()


def http_json(method, url, body=None, headers=None):
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def legacy_token(secret):
    import jwt

    now = int(time.time())
    user = "user_student_ana"
    claims = {
        "user_id": user, "userId": user, "email": "student1@cmz.org", "role": "student",
        "user_type": "student", "exp": now + 86400, "iat": now, "iss": "cmz-api", "sub": user,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def sanity_check(server, token):
    """One turn: 200, the expected reply and body shape; a forged token is refused."""
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    status, body = http_json("POST", server.base + "/convo_turn", BODY, headers)
    if status != 200:
        raise RuntimeError(f"{server.name}: POST /convo_turn -> {status} {body}")
    if body.get("reply") != EXPECTED_REPLY or not body.get("sessionId", "").startswith("conv_cougar_"):
        raise RuntimeError(f"{server.name}: unexpected reply {body}")
    turn = body.get("turn", {})
    for key in ("convoTurnId", "timestamp", "tokensPrompt", "tokensCompletion", "latencyMs"):
        if key not in turn:
            raise RuntimeError(f"{server.name}: turn lacks {key}: {body}")
    forged = token.rsplit(".", 1)[0] + ".AAAA"
    status, _ = http_json("POST", server.base + "/convo_turn", BODY,
                          {**headers, "Authorization": f"Bearer {forged}"})
    if status != 401:
        raise RuntimeError(f"{server.name}: a forged token got {status}, not 401")


# --------------------------------------------------------------------------- throughput


# Where the server and wrk run. "split": the server on one core and wrk (one thread) on the
# other, so the load generator takes nothing from the server: req/s is what one core of the
# server does. "shared": server and wrk (two threads) on both cores, competing for them.
LAYOUTS = ("split", "shared")
# The row of cmz's GET /system_health: what the HTTP stack and the load generator allow on
# this machine at all, with no turn behind the route.
CEILING = "ceiling: cmz GET /system_health"
SERVER_CORE, WRK_CORE = 1, 0


def all_cores():
    return set(range(os.cpu_count() or 1))


def pin_tree(server, cores):
    """Sets the CPU affinity of every thread of the server's processes (threads started
    later inherit it from the thread that starts them)."""
    for pid in server.pids():
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cores)
            except OSError:
                pass


def run_wrk(server, token, duration, connections, threads, measure=True, layout="shared", path="/convo_turn"):
    env = {**os.environ, "BENCH_TOKEN": token}
    if path != "/convo_turn":
        env["BENCH_GET"] = "1"
    if layout == "split":
        threads = 1
        pin_tree(server, {SERVER_CORE})
        wrk_cores = {WRK_CORE}
    else:
        pin_tree(server, all_cores())
        wrk_cores = all_cores()
    command = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
               "-s", str(HERE / "post.lua"), server.base + path]
    pids = server.pids()
    rss0 = tree_memory(pids)[0]
    cpu0, machine0, wrk0 = tree_cpu_seconds(pids), machine_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    wall0 = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + 60,
                          preexec_fn=lambda: os.sched_setaffinity(0, wrk_cores))
    wall = time.monotonic() - wall0
    pin_tree(server, all_cores())
    cpu1, machine1, wrk1 = tree_cpu_seconds(pids), machine_cpu_seconds(), resource.getrusage(resource.RUSAGE_CHILDREN)
    rss1 = tree_memory(pids)[0]
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed on {server.name}: {done.stderr}")
    if not measure:
        return None
    line = next((l for l in done.stdout.splitlines() if l.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"no summary from wrk:\n{done.stdout}\n{done.stderr}")
    stats = json.loads(line[len("WRKJSON "):])
    wrk_rps = next((float(l.split()[1]) for l in done.stdout.splitlines() if l.startswith("Requests/sec:")), None)
    server_cpu = cpu1 - cpu0
    wrk_cpu = (wrk1.ru_utime + wrk1.ru_stime) - (wrk0.ru_utime + wrk0.ru_stime)
    busy = machine1[0] - machine0[0]
    seconds = stats["duration_us"] / 1e6
    return {
        "rps": stats["requests"] / seconds,
        "wrk_rps": wrk_rps,
        "requests": stats["requests"],
        "p50_ms": stats["p50"] / 1000, "p90_ms": stats["p90"] / 1000,
        "p99_ms": stats["p99"] / 1000, "p999_ms": stats["p999"] / 1000,
        "max_ms": stats["max"] / 1000,
        "non2xx": stats["status"],
        "socket_errors": stats["connect"] + stats["read"] + stats["write"] + stats["timeout"],
        "socket_detail": {k: stats[k] for k in ("connect", "read", "write", "timeout")},
        "server_cores": server_cpu / wall,
        "wrk_cores": wrk_cpu / wall,
        "other_cores": max(busy - server_cpu - wrk_cpu, 0.0) / wall,
        "server_us_per_req": server_cpu / stats["requests"] * 1e6 if stats["requests"] else float("nan"),
        "rss_before_kb": rss0, "rss_after_kb": rss1,
        "kb_per_turn": (rss1 - rss0) / stats["requests"] if stats["requests"] else float("nan"),
        "wrk_text": done.stdout,
    }


# --------------------------------------------------------------------------- streams


async def stream_test(server, token, streams, first_timeout, total_timeout):
    import aiohttp

    query = urllib.parse.urlencode({"animalId": "cougar", "message": QUESTION, "token": token})
    url = f"{server.base}/convo_turn/stream?{query}"
    pids = server.pids()
    idle = tree_memory(pids)
    results = [{} for _ in range(streams)]
    first_seen = 0
    all_first = asyncio.Event()
    finished = 0
    all_done = asyncio.Event()
    samples = []

    async def one(i):
        nonlocal first_seen, finished
        r = results[i]
        chunks = 0
        try:
            async with session.get(url, headers=SSE_HEADERS) as response:
                r["status"] = response.status
                r["headers"] = time.monotonic()
                if response.status != 200:
                    r["error"] = f"HTTP {response.status}"
                    return
                event = None
                async for raw in response.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:])
                        if event == "message":
                            chunks += 1
                            if "first" not in r:
                                r["first"] = time.monotonic()
                                first_seen += 1
                                if first_seen == streams:
                                    all_first.set()
                        elif event == "complete":
                            r["complete"] = data
                        elif event == "error":
                            r["error"] = f"error event: {data}"
            complete = r.get("complete")
            if complete is None:
                r.setdefault("error", "stream ended without a complete event")
            elif complete.get("fullResponse") != EXPECTED_REPLY or complete.get("chunkCount") != chunks:
                r["error"] = f"bad complete event ({chunks} chunks): {complete}"
            else:
                r["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported per stream
            r["error"] = f"{type(error).__name__}: {error}"
        finally:
            r["end"] = time.monotonic()
            finished += 1
            if finished == streams:
                all_done.set()

    async def sampler():
        while not all_done.is_set():
            samples.append((time.monotonic(), *tree_memory(server.pids())))
            await asyncio.sleep(0.1)

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=total_timeout, sock_connect=first_timeout, sock_read=first_timeout)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu0, machine0 = tree_cpu_seconds(pids), machine_cpu_seconds()
    overflows0 = listen_overflows()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        sampling = asyncio.create_task(sampler())
        start = time.monotonic()
        tasks = [asyncio.create_task(one(i)) for i in range(streams)]
        try:
            await asyncio.wait_for(all_first.wait(), first_timeout)
            all_first_after = time.monotonic() - start
        except asyncio.TimeoutError:
            all_first_after = None
        at_all_first = tree_memory(server.pids())
        threads_at_all_first = tree_threads(server.pids())
        first_count = first_seen
        await asyncio.gather(*tasks)
        all_done.set()
        await sampling
        elapsed = time.monotonic() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    server_cpu1, machine1 = tree_cpu_seconds(pids), machine_cpu_seconds()
    overflows = listen_overflows() - overflows0
    await asyncio.sleep(1.0)
    after = tree_memory(server.pids())

    ok = sum(1 for r in results if r.get("ok"))
    errors = {}
    for r in results:
        if "error" in r:
            key = r["error"][:120]
            errors[key] = errors.get(key, 0) + 1
    peak_rss = max([s[1] for s in samples] + [at_all_first[0]])
    peak_pss = max([s[2] for s in samples] + [at_all_first[1]])
    durations = sorted(r["end"] - start for r in results if r.get("ok"))
    held = max(first_count, 1)
    heads = sorted(r["headers"] - start for r in results if "headers" in r)
    firsts = sorted(r["first"] - start for r in results if "first" in r)
    return {
        "streams": streams,
        "ok": ok,
        "first_count": first_count,
        "all_first_s": all_first_after,
        "elapsed_s": elapsed,
        "last_done_s": durations[-1] if durations else None,
        "idle_rss_kb": idle[0], "peak_rss_kb": peak_rss, "at_all_first_rss_kb": at_all_first[0],
        "after_rss_kb": after[0],
        "idle_pss_kb": idle[1], "peak_pss_kb": peak_pss,
        "rss_kb_per_stream": (peak_rss - idle[0]) / held,
        # While every stream is open and none has ended: the streams' own memory, without the
        # conversations they store at their end (which the peak, often at the very end, holds).
        "open_kb_per_stream": (at_all_first[0] - idle[0]) / held,
        "pss_kb_per_stream": (peak_pss - idle[1]) / held,
        "client_cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "server_cpu_s": server_cpu1 - server_cpu0,
        "other_cores": max((machine1[0] - machine0[0]) - (server_cpu1 - server_cpu0)
                           - ((cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)), 0.0) / elapsed,
        "threads": threads_at_all_first,
        "listen_overflows": overflows,
        "headers_p50_s": heads[len(heads) // 2] if heads else None,
        "headers_max_s": heads[-1] if heads else None,
        "first_p50_s": firsts[len(firsts) // 2] if firsts else None,
        "processes": len(pids),
        "errors": errors,
    }


async def connection_floor(server, count):
    """KiB of server RSS per open keep-alive connection that has served one GET
    /system_health: the part of a stream's memory that is the HTTP connection itself."""
    pids = server.pids()
    before = tree_memory(pids)[0]
    connections = []
    try:
        for _ in range(count):
            reader, writer = await asyncio.open_connection(HOST, server.port)
            writer.write(f"GET /system_health HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            connections.append((reader, writer))
        for reader, _ in connections:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"{server.name}: GET /system_health -> {head[:40]!r}")
        await asyncio.sleep(1.0)
        return (tree_memory(pids)[0] - before) / count
    finally:
        for _, writer in connections:
            writer.close()


async def warm_stream(server, token):
    """One stream read to its first word, then dropped: the stream path has run once."""
    import aiohttp

    query = urllib.parse.urlencode({"animalId": "cougar", "message": QUESTION, "token": token})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(f"{server.base}/convo_turn/stream?{query}", headers=SSE_HEADERS) as response:
            if response.status != 200:
                raise RuntimeError(f"{server.name}: stream -> HTTP {response.status}")
            async for raw in response.content:
                if raw.startswith(b"event: message"):
                    return


def other_load(seconds=2.0):
    """Cores busy on the machine over `seconds` while this run's servers are idle."""
    busy0, _ = machine_cpu_seconds()
    time.sleep(seconds)
    busy1, _ = machine_cpu_seconds()
    return (busy1 - busy0) / seconds


def wait_quiet(budget):
    """Waits (at most `budget` seconds) until other work uses under 0.2 core; the servers
    are idle here, so whatever is busy is not this benchmark."""
    deadline = time.monotonic() + budget
    while True:
        busy = other_load(1.0)
        if busy < 0.2 or time.monotonic() >= deadline:
            if busy >= 0.2:
                log(f"machine still busy ({busy:.2f} cores of other work); going on")
            return busy


# --------------------------------------------------------------------------- report


def fmt(value, spec):
    return "—" if value is None else format(value, spec)


def compare(label, cmz_value, other_value, unit, digits=2):
    """'cmz 2.1 ms vs 17.3 ms: 8.2x lower' (or higher), for figures where lower is better."""
    if cmz_value <= 0 or other_value <= 0:
        return f"{label} {cmz_value:.{digits}f} vs {other_value:.{digits}f} {unit}"
    if cmz_value <= other_value:
        verdict = f"cmz {other_value / cmz_value:.1f}x lower"
    else:
        verdict = f"cmz {cmz_value / other_value:.1f}x HIGHER"
    return f"{label} {cmz_value:.{digits}f} vs {other_value:.{digits}f} {unit} ({verdict})"


def lower_median(values, key=None):
    """The middle value of `values` (the lower of the two middle ones for an even count), so
    that the median is always a value that was measured."""
    ordered = sorted(values, key=key)
    return ordered[(len(ordered) - 1) // 2]


def median_run(runs):
    """The run with the median req/s, carrying every round's req/s and server µs/req."""
    median = dict(lower_median(runs, key=lambda t: t["rps"]))
    median["all_rps"] = [t["rps"] for t in runs]
    median["all_us"] = [t["server_us_per_req"] for t in runs]
    median["server_us_per_req"] = lower_median(median["all_us"])
    return median


def print_report(names, tput, streams, args):
    cmz = names[0]
    short = {name: name.split()[0] for name in names}
    print()
    print("=" * 118)
    print(f"cmz HTTP API vs the legacy way: {os.cpu_count()} CPU cores, server and load generator on one "
          f"machine, all traffic on 127.0.0.1")
    print("=" * 118)
    for layout, results in tput.items():
        threads = 1 if layout == "split" else args.threads
        where = (f"server pinned to core {SERVER_CORE}, wrk to core {WRK_CORE}" if layout == "split"
                 else "server and wrk share every core")
        print(f"\nA. Throughput ({layout}: {where}): POST /convo_turn, a new conversation per request, "
              f"wrk -t{threads} -c{args.connections} -d{args.duration}s --latency; the median of "
              f"{args.rounds} interleaved rounds (the round with the median req/s; srv µs/req: median of the rounds)")
        print("   latency = wrk's own distribution, which wrk corrects for coordinated omission: a response slower than")
        print("   the mean interval per connection adds synthetic samples, so a single long pause shows in p99 and p90")
        header = (f"{'server':<32}{'req/s':>9}{'p50 ms':>8}{'p90 ms':>8}{'p99 ms':>9}{'max ms':>9}"
                  f"{'non-2xx':>8}{'sockerr':>8}{'srv cores':>10}{'wrk cores':>10}{'other':>6}"
                  f"{'srv µs/req':>11}{'KiB/turn':>9}")
        print(header)
        print("-" * len(header))
        for name in names + [CEILING]:
            t = results.get(name)
            if t is None:
                continue
            print(f"{name:<32}{t['rps']:>9,.0f}{t['p50_ms']:>8.2f}{t['p90_ms']:>8.2f}{t['p99_ms']:>9.2f}"
                  f"{t['max_ms']:>9.1f}{t['non2xx']:>8}{t['socket_errors']:>8}{t['server_cores']:>10.2f}"
                  f"{t['wrk_cores']:>10.2f}{t['other_cores']:>6.2f}{t['server_us_per_req']:>11.1f}"
                  f"{t['kb_per_turn']:>9.2f}")
        print("   srv/wrk/other cores: CPU used during the run by the server's processes, by wrk, by anything else;")
        print("   srv µs/req: server CPU time per request; KiB/turn: server RSS growth per request (stored conversations)")
        for name in names:
            t = results.get(name)
            if t is not None and len(t["all_rps"]) > 1:
                print(f"   {short[name]} rounds: req/s " + ", ".join(f"{v:,.0f}" for v in t["all_rps"])
                      + "; srv µs/req " + ", ".join(f"{v:.1f}" for v in t["all_us"]))
        if cmz in results and CEILING in results and names[1] in results:
            top, turn, flask = results[CEILING]["rps"], results[cmz]["rps"], results[names[1]]["rps"]
            print(f"  ceiling ({layout}): {top:,.0f} req/s with no turn at all = {top / flask:.1f}x "
                  f"{short[names[1]]}'s turns; cmz's turn runs at {turn / top:.0%} of it")
        if cmz in results:
            a = results[cmz]
            for name in names[1:]:
                if name in results:
                    b = results[name]
                    print(f"  cmz / {short[name]} ({layout}): throughput {a['rps'] / b['rps']:.1f}x; "
                          + compare("p99", a["p99_ms"], b["p99_ms"], "ms") + "; "
                          + compare("p50", a["p50_ms"], b["p50_ms"], "ms") + "; "
                          + compare("server CPU/req", a["server_us_per_req"], b["server_us_per_req"], "µs", 0))
                    if len(a["all_rps"]) > 1 and len(a["all_rps"]) == len(b["all_rps"]):
                        # Each cmz round against the other server's round of the same pass (run
                        # next to it): how far the machine's moment moves the ratio within a run.
                        paired = [x / y for x, y in zip(a["all_rps"], b["all_rps"])]
                        print(f"   cmz / {short[name]} round by round ({layout}): "
                              + ", ".join(f"{r:.1f}x" for r in paired)
                              + f" (median {lower_median(paired):.1f}x)")
    if streams:
        print(f"\nB. {args.streams} concurrent SSE streams: GET /convo_turn/stream, {args.chunk_delay_ms} ms before "
              f"each of 22 words, opened at once by one asyncio + aiohttp client")
        print("   memory = RSS summed over the server's process tree (master + workers), sampled every 100 ms")
        header = (f"{'server':<32}{'procs':>6}{'threads':>12}{'ok':>6}{'1st msg':>8}{'all 1st s':>10}"
                  f"{'idle MiB':>9}{'peak MiB':>9}{'KiB/open':>9}{'KiB/stream':>11}{'PSS KiB/str':>12}{'last done s':>12}"
                  f"{'srv CPU s':>10}{'client CPU s':>13}{'other':>6}{'SYN drops':>10}")
        print(header)
        print("-" * len(header))
        for name in names:
            s = streams.get(name)
            if s is None:
                continue
            threads = "+".join(str(t) for t in s["threads"])
            print(f"{name:<32}{s['processes']:>6}{threads:>12}{s['ok']:>6}{s['first_count']:>8}"
                  f"{fmt(s['all_first_s'], '.2f'):>10}{s['idle_rss_kb'] / 1024:>9.1f}{s['peak_rss_kb'] / 1024:>9.1f}"
                  f"{s['open_kb_per_stream']:>9.1f}{s['rss_kb_per_stream']:>11.1f}{s['pss_kb_per_stream']:>12.1f}"
                  f"{fmt(s['last_done_s'], '.1f'):>12}"
                  f"{s['server_cpu_s']:>10.2f}{s['client_cpu_s']:>13.2f}{s['other_cores']:>6.2f}"
                  f"{s['listen_overflows']:>10}")
        print("   ok: streams whose complete event carried the full reply and the right chunk count;")
        print("   1st msg: streams that had their first word when all did or at the 30 s timeout; all 1st s: time")
        print("   from opening to the last stream's first word; KiB/open = (RSS when every stream has had its first")
        print("   word, none ended - idle) / streams: memory per open stream; KiB/stream = (peak - idle) / streams")
        print("   holding a word: the peak is often at the end, with the conversations the streams stored;")
        print("   SYN drops: connections the kernel dropped because the server's accept queue (listen backlog) was")
        print("   full (TcpExt ListenOverflows); each such client retries 1 s later")
        if cmz in streams and "connection_kb" in streams[cmz]:
            a = streams[cmz]
            print(f"  cmz: an open keep-alive connection that served one GET /system_health holds "
                  f"{a['connection_kb']:.1f} KiB ({args.streams} of them): the floor under each open stream's "
                  f"{a['open_kb_per_stream']:.1f} KiB (the connection's task and socket)")
        if cmz in streams:
            a = streams[cmz]
            for name in names[1:]:
                if name in streams:
                    b = streams[name]
                    print(f"  cmz / {short[name]}: "
                          + compare("memory per open stream", a["open_kb_per_stream"], b["open_kb_per_stream"], "KiB", 1)
                          + "; " + compare("at the peak", a["rss_kb_per_stream"], b["rss_kb_per_stream"], "KiB", 1)
                          + f"; streams ok {a['ok']} vs {b['ok']}")
        for name in names:
            s = streams.get(name)
            if s and s["errors"]:
                print(f"  {name}: failed streams: {s['errors']}")
    noisy = [n for n in names if (max((r.get(n, {}).get("other_cores", 0) for r in tput.values()), default=0) > 0.25
                                  or streams.get(n, {}).get("other_cores", 0) > 0.25)]
    if noisy:
        print(f"\n  WARNING: other work used more than 0.25 core during the tests of {', '.join(noisy)}; "
              f"those figures are disturbed")
    print()


# --------------------------------------------------------------------------- main


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=10, help="wrk seconds per server and round [10]")
    parser.add_argument("--rounds", type=int, default=3,
                        help="throughput rounds per layout, interleaving the servers; the median is reported [3]")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections [64]")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads with shared cores [2]")
    parser.add_argument("--layout", choices=["split", "shared", "both"], default="both",
                        help="split: server on core 1, wrk (1 thread) on core 0; shared: both on "
                             "every core; both: one after the other [both]")
    parser.add_argument("--streams", type=int, default=1000, help="concurrent SSE streams [1000]")
    parser.add_argument("--chunk-delay-ms", type=int, default=500, help="pause between streamed words [500]")
    parser.add_argument("--gunicorn-threads", type=int, default=600, help="gthread threads per worker [600]")
    parser.add_argument("--skip", choices=["throughput", "streams"], action="append", default=[])
    parser.add_argument("--same-servers", action="store_true",
                        help="keep the servers of the stream test and of earlier layouts running into the "
                             "next layout, instead of starting every server afresh for each")
    parser.add_argument("--uvicorn-http", choices=["auto", "httptools", "h11"], default="auto",
                        help="uvicorn's HTTP parser [auto: httptools, installed with uvicorn[standard]]")
    parser.add_argument("--quiet-wait", type=float, default=15,
                        help="seconds to wait, before each test, for other work to leave the CPU [15]")
    args = parser.parse_args()

    ensure_dependencies()
    layouts = [l for l in LAYOUTS if args.layout in (l, "both")]
    if "split" in layouts and len(all_cores()) < 2:
        log("one core only: no split layout")
        layouts.remove("split")
    needed_fds = args.streams * 2 + 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed_fds:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(needed_fds, soft), hard), hard))

    secret = secrets.token_hex(32)
    delay = str(args.chunk_delay_ms)
    logdir = tempfile.mkdtemp(prefix="cmz-http-bench-")
    ports = [free_port(), free_port(), free_port()]
    while len(set(ports)) < 3:
        ports = [free_port(), free_port(), free_port()]
    common = {"JWT_SECRET": secret, "PYTHONDONTWRITEBYTECODE": "1"}
    servers = [
        Server("cmz (Rust, axum/tokio)", [str(DEMO)],
               {**common, "CMZ_BIND": f"{HOST}:{ports[0]}", "CMZ_TURN_RATE_LIMIT": "1000000000",
                "CMZ_OFFLINE_CHUNK_DELAY_MS": delay, "CMZ_DEV_USERS": "embedded",
                # Every client here is 127.0.0.1: the per-address cap (512) is for the open
                # internet, and would refuse the streams past it.
                "CMZ_MAX_CONNECTIONS_PER_IP": str(max(4096, args.streams + args.connections)),
                "CMZ_MAX_CONNECTIONS": str(max(4096, 2 * (args.streams + args.connections))),
                "RUST_LOG": "warn"}, ports[0], logdir),
        Server("Flask (gunicorn gthread 2x%d)" % args.gunicorn_threads,
               [tool("gunicorn"), "-k", "gthread", "-w", "2", "--threads", str(args.gunicorn_threads),
                "-b", f"{HOST}:{ports[1]}", "--chdir", str(HERE), "--log-level", "warning",
                "legacy_flask:app"],
               {**common, "CHUNK_DELAY_MS": delay}, ports[1], logdir),
        Server("FastAPI (uvicorn 2 workers)" if args.uvicorn_http == "auto"
               else f"FastAPI (uvicorn 2 workers, {args.uvicorn_http})",
               [tool("uvicorn"), "--app-dir", str(HERE), "legacy_fastapi:app", "--host", HOST,
                "--port", str(ports[2]), "--workers", "2", "--http", args.uvicorn_http, "--log-level", "warning",
                "--no-access-log"],
               {**common, "CHUNK_DELAY_MS": delay}, ports[2], logdir),
    ]
    names = [s.name for s in servers]

    def on_signal(signum, _frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    started = time.monotonic()
    tput, streams = {}, {}
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready()
        log("servers ready: " + ", ".join(f"{s.name} on :{s.port}" for s in servers))
        idle_busy = other_load()
        log(f"machine: {os.cpu_count()} cores; {idle_busy:.2f} cores busy with other work while the servers idle")
        if idle_busy > 0.25:
            log("WARNING: something else is using the CPU; the figures will be noisy")

        status, body = http_json("POST", servers[0].base + "/auth",
                                 json.dumps({"username": "student1@cmz.org", "password": "student123"}).encode(),
                                 {"Content-Type": "application/json"})
        if status != 200:
            raise RuntimeError(f"cmz login failed: {status} {body}")
        cmz_token = body["token"]
        py_token = legacy_token(secret)
        tokens = {servers[0].name: cmz_token, servers[1].name: py_token, servers[2].name: py_token}
        for server in servers:
            sanity_check(server, tokens[server.name])
        # The legacy apps also take cmz's own token (same secret, legacy claims): a cross-check.
        for server in servers[1:]:
            sanity_check(server, cmz_token)
        log("sanity: same reply from all three, forged tokens refused, legacy apps accept cmz's token")

        if "streams" not in args.skip:
            for server in servers:
                # Run the stream path once before the idle sample.
                asyncio.run(warm_stream(server, tokens[server.name]))
                time.sleep(2 * args.chunk_delay_ms / 1000)
                wait_quiet(args.quiet_wait)
                log(f"{server.name}: opening {args.streams} streams")
                s = asyncio.run(stream_test(server, tokens[server.name], args.streams, 30, 90))
                streams[server.name] = s
                log(f"{server.name}: {s['ok']}/{s['streams']} streams complete, {s['first_count']} had their "
                    f"first message {'after ' + format(s['all_first_s'], '.2f') + ' s' if s['all_first_s'] else 'by the timeout'}; "
                    f"RSS idle {s['idle_rss_kb'] / 1024:.1f} MiB, all open {s['at_all_first_rss_kb'] / 1024:.1f} MiB, "
                    f"peak {s['peak_rss_kb'] / 1024:.1f} MiB, "
                    f"after {s['after_rss_kb'] / 1024:.1f} MiB; threads per process at the peak {s['threads']}; "
                    f"response heads after {fmt(s['headers_p50_s'], '.2f')} s (median) / {fmt(s['headers_max_s'], '.2f')} s (last), "
                    f"first word after {fmt(s['first_p50_s'], '.2f')} s (median); "
                    f"accept-queue overflows {s['listen_overflows']}")
        if "streams" not in args.skip:
            # On a server of its own: one that served the streams reuses their freed memory.
            fresh = Server("cmz (fresh)", servers[0].command, {}, free_port(), logdir)
            fresh.env = dict(servers[0].env, CMZ_BIND=f"{HOST}:{fresh.port}")
            fresh.start()
            try:
                fresh.wait_ready()
                time.sleep(1.0)
                floor = asyncio.run(connection_floor(fresh, args.streams))
            finally:
                fresh.stop()
            streams[servers[0].name]["connection_kb"] = floor
            log(f"{servers[0].name}: {floor:.1f} KiB per open keep-alive connection after one request")
        if "throughput" not in args.skip:
            for index, layout in enumerate(layouts):
                if (index > 0 or "streams" not in args.skip) and not args.same_servers:
                    # Every layout measures servers in the same state: freshly started.
                    # The demo's in-memory store keeps every conversation, and cmz's grew by
                    # over a million in the rounds before, Flask's by a twentieth of that;
                    # a turn costs more as the process grows (benches/README.md).
                    for server in servers:
                        server.stop()
                        server.start()
                    for server in servers:
                        server.wait_ready()
                    log("servers restarted for the " + layout + " layout")
                runs = {server.name: [] for server in servers}
                runs[CEILING] = []
                for server in servers:
                    wait_quiet(args.quiet_wait)
                    run_wrk(server, tokens[server.name], 2, args.connections, args.threads, measure=False,
                            layout=layout)
                # Rounds interleave the servers, so a slow spell of a shared machine hits all of them.
                for round_ in range(1, args.rounds + 1):
                    for server in servers:
                        wait_quiet(args.quiet_wait)
                        log(f"{server.name}: wrk {args.duration}s, {layout} cores, round {round_}/{args.rounds}")
                        t = run_wrk(server, tokens[server.name], args.duration, args.connections, args.threads,
                                    layout=layout)
                        runs[server.name].append(t)
                        log(f"{server.name}: {t['rps']:,.0f} req/s (wrk says {t['wrk_rps']}), p50 {t['p50_ms']:.2f} ms, "
                            f"p99 {t['p99_ms']:.2f} ms, non-2xx {t['non2xx']}, socket errors {t['socket_detail']}, "
                            f"server {t['server_us_per_req']:.1f} µs/req")
                    # The ceiling: the same server, stack and wrk with no turn behind the route.
                    wait_quiet(args.quiet_wait)
                    t = run_wrk(servers[0], tokens[servers[0].name], args.duration, args.connections,
                                args.threads, layout=layout, path="/system_health")
                    runs[CEILING].append(t)
                    log(f"{CEILING}: {t['rps']:,.0f} req/s, server {t['server_us_per_req']:.1f} µs/req")
                tput[layout] = {name: median_run(r) for name, r in runs.items()}
        for server in servers:
            if server.process.poll() is not None:
                raise RuntimeError(f"{server.name} died during the run:\n{server.log_tail()}")
        print_report(names, tput, streams, args)
        log(f"total run time {time.monotonic() - started:.0f} s; load average (1 min) now {os.getloadavg()[0]:.2f}; "
            f"server logs in {logdir}")
    finally:
        for server in servers:
            server.stop()


if __name__ == "__main__":
    main()

"""A metering proxy in front of DynamoDB Local: it asks DynamoDB for the capacity of every
data call (`ReturnConsumedCapacity: TOTAL`), passes the answers back unchanged, and sums
what DynamoDB reported, split into reads and writes. The servers measured behind it need
no change of their own; the end-to-end benchmark starts one proxy per server.

DynamoDB Local does not check request signatures, so the one added field is accepted; the
response (and its `x-amz-crc32`) is passed on byte for byte.
"""

import asyncio
import json
import threading

READS = {"GetItem", "Query", "Scan", "BatchGetItem", "TransactGetItems"}
WRITES = {"PutItem", "UpdateItem", "DeleteItem", "BatchWriteItem", "TransactWriteItems"}


class Meter:
    def __init__(self):
        self.lock = threading.Lock()
        self.read_units = 0.0
        self.write_units = 0.0
        self.requests = 0
        # (operation, table) -> [requests, units]: where the units go.
        self.by_operation = {}

    def add(self, operation, consumed, table=""):
        units = 0.0
        entries = consumed if isinstance(consumed, list) else [consumed]
        for entry in entries:
            if isinstance(entry, dict):
                units += float(entry.get("CapacityUnits") or 0.0)
        with self.lock:
            slot = self.by_operation.setdefault((operation, table), [0, 0.0])
            slot[0] += 1
            slot[1] += units
            self.requests += 1
            if operation in WRITES:
                self.write_units += units
            else:
                self.read_units += units

    def snapshot(self):
        with self.lock:
            return {"readUnits": self.read_units, "writeUnits": self.write_units, "requests": self.requests,
                    "byOperation": {f"{op} {table}".strip(): list(v) for (op, table), v in self.by_operation.items()}}


async def _read_message(reader):
    """One HTTP/1.1 message (head, headers dict with lower-case names, body); None at EOF."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return lines[0], lines[1:], headers, body


async def _read_body(reader, headers):
    """(the bytes as sent, the decoded body), for a Content-Length or a chunked body."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        raw, body = bytearray(), bytearray()
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            chunk = await reader.readexactly(size + 2)
            raw += chunk
            body += chunk[:-2]
            if size == 0:
                return bytes(raw), bytes(body)
    length = int(headers.get("content-length", "0") or 0)
    body = await reader.readexactly(length) if length else b""
    return body, body


class CapacityProxy:
    """Listens on 127.0.0.1:`port` (0 = any free port) and forwards to `upstream` (host, port)."""

    def __init__(self, upstream, port=0):
        self.upstream = upstream
        self.meter = Meter()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    @property
    def endpoint(self):
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, client_reader, client_writer):
        up_reader = up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            while True:
                try:
                    start, header_lines, headers, body = await _read_message(client_reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                operation = headers.get("x-amz-target", "").rsplit(".", 1)[-1]
                metered = operation in READS or operation in WRITES
                table = ""
                if metered and body:
                    request = json.loads(body)
                    table = request.get("TableName") or ",".join(sorted({
                        next(iter(item.values())).get("TableName", "") for item in request.get("TransactItems", [])
                    } | set(request.get("RequestItems", {}))))
                    request.setdefault("ReturnConsumedCapacity", "TOTAL")
                    if request["ReturnConsumedCapacity"] == "NONE":
                        request["ReturnConsumedCapacity"] = "TOTAL"
                    body = json.dumps(request).encode()
                kept = [line for line in header_lines if line and not line.lower().startswith("content-length:")]
                up_writer.write(
                    (start + "\r\n" + "\r\n".join(kept) + f"\r\nContent-Length: {len(body)}\r\n\r\n").encode("latin-1")
                    + body
                )
                await up_writer.drain()
                head = await up_reader.readuntil(b"\r\n\r\n")
                response_headers = {}
                for line in head.decode("latin-1").split("\r\n")[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        response_headers[name.strip().lower()] = value.strip()
                raw, response_body = await _read_body(up_reader, response_headers)
                if metered:
                    try:
                        consumed = json.loads(response_body).get("ConsumedCapacity")
                    except ValueError:
                        consumed = None
                    self.meter.add(operation, consumed or [], table)
                client_writer.write(head + raw)
                await client_writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            for writer in (client_writer, up_writer):
                if writer is not None:
                    writer.close()

    def snapshot(self):
        return self.meter.snapshot()

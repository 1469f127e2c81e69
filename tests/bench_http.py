"""CPU per request of an HTTP server on trio, the server alone (docs/benchmarks.md, "HTTP layer").

    .venv/bin/python tests/bench_http.py [--server ours|hypercorn|both] [--events 1] [--seconds 10]

The server runs in a child process with a minimal ASGI app (reads the body, answers
``{"success":true}``); a client process keeps ``--connections`` keep-alive connections busy
with pre-encoded Segment batches of ``--events`` events. Reported: the server process's CPU
(user + system, from /proc) per request. ``hypercorn`` needs the [h2c] extra.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import time
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        from evactors.service.http.request import lifespan

        await lifespan(scope, receive, send)  # hypercorn's start-up handshake
        return
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        more = message.get("more_body", False)
    body = b'{"success":true}'
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def serve(kind: str, port: int) -> None:
    import trio

    async def main() -> None:
        stop = trio.Event()
        if kind == "ours":
            from evactors.core.limits import ConnectionCount
            from evactors.service.http.server import Listener, bind_socket

            listener = Listener(app, ConnectionCount(0, 0), 1, 30.0, 1.0, counted=False)
            await listener.serve([bind_socket(f"127.0.0.1:{port}")], stop.wait)
        else:
            import hypercorn.config
            import hypercorn.trio

            config = hypercorn.config.Config()
            config.bind = [f"127.0.0.1:{port}"]
            config.accesslog = None
            await hypercorn.trio.serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]

    trio.run(main)


def request(events: int) -> bytes:
    batch = [{"type": "track", "event": "Page Viewed", "anonymousId": f"a-{i}", "messageId": f"m-{i}",
              "properties": {"path": "/pricing", "title": "Pricing", "n": i, "referrer": "https://example.com/x"},
              "context": {"userAgent": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/126.0",
                          "page": {"url": "https://example.com/pricing", "path": "/pricing"},
                          "library": {"name": "analytics.js", "version": "5.2.0"}}} for i in range(events)]
    body = json.dumps({"batch": batch}).encode()
    return (b"POST /v1/batch HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Basic a2V5LWE6\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/126.0\r\n"
            b"Origin: https://example.com\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def client(port: int, payload: bytes, connections: int, seconds: float, out: Any) -> None:
    import trio

    count = 0

    async def lane() -> None:
        nonlocal count
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        buffer = b""
        while True:
            await stream.send_all(payload)
            while True:
                head, sep, rest = buffer.partition(b"\r\n\r\n")
                if sep:
                    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                    if len(rest) >= length:
                        buffer = rest[length:]
                        break
                buffer += await stream.receive_some(65536)
            count += 1

    async def main() -> None:
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:
                for _ in range(connections):
                    nursery.start_soon(lane)
        out.put(count)

    trio.run(main)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, events: int, seconds: float, connections: int) -> tuple[float, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = multiprocessing.Process(target=serve, args=(kind, port), daemon=True)
    server.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    out: Any = multiprocessing.Queue()
    warm = multiprocessing.Process(target=client, args=(port, request(events), connections, 1.0, out))
    warm.start()
    warm.join()
    out.get()
    assert server.pid is not None
    before = cpu_seconds(server.pid)
    load = multiprocessing.Process(target=client, args=(port, request(events), connections, seconds, out))
    load.start()
    load.join()
    requests = out.get()
    used = cpu_seconds(server.pid) - before
    server.terminate()
    server.join()
    return used / requests * 1e6, requests / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", choices=["ours", "hypercorn", "both"], default="both")
    parser.add_argument("--events", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds of each server")
    args = parser.parse_args()
    kinds = ["hypercorn", "ours"] if args.server == "both" else [args.server]
    print(f"{args.events} event(s)/request ({len(request(args.events))} B), {args.connections} connections")
    for _ in range(args.rounds):
        for kind in kinds:
            per_request, rate = measure(kind, args.events, args.seconds, args.connections)
            print(f"{kind:10} {per_request:8.0f} µs CPU/request   {rate:8.0f} requests/s")


if __name__ == "__main__":
    main()

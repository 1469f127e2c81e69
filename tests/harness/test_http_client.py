"""The harness's lean HTTP client against the real service: keep-alive (one connection for
many requests), pipelining (answers matched to requests in order, whatever their status),
``Connection: close``, a server that hangs up, and chunked answers."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import uvloop

from evactors.harness.http_client import Client, HTTPError, encode, request_head
from evactors.harness.loadtest import _address


def _head(url: str, key: str, extra: dict[str, str] | None = None) -> bytes:
    host, port, _unix, prefix = _address(url)
    auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
    return request_head("POST", prefix + "/v1/batch", f"{host}:{port}",
                        {"Authorization": auth, "Content-Type": "application/json", **(extra or {})})


def _body(run: str, i: int, n: int = 1) -> bytes:
    return json.dumps({"batch": [{"type": "track", "event": "e", "anonymousId": f"{run}-dev{i % 3}",
                                  "messageId": f"{run}-m{i}-{j}", "properties": {"i": i}}
                                 for j in range(n)]}).encode()


def test_keep_alive_and_pipelining_match_every_answer_to_its_request(make_service: Any) -> None:
    service = make_service().start()
    host, port, _unix, _prefix = _address(service.url)
    good, wrong = _head(service.url, "key-a"), _head(service.url, "no-such-key")

    async def main() -> dict[str, Any]:
        client = Client(host, port, timeout=10)
        sequential = [await client.request(encode(good, _body("ka", i, 1 + i % 4))) for i in range(30)]
        connects_after_sequential = client.connects
        # Pipelined: requests written at once, each answered in its turn: a malformed body (400),
        # a batch with an invalid message among good ones (400), an unknown key (401: the server
        # answers and hangs up; the next request goes on a new connection).
        await client.connect()
        mixed = json.dumps({"batch": [{"type": "track", "event": "x", "anonymousId": "pl-dev",
                                       "messageId": "pl-ok"}, {"type": "track", "event": "x"}]}).encode()
        piped = client.pipeline([encode(good, _body("pl", 0)), encode(good, b'{"batch": [{'), encode(good, mixed),
                                 encode(good, _body("pl", 1, 5)), encode(good, _body("pl", 2)),
                                 encode(wrong, _body("pl", 3))])
        answers = await asyncio.gather(*piped)
        answered = client.connection.answers if client.connection else 0
        closed = client.connection is not None and client.connection.closed
        then = await client.request(encode(good, _body("pl", 5)))
        return {"sequential": sequential, "connects": connects_after_sequential, "piped": answers,
                "answered": answered, "closed": closed, "then": then, "connects_end": client.connects}

    out = uvloop.run(main())
    assert [a.status for a in out["sequential"]] == [200] * 30
    assert all(json.loads(a.body) == {"success": True} for a in out["sequential"])
    assert out["connects"] == 1, "keep-alive: one connection for 30 requests"
    assert [a.status for a in out["piped"]] == [200, 400, 400, 200, 200, 401]
    invalid = json.loads(out["piped"][2].body)
    assert invalid["error"] == "invalid_events" and invalid["accepted"] == 1
    assert [r["index"] for r in invalid["rejected"]] == [1]
    assert out["answered"] == 36
    assert out["closed"] and out["then"].status == 200 and out["connects_end"] == 2
    # every event answered 200 is stored once: the sequential ones, then 1 + 1 (the valid half of
    # the mixed batch) + 5 + 1 + 1 (on the new connection); none of the one answered 401
    expected = sum(1 + i % 4 for i in range(30)) + 9
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = service.query("SELECT count() AS n, uniqExact(message_id) AS u FROM evactors.events "
                             "WHERE message_id LIKE 'ka-%' OR message_id LIKE 'pl-%'")
        if rows[0]["n"] >= expected:
            break
        time.sleep(0.5)
    time.sleep(1)  # and no more
    rows = service.query("SELECT count() AS n, uniqExact(message_id) AS u FROM evactors.events "
                         "WHERE message_id LIKE 'ka-%' OR message_id LIKE 'pl-%'")
    assert rows[0]["n"] == rows[0]["u"] == expected


def test_connection_close_and_a_hang_up_reconnect_and_fail_only_their_request(make_service: Any) -> None:
    service = make_service().start()
    host, port, _unix, _prefix = _address(service.url)
    closing = _head(service.url, "key-a", {"Connection": "close"})
    good = _head(service.url, "key-a")

    async def main() -> tuple[list[int], int, str]:
        client = Client(host, port, timeout=10)
        statuses = [(await client.request(encode(closing, _body("cc", 0)))).status]
        assert client.connection is not None and client.connection.closed  # the server said close
        statuses.append((await client.request(encode(good, _body("cc", 1)))).status)
        # not HTTP: the server answers 400 and hangs up (or hangs up at once); either way only
        # that request fails, and the next one goes on a new connection
        assert client.connection is not None
        garbage = client.connection.send(b"NOT HTTP AT ALL\r\n\r\n")
        error = ""
        try:
            error = str((await garbage).status)
        except HTTPError as e:
            error = type(e).__name__
        for _ in range(100):  # the server hangs up after its answer
            if client.connection.closed:
                break
            await asyncio.sleep(0.02)
        statuses.append((await client.request(encode(good, _body("cc", 3)))).status)
        return statuses, client.connects, error

    statuses, connects, error = uvloop.run(main())
    assert statuses == [200, 200, 200]
    assert error in ("400", "HTTPError") and connects == 3


def test_chunked_answers_split_anywhere_are_parsed_in_order() -> None:
    body = b'{"error":"x","message":"chunked"}'
    chunked = (b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 7]), body[i:i + 7]) for i in range(0, len(body), 7))
               + b"0\r\n\r\n")
    plain = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Length: 2\r\n\r\n{}"
    stream = chunked + b"HTTP/1.1 100 Continue\r\n\r\n" + plain + chunked

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for _ in range(3):  # three requests (each a head with Content-Length: 0)
            await reader.readuntil(b"\r\n\r\n")
        for i in range(0, len(stream), 5):  # the answers trickle in five bytes at a time
            writer.write(stream[i:i + 5])
            await writer.drain()
            await asyncio.sleep(0)
        await reader.read()

    async def main() -> list[Any]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = Client("127.0.0.1", port, timeout=10)
        await client.connect()
        request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        answers = await asyncio.gather(*client.pipeline([request] * 3))
        client.close()
        server.close()
        return answers

    a, b, c = asyncio.run(main())
    assert (a.status, a.body) == (400, body) and (c.status, c.body) == (400, body)
    assert (b.status, b.body, b.retry_after) == (503, b"{}", b"2")


def test_the_senders_remap_through_the_admin_socket_and_verify(make_service: Any, tmp_path: Any) -> None:
    """Re-maps go to the admin listener (a unix socket) on their own connection, between the
    lane's batches; the run still verifies: every acknowledged event stored once."""
    from evactors.harness.loadtest import LoadTest
    from evactors.harness.run import BEHIND, REMAP, Options, Phase
    from evactors.harness.verify import AdminReader, verify

    service = make_service().start()
    opts = Options(url=service.url, write_key="key-a", project="project-a", phases=[Phase(1500, 4)], lanes=4,
                   batch=(1, 5), data_dir=service.data_dir, report_dir=tmp_path / "report", progress=False,
                   remap_fraction=0.5, run_id="rm")
    test = LoadTest(opts, say=lambda _text: None)
    try:
        test.prepare()
        result = test.run()
        test.drain()
        result = test.finish()
    finally:
        test.close()
    remaps = [status for r, (status, _a, _rej) in result.outcomes.items() if result.traffic.flags[r] == REMAP]
    assert remaps.count(200) >= 2 and set(remaps) <= {200, BEHIND}, remaps  # behind: not sent when the phase ended
    plain = [status for r, (status, _a, _rej) in result.outcomes.items() if result.traffic.flags[r] != REMAP]
    assert plain.count(200) > 100
    verification = verify(result, AdminReader(service.admin, (service.data_dir / "admin.token").read_text().strip()),
                          sessions_closed=False)
    assert verification["ok"], [c for c in verification["checks"] if not c["ok"]]

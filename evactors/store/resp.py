"""A small Redis client native to trio, for the hot paths: pipelined commands on a trio
socket, replies parsed by hiredis.

redis-py is synchronous here, so each call costs a hop to a worker thread and back, and
the hop (waking the thread, passing the GIL both ways) cost more CPU under load than the
command itself. This client runs in the trio thread: one ``send_all`` of the packed
commands, replies read until all are in. It does only what the hot paths need (commands
in a pipeline, scripts by SHA with a reload on ``NOSCRIPT``); everything else stays on
redis-py.

Faults look like redis-py's, so ``retrying`` and ``transient`` treat them the same: a
lost connection raises ``redis.ConnectionError``, a deadline ``redis.TimeoutError``, and
a connection that saw either is dropped. A call is shielded from cancellation under its
deadline, as the thread call it replaces was: a command is never left half-sent.
"""

from __future__ import annotations

import hashlib
import os
import select
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import hiredis
import redis
import trio
from redis.connection import parse_url

Command = Sequence[Any]


def pack(commands: Sequence[Command]) -> bytes:
    out: list[bytes] = []
    append = out.append
    for command in commands:
        append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, bytes):
                data = arg
            elif isinstance(arg, str):
                data = arg.encode()
            elif isinstance(arg, int):
                data = b"%d" % arg
            elif isinstance(arg, float):
                data = repr(arg).encode()
            else:
                raise redis.DataError(f"cannot send {type(arg).__name__} to redis: {arg!r:.40}")
            append(b"$%d\r\n" % len(data))
            append(data)
            append(b"\r\n")
    return b"".join(out)


class FenceMoved(redis.exceptions.RedisError):
    """A fenced transaction refused: the fence key no longer holds the writer's token (its
    shard was taken by another owner, or Redis lost the key). Nothing was written."""

    def __init__(self, key: str, held: Any) -> None:
        super().__init__(f"fence {key} holds {held!r}: not this writer's")
        self.key = key


class Script:
    """A Lua script called by SHA; loaded again when the server has lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def call(self, keys: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        return ["EVALSHA", self.sha, len(keys), *keys, *args]


def no_script(reply: Any) -> bool:
    """A script call refused because the server does not have the script (redis-py strips
    the NOSCRIPT prefix into its own exception type; hiredis keeps it)."""
    return isinstance(reply, redis.exceptions.NoScriptError) or (
        isinstance(reply, redis.ResponseError) and str(reply).startswith("NOSCRIPT"))


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = hiredis.Reader(protocolError=redis.exceptions.InvalidResponse,
                                     replyError=redis.ResponseError)

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        await self.stream.send_all(pack(commands))
        replies: list[Any] = []
        reader = self.reader
        while len(replies) < len(commands):
            reply = reader.gets()
            if reply is False:
                data = await self.stream.receive_some(1 << 16)
                if not data:
                    raise redis.ConnectionError("connection closed by the server")
                reader.feed(bytes(data))
                continue
            replies.append(reply)
        return replies


def _closed(connection: _Connection) -> bool:
    """Whether an idle connection has something to read: only its end (or garbage) can be."""
    socket = getattr(connection.stream, "socket", None)
    if socket is None:
        return False
    poll = select.poll()
    poll.register(socket.fileno(), select.POLLIN)
    return bool(poll.poll(0))


class NativeRedis:
    """A pool of trio connections to one server (``redis://`` or ``unix://``)."""

    def __init__(self, url: str, timeout: float) -> None:
        self.options = parse_url(url)
        self.timeout = timeout
        self.idle: list[_Connection] = []

    @staticmethod
    def supports(url: str) -> bool:
        return url.startswith(("redis://", "unix://"))

    async def _connect(self) -> _Connection:
        o = self.options
        stream: trio.abc.Stream
        if "path" in o:
            stream = await trio.open_unix_socket(o["path"])
        else:
            stream = await trio.open_tcp_stream(o.get("host", "localhost"), int(o.get("port", 6379)))
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, 1)
        connection = _Connection(stream)
        setup: list[Command] = []
        if o.get("password"):
            setup.append(["AUTH", *([o["username"]] if o.get("username") else []), o["password"]])
        if o.get("db"):
            setup.append(["SELECT", o["db"]])
        try:
            for reply in await connection.execute(setup) if setup else []:
                if isinstance(reply, Exception):
                    if str(reply).startswith(("WRONGPASS", "NOAUTH", "ERR invalid password")):
                        raise redis.AuthenticationError(str(reply))  # as redis-py: a ConnectionError
                    raise reply
        except BaseException:
            await self._drop(connection)
            raise
        return connection

    async def execute(self, commands: Sequence[Command], fence: tuple[str, bytes] | None = None,
                      suffix: Sequence[Command] = ()) -> list[Any]:
        """Run ``commands`` as one pipeline; error replies come back in place, as
        exceptions (like redis-py's ``execute(raise_on_error=False)``). With ``fence`` (a key
        and the value it must hold), on one connection: ``WATCH`` and ``GET`` of the key
        first, then ``commands`` (a MULTI … EXEC) only if it holds that value, else
        ``FenceMoved``; an EXEC refused because the key changed meanwhile raises it too.
        ``suffix``: sent right after ``commands`` on the same connection (a ``WAIT``), its
        replies after theirs."""
        with trio.CancelScope(shield=True):
            connection: _Connection | None = None
            try:
                with trio.fail_after(self.timeout):
                    while self.idle and connection is None:
                        connection = self.idle.pop()
                        if _closed(connection):  # the server went away meanwhile
                            await self._drop(connection)
                            connection = None
                    if connection is None:
                        connection = await self._connect()
                    if fence is not None:
                        _watched, held = await connection.execute([["WATCH", fence[0]], ["GET", fence[0]]])
                        if isinstance(held, Exception):  # e.g. MOVED on a cluster: nothing watched
                            await connection.execute([["UNWATCH"]])
                            raise held
                        if held != fence[1]:
                            await connection.execute([["UNWATCH"]])
                            raise FenceMoved(fence[0], held)
                    replies = await connection.execute([*commands, *suffix] if suffix else commands)
                    if fence is not None and commands and replies[len(commands) - 1] is None:
                        raise FenceMoved(fence[0], None)  # EXEC refused: the fence moved under it
            except trio.TooSlowError:
                await self._drop(connection)
                raise redis.TimeoutError(f"no reply from redis within {self.timeout}s") from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as e:
                await self._drop(connection)
                raise redis.ConnectionError(f"redis connection lost: {e}") from None
            except (FenceMoved, redis.ResponseError):
                if connection is not None:
                    self.idle.append(connection)  # nothing is left watched on it
                raise
            except BaseException:
                await self._drop(connection)
                raise
            self.idle.append(connection)
        return replies

    async def scripts(self, script: Script, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                      extra: Sequence[Command] = (), wait: bool = False) -> list[Any]:
        return await run_scripts(self.execute, script, calls, extra, wait)

    async def _drop(self, connection: _Connection | None) -> None:
        if connection is not None:
            with trio.move_on_after(1):
                await connection.stream.aclose()

    def close(self) -> None:
        """Close the idle connections; callable outside trio too (nothing waits on them)."""
        while self.idle:
            socket = getattr(self.idle.pop().stream, "socket", None)
            if socket is not None:
                os.close(socket.detach())


async def run_scripts(execute: Callable[[Sequence[Command]], Awaitable[list[Any]]], script: Script,
                      calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
                      extra: Sequence[Command] = (), wait: bool = False) -> list[Any]:
    """``script`` once per (keys, args), then ``extra``, in one pipeline; calls refused with
    NOSCRIPT (a restarted server) are run again after loading it. ``wait``: ``extra`` waits
    for the writes before it (WAITAOF) and is sent again after the retried calls; else it
    ran once, with the first pipeline."""
    replies = await execute([*(script.call(k, a) for k, a in calls), *extra])
    again = [i for i in range(len(calls)) if no_script(replies[i])]
    if again:
        load, *retried = await execute([["SCRIPT", "LOAD", script.source],
                                        *(script.call(*calls[i]) for i in again), *(extra if wait else ())])
        if isinstance(load, Exception):
            raise load
        for i, reply in zip(again, retried, strict=False):
            replies[i] = reply
        if extra and wait:
            replies[len(calls):] = retried[len(again):]
    return replies

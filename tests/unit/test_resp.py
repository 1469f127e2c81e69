"""The trio-native Redis client of the hot paths, against a real Valkey: pipelines, scripts
reloaded after the server lost them (native and redis-py paths alike), faults shaped like
redis-py's, and a connection pool that survives a server restart."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import trio

from evactors.store.redis_io import RedisIO
from evactors.store.resp import Script, pack

INCR_BY = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")


def _io(valkey: Any, native: bool = True) -> RedisIO:
    io = RedisIO(f"unix://{valkey.unix_socket_path}", 5)
    if not native:
        io.native = None  # the redis-py path (rediss:// takes it)
    return io


def test_pack_is_resp_and_refuses_what_it_cannot_send() -> None:
    assert pack([["SET", "k", 12], ["GET", b"\x00k"]]) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\n12\r\n*2\r\n$3\r\nGET\r\n$2\r\n\x00k\r\n")
    with pytest.raises(redis.DataError):
        pack([["SET", "k", None]])


@pytest.mark.parametrize("native", [True, False])
async def test_pipelines_and_scripts_reloaded_after_a_flush(valkey: Any, native: bool) -> None:
    io = _io(valkey, native)
    replies = await io.execute([["SET", "a", "1"], ["INCR", "a"], ["HGET", "a", "x"], ["GET", "a"]])
    assert replies[0] in (b"OK", True) and replies[1] == 2  # redis-py parses OK to True
    assert isinstance(replies[2], redis.ResponseError) and "WRONGTYPE" in str(replies[2])
    assert replies[3] == b"2"
    with pytest.raises(redis.ResponseError):
        await io.execute([["HGET", "a", "x"]], check=True)
    assert await io.script(INCR_BY, ["n"], [5]) == 5
    io.client.script_flush()  # as a restarted server: the script is gone
    replies = await io.scripts(INCR_BY, [(["n"], [1]), (["m"], [2])], extra=[["GET", "n"]], wait=True)
    assert replies == [6, 2, b"6"]  # both calls ran once, and the extra (sent again) after them
    io.client.script_flush()
    replies = await io.scripts(INCR_BY, [(["n"], [1])], extra=[["INCR", "once"]])
    assert replies == [7, 1] and await io.execute([["GET", "once"]]) == [b"1"]  # extra ran once
    io.close()


async def test_faults_look_like_redis_pys_and_the_pool_recovers(valkey: Any) -> None:
    io = _io(valkey)
    assert await io.execute([["PING"]]) == [b"PONG"]
    valkey.stop()
    with pytest.raises(redis.ConnectionError):
        await io.execute([["PING"]])  # the pooled connection is dead, and no new one opens
    valkey.start()
    assert await io.execute([["PING"]]) == [b"PONG"]  # a fresh connection
    io.native.timeout = 0.2  # type: ignore[union-attr]
    with pytest.raises(redis.TimeoutError):
        await io.execute([["BLPOP", "nothing", 0]])
    assert await io.execute([["PING"]]) == [b"PONG"]  # the timed-out connection was dropped
    io.close()


async def test_a_call_is_not_torn_by_cancellation(valkey: Any) -> None:
    io = _io(valkey)
    with trio.move_on_after(0.01):
        await io.execute([["DEBUG", "SLEEP", "0.2"], ["SET", "after", "1"]])
    # shielded: it finished, and its connection went back whole
    assert await io.execute([["GET", "after"], ["PING"]]) == [b"1", b"PONG"]
    io.close()

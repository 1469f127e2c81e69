"""Every Lua script the service runs, in one place, each a ``Script`` (called by SHA,
loaded again on NOSCRIPT) and run one way: ``RedisIO.script``/``scripts`` (the trio-native
client where it can, else redis-py in a worker thread); ``run_sync`` for the command line.

Each runs where atomicity needs it and plain commands cannot do: the entry and its
counter, the flush plan, the removal of what is done (the session commit is a plain
MULTI/EXEC, in ``pipeline.sessions``). ``KEYS``/``ARGV`` are described above
each script.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evactors.store.resp import Script


def run_sync(client: Any, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """One call of ``script`` from a sync redis-py client (the command line)."""
    return client.eval(script.source, len(keys), *keys, *args)


# KEYS: ingest stream, its counter. ARGV: events, blob. Atomic: the entry and the count.
APPEND = Script("""
local id = redis.call('XADD', KEYS[1], '*', 'n', ARGV[1], 'e', ARGV[2])
redis.call('INCRBY', KEYS[2], tonumber(ARGV[1]))
return id
""")


# KEYS: stream, counter[, flush plan]. ARGV: the plan carried out (or ""), id1, n1, id2, n2, …
# Used by the acker and the flusher (no plan), and for a shard's own plan left by a version
# before the flush plan over all shards, dropped only if it is still the one carried out.
# allow-oom: it frees memory, so it must run when Redis is full; without the flag a full
# Redis would run its XDELs and refuse its DECRBY (a script is not rolled back).
REMOVE_ENTRIES = Script("""#!lua flags=allow-oom
local removed = 0
for i = 2, #ARGV, 2 do
  if redis.call('XDEL', KEYS[1], ARGV[i]) == 1 then
    removed = removed + tonumber(ARGV[i + 1])
  end
end
if removed > 0 then redis.call('DECRBY', KEYS[2], removed) end
if KEYS[3] and redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
return removed
""")


# KEYS: a buffer stream. ARGV: most entries, most rows. The ids and row counts ("n") of its
# oldest entries, flat (id1, n1, id2, n2, …), until the rows reach the most: what a flush plan
# may cover. Read in small pages, so a long buffer is not read whole. Read-only: it runs on
# a full Redis, as flushing is what frees it.
HEADS = Script("""#!lua flags=no-writes
local out, rows, after = {}, 0, '-'
local most_entries, most_rows = tonumber(ARGV[1]), tonumber(ARGV[2])
while #out < 2 * most_entries and rows < most_rows do
  local page = redis.call('XRANGE', KEYS[1], after, '+', 'COUNT', 32)
  if #page == 0 then break end
  for _, entry in ipairs(page) do
    local fields, n = entry[2], 0
    for j = 1, #fields, 2 do
      if fields[j] == 'n' then n = tonumber(fields[j + 1]) end
    end
    out[#out + 1] = entry[1]
    out[#out + 1] = n
    rows = rows + n
    after = '(' .. entry[1]
    if rows >= most_rows or #out >= 2 * most_entries then break end
  end
  if #page < 32 then break end
end
return out
""")


# KEYS: the flush plan key. ARGV: a plan. The recorded plan, or this one, recorded now:
# there is only ever one plan, whoever flushes. allow-oom: flushing frees a full Redis.
PLAN = Script("""#!lua flags=allow-oom
local plan = redis.call('GET', KEYS[1])
if plan then return plan end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
""")


# KEYS: the flush plan key. ARGV: the plan carried out. Its inserts are done: a flusher that
# takes the plan over from now on only deletes its entries. Nothing if another plan is
# recorded (this one was finished meanwhile).
PLAN_INSERTED = Script("""#!lua flags=allow-oom
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'inserted ' .. ARGV[1])
  return 1
end
return 0
""")


# KEYS: the flush plan key. ARGV: the plan carried out. Dropped once its entries are deleted,
# if it is still the one recorded (a late flusher never drops the next plan).
PLAN_DONE = Script("""#!lua flags=allow-oom
local plan = redis.call('GET', KEYS[1])
if plan == ARGV[1] or plan == 'inserted ' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
""")


# KEYS: a stream, its counter, the dead-letter stream. ARGV: id, count, error, data, source.
# The entry moves to the dead letters, atomically with its removal and the count; only if it
# was still there, so a call run again (its reply lost) adds no second dead letter.
BURY_ENTRY = Script("""
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(ARGV[2]))
  redis.call('XADD', KEYS[3], '*', 'source', ARGV[5], 'id', ARGV[1], 'n', ARGV[2], 'error', ARGV[3],
             'data', ARGV[4])
  return 1
end
return 0
""")


# KEYS: dead-letter stream, ingest stream, its counter. ARGV: dead-letter ids.
# An entry goes back as an ingest entry (its events as a msgpack array), and leaves.
REPLAY = Script("""
local moved = 0
for i = 1, #ARGV do
  local found = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #found == 1 then
    local fields = found[1][2]
    local entry = {}
    for j = 1, #fields, 2 do entry[fields[j]] = fields[j + 1] end
    local n = tonumber(entry['n'] or '1')
    redis.call('XADD', KEYS[2], '*', 'n', n, 'e', entry['data'])
    redis.call('INCRBY', KEYS[3], n)
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
""")


# KEYS: a shard's lease, its fence. ARGV: owner, takeover prefix, lease ms.
# The lease for ``owner``: renewed if it holds it; else taken (the fence moves on) if no one
# holds it or its holder's name starts with the takeover prefix (an earlier incarnation of the
# same instance); else refused. {1, fence} or {0, ms until the holder's lease expires}.
ACQUIRE_LEASE = Script("""
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, tonumber(redis.call('GET', KEYS[2]) or '0')}
end
if holder and string.sub(holder, 1, #ARGV[2]) ~= ARGV[2] then
  return {0, redis.call('PTTL', KEYS[1])}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return {1, redis.call('INCR', KEYS[2])}
""")


# KEYS: a shard's lease. ARGV: owner. Let go (a graceful stop): only its own.
RELEASE_LEASE = Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

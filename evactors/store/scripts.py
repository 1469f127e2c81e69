"""Every Lua script the service runs, in one place, each a ``Script`` (called by SHA,
loaded again on NOSCRIPT) and run one way: ``RedisIO.script``/``scripts`` (the trio-native
client where it can, else redis-py in a worker thread); ``run_sync`` for the command line.

Each runs where atomicity needs it: the entry and its counter, the commit of a unit of
work, the flush plan, the removal of what is done. ``KEYS``/``ARGV`` are described above
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


# KEYS: buffer stream, buffer count, session index, dedup keys…, alias keys…, state keys…
# ARGV: dedup ttl, state ttl, number of dedup keys, rows, block, number of alias keys, then
# per alias key its target, then per state key its value and its index score ("" when it
# has no open session: leave the index).
COMMIT = Script("""
local nd = tonumber(ARGV[3])
local na = tonumber(ARGV[6])
for i = 1, nd do
  redis.call('SET', KEYS[3 + i], '1', 'EX', ARGV[1])
end
local a = 7
for i = 4 + nd, 3 + nd + na do
  redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[2])
  a = a + 1
end
local adds, removes = {}, {}
for i = 4 + nd + na, #KEYS do
  redis.call('SET', KEYS[i], ARGV[a], 'EX', ARGV[2])
  if ARGV[a + 1] == '' then
    removes[#removes + 1] = KEYS[i]
  else
    adds[#adds + 1] = ARGV[a + 1]
    adds[#adds + 1] = KEYS[i]
  end
  a = a + 2
end
if #adds > 0 then redis.call('ZADD', KEYS[3], unpack(adds)) end
if #removes > 0 then redis.call('ZREM', KEYS[3], unpack(removes)) end
local rows = tonumber(ARGV[4])
if rows > 0 then
  redis.call('XADD', KEYS[1], '*', 'n', ARGV[4], 'd', ARGV[5])
  redis.call('INCRBY', KEYS[2], rows)
end
return rows
""")


# KEYS: last-view keys. ARGV: ttl, then per key the view's created_at and its JSON. Each is
# kept unless the stored view is newer. One call per batch of notices, however many views.
SET_LAST_VIEWS = Script("""
local written = 0
for i = 1, #KEYS do
  local at = tonumber(ARGV[2 * i])
  local old = redis.call('GET', KEYS[i])
  local newer = false
  if old then
    local ok, view = pcall(cjson.decode, old)
    newer = ok and type(view) == 'table' and tonumber(view.created_at) ~= nil
            and tonumber(view.created_at) > at
  end
  if not newer then
    redis.call('SET', KEYS[i], ARGV[2 * i + 1], 'EX', ARGV[1])
    written = written + 1
  end
end
return written
""")


# KEYS: stream, counter[, flush plan]. ARGV: the plan carried out (or ""), id1, n1, id2, n2, …
# Used by the acker (no plan) and the flusher, which drops its plan only if it is still the
# one it carried out (another flusher may already have recorded the next).
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


# KEYS: plan key, buffer stream. ARGV: most entries to read, rows per chunk.
# The recorded plan ("first last"), or a new one over the oldest entries, recorded here.
# allow-oom: flushing is what frees a full Redis, so it must be able to start then.
PLAN = Script("""#!lua flags=allow-oom
local plan = redis.call('GET', KEYS[1])
if plan then return plan end
local entries = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', tonumber(ARGV[1]))
if #entries == 0 then return false end
local rows, last = 0, entries[1][1]
for _, entry in ipairs(entries) do
  local fields = entry[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'n' then rows = rows + tonumber(fields[j + 1]) end
  end
  last = entry[1]
  if rows >= tonumber(ARGV[2]) then break end
end
plan = entries[1][1] .. ' ' .. last
redis.call('SET', KEYS[1], plan)
return plan
""")


# KEYS: a stream, its counter, the dead-letter stream. ARGV: id, count, error, data, source.
# The entry moves to the dead letters, atomically with its removal and the count.
BURY_ENTRY = Script("""
redis.call('XADD', KEYS[3], '*', 'source', ARGV[5], 'id', ARGV[1], 'n', ARGV[2], 'error', ARGV[3],
           'data', ARGV[4])
if redis.call('XDEL', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(ARGV[2]))
end
return 1
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

"""The Lua scripts of the Redis backend: each a check and its writes, atomic in one round trip.

`touch`, the sweep and an update of one live session's keys (the commit of
most calls) run as scripts, where a WATCH loop would take several round trips
and could starve behind busy sessions; `list_sessions` counts each session's
keys and bytes in the server with one, so a listing never transfers the values.
The scripts build keys from ids, so the backend needs one Redis server (or
primary), not Redis Cluster. `concierge.state._redis_layout` describes the keys.
"""

from __future__ import annotations

# Lua that sets a session's expiry, given the locals `expires` (epoch seconds as text, "" = never),
# `ttl_meta` and `ttl_values` (Redis TTLs in ms: the metadata's, the values' and checkpoints') and `id`.
# KEYS: metadata, values, expiry, sessions, checkpoints (as in both scripts below).
_SET_EXPIRY = """
if expires == '' then
  redis.call('HDEL', KEYS[1], 'expires_at')
  redis.call('ZREM', KEYS[3], id)
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[2])
  redis.call('PERSIST', KEYS[5])
else
  redis.call('HSET', KEYS[1], 'expires_at', expires)
  redis.call('ZADD', KEYS[3], expires, id)
  redis.call('PEXPIRE', KEYS[1], ttl_meta)
  redis.call('PEXPIRE', KEYS[2], ttl_values)
  redis.call('PEXPIRE', KEYS[5], ttl_values)
end
"""

# KEYS: metadata, values, expiry, sessions, checkpoints. ARGV: now, expires_at ("" = never), TTL ms of the
# metadata, of the values (and checkpoints), id, -now. Renewing is activity: `updated_at` moves forward, never back.
TOUCH = f"""
local now = tonumber(ARGV[1])
local exp = redis.call('HGET', KEYS[1], 'expires_at')
if redis.call('EXISTS', KEYS[1]) == 0 or (exp and tonumber(exp) <= now) then return 0 end
local expires, ttl_meta, ttl_values, id = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
{_SET_EXPIRY}
if tonumber(redis.call('HGET', KEYS[1], 'updated_at')) < now then
  redis.call('HSET', KEYS[1], 'updated_at', ARGV[1])
  redis.call('ZADD', KEYS[4], ARGV[6], id)
end
return 1
"""

# The commonest commit - an update of one live session's keys, no creation, clear or checkpoint - in one
# round trip: the version check and the writes `_queue` would send in MULTI/EXEC, atomic as a script.
# KEYS: metadata, values, expiry, sessions, checkpoints. ARGV: now, expected version, new version, expires_at
# ("" = never), TTL ms of the metadata, of the values (and checkpoints), id, -now, stage ("" unchanged, "n"
# None, "s" the next argument), the stage, the number N of removed keys, N removed keys, then key, value
# pairs written. Returns {2} when applied, {1, version} when the version moved, {0} when gone or expired.
UPDATE = f"""
local meta = redis.call('HMGET', KEYS[1], 'version', 'expires_at')
if not meta[1] or (meta[2] and tonumber(meta[2]) <= tonumber(ARGV[1])) then return {{0}} end
if meta[1] ~= ARGV[2] then return {{1, meta[1]}} end
if ARGV[9] == 'n' then redis.call('HDEL', KEYS[1], 'stage') end
redis.call('HSET', KEYS[1], 'updated_at', ARGV[1], 'version', ARGV[3])
if ARGV[9] == 's' then redis.call('HSET', KEYS[1], 'stage', ARGV[10]) end
local removed = tonumber(ARGV[11])
if removed > 0 then redis.call('HDEL', KEYS[2], unpack(ARGV, 12, 11 + removed)) end
if #ARGV > 11 + removed then redis.call('HSET', KEYS[2], unpack(ARGV, 12 + removed, #ARGV)) end
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7])
local expires, ttl_meta, ttl_values, id = ARGV[4], ARGV[5], ARGV[6], ARGV[7]
{_SET_EXPIRY}
redis.call('PUBLISH', KEYS[4] .. ':changes', ARGV[3] .. ' ' .. id)
return {{2}}
"""
# Keys one `UPDATE` may carry: Lua's `unpack` is bounded by its stack; larger commits use MULTI/EXEC.
UPDATE_MAX_KEYS = 1000

# KEYS: expiry, sessions. ARGV: now, limit, prefix, "1" to return the sessions. Deletes up to `limit`
# sessions expired at `now`, oldest expiry first; returns {count, {{id, metadata, values}, ...}}.
SWEEP = """
local now, limit, prefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local taken, skipped, out = 0, 0, {}
while taken < limit do
  local batch = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', skipped, limit - taken)
  if #batch == 0 then break end
  for _, id in ipairs(batch) do
    local meta, vals, hist = prefix .. 's:' .. id, prefix .. 'v:' .. id, prefix .. 'h:' .. id
    local exp = redis.call('HGET', meta, 'expires_at')
    if exp and tonumber(exp) > now then
      skipped = skipped + 1
    else
      if exp and ARGV[4] == '1' then
        out[#out + 1] = {id, redis.call('HGETALL', meta), redis.call('HGETALL', vals)}
      end
      if exp or redis.call('EXISTS', meta) == 0 then
        -- expired, or already dropped by Redis' own expiry (then only the index remembers it)
        if exp then taken = taken + 1 end
        redis.call('DEL', meta, vals, hist)
        redis.call('ZREM', KEYS[2], id)
      end
      redis.call('ZREM', KEYS[1], id)
    end
  end
end
return {taken, out}
"""

# KEYS: metadata, values. {metadata, number of keys, UTF-8 bytes of the values}, or nil when gone:
# counted in the server, so a listing never transfers the values.
SUMMARY = """
local meta = redis.call('HGETALL', KEYS[1])
if #meta == 0 then return false end
local size = 0
for _, value in ipairs(redis.call('HVALS', KEYS[2])) do size = size + #value end
return {meta, redis.call('HLEN', KEYS[2]), size}
"""

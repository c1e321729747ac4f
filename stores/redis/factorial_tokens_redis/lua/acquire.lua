-- acquire: take a tenant's lease if nobody holds a live one, with a new fencing number;
-- with the optional freshness rule, only if the record is due.
--
-- KEYS[1]  {prefix}:{digest}:rec    the tenant's hash (record fields, `fence`, `holder`)
-- KEYS[2]  {prefix}:{digest}:lease  the live-lease marker; its PX expiry is the lease TTL
-- ARGV[1]  owner      the caller's secret owner token
-- ARGV[2]  ttl_ms     the lease TTL in milliseconds (Redis judges it)
-- ARGV[3]  at         (optional) the freshness rule (Freshness in the store kit): the lease
-- ARGV[4]  margin     is taken only for an ACTIVE record that is not fresh, that is unless
-- ARGV[5]  share      expires_at is absent or
--                       expires_at - min(margin, share * max(expires_at - updated_at, 0)) > at
--                     (floats as text; Lua numbers are the same doubles as Python's)
--
-- Reply: {fence, payload, status, version, expires_at, updated_at}
--   fence is the new fencing number (HINCRBY of `fence`, never reused) or 0 when the lease
--   is held by someone else (or, with the rule, was not worth taking: nothing is written);
--   the other five are the record as seen, nil when absent.
--   A replay (the caller's own live lease: owner tokens are unique per call) returns the
--   current fence again.
local rec, lease = KEYS[1], KEYS[2]
local seen = redis.call('HMGET', rec, 'payload', 'status', 'version', 'expires_at', 'updated_at')
if redis.call('GET', lease) == ARGV[1] and redis.call('HGET', rec, 'holder') == ARGV[1] then
  return {tonumber(redis.call('HGET', rec, 'fence')), seen[1], seen[2], seen[3], seen[4], seen[5]}
end
if ARGV[3] then
  if not seen[1] or seen[2] ~= 'active' then
    return {0, seen[1], seen[2], seen[3], seen[4], seen[5]}
  end
  local expires = tonumber(seen[4])
  if not expires then
    return {0, seen[1], seen[2], seen[3], seen[4], seen[5]}
  end
  local life = math.max(expires - (tonumber(seen[5]) or 0), 0)
  if expires - math.min(tonumber(ARGV[4]), tonumber(ARGV[5]) * life) > tonumber(ARGV[3]) then
    return {0, seen[1], seen[2], seen[3], seen[4], seen[5]}
  end
end
if redis.call('EXISTS', lease) == 1 then
  return {0, seen[1], seen[2], seen[3], seen[4], seen[5]}
end
local fence = redis.call('HINCRBY', rec, 'fence', 1)
redis.call('HSET', rec, 'holder', ARGV[1])
redis.call('SET', lease, ARGV[1], 'PX', ARGV[2])
return {fence, seen[1], seen[2], seen[3], seen[4], seen[5]}

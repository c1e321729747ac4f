-- extend: push a held lease's expiry to ttl from now.
--
-- KEYS[1]  {prefix}:{digest}:rec    the tenant's hash (`fence`, `holder`)
-- KEYS[2]  {prefix}:{digest}:lease  the live-lease marker
-- ARGV[1]  fence      the lease's fencing number
-- ARGV[2]  owner      the lease's owner token
-- ARGV[3]  ttl_ms     the new TTL in milliseconds
--
-- Reply: 1 if the fence is still the tenant's current one and the owner holds it, else 0.
local held = redis.call('HMGET', KEYS[1], 'fence', 'holder')
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1

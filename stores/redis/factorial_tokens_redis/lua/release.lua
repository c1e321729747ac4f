-- release: give a held lease back and announce it.
--
-- KEYS[1]  {prefix}:{digest}:rec    the tenant's hash (`fence`, `holder`)
-- KEYS[2]  {prefix}:{digest}:lease  the live-lease marker
-- ARGV[1]  fence      the lease's fencing number
-- ARGV[2]  owner      the lease's owner token
-- ARGV[3]  channel    the prefix's change channel
-- ARGV[4]  message    "<digest> <origin>"
--
-- Reply: 1 if released, 0 if the lease was not (or no longer) the caller's. A replay finds
-- its own release done (same fence, nobody holding) and answers 1 again.
local held = redis.call('HMGET', KEYS[1], 'fence', 'holder')
if held[1] == ARGV[1] and not held[2] then
  return 1
end
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[1], 'holder')
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1

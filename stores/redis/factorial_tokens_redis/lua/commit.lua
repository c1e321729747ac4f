-- commit: a fenced write. Store the record if the caller's fence is still the tenant's
-- current one and the caller holds it, then release the lease and announce.
--
-- KEYS[1]  {prefix}:{digest}:rec    the tenant's hash
-- KEYS[2]  {prefix}:{digest}:lease  the live-lease marker
-- ARGV[1]  fence       the lease's fencing number
-- ARGV[2]  owner       the lease's owner token
-- ARGV[3]  channel     the prefix's change channel
-- ARGV[4]  message     "<digest> <origin>"
-- ARGV[5]  payload     opaque bytes
-- ARGV[6]  status      "active" | "needs_reauth"
-- ARGV[7]  expires_at  float as text, "" for none
-- ARGV[8]  updated_at  float as text
-- ARGV[9]  namespace   stored for listings
-- ARGV[10] tenant      stored for listings
-- ARGV[11] notice      optional: published after the message ("<message> <notice>"), not stored
--
-- Reply: the new version (> 0), or 0 when fenced out (nothing written). A replay finds its
-- own write (same fence, nobody holding, the same values) and returns its version again.
local rec = KEYS[1]
local held = redis.call('HMGET', rec, 'fence', 'holder', 'payload', 'status', 'expires_at',
  'updated_at', 'version')
if held[1] == ARGV[1] and not held[2] and held[3] == ARGV[5] and held[4] == ARGV[6]
    and held[5] == ARGV[7] and held[6] == ARGV[8] then
  return tonumber(held[7])
end
if held[1] ~= ARGV[1] or held[2] ~= ARGV[2] then
  return 0
end
local version = redis.call('HINCRBY', rec, 'version', 1)
redis.call('HSET', rec, 'payload', ARGV[5], 'status', ARGV[6], 'expires_at', ARGV[7],
  'updated_at', ARGV[8], 'ns', ARGV[9], 'tenant', ARGV[10])
redis.call('HDEL', rec, 'holder')
redis.call('DEL', KEYS[2])
if ARGV[11] and ARGV[11] ~= '' then
  redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. ARGV[11])
else
  redis.call('PUBLISH', ARGV[3], ARGV[4])
end
return version

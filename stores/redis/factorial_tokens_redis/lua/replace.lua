-- replace: an unconditional write (or forget) that fences out any lease holder, then
-- announces. The fence is bumped so a holder's later commit/extend/release is refused.
--
-- KEYS[1]  {prefix}:{digest}:rec    the tenant's hash
-- KEYS[2]  {prefix}:{digest}:lease  the live-lease marker
-- ARGV[1]  channel     the prefix's change channel
-- ARGV[2]  message     "<digest> <origin>"
-- ARGV[3]  mode        "set" to write ARGV[4..9], "forget" to drop the record
-- ARGV[4]  payload     opaque bytes
-- ARGV[5]  status      "active" | "needs_reauth"
-- ARGV[6]  expires_at  float as text, "" for none
-- ARGV[7]  updated_at  float as text
-- ARGV[8]  namespace   stored for listings
-- ARGV[9]  tenant      stored for listings
--
-- Reply: the new version. The hash itself (fence, version, namespace, tenant) outlives a
-- forget so that fences and versions only grow. A replay (already written, nobody holding)
-- changes nothing, and forgetting an unknown tenant creates nothing: both reply 0.
local rec = KEYS[1]
local cur = redis.call('HMGET', rec, 'holder', 'payload', 'status', 'expires_at', 'updated_at')
if not cur[1] and redis.call('EXISTS', KEYS[2]) == 0 then
  if ARGV[3] == 'set' then
    if cur[2] == ARGV[4] and cur[3] == ARGV[5] and cur[4] == ARGV[6] and cur[5] == ARGV[7] then
      return 0
    end
  elseif not cur[2] then
    return 0
  end
end
redis.call('HINCRBY', rec, 'fence', 1)
redis.call('HDEL', rec, 'holder')
redis.call('DEL', KEYS[2])
local version = redis.call('HINCRBY', rec, 'version', 1)
if ARGV[3] == 'set' then
  redis.call('HSET', rec, 'payload', ARGV[4], 'status', ARGV[5], 'expires_at', ARGV[6],
    'updated_at', ARGV[7], 'ns', ARGV[8], 'tenant', ARGV[9])
else
  redis.call('HDEL', rec, 'payload', 'status', 'expires_at', 'updated_at')
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return version

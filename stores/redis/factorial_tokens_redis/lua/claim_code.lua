-- claim_code: the first claimer of a code's hash wins; an expired CLAIMED claim (its
-- holder presumed dead before sending) is taken over. Expiry is judged by Redis TIME.
--
-- KEYS[1]  {prefix}:claim:{sha of namespace + code hash}   the claim's hash
-- ARGV[1]  owner         the caller's owner token
-- ARGV[2]  ttl_ms        how long a CLAIMED claim's holder has
-- ARGV[3]  retention_ms  how long a claim is remembered past its expiry
-- ARGV[4]  namespace     the claiming tenant's namespace
-- ARGV[5]  tenant        the claiming tenant
-- ARGV[6]  digest        the claiming tenant's digest (announcements go there)
--
-- Reply: {won, state, namespace, tenant, expired, outcome}
--   won 1 when the caller holds the claim; namespace/tenant are the claim's (maybe another
--   tenant's); expired 1 when a CLAIMED or SENT claim outlived its TTL; outcome or nil.
local claim = KEYS[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local c = redis.call('HMGET', claim, 'owner', 'state', 'expires', 'ns', 'tenant', 'outcome')
if not c[1] or (c[2] == 'claimed' and tonumber(c[3]) <= now) then
  local ttl = tonumber(ARGV[2])
  redis.call('DEL', claim)
  redis.call('HSET', claim, 'owner', ARGV[1], 'state', 'claimed',
    'expires', string.format('%.0f', now + ttl), 'ns', ARGV[4], 'tenant', ARGV[5], 'digest', ARGV[6])
  redis.call('PEXPIRE', claim, ttl + tonumber(ARGV[3]))
  return {1, 'claimed', ARGV[4], ARGV[5], 0, false}
end
local expired = 0
if (c[2] == 'claimed' or c[2] == 'sent') and tonumber(c[3]) <= now then
  expired = 1
end
local won = 0
if c[1] == ARGV[1] then
  won = 1
end
return {won, c[2], c[4], c[5], expired, c[6]}

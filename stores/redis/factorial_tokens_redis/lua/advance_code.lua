-- advance_code: move an owned claim to SENT (only from CLAIMED), DONE or FAILED, and
-- announce on the claim's tenant. Finished claims are kept for the retention period.
--
-- KEYS[1]  {prefix}:claim:{sha of namespace + code hash}   the claim's hash
-- ARGV[1]  owner         the claim's owner token
-- ARGV[2]  state         "sent" | "done" | "failed"
-- ARGV[3]  ttl_ms        how long a SENT claim's holder has
-- ARGV[4]  retention_ms  how long a claim is remembered (finished claims: from now)
-- ARGV[5]  has_outcome   "1" to store ARGV[6] as the outcome, "0" to clear it
-- ARGV[6]  outcome       text
-- ARGV[7]  channel       the prefix's change channel
-- ARGV[8]  origin        the announcing store's id (appended to the claim's digest)
--
-- Reply: 1 if advanced, 0 if the claim is missing, not the caller's, finished, or (for
-- SENT) no longer CLAIMED.
local claim = KEYS[1]
local c = redis.call('HMGET', claim, 'owner', 'state', 'digest', 'outcome')
if c[1] == ARGV[1] and c[2] == ARGV[2] then
  -- A replay of the step already made.
  if (ARGV[5] == '1' and c[4] == ARGV[6]) or (ARGV[5] ~= '1' and not c[4]) then
    return 1
  end
  return 0
end
if not c[1] or c[1] ~= ARGV[1] or c[2] == 'done' or c[2] == 'failed' then
  return 0
end
if ARGV[2] == 'sent' and c[2] ~= 'claimed' then
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local retention = tonumber(ARGV[4])
local life = retention
if ARGV[2] == 'sent' then
  life = tonumber(ARGV[3])
end
redis.call('HSET', claim, 'state', ARGV[2], 'expires', string.format('%.0f', now + life))
if ARGV[5] == '1' then
  redis.call('HSET', claim, 'outcome', ARGV[6])
else
  redis.call('HDEL', claim, 'outcome')
end
redis.call('PEXPIRE', claim, life + retention)
redis.call('PUBLISH', ARGV[7], c[3] .. ' ' .. ARGV[8])
return 1

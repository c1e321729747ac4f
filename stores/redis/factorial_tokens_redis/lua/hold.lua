-- hold: raise an app's "not before" instant (after a 429) and announce it.
--
-- KEYS[1]  {prefix}:{hold digest}:throttle  the app's hash (`not_before`, `tat`, `ticket`)
-- ARGV[1]  until      the wall-clock instant (seconds, as text) no refresh is sent before
-- ARGV[2]  channel    the prefix's change channel
-- ARGV[3]  message    "<hold digest> <origin>"
--
-- Reply: the instant now in force, as text (the later of the stored one and ARGV[1]).
-- A resend keeps the same instant and announces nothing new.
local current = tonumber(redis.call('HGET', KEYS[1], 'not_before') or '0')
local wanted = tonumber(ARGV[1])
if wanted > current then
  redis.call('HSET', KEYS[1], 'not_before', ARGV[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return ARGV[1]
end
return redis.call('HGET', KEYS[1], 'not_before') or '0'

-- admit: may one provider call be sent now? The app's hold, then its shared budget (GCRA).
--
-- KEYS[1]  {prefix}:{hold digest}:throttle  the app's hash (`not_before`, `tat`, `ticket`)
-- ARGV[1]  ticket     the caller's random ticket for this call
-- ARGV[2]  interval   seconds per call of the budget (text; 0 = no budget)
-- ARGV[3]  burst      calls the budget lets through at once (>= 1)
--
-- Reply: seconds to wait, as text; "0" means admitted (one unit taken for the ticket).
-- Redis' clock judges. A resend with an admitted ticket answers "0" again, taking nothing.
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
local seen = redis.call('HMGET', KEYS[1], 'not_before', 'tat', 'ticket')
if seen[3] == ARGV[1] then
  return '0'
end
local not_before = tonumber(seen[1] or '0')
if not_before > now then
  return tostring(not_before - now)
end
local interval = tonumber(ARGV[2])
if interval <= 0 then
  return '0'
end
local tat = math.max(tonumber(seen[2] or '0'), now)
local wait = tat - (tonumber(ARGV[3]) - 1) * interval - now
if wait > 0 then
  return tostring(wait)
end
redis.call('HSET', KEYS[1], 'tat', string.format('%.6f', tat + interval), 'ticket', ARGV[1])
return '0'

-- withdraw: makes sure a job never runs unless it has started. A waiting
-- job is removed; an unknown one (its enqueue may still be on its way) is
-- marked settled, so that a late enqueue is refused, and a payload stored
-- for it by an enqueue whose script did not run (ARCHITECTURE.md decision
-- 31) is deleted.
-- includes: clock order records quota waiting
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_waiting, K_settled = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_waiting_limits = KEYS[9]
local id, remember = ARGV[1], tonumber(ARGV[2])
-- Returns 'withdrawn', 'started' or 'settled'.
local record = redis.call('HGET', K_info, id)
if not record then
  redis.call('HDEL', K_jobs, id)
end
if redis.call('EXISTS', K_settled) == 1 then
  return 'settled'
end
local info = info_unpack(record)
if info and not redis.call('ZSCORE', K_pending, id) then
  return 'started'
end
local now = clock()
if info then
  unqueue(id, info, K_waiting, K_waiting_limits)
  remember = math.max(remember, info.deadline - now)
end
redis.call('SET', K_settled, 'withdrawn', 'PX', int(math.max(remember, 1000)))
return 'withdrawn'

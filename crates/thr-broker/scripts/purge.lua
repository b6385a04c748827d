-- purge: cancels a slice of waiting jobs chosen by the caller (thrctl
-- purge); their clients get the caller's reply frame (a 503) through their
-- front's list. A job claimed meanwhile is left alone. The caller walks the
-- queue a slice at a time, so Redis is never blocked for long.
-- includes: clock order records quota waiting
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_waiting, K_waiting_limits = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
-- KEYS[9 + 2i], KEYS[10 + 2i]: the i-th job's settled marker and its
-- front's reply list (i from 0).
local reply_ttl = tonumber(ARGV[1])
-- ARGV[2 + 2i], ARGV[3 + 2i]: the i-th job's id and reply frame.
-- Returns the number of jobs purged.
local now = clock()
local purged = 0
local i = 0
while ARGV[2 + 2 * i] do
  local id, frame = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local K_settled, K_replies = KEYS[9 + 2 * i], KEYS[10 + 2 * i]
  i = i + 1
  local info = info_unpack(redis.call('HGET', K_info, id))
  if info and redis.call('ZSCORE', K_pending, id) then
    unqueue(id, info, K_waiting, K_waiting_limits)
    if info.front ~= '' then
      redis.call('LPUSH', K_replies, frame)
      redis.call('EXPIRE', K_replies, reply_ttl)
    end
    redis.call('SET', K_settled, 'purged', 'PX', int(math.max(1000, info.deadline - now)))
    purged = purged + 1
  end
end
return purged

-- claim: takes the most urgent job still wanted by its client and leases it.
-- KEYS[1] pending    sorted set id -> priority score
-- KEYS[2] jobs       hash id -> encoded job
-- KEYS[3] deadlines  sorted set id -> client deadline (ms)
-- KEYS[4] leases     sorted set id -> lease deadline (ms)
-- ARGV[1] lease duration in ms
-- Returns false when nothing can run, else {id, encoded job, ms left before
-- the client's deadline}. Jobs whose client has given up are dropped on the
-- way (at most 100 a call, to keep the script short).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _ = 1, 100 do
  local head = redis.call('ZPOPMIN', KEYS[1])
  if #head == 0 then
    return false
  end
  local id = head[1]
  local deadline = tonumber(redis.call('ZSCORE', KEYS[3], id))
  local job = redis.call('HGET', KEYS[2], id)
  if job and deadline and deadline > now then
    redis.call('ZADD', KEYS[4], string.format('%.0f', now + tonumber(ARGV[1])), id)
    return {id, job, deadline - now}
  end
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
end
return false

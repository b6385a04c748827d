-- The bare lifecycle's enqueue (the `scripts` scenario's baseline): jobs
-- ordered by priority then arrival, a small record each, one doorbell ring.
-- Payloads are stored by the caller in the same transaction, as thr's are.
-- Standalone on purpose (none of thr's helpers): a baseline, not thr's code.
-- KEYS: pending, info, wake, seq. ARGV, per job: id, priority.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #ARGV / 2
local last = redis.call('INCRBY', KEYS[4], n)
local scores, records = {}, {}
for i = 1, n do
  local id, prio = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  scores[2 * i - 1] = string.format('%d', prio * 70368744177664 + last - n + i)
  scores[2 * i] = id
  records[2 * i - 1] = id
  records[2 * i] = cmsgpack.pack(prio, now, now + 60000)
end
redis.call('ZADD', KEYS[1], unpack(scores))
redis.call('HSET', KEYS[2], unpack(records))
redis.call('RPUSH', KEYS[3], '1')
return n

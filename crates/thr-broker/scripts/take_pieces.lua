-- take_pieces: a front reads a streamed response. `from` is the number of
-- the first piece it has not received yet: the pieces before it are
-- dropped (they reached the front), the next ones are returned but kept,
-- so a read whose answer is lost is simply asked again.
-- includes: (none)
local K_list, K_state = KEYS[1], KEYS[2]
local from, max, stream_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- Returns the pieces (maybe none), or false when the stream is gone
-- (cancelled, expired, or lost with Redis's data).
local state = redis.call('HMGET', K_state, 'head', 'cancelled')
if not state[1] or state[2] then
  return false
end
local head = tonumber(state[1])
if from > head then
  redis.call('LTRIM', K_list, from - head, -1)
  redis.call('HSET', K_state, 'head', from)
end
redis.call('PEXPIRE', K_state, stream_ttl)
return redis.call('LRANGE', K_list, 0, max - 1)

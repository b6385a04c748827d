-- take_pieces: a front reads a streamed response. `from` is the number of
-- the first piece it has not received yet: the pieces before it are
-- dropped (they reached the front). The next ones are read by the `HMGET`
-- its caller sends right after this call in the same transaction
-- (Scripts::take_pieces), so that no piece passes through Lua
-- (ARCHITECTURE.md decision 31), and kept, so a read whose answer is lost
-- is simply asked again.
-- includes: (none)
local K_pieces, K_state = KEYS[1], KEYS[2]
local from, stream_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
-- Returns 1, or false when the stream is gone (cancelled, expired, or lost
-- with Redis's data): then what the `HMGET` read means nothing.
local state = redis.call('HMGET', K_state, 'head', 'cancelled')
if not state[1] or state[2] then
  return false
end
local head = tonumber(state[1])
if from > head then
  local gone = {}
  for n = head, from - 1 do
    gone[#gone + 1] = n
  end
  redis.call('HDEL', K_pieces, unpack(gone))
  redis.call('HSET', K_state, 'head', from)
end
redis.call('PEXPIRE', K_state, stream_ttl)
return 1

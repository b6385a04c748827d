-- push_pieces: appends pieces of a streamed response (body bytes, its end
-- or an abort) to the job's list, as many as its window has room for.
-- Numbered: piece `first` is the stream's piece number `first`, so a call
-- repeated after a lost answer never appends a piece twice. A `first` of
-- -1 appends whatever the window (an abort by the reaper). The front is
-- told when the list turns non-empty (a data notice on its list).
-- includes: (none)
local K_list, K_state, K_replies = KEYS[1], KEYS[2], KEYS[3]
local first, window, stream_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local notice, reply_ttl = ARGV[4], tonumber(ARGV[5])
-- ARGV[6..] the pieces, in order.
-- Returns how many of the pieces are in the stream now (counting those an
-- earlier call appended), or -1 when the stream was cancelled (its client
-- went away) or is gone.
local state = redis.call('HMGET', K_state, 'next', 'cancelled')
if state[2] or (not state[1] and first >= 0) then
  return -1
end
local nxt = tonumber(state[1]) or 0
local len = redis.call('LLEN', K_list)
local taken = 0
local i = 6
if first >= 0 then
  -- Skip what an earlier call appended already.
  taken = math.min(math.max(0, nxt - first), #ARGV - 5)
  i = 6 + taken
end
local was_empty = len == 0
while i <= #ARGV and (first < 0 or len < window) do
  redis.call('RPUSH', K_list, ARGV[i])
  len = len + 1
  nxt = nxt + 1
  taken = taken + 1
  i = i + 1
end
redis.call('HSET', K_state, 'next', nxt)
redis.call('PEXPIRE', K_state, stream_ttl)
redis.call('PEXPIRE', K_list, stream_ttl)
if was_empty and len > 0 then
  redis.call('LPUSH', K_replies, notice)
  redis.call('EXPIRE', K_replies, reply_ttl)
end
return taken

-- push_pieces: appends pieces of a streamed response (body bytes, its end
-- or an abort) to the job's pieces, as many as its window has room for.
-- Numbered: piece `first` is the stream's piece number `first`. The
-- caller stores the pieces beforehand, in the same transaction, under
-- their numbers in hash `pieces` where none is yet (Scripts::push_pieces),
-- so that no piece passes through Lua (ARCHITECTURE.md decision 31): this
-- call keeps those the window has room for and deletes the others. A
-- repeated call stores nothing twice. A `first` of -1 appends the pieces
-- given here, whatever the window: an abort by the reaper (small, and
-- numbered only here), after which the stream takes no more pieces. The front is told
-- when the stream turns from empty to non-empty (a data notice on its
-- list).
-- includes: (none)
local K_pieces, K_state, K_replies = KEYS[1], KEYS[2], KEYS[3]
local first, count, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local stream_ttl, notice, reply_ttl = tonumber(ARGV[4]), ARGV[5], tonumber(ARGV[6])
-- ARGV[7..]: with `first` -1, the pieces to append; otherwise `count`
-- pieces numbered from `first` are stored already.
-- Returns how many of the pieces are in the stream now (counting those an
-- earlier call appended), or -1 when the stream was cancelled (its client
-- went away) or is gone.
local state = redis.call('HMGET', K_state, 'next', 'head', 'cancelled', 'aborted')
local nxt, head = tonumber(state[1]) or 0, tonumber(state[2]) or 0
-- A piece numbered past the end would leave a gap the front waits on
-- forever: only a broken caller sends one, and its stream is ended.
if state[3] or (not state[1] and first >= 0) or first > nxt then
  redis.call('DEL', K_pieces)
  return -1
end
-- Deletes what this call stored that is not in the stream ending before
-- `last`: pieces the front took already, or past the stream's end.
local function drop_unkept(last)
  local drop = {}
  for n = first, first + count - 1 do
    if n < head or n >= last then
      drop[#drop + 1] = n
    end
  end
  if #drop > 0 then
    redis.call('HDEL', K_pieces, unpack(drop))
  end
end
-- Aborted by the reaper (it took this worker for lost): the abort stays
-- the stream's last piece, and what this call stored past it goes.
if state[4] and first >= 0 then
  drop_unkept(nxt)
  return -1
end
local was_empty = nxt == head
local taken = 0
if first >= 0 then
  -- Appended by an earlier call, then as many as the window has room for.
  local again = math.min(nxt - first, count)
  local added = math.min(count - again, math.max(0, window - (nxt - head)))
  nxt = nxt + added
  taken = again + added
  drop_unkept(nxt)
else
  for i = 7, #ARGV do
    redis.call('HSET', K_pieces, nxt, ARGV[i])
    nxt = nxt + 1
    taken = taken + 1
  end
  redis.call('HSET', K_state, 'aborted', 1)
end
redis.call('HSET', K_state, 'next', nxt)
redis.call('PEXPIRE', K_state, stream_ttl)
redis.call('PEXPIRE', K_pieces, stream_ttl)
if was_empty and nxt > head then
  redis.call('LPUSH', K_replies, notice)
  redis.call('EXPIRE', K_replies, reply_ttl)
end
return taken

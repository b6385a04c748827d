-- The bare lifecycle's release: each job still leased to the token gets
-- its reply pushed and is forgotten.
-- KEYS: leases, owners, jobs, info, replies. ARGV: token, then per job: id,
-- reply. Returns the number of replies pushed.
local n = (#ARGV - 1) / 2
local ids = {}
for i = 1, n do
  ids[i] = ARGV[2 * i]
end
local owners = redis.call('HMGET', KEYS[2], unpack(ids))
local done, replies = {}, {}
for i = 1, n do
  if owners[i] == ARGV[1] then
    done[#done + 1] = ids[i]
    replies[#replies + 1] = ARGV[2 * i + 1]
  end
end
if #done > 0 then
  redis.call('LPUSH', KEYS[5], unpack(replies))
  redis.call('ZREM', KEYS[1], unpack(done))
  redis.call('HDEL', KEYS[2], unpack(done))
  redis.call('HDEL', KEYS[3], unpack(done))
  redis.call('HDEL', KEYS[4], unpack(done))
end
return #done

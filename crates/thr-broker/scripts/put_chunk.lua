-- put_chunk: a front stores chunk `index` of a request body, at most once
-- however often it is asked (a repeated call after a lost answer).
-- includes: (none)
local K_upload = KEYS[1]
local index, ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
-- ARGV[3] the chunk. Returns the chunks stored, or -1 when earlier chunks
-- are missing (the body expired or Redis lost it).
local len = redis.call('LLEN', K_upload)
if len == index then
  len = redis.call('RPUSH', K_upload, ARGV[3])
elseif len < index then
  return -1
end
redis.call('PEXPIRE', K_upload, ttl)
return len

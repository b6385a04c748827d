-- heartbeat: a daemon says it is alive (on Redis's clock) and what it does.
-- KEYS[1] sorted set id -> last heartbeat (ms)   KEYS[2] its info key
-- ARGV[1] id   ARGV[2] info (JSON)   ARGV[3] info lifetime (s)
-- Entries silent for an hour are forgotten.
local now = clock()
redis.call('ZADD', KEYS[1], int(now), ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now - 3600000))
return 1

-- enqueue: puts a job on a queue and rings the queue's doorbell.
-- KEYS[1] pending    sorted set id -> priority * 2^46 + sequence
-- KEYS[2] seq        counter
-- KEYS[3] jobs       hash id -> encoded job
-- KEYS[4] deadlines  sorted set id -> client deadline (ms, Redis clock)
-- KEYS[5] wake       doorbell list
-- ARGV[1] job id
-- ARGV[2] priority, 1 (most urgent) .. 99
-- ARGV[3] encoded job
-- ARGV[4] client timeout in ms (the deadline is computed on Redis's clock)
-- Returns the job's sequence number.
local SPACE = 70368744177664 -- 2^46, thr_core::priority::SEQUENCE_SPACE
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local seq = redis.call('INCR', KEYS[2]) % SPACE
-- %.0f: Lua would otherwise print large numbers with 14 significant digits.
redis.call('ZADD', KEYS[1], string.format('%.0f', tonumber(ARGV[2]) * SPACE + seq), ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[4], string.format('%.0f', now + tonumber(ARGV[4])), ARGV[1])
-- One token per job wakes one idle worker; a handful is enough to wake them all.
if redis.call('RPUSH', KEYS[5], 1) > 64 then
  redis.call('LTRIM', KEYS[5], 0, 63)
end
return seq

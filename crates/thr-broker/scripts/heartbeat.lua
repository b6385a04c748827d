-- heartbeat: a daemon says it is alive (on Redis's clock) and what it does.
-- It also keeps the liveness record: when nobody could beat for `gap` ms
-- (Redis paused, slowed or down), Redis has just resumed, and silence is
-- counted from now for everyone.
-- includes: clock liveness
local K_beats, K_info, K_liveness, K_generation = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local id, info, info_ttl, gap = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
-- Returns {generation, ms since this daemon's previous beat (-1: none)}.
local now = clock()
local gen = generation(K_generation)
local last = tonumber(redis.call('HGET', K_liveness, 'last'))
local previous = tonumber(redis.call('ZSCORE', K_beats, id))
-- A daemon that was beating finds that nobody could beat for a while:
-- Redis was paused or unreachable, not everyone dead. (A daemon new to
-- Redis after a quiet time proves nothing: the others may be dead.)
if last and previous and now - last > gap and now - previous > gap then
  redis.call('HSET', K_liveness, 'resumed', int(now))
end
redis.call('HSET', K_liveness, 'last', int(now), 'gap', gap)
redis.call('ZADD', K_beats, int(now), id)
redis.call('SET', K_info, info, 'EX', info_ttl)
-- Entries silent for an hour are forgotten.
redis.call('ZREMRANGEBYSCORE', K_beats, '-inf', int(now - 3600000))
local since = -1
if previous then
  since = int(now - counted_from(liveness_now(K_liveness, now), previous))
end
return {gen, since}

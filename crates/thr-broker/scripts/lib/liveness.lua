-- lib/liveness.lua: who is alive, judged so that a slow or paused Redis
-- never makes live daemons look dead, and the data generation.

-- The data generation, made when missing (Redis restarted empty or was
-- flushed). A new generation also counts as a resumption: every daemon
-- gets a full timeout to beat again before it is judged.
local function generation(gen_key, liveness, now)
  local g = redis.call('GET', gen_key)
  if not g then
    local t = redis.call('TIME')
    g = t[1] .. '.' .. t[2]
    redis.call('SET', gen_key, g)
    redis.call('HSET', liveness, 'resumed', int(now))
  end
  return g
end

-- When silence starts counting: the latest of `since` and the last time
-- Redis answered again after nobody could beat.
local function counted_from(liveness, since)
  local resumed = tonumber(redis.call('HGET', liveness, 'resumed')) or 0
  return math.max(since or 0, resumed)
end

-- True when a daemon last heard of at `beat` (nil: never) is dead.
-- `fallback` is used when there is no beat on record (e.g. a lease's claim
-- time: a live worker beats within the timeout after its claim).
local function is_silent(liveness, beat, fallback, now, timeout)
  local since = beat or fallback
  if not since then
    return false
  end
  return now - counted_from(liveness, since) > timeout
end

-- lib/liveness.lua: who is alive, judged so that a slow or paused Redis
-- never makes live daemons look dead, and the data generation.

-- The data generation, made when missing (Redis restarted empty or was
-- flushed). Nobody is judged dead on such a Redis until beats resume (its
-- liveness record is gone with the rest).
local function generation(gen_key)
  local g = redis.call('GET', gen_key)
  if not g then
    local t = redis.call('TIME')
    g = t[1] .. '.' .. t[2]
    redis.call('SET', gen_key, g)
  end
  return g
end

-- How to judge silence now. Heartbeats keep `last` (the latest beat of
-- any daemon) and `gap`: when nobody has beaten for longer than `gap`,
-- Redis is paused or has just come back, and nobody is judged (a daemon's
-- silence says nothing then). Once beats resume, silence counts from
-- `resumed` at the earliest, so every daemon gets a full timeout to beat.
local function liveness_now(liveness, now)
  local l = redis.call('HMGET', liveness, 'last', 'resumed', 'gap')
  local last, resumed, gap = tonumber(l[1]), tonumber(l[2]) or 0, tonumber(l[3]) or 600
  return { judging = last ~= nil and now - last <= gap, resumed = resumed }
end

-- When silence starts counting for a daemon last heard of at `since`.
local function counted_from(state, since)
  return math.max(since or 0, state.resumed)
end

-- True when a lease whose deadline passed may be taken back: not while
-- Redis is paused, nor within `grace` of its resumption (its live worker
-- could not renew meanwhile, and is renewing now).
local function lease_lost(state, until_ms, now, grace)
  return until_ms <= now and state.judging and now - state.resumed > grace
end

-- True when a daemon last heard of at `beat` (nil: never) is dead.
-- `fallback` is used when there is no beat on record (e.g. a lease's claim
-- time: a live worker beats within the timeout after its claim).
local function is_silent(state, beat, fallback, now, timeout)
  local since = beat or fallback
  if not state.judging or not since then
    return false
  end
  return now - counted_from(state, since) > timeout
end

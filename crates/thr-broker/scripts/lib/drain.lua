-- lib/drain.lua: how fast a queue drains, the one definition behind both
-- the Retry-After of a refused request and thrctl's figure.

-- Jobs started per second (kept two minutes): `n` more (default 1). Old
-- seconds are pruned once per second, at its first start.
local function count_start(hash, sec, n)
  n = n or 1
  if redis.call('HINCRBY', hash, sec, n) == n and redis.call('HLEN', hash) > 180 then
    for _, field in ipairs(redis.call('HKEYS', hash)) do
      if tonumber(field) < sec - 120 then
        redis.call('HDEL', hash, field)
      end
    end
  end
end

-- Jobs started per second over the last minute (or since the first start
-- within it, so that a queue that just began draining is not taken for a
-- slow one).
local function drain_rate(hash, sec)
  local all = redis.call('HGETALL', hash)
  local n, first = 0, sec
  for i = 1, #all, 2 do
    local s = tonumber(all[i])
    if s > sec - 60 and s <= sec then
      n = n + tonumber(all[i + 1])
      if s < first then
        first = s
      end
    end
  end
  return n / (sec - first + 1)
end

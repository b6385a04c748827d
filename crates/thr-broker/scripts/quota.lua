-- quota.lua: arithmetic shared by the scripts (prepended to each of them).
-- Every time comes from Redis's clock (TIME), never from a client.

local SPACE = 70368744177664 -- 2^46, thr_core::priority::SEQUENCE_SPACE

-- Milliseconds and whole seconds on Redis's clock.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), tonumber(t[1])
end

-- Lua would print large numbers with 14 significant digits; scores must be exact.
local function int(x)
  return string.format('%.0f', x)
end

-- Order of a job (or of a flow's turn): strict priority then FIFO, or, with
-- aging (step > 0), arrival time plus (priority - 1) steps.
local function order_score(prio, seq, now, step)
  if step > 0 then
    return (now + (prio - 1) * step) * 1024 + (seq % 1024)
  end
  return prio * SPACE + (seq % SPACE)
end

-- A flow definition: one line per quota, tab-separated
-- "token max_concurrent interval_ms burst max_waiting" (see thr_core::quota).
local function parse_def(def)
  local quotas = {}
  if not def then
    return quotas
  end
  for line in string.gmatch(def, '[^\n]+') do
    local tok, maxc, interval, burst, maxw =
      string.match(line, '^([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)\t([^\t]+)$')
    if tok then
      quotas[#quotas + 1] = {
        token = tok, max = tonumber(maxc), interval = tonumber(interval),
        burst = tonumber(burst), maxw = tonumber(maxw),
      }
    end
  end
  return quotas
end

-- Concurrency: a sorted set of holders scored by lease deadline. Expired
-- holders (a crashed worker's) are dropped first: nothing stays locked.
local function sem_room(key, now, max)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  return redis.call('ZCARD', key) < max
end

-- Rate: GCRA. Returns true and the new theoretical arrival time, or false
-- and the milliseconds to wait.
local function gcra(key, now, interval, burst)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then
    tat = now
  end
  local new_tat = tat + interval
  local allowance = interval * burst
  if new_tat - now <= allowance then
    return true, new_tat
  end
  return false, new_tat - now - allowance
end

local function gcra_commit(key, now, new_tat, interval, burst)
  -- The key expires when the bucket would be full again anyway.
  redis.call('SET', key, string.format('%.3f', new_tat), 'PX',
    math.ceil(new_tat - now + interval * burst) + 1000)
end

-- Waiting-job counters per quota token (for max_waiting and thrctl).
local function waiting_add(hash, quotas, delta)
  for _, q in ipairs(quotas) do
    if redis.call('HINCRBY', hash, q.token, delta) <= 0 then
      redis.call('HDEL', hash, q.token)
    end
  end
end

-- Jobs started per second, for drain rates (kept two minutes).
local function count_start(hash, sec)
  -- Old seconds are pruned once per second, at its first start.
  if redis.call('HINCRBY', hash, sec, 1) == 1 and redis.call('HLEN', hash) > 180 then
    for _, field in ipairs(redis.call('HKEYS', hash)) do
      if tonumber(field) < sec - 120 then
        redis.call('HDEL', hash, field)
      end
    end
  end
end

-- Jobs started per second, measured over the last minute (or since the
-- first start within it, so that a queue that just began draining is not
-- taken for a slow one).
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

-- A reply frame with a plain-text body (thr_core::envelope::Reply), for
-- the scripts that answer a client themselves (reaper, purge). `extra` is
-- a list of {name, value} header pairs.
local function reply_frame(id, status, text, who, extra)
  local headers = {{'content-type', 'text/plain; charset=utf-8'}}
  for _, h in ipairs(extra) do
    headers[#headers + 1] = h
  end
  local meta = cjson.encode({
    id = id, status = status, worker = who, backend_ms = 0, chunked = false,
    headers = headers,
  })
  local n = #meta
  return 'THRR' .. string.char(1,
    math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256) .. meta .. text
end

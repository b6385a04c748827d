-- lib/quota.lua: global quotas (ARCHITECTURE.md decision 4), on fixed keys passed
-- in KEYS: counts per token in hashes, never a key per token.

-- Concurrency: `held` counts a token's running jobs; `holders` scores each
-- `token<TAB>id` by its lease deadline. Expired holders (a crashed worker's)
-- are swept first, a bounded number per call: nothing stays locked. The
-- caller sweeps only when a lease past its deadline is lost (see
-- lib/liveness.lua `lease_lost`): never during or just after a Redis pause.
local function sem_sweep(held, holders, now)
  local gone = redis.call('ZRANGE', holders, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
  for _, m in ipairs(gone) do
    local tok = string.match(m, '^(.*)\t[^\t]*$')
    redis.call('ZREM', holders, m)
    if tok and redis.call('HINCRBY', held, tok, -1) <= 0 then
      redis.call('HDEL', held, tok)
    end
  end
end

local function sem_room(held, token, max)
  return (tonumber(redis.call('HGET', held, token)) or 0) < max
end

local function sem_take(held, holders, token, id, until_ms)
  if redis.call('ZADD', holders, until_ms, token .. '\t' .. id) == 1 then
    redis.call('HINCRBY', held, token, 1)
  end
end

local function sem_drop(held, holders, token, id)
  if redis.call('ZREM', holders, token .. '\t' .. id) == 1 and
      redis.call('HINCRBY', held, token, -1) <= 0 then
    redis.call('HDEL', held, token)
  end
end

-- Frees the concurrency slots job `id` holds under `quotas` (a parsed flow
-- definition): a job that ends without its worker's list of holds.
local function sem_drop_quotas(held, holders, quotas, id)
  for _, q in ipairs(quotas) do
    if q.max > 0 then
      sem_drop(held, holders, q.token, id)
    end
  end
end

-- Rate: GCRA. Returns true and the new theoretical arrival time, or false
-- and the milliseconds to wait.
local function gcra(state, token, now, interval, burst)
  local tat = tonumber(redis.call('HGET', state, token)) or now
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

-- Stores a token's new arrival time; it is forgotten once the bucket would
-- be full again anyway (swept by gcra_sweep).
local function gcra_commit(state, expiry, token, now, new_tat, interval, burst)
  redis.call('HSET', state, token, string.format('%.3f', new_tat))
  redis.call('ZADD', expiry, int(new_tat + interval * burst + 1000), token)
end

-- Gives back the rate slot a start took (a job put back before it ran):
-- the token's arrival time moves back one interval, never before now (a
-- bucket is never fuller than full). Its expiry entry is left as it was:
-- a little late, so the state is forgotten no sooner than it may be.
local function gcra_refund(state, token, now, interval)
  local tat = tonumber(redis.call('HGET', state, token))
  if tat then
    redis.call('HSET', state, token, string.format('%.3f', math.max(now, tat - interval)))
  end
end

local function gcra_sweep(state, expiry, now)
  local gone = redis.call('ZRANGE', expiry, '-inf', now, 'BYSCORE', 'LIMIT', 0, 100)
  for _, tok in ipairs(gone) do
    redis.call('ZREM', expiry, tok)
    redis.call('HDEL', state, tok)
  end
end

-- Waiting-job counters per quota token (for max_waiting and thrctl), and
-- per limit in `by_limit`: `LIMIT` counts its waiting jobs, `LIMIT#` its key
-- values with jobs waiting. The per-limit figures are what gauges read:
-- a handful of fields, however many key values wait.
local function waiting_add(hash, by_limit, quotas, delta)
  for _, q in ipairs(quotas) do
    local limit = string.match(q.token, '^([^=]*)=') or q.token
    local n = redis.call('HINCRBY', hash, q.token, delta)
    if n <= 0 then
      redis.call('HDEL', hash, q.token)
    end
    if redis.call('HINCRBY', by_limit, limit, delta) <= 0 then
      redis.call('HDEL', by_limit, limit)
    end
    local keys_delta = 0
    if delta > 0 and n == delta then
      keys_delta = 1
    elseif delta < 0 and n <= 0 and n - delta > 0 then
      keys_delta = -1
    end
    if keys_delta ~= 0 and redis.call('HINCRBY', by_limit, limit .. '#', keys_delta) <= 0 then
      redis.call('HDEL', by_limit, limit .. '#')
    end
  end
end

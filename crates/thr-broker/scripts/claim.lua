-- claim: starts the most urgent job whose quotas all have room, and leases it.
-- KEYS[1]  pending    KEYS[2] jobs       KEYS[3] deadlines
-- KEYS[4]  leases     sorted set id -> lease deadline: the running jobs
-- KEYS[5]  wake       doorbell list (one token is taken per job started)
-- KEYS[6]  flows      KEYS[7] flowdefs   KEYS[8] jobinfo     KEYS[9] drained
-- KEYS[10] waiting    KEYS[11] seq
-- KEYS[12] owners     hash id -> worker running it
-- KEYS[13] fronts     sorted set front -> last heartbeat (ms)
-- KEYS[14] paused     set while `thrctl pause` holds the queue
-- ARGV[1] lease ms
-- ARGV[2] flow key prefix (flow keys are PREFIX..flow, same hash tag)
-- ARGV[3] quota key prefix (sem:/gcra: keys are PREFIX..kind..token)
-- ARGV[4] max_inflight_total (0: none)
-- ARGV[5] aging step ms (0: strict priority)
-- ARGV[6] most flows to look at
-- ARGV[7] id of the claiming worker ("" for none)
-- ARGV[8] heartbeat timeout ms: a front silent for longer is gone
-- ARGV[9] most jobs to start (the claiming worker's free slots)
-- Returns {id, encoded job, ms left before the client's deadline, flow, ...}
-- (four items per job started, at least one job), or
-- {"", why, ms until a rate quota may allow (-1: unknown)}.
--
-- The walk is over flows, not jobs: a thousand jobs behind one full quota
-- are one flow, skipped in one step. A served flow goes behind the other
-- flows of its priority: round-robin between tenants. Starting several jobs
-- is several walks in one call: one round trip instead of many when a
-- worker has many free slots and a backlog waits.
local now, sec = clock()
local lease = tonumber(ARGV[1])
local step = tonumber(ARGV[5])

if redis.call('EXISTS', KEYS[14]) == 1 then
  return {'', 'paused', -1}
end
local total = tonumber(ARGV[4])

local full = {}     -- quota tokens found saturated during this call
local hint = -1
-- Flows looked at, over the whole call: starting many jobs costs Redis no
-- more time than one start may in the worst case.
local looked = 0
local budget = tonumber(ARGV[6])

-- Starts one job: returns {id, job, ms left, flow}, or nil and why not.
local function claim_one()
  -- Expired leases are a dead worker's jobs: they no longer count as running.
  if total > 0 and redis.call('ZCOUNT', KEYS[4], '(' .. now, '+inf') >= total then
    return nil, 'max_inflight_total'
  end
  local offset = 0
  while looked < budget do
    local batch = redis.call('ZRANGE', KEYS[6], offset, offset + 49)
    if #batch == 0 then
      break
    end
    local removed = 0
    for _, flow in ipairs(batch) do
      looked = looked + 1
      local quotas = parse_def(redis.call('HGET', KEYS[7], flow))
      local ok = true
      local tats = {}
      for i, q in ipairs(quotas) do
        if full[q.token] then
          ok = false
        elseif q.max > 0 and not sem_room(ARGV[3] .. 'sem:' .. q.token, now, q.max) then
          full[q.token] = true
          ok = false
        elseif q.interval > 0 then
          local allowed, v = gcra(ARGV[3] .. 'gcra:' .. q.token, now, q.interval, q.burst)
          if allowed then
            tats[i] = v
          else
            full[q.token] = true
            ok = false
            if hint < 0 or v < hint then
              hint = v
            end
          end
        end
        if not ok then
          break
        end
      end
      if ok then
        local fkey = ARGV[2] .. flow
        while true do
          local head = redis.call('ZPOPMIN', fkey)
          if #head == 0 then
            redis.call('ZREM', KEYS[6], flow)
            redis.call('HDEL', KEYS[7], flow)
            removed = removed + 1
            break
          end
          local id = head[1]
          redis.call('ZREM', KEYS[1], id)
          waiting_add(KEYS[10], quotas, -1)
          local deadline = tonumber(redis.call('ZSCORE', KEYS[3], id))
          local job = redis.call('HGET', KEYS[2], id)
          -- A job whose front died has nobody to answer: never run it.
          local info = redis.call('HGET', KEYS[8], id) or ''
          local front = string.match(info, '\t([^\t]*)$')
          if front and front ~= '' then
            local beat = tonumber(redis.call('ZSCORE', KEYS[13], front))
            if beat and beat < now - tonumber(ARGV[8]) then
              job = false
            end
          end
          if job and deadline and deadline > now then
            local until_ms = int(now + lease)
            for i, q in ipairs(quotas) do
              if q.max > 0 then
                redis.call('ZADD', ARGV[3] .. 'sem:' .. q.token, until_ms, id)
              end
              if q.interval > 0 then
                gcra_commit(ARGV[3] .. 'gcra:' .. q.token, now, tats[i], q.interval, q.burst)
              end
            end
            redis.call('ZADD', KEYS[4], until_ms, id)
            if ARGV[7] ~= '' then
              redis.call('HSET', KEYS[12], id, ARGV[7] .. '\t' .. int(now))
            end
            -- This job's doorbell token is spent: idle workers are not woken for it.
            redis.call('LPOP', KEYS[5])
            count_start(KEYS[9], sec)
            -- The flow's next turn: behind every flow of its priority.
            local nxt = redis.call('ZRANGE', fkey, 0, 0)
            if #nxt == 0 then
              redis.call('ZREM', KEYS[6], flow)
              redis.call('HDEL', KEYS[7], flow)
            else
              local info = redis.call('HGET', KEYS[8], nxt[1]) or '50'
              local prio = tonumber(string.match(info, '^(%d+)')) or 50
              local turn = order_score(prio, redis.call('INCR', KEYS[11]), now, step)
              redis.call('ZADD', KEYS[6], int(turn), flow)
            end
            return {id, job, deadline - now, flow}
          end
          -- Its client has given up (or the payload is gone): drop it.
          redis.call('HDEL', KEYS[2], id)
          redis.call('ZREM', KEYS[3], id)
          redis.call('HDEL', KEYS[8], id)
        end
      end
    end
    offset = offset + #batch - removed
  end
  return nil, 'blocked'
end

local started = {}
local why = 'blocked'
for _ = 1, math.max(1, tonumber(ARGV[9])) do
  local job, reason = claim_one()
  if not job then
    why = reason
    break
  end
  for _, v in ipairs(job) do
    started[#started + 1] = v
  end
end
if #started > 0 then
  return started
end
return {'', why, math.floor(hint)}

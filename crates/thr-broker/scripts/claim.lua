-- claim: starts the most urgent jobs whose quotas all have room, and
-- leases them to the claiming worker under its claim token. Repeated with
-- the same token (its answer was lost), it returns what the first call
-- leased instead of leasing more: no lease is stranded on a worker that
-- never saw its job. A token is used once: a claim that started nothing
-- records that too, and a claim for 0 jobs starts nothing and returns what
-- an earlier call with its token leased (a worker that stops waiting for
-- a claim it sent, e.g. one queued behind its doorbell pop).
-- includes: clock order records quota drain liveness
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_leases, K_owners = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_wake, K_drained, K_seq, K_paused = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_claim, K_fronts, K_liveness, K_generation = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local K_held, K_holders, K_gcra, K_gcra_expiry = KEYS[17], KEYS[18], KEYS[19], KEYS[20]
local K_waiting, K_waiting_limits = KEYS[21], KEYS[22]
local token, worker, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- At most 1,000 jobs a call (a broker may start fewer than asked): what a
-- call writes for its jobs at its end stays within Lua's unpack limit.
local max_jobs, total, step = math.min(tonumber(ARGV[4]), 1000), tonumber(ARGV[5]), tonumber(ARGV[6])
local budget, front_timeout = tonumber(ARGV[7]), tonumber(ARGV[8])
local worker_timeout = tonumber(ARGV[9])
-- Returns {generation, 'jobs', id, job, ms left, front, flow definition, ...}
-- (five items per job, at least one job), or
-- {generation, 'idle', why, ms until a rate quota may allow (-1: unknown)}.
--
-- The walk is over flows, not jobs: a thousand jobs behind one full quota
-- are one flow, skipped in one step. A served flow goes behind the other
-- flows of its priority: round-robin between tenants.
local now, sec = clock()
local gen = generation(K_generation)
local alive = liveness_now(K_liveness, now)

-- What a started job returns to the worker. Its payload is read with the
-- others' at the end of the call (with_frames): one read for them all.
local started_ids = {}
local function started_entry(out, id, info)
  out[#out + 1] = id
  out[#out + 1] = false
  out[#out + 1] = int(info.deadline - now)
  out[#out + 1] = info.front
  out[#out + 1] = info.def
  started_ids[#started_ids + 1] = id
end

-- `out` with every started job's payload in its place.
local function with_frames(out)
  local frames = redis.call('HMGET', K_jobs, unpack(started_ids))
  for i = 1, #started_ids do
    out[2 + 5 * (i - 1) + 2] = frames[i]
  end
  return out
end

-- Marks this token used although it started nothing: a late copy of this
-- claim (queued behind a doorbell pop its worker gave up on) leases nothing.
-- Such a copy runs within a doorbell wait (a second) of the seal, or not at
-- all, so the mark lasts 10 s at most: idle polls leave no lasting keys.
local function seal(why, hint)
  redis.call('RPUSH', K_claim, '')
  redis.call('PEXPIRE', K_claim, int(math.min(lease, 10000)))
  return {gen, 'idle', why, hint}
end

-- A repeated claim: the jobs still leased under this token.
local prior = redis.call('LRANGE', K_claim, 0, -1)
if #prior > 0 then
  local out = {gen, 'jobs'}
  for _, id in ipairs(prior) do
    local owner = owner_unpack(redis.call('HGET', K_owners, id))
    local info = info_unpack(redis.call('HGET', K_info, id))
    if owner and owner.token == token and info then
      started_entry(out, id, info)
    end
  end
  if #out > 2 then
    return with_frames(out)
  end
  -- A late copy of a claim its worker settled may come right after the
  -- doorbell pop it was queued behind: pass that ring on if jobs wait.
  if max_jobs > 0 and redis.call('EXISTS', K_flows) == 1 then
    ring(K_wake)
  end
  return {gen, 'idle', 'claimed', -1}
end

if max_jobs == 0 then
  return seal('sealed', -1)
end
if redis.call('EXISTS', K_paused) == 1 then
  return seal('paused', -1)
end
if lease_lost(alive, 0, now, worker_timeout) then
  sem_sweep(K_held, K_holders, now)
end
gcra_sweep(K_gcra, K_gcra_expiry, now)

local full = {}     -- quota tokens found saturated during this call
local hint = -1
-- Flows looked at, over the whole call: starting many jobs costs Redis no
-- more time than one start may in the worst case.
local looked = 0
local out = {gen, 'jobs'}

-- What one call reads more than once is read once: fronts' liveness and
-- flow definitions do not change during a call (a flow whose definition
-- is deleted here leaves `flows` too, so it is not looked at again).
local fronts_dead, flow_quotas = {}, {}

-- True when a front is known and silent: nobody will read the reply.
local function front_dead(front)
  if front == '' then
    return false
  end
  local dead = fronts_dead[front]
  if dead == nil then
    local beat = tonumber(redis.call('ZSCORE', K_fronts, front))
    dead = beat ~= nil and is_silent(alive, beat, nil, now, front_timeout)
    fronts_dead[front] = dead
  end
  return dead
end

local function quotas_of(flow)
  local quotas = flow_quotas[flow]
  if not quotas then
    quotas = parse_def(redis.call('HGET', K_flowdefs, flow))
    flow_quotas[flow] = quotas
  end
  return quotas
end

-- The writes every started job makes, made once at the end of the call
-- with every job's members: leases, owners, this claim's list, the drain
-- count and the doorbell tokens spent.
local leases, owners, claimed = {}, {}, {}
local owner_record = owner_pack({ worker = worker, token = token, claimed = now })
-- Sequence numbers for flows' turns: one block per call, taken when first
-- needed, as many as starts may still follow (numbers left unused are a
-- gap; only their order matters).
local seq_next, seq_last = 0, -1
local function next_seq()
  if seq_next > seq_last then
    local want = math.max(1, max_jobs - #claimed + 1)
    seq_last = redis.call('INCRBY', K_seq, want)
    seq_next = seq_last - want + 1
  end
  seq_next = seq_next + 1
  return seq_next - 1
end
-- Running jobs as max_inflight_total counts them (read when first needed,
-- then counted here, since this call's leases are written at its end).
local running = nil

-- Jobs this call started: removed from `pending` at its end (nothing in a
-- claim reads `pending`).
local unqueued = {}

-- Forgets a waiting job that must not run (client gone, front dead), at
-- once. A call drops at most DROP_BUDGET of them (thousands of a dead
-- front's jobs would hold Redis for long); it then stops and rings, so
-- that the next claim goes on where it stopped.
local DROP_BUDGET = 200
local dropped = 0
local function drop(id)
  redis.call('ZREM', K_pending, id)
  redis.call('HDEL', K_jobs, id)
  redis.call('HDEL', K_info, id)
  dropped = dropped + 1
end

-- Starts one job: true, or false and why not.
local function claim_one()
  -- Expired leases are a dead worker's jobs: they no longer count as running.
  if total > 0 then
    running = running or redis.call('ZCOUNT', K_leases, '(' .. now, '+inf')
    if running >= total then
      return false, 'max_inflight_total'
    end
  end
  local offset = 0
  while looked < budget do
    local batch = redis.call('ZRANGE', K_flows, offset, offset + 49)
    if #batch == 0 then
      break
    end
    local removed = 0
    for _, flow in ipairs(batch) do
      looked = looked + 1
      local quotas = quotas_of(flow)
      local ok = true
      local tats = {}
      for i, q in ipairs(quotas) do
        if full[q.token] then
          ok = false
        elseif q.max > 0 and not sem_room(K_held, q.token, q.max) then
          full[q.token] = true
          ok = false
        elseif q.interval > 0 then
          local allowed, v = gcra(K_gcra, q.token, now, q.interval, q.burst)
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
        while true do
          -- The head, and the job after it for the flow's next turn.
          local head, heads = flow_head(K_flow_jobs, flow, 2)
          if not head then
            redis.call('ZREM', K_flows, flow)
            redis.call('HDEL', K_flowdefs, flow)
            removed = removed + 1
            break
          end
          redis.call('ZREM', K_flow_jobs, head)
          local _, id = member_parts(head)
          waiting_add(K_waiting, K_waiting_limits, quotas, -1)
          -- Its record, and the next job's (its priority sets the flow's
          -- next turn), in one read.
          local nxt = heads[2]
          local nxt_id = nxt and select(2, member_parts(nxt))
          local records = redis.call('HMGET', K_info, id, nxt_id or id)
          local info = info_unpack(records[1] or nil)
          if info and info.deadline > now and not front_dead(info.front) then
            unqueued[#unqueued + 1] = id
            local until_ms = int(now + lease)
            for i, q in ipairs(quotas) do
              if q.max > 0 then
                sem_take(K_held, K_holders, q.token, id, until_ms)
              end
              if q.interval > 0 then
                gcra_commit(K_gcra, K_gcra_expiry, q.token, now, tats[i], q.interval, q.burst)
              end
            end
            leases[#leases + 1] = until_ms
            leases[#leases + 1] = id
            owners[#owners + 1] = id
            owners[#owners + 1] = owner_record
            claimed[#claimed + 1] = id
            if running then
              running = running + 1
            end
            started_entry(out, id, info)
            -- The flow's next turn: behind every flow of its priority.
            if not nxt then
              redis.call('ZREM', K_flows, flow)
              redis.call('HDEL', K_flowdefs, flow)
            else
              local nxt_info = info_unpack(records[2] or nil)
              local prio = nxt_info and nxt_info.prio or 50
              local turn = order_score(prio, next_seq(), now, step)
              redis.call('ZADD', K_flows, int(turn), flow)
            end
            return true
          end
          -- Its client has given up, its front is dead, or its record is
          -- gone: it never runs.
          drop(id)
          if dropped >= DROP_BUDGET then
            ring(K_wake)
            return false, 'dropping'
          end
        end
      end
    end
    offset = offset + #batch - removed
  end
  return false, 'blocked'
end

local why = 'blocked'
for _ = 1, max_jobs do
  local ok, reason = claim_one()
  if not ok then
    why = reason
    break
  end
end
if #unqueued > 0 then
  redis.call('ZREM', K_pending, unpack(unqueued))
end
if #out > 2 then
  redis.call('ZADD', K_leases, unpack(leases))
  redis.call('HSET', K_owners, unpack(owners))
  redis.call('RPUSH', K_claim, unpack(claimed))
  redis.call('PEXPIRE', K_claim, int(lease))
  -- The started jobs' doorbell tokens are spent: idle workers are not
  -- woken for them.
  redis.call('LPOP', K_wake, #claimed)
  count_start(K_drained, sec, #claimed)
  -- A worker given fewer jobs than it asked for waits on the doorbell
  -- instead of asking again at once. Releases and enqueues ring it; a rate
  -- quota frees up on its own, so a token is left for that: the next
  -- claim learns when to look again.
  if hint >= 0 then
    ring(K_wake)
  end
  return with_frames(out)
end
return seal(why, math.floor(hint))

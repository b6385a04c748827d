-- claim: starts the most urgent jobs whose quotas all have room, and
-- leases them to the claiming worker under its claim token. Repeated with
-- the same token (its answer was lost), it returns what the first call
-- leased instead of leasing more: no lease is stranded on a worker that
-- never saw its job. A token is used once: a claim that started nothing
-- records that too, and a claim for 0 jobs starts nothing and returns what
-- an earlier call with its token leased (a worker that stops waiting for
-- a claim it sent, e.g. one queued behind its doorbell pop).
-- A job an enqueue handed off (it found nothing waiting: ARCHITECTURE.md
-- decision 26) starts first, without a walk, while it is still the only
-- waiting job; once others wait, it joins its flow and the walk orders it.
-- includes: clock order records quota drain liveness waiting
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_leases, K_owners = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_wake, K_drained, K_seq, K_paused = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_claim, K_fronts, K_liveness, K_generation = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local K_held, K_holders, K_gcra, K_gcra_expiry = KEYS[17], KEYS[18], KEYS[19], KEYS[20]
local K_waiting, K_waiting_limits, K_handoff = KEYS[21], KEYS[22], KEYS[23]
local K_offers, K_offer = KEYS[24], KEYS[25]
local token, worker, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- At most 1,000 jobs a call (a broker may start fewer than asked): what a
-- call writes for its jobs at its end stays within Lua's unpack limit.
local max_jobs, total, step = math.min(tonumber(ARGV[4]), 1000), tonumber(ARGV[5]), tonumber(ARGV[6])
local budget, front_timeout = tonumber(ARGV[7]), tonumber(ARGV[8])
local worker_timeout = tonumber(ARGV[9])
-- ARGV[10] '1': a claim ahead, for a job the worker holds until a slot
-- frees (ARCHITECTURE.md decision 30). Such a job is leased before it runs,
-- so a worker that dies meanwhile takes it along unseen: it starts only a
-- job that may run again (a method of ARGV[11], space-separated). When the
-- next job in order is of another method, it starts nothing ('unheld'):
-- that job waits for a free slot, and nothing is taken from behind it.
local hold_only = ARGV[10] == '1' and ARGV[11] or nil
-- True when the job of `info` may start under this claim.
local function may_hold(info)
  return not hold_only or method_in(hold_only, info.method)
end
-- Returns {generation, 'jobs', id, job, ms left, front, flow definition, ...}
-- (five items per job, at least one job), or
-- {generation, 'idle', why, ms until a rate quota may allow (-1: unknown)};
-- why is 'unheld' when a claim ahead left the next job for a free slot.
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
  -- A whole number: Redis answers it as an integer, with nothing printed.
  out[#out + 1] = info.deadline - now
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

-- The worker no longer waits under this token: an enqueue may no longer
-- hand it a job (ARCHITECTURE.md decision 27). One it handed already is
-- leased under this token: the prior jobs below.
redis.call('HDEL', K_offers, token)

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
    -- Answered here: what an enqueue pushed to this token's offer list is
    -- not popped any more.
    redis.call('DEL', K_offer)
    return with_frames(out)
  end
  -- A late copy of a claim its worker settled may come right after the
  -- doorbell pop it was queued behind: pass that ring on if jobs wait.
  if max_jobs > 0 and redis.call('EXISTS', K_flows, K_handoff) > 0 then
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
-- True when a front is known and silent: nobody will read the reply. A
-- job it enqueued well after its last beat (more than half a front
-- timeout: it beats every 200 ms) and less than a front timeout ago says
-- it was alive then, whatever its beats say: they may have been refused
-- (Redis out of memory) while the enqueue that followed went through. The
-- jobs of a front killed between two beats are judged by its beats, as
-- before.
-- Fronts' liveness does not change during a call: read once per front
-- (false: alive or unknown; else the last beat of a silent front).
local silent_since = {}
local function front_dead(front, enqueued)
  if front == '' then
    return false
  end
  local beat = silent_since[front]
  if beat == nil then
    beat = tonumber(redis.call('ZSCORE', K_fronts, front))
    beat = beat ~= nil and is_silent(alive, beat, nil, now, front_timeout) and beat
    silent_since[front] = beat
  end
  return beat and (enqueued <= beat + front_timeout / 2 or enqueued <= now - front_timeout)
end

-- Forgets a waiting job that must not run (client gone, front dead). A
-- call drops at most DROP_BUDGET of them (thousands of a dead front's jobs
-- would hold Redis for long); it then stops and rings, so that the next
-- claim goes on where it stopped.
local DROP_BUDGET = 200
local dropped = 0
local function drop(id)
  redis.call('ZREM', K_pending, id)
  redis.call('HDEL', K_jobs, id)
  redis.call('HDEL', K_info, id)
  dropped = dropped + 1
end

-- Jobs running, as max_inflight_total counts them: expired leases are a
-- dead worker's jobs and no longer count.
local function running_now()
  return redis.call('ZCOUNT', K_leases, '(' .. now, '+inf')
end

-- What every started job writes, once per call with every job's members:
-- its lease, its owner, this claim's list, the doorbell tokens spent (idle
-- workers are not woken for them) and the drain count.
local owner_record = owner_pack({ worker = worker, token = token, claimed = now })
local until_ms = int(now + lease)
local function lease_all(ids)
  local leases, owners = {}, {}
  for i, id in ipairs(ids) do
    leases[2 * i - 1], leases[2 * i] = until_ms, id
    owners[2 * i - 1], owners[2 * i] = id, owner_record
  end
  redis.call('ZADD', K_leases, unpack(leases))
  redis.call('HSET', K_owners, unpack(owners))
  redis.call('RPUSH', K_claim, unpack(ids))
  redis.call('PEXPIRE', K_claim, int(lease))
  redis.call('LPOP', K_wake, #ids)
  count_start(K_drained, sec, #ids)
end

-- The handed-off job: started here when nothing else waits (no flow), put
-- in its flow otherwise; let go when it was withdrawn (no record), dropped
-- when it must not run. Not while max_inflight_total is reached: it waits.
if total == 0 or running_now() < total then
  local id = redis.call('LPOP', K_handoff)
  local info = id and info_unpack(redis.call('HGET', K_info, id))
  if info and redis.call('EXISTS', K_flows) == 1 then
    enflow(id, info)
  elseif info and info.deadline > now and not front_dead(info.front, info.enqueued) then
    if not may_hold(info) then
      -- Back at the head of the hand-off list, as it was.
      redis.call('LPUSH', K_handoff, id)
      return seal('unheld', -1)
    end
    local out = {gen, 'jobs'}
    started_entry(out, id, info)
    redis.call('ZREM', K_pending, id)
    lease_all({id})
    return with_frames(out)
  elseif info then
    drop(id)
  end
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

-- Flow definitions do not change during a call (a flow whose definition is
-- deleted here leaves `flows` too, so it is not looked at again): read once.
local flow_quotas = {}

local function quotas_of(flow)
  local quotas = flow_quotas[flow]
  if not quotas then
    quotas = parse_def(redis.call('HGET', K_flowdefs, flow))
    flow_quotas[flow] = quotas
  end
  return quotas
end

-- The jobs this call started, leased at its end (lease_all).
local claimed = {}
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
-- Members of flow_jobs this call took (started or dropped), removed at its
-- end; changes to waiting counts per quota token, written at its end.
local taken = {}
local waiting_delta, waiting_tokens = {}, {}

-- The flows in turn order. When a call finds fewer than FLOW_BATCH flows,
-- it reads them once (`view`), keeps their order itself, and writes the
-- turns it changed and the flows it emptied at its end. With more, it reads
-- them in batches as it walks and writes each change at once.
local FLOW_BATCH = 50
local view = nil
local new_turns, emptied = {}, {}

local function read_view()
  local r = redis.call('ZRANGE', K_flows, 0, FLOW_BATCH - 1, 'WITHSCORES')
  if #r < 2 * FLOW_BATCH then
    view = {}
    for k = 1, #r, 2 do
      view[#view + 1] = { flow = r[k], score = tonumber(r[k + 1]) }
    end
  end
end

local function view_remove(flow)
  for k, e in ipairs(view) do
    if e.flow == flow then
      table.remove(view, k)
      return
    end
  end
end

-- A flow whose jobs are all taken leaves the flows.
local function flow_emptied(flow)
  if view then
    view_remove(flow)
    new_turns[flow] = nil
    emptied[#emptied + 1] = flow
  else
    redis.call('ZREM', K_flows, flow)
    redis.call('HDEL', K_flowdefs, flow)
  end
end

-- True when name `a` sorts before `b` in a sorted set: byte by byte (Lua's
-- `<` on strings follows the server's locale).
local function bytes_before(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

-- A served flow's next turn (sorted as Redis sorts: score, then name).
local function set_turn(flow, score)
  if not view then
    redis.call('ZADD', K_flows, int(score), flow)
    return
  end
  new_turns[flow] = score
  if #view == 1 and view[1].flow == flow then
    -- The only flow (a queue without limits): its place cannot change.
    view[1].score = score
    return
  end
  view_remove(flow)
  local k = #view + 1
  for j, e in ipairs(view) do
    if score < e.score or (score == e.score and bytes_before(flow, e.flow)) then
      k = j
      break
    end
  end
  table.insert(view, k, { flow = flow, score = score })
end

-- Per flow, its next waiting jobs read ahead: members `list` from index
-- `i`, their ids and raw records, `done` once the list reaches the flow's
-- last job, and `last`, the last member this call took (reads go on after
-- it: taken members leave flow_jobs only at the end of the call). A first
-- read takes the head and the job after it (whose priority sets the flow's
-- next turn); each further read of the same flow takes twice as many. The
-- only flow waiting, when it has no quota (a queue without limits), is read
-- at once for every job the call may still start, and the one after: the
-- turns give it all, and no quota stops it half-way.
local cursors = {}

local function read_ahead(flow, c)
  local want = c and math.min(2 * c.want, 256)
  if not want then
    local alone = view and #view == 1 and #quotas_of(flow) == 0
    want = alone and math.min(max_jobs - #claimed + 1, 256) or 2
  end
  local from = c and c.last and ('(' .. c.last) or ('[' .. flow .. '\t')
  local list = redis.call('ZRANGE', K_flow_jobs, from, '(' .. flow .. '\n', 'BYLEX', 'LIMIT', 0, want)
  local ids = {}
  for k, member in ipairs(list) do
    ids[k] = member_id(member)
  end
  local records = #ids > 0 and redis.call('HMGET', K_info, unpack(ids)) or {}
  local next_c = {
    list = list, ids = ids, records = records, infos = {}, i = 1,
    done = #list < want, want = want, last = c and c.last,
  }
  cursors[flow] = next_c
  return next_c
end

-- The cursor of `flow`, with its head and the job after it known (or
-- known not to exist).
local function cursor(flow)
  local c = cursors[flow]
  if not c or (c.i >= #c.list and not c.done) then
    c = read_ahead(flow, c)
  end
  return c
end

local function info_at(c, k)
  local info = c.infos[k]
  if info == nil then
    info = info_unpack(c.records[k] or nil) or false
    c.infos[k] = info
  end
  return info
end

-- Starts the head of `flow` if its quotas allow: 'started', 'blocked',
-- 'emptied' (it had no job left), 'dropping' (DROP_BUDGET reached) or
-- 'unheld' (a claim ahead met a job it may not hold).
local function try_flow(flow)
  local quotas = quotas_of(flow)
  local tats = #quotas > 0 and {} or nil
  for i, q in ipairs(quotas) do
    if full[q.token] then
      return 'blocked'
    elseif q.max > 0 and not sem_room(K_held, q.token, q.max) then
      full[q.token] = true
      return 'blocked'
    elseif q.interval > 0 then
      local allowed, v = gcra(K_gcra, q.token, now, q.interval, q.burst)
      if not allowed then
        full[q.token] = true
        if hint < 0 or v < hint then
          hint = v
        end
        return 'blocked'
      end
      tats[i] = v
    end
  end
  while true do
    local c = cursor(flow)
    if c.i > #c.list then
      flow_emptied(flow)
      return 'emptied'
    end
    local k = c.i
    local id = c.ids[k]
    local info = info_at(c, k)
    -- Not runnable: dropped below.
    local runnable = info and info.deadline > now and not front_dead(info.front, info.enqueued)
    if runnable and not may_hold(info) then
      return 'unheld'
    end
    c.i = k + 1
    c.last = c.list[k]
    taken[#taken + 1] = c.list[k]
    for _, q in ipairs(quotas) do
      if not waiting_delta[q.token] then
        waiting_tokens[#waiting_tokens + 1] = q.token
        waiting_delta[q.token] = 0
      end
      waiting_delta[q.token] = waiting_delta[q.token] - 1
    end
    if runnable then
      unqueued[#unqueued + 1] = id
      for i, q in ipairs(quotas) do
        if q.max > 0 then
          sem_take(K_held, K_holders, q.token, id, until_ms)
        end
        if q.interval > 0 then
          gcra_commit(K_gcra, K_gcra_expiry, q.token, now, tats[i], q.interval, q.burst)
        end
      end
      claimed[#claimed + 1] = id
      if running then
        running = running + 1
      end
      started_entry(out, id, info)
      -- The flow's next turn: behind every flow of its priority.
      if c.i > #c.list then
        flow_emptied(flow)
      else
        local nxt = info_at(c, c.i)
        local prio = nxt and nxt.prio or 50
        set_turn(flow, order_score(prio, next_seq(), now, step))
      end
      return 'started'
    end
    -- Its client has given up, its front is dead, or its record is gone:
    -- it never runs.
    drop(id)
    if dropped >= DROP_BUDGET then
      ring(K_wake)
      return 'dropping'
    end
  end
end

-- Tries `flows` in turn order until one starts a job: true; or false, why
-- not, and how many of them left the flows (emptied).
local function try_flows(flows)
  local removed = 0
  for _, flow in ipairs(flows) do
    looked = looked + 1
    local r = try_flow(flow)
    if r == 'started' then
      return true
    elseif r == 'dropping' or r == 'unheld' then
      return false, r, removed
    elseif r == 'emptied' then
      removed = removed + 1
    end
  end
  return false, 'blocked', removed
end

-- Starts one job: true, or false and why not.
local only = nil -- the view's order when it holds one flow, made once
local function claim_one()
  if total > 0 then
    running = running or running_now()
    if running >= total then
      return false, 'max_inflight_total'
    end
  end
  if view then
    if looked >= budget then
      return false, 'blocked'
    end
    -- The view's order now (trying a flow may move it or take it out).
    if #view == 1 then
      only = only or {}
      only[1] = view[1].flow
      return try_flows(only)
    end
    local flows = {}
    for k, e in ipairs(view) do
      flows[k] = e.flow
    end
    return try_flows(flows)
  end
  local offset = 0
  while looked < budget do
    local batch = redis.call('ZRANGE', K_flows, offset, offset + FLOW_BATCH - 1)
    if #batch == 0 then
      break
    end
    local ok, why, removed = try_flows(batch)
    if ok or why == 'dropping' or why == 'unheld' then
      return ok, why
    end
    offset = offset + #batch - removed
  end
  return false, 'blocked'
end

-- What the walk changed in flows and flow_jobs, and in the waiting counts.
local function write_walk()
  if #taken > 0 then
    redis.call('ZREM', K_flow_jobs, unpack(taken))
  end
  local zturns = {}
  for flow, score in pairs(new_turns) do
    zturns[#zturns + 1] = int(score)
    zturns[#zturns + 1] = flow
  end
  if #zturns > 0 then
    redis.call('ZADD', K_flows, unpack(zturns))
  end
  if #emptied > 0 then
    redis.call('ZREM', K_flows, unpack(emptied))
    redis.call('HDEL', K_flowdefs, unpack(emptied))
  end
  for _, t in ipairs(waiting_tokens) do
    waiting_add(K_waiting, K_waiting_limits, { { token = t } }, waiting_delta[t])
  end
end

read_view()
local why = 'blocked'
for _ = 1, max_jobs do
  local ok, reason = claim_one()
  if not ok then
    why = reason
    break
  end
end
write_walk()
if #unqueued > 0 then
  redis.call('ZREM', K_pending, unpack(unqueued))
end
if #out > 2 then
  lease_all(claimed)
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

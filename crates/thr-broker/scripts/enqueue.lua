-- enqueue: admits jobs (max_waiting) and queues each in its flow; one call
-- for many (a front gathers what arrives while its previous call is in
-- flight). Idempotent by job id: repeated (its answer was lost), a job is
-- reported as what became of the first one and nothing changes. With
-- `from_dead`, a job moves dead letter `id` back on the queue instead
-- (thrctl retry), in the same atomic step.
-- Jobs are judged one after the other (a job refused for a full queue
-- sees the jobs admitted before it in the same call), and the writes they
-- share (the clock, the sequence, the sorted sets and hashes, the
-- doorbell) are made once per call with every job's members.
-- Jobs' payloads are not arguments: the caller stores them in `jobs` in
-- the same transaction, just before this call (Scripts::enqueue), so that
-- no payload crosses into Lua (each crossing copies and hashes it). This
-- call deletes the payload of a job it does not queue (refused, settled,
-- or a dead letter already gone) unless that job is waiting or running.
-- The first job of a call that finds nothing waiting and has no quota is
-- handed on as it is. To a worker waiting on the doorbell that offered to
-- take it (hash `offers`, ARCHITECTURE.md decision 27): leased here, under
-- the offer's claim token, and pushed to the offer's own list, which the
-- worker's pop returns; no claim runs for it. Otherwise to the next claim
-- (list `handoff`, decision 26): it joins no flow, and the claim that
-- takes it walks none.
-- includes: clock order records quota drain liveness
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_seq, K_wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_drained, K_waiting, K_dead, K_reasons = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_waiting_limits, K_handoff, K_paused, K_offers = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local K_leases, K_owners, K_generation, K_workers = KEYS[17], KEYS[18], KEYS[19], KEYS[20]
local K_liveness = KEYS[21]
-- KEYS[21 + i]: job i's settled marker.
-- ARGV[1], ARGV[2]: the names of an offer's list and of a claim's list,
-- but for the claim token that ends them (QueueKeys::offer, ::claim); the
-- token comes from the offer. ARGV[3]: ms of silence after which a worker
-- is dead.
-- From ARGV[4], 10 per job: id, priority, timeout ms, flow, flow
-- definition, max waiting in the queue (0: none), aging step ms, front,
-- method, from_dead ('1' or '').
-- Returns per job {'queued'}, {'settled'} (answered or withdrawn already),
-- or {'refused', what is full, waiting, drain rate per second}; with
-- `from_dead`, {'gone'} when there is no such dead letter.
local offer_prefix, claim_prefix, worker_timeout = ARGV[1], ARGV[2], tonumber(ARGV[3])
local H = 3
local A = 10 -- arguments per job
local n = (#ARGV - H) / A
local now, sec = clock()
local last_seq = redis.call('INCRBY', K_seq, n)

local ids = {}
for i = 1, n do
  ids[i] = ARGV[H + A * (i - 1) + 1]
end
local known = redis.call('HMGET', K_info, unpack(ids))
local settled = redis.call('MGET', unpack(KEYS, 22, 21 + n))

local out = {}
local seen = {}               -- ids queued by this call
local pending_n = nil         -- ZCARD of pending before this call, read when first needed
local admitted = 0
local waiting, delta = {}, {} -- per quota token: count before this call, change
local tokens = {}             -- tokens whose count changes, in first-seen order
local zpending, zflow_jobs, hinfo = {}, {}, {}
local unqueued = {}           -- ids of jobs not queued (their payloads go unless live)
local defs, turns, flows = {}, {}, {}
local handed = nil            -- the job handed on (to an offer or the next claim)
local taker = nil             -- the offer that takes it: {token, offer}

local function add(t, a, b)
  t[#t + 1] = a
  t[#t + 1] = b
end

local function drain()
  return tostring(drain_rate(K_drained, sec))
end

-- An offer that may take a job of `method` now (the queue is not paused):
-- one of a live worker that runs such jobs again if it dies unseen (its
-- `retry_methods`), while its max_inflight_total has room. An offer turned
-- away for the method or max_inflight_total stays (its worker waits on);
-- one taken, unreadable, of a dead worker or of one with no beat (retired)
-- is removed. A few tries.
local function find_taker(method)
  local alive = nil
  for _ = 1, 3 do
    local pick = redis.call('HRANDFIELD', K_offers, 1, 'WITHVALUES')
    if #pick == 0 then
      return nil
    end
    local token, offer = pick[1], offer_unpack(pick[2])
    -- The method first: it costs no read, so a job turned away (a POST,
    -- on an idle system) pays for no liveness read.
    if offer and not method_in(offer.methods, method) then
      return nil
    end
    if offer and offer.total > 0
        and redis.call('ZCOUNT', K_leases, '(' .. now, '+inf') >= offer.total then
      return nil
    end
    redis.call('HDEL', K_offers, token)
    if offer then
      alive = alive or liveness_now(K_liveness, now)
      local beat = tonumber(redis.call('ZSCORE', K_workers, offer.worker))
      -- No beat at all: the worker retired (an offer its last claim could
      -- not withdraw, Redis refusing writes) or has not beaten yet; either
      -- way its offer is let go, and the job waits for a claim.
      if beat and not is_silent(alive, beat, nil, now, worker_timeout) then
        return { token = token, offer = offer }
      end
    end
  end
  return nil
end

for i = 1, n do
  local a = H + A * (i - 1)
  local id, prio, timeout = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local flow, def, max_queue, step = ARGV[a + 4], ARGV[a + 5], tonumber(ARGV[a + 6]), tonumber(ARGV[a + 7])
  local front, method, from_dead = ARGV[a + 8], ARGV[a + 9], ARGV[a + 10] == '1'
  local verdict = nil
  if from_dead then
    if redis.call('HDEL', K_dead, id) == 0 then
      verdict = {'gone'}
    else
      redis.call('HDEL', K_reasons, id)
      redis.call('DEL', KEYS[21 + i])
      max_queue = 0
    end
  elseif settled[i] then
    verdict = {'settled'}
  end
  if not verdict and (known[i] or seen[id]) then
    verdict = {'queued'}
  end
  local quotas = parse_def(def)
  if not verdict and max_queue > 0 then
    pending_n = pending_n or redis.call('ZCARD', K_pending)
    if pending_n + admitted >= max_queue then
      verdict = {'refused', 'queue', pending_n + admitted, drain()}
    end
  end
  if not verdict and not from_dead then
    for _, q in ipairs(quotas) do
      if q.maxw > 0 then
        if not waiting[q.token] then
          waiting[q.token] = tonumber(redis.call('HGET', K_waiting, q.token)) or 0
        end
        local w = waiting[q.token] + (delta[q.token] or 0)
        if w >= q.maxw then
          verdict = {'refused', q.token, w, drain()}
          break
        end
      end
    end
  end
  if not verdict then
    seen[id] = true
    -- Nothing waits (no pending job, none handed off) and the queue is not
    -- paused (a paused queue's jobs wait in their flows): one command.
    if admitted == 0 and def == ''
        and redis.call('EXISTS', K_pending, K_handoff, K_paused) == 0 then
      handed = id
      taker = find_taker(method)
    end
    admitted = admitted + 1
    -- Each number printed once.
    local score = order_score(prio, last_seq - n + i, now, step)
    local score_s = int(score)
    if not (taker and handed == id) then
      add(zpending, score_s, id)
    end
    add(hinfo, id, info_pack({
      prio = prio, score = score, flow = flow, enqueued = now, deadline = now + timeout,
      front = front, method = method, attempts = 0, def = def,
    }))
    if taker and handed == id then
      taker.job = { id = id, left = timeout, front = front, def = def }
    end
    if handed ~= id then
      add(zflow_jobs, 0, flow_member(flow, score_s, id))
      if not defs[flow] then
        flows[#flows + 1] = flow
        defs[flow] = def
      end
      -- A flow keeps its turn; a more urgent job can only bring it forward.
      if not turns[flow] or score < turns[flow] then
        turns[flow] = score
      end
    end
    for _, q in ipairs(quotas) do
      if not delta[q.token] then
        tokens[#tokens + 1] = q.token
      end
      delta[q.token] = (delta[q.token] or 0) + 1
    end
    verdict = {'queued'}
  end
  if verdict[1] ~= 'queued' then
    unqueued[#unqueued + 1] = i
  end
  out[i] = verdict
end

-- Payloads of jobs this call did not queue, but for a job that waits or
-- runs under that id (its payload is the same one).
local orphans = {}
for _, i in ipairs(unqueued) do
  if not known[i] and not seen[ids[i]] then
    orphans[#orphans + 1] = ids[i]
  end
end
if #orphans > 0 then
  redis.call('HDEL', K_jobs, unpack(orphans))
end

-- The job an offer takes: leased to its worker under its token (the
-- claim list, so that a claim repeated with that token returns it), then
-- pushed to the offer's list with what a claim would answer for it.
local function give(t)
  local job, token, offer = t.job, t.token, t.offer
  local claim_list, offer_list = claim_prefix .. token, offer_prefix .. token
  redis.call('ZADD', K_leases, int(now + offer.lease), job.id)
  redis.call('HSET', K_owners, job.id, owner_pack({ worker = offer.worker, token = token, claimed = now }))
  redis.call('RPUSH', claim_list, job.id)
  redis.call('PEXPIRE', claim_list, int(offer.lease))
  count_start(K_drained, sec, 1)
  local gen = generation(K_generation)
  local frame = redis.call('HGET', K_jobs, job.id)
  redis.call('RPUSH', offer_list, handed_pack(gen, job.id, frame, job.left, job.front, job.def))
  -- Gone with the lease if its worker never pops it (it died).
  redis.call('PEXPIRE', offer_list, int(offer.lease))
end

if admitted > 0 then
  local rung = admitted
  if #zpending > 0 then
    redis.call('ZADD', K_pending, unpack(zpending))
  end
  redis.call('HSET', K_info, unpack(hinfo))
  if taker then
    give(taker)
    rung = rung - 1
  elseif handed then
    redis.call('RPUSH', K_handoff, handed)
  end
  if #flows > 0 then
    local hdefs, zturns = {}, {}
    for _, flow in ipairs(flows) do
      add(hdefs, flow, defs[flow])
      add(zturns, int(turns[flow]), flow)
    end
    redis.call('ZADD', K_flow_jobs, unpack(zflow_jobs))
    redis.call('HSET', K_flowdefs, unpack(hdefs))
    redis.call('ZADD', K_flows, 'LT', unpack(zturns))
  end
  for _, token in ipairs(tokens) do
    waiting_add(K_waiting, K_waiting_limits, {{token = token}}, delta[token])
  end
  if rung > 0 then
    ring(K_wake, rung)
  end
end
return out

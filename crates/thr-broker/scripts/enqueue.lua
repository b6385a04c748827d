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
-- The first job of a call that finds nothing waiting and has no quota is
-- handed to the next claim as it is (list `handoff`): it joins no flow,
-- and the claim that takes it walks none (ARCHITECTURE.md decision 26).
-- includes: clock order records quota drain
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_seq, K_wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_drained, K_waiting, K_dead, K_reasons = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_waiting_limits, K_handoff = KEYS[13], KEYS[14]
-- KEYS[14 + i]: job i's settled marker.
-- ARGV, 11 per job: id, priority, frame, timeout ms, flow, flow definition,
-- max waiting in the queue (0: none), aging step ms, front, method,
-- from_dead ('1' or '').
-- Returns per job {'queued'}, {'settled'} (answered or withdrawn already),
-- or {'refused', what is full, waiting, drain rate per second}; with
-- `from_dead`, {'gone'} when there is no such dead letter.
local n = #ARGV / 11
local now, sec = clock()
local last_seq = redis.call('INCRBY', K_seq, n)

local ids = {}
for i = 1, n do
  ids[i] = ARGV[11 * (i - 1) + 1]
end
local known = redis.call('HMGET', K_info, unpack(ids))
local settled = redis.call('MGET', unpack(KEYS, 15, 14 + n))

local out = {}
local seen = {}               -- ids queued by this call
local pending_n = nil         -- ZCARD of pending before this call, read when first needed
local admitted = 0
local waiting, delta = {}, {} -- per quota token: count before this call, change
local tokens = {}             -- tokens whose count changes, in first-seen order
local zpending, zflow_jobs, hjobs, hinfo = {}, {}, {}, {}
local defs, turns, flows = {}, {}, {}
local handed = nil            -- the job handed to the next claim

local function add(t, a, b)
  t[#t + 1] = a
  t[#t + 1] = b
end

local function drain()
  return tostring(drain_rate(K_drained, sec))
end

for i = 1, n do
  local a = 11 * (i - 1)
  local id, prio, frame, timeout = ARGV[a + 1], tonumber(ARGV[a + 2]), ARGV[a + 3], tonumber(ARGV[a + 4])
  local flow, def, max_queue, step = ARGV[a + 5], ARGV[a + 6], tonumber(ARGV[a + 7]), tonumber(ARGV[a + 8])
  local front, method, from_dead = ARGV[a + 9], ARGV[a + 10], ARGV[a + 11] == '1'
  local verdict = nil
  if from_dead then
    if redis.call('HDEL', K_dead, id) == 0 then
      verdict = {'gone'}
    else
      redis.call('HDEL', K_reasons, id)
      redis.call('DEL', KEYS[14 + i])
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
    if admitted == 0 and def == '' then
      pending_n = pending_n or redis.call('ZCARD', K_pending)
      if pending_n == 0 and redis.call('LLEN', K_handoff) == 0 then
        handed = id
      end
    end
    admitted = admitted + 1
    -- Each number printed once.
    local score = order_score(prio, last_seq - n + i, now, step)
    local score_s = int(score)
    add(zpending, score_s, id)
    add(hjobs, id, frame)
    add(hinfo, id, info_pack({
      prio = prio, score = score, flow = flow, enqueued = now, deadline = now + timeout,
      front = front, method = method, attempts = 0, def = def,
    }))
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
  out[i] = verdict
end

if admitted > 0 then
  redis.call('ZADD', K_pending, unpack(zpending))
  redis.call('HSET', K_jobs, unpack(hjobs))
  redis.call('HSET', K_info, unpack(hinfo))
  if handed then
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
  ring(K_wake, admitted)
end
return out

-- enqueue: admits a job (max_waiting) and queues it in its flow. Idempotent
-- by job id: repeated (its answer was lost), it reports what became of the
-- first one and changes nothing. With `from_dead`, it moves dead letter `id`
-- back on the queue instead (thrctl retry), in the same atomic step.
-- includes: clock order records quota drain
local K_pending, K_flow_jobs, K_flows, K_flowdefs = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_jobs, K_info, K_seq, K_wake = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_drained, K_waiting, K_settled, K_dead, K_reasons = KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local K_waiting_limits = KEYS[14]
local id, prio, frame, timeout = ARGV[1], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4])
local flow, def, max_queue, step = ARGV[5], ARGV[6], tonumber(ARGV[7]), tonumber(ARGV[8])
local front, method, from_dead = ARGV[9], ARGV[10], ARGV[11] == '1'
-- Returns {'queued'}, {'settled'} (answered or withdrawn already), or
-- {'refused', what is full, waiting, drain rate per second}; with
-- `from_dead`, {'gone'} when there is no such dead letter.
if from_dead then
  if redis.call('HDEL', K_dead, id) == 0 then
    return {'gone'}
  end
  redis.call('HDEL', K_reasons, id)
  redis.call('DEL', K_settled)
  max_queue = 0
elseif redis.call('EXISTS', K_settled) == 1 then
  return {'settled'}
end
if redis.call('HEXISTS', K_info, id) == 1 then
  return {'queued'}
end
local now, sec = clock()
local quotas = parse_def(def)
if max_queue > 0 then
  local w = redis.call('ZCARD', K_pending)
  if w >= max_queue then
    return {'refused', 'queue', w, tostring(drain_rate(K_drained, sec))}
  end
end
for _, q in ipairs(quotas) do
  if q.maxw > 0 and not from_dead then
    local w = tonumber(redis.call('HGET', K_waiting, q.token)) or 0
    if w >= q.maxw then
      return {'refused', q.token, w, tostring(drain_rate(K_drained, sec))}
    end
  end
end

local score = order_score(prio, redis.call('INCR', K_seq), now, step)
redis.call('ZADD', K_pending, int(score), id)
redis.call('ZADD', K_flow_jobs, 0, flow_member(flow, score, id))
redis.call('HSET', K_jobs, id, frame)
redis.call('HSET', K_info, id, info_pack({
  prio = prio, score = score, flow = flow, enqueued = now, deadline = now + timeout,
  front = front, method = method, attempts = 0, def = def,
}))
redis.call('HSET', K_flowdefs, flow, def)
-- A flow keeps its turn; a more urgent job can only bring it forward.
local turn = tonumber(redis.call('ZSCORE', K_flows, flow))
if not turn or score < turn then
  redis.call('ZADD', K_flows, int(score), flow)
end
waiting_add(K_waiting, K_waiting_limits, quotas, 1)
ring(K_wake)
return {'queued'}

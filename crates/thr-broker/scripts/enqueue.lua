-- enqueue: admits a job (max_waiting) and puts it in its flow.
-- KEYS[1]  pending    sorted set id -> order score (every waiting job)
-- KEYS[2]  seq        counter
-- KEYS[3]  jobs       hash id -> encoded job
-- KEYS[4]  deadlines  sorted set id -> client deadline (ms)
-- KEYS[5]  wake       doorbell list
-- KEYS[6]  flows      sorted set flow -> its turn (score of its next job)
-- KEYS[7]  flowdefs   hash flow -> definition
-- KEYS[8]  jobinfo    hash id -> "priority<TAB>score<TAB>flow<TAB>enqueued ms<TAB>front"
-- KEYS[9]  drained    hash second -> jobs started
-- KEYS[10] flow       this job's flow: sorted set id -> order score
-- KEYS[11] waiting    hash quota token -> waiting jobs
-- ARGV[1] job id         ARGV[2] priority 1..99     ARGV[3] encoded job
-- ARGV[4] timeout ms     ARGV[5] flow id            ARGV[6] flow definition
-- ARGV[7] queue max_waiting (0: none)               ARGV[8] aging step ms (0: strict)
-- ARGV[9] id of the front waiting for the reply
-- Returns {1, sequence} when queued, or {0, what is full, waiting, drain
-- rate per second} when refused.
local now, sec = clock()
local id, prio, flow = ARGV[1], tonumber(ARGV[2]), ARGV[5]
local quotas = parse_def(ARGV[6])

local max_queue = tonumber(ARGV[7])
if max_queue > 0 then
  local w = redis.call('ZCARD', KEYS[1])
  if w >= max_queue then
    return {0, 'queue', w, tostring(drain_rate(KEYS[9], sec))}
  end
end
for _, q in ipairs(quotas) do
  if q.maxw > 0 then
    local w = tonumber(redis.call('HGET', KEYS[11], q.token)) or 0
    if w >= q.maxw then
      return {0, q.token, w, tostring(drain_rate(KEYS[9], sec))}
    end
  end
end

local seq = redis.call('INCR', KEYS[2])
local score = order_score(prio, seq, now, tonumber(ARGV[8]))
redis.call('ZADD', KEYS[1], int(score), id)
redis.call('HSET', KEYS[3], id, ARGV[3])
redis.call('ZADD', KEYS[4], int(now + tonumber(ARGV[4])), id)
redis.call('HSET', KEYS[8], id, prio .. '\t' .. int(score) .. '\t' .. flow .. '\t' .. int(now) .. '\t' .. ARGV[9])
redis.call('ZADD', KEYS[10], int(score), id)
redis.call('HSET', KEYS[7], flow, ARGV[6])
-- A flow keeps its turn; a more urgent job can only bring it forward.
local turn = tonumber(redis.call('ZSCORE', KEYS[6], flow))
if not turn or score < turn then
  redis.call('ZADD', KEYS[6], int(score), flow)
end
waiting_add(KEYS[11], quotas, 1)
-- One token per job wakes one idle worker; a handful is enough to wake them all.
if redis.call('RPUSH', KEYS[5], 1) > 64 then
  redis.call('LTRIM', KEYS[5], 0, 63)
end
return {1, seq}

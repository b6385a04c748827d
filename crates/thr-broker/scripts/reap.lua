-- reap: takes back the jobs of workers that died (lease expired, or their
-- worker stopped heartbeating) and either puts them back in their place or
-- answers their clients. Any live worker may run it; it is atomic, so two
-- reapers never handle one job twice.
-- KEYS[1]  leases     KEYS[2] jobs       KEYS[3] deadlines  KEYS[4] jobinfo
-- KEYS[5]  owners     hash id -> "worker<TAB>claimed ms"
-- KEYS[6]  pending    KEYS[7] flows      KEYS[8] flowdefs   KEYS[9] waiting
-- KEYS[10] attempts   hash id -> times a worker was lost running it
-- KEYS[11] dead       KEYS[12] dead_reasons                 KEYS[13] wake
-- KEYS[14] workers    sorted set worker -> last heartbeat (ms)
-- ARGV[1] heartbeat timeout ms    ARGV[2] flow key prefix
-- ARGV[3] quota key prefix        ARGV[4] max attempts
-- ARGV[5] safe-to-retry methods, space-separated
-- ARGV[6] reply list lifetime (s)
-- Returns {requeued, answered with 502, set aside in dead letters}.
local now = clock()
local stale = tonumber(ARGV[1])
local max_attempts = tonumber(ARGV[4])
local retry = {}
for m in string.gmatch(ARGV[5], '%S+') do
  retry[m] = true
end
local requeued, answered, buried = 0, 0, 0

-- The JSON metadata of a job frame: "THR" kind version u32-length JSON body.
local function meta_of(job)
  if not job or #job < 9 or string.sub(job, 1, 3) ~= 'THR' then
    return nil
  end
  local b1, b2, b3, b4 = string.byte(job, 6, 9)
  local len = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  local ok, meta = pcall(cjson.decode, string.sub(job, 10, 9 + len))
  if ok and type(meta) == 'table' then
    return meta
  end
  return nil
end

local function forget(id)
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HDEL', KEYS[10], id)
end

local leases = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #leases, 2 do
  local id, until_ms = leases[i], tonumber(leases[i + 1])
  local lost = until_ms <= now
  local owner, claimed = nil, nil
  local held = redis.call('HGET', KEYS[5], id)
  if held then
    owner, claimed = string.match(held, '^([^\t]*)\t?(%d*)')
    claimed = tonumber(claimed)
  end
  if not lost and owner then
    local beat = tonumber(redis.call('ZSCORE', KEYS[14], owner))
    if beat then
      lost = beat < now - stale
    else
      -- No heartbeat on record: a dead worker, or Redis restarted empty
      -- under a live one that has not beaten since. Only a claim older
      -- than the timeout tells them apart.
      lost = (not claimed) or claimed < now - stale
    end
  end
  if lost then
    redis.call('ZREM', KEYS[1], id)
    redis.call('HDEL', KEYS[5], id)
    local job = redis.call('HGET', KEYS[2], id)
    local info = redis.call('HGET', KEYS[4], id)
    local meta = meta_of(job)
    if not meta or not info then
      if job then
        redis.call('HSET', KEYS[11], id, job)
        redis.call('HSET', KEYS[12], id, 'lost by its worker and undecodable')
        buried = buried + 1
      end
      forget(id)
    else
      -- A dead worker cannot release its quota slots: free them now.
      for _, token in ipairs(meta.semaphores or {}) do
        redis.call('ZREM', ARGV[3] .. 'sem:' .. token, id)
      end
      local deadline = tonumber(redis.call('ZSCORE', KEYS[3], id))
      local attempts = redis.call('HINCRBY', KEYS[10], id, 1)
      local waiting = deadline and deadline > now
      local safe = retry[meta.method] == true
      if waiting and safe and attempts < max_attempts then
        -- Back in its place: same score, same flow.
        local prio, score, flow = string.match(info, '^(%d+)\t([^\t]+)\t([^\t]*)\t')
        score = tonumber(score)
        redis.call('ZADD', KEYS[6], int(score), id)
        redis.call('ZADD', ARGV[2] .. flow, int(score), id)
        redis.call('HSET', KEYS[8], flow, meta.flow_def or '')
        local turn = tonumber(redis.call('ZSCORE', KEYS[7], flow))
        if not turn or score < turn then
          redis.call('ZADD', KEYS[7], int(score), flow)
        end
        waiting_add(KEYS[9], parse_def(meta.flow_def), 1)
        if redis.call('RPUSH', KEYS[13], 1) > 64 then
          redis.call('LTRIM', KEYS[13], 0, 63)
        end
        requeued = requeued + 1
      else
        if waiting then
          local text
          if safe then
            text = 'thr: gave up after ' .. attempts .. ' attempts; the worker running it was lost each time\n'
            redis.call('HSET', KEYS[11], id, job)
            redis.call('HSET', KEYS[12], id, 'worker lost ' .. attempts .. ' times')
            buried = buried + 1
          else
            text = 'thr: the worker running this ' .. meta.method ..
              ' request was lost; it may or may not have been applied\n'
          end
          local list = 'thr:{f:' .. meta.front .. '}:replies'
          redis.call('LPUSH', list, reply_frame(id, 502, text, 'reaper', {}))
          redis.call('EXPIRE', list, ARGV[6])
          answered = answered + 1
        end
        forget(id)
      end
    end
  end
end
return {requeued, answered, buried}

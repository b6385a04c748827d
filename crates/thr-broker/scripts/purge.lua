-- purge: cancels waiting jobs of a queue (thrctl purge); their clients get
-- a 503 through their front's reply list.
-- KEYS[1] pending   KEYS[2] jobs   KEYS[3] deadlines   KEYS[4] flows
-- KEYS[5] flowdefs  KEYS[6] jobinfo  KEYS[7] waiting
-- ARGV[1] flow key prefix
-- ARGV[2] only jobs waiting longer than this (ms, 0: any)
-- ARGV[3] only jobs of a priority above (less urgent than) this (0: any)
-- ARGV[4] reply list lifetime (s)
-- Returns the number of jobs purged.
local now = clock()
local older, above = tonumber(ARGV[2]), tonumber(ARGV[3])
local purged = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local info = redis.call('HGET', KEYS[6], id) or ''
  local prio, _, flow, enqueued, front = string.match(info, '^(%d+)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t(.*)$')
  prio, enqueued = tonumber(prio) or 50, tonumber(enqueued) or now
  if (older == 0 or now - enqueued > older) and (above == 0 or prio > above) then
    redis.call('ZREM', KEYS[1], id)
    local quotas = parse_def(redis.call('HGET', KEYS[5], flow or ''))
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
    redis.call('HDEL', KEYS[6], id)
    if flow then
      local fkey = ARGV[1] .. flow
      redis.call('ZREM', fkey, id)
      if redis.call('ZCARD', fkey) == 0 then
        redis.call('ZREM', KEYS[4], flow)
        redis.call('HDEL', KEYS[5], flow)
      end
    end
    waiting_add(KEYS[7], quotas, -1)
    if front and front ~= '' then
      local frame = reply_frame(id, 503, 'thr: request purged by an operator\n', 'thrctl', {{'retry-after', '60'}})
      local list = 'thr:{f:' .. front .. '}:replies'
      redis.call('LPUSH', list, frame)
      redis.call('EXPIRE', list, ARGV[4])
    end
    purged = purged + 1
  end
end
return purged

-- release: a job is done. Pushes its reply to the waiting front's list, then
-- drops its lease, frees its quota slots and rings the doorbell (a blocked
-- flow may now run). One script, so a reply and its release are one round
-- trip, and a worker dying cannot leave one without the other. It also
-- records the job's latency (enqueue to reply, on Redis's clock, so workers'
-- clocks do not matter) for operators' percentiles.
-- KEYS[1] leases   KEYS[2] owners    KEYS[3] jobs   KEYS[4] deadlines
-- KEYS[5] jobinfo  KEYS[6] wake      KEYS[7] the front's reply list
-- KEYS[8] attempts KEYS[9] latency   KEYS[10..] semaphores the job holds
-- ARGV[1] job id   ARGV[2] encoded reply   ARGV[3] reply list lifetime (s)
-- ARGV[4] ms spent at the backend   ARGV[5] latency samples kept
redis.call('LPUSH', KEYS[7], ARGV[2])
redis.call('EXPIRE', KEYS[7], ARGV[3])
local info = redis.call('HGET', KEYS[5], ARGV[1])
if info then
  -- jobinfo: priority, score, flow, enqueued ms, front (tab-separated)
  local enqueued = tonumber(string.match(info, '^[^\t]*\t[^\t]*\t[^\t]*\t([^\t]*)'))
  if enqueued and enqueued > 0 then
    local now, sec = clock()
    local total = math.max(now - enqueued, tonumber(ARGV[4]))
    local keep = tonumber(ARGV[5])
    -- Trimmed in steps of 64, not on every push: one call less per job.
    if redis.call('LPUSH', KEYS[9], sec .. '\t' .. int(total) .. '\t' .. ARGV[4]) > keep + 64 then
      redis.call('LTRIM', KEYS[9], 0, keep - 1)
    end
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1])
for i = 10, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
if redis.call('RPUSH', KEYS[6], 1) > 64 then
  redis.call('LTRIM', KEYS[6], 0, 63)
end
return 1

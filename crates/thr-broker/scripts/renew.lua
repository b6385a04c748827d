-- renew: extends the lease of a running job and of the quota slots it holds.
-- KEYS[1] leases   KEYS[2..] semaphores the job holds
-- ARGV[1] job id   ARGV[2] lease ms
-- Returns 1, or 0 when the job holds no lease any more (it was reaped).
local now = clock()
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  return 0
end
local until_ms = int(now + tonumber(ARGV[2]))
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', until_ms, ARGV[1])
end
return 1

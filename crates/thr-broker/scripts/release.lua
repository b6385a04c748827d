-- release: a job is done (its reply was pushed): drop its lease, free its
-- quota slots, and ring the doorbell, since a blocked flow may now run.
-- KEYS[1] leases   KEYS[2] running   KEYS[3] jobs   KEYS[4] deadlines
-- KEYS[5] jobinfo  KEYS[6] wake      KEYS[7..] semaphores the job holds
-- ARGV[1] job id
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
for i = 7, #KEYS do
  redis.call('ZREM', KEYS[i], ARGV[1])
end
if redis.call('RPUSH', KEYS[6], 1) > 64 then
  redis.call('LTRIM', KEYS[6], 0, 63)
end
return 1

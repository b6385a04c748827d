-- cancel: withdraws a job whose client has been answered or has gone.
-- KEYS[1] pending   KEYS[2] jobs   KEYS[3] deadlines   KEYS[4] flows
-- KEYS[5] flowdefs  KEYS[6] jobinfo  KEYS[7] waiting   KEYS[8] this job's flow
-- ARGV[1] job id    ARGV[2] flow id
-- Returns 1 when the job was still waiting (it will never run), 0 when it
-- was already claimed or gone.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local quotas = parse_def(redis.call('HGET', KEYS[5], ARGV[2]))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
redis.call('ZREM', KEYS[8], ARGV[1])
waiting_add(KEYS[7], quotas, -1)
if redis.call('ZCARD', KEYS[8]) == 0 then
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
end
return 1

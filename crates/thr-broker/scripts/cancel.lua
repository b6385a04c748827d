-- cancel: withdraws a job whose client has been answered or has gone.
-- KEYS[1] pending    KEYS[2] jobs    KEYS[3] deadlines
-- ARGV[1] job id
-- Returns 1 when the job was still waiting (it will never run), 0 when it was
-- already claimed or gone.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  return 1
end
return 0

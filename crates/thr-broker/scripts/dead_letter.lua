-- dead_letter: sets aside a claimed job that cannot be run (an undecodable
-- payload) with the reason, answers its client, settles it and frees its
-- quota slots. Guarded by the lease's token.
-- includes: clock records quota lease
local K_leases, K_owners, K_jobs, K_info = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_dead, K_reasons, K_replies, K_settled = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_held, K_holders = KEYS[9], KEYS[10]
local id, token, reason, answer, reply_ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
-- ARGV[6..] the concurrency tokens the job holds
-- Returns 1, or 0 when the lease is no longer the job's.
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner or owner.token ~= token then
  return 0
end
local now = clock()
local info = info_unpack(redis.call('HGET', K_info, id))
redis.call('HSET', K_dead, id, redis.call('HGET', K_jobs, id) or '')
redis.call('HSET', K_reasons, id, reason)
if info and info.front ~= '' then
  redis.call('LPUSH', K_replies, answer)
  redis.call('EXPIRE', K_replies, reply_ttl)
end
local remember = 1000
if info then
  remember = math.max(remember, info.deadline - now)
end
redis.call('SET', K_settled, 'dead', 'PX', int(remember))
end_running(id, K_leases, K_owners, K_jobs, K_info, K_held, K_holders, {unpack(ARGV, 6)})
return 1

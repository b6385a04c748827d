-- hand_back: a stopping worker gives a running job back; its lease ends now
-- and is no longer anyone's (renew, reply and a repeated claim with its
-- token find nothing), and the next reap treats the job as lost. Guarded
-- by the lease's token.
-- includes: records order
local K_leases, K_owners, K_wake = KEYS[1], KEYS[2], KEYS[3]
local id, token = ARGV[1], ARGV[2]
-- Returns 1, or 0 when the lease is no longer the job's.
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner or owner.token ~= token then
  return 0
end
redis.call('ZADD', K_leases, 'XX', 0, id)
redis.call('HDEL', K_owners, id)
ring(K_wake)
return 1

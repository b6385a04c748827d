-- renew: extends a running job's lease and the quota slots it holds,
-- guarded by the lease's token. A lease whose quota slot was taken back
-- (its deadline passed and another job got the slot) is lost: renewing it
-- would let two jobs run under one slot.
-- includes: clock records
local K_leases, K_owners, K_holders = KEYS[1], KEYS[2], KEYS[3]
local id, token, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
-- ARGV[4..] the concurrency tokens the job holds
-- Returns 1, or 0 when the lease is no longer the job's (reaped, handed
-- back, its slot taken back).
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner or owner.token ~= token then
  return 0
end
for i = 4, #ARGV do
  if not redis.call('ZSCORE', K_holders, ARGV[i] .. '\t' .. id) then
    return 0
  end
end
local now = clock()
local until_ms = int(now + lease)
redis.call('ZADD', K_leases, 'XX', until_ms, id)
for i = 4, #ARGV do
  redis.call('ZADD', K_holders, 'XX', until_ms, ARGV[i] .. '\t' .. id)
end
return 1

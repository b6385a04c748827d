-- put_back: a worker gives back a job it claimed but never started (it
-- held the job for a slot that did not free in time, or it is stopping).
-- The job goes back to its place as if it had never been claimed: its
-- lease ends, its concurrency slots are freed, it is not counted as an
-- attempt, and it may run anywhere, whatever its method (a job handed
-- back with `hand_back` may have run, so only safe methods run again).
-- The rate slots it took at its claim are given back too. Guarded by the lease's
-- token: a lease no longer the job's (reaped, answered) puts nothing back.
-- includes: clock order records quota waiting
-- KEYS[1..6]: the waiting keys (lib/waiting.lua reads flow-jobs, flows and
-- flowdefs by position).
local K_pending, K_info = KEYS[1], KEYS[6]
local K_leases, K_owners, K_wake, K_held = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local K_holders, K_waiting, K_waiting_limits, K_gcra = KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local id, token = ARGV[1], ARGV[2]
-- Returns 1 (waiting again), 0 (the lease is no longer the job's) or -1
-- (its client has given up meanwhile: it is gone).
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner or owner.token ~= token then
  return 0
end
local now = clock()
local info = info_unpack(redis.call('HGET', K_info, id))
local quotas = parse_def(info and info.def)
sem_drop_quotas(K_held, K_holders, quotas, id)
for _, q in ipairs(quotas) do
  if q.interval > 0 then
    gcra_refund(K_gcra, q.token, now, q.interval)
  end
end
redis.call('ZREM', K_leases, id)
redis.call('HDEL', K_owners, id)
if not info or info.deadline <= now then
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', K_info, id)
  return -1
end
redis.call('ZADD', K_pending, int(info.score), id)
enflow(id, info)
waiting_add(K_waiting, K_waiting_limits, quotas, 1)
ring(K_wake)
return 1

-- lib/lease.lua: ending a running job. Its lease, owner, payload and record
-- go, and the quota slots it holds (`holds`, concurrency tokens) are freed.
-- Needs: quota.
local function end_running(id, leases, owners, jobs, info, held, holders, holds)
  redis.call('ZREM', leases, id)
  redis.call('HDEL', owners, id)
  redis.call('HDEL', jobs, id)
  redis.call('HDEL', info, id)
  for _, token in ipairs(holds) do
    sem_drop(held, holders, token, id)
  end
end

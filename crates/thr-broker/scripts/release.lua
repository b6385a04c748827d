-- release: a job is done. Pushes its reply to the waiting front's list,
-- settles the job (a late enqueue of its id is refused), drops its lease,
-- frees its quota slots and, when jobs wait, rings the doorbell (a blocked
-- flow may now run; when none waits, an idle worker is not woken for
-- nothing). Guarded by the lease: repeated (its answer was lost), or called
-- after the job was reaped, it pushes nothing. It also records the job's
-- latency (enqueue to reply, on Redis's clock) for operators' percentiles.
-- includes: clock records quota order lease
local K_leases, K_owners, K_jobs, K_info = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_wake, K_replies, K_latency, K_settled = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_generation, K_held, K_holders, K_flows = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local id, token, frame, reply_ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local backend_ms, keep, generation = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
-- ARGV[8..] the concurrency tokens the job holds
-- Returns 'delivered', 'again' (an earlier call delivered it) or 'lost'
-- (the lease is no longer the job's: whoever took the job answers it).
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner then
  if redis.call('GET', K_settled) == 'answered:' .. token then
    return 'again'
  end
  if redis.call('GET', K_generation) == generation then
    return 'lost'
  end
  -- Redis lost its data under the running job: nobody else can answer it.
  if frame ~= '' then
    redis.call('LPUSH', K_replies, frame)
    redis.call('EXPIRE', K_replies, reply_ttl)
  end
  return 'delivered'
end
if owner.token ~= token then
  return 'lost'
end
local now, sec = clock()
-- An empty frame ends a streamed job: its head went out already.
if frame ~= '' then
  redis.call('LPUSH', K_replies, frame)
  redis.call('EXPIRE', K_replies, reply_ttl)
end
local info = info_unpack(redis.call('HGET', K_info, id))
local remember = 1000
if info then
  remember = math.max(remember, info.deadline - now)
  local total = math.max(now - info.enqueued, backend_ms)
  -- Trimmed in steps of 64, not on every push: one call less per job.
  if redis.call('LPUSH', K_latency, sec .. '\t' .. int(total) .. '\t' .. backend_ms) > keep + 64 then
    redis.call('LTRIM', K_latency, 0, keep - 1)
  end
end
redis.call('SET', K_settled, 'answered:' .. token, 'PX', int(remember))
end_running(id, K_leases, K_owners, K_jobs, K_info, K_held, K_holders, {unpack(ARGV, 8)})
if redis.call('EXISTS', K_flows) == 1 then
  ring(K_wake)
end
return 'delivered'

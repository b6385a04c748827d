-- reap: takes back jobs of lost workers found by reap_scan (phase two). For
-- each, it checks again that the lease is the one found and still lost,
-- then does what the caller decided: put it back in its place, answer its
-- client, or set it aside in the dead letters and answer. Atomic, so two
-- reapers never handle one job twice.
-- includes: clock order records quota liveness lease waiting
-- KEYS[1..6]: the waiting keys (lib/waiting.lua reads flow-jobs, flows and
-- flowdefs by position).
local K_pending = KEYS[1]
local K_jobs, K_info, K_leases, K_owners = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_wake, K_dead, K_reasons, K_waiting = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local K_held, K_holders, K_workers, K_liveness = KEYS[13], KEYS[14], KEYS[15], KEYS[16]
local K_waiting_limits = KEYS[17]
-- KEYS[18 + 2i], KEYS[19 + 2i]: the i-th job's settled marker and its
-- front's reply list (i from 0).
local timeout, reply_ttl = tonumber(ARGV[1]), tonumber(ARGV[2])
-- ARGV[3 + 4i ..]: id, token found, action ('requeue', 'answer', 'bury'),
-- reply frame (for answer and bury).
-- Returns {requeued, answered, buried}.
local now = clock()
local alive = liveness_now(K_liveness, now)
local requeued, answered, buried = 0, 0, 0

-- Ends a lost job that is not put back (its slots are freed already).
local function forget(id)
  end_running(id, K_leases, K_owners, K_jobs, K_info, K_held, K_holders, {})
end

local i = 0
while ARGV[3 + 4 * i] do
  local id, token, action, frame = ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i]
  local K_settled, K_replies = KEYS[18 + 2 * i], KEYS[19 + 2 * i]
  i = i + 1
  local owner = owner_unpack(redis.call('HGET', K_owners, id))
  local until_ms = tonumber(redis.call('ZSCORE', K_leases, id))
  local lost = until_ms ~= nil and ((owner and owner.token or '') == token)
  if lost and until_ms > now then
    lost = owner ~= nil and is_silent(alive,
      tonumber(redis.call('ZSCORE', K_workers, owner.worker)), owner.claimed, now, timeout)
  elseif lost then
    lost = lease_lost(alive, until_ms, now, timeout)
  end
  if lost then
    local info = info_unpack(redis.call('HGET', K_info, id))
    -- A lost worker cannot release its quota slots: free them now.
    local quotas = parse_def(info and info.def)
    sem_drop_quotas(K_held, K_holders, quotas, id)
    if not info or info.deadline <= now then
      -- Nobody waits for it any more.
      forget(id)
    elseif action == 'requeue' then
      redis.call('ZREM', K_leases, id)
      redis.call('HDEL', K_owners, id)
      info.attempts = info.attempts + 1
      redis.call('HSET', K_info, id, info_pack(info))
      redis.call('ZADD', K_pending, int(info.score), id)
      enflow(id, info)
      waiting_add(K_waiting, K_waiting_limits, quotas, 1)
      ring(K_wake)
      requeued = requeued + 1
    else
      if action == 'bury' then
        redis.call('HSET', K_dead, id, redis.call('HGET', K_jobs, id) or '')
        redis.call('HSET', K_reasons, id, 'worker lost ' .. (info.attempts + 1) .. ' times')
        buried = buried + 1
      end
      redis.call('LPUSH', K_replies, frame)
      redis.call('EXPIRE', K_replies, reply_ttl)
      redis.call('SET', K_settled, 'reaped', 'PX', int(math.max(1000, info.deadline - now)))
      answered = answered + 1
      forget(id)
    end
  end
end
return {requeued, answered, buried}

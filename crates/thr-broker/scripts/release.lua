-- release: jobs are done; one call for many (a worker gathers the jobs
-- that finish while its previous call is in flight). For each job: pushes
-- its reply to the waiting front's list, settles it (a late enqueue of its
-- id is refused), drops its lease and frees its quota slots; then, when
-- jobs wait, rings the doorbell once (a blocked flow may now run; when
-- none waits, an idle worker is not woken for nothing). Guarded by each
-- job's lease: repeated (its answer was lost), or called after the job was
-- reaped, it pushes nothing. It also records each job's latency (enqueue
-- to reply, on Redis's clock) for operators' percentiles.
-- Commands shared by the batch (the clock, deletions, the latency samples,
-- the reply lists' expiry, the doorbell) run once per call, not per job.
-- includes: clock records quota order
local K_leases, K_owners, K_jobs, K_info = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local K_wake, K_latency, K_generation, K_held = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local K_holders, K_flows, K_handoff = KEYS[9], KEYS[10], KEYS[11]
-- KEYS[11 + 2i - 1] and KEYS[11 + 2i]: job i's front's reply list and its
-- settled marker.
local reply_ttl, keep = tonumber(ARGV[1]), tonumber(ARGV[2])
-- From ARGV[3], per job: id, token, frame (empty: a streamed job, whose
-- head went out already), backend ms, generation, the number of
-- concurrency tokens it holds, then those tokens.
-- Returns per job 'delivered', 'again' (an earlier call delivered it) or
-- 'lost' (the lease is no longer the job's: whoever took it answers it).
local now, sec = clock()
local sec_s = int(sec)
local out, ended, samples = {}, {}, {}
local frames, lists = {}, {} -- reply frames per list, lists in first-push order
local done = {}               -- ids settled by this call (a job repeated in it)

local function push(list, frame)
  if frame == '' then
    return
  end
  if not frames[list] then
    frames[list] = {}
    lists[#lists + 1] = list
  end
  local f = frames[list]
  f[#f + 1] = frame
end

-- Where each job's arguments start; then every job's owner and record in
-- one read each.
local starts, ids = {}, {}
local a = 3
while a <= #ARGV do
  starts[#starts + 1] = a
  ids[#ids + 1] = ARGV[a]
  a = a + 6 + tonumber(ARGV[a + 5])
end
if #ids == 0 then
  return out
end
local owners = redis.call('HMGET', K_owners, unpack(ids))
local infos = redis.call('HMGET', K_info, unpack(ids))

for i, a in ipairs(starts) do
  local id, token, frame = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local backend_ms, generation, nholds = tonumber(ARGV[a + 3]), ARGV[a + 4], tonumber(ARGV[a + 5])
  local first_hold = a + 6
  local K_replies, K_settled = KEYS[11 + 2 * i - 1], KEYS[11 + 2 * i]
  local owner = not done[id] and owner_unpack(owners[i] or nil)
  if done[id] then
    -- Settled earlier in this call (its deletions come at the end).
    out[i] = done[id] == token and 'again' or 'lost'
  elseif not owner then
    if redis.call('GET', K_settled) == 'answered:' .. token then
      out[i] = 'again'
    elseif redis.call('GET', K_generation) == generation then
      out[i] = 'lost'
    else
      -- Redis lost its data under the running job: nobody else can answer it.
      push(K_replies, frame)
      out[i] = 'delivered'
    end
  elseif owner.token ~= token then
    out[i] = 'lost'
  else
    push(K_replies, frame)
    local info = info_unpack(infos[i] or nil)
    local remember = 1000
    if info then
      remember = math.max(remember, info.deadline - now)
      local total = math.max(now - info.enqueued, backend_ms)
      samples[#samples + 1] = sec_s .. '\t' .. int(total) .. '\t' .. ARGV[a + 3]
    end
    redis.call('SET', K_settled, 'answered:' .. token, 'PX', int(remember))
    for h = first_hold, first_hold + nholds - 1 do
      sem_drop(K_held, K_holders, ARGV[h], id)
    end
    ended[#ended + 1] = id
    done[id] = token
    out[i] = 'delivered'
  end
end

for _, list in ipairs(lists) do
  redis.call('LPUSH', list, unpack(frames[list]))
  redis.call('EXPIRE', list, reply_ttl)
end
if #samples > 0 then
  -- Trimmed in steps of 64, not on every push.
  if redis.call('LPUSH', K_latency, unpack(samples)) > keep + 64 then
    redis.call('LTRIM', K_latency, 0, keep - 1)
  end
end
if #ended > 0 then
  redis.call('ZREM', K_leases, unpack(ended))
  redis.call('HDEL', K_owners, unpack(ended))
  redis.call('HDEL', K_jobs, unpack(ended))
  redis.call('HDEL', K_info, unpack(ended))
  -- Jobs wait in flows, or one was handed off (it may have waited for
  -- max_inflight_total).
  if redis.call('EXISTS', K_flows, K_handoff) > 0 then
    ring(K_wake)
  end
end
return out

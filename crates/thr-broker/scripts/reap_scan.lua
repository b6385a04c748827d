#!lua flags=no-writes
-- reap_scan: finds the jobs of lost workers (phase one of reaping; the
-- reap script acts on what it finds, checking again). A lease is lost when
-- its deadline passed, or when its worker is silent — silence counted so
-- that a paused Redis never makes a live worker look dead.
-- includes: clock records liveness
local K_leases, K_owners, K_info, K_workers, K_liveness = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local timeout, limit, cursor = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
-- ARGV[3] HSCAN cursor over owners ('0' to start).
-- Returns {next cursor ('0': done), id, token, method, attempts, front,
-- streaming ('1': its response head went out), ...}.
local now = clock()
local alive = liveness_now(K_liveness, now)
local out = {'0'}
local seen = {}

local function add(id, owner)
  if seen[id] or #out >= 1 + 6 * limit then
    return
  end
  local info = info_unpack(redis.call('HGET', K_info, id))
  seen[id] = true
  out[#out + 1] = id
  out[#out + 1] = owner and owner.token or ''
  out[#out + 1] = info and info.method or ''
  out[#out + 1] = info and tostring(info.attempts) or '-1'
  out[#out + 1] = info and info.front or ''
  out[#out + 1] = (owner and owner.streaming) and '1' or '0'
end

if lease_lost(alive, 0, now, timeout) then
  for _, id in ipairs(redis.call('ZRANGE', K_leases, '-inf', now, 'BYSCORE', 'LIMIT', 0, limit)) do
    add(id, owner_unpack(redis.call('HGET', K_owners, id)))
  end
end

-- Jobs of silent workers (or of workers never heard of): one page of
-- owners per call, the caller keeping the cursor between calls.
local page = redis.call('HSCAN', K_owners, cursor, 'COUNT', 200)
out[1] = page[1]
local fields = page[2]
for i = 1, #fields, 2 do
  local owner = owner_unpack(fields[i + 1])
  if owner then
    local beat = tonumber(redis.call('ZSCORE', K_workers, owner.worker))
    if is_silent(alive, beat, owner.claimed, now, timeout) then
      add(fields[i], owner)
    end
  end
end
return out

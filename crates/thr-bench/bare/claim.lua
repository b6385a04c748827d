-- The bare lifecycle's claim: the most urgent jobs, leased to the caller's
-- token, returned with their payloads.
-- KEYS: pending, jobs, leases, owners. ARGV: token, most jobs.
-- Returns id, payload, id, payload...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local popped = redis.call('ZPOPMIN', KEYS[1], tonumber(ARGV[2]))
if #popped == 0 then
  return {}
end
local until_ms = string.format('%d', now + 60000)
local ids, leases, owners = {}, {}, {}
for i = 1, #popped, 2 do
  local id = popped[i]
  ids[#ids + 1] = id
  leases[#leases + 1] = until_ms
  leases[#leases + 1] = id
  owners[#owners + 1] = id
  owners[#owners + 1] = ARGV[1]
end
redis.call('ZADD', KEYS[3], unpack(leases))
redis.call('HSET', KEYS[4], unpack(owners))
local frames = redis.call('HMGET', KEYS[2], unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  out[2 * i - 1] = id
  out[2 * i] = frames[i]
end
return out

#!lua flags=no-writes
-- job_states: where each job is, for a front auditing its waiting clients
-- after a fault (it was silent too long, or Redis lost its data).
-- includes: (none)
-- KEYS[1] pending  KEYS[2] info  KEYS[3..] settled marker of each job
-- ARGV[1..] job ids (same order as their settled markers)
-- Returns one letter per job: w(aiting) r(unning) s(ettled) u(nknown).
local K_pending, K_info = KEYS[1], KEYS[2]
local out = {}
for i, id in ipairs(ARGV) do
  local state = 'u'
  if redis.call('ZSCORE', K_pending, id) then
    state = 'w'
  elseif redis.call('HEXISTS', K_info, id) == 1 then
    state = 'r'
  elseif redis.call('EXISTS', KEYS[i + 2]) == 1 then
    state = 's'
  end
  out[i] = state
end
return out

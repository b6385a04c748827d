-- lib/order.lua: the order of waiting jobs (thr_core::priority) and the
-- members of flow_jobs (protocol::records::flow_member).

local SPACE = 70368744177664 -- 2^46, thr_core::priority::SEQUENCE_SPACE

-- Order of a job (or of a flow's turn): strict priority then FIFO, or, with
-- aging (step > 0), arrival time plus (priority - 1) steps.
local function order_score(prio, seq, now, step)
  if step > 0 then
    return (now + (prio - 1) * step) * 1024 + (seq % 1024)
  end
  return prio * SPACE + (seq % SPACE)
end

-- `flow<TAB>score<TAB>id`, the score zero-padded so members sort by score
-- (`score` a number, or as `int` printed it).
local function flow_member(flow, score, id)
  local s = int(score)
  return flow .. '\t' .. string.rep('0', 16 - #s) .. s .. '\t' .. id
end

-- The first `count` (default 1) waiting members of `flow` in flow_jobs,
-- in order: the first (nil when none) and the list.
-- (Flow ids hold no control character: every member of the flow lies
-- between `flow<TAB>` and `flow<LF>`.)
local function flow_head(key, flow, count)
  local m = redis.call('ZRANGE', key, '[' .. flow .. '\t', '(' .. flow .. '\n', 'BYLEX', 'LIMIT', 0, count or 1)
  return m[1], m
end

-- The job id of a flow_jobs member (its score is read from the job's
-- record: parsing it here would cost every member a number).
local function member_id(member)
  return string.match(member, '\t%d+\t(.*)$')
end

-- Rings the doorbell `count` times (default once): one token per job
-- wakes one idle worker; a handful is enough to wake them all. Trimmed back
-- to 64 once past 128, so that a busy queue pays the trim once per 64
-- rings, not on every one.
-- Tokens are the string '1', not the number: Redis prints every number
-- argument of redis.call with printf, and an enqueue rings once per job.
local function ring(wake, count)
  local tokens = {}
  for i = 1, math.min(count or 1, 64) do
    tokens[i] = '1'
  end
  if redis.call('RPUSH', wake, unpack(tokens)) > 128 then
    redis.call('LTRIM', wake, 0, 63)
  end
end

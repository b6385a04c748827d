-- lib/records.lua: the Lua twin of protocol::records (same fields, same
-- order; the e2e test protocol::lua_and_rust_read_records_alike checks it).

-- JobInfo: "2 prio score flow enqueued deadline front method attempts def".
-- Numbers may come printed already (see `int`).
local function info_pack(i)
  return '2\t' .. int(i.prio) .. '\t' .. int(i.score) .. '\t' .. i.flow .. '\t' .. int(i.enqueued) .. '\t' ..
    int(i.deadline) .. '\t' .. i.front .. '\t' .. i.method .. '\t' .. int(i.attempts) .. '\t' .. i.def
end

local function info_unpack(s)
  if not s then
    return nil
  end
  local v, prio, score, flow, enq, deadline, front, method, attempts, def = string.match(s,
    '^(%d+)\t(%d+)\t(%d+)\t([^\t]*)\t(%d+)\t(%d+)\t([^\t]*)\t([^\t]*)\t(%d+)\t([^\t]*)$')
  if v ~= '2' then
    return nil
  end
  return {
    prio = tonumber(prio), score = tonumber(score), flow = flow, enqueued = tonumber(enq),
    deadline = tonumber(deadline), front = front, method = method, attempts = tonumber(attempts),
    def = def,
  }
end

-- Owner: "worker token claimed_ms", then "\ts" once the job's response
-- head went out (it streams: it can no longer run again).
local function owner_unpack(s)
  if not s then
    return nil
  end
  local worker, token, claimed, streaming = string.match(s, '^([^\t]*)\t([^\t]*)\t(%d+)(\t?s?)$')
  if not worker or (streaming ~= '' and streaming ~= '\ts') then
    return nil
  end
  return { worker = worker, token = token, claimed = tonumber(claimed), streaming = streaming == '\ts' }
end

local function owner_pack(o)
  local s = o.worker .. '\t' .. o.token .. '\t' .. int(o.claimed)
  if o.streaming then
    s = s .. '\ts'
  end
  return s
end

-- FlowDef: quotas separated by ';', each "token max_concurrent interval_ms burst max_waiting".
local function parse_def(def)
  local quotas = {}
  if not def then
    return quotas
  end
  for part in string.gmatch(def, '[^;]+') do
    local tok, maxc, interval, burst, maxw =
      string.match(part, '^(%S+) (%S+) (%S+) (%S+) (%S+)$')
    if tok then
      quotas[#quotas + 1] = {
        token = tok, max = tonumber(maxc), interval = tonumber(interval),
        burst = tonumber(burst), maxw = tonumber(maxw),
      }
    end
  end
  return quotas
end

-- lib/records.lua: the Lua twin of protocol::records (same fields, same
-- order; the e2e test protocol::lua_and_rust_read_records_alike checks it).
-- JobInfo and Owner are MessagePack values one after the other, led by
-- their version (3): one C call reads them all, numbers as numbers. Their
-- numbers are whole and below 2^53, so exact as Lua numbers.

local RECORD_VERSION = 3

-- JobInfo: prio score flow enqueued deadline front method attempts def.
local function info_pack(i)
  return cmsgpack.pack(RECORD_VERSION, i.prio, i.score, i.flow, i.enqueued, i.deadline, i.front, i.method,
    i.attempts, i.def)
end

-- True when `s` starts with this version's tag (0x03, a one-byte integer
-- 3: no text record starts so), so that nothing else is unpacked.
local function is_record(s)
  return s and string.byte(s, 1) == RECORD_VERSION
end

local function info_unpack(s)
  if not is_record(s) then
    return nil
  end
  local _, prio, score, flow, enq, deadline, front, method, attempts, def = cmsgpack.unpack(s)
  if type(def) ~= 'string' then
    return nil
  end
  return {
    prio = prio, score = score, flow = flow, enqueued = enq, deadline = deadline, front = front,
    method = method, attempts = attempts, def = def,
  }
end

-- Owner: worker token claimed_ms streaming (its response head went out: it
-- can no longer run again).
local function owner_unpack(s)
  if not is_record(s) then
    return nil
  end
  local _, worker, token, claimed, streaming = cmsgpack.unpack(s)
  if type(streaming) ~= 'boolean' then
    return nil
  end
  return { worker = worker, token = token, claimed = claimed, streaming = streaming }
end

local function owner_pack(o)
  return cmsgpack.pack(RECORD_VERSION, o.worker, o.token, o.claimed, o.streaming == true)
end

-- FlowDef: quotas separated by ';', each "token max_concurrent interval_ms burst max_waiting".
local function parse_def(def)
  local quotas = {}
  if not def or def == '' then
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

-- Offer: worker lease_ms max_inflight_total methods (the methods whose jobs
-- it may be handed: space-separated, e.g. "GET HEAD").
local function offer_unpack(s)
  if not is_record(s) then
    return nil
  end
  local _, worker, lease, total, methods = cmsgpack.unpack(s)
  if type(methods) ~= 'string' then
    return nil
  end
  return { worker = worker, lease = lease, total = total, methods = methods }
end

-- True when `method` is one of `methods` (space-separated, as in an Offer:
-- the methods a job may have to be leased before it runs, since only those
-- run again when the worker holding it is lost).
local function method_in(methods, method)
  return string.find(' ' .. methods .. ' ', ' ' .. method .. ' ', 1, true) ~= nil
end

-- Handed: generation id frame ms_left front def, what a claim answers for
-- one job, pushed to the list of the offer that took it.
local function handed_pack(gen, id, frame, left, front, def)
  return cmsgpack.pack(RECORD_VERSION, gen, id, frame, left, front, def)
end

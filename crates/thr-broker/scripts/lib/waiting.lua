-- lib/waiting.lua: putting a waiting job in its flow, and removing one from
-- its queue. Every script that queues or unqueues jobs takes the queue's
-- waiting-job keys as KEYS[1..6]
-- (pending, flow_jobs, flows, flowdefs, jobs, info), in that order:
-- protocol::scripts::waiting_keys is the one place that lists them.
-- Needs: order, records, quota.

-- Removes waiting job `id` (its record `info`) and its flow when it was the
-- flow's last; counts it out of its quotas' waits.
local function unqueue(id, info, waiting, by_limit)
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], flow_member(info.flow, info.score, id))
  redis.call('HDEL', KEYS[5], id)
  redis.call('HDEL', KEYS[6], id)
  waiting_add(waiting, by_limit, parse_def(info.def), -1)
  if not flow_head(KEYS[2], info.flow) then
    redis.call('ZREM', KEYS[3], info.flow)
    redis.call('HDEL', KEYS[4], info.flow)
  end
end

-- Puts waiting job `id` (its record `info`; it is in `pending` already) in
-- its flow: its member in flow_jobs, its flow's definition, and the flow's
-- turn brought forward to the job's place when that is sooner.
local function enflow(id, info)
  redis.call('ZADD', KEYS[2], 0, flow_member(info.flow, info.score, id))
  redis.call('HSETNX', KEYS[4], info.flow, info.def)
  redis.call('ZADD', KEYS[3], 'LT', int(info.score), info.flow)
end

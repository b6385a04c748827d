#!lua flags=no-writes
-- stats: a queue's waiting count and drain rate, the same figures the
-- enqueue script refuses by (one definition of the drain rate).
-- includes: clock drain
local K_pending, K_drained = KEYS[1], KEYS[2]
-- Returns {waiting, jobs started per second over the last minute}.
local _, sec = clock()
return {redis.call('ZCARD', K_pending), tostring(drain_rate(K_drained, sec))}

-- stream_head: a running job's response head goes to its front, ahead of
-- a body that follows in pieces (push_pieces). Guarded by the lease, and
-- pushed once however often it is asked. From then on the job is marked
-- streaming in its owner record: if its worker is lost it cannot run
-- again (its client has a head already), its stream is aborted instead.
-- includes: clock records
local K_owners, K_replies, K_state = KEYS[1], KEYS[2], KEYS[3]
local id, token, frame, reply_ttl, stream_ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
-- Returns 'delivered', 'again' (an earlier call pushed it) or 'lost'.
local owner = owner_unpack(redis.call('HGET', K_owners, id))
if not owner or owner.token ~= token then
  return 'lost'
end
if owner.streaming then
  return 'again'
end
owner.streaming = true
redis.call('HSET', K_owners, id, owner_pack(owner))
redis.call('HSET', K_state, 'head', 0, 'next', 0)
redis.call('PEXPIRE', K_state, stream_ttl)
redis.call('LPUSH', K_replies, frame)
redis.call('EXPIRE', K_replies, reply_ttl)
return 'delivered'

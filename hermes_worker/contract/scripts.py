"""Every Lua script the service runs, beside the key layout they work on (``store.py``).

Each script is one atomic step of a job's life, so no two parties can interleave inside it:

* producers: :data:`SUBMIT`, :data:`CANCEL`, :data:`REQUEUE`;
* a delivery: :data:`DELIVERY` (count it, refuse a forged body) before anything else runs;
* an attempt: :data:`CLAIM`, then every write under the lease token (:data:`WRITE`: a
  worker that lost its lease writes nothing), :data:`RENEW` (every lease of a worker in one
  call), :data:`RELEASE`;
* the end of retries: :data:`DEAD_LETTER`;
* the Celery queue: :data:`TAKE_MORE` (a burst of messages in one call) and
  :data:`RESTORE` (a dead worker's message back on its queue, see ``worker/reaper.py``);
* the gateway's tenant quotas: :data:`ADMIT_REQUEST` (requests per minute) and
  :data:`ADMIT_JOB` (jobs waiting), on the keys of ``gateway/tenants.py``.

Record fields (``store.py``) are named here as bare strings: the scripts are the places that
write them. Each script's KEYS and ARGV are documented above it; the Python that calls it
lives beside its caller.
"""

from __future__ import annotations

from hermes_worker.contract.jobs import TERMINAL_STATUSES
from hermes_worker.contract.store import (
    ENDS_MAXLEN,
    ENDS_TTL_S,
    NOTICE_CARRY_BYTES,
    NOTICE_CARRY_FIELDS,
    NOTICES_MAXLEN,
    NOTICES_SUFFIX,
)

# A Lua table literal of the terminal statuses: {'cancelled', 'expired', ...}.
ENDED = "{" + ", ".join(f"'{status.value}'" for status in sorted(TERMINAL_STATUSES)) + "}"

# The seq of the last event in KEYS[n] (0 when the stream is empty), as a Lua function.
_LAST_SEQ = (
    """
local function last_seq(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if last[1] then
    local fields = last[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'seq' then return tonumber(fields[i + 1]) end
    end
  end
  return 0
end
local function ended(status)
  for _, name in ipairs("""
    + ENDED
    + """) do
    if status == name then return true end
  end
  return false
end
"""
)

# Appends a job's id to its ends stream, trimmed to about ENDS_MAXLEN entries: the one
# wake-up of the job's result waiters. Every script that ends a job calls it in the same
# call as the record's terminal status, so a waiter cannot miss it between the two
# (docs/wire-protocol.md, "Waiting for a result"). The stream is the one the record's
# ``ends`` field names (the submitting client's own, store.Keys.ends_for: only the processes
# that await the job wake), kept ENDS_TTL_S after this end; else, and whenever that field
# is not a client's ends stream of this deployment (``shared`` .. ':' ..), or the append to
# it fails (not a stream, refused by the ACL), the deployment's shared stream ``shared``
# (store.Keys.ends, a declared KEY). So a record can only make a script write a stream of
# ends, and a job of another producer, without the field, ends as it always did. Returns
# the client's own ends stream the record names (nil: none), for notify_written.
_NOTIFY_END = f"""
local function notify_end(shared, record, id)
  local own = redis.call('HGET', record, 'ends')
  if not (own and #own > #shared + 1 and string.sub(own, 1, #shared + 1) == shared .. ':') then
    own = nil
  end
  if own then
    local added = redis.pcall('XADD', own, 'MAXLEN', '~', '{ENDS_MAXLEN}', '*', 'id', id)
    if type(added) ~= 'table' or not added.err then
      redis.call('EXPIRE', own, '{ENDS_TTL_S}')
      return own
    end
  end
  redis.call('XADD', shared, 'MAXLEN', '~', '{ENDS_MAXLEN}', '*', 'id', id)
  return own
end
"""

# Notices: a script that writes jobs' events streams names those jobs, after their events
# and in the same call, on the notice stream of each job's client (store.Keys.notices: its
# own ends stream's name and ':written'), one entry per client, field ``ids`` (the job ids,
# space-separated). A client's hub so blocks on that one stream rather than on the stream
# of every job it follows, and then reads only the streams named (producers/hub.py).
# WRITE's notices also carry the events they announce, one field each, named
# '<job id> <entry id> <seq> <type>' (see store.NOTICE_CARRY_BYTES), its value the event's
# data: a hub that has read a job's stream up to the seq before them takes them from the
# notice and reads no stream (no second round trip a wake). A job's events go whole or not
# at all: not when they hold more than NOTICE_CARRY_BYTES of data, nor past
# NOTICE_CARRY_FIELDS fields in one entry (Lua's unpack has a limit); it is named all the
# same, and its stream is read.
# ``notice`` gathers (ids, order: the streams in first-seen order; carried: the fields of
# each stream's entry), ``send_notices`` writes them; a notice refused (not a stream, the
# ACL) is dropped: a hub reads the streams it follows now and then besides.
# ``notify_written``: one job, on the notice stream beside ``own``, the client's ends
# stream its record names (what notify_end returned; nil: none, another producer's job
# gets no notice). (WRITE passes each job's notice stream instead, found by the worker at
# its claim: no record read per job and flush.)
_NOTIFY_WRITTEN = f"""
local function notice(ids, order, carried, key, id, fields)
  if not ids[key] then
    ids[key] = {{}}
    carried[key] = {{}}
    order[#order + 1] = key
  end
  table.insert(ids[key], id)
  if fields and #carried[key] + #fields <= {NOTICE_CARRY_FIELDS} then
    for _, field in ipairs(fields) do table.insert(carried[key], field) end
  end
end
local function send_notices(ids, order, carried)
  for _, key in ipairs(order) do
    local added = redis.pcall('XADD', key, 'MAXLEN', '~', '{NOTICES_MAXLEN}', '*',
                              'ids', table.concat(ids[key], ' '), unpack(carried[key]))
    if type(added) ~= 'table' or not added.err then
      redis.call('EXPIRE', key, '{ENDS_TTL_S}')
    end
  end
end
local function notify_written(own, id)
  if own then
    local ids, order, carried = {{}}, {{}}, {{}}
    notice(ids, order, carried, own .. '{NOTICES_SUFFIX}', id)
    send_notices(ids, order, carried)
  end
end
"""

# Redis's now as unix seconds with six decimals, the way the record's times are written
# (a Lua number would print four): the one clock every host shares (contract/clock.py).
_NOW = """
local function now_text()
  local t = redis.call('TIME')
  return t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
end
"""

# --- producers -----------------------------------------------------------------------------

# KEYS: the job record, the queue list. ARGV: the producer's now (not recorded; kept so
# that the ARGV stay as they were), the body JSON, the TTL of a live job's keys, the job's
# Celery message (contract.queue.job_message), the body's digest (body_digest), and
# optionally the tenant that submits it (the gateway's; recorded as ``tenant``; '' for none)
# and the submitting client's own ends stream (store.Keys.ends_for; recorded as ``ends``:
# the job's end goes there, see notify_end). Queues the
# message and records the job, ``queued_at`` on Redis's clock (a producer's own may be off,
# and a job's ``timeout_s`` counts from it); a known id is neither queued nor recorded
# again. The message goes first: a script that fails half way keeps what it wrote, and a
# message without a record is a job from a plain Celery client (it runs), where a record
# without a message would be a job that never runs.
SUBMIT = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', '0',
           'queued_at', now_text(), 'body', ARGV[2], 'digest', ARGV[5])
if ARGV[6] and ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'tenant', ARGV[6]) end
if ARGV[7] and ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'ends', ARGV[7]) end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: job record, events stream, the deployment's ends stream (Keys.ends: the job's end
# goes to its record's own ends stream, else there; see notify_end). ARGV: now, result_ttl_s,
# the JobResult JSON for a queued job, the job id, the cancel channel, the cancelled event's
# data JSON.
# Returns {outcome, status before}: outcome is not_found, ended, cancelled or cancelling.
CANCEL = (
    _LAST_SEQ
    + _NOTIFY_END
    + _NOTIFY_WRITTEN
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  if redis.call('EXISTS', KEYS[1]) == 0 then return {'not_found', ''} end
  status = 'queued'
end
if ended(status) then return {'ended', status} end
redis.call('HSET', KEYS[1], 'cancel_requested', ARGV[1])
if status ~= 'queued' then
  redis.call('PUBLISH', ARGV[5], ARGV[4])
  return {'cancelling', status}
end
local seq = last_seq(KEYS[2]) + 1
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'result', ARGV[3])
redis.call('XADD', KEYS[2], '*', 'seq', tostring(seq), 'type', 'cancelled', 'data', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
notify_written(notify_end(KEYS[3], KEYS[1], ARGV[4]), ARGV[4])
return {'cancelled', status}
"""
)

# KEYS: dead letters, the job's record, events and lease, the queue list of its priority.
# ARGV: job id, the TTL of a live job's keys, the job's Celery message (job_message) and the
# body it was built from. Returns {outcome, detail}: not_in_dlq; not_found or not_failed
# (status) for a stale id, which is taken off the list; leased (a live lease: never reset a
# running job); changed (the stored body is not that one: read it again) or requeued. Only a
# failed job is put back. The message goes first, as in a submit: a script that fails there
# has changed nothing, so the job is still a dead letter and requeue can be run again; after
# it, nothing can be lost between the dead letters and the queue.
REQUEUE = """
if not redis.call('LPOS', KEYS[1], ARGV[1]) then return {'not_in_dlq', ''} end
local rec = redis.call('HMGET', KEYS[2], 'status', 'body')
if not rec[2] then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return {'not_found', ''}
end
if rec[1] ~= 'failed' then
  redis.call('LREM', KEYS[1], 0, ARGV[1])
  return {'not_failed', rec[1] or 'queued'}
end
if redis.call('EXISTS', KEYS[4]) == 1 then return {'leased', ''} end
if rec[2] ~= ARGV[4] then return {'changed', ''} end
redis.call('LPUSH', KEYS[5], ARGV[3])
redis.call('LREM', KEYS[1], 0, ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'queued', 'attempts', '0', 'requeued', '1',
           'deliveries', '0')
redis.call('HDEL', KEYS[2], 'result', 'finished_at', 'cancel_requested')
redis.call('EXPIRE', KEYS[2], ARGV[2])
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[2]) end
return {'requeued', ''}
"""

# --- a delivery ----------------------------------------------------------------------------

# KEYS: the job record. ARGV: the delivered body's digest (body_digest), the most
# deliveries a job may have (HERMES_MAX_DELIVERIES), the TTL of a live job's keys.
# Run first for every delivered message, before the body is even validated: a message that
# kills its worker is still counted. Returns {outcome, detail}:
# * ended (status): the job has ended; nothing is counted;
# * mismatch: the record holds another body (a forged message, or a foreign producer that
#   wrote the same body differently: the caller compares the bodies themselves);
# * poison (deliveries): over the limit; ok (deliveries): run it.
# A job without a record (a plain Celery client's) is counted in a record made for it.
# A delivery that ends cleanly without ending the job (a retry, a hand-back) takes its
# count back (:data:`UNCOUNT`), so the count is of deliveries that never came back.
DELIVERY = (
    _LAST_SEQ
    + """
local rec = redis.call('HMGET', KEYS[1], 'status', 'digest')
if rec[1] and ended(rec[1]) then return {'ended', rec[1]} end
local known = rec[2]
if not known then
  local body = redis.call('HGET', KEYS[1], 'body')
  if body then known = redis.sha1hex(body) end
end
if known and known ~= ARGV[1] then return {'mismatch', ''} end
local count = redis.call('HINCRBY', KEYS[1], 'deliveries', 1)
if redis.call('TTL', KEYS[1]) < 0 then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
if count > tonumber(ARGV[2]) then return {'poison', tostring(count)} end
return {'ok', tostring(count)}
"""
)

# KEYS: the job record. A delivery that ended without ending its job takes its count back.
UNCOUNT = """
if redis.call('HGET', KEYS[1], 'deliveries') then
  local left = redis.call('HINCRBY', KEYS[1], 'deliveries', -1)
  if left < 0 then redis.call('HSET', KEYS[1], 'deliveries', '0') end
end
return 1
"""

# --- an attempt ----------------------------------------------------------------------------

# KEYS: job record, lease, events. ARGV: lease token, lease TTL (ms), the worker's now (not
# recorded; kept so that the ARGV stay as they were), worker name, the TTL of a live job's
# keys. Returns {'ended', status}, {'leased', lease ms left} or {'claimed', attempt,
# queued_at, last seq, cancel_requested, tenant, started_at, now, ends} (``ends``: the
# record's field, where the worker finds the job's notice stream). ``started_at`` (and
# ``queued_at`` of a job without a record) are Redis's now; ``now`` lets the worker measure
# its offset from Redis's clock (contract/clock.py) for the times it writes later. Sent
# again with the same token when a reply was lost, it finds its own lease and answers with
# the same attempt, started when the first claim started it.
CLAIM = (
    _LAST_SEQ
    + _NOW
    + """
local now = now_text()
local rec = redis.call('HMGET', KEYS[1], 'status', 'queued_at', 'cancel_requested',
                       'attempts', 'requeued', 'tenant', 'started_at', 'ends')
local status = rec[1]
if status and ended(status) then return {'ended', status} end
local before = tonumber(rec[4] or '0') or 0
local queued_at = rec[2] or now
local started_at = now
if redis.call('GET', KEYS[2]) == ARGV[1] then
  -- Our own claim again: the reply to the first one was lost (a timeout). Same attempt.
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  before = math.max(before - 1, 0)
  started_at = rec[7] or now
elseif not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'leased', tostring(redis.call('PTTL', KEYS[2]))}
else
  redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', now, 'worker', ARGV[4],
             'attempts', tostring(before + 1), 'queued_at', queued_at)
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
-- Events exist only after an earlier attempt (or before a requeue): continue their seq.
local seq = 0
if before > 0 or rec[5] then seq = last_seq(KEYS[3]) end
return {'claimed', tostring(before + 1), queued_at, tostring(seq), rec[3] or '',
        rec[6] or '', started_at, now, rec[8] or ''}
"""
)

# KEYS: the deployment's ends stream (Keys.ends), then for each job its lease, record and
# events stream. ARGV: the
# TTL of an ended job's keys, then for each job, in KEYS' order: its lease token, its notice
# stream ('' for none), the number of arguments of its operations, and its operations, in
# order:
#   'x' seq type data            XADD one event
#   'h' n field value ...        HSET n fields of the record
#   'e' id                       the job ended: its record and stream expire, its lease is
#                                dropped (the attempt is over: no RELEASE call after it),
#                                and its id goes on its ends stream (its result waiters
#                                wake: the record's own stream, else KEYS[1]; see notify_end)
# The jobs whose events streams it wrote are then named on their notice streams, one entry
# per stream, with the events written (see _NOTIFY_WRITTEN; the job id is the record key
# after its prefix: KEYS[1] without 'ends', then 'job:').
# One call writes for every job a worker's flush holds: one command, not one per job (each
# call costs Redis more than the few writes a job's flush makes). Nothing of a job is
# written unless its lease still holds the token: a worker that lost its job (paused past
# its lease, cut off from Redis) can neither stream into nor end a job that another worker
# runs now. Returns a flag per job: 1 (written) or 0 (fenced off). A full Redis lets it
# write all the same: the overshoot is bounded by the running jobs, while submits and
# claims stay refused, so a full Redis drains itself rather than wedging.
WRITE = (
    _NOTIFY_END
    + _NOTIFY_WRITTEN
    + f"""
local out = {{}}
local dirty = false
local ids, order, carried = {{}}, {{}}, {{}}
local skip = #KEYS[1] - #'ends' + #'job:'
local a = 2
for j = 0, (#KEYS - 1) / 3 - 1 do
  local lease, record, events = KEYS[2 + 3 * j], KEYS[3 + 3 * j], KEYS[4 + 3 * j]
  local last = a + 2 + tonumber(ARGV[a + 2])
  if redis.call('GET', lease) ~= ARGV[a] then
    out[j + 1] = 0
  else
    out[j + 1] = 1
    local wrote = false
    local id = string.sub(record, skip + 1)
    -- The events written, for the notice (nil: none goes there, too much data).
    local fields = nil
    if ARGV[a + 1] ~= '' then fields = {{}} end
    local bulk = 0
    if not dirty then
      -- A write that needs no memory first: a full Redis (noeviction) then lets the script
      -- finish, so a running job can still write its end, and the memory it holds can expire.
      redis.call('HDEL', record, '')
      dirty = true
    end
    local i = a + 3
    while i <= last do
      local op = ARGV[i]
      if op == 'x' then
        local entry = redis.call('XADD', events, '*', 'seq', ARGV[i + 1], 'type', ARGV[i + 2],
                                 'data', ARGV[i + 3])
        wrote = true
        if fields then
          bulk = bulk + #ARGV[i + 3]
          if bulk > {NOTICE_CARRY_BYTES} then
            fields = nil
          else
            fields[#fields + 1] = id .. ' ' .. entry .. ' ' .. ARGV[i + 1] .. ' ' .. ARGV[i + 2]
            fields[#fields + 1] = ARGV[i + 3]
          end
        end
        i = i + 4
      elseif op == 'h' then
        local n = tonumber(ARGV[i + 1])
        redis.call('HSET', record, unpack(ARGV, i + 2, i + 1 + 2 * n))
        i = i + 2 + 2 * n
      else
        redis.call('EXPIRE', record, ARGV[1])
        redis.call('EXPIRE', events, ARGV[1])
        redis.call('DEL', lease)
        notify_end(KEYS[1], record, ARGV[i + 1])
        i = i + 2
      end
    end
    if wrote and ARGV[a + 1] ~= '' then
      notice(ids, order, carried, ARGV[a + 1], id, fields)
    end
  end
  a = last + 1
end
send_notices(ids, order, carried)
return out
"""
)

# KEYS: n leases, then the n jobs' records. ARGV: the lease TTL (ms), then the n tokens.
# Renews every lease of a worker in one call. Returns n flags (1 renewed, 0 lost), then n
# flags (1: the job has a cancel request, which survives a missed pub/sub message).
RENEW = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
  out[n + i] = redis.call('HEXISTS', KEYS[n + i], 'cancel_requested')
end
return out
"""

# KEYS: lease, job record. ARGV: token, 'requeue' or 'keep'. Drops the lease if it is still
# ours; with 'requeue' the job also goes back to 'queued' (handed to another worker). An
# attempt whose end was written needs none: WRITE dropped its lease with the end.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] == 'requeue' then redis.call('HSET', KEYS[2], 'status', 'queued') end
return 1
"""

# KEYS: job record, events, lease, dead letters, the deployment's ends stream (the end goes
# to the record's own ends stream, else there; see notify_end). ARGV: now, the TTL of an
# ended job's keys, the JobResult JSON, the error event's data JSON, the job id. A job out
# of retries (or poison) fails and joins the dead letters in one step, and only while no
# attempt holds its lease and it has not ended: {'dead', ''}, {'leased', ''} or {'ended',
# status}. (An id listed twice, after a requeue, is shown once:
# producers.control.unique_ids.)
DEAD_LETTER = (
    _LAST_SEQ
    + _NOTIFY_END
    + _NOTIFY_WRITTEN
    + """
if redis.call('EXISTS', KEYS[3]) == 1 then return {'leased', ''} end
local status = redis.call('HGET', KEYS[1], 'status')
if status and ended(status) then return {'ended', status} end
local seq = last_seq(KEYS[2]) + 1
redis.call('HSET', KEYS[1], 'status', 'failed', 'finished_at', ARGV[1], 'result', ARGV[3])
redis.call('HDEL', KEYS[1], 'deliveries')
redis.call('XADD', KEYS[2], '*', 'seq', tostring(seq), 'type', 'error', 'data', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
redis.call('LPUSH', KEYS[4], ARGV[5])
notify_written(notify_end(KEYS[5], KEYS[1], ARGV[5]), ARGV[5])
return {'dead', ''}
"""
)

# --- the Celery queue ----------------------------------------------------------------------

# KEYS: unacked index (zset), unacked (hash), the consumer's deliveries (set; see
# Keys.deliveries), then the queue's lists in BRPOP's order. ARGV: how many to take, the
# time to index them at, '1' to record the tags in the deliveries set. Pops from the first
# non-empty list on (as BRPOP would, one at a time) and records each message the way
# kombu's QoS.append does (ZADD index tag now, HSET unacked tag [message, exchange, routing
# key], the message's own bytes, not re-encoded), plus SADD deliveries tag. An item that is
# not a kombu message is popped but not recorded; Python drops it. Returns [list number
# (1 = KEYS[4]), item, the delivery tag it was
# recorded under or ''] per item, flat.
#
# The tag and the delivery info are read off the start of the item when it begins with them
# (as our producers write it: ``hermes_worker.contract.queue.job_message``), so Redis does
# not decode the body, a job's whole conversation in base64. Anchored at the start and
# stopping at the first quote or backslash, the match cannot fall inside a string; anything
# else (Celery's own send_task, an escaped routing key) is decoded whole; decoding cost Redis
# more than the pop and the record together (docs/benchmarks.md). Python compares the tag
# with the one kombu will ack and forgets a record made under another.
TAKE_MORE = """
local head = '^{"properties": {"delivery_tag": "([^"\\\\]+)", "delivery_info": '
    .. '{"exchange": "", "routing_key": "([^"\\\\]*)"'
-- The item's delivery tag, exchange and routing key (those two as JSON), or nil.
local function delivery(item)
    local tag, route = string.match(item, head)
    if tag then return tag, '""', '"' .. route .. '"' end
    local ok, message = pcall(cjson.decode, item)
    if not (ok and type(message) == 'table' and type(message.properties) == 'table') then
        return nil
    end
    local info = message.properties.delivery_info
    tag = message.properties.delivery_tag
    if type(tag) == 'string' and type(info) == 'table' and type(info.exchange) == 'string'
            and type(info.routing_key) == 'string' then
        return tag, cjson.encode(info.exchange), cjson.encode(info.routing_key)
    end
    return nil
end
local left = tonumber(ARGV[1])
local taken = {}
for k = 4, #KEYS do
    while left > 0 do
        local item = redis.call('RPOP', KEYS[k])
        if not item then break end
        left = left - 1
        local tag, exchange, route = delivery(item)
        if tag then
            redis.call('ZADD', KEYS[1], ARGV[2], tag)
            redis.call('HSET', KEYS[2], tag, '[' .. item .. ',' .. exchange .. ',' .. route .. ']')
            if ARGV[3] == '1' then redis.call('SADD', KEYS[3], tag) end
        end
        taken[#taken + 1] = k - 3
        taken[#taken + 1] = item
        taken[#taken + 1] = tag or ''
    end
    if left == 0 then break end
end
return taken
"""

# KEYS: unacked index (zset), unacked (hash), the consumer's deliveries (set). ARGV: the
# delivery tag, the time, the unacked entry ([message, exchange, routing key]), '1' to record
# the tag in the deliveries set. Records a message BRPOP took, as kombu's QoS.append does,
# in one call. It starts with a write that needs no memory (an HDEL of nothing): a script
# that has written is let finish by a full Redis (noeviction), and this message has left
# the queue already; refused, it would be lost.
RECORD = """
redis.call('HDEL', KEYS[2], '')
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
if ARGV[4] == '1' then redis.call('SADD', KEYS[3], ARGV[1]) end
return 1
"""

# KEYS: unacked (hash), unacked index (zset), the dead worker's deliveries (set), the queue
# list the message goes back to. ARGV: the delivery tag, its unacked entry as the caller read
# it, the message to queue (the same one under a new delivery tag). Puts one message of a
# dead worker back at the head of its queue, once: only while its unacked entry is still
# the one read (no other reaper, sweep or late ack got there first). Returns 1 or 0.
RESTORE = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 0
end
redis.call('RPUSH', KEYS[4], ARGV[3])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: the workers index, the worker's vitals hash, its deliveries. ARGV: its name. A dead
# worker leaves the index once nothing of it is left to restore.
FORGET_WORKER = """
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# --- batches (hermes_worker/batch/) -----------------------------------------------------------

# KEYS: the batch's record. ARGV: the new status, the caller's now (not recorded; kept so
# that the ARGV stay as they were), the statuses it may leave (comma-separated), then field,
# value pairs to set with it. Moves a batch only from an allowed status, stamping
# <status>_at with Redis's now (whole unix seconds). Returns 1 or 0.
BATCH_STATUS = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current then return 0 end
local allowed = false
for status in string.gmatch(ARGV[3], '[^,]+') do
  if status == current then allowed = true end
end
if not allowed then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], ARGV[1] .. '_at', redis.call('TIME')[1])
for i = 4, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return 1
"""

# KEYS: a runner lease. ARGV: its token, its TTL in ms. Takes the lease when free or already
# this token's, renewing its TTL. Returns 1 when held.
BATCH_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


# --- the gateway's tenants -----------------------------------------------------------------

# KEYS: the tenant's request bucket (a hash: tokens, at), the tenant's quota hash (rpm,
# max_waiting: absent fields take the defaults), the API key's record. ARGV: the default
# requests per minute, the default jobs waiting. A token bucket per tenant: it holds up to a
# minute's requests and refills at rpm/60 a second, on Redis's clock (every gateway shares
# it). Records the key's ``last_used``. Returns {1 admitted or 0 refused, seconds until a
# request would be admitted, the tenant's jobs-waiting limit}; rpm 0 is no limit.
ADMIT_REQUEST = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
redis.call('HSET', KEYS[3], 'last_used', tostring(t[1]))
local quota = redis.call('HMGET', KEYS[2], 'rpm', 'max_waiting')
local rpm = tonumber(quota[1] or ARGV[1]) or 0
local waiting = quota[2] or ARGV[2]
if rpm <= 0 then return {1, '0', waiting} end
local rate = rpm / 60
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = rpm
if bucket[1] and bucket[2] then
  tokens = math.min(rpm, tonumber(bucket[1]) + math.max(0, now - tonumber(bucket[2])) * rate)
end
if tokens < 1 then return {0, tostring((1 - tokens) / rate), waiting} end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - 1), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 61)
return {1, '0', waiting}
"""

# KEYS: the tenant's waiting set (a sorted set of job record keys, scored by when they were
# admitted), the record key of the job to admit. ARGV: the tenant's jobs-waiting limit (0:
# none), how long an admitted job may go without a record (its submit is on its way), the
# TTL of the set. A known job (a retry joining it) is admitted without counting. The count
# is read from the records themselves, never kept: once the set is full, every member whose
# record is not ``queued`` (it started, ended or expired) is taken out first, so a job that
# starts or ends frees its place whoever ran it, and a dead worker cannot leave a count
# behind. The members are record keys of any deployment, read here though not in KEYS (one
# Redis, not a cluster). Returns {1 admitted or 0 refused, jobs waiting}.
ADMIT_JOB = """
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('ZSCORE', KEYS[1], KEYS[2]) then
  return {1, redis.call('ZCARD', KEYS[1])}
end
local limit = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if limit <= 0 then return {1, 0} end
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  for i = 1, #members, 2 do
    local status = redis.call('HGET', members[i], 'status')
    local keep
    if status then
      keep = status == 'queued'
    else
      keep = redis.call('EXISTS', members[i]) == 1
        or tonumber(members[i + 1]) > now - tonumber(ARGV[2])
    end
    if not keep then redis.call('ZREM', KEYS[1], members[i]) end
  end
  count = redis.call('ZCARD', KEYS[1])
  if count >= limit then return {0, count} end
end
redis.call('ZADD', KEYS[1], tostring(now), KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return {1, count + 1}
"""

# KEYS: a job's record, the queue list to put its message on. ARGV: the message. Sends a
# queued job's message again when the one it had is gone (a worker killed between its BRPOP
# and its record of the message: see hermes_worker/batch/runner.py): only while the job is
# queued and no delivery of it was ever counted. At the consuming end of the list (it waited
# its turn already). A copy that was not lost after all is harmless: the first delivery
# claims the job, the other finds it leased or ended. Returns 1 or 0.
RESEND = """
local rec = redis.call('HMGET', KEYS[1], 'status', 'deliveries', 'attempts')
if rec[1] ~= 'queued' or (tonumber(rec[2] or '0') or 0) > 0
   or (tonumber(rec[3] or '0') or 0) > 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

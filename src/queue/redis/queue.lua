-- queue.lua: every change to the Redis queue, as one script, so each operation is
-- atomic (Redis runs a script alone) and needs one round trip. CMakeLists.txt embeds
-- this file; the C files beside it call it with EVALSHA: ARGV[1] the operation, ARGV[2] the key
-- prefix, ARGV[3] the time (ms), the rest per operation.
--
-- Keys (P = prefix): P..'job:'..id a job (hash); P..'q:'..p one stream per priority 0-9, read
-- through the consumer group 'workers'; P..'delayed' jobs waiting out a retry backoff (zset,
-- score = when); P..'expiring' queued jobs with a ttl (zset, score = expiry); P..'jobs' every
-- job, newest last (zset, score = created ms); P..'idem:'..key an idempotency key's job;
-- P..'counts' jobs per state (hash); P..'outbox' pending webhooks (zset, score = next
-- attempt); P..'out:'..n one webhook (hash); P..'deliv:'..id a job's webhook attempts (list
-- of JSON); P..'retire' finished jobs whose retention runs (zset, member "id state",
-- score = when the retention ends); P..'leased:'..worker what that worker's last lease handed
-- out, with the call's ticket (hash, expires); P..'att:'..id a job's attempts (list of JSON:
-- a attempt, s start ms, e end ms, w worker, err); P..'worker:'..wid a worker process (hash:
-- host pid started_ms heartbeat_ms timeout_ms jobs_running); P..'workers' the workers (zset,
-- score = when one is presumed dead); P..'wjobs:'..wid the jobs a worker leased (set; an entry
-- counts only while the job runs there). Channel P..'final' carries "id state" when a job ends.
-- Tenants: a job's or batch job's hash has 'tenant' (missing or '': the anonymous tenant, as
-- everything written before tenants is); P..'tjobs:'..tenant and P..'tbatches:'..tenant list
-- another tenant's jobs and batch jobs as P..'jobs' and P..'batches' list all; an anonymous
-- idempotency key is P..'idem:'..key, another tenant's P..'tidem:'..#tenant..':'..tenant..':'..key.

local op, P, now = ARGV[1], ARGV[2], tonumber(ARGV[3])
local STATES = {[0] = 'queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired'}
local GROUP = 'workers'

local function jkey(id) return P .. 'job:' .. id end
local function qkey(p) return P .. 'q:' .. p end

local function count(state, delta)
    redis.call('HINCRBY', P .. 'counts', STATES[state], delta)
end

local function field(id, name) return redis.call('HGET', jkey(id), name) end
local function num(id, name) return tonumber(redis.call('HGET', jkey(id), name) or '0') end

-- Puts a job on its priority's stream.
local function push(id)
    local p = field(id, 'priority') or '0'
    local entry = redis.call('XADD', qkey(p), '*', 'id', id)
    redis.call('HSET', jkey(id), 'entry', entry)
end

-- The worker id in a lease's worker name "<worker id>/<thread>".
local function worker_id(name) return string.match(name, '^(.*)/[^/]*$') or name end

-- Ends the running attempt in the job's history, with `err` (nil: it succeeded).
local function attempt_ended(id, err)
    local k = P .. 'att:' .. id
    local ok, last = pcall(cjson.decode, redis.call('LINDEX', k, -1) or '')
    if ok and type(last) == 'table' and not last.e then
        last.e = now
        last.err = err
        redis.call('LSET', k, -1, cjson.encode(last))
    end
end

-- Forgets a job's stream entry (acknowledged if it was delivered).
local function drop_entry(id)
    local wid = field(id, 'wid')
    if wid and wid ~= '' then redis.call('SREM', P .. 'wjobs:' .. wid, id) end
    local entry, p = field(id, 'entry'), field(id, 'priority') or '0'
    if entry and entry ~= '' then
        redis.call('XACK', qkey(p), GROUP, entry)
        redis.call('XDEL', qkey(p), entry)
        redis.call('HSET', jkey(id), 'entry', '')
    end
end

-- The key that holds an idempotency key's job: each tenant has its own keys.
local function idem_key(tenant, key)
    if not tenant or tenant == '' then return P .. 'idem:' .. key end
    return P .. 'tidem:' .. #tenant .. ':' .. tenant .. ':' .. key
end

-- A job reached a final state: wake its waiters, store its webhook, start its retention.
local function ended(id, state, ttl_s)
    redis.call('PUBLISH', P .. 'final', id .. ' ' .. STATES[state])
    local url = field(id, 'callback_url')
    if url and url ~= '' then
        local n = redis.call('INCR', P .. 'outbox:seq')
        local event = 'evt_' .. id .. '_' .. (field(id, 'attempts') or '0')
        redis.call('HSET', P .. 'out:' .. n, 'event_id', event, 'job_id', id, 'url', url,
                   'attempts', 0)
        redis.call('ZADD', P .. 'outbox', now, n)
    end
    if ttl_s > 0 then
        redis.call('EXPIRE', jkey(id), ttl_s)
        redis.call('ZADD', P .. 'retire', now + ttl_s * 1000, id .. ' ' .. state)
        redis.call('EXPIRE', P .. 'deliv:' .. id, ttl_s + 86400)
        redis.call('EXPIRE', P .. 'att:' .. id, ttl_s) -- goes with the job
        local idem = field(id, 'idem_key')
        if idem and idem ~= '' then
            redis.call('EXPIRE', idem_key(field(id, 'tenant'), idem), ttl_s)
        end
    end
end

local batch_task_final -- defined with the batch jobs below

local function finish(id, from, state, err, ttl_s)
    redis.call('HSET', jkey(id), 'state', state, 'finished_ms', now)
    if err then redis.call('HSET', jkey(id), 'error', err) end
    count(from, -1)
    count(state, 1)
    ended(id, state, ttl_s)
    if num(id, 'kind') ~= 0 then batch_task_final(id, state, ttl_s) end
end

-- Queued jobs whose ttl passed: expired. Retries whose backoff passed: back on their stream.
local function housekeeping(ttl_s)
    local due = redis.call('ZRANGEBYSCORE', P .. 'expiring', '-inf', now, 'LIMIT', 0, 100)
    for _, id in ipairs(due) do
        redis.call('ZREM', P .. 'expiring', id)
        if num(id, 'state') == 0 then
            drop_entry(id)
            redis.call('ZREM', P .. 'delayed', id)
            finish(id, 0, 5, 'its ttl passed before a worker started it', ttl_s)
        end
    end
    due = redis.call('ZRANGEBYSCORE', P .. 'delayed', '-inf', now, 'LIMIT', 0, 100)
    for _, id in ipairs(due) do
        redis.call('ZREM', P .. 'delayed', id)
        if num(id, 'state') == 0 then push(id) end
    end
    -- finished jobs past their retention: out of the counts and the listing index too
    due = redis.call('ZRANGEBYSCORE', P .. 'retire', '-inf', now, 'LIMIT', 0, 200)
    for _, member in ipairs(due) do
        redis.call('ZREM', P .. 'retire', member)
        local id, state = string.match(member, '^(%S+) (%d+)$')
        if id then
            count(tonumber(state), -1)
            redis.call('ZREM', P .. 'jobs', id)
            local tenant = field(id, 'tenant')
            if tenant and tenant ~= '' then redis.call('ZREM', P .. 'tjobs:' .. tenant, id) end
            redis.call('DEL', jkey(id), P .. 'att:' .. id)
        end
    end
end

-- ARGV: id, idem_key, request_hash, max_queued, then field/value pairs of the job.
local function enqueue()
    local id, idem, hash, max_queued = ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
    local tenant = ''
    for i = 8, #ARGV - 1, 2 do
        if ARGV[i] == 'tenant' then tenant = ARGV[i + 1] end
    end
    if idem ~= '' then
        local old = redis.call('GET', idem_key(tenant, idem))
        if old and redis.call('EXISTS', jkey(old)) == 1 then
            return {'existed', old, field(old, 'request_hash') or ''}
        end
    end
    local queued = tonumber(redis.call('HGET', P .. 'counts', 'queued') or '0')
    if queued + 1 > max_queued then return {'busy', tostring(queued)} end
    local args = {}
    for i = 8, #ARGV do args[#args + 1] = ARGV[i] end
    redis.call('HSET', jkey(id), 'state', 0, 'attempts', 0, 'created_ms', now, 'started_ms', 0,
               'finished_ms', 0, 'cancel_requested', 0, 'request_hash', hash, 'idem_key', idem,
               unpack(args))
    if idem ~= '' then redis.call('SET', idem_key(tenant, idem), id) end
    local ttl = num(id, 'ttl_s')
    if ttl > 0 then redis.call('ZADD', P .. 'expiring', now + ttl * 1000, id) end
    redis.call('ZADD', P .. 'jobs', now, id)
    if tenant ~= '' then redis.call('ZADD', P .. 'tjobs:' .. tenant, now, id) end
    count(0, 1)
    push(id)
    return {'ok', id}
end

-- The attempt holding the lease, or nil.
local function holder(id, token)
    if redis.call('EXISTS', jkey(id)) == 0 then return nil end
    if num(id, 'state') ~= 1 or num(id, 'attempts') ~= token then return nil end
    return true
end

-- Hands back the jobs noted under a worker's lease whose answer never reached it (Redis went
-- away first): queued again at once, the attempt not counted, as a release.
local function release_noted(note)
    local jobs = redis.call('HGET', note, 'jobs') or ''
    for id, token in string.gmatch(jobs, '(%S+) (%d+)') do
        if holder(id, tonumber(token)) then
            drop_entry(id)
            attempt_ended(id, 'the answer of its lease was lost; queued again')
            redis.call('HINCRBY', jkey(id), 'extra_attempts', 1)
            redis.call('HSET', jkey(id), 'state', 0)
            push(id)
            count(1, -1)
            count(0, 1)
        end
    end
    redis.call('DEL', note)
end

-- ARGV: worker, max, result_ttl_s, max_tasks, ticket, lost ticket, note ms. Leases up to max
-- jobs, highest priority first, of which at most max_tasks batch tasks; returns {id, job hash}
-- pairs. What a call leased is noted under its worker (P..'leased:'..worker) with the call's
-- ticket: a worker that got no answer passes that ticket as `lost` on its next call, and the
-- jobs of the lost answer go back to the queue then, instead of waiting out their lease.
local function lease()
    local worker, max, ttl_s = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
    local max_tasks = tonumber(ARGV[7] or '1')
    local ticket, lost, note_ms = ARGV[8] or '', ARGV[9] or '', tonumber(ARGV[10] or '0')
    local note = P .. 'leased:' .. worker
    if lost ~= '' and redis.call('HGET', note, 'ticket') == lost then release_noted(note) end
    housekeeping(ttl_s)
    local out, noted, tasks = {}, {}, 0
    for p = 9, 0, -1 do
        if #out >= max then break end
        local ok, res = pcall(redis.call, 'XREADGROUP', 'GROUP', GROUP, worker, 'COUNT',
                              max - #out, 'STREAMS', qkey(p), '>')
        if ok and res then
            for _, e in ipairs(res[1][2]) do
                local entry, id = e[1], e[2][2]
                local live = redis.call('EXISTS', jkey(id)) == 1 and num(id, 'state') == 0 and
                             field(id, 'entry') == entry
                if live and num(id, 'kind') ~= 0 and tasks >= max_tasks then
                    -- a batch task runs for long: one per lease; this one waits its turn
                    redis.call('XACK', qkey(p), GROUP, entry)
                    redis.call('XDEL', qkey(p), entry)
                    push(id)
                elseif live then
                    if num(id, 'kind') ~= 0 then
                        tasks = tasks + 1
                        local b = P .. 'batch:' .. field(id, 'batch_id')
                        if redis.call('HGET', b, 'state') == '0' then
                            redis.call('HSET', b, 'state', 1, 'started_ms', now)
                        end
                    end
                    local attempts = num(id, 'attempts') + 1
                    local wid = worker_id(worker)
                    redis.call('HSET', jkey(id), 'state', 1, 'attempts', attempts, 'worker',
                               worker, 'wid', wid, 'lease_until',
                               now + num(id, 'lease_timeout_ms'))
                    redis.call('SADD', P .. 'wjobs:' .. wid, id)
                    redis.call('RPUSH', P .. 'att:' .. id,
                               cjson.encode({a = attempts, s = now, w = wid}))
                    if num(id, 'started_ms') == 0 then
                        redis.call('HSET', jkey(id), 'started_ms', now)
                    end
                    redis.call('ZREM', P .. 'expiring', id)
                    count(0, -1)
                    count(1, 1)
                    out[#out + 1] = id
                    noted[#noted + 1] = id .. ' ' .. attempts
                else
                    -- cancelled, expired or superseded while it waited: not work any more
                    redis.call('XACK', qkey(p), GROUP, entry)
                    redis.call('XDEL', qkey(p), entry)
                end
            end
        end
    end
    if #out > 0 and ticket ~= '' then
        redis.call('DEL', note)
        redis.call('HSET', note, 'ticket', ticket, 'jobs', table.concat(noted, ' '))
        redis.call('PEXPIRE', note, note_ms)
    end
    local res = {}
    for i, id in ipairs(out) do res[i] = {id, redis.call('HGETALL', jkey(id))} end
    return res
end

-- ARGV: id, token, lease_ms
local function extend()
    local id, token, lease_ms = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
    if not holder(id, token) then return 0 end
    redis.call('HSET', jkey(id), 'lease_until', now + lease_ms)
    local entry, p = field(id, 'entry'), field(id, 'priority') or '0'
    if entry and entry ~= '' then
        -- a fresh idle time, so XAUTOCLAIM leaves a living attempt alone
        redis.call('XCLAIM', qkey(p), GROUP, field(id, 'worker'), 0, entry, 'JUSTID')
    end
    return 1
end

-- ARGV: id, token, result, result_json_len, result_ttl_s
local function complete()
    local id, token, ttl_s = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[8])
    if not holder(id, token) then return 0 end
    drop_entry(id)
    if num(id, 'cancel_requested') == 1 then
        attempt_ended(id, 'cancelled while running; result discarded')
        finish(id, 1, 4, 'cancelled while running; result discarded', ttl_s)
    else
        attempt_ended(id, nil)
        -- the errors of earlier attempts stay in their history, not as the job's error
        redis.call('HSET', jkey(id), 'result', ARGV[6], 'result_json_len', ARGV[7], 'error', '')
        redis.call('HDEL', jkey(id), 'input')
        finish(id, 1, 2, nil, ttl_s)
    end
    return 1
end

-- ARGV: id, token, error, retryable, first backoff ms, max backoff ms, result_ttl_s,
-- retry_after_ms (the model's own "not before"; 0: none), released ('1': stopped by the
-- worker's shutdown: queued again at once, with one more attempt to make up for this one).
-- Returns 0 (fenced out), 1 (recorded) or 2 (recorded; the job failed for good).
local function fail()
    local id, token, err = ARGV[4], tonumber(ARGV[5]), ARGV[6]
    local retryable, backoff, max_backoff = ARGV[7] == '1', tonumber(ARGV[8]), tonumber(ARGV[9])
    local ttl_s, retry_after = tonumber(ARGV[10]), tonumber(ARGV[11] or '0')
    local released = ARGV[12] == '1'
    if not holder(id, token) then return 0 end
    drop_entry(id)
    attempt_ended(id, err)
    local attempts = num(id, 'attempts') - num(id, 'extra_attempts')
    if num(id, 'cancel_requested') == 1 then
        finish(id, 1, 4, err, ttl_s)
    elseif released then
        redis.call('HINCRBY', jkey(id), 'extra_attempts', 1)
        redis.call('HSET', jkey(id), 'state', 0, 'error', err)
        push(id)
        count(1, -1)
        count(0, 1)
    elseif not retryable or attempts >= num(id, 'max_attempts') then
        finish(id, 1, 3, err, ttl_s)
        return 2 -- recorded, and the job failed for good
    else
        for _ = 2, attempts do
            if backoff < max_backoff then backoff = backoff * 2 end
        end
        if backoff > max_backoff then backoff = max_backoff end
        if retry_after > backoff then backoff = retry_after end
        redis.call('HSET', jkey(id), 'state', 0, 'error', err)
        redis.call('ZADD', P .. 'delayed', now + backoff, id)
        count(1, -1)
        count(0, 1)
    end
    return 1
end

-- ARGV: id, result_ttl_s. Returns the state after, or -1 (no job) / -2 (already final).
local function cancel()
    local id, ttl_s = ARGV[4], tonumber(ARGV[5])
    if redis.call('EXISTS', jkey(id)) == 0 then return -1 end
    local state = num(id, 'state')
    if state >= 2 then return -2 end
    if state == 0 then
        drop_entry(id)
        redis.call('ZREM', P .. 'delayed', id)
        redis.call('ZREM', P .. 'expiring', id)
        redis.call('HDEL', jkey(id), 'input')
        finish(id, 0, 4, 'cancelled', ttl_s)
        return 4
    end
    redis.call('HSET', jkey(id), 'cancel_requested', 1)
    redis.call('PUBLISH', P .. 'cancel', id) -- its worker, in whichever process, stops it
    return 1
end

-- ARGV: id. A failed or expired job goes back to the queue with a fresh attempt budget.
local function retry()
    local id = ARGV[4]
    if redis.call('EXISTS', jkey(id)) == 0 then return -1 end
    local state = num(id, 'state')
    if state ~= 3 and state ~= 5 then return -2 end
    local input = redis.call('HEXISTS', jkey(id), 'input') == 1 or
                  (field(id, 'input_location') or '') ~= ''
    if not input then return -2 end
    -- the job, its attempts and its webhooks' record stay while it runs again
    redis.call('PERSIST', jkey(id))
    redis.call('PERSIST', P .. 'att:' .. id)
    redis.call('PERSIST', P .. 'deliv:' .. id)
    redis.call('ZREM', P .. 'retire', id .. ' ' .. state)
    -- its own max_attempts again, for the attempts from now on
    redis.call('HSET', jkey(id), 'state', 0, 'extra_attempts', num(id, 'attempts'),
               'finished_ms', 0, 'error', '')
    count(state, -1)
    count(0, 1)
    push(id)
    return 0
end

-- A running attempt is lost (its lease ran out, or its worker is presumed dead): it counts,
-- and the job runs again at once, or fails on its last attempt. A late outcome of it is fenced
-- out (the next lease makes another attempt number).
local failed_now = {} -- jobs attempt_lost failed for good in this call: "id model attempts"
local function attempt_lost(id, why, ttl_s)
    drop_entry(id)
    attempt_ended(id, why)
    if num(id, 'attempts') - num(id, 'extra_attempts') >= num(id, 'max_attempts') then
        finish(id, 1, 3, why .. ' on the last attempt', ttl_s)
        failed_now[#failed_now + 1] = {id, field(id, 'model') or '', num(id, 'attempts'),
                                       why .. ' on the last attempt'}
    else
        redis.call('HSET', jkey(id), 'state', 0, 'error', why)
        count(1, -1)
        count(0, 1)
        push(id)
    end
end

-- The jobs worker `wid` runs are lost (`why`), and it leaves the list. Returns how many.
local function reap_worker(wid, why, ttl_s)
    local n = 0
    for _, id in ipairs(redis.call('SMEMBERS', P .. 'wjobs:' .. wid)) do
        if redis.call('EXISTS', jkey(id)) == 1 and num(id, 'state') == 1 and
           field(id, 'wid') == wid then
            attempt_lost(id, why, ttl_s)
            n = n + 1
        end
    end
    redis.call('DEL', P .. 'wjobs:' .. wid, P .. 'worker:' .. wid)
    redis.call('ZREM', P .. 'workers', wid)
    return n
end

-- ARGV: sweeper consumer, min idle ms, result_ttl_s, since when the caller has reached Redis
-- (ms). Workers silent past their timeout, with Redis reachable all that time, are presumed
-- dead: their jobs run again at once. Attempts whose lease ran out (their worker
-- stalled, or died before it ever beat): XAUTOCLAIM finds the stream entries idle past the
-- shortest lease; the job's own lease decides. Expired ones run again, or fail on their last
-- attempt. Returns {{{worker, jobs lost, why} of each dead worker with jobs}, expired leases,
-- {{id, model, attempts, error} of the jobs that failed for good}}.
local function reclaim()
    local sweeper, min_idle, ttl_s = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
    local up_since = tonumber(ARGV[7] or '0')
    local dead, n = {}, 0
    for _, wid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'workers', '-inf', now, 'LIMIT', 0, 10)) do
        local timeout = tonumber(redis.call('HGET', P .. 'worker:' .. wid, 'timeout_ms') or '0')
        local last = tonumber(redis.call('HGET', P .. 'worker:' .. wid, 'heartbeat_ms') or '0')
        if up_since + timeout <= now then -- else Redis was away lately: time to beat again
            local why = 'its worker ' .. wid .. ' sent no heartbeat for ' ..
                        math.floor((now - last) / 1000) .. ' s'
            local lost = reap_worker(wid, why, ttl_s)
            if lost > 0 then dead[#dead + 1] = {wid, lost, why} end
        end
    end
    for p = 0, 9 do
        local res = redis.call('XAUTOCLAIM', qkey(p), GROUP, sweeper, min_idle, '0-0', 'COUNT', 100)
        for _, e in ipairs(res[2]) do
            local entry, fields = e[1], e[2]
            local id = fields and fields[2]
            local live = id and redis.call('EXISTS', jkey(id)) == 1 and num(id, 'state') == 1 and
                         field(id, 'entry') == entry
            if live and num(id, 'lease_until') > now then
                -- not expired after all (a longer lease): back to its worker, idle kept
                redis.call('XCLAIM', qkey(p), GROUP, field(id, 'worker'), 0, entry, 'IDLE',
                           math.max(0, now - (num(id, 'lease_until') - num(id, 'lease_timeout_ms'))),
                           'JUSTID')
            elseif live then
                n = n + 1
                attempt_lost(id, 'its lease expired', ttl_s)
            else
                redis.call('XACK', qkey(p), GROUP, entry)
                redis.call('XDEL', qkey(p), entry)
            end
        end
    end
    return {dead, n, failed_now}
end

-- ARGV: id, host, pid, started_ms, timeout_ms, jobs_running. A worker's heartbeat.
local function worker_beat()
    local wid, timeout = ARGV[4], tonumber(ARGV[8])
    redis.call('HSET', P .. 'worker:' .. wid, 'host', ARGV[5], 'pid', ARGV[6], 'started_ms',
               ARGV[7], 'heartbeat_ms', now, 'timeout_ms', timeout, 'jobs_running', ARGV[9])
    redis.call('ZADD', P .. 'workers', now + timeout, wid)
    return 1
end

-- ARGV: id, result_ttl_s. A worker's clean stop: jobs it still holds run again at once.
local function worker_leave()
    return reap_worker(ARGV[4], 'its worker ' .. ARGV[4] .. ' stopped', tonumber(ARGV[5]))
end

-- ARGV: max, redelivery ms. Due webhooks, each held for `redelivery` so that only one
-- process sends it at a time (a sender that dies releases it by then).
local function outbox_take()
    local max, hold = tonumber(ARGV[4]), tonumber(ARGV[5])
    local due = redis.call('ZRANGEBYSCORE', P .. 'outbox', '-inf', now, 'LIMIT', 0, max)
    local out = {}
    for _, n in ipairs(due) do
        redis.call('ZADD', P .. 'outbox', now + hold, n)
        local h = redis.call('HGETALL', P .. 'out:' .. n)
        out[#out + 1] = {n, h}
    end
    return out
end

-- ARGV: outbox id, delivery record (the JSON object's members after the event id), done, next ms
local function outbox_record()
    local n, rec, done, next_ms = ARGV[4], ARGV[5], ARGV[6] == '1', tonumber(ARGV[7])
    local job = redis.call('HGET', P .. 'out:' .. n, 'job_id')
    if not job then return 0 end
    local event = redis.call('HGET', P .. 'out:' .. n, 'event_id') or ''
    redis.call('RPUSH', P .. 'deliv:' .. job, '{"event_id":' .. cjson.encode(event) .. rec)
    redis.call('HINCRBY', P .. 'out:' .. n, 'attempts', 1)
    if done then
        redis.call('ZREM', P .. 'outbox', n)
        redis.call('DEL', P .. 'out:' .. n)
    else
        redis.call('ZADD', P .. 'outbox', next_ms, n)
    end
    return 1
end

-- ARGV: outbox id, body. Fixes a webhook's body the first time it is sent.
local function outbox_body()
    return redis.call('HSETNX', P .. 'out:' .. ARGV[4], 'body', ARGV[5])
end

-- ---- batch jobs: a run is a hash plus one task job (kind 1) per input object ----
-- P..'bprog:'..batch: per running task, the records its object has written so far (hash);
-- a task's field goes when its records are counted in records_done. A schedule's state is
-- 0 (active, in P..'schedules'), 1 (paused, not in it) or 4 (cancelled).

local function bkey(id) return P .. 'batch:' .. id end
local function bnum(id, name) return tonumber(redis.call('HGET', bkey(id), name) or '0') end

-- A queued job of a batch job (a task, kind 1, or its finishing job, kind 2).
local function new_task(id, batch, kind, input)
    local b = bkey(batch)
    redis.call('HSET', jkey(id), 'state', 0, 'attempts', 0, 'created_ms', now, 'started_ms', 0,
               'finished_ms', 0, 'cancel_requested', 0, 'model', redis.call('HGET', b, 'model'),
               'priority', 0, 'max_attempts', redis.call('HGET', b, 'max_attempts'),
               'lease_timeout_ms', redis.call('HGET', b, 'lease_timeout_ms'), 'ttl_s', 0,
               'kind', kind, 'batch_id', batch, 'input', input, 'input_json_len', -1,
               'tenant', redis.call('HGET', b, 'tenant') or '') -- the run's
    redis.call('SADD', P .. 'btasks:' .. batch, id)
    count(0, 1)
    push(id)
end

-- Ends a run: its queued tasks are cancelled, running ones asked to stop, its webhook stored.
local function end_run(batch, state, err, ttl_s)
    local b = bkey(batch)
    if tonumber(redis.call('HGET', b, 'state') or '0') >= 2 then return end
    redis.call('HSET', b, 'state', state, 'finished_ms', now, 'error', err or '')
    for _, t in ipairs(redis.call('SMEMBERS', P .. 'btasks:' .. batch)) do
        local st = num(t, 'state')
        if st == 0 then
            drop_entry(t)
            redis.call('ZREM', P .. 'delayed', t)
            redis.call('HSET', jkey(t), 'state', 4, 'finished_ms', now, 'error',
                       'its batch job ended')
            redis.call('HDEL', jkey(t), 'input')
            count(0, -1)
            count(4, 1)
            if ttl_s > 0 then
                redis.call('EXPIRE', jkey(t), ttl_s)
                redis.call('ZADD', P .. 'retire', now + ttl_s * 1000, t .. ' 4')
            end
        elseif st == 1 then
            redis.call('HSET', jkey(t), 'cancel_requested', 1)
        end
    end
    local url = redis.call('HGET', b, 'callback_url')
    if url and url ~= '' then
        local n = redis.call('INCR', P .. 'outbox:seq')
        redis.call('HSET', P .. 'out:' .. n, 'event_id', 'evt_' .. batch, 'job_id', batch, 'url',
                   url, 'attempts', 0, 'batch', 1)
        redis.call('ZADD', P .. 'outbox', now, n)
    end
    redis.call('DEL', P .. 'bprog:' .. batch)
    if ttl_s > 0 then
        redis.call('EXPIRE', b, ttl_s)
        redis.call('EXPIRE', P .. 'btasks:' .. batch, ttl_s)
    end
end

batch_task_final = function(id, state, ttl_s)
    local batch = field(id, 'batch_id')
    if not batch or batch == '' or redis.call('EXISTS', bkey(batch)) == 0 then return end
    if bnum(batch, 'state') >= 2 then return end -- it ended: this task was cancelled with it
    if state == 2 and num(id, 'kind') == 2 then
        end_run(batch, 2, nil, ttl_s)
    elseif state == 2 then
        local ok, res = pcall(cjson.decode, field(id, 'result') or '{}')
        if not ok or type(res) ~= 'table' then res = {} end
        local b = bkey(batch)
        redis.call('HDEL', P .. 'bprog:' .. batch, id)
        redis.call('HINCRBY', b, 'objects_done', 1)
        redis.call('HINCRBY', b, 'records_done', tonumber(res.records) or 0)
        local failed = redis.call('HINCRBY', b, 'records_failed', tonumber(res.errors) or 0)
        if failed > bnum(batch, 'max_errors') then
            end_run(batch, 3, failed .. ' bad records in all, more than max_errors (' ..
                    bnum(batch, 'max_errors') .. '); the last from ' .. tostring(res.object),
                    ttl_s)
        elseif bnum(batch, 'objects_done') == bnum(batch, 'objects_total') then
            new_task(batch .. '-finish', batch, 2, redis.call('HGET', b, 'finish_input'))
        end
    elseif state == 4 then
        end_run(batch, 3, 'its task ' .. id .. ' was cancelled', ttl_s)
    else
        end_run(batch, 3, field(id, 'error') or 'a task failed', ttl_s)
    end
end

-- ARGV: id, parent, run_at, parent_next (-1: a run started by hand, the schedule not
-- claimed), max_queued, result_ttl_s, then 11 field values
-- (definition model schedule output callback_url max_errors max_attempts lease_timeout_ms
-- next_run_ms finish_input error tenant), then task id / input pairs.
local function batch_create()
    local id, parent, run_at, parent_next = ARGV[4], ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
    local max_queued, ttl_s = tonumber(ARGV[8]), tonumber(ARGV[9])
    local names = {'definition', 'model', 'schedule', 'output', 'callback_url', 'max_errors',
                   'max_attempts', 'lease_timeout_ms', 'next_run_ms', 'finish_input', 'error',
                   'tenant'}
    local f = {}
    for i, name in ipairs(names) do f[name] = ARGV[9 + i] end
    local first_task = 10 + #names
    local n_tasks = (#ARGV - first_task + 1) / 2
    if parent ~= '' and parent_next >= 0 then
        local pb = bkey(parent)
        if redis.call('HGET', pb, 'state') ~= '0' or
           tonumber(redis.call('HGET', pb, 'next_run_ms') or '-1') ~= run_at then
            return {'conflict', parent}
        end
        if parent_next > 0 then
            redis.call('HSET', pb, 'next_run_ms', parent_next)
            redis.call('ZADD', P .. 'schedules', parent_next, parent)
        else
            redis.call('ZREM', P .. 'schedules', parent)
        end
    end
    local queued = tonumber(redis.call('HGET', P .. 'counts', 'queued') or '0')
    if f.schedule == '' and f.error == '' and queued + n_tasks > max_queued then
        return {'busy', tostring(queued)}
    end
    redis.call('HSET', bkey(id), 'state', 0, 'created_ms', now, 'started_ms', 0, 'finished_ms', 0,
               'objects_total', n_tasks, 'objects_done', 0, 'records_done', 0,
               'records_failed', 0, 'parent', parent, 'run_at_ms', run_at)
    for _, name in ipairs(names) do redis.call('HSET', bkey(id), name, f[name]) end
    local listed = f.tenant ~= '' and P .. 'tbatches:' .. f.tenant or nil
    if f.schedule ~= '' then
        redis.call('ZADD', P .. 'schedules', tonumber(f.next_run_ms), id)
        redis.call('ZADD', P .. 'batches', now, id)
        if listed then redis.call('ZADD', listed, now, id) end
        return {'ok', id}
    end
    if parent ~= '' then
        redis.call('ZADD', P .. 'runs:' .. parent, now, id)
    else
        redis.call('ZADD', P .. 'batches', now, id)
        if listed then redis.call('ZADD', listed, now, id) end
    end
    if f.error ~= '' then
        end_run(id, 3, f.error, ttl_s)
        return {'ok', id}
    end
    for i = first_task, #ARGV, 2 do new_task(ARGV[i], id, 1, ARGV[i + 1]) end
    if n_tasks == 0 then new_task(id .. '-finish', id, 2, f.finish_input) end
    return {'ok', id}
end

-- ARGV: id, result_ttl_s. -1: none; -2: already ended; else the state after.
local function batch_cancel()
    local id, ttl_s = ARGV[4], tonumber(ARGV[5])
    if redis.call('EXISTS', bkey(id)) == 0 then return -1 end
    local state = bnum(id, 'state')
    if (redis.call('HGET', bkey(id), 'schedule') or '') ~= '' then
        if state == 4 then return -2 end
        redis.call('HSET', bkey(id), 'state', 4, 'finished_ms', now)
        redis.call('ZREM', P .. 'schedules', id)
        return 4
    end
    if state >= 2 then return -2 end
    end_run(id, 4, 'cancelled', ttl_s)
    return 4
end

-- ARGV: id, paused (1/0), next_run_ms. -1: none; -2: a run; -3: cancelled; else the state.
local function batch_pause()
    local id, paused, next_ms = ARGV[4], ARGV[5] == '1', tonumber(ARGV[6])
    if redis.call('EXISTS', bkey(id)) == 0 then return -1 end
    if (redis.call('HGET', bkey(id), 'schedule') or '') == '' then return -2 end
    local state = bnum(id, 'state')
    if state == 4 then return -3 end
    if paused and state == 0 then
        redis.call('HSET', bkey(id), 'state', 1)
        redis.call('ZREM', P .. 'schedules', id)
    elseif not paused and state == 1 then
        redis.call('HSET', bkey(id), 'state', 0, 'next_run_ms', next_ms)
        redis.call('ZADD', P .. 'schedules', next_ms, id)
    end
    return bnum(id, 'state')
end

-- ARGV: task id, token, batch id, records. Only while that attempt holds the task.
local function batch_progress()
    local id, token, batch = ARGV[4], tonumber(ARGV[5]), ARGV[6]
    if not holder(id, token) or redis.call('EXISTS', bkey(batch)) == 0 or
       bnum(batch, 'state') >= 2 then
        return 0
    end
    redis.call('HSET', P .. 'bprog:' .. batch, id, ARGV[7])
    return 1
end

local ops = {batch_create = batch_create, batch_cancel = batch_cancel, enqueue = enqueue, lease = lease, extend = extend, complete = complete,
             fail = fail, cancel = cancel, retry = retry, reclaim = reclaim,
             outbox_take = outbox_take, outbox_record = outbox_record,
             outbox_body = outbox_body, worker_beat = worker_beat,
             worker_leave = worker_leave}
ops.batch_pause, ops.batch_progress = batch_pause, batch_progress
return ops[op]()

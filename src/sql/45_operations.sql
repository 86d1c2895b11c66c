-- Operations: what an operator does at 3am with a message that did not go out.

CREATE FUNCTION notify._wake_worker() RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_wake';

-- The status of a message, locked for the caller's change; an unknown id is an error.
CREATE FUNCTION notify._lock_message(message_id bigint) RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text;
BEGIN
    SELECT m.status INTO st FROM notify.message m WHERE m.id = _lock_message.message_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'message % does not exist', coalesce(message_id::text, 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
    RETURN st;
END
$$;

/*
 * SECURITY DEFINER: notify_admin reads the queue but does not write it;
 * these functions are the only changes it may make, each checked.
 */
CREATE FUNCTION notify.retry(message_id bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text := notify._lock_message(message_id);
BEGIN
    -- a queued message (waiting for its retry, or held by its failing channel) is made due now;
    -- a bounced one again once its mailbox exists again (its address stays suppressed for new
    -- messages until notify.unsuppress)
    IF st NOT IN ('failed', 'dead', 'queued', 'bounced') THEN
        RAISE EXCEPTION 'message % is %, only queued, failed, dead or bounced messages can be retried', message_id, st
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'See its row in notify.delivery_log.';
    END IF;
    -- attempts keep counting: the log shows every try ever made
    UPDATE notify.message m SET status = 'queued', next_attempt_at = pg_catalog.now(), lease_until = NULL
     WHERE m.id = retry.message_id;
    PERFORM notify._wake_worker();
END
$$;

CREATE FUNCTION notify.cancel(message_id bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text := notify._lock_message(message_id);
BEGIN
    IF st = 'sending' THEN
        RAISE EXCEPTION 'message % is being sent and cannot be cancelled now', message_id
            USING ERRCODE = 'object_in_use',
                  HINT = 'Try again in a moment: if the attempt fails, the message can then be cancelled.';
    END IF;
    IF st NOT IN ('queued', 'failed', 'dead') THEN
        RAISE EXCEPTION 'message % is %, only queued, failed or dead messages can be cancelled', message_id, st
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    UPDATE notify.message m SET status = 'cancelled', lease_until = NULL WHERE m.id = cancel.message_id;
END
$$;

/*
 * Finished messages (and their attempts) older than the interval go, then
 * processed events that no longer have messages, then attachments nobody
 * needs.  Queued and sending messages, and unprocessed events, are never
 * touched.  Returns the number of messages and events deleted.
 */
CREATE FUNCTION notify.purge(older_than interval) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    cutoff timestamptz;
    n_msg  bigint;
    n_evt  bigint;
BEGIN
    IF older_than IS NULL OR older_than < interval '0' THEN
        RAISE EXCEPTION 'older_than must be a positive interval'
            USING ERRCODE = 'invalid_parameter_value', HINT = 'For example notify.purge(''30 days'').';
    END IF;
    cutoff := pg_catalog.now() - older_than;
    -- a message's tries go with it (notify.attempt has no foreign key to cascade)
    WITH gone AS (
        DELETE FROM notify.message m
         WHERE m.status IN ('sent', 'failed', 'dead', 'suppressed', 'cancelled', 'digested', 'bounced')
           AND coalesce(m.sent_at, m.created_at) < cutoff
        RETURNING m.id),
    tries AS (DELETE FROM notify.attempt a USING gone WHERE a.message_id = gone.id)
    SELECT pg_catalog.count(*) INTO n_msg FROM gone;
    -- what the bounce mailbox held (suppressions stay: they end with notify.unsuppress)
    DELETE FROM notify.bounce_mail b WHERE b.received_at < cutoff;
    DELETE FROM notify.event e
     WHERE e.processed_at IS NOT NULL AND e.processed_at < cutoff
       AND NOT EXISTS (SELECT 1 FROM notify.message m WHERE m.event_id = e.id);
    GET DIAGNOSTICS n_evt = ROW_COUNT;
    DELETE FROM notify.attachment a
     WHERE NOT EXISTS (SELECT 1 FROM notify.message m WHERE m.event_id = a.event_id AND m.rule_id = a.rule_id);
    RETURN n_msg + n_evt;
END
$$;

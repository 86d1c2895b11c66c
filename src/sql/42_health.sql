-- Channel health: a relay that is down is the channel's fault, not each message's.

/*
 * Written by the workers: a channel whose server cannot be reached, greets
 * badly, refuses TLS or the login, or closes with 421 (a webhook gateway:
 * connection trouble, 3xx, 408, 429, 5xx) is 'failing'.  Its messages wait
 * in the queue without spending attempts (held: next_attempt_at is
 * 'infinity'); one probe at a time tries the channel at next_probe_at, the
 * wait doubling from notify.retry_backoff up to 5 minutes; the first answer
 * about a message (sent, or refused for that message) makes the channel
 * 'ok' again and its held messages due at once.  Not dumped: a restored
 * database starts with every channel 'ok'.
 */
CREATE TABLE notify.channel_health (
    channel       text PRIMARY KEY REFERENCES notify.channel (name) ON DELETE CASCADE,
    state         text NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'failing')),
    failing_since timestamptz,
    last_error    text,
    next_probe_at timestamptz,
    backoff       interval,            -- how long the next probe waits after this one fails
    probes        integer NOT NULL DEFAULT 0,
    updated_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);

/*
 * After fixing a channel: probe it now and make its waiting messages due
 * now (those held while it failed, and those waiting for a retry); returns
 * how many.  The channel is taken as working: if it still fails, its first
 * message says so and it fails again, at once.
 */
CREATE FUNCTION notify.resume(channel text) RETURNS bigint
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = resume.channel) THEN
        RAISE EXCEPTION 'channel % does not exist', notify._quoted(channel)
            USING ERRCODE = 'undefined_object',
                  HINT = 'See notify.channels for the channels there are.';
    END IF;
    UPDATE notify.channel_health h
       SET state = 'ok', failing_since = NULL, next_probe_at = NULL, backoff = NULL, probes = 0,
           updated_at = pg_catalog.now()
     WHERE h.channel = resume.channel AND h.state = 'failing';
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n > 0 THEN
        RAISE LOG 'notify_ext: channel % resumed by %: taken as working again', notify._quoted(channel), current_user;
    END IF;
    UPDATE notify.message m SET next_attempt_at = pg_catalog.now()
     WHERE m.status = 'queued' AND m.channel = resume.channel AND m.next_attempt_at > pg_catalog.now();
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM notify._wake_worker();
    RETURN n;
END
$$;

-- The channels without their secrets: what notify_admin may see (of headers, only their
-- names), and whether each works (see notify.channel_health).
CREATE VIEW notify.channels AS
    SELECT c.name, c.kind, c.url, c.from_address, c.username,
           (s.password IS NOT NULL) AS has_password, c.tls, c.rate_per_minute, c.updated_at,
           c.content_type, c.body_template,
           CASE WHEN c.kind = 'webhook'
                THEN ARRAY(SELECT k FROM pg_catalog.jsonb_object_keys(s.headers) AS k ORDER BY k)
           END AS header_names,
           COALESCE(h.state, 'ok') AS state, h.failing_since, h.last_error, h.next_probe_at,
           c.bounce_address
      FROM notify.channel c
      LEFT JOIN notify.channel_secret s ON s.channel = c.name
      LEFT JOIN notify.channel_health h ON h.channel = c.name;

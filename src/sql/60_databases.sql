-- Every database: this database's identity (a copy keeps quiet), what its
-- workers are doing, and its queue at a glance.

/*
 * This database's identity (src/identity.c gives the reasoning): the same
 * random token, with the database's OID and name, in two tables.
 * notify.identity is dumped by pg_dump, notify.identity_local is not: a
 * restored database holds its own token in the second and the original's
 * in the first; a database copied with CREATE DATABASE ... TEMPLATE holds
 * the original's OID in both.  A CREATE EXTENSION run by pg_restore marks
 * the database restored from the start: the original's identity comes
 * only later in the restore, and a dump of 0.2 or older has none.
 */
CREATE TABLE notify.identity (
    token         text PRIMARY KEY,
    database_oid  oid NOT NULL,
    database_name name NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE TABLE notify.identity_local (
    token         text PRIMARY KEY,
    database_oid  oid NOT NULL,
    database_name name NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT pg_catalog.now(),
    -- CREATE EXTENSION ran in pg_restore: a copy, whatever the dump carries (see _identity)
    restored      boolean NOT NULL DEFAULT false
);

-- At commit: the workers' last word on this database is forgotten, and one looks again.
CREATE FUNCTION notify._database_changed() RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_database_changed';

-- 12 random hexadecimal digits (pg_strong_random)
CREATE FUNCTION notify._new_token() RETURNS text
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'notify_new_token';

INSERT INTO notify.identity_local (token, database_oid, database_name, restored)
SELECT notify._new_token(), d.oid, d.datname,
       pg_catalog.current_setting('application_name') OPERATOR(pg_catalog.=) 'pg_restore'
  FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database();
INSERT INTO notify.identity (token, database_oid, database_name, created_at)
SELECT token, database_oid, database_name, created_at FROM notify.identity_local;

-- the identity goes with a dump: a restored database knows what it was restored from
SELECT pg_catalog.pg_extension_config_dump('notify.identity', '');

/*
 * A worker looks at the identity again when it changes: a restore runs
 * CREATE EXTENSION (whose commit starts a worker) and only later, in
 * transactions of its own, writes the original's identity back.
 */
CREATE FUNCTION notify._identity_changed() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM notify._database_changed();
    RETURN NULL;
END
$$;
CREATE TRIGGER identity_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON notify.identity
    FOR EACH STATEMENT EXECUTE FUNCTION notify._identity_changed();
CREATE TRIGGER identity_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON notify.identity_local
    FOR EACH STATEMENT EXECUTE FUNCTION notify._identity_changed();

-- Workers' numbers in this database (notify.message.claimed_by); they only grow.
CREATE SEQUENCE notify.worker_seq AS integer;

/*
 * Whether this database is a copy, and why: NULL when it is the database
 * the extension was created in (or adopted by).  source_is_template: it
 * was copied from a template database (datistemplate), which its worker
 * adopts without being asked.
 */
CREATE FUNCTION notify._identity(OUT token text, OUT copy_reason text, OUT source_is_template boolean)
    RETURNS record
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT l.token,
           CASE WHEN l.token IS NULL THEN
                    'it has no identity of its own (notify.identity_local is empty)'
                WHEN l.database_oid OPERATOR(pg_catalog.<>) d.oid THEN
                    pg_catalog.format('it was copied from database %s (OID %s) with CREATE DATABASE ... TEMPLATE, or as files',
                                      pg_catalog.quote_ident(l.database_name), l.database_oid)
                WHEN EXISTS (SELECT 1 FROM notify.identity i WHERE i.token OPERATOR(pg_catalog.<>) l.token) THEN
                    pg_catalog.format('it was restored from a dump of database %s (pg_dump, pg_restore)',
                                      (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(i.database_name), ', ')
                                         FROM notify.identity i WHERE i.token OPERATOR(pg_catalog.<>) l.token))
                WHEN l.restored THEN
                    'it was restored with pg_restore (its extension was created by the restore)'
           END,
           coalesce((SELECT s.datistemplate FROM pg_catalog.pg_database s
                      WHERE s.oid OPERATOR(pg_catalog.=) l.database_oid
                        AND l.database_oid OPERATOR(pg_catalog.<>) d.oid), false)
      FROM pg_catalog.pg_database d
      LEFT JOIN LATERAL (SELECT x.token, x.database_oid, x.database_name, x.restored FROM notify.identity_local x
                          ORDER BY x.created_at DESC LIMIT 1) l ON true
     WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database()
$$;

/*
 * A copy (see _identity) sends nothing until it is adopted.  What it
 * inherited, everything pending when it is adopted (queued and sending
 * messages, digest entries, events not yet processed, schedule runs it
 * missed), is the original's to send: it is cancelled, each row saying
 * why, unless send_pending (a restore that replaces the original, after a
 * loss).  What is captured after adoption is sent.  The copy gets a new
 * token: its Message-IDs differ from the original's.
 */
CREATE FUNCTION notify.adopt_copy(send_pending boolean DEFAULT false) RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    reason  text;
    why     text;
    n_msg   bigint := 0;
    n_evt   bigint := 0;
    n_sched bigint := 0;
    n_back  bigint := 0;
    tok     text := notify._new_token();
    dbname  text := pg_catalog.quote_ident(pg_catalog.current_database());
BEGIN
    -- one adoption at a time
    LOCK TABLE notify.identity_local IN EXCLUSIVE MODE;
    SELECT i.copy_reason INTO reason FROM notify._identity() i;
    IF reason IS NULL THEN
        RETURN pg_catalog.format('database %s is not a copy: nothing was changed', dbname);
    END IF;
    IF send_pending IS NOT DISTINCT FROM true THEN
        -- what the original's workers held when it was copied goes back to the queue
        UPDATE notify.message m SET status = 'queued', lease_until = NULL, next_attempt_at = pg_catalog.now()
         WHERE m.status OPERATOR(pg_catalog.=) 'sending';
        GET DIAGNOSTICS n_back = ROW_COUNT;
    ELSE
        why := 'cancelled by notify.adopt_copy(): inherited by this copy (' || reason
               || '); the database it was copied from sends it';
        UPDATE notify.message m SET status = 'cancelled', lease_until = NULL, last_error = why
         WHERE m.status OPERATOR(pg_catalog.=) ANY ('{queued,sending,digest}'::text[]);
        GET DIAGNOSTICS n_msg = ROW_COUNT;
        UPDATE notify.event e SET status = 'cancelled', processed_at = pg_catalog.now(), last_error = why
         WHERE e.processed_at IS NULL;
        GET DIAGNOSTICS n_evt = ROW_COUNT;
        -- a run the original missed is not the copy's: its next run is
        UPDATE notify.schedule s SET next_run = coalesce(notify.next_run(s.cron), 'infinity')
         WHERE s.next_run OPERATOR(pg_catalog.<=) pg_catalog.now();
        GET DIAGNOSTICS n_sched = ROW_COUNT;
    END IF;
    DELETE FROM notify.identity;
    DELETE FROM notify.identity_local;
    INSERT INTO notify.identity_local (token, database_oid, database_name)
    SELECT tok, d.oid, d.datname
      FROM pg_catalog.pg_database d WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database();
    INSERT INTO notify.identity (token, database_oid, database_name, created_at)
    SELECT x.token, x.database_oid, x.database_name, x.created_at FROM notify.identity_local x;
    PERFORM notify._database_changed();
    RETURN pg_catalog.format('database %s adopted (%s); its new token is %s, and what is captured from now on is sent; ',
                             dbname, reason, tok)
        || CASE WHEN send_pending IS NOT DISTINCT FROM true
                THEN pg_catalog.format('what it inherited is sent too (%s message(s) the original was sending put back in the queue)',
                                       n_back)
                ELSE pg_catalog.format('inherited and cancelled: %s message(s), %s event(s); %s missed schedule run(s) skipped',
                                       n_msg, n_evt, n_sched) END;
END
$$;

/*
 * A schedule created or changed wakes a worker: with no worker running,
 * nobody would otherwise know when it falls due.
 */
CREATE FUNCTION notify._wake_on_schedule() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    PERFORM notify._wake_worker();
    RETURN NULL;
END
$$;
CREATE TRIGGER wake_worker AFTER INSERT OR UPDATE OF cron, next_run ON notify.schedule
    FOR EACH STATEMENT EXECUTE FUNCTION notify._wake_on_schedule();

-- What shared memory holds of this database's running workers (src/notify_ext.c).
CREATE FUNCTION notify._workers(OUT worker integer, OUT pid integer, OUT state text,
                                OUT started_at timestamptz, OUT message_id bigint, OUT channel text,
                                OUT sent_last_minute bigint, OUT last_error text,
                                OUT last_error_at timestamptz)
    RETURNS SETOF record LANGUAGE c AS 'MODULE_PATHNAME', 'notify_workers_shmem';

CREATE FUNCTION notify._database_shmem(OUT state text, OUT workers integer,
                                       OUT sent_last_minute bigint, OUT next_due_at timestamptz)
    RETURNS record LANGUAGE c AS 'MODULE_PATHNAME', 'notify_database_shmem';

/*
 * One row per worker running in this database, each with its own figures
 * (what it is doing, the message and channel it is on, what it sent in the
 * last minute, its last error); with no worker running, one row without a
 * pid whose state says why (idle, paused, a copy, waiting for a slot ...).
 * The queue's totals are queue_status()'s.
 */
CREATE FUNCTION notify.worker_status()
    RETURNS TABLE (pid integer, state text, sent_last_minute bigint, last_error text,
                   worker integer, database name, started_at timestamptz, message_id bigint,
                   channel text, last_error_at timestamptz)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.pid,
           CASE WHEN w.pid IS NULL AND i.copy_reason IS NOT NULL
                THEN 'a copy: nothing is sent until SELECT notify.adopt_copy(); ' || i.copy_reason
                ELSE w.state END,
           w.sent_last_minute, w.last_error, w.worker, pg_catalog.current_database()::name,
           w.started_at, w.message_id, w.channel, w.last_error_at
      FROM notify._workers() w, notify._identity() i
$$;

/*
 * This database's queue in one row: what waits (queued, of which due now,
 * and when the next one is due), what is being sent, events not yet
 * processed, what was sent in the last minute (every worker together), and
 * whether a worker is running or why not.
 */
CREATE FUNCTION notify.queue_status()
    RETURNS TABLE (database name, state text, workers integer, queued bigint, due_now bigint,
                   next_attempt_at timestamptz, sending bigint, events_pending bigint,
                   sent_last_minute bigint, next_due_at timestamptz, copy_reason text)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.current_database()::name,
           CASE WHEN i.copy_reason IS NOT NULL
                THEN 'a copy: nothing is sent until SELECT notify.adopt_copy()' ELSE s.state END,
           s.workers,
           (SELECT pg_catalog.count(*) FROM notify.message m WHERE m.status = 'queued'),
           (SELECT pg_catalog.count(*) FROM notify.message m
             WHERE m.status = 'queued' AND m.next_attempt_at <= pg_catalog.now()),
           (SELECT pg_catalog.min(m.next_attempt_at) FROM notify.message m WHERE m.status = 'queued'),
           (SELECT pg_catalog.count(*) FROM notify.message m WHERE m.status = 'sending'),
           (SELECT pg_catalog.count(*) FROM notify.event e WHERE e.processed_at IS NULL),
           s.sent_last_minute, s.next_due_at, i.copy_reason
      FROM notify._database_shmem() s, notify._identity() i
$$;

-- rights, as for the rest of the schema (50_log.sql ran before these objects existed)
REVOKE ALL ON notify.identity, notify.identity_local, notify.worker_seq FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notify FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA notify TO notify_admin;
REVOKE EXECUTE ON FUNCTION notify._stamp_owner() FROM notify_admin;

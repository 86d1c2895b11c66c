-- notify_ext 0.1 -> 0.2: parallel workers, the unknown outcome, schedules, digests,
-- CSV reports, and the queue in pg_dump.  Run by ALTER EXTENSION notify_ext UPDATE.
\echo Use "ALTER EXTENSION notify_ext UPDATE" to load this file. \quit

-- tables
ALTER TABLE notify.event ADD COLUMN schedule text, ADD COLUMN rows jsonb, ADD COLUMN columns text[];
ALTER TABLE notify.message ADD COLUMN claimed_by integer;
ALTER TABLE notify.message DROP CONSTRAINT message_status_check,
    ADD CONSTRAINT message_status_check CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'dead',
                                                          'suppressed', 'cancelled', 'digest', 'digested'));
CREATE INDEX message_digest_idx ON notify.message (next_attempt_at) WHERE status = 'digest';
DROP INDEX notify.message_queued_idx;
-- the queue, in the order it is sent; what is being sent is not in it, so
-- a claim does not step over the messages other workers hold
CREATE INDEX message_queued_idx ON notify.message (next_attempt_at, id) WHERE status = 'queued';
-- messages being sent, by the end of their lease: a dead sender's go back to the queue
CREATE INDEX message_lease_idx ON notify.message (lease_until) WHERE status = 'sending';
ALTER TABLE notify.attempt DROP CONSTRAINT attempt_outcome_check,
    ADD CONSTRAINT attempt_outcome_check CHECK (outcome IN ('sent', 'failed', 'retry', 'unknown'));
ALTER TABLE notify.channel ADD COLUMN body_template text, ADD COLUMN content_type text,
    ADD CONSTRAINT channel_check CHECK (kind <> 'webhook' OR (body_template IS NOT NULL AND content_type IS NOT NULL));
ALTER TABLE notify.channel_secret ADD COLUMN headers jsonb;

-- functions whose result type changed
DROP FUNCTION notify.worker_status();
DROP FUNCTION notify._worker_shmem();
CREATE FUNCTION notify._worker_shmem(OUT worker integer, OUT pid integer, OUT state text,
                                     OUT last_error text)
    RETURNS SETOF record LANGUAGE c AS 'MODULE_PATHNAME', 'notify_worker_shmem';
CREATE FUNCTION notify.worker_status()
    RETURNS TABLE (pid integer, state text, queued bigint, sending bigint,
                   sent_last_minute bigint, last_error text, worker integer)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT w.pid, w.state,
           (SELECT count(*) FROM notify.message m WHERE m.status = 'queued'),
           (SELECT count(*) FROM notify.message m WHERE m.status = 'sending'),
           (SELECT count(*) FROM notify.message m
             WHERE m.status = 'sent' AND m.sent_at > pg_catalog.now() - interval '1 minute'),
           w.last_error, w.worker
      FROM notify._worker_shmem() w
$$;

-- functions whose body changed
CREATE OR REPLACE FUNCTION notify._stamp_owner() RETURNS trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    -- a superuser may set any owner (pg_restore keeps each row's owner this way);
    -- anyone else's rows are their own
    IF NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user), false)
       OR NEW.owner IS NULL THEN
        NEW.owner := current_user::regrole;
    END IF;
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION notify._event_context(e notify.event) RETURNS jsonb
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'notify_event_context';

CREATE OR REPLACE FUNCTION notify.create_rule(name text, event_type text, template text, recipients text[],
                                   channel text DEFAULT 'email',
                                   context_query text DEFAULT NULL,
                                   attachments_query text DEFAULT NULL,
                                   attach_rows_csv text DEFAULT NULL,
                                   default_mode text DEFAULT 'immediate',
                                   digest_schedule text DEFAULT '0 8 * * *')
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    spec   text;
    new_id bigint;
BEGIN
    IF name IS NULL OR pg_catalog.btrim(name) = '' THEN
        RAISE EXCEPTION 'rule name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT 1 FROM notify.rule r WHERE r.name = create_rule.name) THEN
        RAISE EXCEPTION 'rule % already exists', pg_catalog.quote_literal(name)
            USING ERRCODE = 'duplicate_object', HINT = 'Drop it first with notify.drop_rule.';
    END IF;
    IF event_type IS NULL OR event_type !~ '^[A-Za-z0-9_.:-]+$' THEN
        RAISE EXCEPTION 'invalid event type % in rule %', coalesce(pg_catalog.quote_literal(event_type), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM notify.template t WHERE t.name = create_rule.template) THEN
        RAISE EXCEPTION 'template % does not exist (rule %)', coalesce(pg_catalog.quote_literal(template), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'undefined_object', HINT = 'Create it first with notify.set_template.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = create_rule.channel) THEN
        RAISE EXCEPTION 'channel % does not exist (rule %)', coalesce(pg_catalog.quote_literal(channel), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'undefined_object', HINT = 'Configure it first with notify.set_smtp or notify.set_webhook.';
    END IF;
    IF recipients IS NULL OR pg_catalog.cardinality(recipients) = 0 THEN
        RAISE EXCEPTION 'rule % has no recipients', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH spec IN ARRAY recipients LOOP
        PERFORM notify._check_spec(spec);
    END LOOP;
    IF default_mode IS NULL OR default_mode NOT IN ('immediate', 'digest', 'off') THEN
        RAISE EXCEPTION 'invalid default_mode % for rule %', coalesce(pg_catalog.quote_literal(default_mode), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''immediate'', ''digest'' or ''off''.';
    END IF;
    BEGIN
        PERFORM notify._cron_check(coalesce(digest_schedule, ''));
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'invalid digest_schedule % for rule %: %', coalesce(pg_catalog.quote_literal(digest_schedule), 'NULL'),
              pg_catalog.quote_literal(name), SQLERRM
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A cron expression: ''0 8 * * *'' sends each day''s digest at 08:00.';
    END;
    IF attach_rows_csv IS NOT NULL AND (pg_catalog.btrim(attach_rows_csv) = ''
            OR attach_rows_csv ~ '[[:cntrl:]/\\]' OR pg_catalog.length(attach_rows_csv) > 200) THEN
        RAISE EXCEPTION 'invalid attach_rows_csv file name % for rule %', pg_catalog.quote_literal(attach_rows_csv),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A plain file name such as ''report.csv'': no path, no control characters, at most 200 characters.';
    END IF;
    IF attachments_query IS NOT NULL THEN
        BEGIN
            PERFORM pg_catalog.set_config('search_path', '"$user", public', true);
            EXECUTE 'SELECT q.filename::text, q.content_type::text, q.content::bytea FROM ('
                    || attachments_query || E'\n) AS q LIMIT 0' USING NULL::jsonb;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'attachments_query of rule % is invalid: %', pg_catalog.quote_literal(name), SQLERRM
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'It must return the columns filename, content_type and content (bytea), with $1 the event''s context (jsonb).';
        END;
    END IF;
    IF context_query IS NOT NULL AND pg_catalog.btrim(context_query) = '' THEN
        RAISE EXCEPTION 'context_query of rule % is empty', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass NULL for no context query, or a query returning one jsonb from $1, the event''s context.';
    END IF;
    IF context_query IS NOT NULL THEN
        -- checked now, with the rights it will run with (the caller's): a typo or a
        -- missing privilege is an error for whoever writes the rule
        BEGIN
            -- the search_path the worker runs it with (this function's own is pinned)
            PERFORM pg_catalog.set_config('search_path', '"$user", public', true);
            EXECUTE 'SELECT * FROM (' || context_query || ') AS q LIMIT 0' USING NULL::jsonb;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'context_query of rule % is invalid: %', pg_catalog.quote_literal(name), SQLERRM
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'It must be a query returning one jsonb, with $1 the event''s context (jsonb).';
        END;
    END IF;
    INSERT INTO notify.rule (name, event_type, template, recipients, channel, context_query,
                             attachments_query, attach_rows_csv, default_mode, digest_schedule)
    VALUES (create_rule.name, create_rule.event_type, create_rule.template, create_rule.recipients,
            create_rule.channel, create_rule.context_query, create_rule.attachments_query,
            create_rule.attach_rows_csv, create_rule.default_mode, create_rule.digest_schedule)
    RETURNING id INTO new_id;
    RETURN new_id;
END
$$;

CREATE OR REPLACE FUNCTION notify.set_preference(recipient_key text, event_type text, mode text,
                                      channel text DEFAULT 'email') RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF mode IS NULL OR mode NOT IN ('immediate', 'digest', 'off') THEN
        RAISE EXCEPTION 'invalid mode %: use ''immediate'', ''digest'' or ''off''', notify._quoted(mode)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM notify._check_key(recipient_key);
    IF event_type IS NULL OR event_type !~ '^[A-Za-z0-9_.:-]+$' THEN
        RAISE EXCEPTION 'invalid event type %', notify._quoted(event_type)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'An event type is made of letters, digits and _ . : -, e.g. ''order.created''.';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = set_preference.channel) THEN
        RAISE EXCEPTION 'channel % does not exist', notify._quoted(channel)
            USING ERRCODE = 'undefined_object', HINT = 'Configure it first with notify.set_smtp or notify.set_webhook.';
    END IF;
    INSERT INTO notify.preference AS p (recipient_key, event_type, channel, mode)
    VALUES (set_preference.recipient_key, set_preference.event_type, set_preference.channel,
            set_preference.mode)
    ON CONFLICT ON CONSTRAINT preference_pkey DO UPDATE
       SET mode = EXCLUDED.mode, updated_at = pg_catalog.now();
END
$$;


-- the webhook channel
CREATE FUNCTION notify._check_body_template(channel text, source text) RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_check_body_template';

CREATE FUNCTION notify.set_webhook(name text, url text, body_template text,
                                   headers jsonb DEFAULT '{}',
                                   content_type text DEFAULT 'application/json',
                                   rate_per_minute integer DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- RFC 9110 token: what a header name (and each part of a media type) is made of
    tok constant text := '[!#$%&''*+.^_`|~0-9A-Za-z-]+';
    h_name  text;
    h_value jsonb;
    seen    text[] := '{}';
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]+$' THEN
        RAISE EXCEPTION 'invalid channel name %', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF url IS NULL OR url !~* '^https?://[^/?#\s]+([/?#]\S*)?$' OR url ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'invalid webhook URL % for channel %',
              coalesce('''' || pg_catalog.regexp_replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                           url, '''', ''''''), E'\r', '\r'), E'\n', '\n'), '[[:cntrl:]]', '?', 'g') || '''', 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Only http:// and https:// URLs are accepted, e.g. https://sms.example.com/send.';
    END IF;
    IF url ~ '^[^:]+://[^/?#]*@' THEN
        RAISE EXCEPTION 'the webhook URL of channel % must not carry credentials', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass them in a header, e.g. headers => ''{"Authorization": "Bearer ..."}'': headers are stored where only the extension owner can read them.';
    END IF;
    IF body_template IS NULL THEN
        RAISE EXCEPTION 'webhook channel % needs a body_template', pg_catalog.quote_literal(name)
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'For example ''{"to": "{{recipient.phone}}", "text": "{{message.subject}}"}''.';
    END IF;
    IF content_type IS NULL OR content_type ~ '[[:cntrl:]]'
       OR content_type !~ ('^' || tok || '/' || tok
                           || '( *; *' || tok || '=(' || tok || '|"[^"\\]*"))* *$') THEN
        RAISE EXCEPTION 'invalid content_type % for channel %',
              pg_catalog.regexp_replace(notify._quoted(content_type), '[[:cntrl:]]', '?', 'g'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A media type, e.g. ''application/json'' or ''text/plain; charset=utf-8''.';
    END IF;
    IF headers IS NULL THEN
        headers := '{}';
    END IF;
    IF pg_catalog.jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'headers of channel % must be a JSON object of header names and values',
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''{"Authorization": "Bearer s3cret"}''.';
    END IF;
    FOR h_name, h_value IN SELECT h.key, h.value FROM pg_catalog.jsonb_each(headers) h ORDER BY h.key LOOP
        IF h_name !~ ('^' || tok || '$') THEN
            RAISE EXCEPTION 'invalid header name % for channel %',
                  pg_catalog.regexp_replace(notify._quoted(h_name), '[[:cntrl:]]', '?', 'g'),
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A header name is made of letters, digits and !#$%&''*+.^_`|~- only, e.g. X-Api-Key.';
        END IF;
        IF pg_catalog.lower(h_name) IN ('content-type', 'content-length', 'transfer-encoding', 'host',
                                        'connection', 'expect', 'x-notify-message-id') THEN
            RAISE EXCEPTION 'header % of channel % is set by the transport', notify._quoted(h_name),
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = CASE WHEN pg_catalog.lower(h_name) = 'content-type'
                                  THEN 'Pass the media type as content_type.'
                                  ELSE 'Leave it out: it is set for each request.' END;
        END IF;
        IF pg_catalog.lower(h_name) = ANY (seen) THEN
            RAISE EXCEPTION 'header % is given twice for channel % (header names ignore case)',
                  notify._quoted(h_name), pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        seen := seen || pg_catalog.lower(h_name);
        IF pg_catalog.jsonb_typeof(h_value) <> 'string' THEN
            RAISE EXCEPTION 'the value of header % of channel % must be a string', notify._quoted(h_name),
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- the value itself is never shown: it may be a secret
        IF (h_value #>> '{}') ~ '[[:cntrl:]]' THEN
            RAISE EXCEPTION 'the value of header % of channel % contains a line break or another control character',
                  notify._quoted(h_name), pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A header value is one line of text: CR or LF would let it add headers to the request.';
        END IF;
    END LOOP;
    IF rate_per_minute IS NOT NULL AND rate_per_minute <= 0 THEN
        RAISE EXCEPTION 'rate_per_minute must be positive (channel %)', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM notify._check_body_template(name, body_template);
    IF EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = set_webhook.name AND c.kind <> 'webhook') THEN
        RAISE EXCEPTION 'channel % exists and is not a webhook channel', pg_catalog.quote_literal(name)
            USING ERRCODE = 'wrong_object_type';
    END IF;
    -- tls says what the transport does: an https server's certificate is always checked
    INSERT INTO notify.channel AS c (name, kind, url, tls, rate_per_minute, body_template, content_type)
    VALUES (set_webhook.name, 'webhook', set_webhook.url,
            CASE WHEN set_webhook.url ~* '^https:' THEN 'verify' ELSE 'off' END,
            set_webhook.rate_per_minute, set_webhook.body_template, set_webhook.content_type)
    ON CONFLICT ON CONSTRAINT channel_pkey DO UPDATE
       SET url = EXCLUDED.url, tls = EXCLUDED.tls, rate_per_minute = EXCLUDED.rate_per_minute,
           body_template = EXCLUDED.body_template, content_type = EXCLUDED.content_type,
           updated_at = pg_catalog.now();
    INSERT INTO notify.channel_secret AS s (channel, headers)
    VALUES (set_webhook.name, set_webhook.headers)
    ON CONFLICT ON CONSTRAINT channel_secret_pkey DO UPDATE SET headers = EXCLUDED.headers;
END
$$;

CREATE OR REPLACE VIEW notify.channels AS
    SELECT c.name, c.kind, c.url, c.from_address, c.username,
           (s.password IS NOT NULL) AS has_password, c.tls, c.rate_per_minute, c.updated_at,
           c.content_type, c.body_template,
           CASE WHEN c.kind = 'webhook'
                THEN ARRAY(SELECT k FROM pg_catalog.jsonb_object_keys(s.headers) AS k ORDER BY k)
           END AS header_names
      FROM notify.channel c LEFT JOIN notify.channel_secret s ON s.channel = c.name;

-- schedules, digests and CSV reports (as in a fresh 0.2)
-- Schedules: the worker's cron.  A schedule runs a query as the role that
-- created it and turns the result into events, each run recorded.

CREATE TABLE notify.schedule (
    id          bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    cron        text NOT NULL,
    query       text NOT NULL,
    event_type  text NOT NULL,
    per_row     boolean NOT NULL DEFAULT true,
    dedupe_key  text,
    owner       regrole NOT NULL DEFAULT current_user::regrole,
    created_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    next_run    timestamptz NOT NULL        -- the fire time the worker waits for
);
CREATE INDEX schedule_next_run_idx ON notify.schedule (next_run);
-- whoever changes what the schedule does (or tries to hand it to another role) becomes its
-- owner; the worker's bookkeeping (next_run) leaves it alone
CREATE TRIGGER stamp_owner BEFORE INSERT OR UPDATE OF name, cron, query, event_type, per_row, dedupe_key, owner
    ON notify.schedule FOR EACH ROW EXECUTE FUNCTION notify._stamp_owner();

-- One row per run: a silent stop can be seen, a failure read.  A fire time runs once.
CREATE TABLE notify.schedule_run (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    schedule_id  bigint NOT NULL REFERENCES notify.schedule (id) ON DELETE CASCADE,
    fire_time    timestamptz,               -- NULL: run by hand (notify.run_schedule)
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    events       integer,
    skipped      integer,                   -- rows whose dedupe_key was already emitted
    status       text NOT NULL CHECK (status IN ('ok', 'failed')),
    error        text,
    UNIQUE (schedule_id, fire_time)
);
CREATE INDEX schedule_run_schedule_idx ON notify.schedule_run (schedule_id, id DESC);

-- Keys already emitted by schedules with a dedupe_key: a reminder goes out once.
CREATE TABLE notify.dedupe (
    key          text PRIMARY KEY,
    schedule_id  bigint REFERENCES notify.schedule (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now()
);

CREATE FUNCTION notify._cron_check(cron text) RETURNS void
    LANGUAGE c STRICT AS 'MODULE_PATHNAME', 'notify_cron_check';

CREATE FUNCTION notify.next_run(cron text, after timestamptz DEFAULT pg_catalog.now())
    RETURNS timestamptz
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'notify_next_run';

-- The expansion of a pattern such as 'invoice-{row.id}-due': {path} is the value at that
-- dotted path of the context (nothing for null or missing).
CREATE FUNCTION notify._expand_pattern(pattern text, ctx jsonb) RETURNS text
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.string_agg(
               CASE WHEN m.n % 2 = 1 THEN m.part
                    ELSE coalesce(ctx #>> pg_catalog.string_to_array(m.part, '.'), '') END,
               '' ORDER BY m.n)
      FROM pg_catalog.regexp_split_to_table(pattern, '[{}]') WITH ORDINALITY AS m(part, n)
$$;

-- RFC 4180 CSV of a report's rows: a header of the column names, CRLF line ends, fields
-- quoted when they hold a comma, a quote or a line break; UTF-8.
CREATE FUNCTION notify._csv_field(s text) RETURNS text
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT CASE WHEN s IS NULL THEN ''
                WHEN s ~ '[",\r\n]' THEN '"' || pg_catalog.replace(s, '"', '""') || '"'
                ELSE s END
$$;

CREATE FUNCTION notify._rows_csv(rows jsonb, columns text[]) RETURNS bytea
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.convert_to(
        (SELECT pg_catalog.string_agg(notify._csv_field(u.c), ',' ORDER BY u.i)
           FROM pg_catalog.unnest(columns) WITH ORDINALITY AS u(c, i)) || E'\r\n' ||
        coalesce((SELECT pg_catalog.string_agg(
                            (SELECT pg_catalog.string_agg(notify._csv_field(r.v ->> u.c), ',' ORDER BY u.i)
                               FROM pg_catalog.unnest(columns) WITH ORDINALITY AS u(c, i)),
                            E'\r\n' ORDER BY r.n) || E'\r\n'
                    FROM pg_catalog.jsonb_array_elements(rows) WITH ORDINALITY AS r(v, n)), ''),
        'UTF8')
$$;

CREATE FUNCTION notify.schedule(name text, cron text, query text, event_type text,
                                per_row boolean DEFAULT true, dedupe_key text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    id bigint;
BEGIN
    IF name IS NULL OR pg_catalog.btrim(name) = '' THEN
        RAISE EXCEPTION 'a schedule needs a name' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_type IS NULL OR pg_catalog.btrim(event_type) = '' THEN
        RAISE EXCEPTION 'schedule % needs an event type', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cron IS NULL THEN
        RAISE EXCEPTION 'schedule % needs a cron expression', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    BEGIN
        PERFORM notify._cron_check(cron);
    EXCEPTION WHEN invalid_parameter_value THEN
        RAISE EXCEPTION 'invalid cron expression % for schedule %: %', pg_catalog.quote_literal(cron),
              pg_catalog.quote_literal(name), SQLERRM
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Five fields: minute hour day-of-month month day-of-week, e.g. ''0 7 * * *'' (every day at 07:00), or @hourly, @daily, @weekly, @monthly, @yearly.';
    END;
    IF query IS NULL OR pg_catalog.btrim(query) = '' THEN
        RAISE EXCEPTION 'schedule % needs a query', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dedupe_key IS NOT NULL AND dedupe_key !~ '\{[^{}]+\}' THEN
        RAISE EXCEPTION 'dedupe_key % of schedule % has no {path}', pg_catalog.quote_literal(dedupe_key),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Name what makes an event unique, e.g. ''invoice-{row.id}-due-reminder''.';
    END IF;
    -- checked now, with the rights it will run with (the caller's)
    BEGIN
        PERFORM pg_catalog.set_config('search_path', '"$user", public', true);
        EXECUTE 'SELECT * FROM (' || query || E'\n) AS q LIMIT 0';
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'query of schedule % is invalid: %', pg_catalog.quote_literal(name), SQLERRM
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'It must be a SELECT the schedule''s owner (you) may run; each row becomes an event (per_row) or all rows one.';
    END;
    INSERT INTO notify.schedule AS s (name, cron, query, event_type, per_row, dedupe_key, next_run)
    VALUES (schedule.name, schedule.cron, schedule.query, schedule.event_type,
            coalesce(schedule.per_row, true), schedule.dedupe_key, notify.next_run(schedule.cron))
    ON CONFLICT ON CONSTRAINT schedule_name_key DO UPDATE
       SET cron = EXCLUDED.cron, query = EXCLUDED.query, event_type = EXCLUDED.event_type,
           per_row = EXCLUDED.per_row, dedupe_key = EXCLUDED.dedupe_key, next_run = EXCLUDED.next_run
    RETURNING s.id INTO id;
    PERFORM notify._wake_worker();
    RETURN id;
END
$$;

CREATE FUNCTION notify.unschedule(name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.schedule s WHERE s.name = unschedule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'schedule % does not exist', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

-- Run now, as the schedule's owner whoever calls it; SECURITY DEFINER to write the events
-- and the run with the extension's rights (the query itself runs with the owner's).
CREATE FUNCTION notify.run_schedule(name text) RETURNS integer
    LANGUAGE c SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'notify_run_schedule';

CREATE VIEW notify.schedules AS
    SELECT s.name, s.cron, s.event_type, s.owner, s.per_row, s.dedupe_key, s.next_run,
           r.started_at AS last_run, r.status AS last_status, r.events AS last_events, r.error AS last_error
      FROM notify.schedule s
      LEFT JOIN LATERAL (SELECT * FROM notify.schedule_run x WHERE x.schedule_id = s.id
                          ORDER BY x.id DESC LIMIT 1) r ON true;

-- Digests: entries (messages in status 'digest', rendered as they would have been sent)
-- wait for the end of their period, next_attempt_at; then each recipient gets one mail
-- per rule and period listing them.

-- The fire time before t: the start of the period that ends at t.
CREATE FUNCTION notify._cron_prev(cron text, t timestamptz) RETURNS timestamptz
    LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    step  interval := interval '1 hour';
    probe timestamptz := t - step;
    prev  timestamptz;
    nxt   timestamptz;
BEGIN
    LOOP
        prev := notify.next_run(cron, probe);
        EXIT WHEN prev IS NULL OR prev < t;
        step := step * 2;
        IF step > interval '20 years' THEN
            RETURN NULL;
        END IF;
        probe := t - step;
    END LOOP;
    IF prev IS NULL THEN
        RETURN NULL;
    END IF;
    LOOP
        nxt := notify.next_run(cron, prev);
        EXIT WHEN nxt IS NULL OR nxt >= t;
        prev := nxt;
    END LOOP;
    RETURN prev;
END
$$;

CREATE FUNCTION notify._html_escape(s text) RETURNS text
    LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
               s, '&', '&amp;'), '<', '&lt;'), '>', '&gt;'), '"', '&quot;')
$$;

/*
 * One mail per rule, recipient and period.  With a template named after the rule's
 * template plus '.digest', that template renders it with {{#events}} (each: the event's
 * context plus subject, text, html of its entry), event_count, period_start, period_end,
 * recipient and rule; without one, the entries follow each other under their subjects.
 * force: close every open period now (notify.send_digests).  One worker at a time.
 */
CREATE FUNCTION notify._send_digests(force boolean) RETURNS integer
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    g        record;
    n        integer := 0;
    ctx      jsonb;
    tpl      text;
    subj     text;
    txt      text;
    html     text;
    msg_id   bigint;
    p_start  timestamptz;
    p_end    timestamptz;
    r_name   text;
    r_tpl    text;
    r_cron   text;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('notify_ext digests')) THEN
        RETURN 0;
    END IF;
    FOR g IN
        SELECT m.rule_id, pg_catalog.lower(m.address) AS addr, m.next_attempt_at AS due,
               pg_catalog.array_agg(m.id ORDER BY m.id) AS ids
          FROM notify.message m
         WHERE m.status = 'digest' AND (force OR m.next_attempt_at <= pg_catalog.now())
         GROUP BY m.rule_id, pg_catalog.lower(m.address), m.next_attempt_at
         ORDER BY m.next_attempt_at, m.rule_id
    LOOP
        r_name := NULL; r_tpl := NULL; r_cron := NULL;
        SELECT r.name, r.template, r.digest_schedule INTO r_name, r_tpl, r_cron
          FROM notify.rule r WHERE r.id = g.rule_id;
        p_end := CASE WHEN force THEN LEAST(g.due, pg_catalog.now()) ELSE g.due END;
        p_start := notify._cron_prev(coalesce(r_cron, '0 8 * * *'), g.due);
        SELECT pg_catalog.jsonb_build_object(
                   'events', pg_catalog.jsonb_agg(
                       coalesce(notify._event_context(e), '{}'::jsonb)
                       || pg_catalog.jsonb_build_object('subject', m.subject, 'text', m.text_body,
                                                        'html', m.html_body, 'message_id', m.id)
                       ORDER BY m.event_id, m.id),
                   'event_count', pg_catalog.count(*),
                   'period_start', p_start, 'period_end', p_end,
                   'rule', pg_catalog.min(m.rule_name),
                   'recipient', pg_catalog.jsonb_build_object(
                       'key', pg_catalog.min(m.recipient_key), 'email', pg_catalog.min(m.address),
                       'display_name', pg_catalog.min(m.display_name))),
               pg_catalog.string_agg(m.subject || E'\n\n' || coalesce(m.text_body, ''), E'\n\n----------\n\n'
                                     ORDER BY m.event_id, m.id),
               CASE WHEN pg_catalog.bool_or(m.html_body IS NOT NULL) THEN
                   pg_catalog.string_agg('<section><h3>' || notify._html_escape(m.subject) || '</h3>'
                                         || coalesce(m.html_body, '<pre>' || notify._html_escape(m.text_body) || '</pre>')
                                         || '</section>', '<hr>' ORDER BY m.event_id, m.id) END
          INTO ctx, txt, html
          FROM notify.message m LEFT JOIN notify.event e ON e.id = m.event_id
         WHERE m.id = ANY (g.ids);
        tpl := CASE WHEN r_tpl IS NOT NULL AND EXISTS (
                        SELECT 1 FROM notify.template t WHERE t.name = r_tpl || '.digest')
                    THEN r_tpl || '.digest' END;
        IF tpl IS NOT NULL THEN
            BEGIN
                SELECT r.subject, r.text_body, r.html_body INTO STRICT subj, txt, html
                  FROM notify.render(tpl, ctx) r;
            EXCEPTION WHEN OTHERS THEN
                -- the entries are not lost for a template that fails: the plain layout
                RAISE WARNING 'digest template % failed, sending the plain digest: %', tpl, SQLERRM;
                tpl := NULL;
            END;
        END IF;
        IF tpl IS NULL THEN
            subj := pg_catalog.format('%s: %s notifications', coalesce(r_name, 'notify'),
                                      ctx->>'event_count');
            IF html IS NOT NULL THEN
                html := '<html><body>' || html || '</body></html>';
            END IF;
        END IF;
        INSERT INTO notify.message (event_id, event_type, rule_id, rule_name, recipient_key, address,
                                    display_name, channel, status, subject, text_body, html_body)
        SELECT NULL, m.event_type, m.rule_id, m.rule_name, m.recipient_key, m.address,
               m.display_name, m.channel, 'queued', subj, txt, html
          FROM notify.message m WHERE m.id = g.ids[1]
        RETURNING id INTO msg_id;
        UPDATE notify.message m SET status = 'digested',
               smtp_response = pg_catalog.format('in digest message %s', msg_id)
         WHERE m.id = ANY (g.ids);
        n := n + 1;
    END LOOP;
    IF n > 0 THEN
        PERFORM notify._wake_worker();
    END IF;
    RETURN n;
END
$$;

-- SECURITY DEFINER: it writes messages, which notify_admin may only read.
CREATE FUNCTION notify.send_digests() RETURNS integer
    LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT notify._send_digests(true)
$$;

-- rights, as a fresh install sets them
REVOKE ALL ON ALL TABLES IN SCHEMA notify FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notify FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON notify.schedule TO notify_admin;
GRANT SELECT ON notify.schedule_run, notify.schedules, notify.dedupe TO notify_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA notify TO notify_admin;
REVOKE EXECUTE ON FUNCTION notify._stamp_owner() FROM notify_admin;

-- pg_dump keeps the new configuration, and now the queue and the log too
SELECT pg_catalog.pg_extension_config_dump('notify.schedule', '');
SELECT pg_catalog.pg_extension_config_dump('notify.dedupe', '');
SELECT pg_catalog.pg_extension_config_dump('notify.event', '');
SELECT pg_catalog.pg_extension_config_dump('notify.message', '');
SELECT pg_catalog.pg_extension_config_dump('notify.attachment', '');
SELECT pg_catalog.pg_extension_config_dump('notify.attempt', '');
SELECT pg_catalog.pg_extension_config_dump('notify.schedule_run', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.schedule', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.event', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.message', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.attachment', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.attempt', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.schedule_run', 'id')::pg_catalog.regclass, '');

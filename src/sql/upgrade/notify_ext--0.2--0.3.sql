-- notify_ext 0.2 -> 0.3.  Run by ALTER EXTENSION notify_ext UPDATE.
\echo Use "ALTER EXTENSION notify_ext UPDATE" to load this file. \quit

--
-- Security (0.3): every function safe under a hostile search_path; user
-- queries parsed as the worker runs them; watch() conditions are one
-- expression; attachments read by position.
--
CREATE OR REPLACE FUNCTION notify._check_condition(condition text) RETURNS void
    LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_check_condition';

CREATE OR REPLACE FUNCTION notify.watch(tbl regclass, event_type text, ops text[] DEFAULT '{INSERT}',
                             condition text DEFAULT NULL, actor_column name DEFAULT NULL,
                             actor_prefix text DEFAULT NULL)
    RETURNS text
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w_id     bigint;
    op       text;
    trg      name;
    trgs     name[] := '{}';
    norm_ops text[] := '{}';
    slug     text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'notify.watch: the table must not be null'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF event_type IS NULL OR event_type !~ '^[A-Za-z0-9_.:-]+$' THEN
        RAISE EXCEPTION 'invalid event type %', coalesce(pg_catalog.quote_literal(event_type), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use letters, digits and _ . : - only, e.g. ''order.created''.';
    END IF;
    IF ops IS NULL OR pg_catalog.cardinality(ops) = 0 THEN
        RAISE EXCEPTION 'notify.watch needs at least one operation'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass ops => ''{INSERT,UPDATE,DELETE}'' or a subset.';
    END IF;
    FOREACH op IN ARRAY ops LOOP
        op := pg_catalog.upper(pg_catalog.btrim(op));
        IF op NOT IN ('INSERT', 'UPDATE', 'DELETE') THEN
            RAISE EXCEPTION 'invalid operation % in ops', pg_catalog.quote_literal(op)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'ops may contain INSERT, UPDATE and DELETE.';
        END IF;
        IF NOT op = ANY (norm_ops) THEN
            norm_ops := norm_ops || op;
        END IF;
    END LOOP;
    IF actor_column IS NOT NULL AND NOT EXISTS (
            SELECT 1 FROM pg_catalog.pg_attribute a
             WHERE a.attrelid = tbl AND a.attname = actor_column
               AND a.attnum > 0 AND NOT a.attisdropped) THEN
        RAISE EXCEPTION 'table % has no column %', tbl, pg_catalog.quote_ident(actor_column)
            USING ERRCODE = 'undefined_column';
    END IF;
    IF condition IS NOT NULL THEN
        PERFORM notify._check_condition(condition);
    END IF;
    IF actor_prefix IS NOT NULL AND actor_prefix !~ '^[^:\s]+$' THEN
        RAISE EXCEPTION 'invalid actor prefix %', pg_catalog.quote_literal(actor_prefix)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A prefix is what stands before the first colon of a recipient key, e.g. ''seller''.';
    END IF;
    IF EXISTS (SELECT 1 FROM notify.watch w WHERE w.tbl = watch.tbl AND w.event_type = watch.event_type) THEN
        RAISE EXCEPTION 'table % is already watched for event type %', tbl, pg_catalog.quote_literal(event_type)
            USING ERRCODE = 'duplicate_object',
                  HINT = 'Call notify.unwatch first to change the watch.';
    END IF;

    INSERT INTO notify.watch (tbl, event_type, ops, condition, actor_column, actor_prefix, triggers)
    VALUES (tbl, event_type, norm_ops, condition, actor_column, actor_prefix, '{}')
    RETURNING id INTO w_id;

    slug := pg_catalog.left(pg_catalog.regexp_replace(pg_catalog.lower(event_type), '[^a-z0-9]+', '_', 'g'), 40);
    FOREACH op IN ARRAY norm_ops LOOP
        trg := pg_catalog.format('notify_%s_%s_%s', w_id, pg_catalog.lower(pg_catalog.left(op, 3)), slug);
        EXECUTE pg_catalog.format(
            'CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW %s EXECUTE FUNCTION notify.capture(%L, %L, %L)',
            trg, op, tbl,
            -- one expression (checked above), its closing parenthesis on a line of its own
            CASE WHEN condition IS NULL THEN '' ELSE 'WHEN (' || condition || E'\n)' END,
            event_type, coalesce(actor_column, ''), coalesce(actor_prefix, ''));
        trgs := trgs || trg;
    END LOOP;
    UPDATE notify.watch SET triggers = trgs WHERE id = w_id;
    RETURN pg_catalog.array_to_string(trgs, ', ');
END
$$;

CREATE OR REPLACE FUNCTION notify.add_directory(prefix text, query text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    q   text;
    cur refcursor;
BEGIN
    IF prefix IS NULL OR prefix !~ '^[^:\s]+$' THEN
        RAISE EXCEPTION 'invalid directory prefix %', notify._quoted(prefix)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A prefix is what stands before the first colon of a recipient key, e.g. ''customer''.';
    END IF;
    -- a trailing semicolon is a habit, not an error
    q := pg_catalog.regexp_replace(query, '[\s;]+$', '');
    IF q IS NULL OR q OPERATOR(pg_catalog.=) '' THEN
        RAISE EXCEPTION 'directory query for prefix % is empty', notify._quoted(prefix)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- ... but a line comment at the end would swallow whatever follows the query
    IF pg_catalog.strpos(pg_catalog.regexp_replace(q, '^.*\n', ''), '--') > 0 THEN
        q := q || E'\n';
    END IF;
    -- checked now, with the rights it will run with (the caller's): parsed and planned,
    -- not run; one query only (a cursor cannot hold several), returning the four columns
    BEGIN
        PERFORM pg_catalog.set_config('search_path', '"$user", public', true);
        OPEN cur FOR EXECUTE
            'SELECT q.email::text, q.display_name::text, q.phone::text, q.locale::text FROM ('
            || q || E'\n) AS q LIMIT 0' USING NULL::text;
        CLOSE cur;
        PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    EXCEPTION WHEN OTHERS THEN
        RAISE EXCEPTION 'directory query for prefix % is invalid: %', notify._quoted(prefix), SQLERRM
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'It must be one query returning the columns email, display_name, phone and locale '
                         || 'for the key''s id, given as $1 (text), e.g. ... WHERE id = $1::int.';
    END;
    INSERT INTO notify.directory AS d (prefix, query)
    VALUES (add_directory.prefix, q)
    ON CONFLICT ON CONSTRAINT directory_pkey DO UPDATE SET query = EXCLUDED.query;
END
$$;

CREATE OR REPLACE FUNCTION notify._query_columns(query text, argtype regtype) RETURNS regtype[]
    LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_query_columns';

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
    spec      text;
    new_id    bigint;
    att_types regtype[];
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
        -- read by position, whatever the columns are called: (filename, content_type, content)
        BEGIN
            att_types := notify._query_columns(attachments_query, 'jsonb');
            PERFORM pg_catalog.set_config('search_path', '"$user", public', true);
            EXECUTE 'SELECT * FROM (' || attachments_query || E'\n) AS q LIMIT 0' USING NULL::jsonb;
            PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
        EXCEPTION WHEN OTHERS THEN
            RAISE EXCEPTION 'attachments_query of rule % is invalid: %', pg_catalog.quote_literal(name), SQLERRM
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'It must return three columns, filename, content_type and content (bytea), in that order, with $1 the event''s context (jsonb).';
        END;
        IF pg_catalog.cardinality(att_types) OPERATOR(pg_catalog.<>) 3
           OR att_types[3] OPERATOR(pg_catalog.<>) 'bytea'::regtype THEN
            RAISE EXCEPTION 'attachments_query of rule % must return three columns: filename, content_type and content (bytea)',
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'datatype_mismatch',
                      DETAIL = pg_catalog.format('It returns %s.', att_types::text),
                      HINT = 'Columns are read by position, whatever they are called, e.g. SELECT name, ''application/pdf'', pdf FROM ...';
        END IF;
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

ALTER FUNCTION notify.explain(text, jsonb, text) SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION notify.render(text, jsonb, text) SET search_path = pg_catalog, pg_temp;

--
-- A stranger's checkout (0.3): a Content-Type header is the webhook's content type.
--
CREATE OR REPLACE FUNCTION notify.set_webhook(name text, url text, body_template text,
                                   headers jsonb DEFAULT '{}',
                                   content_type text DEFAULT NULL,
                                   rate_per_minute integer DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    -- RFC 9110 token: what a header name (and each part of a media type) is made of
    tok constant text := '[!#$%&''*+.^_`|~0-9A-Za-z-]+';
    h_name  text;
    h_value jsonb;
    seen    text[] := '{}';
    ct_name text;
    ct      text;
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
    IF headers IS NULL THEN
        headers := '{}';
    END IF;
    IF pg_catalog.jsonb_typeof(headers) <> 'object' THEN
        RAISE EXCEPTION 'headers of channel % must be a JSON object of header names and values',
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'For example ''{"Authorization": "Bearer s3cret"}''.';
    END IF;
    -- a Content-Type header (as pg_net users write it) is the content type; it conflicts only
    -- with a different content_type given as well (media types compare without case or spaces)
    SELECT h.key, h.value #>> '{}' INTO ct_name, ct
      FROM pg_catalog.jsonb_each(headers) h WHERE pg_catalog.lower(h.key) = 'content-type' LIMIT 1;
    IF ct_name IS NOT NULL THEN
        IF pg_catalog.jsonb_typeof(headers -> ct_name) <> 'string' THEN
            RAISE EXCEPTION 'the value of header % of channel % must be a string', notify._quoted(ct_name),
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF content_type IS NOT NULL
           AND pg_catalog.lower(pg_catalog.regexp_replace(content_type, '\s', '', 'g'))
               <> pg_catalog.lower(pg_catalog.regexp_replace(ct, '\s', '', 'g')) THEN
            RAISE EXCEPTION 'the Content-Type header of channel % contradicts its content_type',
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value',
                      DETAIL = pg_catalog.format('The header says %s, content_type says %s.',
                                                 pg_catalog.regexp_replace(notify._quoted(ct), '[[:cntrl:]]', '?', 'g'),
                                                 pg_catalog.regexp_replace(notify._quoted(content_type), '[[:cntrl:]]', '?', 'g')),
                      HINT = 'Give the media type once: as content_type, or as the Content-Type header.';
        END IF;
        content_type := ct;
        headers := headers - ct_name;
    END IF;
    content_type := coalesce(content_type, 'application/json');
    IF content_type IS NULL OR content_type ~ '[[:cntrl:]]'
       OR content_type !~ ('^' || tok || '/' || tok
                           || '( *; *' || tok || '=(' || tok || '|"[^"\\]*"))* *$') THEN
        RAISE EXCEPTION 'invalid content_type % for channel %',
              pg_catalog.regexp_replace(notify._quoted(content_type), '[[:cntrl:]]', '?', 'g'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A media type, e.g. ''application/json'' or ''text/plain; charset=utf-8''.';
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
                      HINT = 'Leave it out: it is set for each request.';
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

--
-- When the relay is down (0.3): channel health, resume(), next_attempt_at in the log.
--
ALTER TABLE notify.attempt DROP CONSTRAINT attempt_outcome_check,
    ADD CONSTRAINT attempt_outcome_check CHECK (outcome IN ('sent', 'failed', 'retry', 'unknown', 'channel'));

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
CREATE OR REPLACE VIEW notify.channels AS
    SELECT c.name, c.kind, c.url, c.from_address, c.username,
           (s.password IS NOT NULL) AS has_password, c.tls, c.rate_per_minute, c.updated_at,
           c.content_type, c.body_template,
           CASE WHEN c.kind = 'webhook'
                THEN ARRAY(SELECT k FROM pg_catalog.jsonb_object_keys(s.headers) AS k ORDER BY k)
           END AS header_names,
           COALESCE(h.state, 'ok') AS state, h.failing_since, h.last_error, h.next_probe_at
      FROM notify.channel c
      LEFT JOIN notify.channel_secret s ON s.channel = c.name
      LEFT JOIN notify.channel_health h ON h.channel = c.name;

-- next_attempt_at: when a queued message is tried next (for a message held
-- while its channel fails, the channel's next probe).
CREATE OR REPLACE VIEW notify.delivery_log AS
    SELECT m.id AS message_id, m.event_id, m.event_type, m.rule_name AS rule,
           m.recipient_key, m.address, m.channel, m.status, m.attempts, m.subject,
           m.created_at, m.sent_at,
           CASE WHEN m.status = 'queued' AND h.state = 'failing'
                THEN pg_catalog.format('waiting for channel %s, which is failing since %s: %s',
                                       m.channel, h.failing_since, h.last_error)
                ELSE m.last_error END AS last_error,
           m.smtp_response,
           CASE WHEN m.status = 'queued' THEN
               CASE WHEN m.next_attempt_at = 'infinity' OR h.state = 'failing'
                    THEN GREATEST(COALESCE(h.next_probe_at, pg_catalog.now()),
                                  NULLIF(m.next_attempt_at, 'infinity'))
                    ELSE m.next_attempt_at END
           END AS next_attempt_at
      FROM notify.message m
      LEFT JOIN notify.channel_health h ON h.channel = m.channel
    UNION ALL
    SELECT NULL::bigint, e.id, e.event_type, NULL::text,
           NULL::text, NULL::text, NULL::text, 'failed'::text, 0, NULL::text,
           e.occurred_at, NULL::timestamptz, e.last_error, NULL::text, NULL::timestamptz
      FROM notify.event e
     WHERE e.status = 'failed';

CREATE OR REPLACE FUNCTION notify.retry(message_id bigint) RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    st text := notify._lock_message(message_id);
BEGIN
    -- a queued message (waiting for its retry, or held by its failing channel) is made due now
    IF st NOT IN ('failed', 'dead', 'queued') THEN
        RAISE EXCEPTION 'message % is %, only queued, failed or dead messages can be retried', message_id, st
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'See its row in notify.delivery_log.';
    END IF;
    -- attempts keep counting: the log shows every try ever made
    UPDATE notify.message m SET status = 'queued', next_attempt_at = pg_catalog.now(), lease_until = NULL
     WHERE m.id = retry.message_id;
    PERFORM notify._wake_worker();
END
$$;

GRANT SELECT ON notify.channel_health TO notify_admin;

--
-- The lean path (0.3): the event cursor instead of event_pending_idx.
--
DROP INDEX notify.event_pending_idx;
/*
 * Where the workers look for events to fan out: every event below
 * low_water is processed, and no transaction can still add one below it.
 * A worker claims from there (by the primary key) instead of keeping an
 * index of the unprocessed events, which cost every captured row an index
 * entry (and every processed one a non-HOT update).  It advances only past
 * ids whose transactions have all ended: see advance_low_water in
 * fanout.c.  Not dumped: a restored database starts from 0.
 */
CREATE TABLE notify.event_cursor (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    low_water     bigint NOT NULL DEFAULT 0,
    candidate     bigint,       -- the event id sequence's value when ...
    candidate_xid bigint        -- ... the next xid was this (a FullTransactionId)
);
INSERT INTO notify.event_cursor DEFAULT VALUES;
-- every pending event is above the cursor: start from the first of them (safe: DROP INDEX
-- above waited, with its lock on notify.event, for every transaction that wrote an event,
-- and holds off new ones until this update commits)
UPDATE notify.event_cursor SET low_water = COALESCE((SELECT pg_catalog.min(e.id) FROM notify.event e
                                                     WHERE e.processed_at IS NULL), 0);
GRANT SELECT ON notify.event_cursor TO notify_admin;
-- an attempt without a foreign key to its message (purge deletes both)
ALTER TABLE notify.attempt DROP CONSTRAINT attempt_message_id_fkey;
-- lz4 for bodies, captured rows and files where the server has it (rows
-- already stored keep pglz until they are rewritten)
DO $$
BEGIN
    ALTER TABLE notify.message ALTER COLUMN text_body SET COMPRESSION lz4,
                               ALTER COLUMN html_body SET COMPRESSION lz4;
    ALTER TABLE notify.event ALTER COLUMN row SET COMPRESSION lz4,
                             ALTER COLUMN old SET COMPRESSION lz4,
                             ALTER COLUMN rows SET COMPRESSION lz4;
    ALTER TABLE notify.attachment ALTER COLUMN content SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    NULL;
END
$$;
CREATE OR REPLACE FUNCTION notify.purge(older_than interval) RETURNS bigint
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
         WHERE m.status IN ('sent', 'failed', 'dead', 'suppressed', 'cancelled', 'digested')
           AND coalesce(m.sent_at, m.created_at) < cutoff
        RETURNING m.id),
    tries AS (DELETE FROM notify.attempt a USING gone WHERE a.message_id = gone.id)
    SELECT pg_catalog.count(*) INTO n_msg FROM gone;
    DELETE FROM notify.event e
     WHERE e.processed_at IS NOT NULL AND e.processed_at < cutoff
       AND NOT EXISTS (SELECT 1 FROM notify.message m WHERE m.event_id = e.id);
    GET DIAGNOSTICS n_evt = ROW_COUNT;
    DELETE FROM notify.attachment a
     WHERE NOT EXISTS (SELECT 1 FROM notify.message m WHERE m.event_id = a.event_id AND m.rule_id = a.rule_id);
    RETURN n_msg + n_evt;
END
$$;


-- rights, as a fresh install has them (new functions included)
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notify FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA notify TO notify_admin;
REVOKE EXECUTE ON FUNCTION notify._stamp_owner() FROM notify_admin;

-- Every database (0.3)
--
-- One launcher starts workers on demand in every database with the
-- extension; this database's identity, so that a copy keeps quiet
-- (adopt_copy); worker_status() gives each worker its own figures and
-- queue_status() the queue's totals.  Kept in step with src/sql/60_databases.sql.
--
DROP FUNCTION notify.worker_status();
DROP FUNCTION notify._worker_shmem();

ALTER TABLE notify.event DROP CONSTRAINT event_status_check,
    ADD CONSTRAINT event_status_check CHECK (status IN ('pending', 'done', 'failed', 'cancelled'));

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

-- the workers that waited for this update (library 0.3, schema older) serve the database now
SELECT notify._database_changed();

--
-- Bounces and suppression (0.3)
-- VERP envelope senders (set_smtp's bounce_address), the bounce mailbox,
-- notify.check_bounces, message status 'bounced', suppressions.
--
ALTER TABLE notify.channel ADD COLUMN bounce_address text;
ALTER TABLE notify.message DROP CONSTRAINT message_status_check,
    ADD CONSTRAINT message_status_check CHECK (status IN ('queued', 'sending', 'sent', 'failed', 'dead',
        'suppressed', 'cancelled', 'digest', 'digested', 'bounced'));

-- set_smtp gains a last argument: the old signature goes, calls by position keep working
DROP FUNCTION notify.set_smtp(text, text, text, text, text, text, integer);
/*
 * SECURITY DEFINER because the password goes into notify.channel_secret,
 * which only the extension's owner can read or write; the caller needs
 * EXECUTE on this function (notify_admin), nothing more.
 *
 * bounce_address (0.3, last so that calls by position keep working): the
 * address whose plus-addresses are the envelope senders (VERP), when it is
 * not from_address: each message goes out as MAIL FROM
 * <local+m<id>.<tag>@domain>, so that its bounce names it (see
 * 60_bounces.sql).  Its local part must not hold a '+' already: that is
 * the delimiter the token follows.
 */
CREATE FUNCTION notify.set_smtp(url text, from_address text, username text DEFAULT NULL,
                                password text DEFAULT NULL, tls text DEFAULT 'verify',
                                name text DEFAULT 'email', rate_per_minute integer DEFAULT NULL,
                                bounce_address text DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF name IS NULL OR name !~ '^[A-Za-z0-9_.-]+$' THEN
        RAISE EXCEPTION 'invalid channel name %', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF url IS NULL OR url !~* '^smtps?://[^/?#\s]+(/[^\s]*)?$' THEN
        RAISE EXCEPTION 'invalid SMTP URL % for channel %',
              coalesce('''' || pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                           url, '''', ''''''), E'\r', '\r'), E'\n', '\n') || '''', 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Only smtp://host:port and smtps://host:port are accepted.';
    END IF;
    IF url ~ '://[^/]*@' THEN
        RAISE EXCEPTION 'the SMTP URL of channel % must not carry credentials', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass username and password as arguments: they are stored where only the extension owner can read them.';
    END IF;
    IF tls IS NULL OR tls NOT IN ('verify', 'require', 'try', 'off') THEN
        RAISE EXCEPTION 'invalid tls mode % for channel %', coalesce(pg_catalog.quote_literal(tls), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''verify'', ''require'', ''try'' or ''off''.';
    END IF;
    IF rate_per_minute IS NOT NULL AND rate_per_minute <= 0 THEN
        RAISE EXCEPTION 'rate_per_minute must be positive (channel %)', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM notify._check_address(from_address, 'from_address of channel ' || pg_catalog.quote_literal(name));
    IF bounce_address IS NOT NULL THEN
        PERFORM notify._check_address(bounce_address, 'bounce_address of channel ' || pg_catalog.quote_literal(name));
        IF bounce_address !~ '^[^"+@]+@[^@]+$' THEN
            RAISE EXCEPTION 'the bounce_address of channel % must have a plain local part without ''+''',
                  pg_catalog.quote_literal(name)
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'Each message is sent from local+m<id>.<tag>@domain of it: use e.g. bounces@example.com.';
        END IF;
    END IF;
    IF EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = set_smtp.name AND c.kind <> 'smtp') THEN
        RAISE EXCEPTION 'channel % exists and is not an SMTP channel', pg_catalog.quote_literal(name)
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO notify.channel AS c (name, kind, url, from_address, username, tls, rate_per_minute,
                                     bounce_address)
    VALUES (set_smtp.name, 'smtp', set_smtp.url, set_smtp.from_address, set_smtp.username,
            set_smtp.tls, set_smtp.rate_per_minute, set_smtp.bounce_address)
    ON CONFLICT ON CONSTRAINT channel_pkey DO UPDATE
       SET url = EXCLUDED.url, from_address = EXCLUDED.from_address, username = EXCLUDED.username,
           tls = EXCLUDED.tls, rate_per_minute = EXCLUDED.rate_per_minute,
           bounce_address = EXCLUDED.bounce_address, updated_at = pg_catalog.now();
    INSERT INTO notify.channel_secret AS s (channel, password)
    VALUES (set_smtp.name, set_smtp.password)
    ON CONFLICT ON CONSTRAINT channel_secret_pkey DO UPDATE SET password = EXCLUDED.password;
END
$$;

-- The channels without their secrets: what notify_admin may see (of headers, only their
-- names), and whether each works (see notify.channel_health).
CREATE OR REPLACE VIEW notify.channels AS
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

CREATE OR REPLACE FUNCTION notify.retry(message_id bigint) RETURNS void
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

/*
 * Finished messages (and their attempts) older than the interval go, then
 * processed events that no longer have messages, then attachments nobody
 * needs.  Queued and sending messages, and unprocessed events, are never
 * touched.  Returns the number of messages and events deleted.
 */
CREATE OR REPLACE FUNCTION notify.purge(older_than interval) RETURNS bigint
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

/*
 * Where a channel's bounces arrive: an IMAP mailbox that the workers read
 * every notify.bounce_poll_interval (and notify.check_bounces now).  One per
 * SMTP channel; several channels may name the same mailbox.  The columns
 * after updated_at are the readers': the next read is due at next_check_at
 * (a worker that takes the mailbox pushes it by the interval first, so the
 * other workers leave it alone), and state says whether the mailbox could
 * be read the last time (the server log says once when it starts failing
 * and once when it works again).
 *
 * leave_unseen: mail that is not a report about one of our messages
 * (auto-replies, spam, a person's mail, malformed or unmatched reports) is
 * flagged \Seen like the rest unless this is true; then it stays unread for
 * whoever else reads the mailbox, and notify.bounce_mail, which records
 * every mail examined, keeps it from being fetched again.
 */
CREATE TABLE notify.bounce_mailbox (
    channel         text PRIMARY KEY REFERENCES notify.channel (name) ON DELETE CASCADE,
    url             text NOT NULL,
    username        text NOT NULL,
    tls             text NOT NULL DEFAULT 'verify' CHECK (tls IN ('verify', 'require', 'try', 'off')),
    leave_unseen    boolean NOT NULL DEFAULT false,
    updated_at      timestamptz NOT NULL DEFAULT pg_catalog.now(),
    next_check_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_checked_at timestamptz,
    state           text NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'failing')),
    failing_since   timestamptz,
    last_error      text
);
CREATE INDEX bounce_mailbox_due_idx ON notify.bounce_mailbox (next_check_at);

-- The mailbox's password, apart: readable by the extension's owner only, as channel_secret.
CREATE TABLE notify.bounce_mailbox_secret (
    channel  text PRIMARY KEY REFERENCES notify.bounce_mailbox (channel) ON DELETE CASCADE,
    password text NOT NULL
);

/*
 * Every mail the readers examined, whatever it was: the operator sees what
 * arrived and what was done with it, and a mail is never processed twice.
 * A mail is known by its mailbox (URL and user, whichever channel reads it),
 * the mailbox's UIDVALIDITY and its UID; the row is written in the same
 * transaction as what the mail changed, and the mail is flagged \Seen only
 * after that transaction committed (seen: it was, or is about to be).  An
 * unseen mail found here again was recorded but not flagged (a crash in
 * between, or leave_unseen): it is flagged now, or left alone, never
 * processed again.
 *
 * kind: delivery-status, complaint, other (auto-reply, spam, a person),
 * malformed (a report that cannot be read), unreadable (could not be
 * fetched: too large, refused).  action: bounced (its message is now
 * bounced), complaint (its address suppressed), delayed (a delay or
 * temporary failure: nothing changes), duplicate (about a message already
 * bounced), unmatched (a report about no message of this database),
 * ignored (not a report), error (processing failed: note says why).
 */
CREATE TABLE notify.bounce_mail (
    id           bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    channel      text NOT NULL,
    mailbox      text NOT NULL,
    uidvalidity  bigint NOT NULL,
    uid          bigint NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT pg_catalog.now(),
    from_header  text,
    subject      text,
    kind         text NOT NULL
                 CHECK (kind IN ('delivery-status', 'complaint', 'other', 'malformed', 'unreadable')),
    format       text,
    message_id   bigint,
    matched_by   text CHECK (matched_by IN ('verp', 'message-id')),
    action       text NOT NULL
                 CHECK (action IN ('bounced', 'complaint', 'delayed', 'duplicate', 'unmatched',
                                   'ignored', 'error')),
    address      text,
    status       text,
    diagnostic   text,
    note         text,
    seen         boolean NOT NULL,
    UNIQUE (mailbox, uidvalidity, uid)
);
CREATE INDEX bounce_mail_message_idx ON notify.bounce_mail (message_id);

/*
 * Addresses that are not mailed any more: a permanent failure (5.x.x) or a
 * complaint.  Keyed by the address without case.  Fan-out looks an address
 * up here only when the table is not empty (one check per batch), then by
 * this index; a message to a suppressed address is a 'suppressed' row whose
 * last_error names the bounce.  Rows end with notify.unsuppress, never with
 * notify.purge or notify.retention.
 */
CREATE TABLE notify.suppression (
    address    text NOT NULL,
    reason     text NOT NULL CHECK (reason IN ('bounce', 'complaint')),
    status     text,            -- the report's status (5.1.1), or a complaint's feedback type
    diagnostic text,
    message_id bigint,          -- the message whose bounce (or complaint) it was
    channel    text,
    since      timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE UNIQUE INDEX suppression_address_idx ON notify.suppression (pg_catalog.lower(address));

CREATE VIEW notify.suppressions AS
    SELECT s.address, s.reason, s.diagnostic, s.message_id, s.since, s.status, s.channel
      FROM notify.suppression s;

-- The bounce mailboxes without their passwords, and whether each can be read.
CREATE VIEW notify.bounce_mailboxes AS
    SELECT b.channel, b.url, b.username, (s.password IS NOT NULL) AS has_password, b.tls,
           b.leave_unseen, b.state, b.failing_since, b.last_error, b.last_checked_at,
           b.next_check_at, b.updated_at
      FROM notify.bounce_mailbox b
      LEFT JOIN notify.bounce_mailbox_secret s ON s.channel = b.channel;

-- Raises unless url is an imap:// or imaps:// URL the reader accepts, with a tls mode it can use.
CREATE FUNCTION notify._check_bounce_mailbox(url text, tls text) RETURNS void
    LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_check_bounce_mailbox';

/*
 * SECURITY DEFINER because the password goes into
 * notify.bounce_mailbox_secret, which only the extension's owner can read
 * or write.  The mailbox is read from the next poll on (the workers are
 * woken at commit); set_bounce_mailbox does not connect: check_bounces
 * does, and says what went wrong.
 */
CREATE FUNCTION notify.set_bounce_mailbox(url text, username text, password text,
                                          tls text DEFAULT 'verify', channel text DEFAULT 'email',
                                          leave_unseen boolean DEFAULT false)
    RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = set_bounce_mailbox.channel AND c.kind = 'smtp') THEN
        RAISE EXCEPTION 'there is no SMTP channel %', notify._quoted(channel)
            USING ERRCODE = 'undefined_object',
                  HINT = 'A bounce mailbox belongs to an SMTP channel: create it first with notify.set_smtp.';
    END IF;
    IF tls IS NULL OR tls NOT IN ('verify', 'require', 'try', 'off') THEN
        RAISE EXCEPTION 'invalid tls mode % for the bounce mailbox of channel %',
              coalesce(pg_catalog.quote_literal(tls), 'NULL'), notify._quoted(channel)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''verify'', ''require'', ''try'' or ''off''.';
    END IF;
    PERFORM notify._check_bounce_mailbox(url, tls);
    IF username IS NULL OR username = '' OR username ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the bounce mailbox of channel % needs a user name (one line of text)', notify._quoted(channel)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- the value itself is never shown: it is a secret
    IF password IS NULL OR password = '' OR password ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'the bounce mailbox of channel % needs a password (one line of text)', notify._quoted(channel)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO notify.bounce_mailbox AS b (channel, url, username, tls, leave_unseen)
    VALUES (set_bounce_mailbox.channel, set_bounce_mailbox.url, set_bounce_mailbox.username,
            set_bounce_mailbox.tls, coalesce(set_bounce_mailbox.leave_unseen, false))
    ON CONFLICT ON CONSTRAINT bounce_mailbox_pkey DO UPDATE
       SET url = EXCLUDED.url, username = EXCLUDED.username, tls = EXCLUDED.tls,
           leave_unseen = EXCLUDED.leave_unseen, updated_at = pg_catalog.now(),
           next_check_at = pg_catalog.now();
    INSERT INTO notify.bounce_mailbox_secret AS s (channel, password)
    VALUES (set_bounce_mailbox.channel, set_bounce_mailbox.password)
    ON CONFLICT ON CONSTRAINT bounce_mailbox_secret_pkey DO UPDATE SET password = EXCLUDED.password;
    PERFORM notify._wake_worker();
END
$$;

-- A channel's bounce mailbox is no longer read (what it recorded stays in notify.bounce_mail).
CREATE FUNCTION notify.drop_bounce_mailbox(channel text DEFAULT 'email') RETURNS void
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.bounce_mailbox b WHERE b.channel = drop_bounce_mailbox.channel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'channel % has no bounce mailbox', notify._quoted(channel)
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

/*
 * Read the bounce mailbox of a channel (of every channel when NULL) now, in
 * this session: returns how many mails were examined (each is recorded in
 * notify.bounce_mail; what was recorded before is not counted).  The mails
 * are flagged \Seen when the calling transaction commits.  SECURITY
 * DEFINER to read the mailbox's password.
 */
CREATE FUNCTION notify.check_bounces(channel text DEFAULT NULL) RETURNS integer
    LANGUAGE c SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'notify_check_bounces';

-- Mail this address again; false when it was not suppressed.
CREATE FUNCTION notify.unsuppress(address text) RETURNS boolean
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.suppression s WHERE pg_catalog.lower(s.address) = pg_catalog.lower(unsuppress.address);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    RAISE LOG 'notify_ext: address % unsuppressed by %', notify._quoted(address), current_user;
    RETURN true;
END
$$;

-- Rights, as for the rest of the schema (50_log.sql): notify_admin reads, never the password.
REVOKE ALL ON notify.bounce_mailbox, notify.bounce_mailbox_secret, notify.bounce_mail,
    notify.suppression, notify.suppressions, notify.bounce_mailboxes FROM PUBLIC;
REVOKE ALL ON FUNCTION notify._check_bounce_mailbox(text, text),
    notify.set_bounce_mailbox(text, text, text, text, text, boolean),
    notify.drop_bounce_mailbox(text), notify.check_bounces(text), notify.unsuppress(text) FROM PUBLIC;
GRANT SELECT ON notify.bounce_mailbox, notify.bounce_mail, notify.suppression, notify.suppressions,
    notify.bounce_mailboxes TO notify_admin;
GRANT EXECUTE ON FUNCTION notify._check_bounce_mailbox(text, text),
    notify.set_bounce_mailbox(text, text, text, text, text, boolean),
    notify.drop_bounce_mailbox(text), notify.check_bounces(text), notify.unsuppress(text) TO notify_admin;

-- The mailbox settings and the suppressions are configuration; what arrived is log.
SELECT pg_catalog.pg_extension_config_dump('notify.bounce_mailbox', '');
SELECT pg_catalog.pg_extension_config_dump('notify.bounce_mailbox_secret', '');
SELECT pg_catalog.pg_extension_config_dump('notify.suppression', '');
SELECT pg_catalog.pg_extension_config_dump('notify.bounce_mail', '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.bounce_mail', 'id')::pg_catalog.regclass, '');

-- rights, as a fresh install has them (new functions included)
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notify FROM PUBLIC;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA notify TO notify_admin;
REVOKE EXECUTE ON FUNCTION notify._stamp_owner() FROM notify_admin;

-- Rules: which template goes to whom when an event of a type happens.

-- Raises a clear error for an address the mailer would refuse.
CREATE FUNCTION notify._check_address(address text, what text) RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_check_address';

/*
 * A recipient spec is checked when the rule is stored, so that a typo is
 * an error for the person writing the rule, not a silent non-delivery
 * found weeks later in the log.
 */
CREATE FUNCTION notify._check_spec(spec text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    kind text := pg_catalog.split_part(spec, ':', 1);
    arg  text := pg_catalog.substr(spec, pg_catalog.length(pg_catalog.split_part(spec, ':', 1)) + 2);
    -- the spec as error messages show it: line breaks escaped, never raw
    shown text := coalesce('''' || pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
                      spec, '''', ''''''), E'\r', '\r'), E'\n', '\n') || '''', 'NULL');
    kinds constant text := 'Use group:NAME, recipient:KEY, key:PATTERN, email:ADDRESS, field:PATH, actor or supervisors.';
    pfx    text;
    path   text;
BEGIN
    IF spec IN ('actor', 'supervisors') THEN
        RETURN;     -- the event's actor; the actor's direct supervisors
    END IF;
    IF spec IS NULL OR pg_catalog.strpos(spec, ':') = 0 THEN
        RAISE EXCEPTION 'invalid recipient spec %', shown
            USING ERRCODE = 'invalid_parameter_value', HINT = kinds;
    END IF;
    CASE kind
    WHEN 'email' THEN
        PERFORM notify._check_address(arg, 'recipient spec ' || shown);
    WHEN 'field' THEN
        IF arg !~ '^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$' THEN
            RAISE EXCEPTION 'invalid path in recipient spec %', shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A path is dotted, e.g. field:row.contact_email.';
        END IF;
    WHEN 'recipient' THEN
        IF arg !~ '^[^:\s]+:\S+$' THEN
            RAISE EXCEPTION 'invalid recipient key in spec %', shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A recipient key is prefix:id, e.g. recipient:user:42.';
        END IF;
        IF NOT notify._key_known(arg) THEN
            RAISE EXCEPTION 'unknown recipient % in spec %', pg_catalog.quote_literal(arg), shown
                USING ERRCODE = 'undefined_object',
                      HINT = 'Create it first with notify.set_recipient, or register a directory for its prefix with notify.add_directory.';
        END IF;
    WHEN 'group' THEN
        IF arg = '' THEN
            RAISE EXCEPTION 'missing group name in spec %', shown
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Write group:NAME, e.g. group:sales.';
        END IF;
        -- locked, so that a concurrent drop_group waits for this rule and then refuses
        PERFORM FROM notify.recipient_group g WHERE g.name = arg FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'unknown group % in spec %', notify._quoted(arg), shown
                USING ERRCODE = 'undefined_object', HINT = 'Create it first with notify.create_group.';
        END IF;
    WHEN 'key' THEN
        IF arg !~ '^[^:\s{}]+:\S+$' THEN
            RAISE EXCEPTION 'invalid key pattern in spec %', shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A key pattern is a prefix, a colon and the id with {path} placeholders, e.g. key:customer:{row.customer_id}.';
        END IF;
        IF pg_catalog.regexp_replace(arg, '\{[^{}]*\}', '', 'g') ~ '[{}]' THEN
            RAISE EXCEPTION 'unbalanced braces in key pattern of spec %', shown
                USING ERRCODE = 'invalid_parameter_value',
                      HINT = 'A placeholder is a dotted path in single braces, e.g. key:customer:{row.customer_id}.';
        END IF;
        FOR path IN SELECT m[1] FROM pg_catalog.regexp_matches(arg, '\{([^{}]*)\}', 'g') AS m LOOP
            IF path !~ '^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$' THEN
                RAISE EXCEPTION 'invalid path % in key pattern of spec %', notify._quoted(path), shown
                    USING ERRCODE = 'invalid_parameter_value',
                          HINT = 'A placeholder is a dotted path in single braces, e.g. key:customer:{row.customer_id}.';
            END IF;
        END LOOP;
        pfx := pg_catalog.split_part(arg, ':', 1);
        IF NOT EXISTS (SELECT 1 FROM notify.directory d WHERE d.prefix = pfx)
           AND NOT EXISTS (SELECT 1 FROM notify.recipient r WHERE pg_catalog.starts_with(r.key, pfx || ':')) THEN
            RAISE EXCEPTION 'no recipient or directory has prefix % (spec %)', notify._quoted(pfx), shown
                USING ERRCODE = 'undefined_object',
                      HINT = 'Register a directory for it with notify.add_directory, or add recipients with notify.set_recipient.';
        END IF;
    WHEN 'actor', 'supervisors' THEN
        RAISE EXCEPTION 'recipient spec % takes no argument', shown
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Write just actor or supervisors.';
    ELSE
        RAISE EXCEPTION 'unknown recipient spec kind % in %', pg_catalog.quote_literal(kind), shown
            USING ERRCODE = 'invalid_parameter_value', HINT = kinds;
    END CASE;
END
$$;

-- The types of the columns a user's query returns, parsed (not run) as the worker runs it.
CREATE FUNCTION notify._query_columns(query text, argtype regtype) RETURNS regtype[]
    LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_query_columns';

CREATE FUNCTION notify.create_rule(name text, event_type text, template text, recipients text[],
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

CREATE FUNCTION notify.drop_rule(name text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.rule r WHERE r.name = drop_rule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rule % does not exist', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

CREATE FUNCTION notify.enable_rule(name text, enabled boolean) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF enabled IS NULL THEN
        RAISE EXCEPTION 'enabled must be true or false' USING ERRCODE = 'null_value_not_allowed';
    END IF;
    UPDATE notify.rule r SET enabled = enable_rule.enabled WHERE r.name = enable_rule.name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'rule % does not exist', coalesce(pg_catalog.quote_literal(name), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

-- Directory (recipients by key); groups, supervisors and preferences come with the directory issue.
CREATE FUNCTION notify.set_recipient(key text, email text, display_name text DEFAULT NULL,
                                     phone text DEFAULT NULL, locale text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    rid bigint;
BEGIN
    IF key IS NULL OR key !~ '^[^:\s]+:\S+$' THEN
        RAISE EXCEPTION 'invalid recipient key %', coalesce(pg_catalog.quote_literal(key), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'A recipient key is prefix:id, e.g. ''user:42'' or ''customer:17''.';
    END IF;
    IF email IS NOT NULL THEN
        PERFORM notify._check_address(email, 'recipient ' || pg_catalog.quote_literal(key));
    END IF;
    INSERT INTO notify.recipient AS r (key, email, display_name, phone, locale)
    VALUES (set_recipient.key, set_recipient.email, set_recipient.display_name,
            set_recipient.phone, pg_catalog.replace(set_recipient.locale, '_', '-'))
    ON CONFLICT ON CONSTRAINT recipient_key_key DO UPDATE
       SET email = EXCLUDED.email, display_name = EXCLUDED.display_name,
           phone = EXCLUDED.phone, locale = EXCLUDED.locale, updated_at = pg_catalog.now()
    RETURNING r.id INTO rid;
    RETURN rid;
END
$$;

CREATE FUNCTION notify.drop_recipient(key text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.recipient r WHERE r.key = drop_recipient.key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'recipient % does not exist', coalesce(pg_catalog.quote_literal(key), 'NULL')
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

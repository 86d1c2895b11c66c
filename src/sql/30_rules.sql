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
BEGIN
    IF spec IN ('actor', 'supervisors') OR kind IN ('group', 'key') THEN
        RAISE EXCEPTION 'recipient spec % is not supported in this version', shown
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Use email:ADDRESS, field:PATH or recipient:KEY.';
    END IF;
    IF spec IS NULL OR pg_catalog.strpos(spec, ':') = 0 THEN
        RAISE EXCEPTION 'invalid recipient spec %', shown
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use email:ADDRESS, field:PATH or recipient:KEY.';
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
        IF NOT EXISTS (SELECT 1 FROM notify.recipient r WHERE r.key = arg) THEN
            RAISE EXCEPTION 'unknown recipient % in spec %', pg_catalog.quote_literal(arg), shown
                USING ERRCODE = 'undefined_object',
                      HINT = 'Create it first with notify.set_recipient.';
        END IF;
    ELSE
        RAISE EXCEPTION 'unknown recipient spec kind % in %', pg_catalog.quote_literal(kind), shown
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use email:ADDRESS, field:PATH or recipient:KEY.';
    END CASE;
END
$$;

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
            USING ERRCODE = 'undefined_object', HINT = 'Configure it first with notify.set_smtp.';
    END IF;
    IF recipients IS NULL OR pg_catalog.cardinality(recipients) = 0 THEN
        RAISE EXCEPTION 'rule % has no recipients', pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH spec IN ARRAY recipients LOOP
        PERFORM notify._check_spec(spec);
    END LOOP;
    IF default_mode IS NULL OR default_mode NOT IN ('immediate', 'off') THEN
        RAISE EXCEPTION 'invalid default_mode % for rule %', coalesce(pg_catalog.quote_literal(default_mode), 'NULL'),
              pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Use ''immediate'' or ''off'' (digests are not available in this version).';
    END IF;
    IF context_query IS NOT NULL OR attachments_query IS NOT NULL OR attach_rows_csv IS NOT NULL THEN
        RAISE EXCEPTION 'context_query, attachments_query and attach_rows_csv are not available in this version'
            USING ERRCODE = 'feature_not_supported';
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

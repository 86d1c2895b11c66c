-- Capture: triggers and notify.emit write outbox rows in the business transaction.

CREATE FUNCTION notify.capture() RETURNS trigger
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_capture';

COMMENT ON FUNCTION notify.capture() IS
    'Trigger function installed by notify.watch; arguments: event_type, actor_column, actor_prefix';

CREATE FUNCTION notify.emit(event_type text, payload jsonb, actor text DEFAULT NULL)
    RETURNS bigint
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_emit';

/*
 * notify.watch installs one AFTER ROW trigger per operation rather than one
 * for all: a WHEN clause that mentions OLD is invalid on an INSERT trigger,
 * and "status changed to approved" conditions are exactly that kind.
 * It runs with the caller's rights, so creating the trigger needs the
 * TRIGGER privilege on the table, as it would by hand.
 */
-- Raises unless condition is exactly one SQL expression (see watch).
CREATE FUNCTION notify._check_condition(condition text) RETURNS void
    LANGUAGE c STRICT SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_check_condition';

CREATE FUNCTION notify.watch(tbl regclass, event_type text, ops text[] DEFAULT '{INSERT}',
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

CREATE FUNCTION notify.unwatch(tbl regclass, event_type text) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    w   notify.watch;
    trg name;
BEGIN
    SELECT * INTO w FROM notify.watch x WHERE x.tbl = unwatch.tbl AND x.event_type = unwatch.event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % is not watched for event type %', tbl, pg_catalog.quote_literal(event_type)
            USING ERRCODE = 'undefined_object';
    END IF;
    FOREACH trg IN ARRAY w.triggers LOOP
        EXECUTE pg_catalog.format('DROP TRIGGER IF EXISTS %I ON %s', trg, tbl);
    END LOOP;
    DELETE FROM notify.watch x WHERE x.id = w.id;
END
$$;

/*
 * The rendering context of an event (src/context.c). `changes` is derived
 * there, in the worker, from the columns the trigger found changed: the
 * trigger only compares datums, which keeps the ERP's UPDATE cheap.
 */
CREATE FUNCTION notify._event_context(e notify.event) RETURNS jsonb
    LANGUAGE c STABLE AS 'MODULE_PATHNAME', 'notify_event_context';

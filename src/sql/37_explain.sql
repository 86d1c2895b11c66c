-- Who would hear about an event, and why (or why not): the worker's own resolution, dry.
CREATE FUNCTION notify.explain(event_type text, payload jsonb, actor text DEFAULT NULL)
    RETURNS TABLE (rule text, spec text, recipient_key text, address text, mode text, reason text)
    LANGUAGE c SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_explain';

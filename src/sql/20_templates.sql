-- Templates: Mustache sources, checked when they are stored.

-- Raises a syntax error naming the template, the part, and the line and column.
CREATE FUNCTION notify._check_template(name text, part text, source text) RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_check_template';

CREATE FUNCTION notify.set_template(name text, subject text, text_body text,
                                    html_body text DEFAULT NULL, locale text DEFAULT NULL)
    RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    loc text := coalesce(pg_catalog.replace(pg_catalog.btrim(locale), '_', '-'), '');
BEGIN
    IF name IS NULL OR pg_catalog.btrim(name) = '' THEN
        RAISE EXCEPTION 'template name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF subject IS NULL OR text_body IS NULL THEN
        RAISE EXCEPTION 'template % needs a subject and a text body', pg_catalog.quote_literal(name)
            USING ERRCODE = 'null_value_not_allowed',
                  HINT = 'Mail clients show the text body when they cannot show HTML; pass '''' only if you really mean an empty one.';
    END IF;
    IF loc <> '' AND loc !~ '^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$' THEN
        RAISE EXCEPTION 'invalid locale % for template %', pg_catalog.quote_literal(locale), pg_catalog.quote_literal(name)
            USING ERRCODE = 'invalid_parameter_value', HINT = 'Use a language tag such as ''es'' or ''es-ES''.';
    END IF;
    PERFORM notify._check_template(name, 'subject', subject);
    PERFORM notify._check_template(name, 'text_body', text_body);
    IF html_body IS NOT NULL THEN
        PERFORM notify._check_template(name, 'html_body', html_body);
    END IF;
    INSERT INTO notify.template AS t (name, locale, subject, text_body, html_body)
    VALUES (set_template.name, loc, set_template.subject, set_template.text_body, set_template.html_body)
    ON CONFLICT ON CONSTRAINT template_pkey DO UPDATE
       SET subject = EXCLUDED.subject, text_body = EXCLUDED.text_body,
           html_body = EXCLUDED.html_body, updated_at = pg_catalog.now();
END
$$;

CREATE FUNCTION notify.drop_template(name text, locale text DEFAULT NULL) RETURNS void
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    DELETE FROM notify.template t
     WHERE t.name = drop_template.name
       AND t.locale = coalesce(pg_catalog.replace(drop_template.locale, '_', '-'), '');
    IF NOT FOUND THEN
        RAISE EXCEPTION 'template % (locale %) does not exist', pg_catalog.quote_literal(name),
              coalesce(pg_catalog.quote_literal(locale), 'none')
            USING ERRCODE = 'undefined_object';
    END IF;
END
$$;

-- The template variant for a locale: exact tag, then its language, then none.
CREATE FUNCTION notify._pick_template(name text, locale text)
    RETURNS notify.template
    LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT t.* FROM notify.template t
     WHERE t.name = _pick_template.name
       -- language tags compare case-insensitively: 'ES-es' finds 'es-ES', then 'es'
       AND pg_catalog.lower(t.locale) IN (
               pg_catalog.lower(coalesce(pg_catalog.replace(_pick_template.locale, '_', '-'), '')),
               pg_catalog.lower(pg_catalog.split_part(coalesce(pg_catalog.replace(_pick_template.locale, '_', '-'), ''), '-', 1)),
               '')
     ORDER BY pg_catalog.length(t.locale) DESC
     LIMIT 1
$$;

CREATE FUNCTION notify.render(template text, context jsonb, locale text DEFAULT NULL)
    RETURNS TABLE (subject text, text_body text, html_body text)
    LANGUAGE c STABLE SET search_path = pg_catalog, pg_temp AS 'MODULE_PATHNAME', 'notify_render';

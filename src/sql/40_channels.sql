-- Channels: where messages go out.

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

-- Compiles a webhook's body template: a syntax error names the channel, line and column.
CREATE FUNCTION notify._check_body_template(channel text, source text) RETURNS void
    LANGUAGE c AS 'MODULE_PATHNAME', 'notify_check_body_template';

/*
 * A webhook channel: each message is POSTed to url as the channel's
 * body_template, rendered at fan-out.  SECURITY DEFINER because the headers
 * (which often carry a token) go into notify.channel_secret, which only the
 * extension's owner can read or write.
 *
 * Everything that reaches the HTTP request is checked here, so that a
 * mistake is an error for whoever configures the channel, not a queue of
 * failing messages: the URL (http/https only, no credentials), each header
 * (a token for a name; a value without CR, LF or any other control
 * character, so that business or configuration data can never add a
 * header), the content type, and the body template's syntax.
 */
CREATE FUNCTION notify.set_webhook(name text, url text, body_template text,
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

-- The channels without their secrets: what notify_admin may see (of headers, only their names).


-- Connect, greet, negotiate TLS, authenticate (and send a test message when send_to is
-- given): the step-by-step dialogue, credentials hidden. SECURITY DEFINER to read the secret.
CREATE FUNCTION notify.test_smtp(name text DEFAULT 'email', send_to text DEFAULT NULL) RETURNS text
    LANGUAGE c SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'notify_test_smtp';

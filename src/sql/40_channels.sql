-- Channels: where messages go out.

/*
 * SECURITY DEFINER because the password goes into notify.channel_secret,
 * which only the extension's owner can read or write; the caller needs
 * EXECUTE on this function (notify_admin), nothing more.
 */
CREATE FUNCTION notify.set_smtp(url text, from_address text, username text DEFAULT NULL,
                                password text DEFAULT NULL, tls text DEFAULT 'verify',
                                name text DEFAULT 'email', rate_per_minute integer DEFAULT NULL)
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
    IF EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = set_smtp.name AND c.kind <> 'smtp') THEN
        RAISE EXCEPTION 'channel % exists and is not an SMTP channel', pg_catalog.quote_literal(name)
            USING ERRCODE = 'wrong_object_type';
    END IF;
    INSERT INTO notify.channel AS c (name, kind, url, from_address, username, tls, rate_per_minute)
    VALUES (set_smtp.name, 'smtp', set_smtp.url, set_smtp.from_address, set_smtp.username,
            set_smtp.tls, set_smtp.rate_per_minute)
    ON CONFLICT ON CONSTRAINT channel_pkey DO UPDATE
       SET url = EXCLUDED.url, from_address = EXCLUDED.from_address, username = EXCLUDED.username,
           tls = EXCLUDED.tls, rate_per_minute = EXCLUDED.rate_per_minute, updated_at = pg_catalog.now();
    INSERT INTO notify.channel_secret AS s (channel, password)
    VALUES (set_smtp.name, set_smtp.password)
    ON CONFLICT ON CONSTRAINT channel_secret_pkey DO UPDATE SET password = EXCLUDED.password;
END
$$;

-- The channels without their secrets: what notify_admin may see.
CREATE VIEW notify.channels AS
    SELECT c.name, c.kind, c.url, c.from_address, c.username,
           (s.password IS NOT NULL) AS has_password, c.tls, c.rate_per_minute, c.updated_at
      FROM notify.channel c LEFT JOIN notify.channel_secret s ON s.channel = c.name;

-- Connect, greet, negotiate TLS, authenticate (and send a test message when send_to is
-- given): the step-by-step dialogue, credentials hidden. SECURITY DEFINER to read the secret.
CREATE FUNCTION notify.test_smtp(name text DEFAULT 'email', send_to text DEFAULT NULL) RETURNS text
    LANGUAGE c SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'notify_test_smtp';

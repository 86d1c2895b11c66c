--
-- channels: notify.set_smtp and the notify.channels view; the password is
-- stored where only the extension's owner can read it.
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

SELECT notify.set_smtp('smtp://mail.example.com:587', 'erp@example.com');
SELECT notify.set_smtp('smtps://mail.example.com:465', 'erp@example.com', 'erp-user', 's3cret!',
                       tls => 'require', name => 'secure', rate_per_minute => 60);
SELECT notify.set_smtp('SMTP://localhost:25', 'noreply@localhost.example', tls => 'off', name => 'local');
SELECT notify.set_smtp('smtp://[::1]:2525', 'a@example.com', tls => 'try', name => 'v6');
SELECT name, url, from_address, username, has_password, tls, rate_per_minute
  FROM notify.channels ORDER BY name;

-- set_smtp sets the whole channel: what is not passed takes its default
-- (no password, tls 'verify', no rate limit)
SELECT notify.set_smtp('smtps://mail2.example.com:465', 'erp2@example.com', 'erp-user', NULL,
                       name => 'secure');
SELECT name, url, from_address, username, has_password, tls, rate_per_minute
  FROM notify.channels WHERE name = 'secure';
SELECT notify.set_smtp('smtps://mail2.example.com:465', 'erp2@example.com', 'erp-user', 'n3w',
                       name => 'secure');
SELECT name, has_password FROM notify.channels WHERE name = 'secure';

-- the view never shows the password, in any column
SELECT count(*) AS views_showing_the_password
  FROM notify.channels c WHERE row_to_json(c)::text LIKE '%n3w%';

-- refused URLs
SELECT notify.set_smtp('file:///etc/passwd', 'erp@example.com');
SELECT notify.set_smtp('http://x', 'erp@example.com');
SELECT notify.set_smtp('https://mail.example.com', 'erp@example.com');
SELECT notify.set_smtp('smtp://user:pw@host', 'erp@example.com');
SELECT notify.set_smtp('smtp://user@host:25', 'erp@example.com');
SELECT notify.set_smtp('smtp://', 'erp@example.com');
SELECT notify.set_smtp('smtp://host name:25', 'erp@example.com');
SELECT notify.set_smtp(E'smtp://host:25\r\nQUIT', 'erp@example.com');
SELECT notify.set_smtp('gopher://host:70', 'erp@example.com');
SELECT notify.set_smtp(' smtp://host:25', 'erp@example.com');
SELECT notify.set_smtp(NULL, 'erp@example.com');
-- bad tls mode
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', tls => 'maybe');
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', tls => NULL);
-- bad from_address
SELECT notify.set_smtp('smtp://host:25', 'not an address');
SELECT notify.set_smtp('smtp://host:25', E'erp@example.com\r\nBcc: all@example.com');
SELECT notify.set_smtp('smtp://host:25', NULL);
SELECT notify.set_smtp('smtp://host:25', '');
-- rate_per_minute must be positive
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', rate_per_minute => 0);
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', rate_per_minute => -5);
-- bad channel names
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', name => 'my channel');
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', name => NULL);
SELECT notify.set_smtp('smtp://host:25', 'erp@example.com', name => '');
-- nothing of that was stored
SELECT name, url FROM notify.channels ORDER BY name;

-- notify_admin: may configure channels and read notify.channels, never the secrets
CREATE ROLE regress_notify_ops IN ROLE notify_admin;
SET ROLE regress_notify_ops;
SELECT notify.set_smtp('smtp://relay.example.com:25', 'ops@example.com', 'ops', 'opspw',
                       tls => 'verify', name => 'ops');
SELECT name, url, username, has_password, tls FROM notify.channels ORDER BY name;
SELECT * FROM notify.channel_secret;
SELECT password FROM notify.channel_secret WHERE channel = 'ops';
UPDATE notify.channel_secret SET password = 'x';
INSERT INTO notify.channel_secret VALUES ('ops', 'x');
-- the channel table itself is readable (it holds no secret) but not writable
SELECT name, url FROM notify.channel WHERE name = 'ops';
UPDATE notify.channel SET url = 'smtp://evil.example.com:25' WHERE name = 'ops';
DELETE FROM notify.channel WHERE name = 'ops';
-- a role outside notify_admin can do none of it
RESET ROLE;
CREATE ROLE regress_notify_nobody;
SET ROLE regress_notify_nobody;
SELECT * FROM notify.channels;
SELECT notify.set_smtp('smtp://relay.example.com:25', 'x@example.com', name => 'x');
RESET ROLE;
-- what the owner sees
SELECT channel, password FROM notify.channel_secret ORDER BY channel;

-- clean up
DROP ROLE regress_notify_ops;
DROP ROLE regress_notify_nobody;
DELETE FROM notify.channel;
SELECT count(*) AS secrets_left FROM notify.channel_secret;

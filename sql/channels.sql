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

--
-- webhook channels: notify.set_webhook; the headers (which may carry a
-- token) are stored with the secrets, and only their names are shown
--
SELECT notify.set_webhook('sms', 'https://sms.example.com/api/v1/send?account=erp',
    $${"to": "{{recipient.phone}}", "text": "{{message.subject}}"}$$,
    '{"Authorization": "Bearer t0ken!", "X-Account": "erp"}', rate_per_minute => 30);
SELECT notify.set_webhook('chat', 'http://127.0.0.1:8080/hook', 'New: {{message.subject}}',
    content_type => 'text/plain; charset=utf-8');
SELECT notify.set_webhook('team', 'HTTPS://chat.example.com/hooks/T01', '{"text": "{{message.text}}"}',
    NULL, 'application/vnd.chat+json');
SELECT name, kind, url, tls, rate_per_minute, content_type, header_names, has_password
  FROM notify.channels WHERE kind = 'webhook' ORDER BY name;
SELECT name, body_template FROM notify.channels WHERE name = 'sms';
-- the view never shows a header value, in any column
SELECT count(*) AS views_showing_a_header_value
  FROM notify.channels c WHERE row_to_json(c)::text LIKE '%t0ken%';
-- set_webhook sets the whole channel: headers not passed are gone
SELECT notify.set_webhook('sms', 'https://sms.example.com/api/v2/send', '{"to": "{{recipient.phone}}"}');
SELECT name, url, tls, rate_per_minute, content_type, header_names FROM notify.channels WHERE name = 'sms';
SELECT channel, headers FROM notify.channel_secret WHERE channel IN ('sms', 'chat', 'team') ORDER BY channel;

-- refused URLs
SELECT notify.set_webhook('x', 'file:///etc/passwd', '{}');
SELECT notify.set_webhook('x', 'smtp://mail.example.com:25', '{}');
SELECT notify.set_webhook('x', 'gopher://host:70/', '{}');
SELECT notify.set_webhook('x', 'ftp://host/file', '{}');
SELECT notify.set_webhook('x', 'https://', '{}');
SELECT notify.set_webhook('x', 'https://user:pw@sms.example.com/send', '{}');
SELECT notify.set_webhook('x', 'https://token@sms.example.com/send', '{}');
SELECT notify.set_webhook('x', E'https://sms.example.com/send\r\nX-Evil: 1', '{}');
SELECT notify.set_webhook('x', E'https://sms.example.com/a\u0001b', '{}');
SELECT notify.set_webhook('x', ' https://sms.example.com/send', '{}');
SELECT notify.set_webhook('x', NULL, '{}');
-- headers: names are tokens, values one line of text; values are never echoed
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', E'{"Authorization": "Bearer abc\\r\\nX-Evil: 1"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": "abc\ndef"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": "a\u0001b"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key\u0001": "v"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": "tab\tbed"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X Key": "v"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key:": "v"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"": "v"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key\r\nX-Evil": "v"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": 42}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": null}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '["Authorization: x"]');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"X-Key": "a", "x-key": "b"}');
-- a Content-Type header is the content type (as pg_net users write it); only a different
-- content_type given as well is refused
SELECT notify.set_webhook('ct', 'https://h.example.com/', '{}', '{"Content-Type": "text/plain; charset=utf-8", "X-Key": "k"}');
SELECT notify.set_webhook('ct2', 'https://h.example.com/', '{}', '{"content-type": "Application/JSON"}',
                          content_type => 'application/json');
SELECT name, content_type, header_names FROM notify.channels WHERE name IN ('ct', 'ct2') ORDER BY name;
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"Content-Type": "text/plain"}', content_type => 'application/json');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"Content-Type": 7}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"Content-Type": "text/plain", "content-TYPE": "text/html"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"Host": "evil.example.com"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', '{"Content-Length": "0"}');
-- the body template is compiled now: a syntax error says where
SELECT notify.set_webhook('x', 'https://h.example.com/', E'{"to": "{{recipient.phone}}",\n "text": "{{#row.items}}{{name}}"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{"to": "{{recipient.phone}"}');
SELECT notify.set_webhook('x', 'https://h.example.com/', NULL);
-- content types
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', content_type => 'json');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', content_type => E'application/json\r\nX-Evil: 1');
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', content_type => NULL);
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', content_type => E'text/plain\u0001');
-- rate and name
SELECT notify.set_webhook('x', 'https://h.example.com/', '{}', rate_per_minute => 0);
SELECT notify.set_webhook('my channel', 'https://h.example.com/', '{}');
SELECT notify.set_webhook(NULL, 'https://h.example.com/', '{}');
-- one name, one kind
SELECT notify.set_smtp('smtp://mail.example.com:25', 'erp@example.com', name => 'mail');
SELECT notify.set_smtp('smtp://mail.example.com:25', 'erp@example.com', name => 'sms');
SELECT notify.set_webhook('mail', 'https://h.example.com/', '{}');
SELECT notify.test_smtp('sms');
-- nothing of that was stored
SELECT name, kind, url FROM notify.channels ORDER BY name;

-- notify_admin: may set a webhook and see its header names, never the values
CREATE ROLE regress_notify_hooks IN ROLE notify_admin;
SET ROLE regress_notify_hooks;
SELECT notify.set_webhook('ops-sms', 'https://sms.example.com/send', '{"to": "{{recipient.phone}}"}',
    '{"Authorization": "Bearer 0ps"}');
SELECT name, url, header_names FROM notify.channels WHERE name = 'ops-sms';
SELECT headers FROM notify.channel_secret WHERE channel = 'ops-sms';
SELECT * FROM notify.channel_secret;
UPDATE notify.channel SET body_template = '{{{row}}}' WHERE name = 'ops-sms';
RESET ROLE;
SELECT headers FROM notify.channel_secret WHERE channel = 'ops-sms';

-- clean up
DROP ROLE regress_notify_hooks;
DELETE FROM notify.channel;
SELECT count(*) AS secrets_left FROM notify.channel_secret;

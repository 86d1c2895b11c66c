--
-- bounces: the bounce mailbox's settings (its password a secret), the VERP
-- bounce_address, the suppressions and what explain() says of them.
--
\set SHOW_CONTEXT never

SELECT notify.set_smtp('smtp://127.0.0.1:25', 'erp@example.com', tls => 'off', name => 'b',
                       bounce_address => 'bounces@example.com');
SELECT name, from_address, bounce_address FROM notify.channels WHERE name = 'b';
-- a bounce_address must be an address that can carry a token after a '+'
SELECT notify.set_smtp('smtp://127.0.0.1:25', 'erp@example.com', name => 'b2', bounce_address => 'b+x@example.com');
SELECT notify.set_smtp('smtp://127.0.0.1:25', 'erp@example.com', name => 'b2', bounce_address => 'no address');

-- the mailbox: imap:// or imaps:// only, no credentials in the URL, a user and a password
SELECT notify.set_bounce_mailbox('file:///etc/passwd', 'u', 'p', channel => 'b');
SELECT notify.set_bounce_mailbox('imap://u:p@127.0.0.1:9/INBOX', 'u', 'p', channel => 'b');
SELECT notify.set_bounce_mailbox('https://127.0.0.1:9/', 'u', 'p', channel => 'b');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', 'u', 'p', 'off', 'b');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', 'u', 'p', 'sometimes', 'b');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', 'u', NULL, channel => 'b');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', NULL, 'p', channel => 'b');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', 'u', 'p', channel => 'nope');
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/INBOX', 'bounces', 's3cret-mailbox', channel => 'b');
SELECT channel, url, username, has_password, tls, leave_unseen FROM notify.bounce_mailboxes;
SELECT channel, password FROM notify.bounce_mailbox_secret;
SELECT notify.check_bounces('nope');

-- a notify_admin member configures it and never reads the password back
CREATE ROLE regress_bounce_admin IN ROLE notify_admin;
SET ROLE regress_bounce_admin;
SELECT notify.set_bounce_mailbox('imaps://127.0.0.1:9/Bounces', 'bounces', 's3cret-2', channel => 'b',
                                 leave_unseen => true);
SELECT channel, url, has_password, leave_unseen FROM notify.bounce_mailboxes;
SELECT row_to_json(b)::text LIKE '%s3cret%' AS view_shows_secret FROM notify.bounce_mailboxes b;
SELECT * FROM notify.bounce_mailbox_secret;
SELECT count(*) AS examined FROM notify.bounce_mail;
SELECT * FROM notify.suppressions;
INSERT INTO notify.suppression (address, reason) VALUES ('x@example.com', 'bounce');
DELETE FROM notify.bounce_mail;
SELECT notify.unsuppress('nobody@example.com');
RESET ROLE;
SELECT name FROM pg_settings WHERE setting LIKE '%s3cret%';

-- suppressions are keyed by the address without case; explain() and fan-out skip them
INSERT INTO notify.suppression (address, reason, status, diagnostic, message_id)
VALUES ('Nobody@Example.com', 'bounce', '5.1.1', '550 5.1.1 <nobody@example.com>: user unknown', 42);
INSERT INTO notify.suppression (address, reason) VALUES ('nobody@example.com', 'bounce');
SELECT notify.set_template('bt', 'Invoice', 'Hello');
SELECT notify.create_rule('bt', 'b.event', 'bt', '{email:nobody@example.com,email:other@example.com}',
                          channel => 'b') > 0 AS rule;
SELECT spec, address, regexp_replace(reason, '\d{4}-\d\d-\d\d \d\d:\d\d \S+', 'DATE') AS reason
  FROM notify.explain('b.event', '{}');
SELECT notify.unsuppress('NOBODY@example.com') AS first, notify.unsuppress('nobody@example.com') AS again;
SELECT spec, reason FROM notify.explain('b.event', '{}');

SELECT notify.drop_bounce_mailbox('b');
SELECT notify.drop_bounce_mailbox('b');
SELECT count(*) AS secrets_left FROM notify.bounce_mailbox_secret;
SELECT notify.drop_rule('bt');
SELECT notify.drop_template('bt');
DELETE FROM notify.channel WHERE name = 'b';
DROP ROLE regress_bounce_admin;

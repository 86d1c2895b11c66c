--
-- rules and the recipient directory: notify.create_rule / drop_rule /
-- enable_rule, notify.set_recipient / drop_recipient.
-- Specs here: email:ADDRESS, field:PATH, recipient:KEY (the others: see directory).
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

SELECT notify.set_template('order.created', 'Order {{row.id}}', 'Order {{row.id}} was created.');
SELECT notify.set_smtp('smtp://127.0.0.1:2525', 'erp@example.com', tls => 'off');

--
-- the directory
--
SELECT notify.set_recipient('user:42', 'ana@example.com', 'Ana García', '+34600000000', 'es_ES') > 0 AS ok;
SELECT notify.set_recipient('customer:17', 'buyer@acme.example') > 0 AS ok;
SELECT notify.set_recipient('user:43', NULL, 'No Mail', '+34600000001') > 0 AS ok;
-- upsert by key: the id stays, the values are replaced
SELECT notify.set_recipient('customer:17', 'orders@acme.example', 'ACME')
       = (SELECT id FROM notify.recipient WHERE key = 'customer:17') AS same_id;
SELECT key, email, display_name, phone, locale FROM notify.recipient ORDER BY key;

-- errors: bad keys, bad addresses
SELECT notify.set_recipient('user42', 'a@example.com');
SELECT notify.set_recipient(':42', 'a@example.com');
SELECT notify.set_recipient('user:', 'a@example.com');
SELECT notify.set_recipient('user: 42', 'a@example.com');
SELECT notify.set_recipient(NULL, 'a@example.com');
SELECT notify.set_recipient('user:44', 'not an address');
SELECT notify.set_recipient('user:44', 'a@');
SELECT notify.set_recipient('user:44', '@example.com');
SELECT notify.set_recipient('user:44', '');
SELECT notify.set_recipient('user:44', E'a@example.com\r\nBcc: evil@example.com');
SELECT notify.set_recipient('user:44', E'a@exam\nple.com');
SELECT notify.set_recipient('user:44', 'josé@example.com');
SELECT notify.set_recipient('user:44', 'a@exämple.com');
SELECT notify.set_recipient('user:44', 'Ana <a@example.com>');
SELECT count(*) AS user_44 FROM notify.recipient WHERE key = 'user:44';

SELECT notify.drop_recipient('user:43');
SELECT notify.drop_recipient('user:43');
SELECT notify.drop_recipient(NULL);

--
-- rules: one per spec kind, then several specs in one rule
--
SELECT notify.create_rule('copy to sales', 'order.created', 'order.created',
                          '{email:sales@example.com}') > 0 AS created;
SELECT notify.create_rule('to the contact', 'order.created', 'order.created',
                          '{field:row.contact_email}') > 0 AS created;
SELECT notify.create_rule('to ana', 'order.created', 'order.created',
                          '{recipient:user:42}') > 0 AS created;
SELECT notify.create_rule('to everyone', 'order.created', 'order.created',
                          ARRAY['email:boss@example.com', 'field:row.customer.email',
                                'recipient:customer:17', 'email:"quoted local"@example.com'],
                          channel => 'email', default_mode => 'off') > 0 AS created;
SELECT name, event_type, template, recipients, channel, default_mode, digest_schedule, enabled, owner
  FROM notify.rule ORDER BY name;

-- errors
SELECT notify.create_rule('r', 'order.created', 'no_such_template', '{email:a@example.com}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}', channel => 'sms');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{}');
SELECT notify.create_rule('r', 'order.created', 'order.created', NULL);
SELECT notify.create_rule('r', 'order created', 'order.created', '{email:a@example.com}');
SELECT notify.create_rule('', 'order.created', 'order.created', '{email:a@example.com}');
SELECT notify.create_rule('copy to sales', 'order.created', 'order.created', '{email:a@example.com}');
-- unknown spec kinds, an unknown group (the other kinds: see the directory test)
SELECT notify.create_rule('r', 'order.created', 'order.created', '{group:sales}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{foo:bar}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{nobody}');
SELECT notify.create_rule('r', 'order.created', 'order.created', ARRAY['email:a@example.com', NULL]);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{a@example.com}');
-- invalid addresses, CR/LF included
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:not-an-address}');
SELECT notify.create_rule('r', 'order.created', 'order.created', ARRAY[E'email:a@b.c\r\nRCPT TO:<x@y>']);
SELECT notify.create_rule('r', 'order.created', 'order.created', ARRAY[E'email:a@b.c\nBcc: x@y']);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:}');
SELECT notify.create_rule('r', 'order.created', 'order.created', $${"email:o'brien@example.com", email:o'brien}$$);
SELECT notify.create_rule('r', 'order.created', 'order.created', ARRAY[E'field:row.email\nBcc']);
-- invalid field paths
SELECT notify.create_rule('r', 'order.created', 'order.created', '{field:row..email}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{"field:row.email; DROP TABLE x"}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{field:}');
-- recipient keys: malformed or unknown
SELECT notify.create_rule('r', 'order.created', 'order.created', '{recipient:user}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{recipient:user:999}');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{recipient:user:43}');
-- default_mode
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}', default_mode => 'sometimes');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}', default_mode => NULL);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}', default_mode => 'digest',
                          digest_schedule => '0 25 * * *');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}', digest_schedule => NULL);
-- a CSV attachment's name is a plain file name
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
                          attach_rows_csv => '../etc/rows.csv');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
                          attach_rows_csv => E'rows\r\n.csv');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
                          attach_rows_csv => ' ');
-- none of those was stored
SELECT count(*) AS rules FROM notify.rule;

-- enable_rule / drop_rule
SELECT notify.enable_rule('to ana', false);
SELECT name, enabled FROM notify.rule WHERE name = 'to ana';
SELECT notify.enable_rule('to ana', true);
SELECT name, enabled FROM notify.rule WHERE name = 'to ana';
SELECT notify.enable_rule('to ana', NULL);
SELECT notify.enable_rule('no such rule', true);
SELECT notify.drop_rule('to the contact');
SELECT notify.drop_rule('to the contact');
SELECT notify.drop_rule('no such rule');
SELECT notify.drop_rule(NULL);
SELECT name FROM notify.rule ORDER BY name;

-- attachments: three columns read by position (any names), the third bytea
SELECT notify.create_rule('files', 'order.created', 'order.created', '{email:a@example.com}',
    attachments_query => $q$SELECT 'a.pdf', 'application/pdf', '\x25504446'::bytea WHERE $1 IS NOT NULL$q$) > 0 AS created;
SELECT notify.drop_rule('files');
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
    attachments_query => $q$SELECT 'a.pdf', 'application/pdf'$q$);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
    attachments_query => $q$SELECT 'a.pdf', 'application/pdf', 'text, not bytes'$q$);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
    attachments_query => $q$SELECT 'a.pdf', 'application/pdf', '\x00'::bytea, 4$q$);
SELECT notify.create_rule('r', 'order.created', 'order.created', '{email:a@example.com}',
    attachments_query => $q$SELECT 1; SELECT 2$q$);

-- a rule's owner is whoever stored it, whatever the row says
CREATE ROLE regress_notify_rules IN ROLE notify_admin;
SET ROLE regress_notify_rules;
SELECT notify.create_rule('by admin', 'order.created', 'order.created', '{email:a@example.com}') > 0 AS created;
UPDATE notify.rule SET owner = 'postgres' WHERE name = 'by admin';
RESET ROLE;
SELECT name, owner FROM notify.rule WHERE name = 'by admin';

-- clean up
SELECT notify.drop_rule(name) FROM notify.rule ORDER BY name;
DELETE FROM notify.recipient;
DELETE FROM notify.template;
DELETE FROM notify.channel;
DROP ROLE regress_notify_rules;

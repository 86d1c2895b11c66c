--
-- the directory: groups (create_group / drop_group / add_member / remove_member),
-- the hierarchy (set_supervisor / unset_supervisor), preferences (set_preference /
-- preferences), live lookups (add_directory / drop_directory), and the recipient
-- specs that use them: group:NAME, key:PATTERN, actor, supervisors.
-- (Resolution by the worker is tested end-to-end; no event is emitted here.)
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

SELECT notify.set_template('dir.t', 'Hi {{recipient.display_name}}', 'Hello.');
SELECT notify.set_smtp('smtp://127.0.0.1:2525', 'erp@example.com', tls => 'off');
SELECT notify.set_smtp('smtp://127.0.0.1:2526', 'erp@example.com', tls => 'off', name => 'backup');
SELECT notify.set_recipient('user:1', 'sara@example.com', 'Sara') > 0 AS ok;
SELECT notify.set_recipient('user:2', 'bob@example.com', 'Bob') > 0 AS ok;
SELECT notify.set_recipient('user:3', 'otto@example.com', 'Otto') > 0 AS ok;

--
-- live lookups: a small table of the ERP's own
--
CREATE TABLE regress_customers (id int PRIMARY KEY, name text, email text, lang text);
INSERT INTO regress_customers VALUES (17, 'ACME', 'orders@acme.example', 'es'),
                                     (18, 'Initech', 'ap@initech.example', NULL);
SELECT notify.add_directory('customer',
    $$SELECT email, name AS display_name, NULL AS phone, lang AS locale
        FROM regress_customers WHERE id = $1::int$$);
-- columns in any order, extra ones ignored, a trailing semicolon and comment are fine
SELECT notify.add_directory('client',
    $$SELECT lang AS locale, id, NULL::text AS phone, name AS display_name, email
        FROM regress_customers WHERE id::text = $1 -- by id;
$$);
SELECT prefix, query, owner FROM notify.directory ORDER BY prefix;
-- the stored query runs with $1 = the id part of the key
SELECT format('PREPARE regress_lookup(text) AS SELECT q.email, q.display_name, q.phone, q.locale FROM (%s
) q',
              query)
  FROM notify.directory WHERE prefix = 'client' \gexec
EXECUTE regress_lookup('17');
DEALLOCATE regress_lookup;
-- upsert by prefix
SELECT notify.add_directory('client', 'SELECT email, name AS display_name, NULL AS phone, lang AS locale FROM regress_customers WHERE id = $1::int');
SELECT prefix, query FROM notify.directory WHERE prefix = 'client';

-- errors: a query that does not parse, lacks a column, or cannot take $1 as text
SELECT notify.add_directory('vendor', 'SELEC email FROM regress_customers');
SELECT notify.add_directory('vendor', 'SELECT email, name AS display_name, lang AS locale FROM regress_customers WHERE id = $1::int');
SELECT notify.add_directory('vendor', 'SELECT email, name AS display_name, NULL AS phone, lang AS locale FROM regress_customers WHERE id = $1');
SELECT notify.add_directory('vendor', 'SELECT email, name AS display_name, NULL AS phone, lang AS locale FROM no_such_table WHERE id = $1::int');
SELECT notify.add_directory('vendor', 'SELECT 1 AS email, 2 AS display_name, 3 AS phone, 4 AS locale WHERE $2 IS NULL');
-- one query only, and no writing
SELECT notify.add_directory('vendor', $$SELECT 'a' AS email, 'b' AS display_name, 'c' AS phone, 'd' AS locale) q; DELETE FROM regress_customers; SELECT * FROM (SELECT 1$$);
SELECT notify.add_directory('vendor', $$DELETE FROM regress_customers RETURNING email, name AS display_name, NULL AS phone, lang AS locale$$);
SELECT count(*) AS customers FROM regress_customers;
SELECT notify.add_directory('vendor', '');
SELECT notify.add_directory('vendor', ' ; ');
SELECT notify.add_directory('vendor', NULL);
-- errors: bad prefixes
SELECT notify.add_directory('ven dor', 'SELECT 1');
SELECT notify.add_directory('vendor:x', 'SELECT 1');
SELECT notify.add_directory('', 'SELECT 1');
SELECT notify.add_directory(NULL, 'SELECT 1');
SELECT prefix FROM notify.directory ORDER BY prefix;

-- drop_directory
SELECT notify.drop_directory('client');
SELECT notify.drop_directory('client');
SELECT notify.drop_directory(NULL);
SELECT prefix FROM notify.directory ORDER BY prefix;

--
-- groups
--
SELECT notify.create_group('sales', 'The sales team') > 0 AS created;
SELECT notify.create_group('support') > 0 AS created;
SELECT name, description FROM notify.recipient_group ORDER BY name;
-- errors
SELECT notify.create_group('sales');
SELECT notify.create_group('');
SELECT notify.create_group('  ');
SELECT notify.create_group(NULL);

-- members: keys set with set_recipient or resolved through a directory
SELECT notify.add_member('sales', 'user:1');
SELECT notify.add_member('sales', 'customer:17');
SELECT notify.add_member('sales', 'customer:999');   -- the directory decides at send time
SELECT notify.add_member('sales', 'user:1');         -- twice: no-op
SELECT notify.add_member('support', 'user:2');
SELECT g.name, m.recipient_key
  FROM notify.group_member m JOIN notify.recipient_group g ON g.id = m.group_id
 ORDER BY g.name, m.recipient_key;
-- errors: unknown group, unknown or malformed keys
SELECT notify.add_member('nosuch', 'user:1');
SELECT notify.add_member(NULL, 'user:1');
SELECT notify.add_member('sales', 'user:99');
SELECT notify.add_member('sales', 'vendor:1');
SELECT notify.add_member('sales', 'user1');
SELECT notify.add_member('sales', 'user: 1');
SELECT notify.add_member('sales', E'user:1\nBcc');
SELECT notify.add_member('sales', NULL);

SELECT notify.remove_member('sales', 'customer:999');
SELECT notify.remove_member('sales', 'customer:999');
SELECT notify.remove_member('nosuch', 'user:1');
SELECT count(*) AS sales_members FROM notify.group_member m JOIN notify.recipient_group g ON g.id = m.group_id
 WHERE g.name = 'sales';

--
-- the hierarchy
--
SELECT notify.set_supervisor('user:1', 'user:2');    -- Bob supervises Sara
SELECT notify.set_supervisor('user:3', 'user:2');    -- and Otto
SELECT notify.set_supervisor('user:1', 'user:2');    -- twice: no-op
SELECT notify.set_supervisor('customer:17', 'user:1');
SELECT subordinate_key, supervisor_key FROM notify.supervisor ORDER BY 1, 2;
-- errors
SELECT notify.set_supervisor('user:1', 'user:1');
SELECT notify.set_supervisor('user:2', 'user:1');    -- Sara cannot supervise her supervisor
SELECT notify.set_supervisor('user:1', 'user:99');
SELECT notify.set_supervisor('nobody:1', 'user:2');
SELECT notify.set_supervisor('user:1', 'user');
SELECT notify.set_supervisor('user:1', NULL);
SELECT notify.unset_supervisor('customer:17', 'user:1');
SELECT notify.unset_supervisor('customer:17', 'user:1');
SELECT notify.unset_supervisor('user:2', 'user:1');
SELECT subordinate_key, supervisor_key FROM notify.supervisor ORDER BY 1, 2;

--
-- the new recipient specs
--
SELECT notify.create_rule('to sales', 'order.created', 'dir.t', '{group:sales}') > 0 AS created;
SELECT notify.create_rule('to sales quietly', 'quote.approved', 'dir.t', '{group:sales}',
                          default_mode => 'off') > 0 AS created;
SELECT notify.create_rule('to the customer', 'payment.received', 'dir.t',
                          ARRAY['key:customer:{row.customer_id}']) > 0 AS created;
SELECT notify.create_rule('to the agents', 'ticket.new', 'dir.t',
                          ARRAY['group:support', 'key:user:{extra.contact_agent}', 'key:user:{row.a}-{row.b_2.c}',
                                'key:customer:17']) > 0 AS created;
SELECT notify.create_rule('copy to the seller', 'visit.recorded', 'dir.t', '{actor}') > 0 AS created;
SELECT notify.create_rule('to the bosses', 'visit.recorded', 'dir.t', '{supervisors}', channel => 'backup')
       > 0 AS created;
SELECT notify.create_rule('to a directory key', 'invoice.paid', 'dir.t', '{recipient:customer:18}') > 0 AS created;
SELECT name, event_type, recipients, channel, default_mode FROM notify.rule ORDER BY name COLLATE "C";

-- errors: groups
SELECT notify.create_rule('r', 'x', 'dir.t', '{group:nosuch}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{group:}');
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY[E'group:sa\nles']);
-- errors: key patterns
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:vendor:{row.vendor_id}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key::17']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer: {row.id}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:{row.kind}:{row.id}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:{row.customer_id']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:row.customer_id}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:{{row.customer_id}}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:{row..id}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:{}']);
SELECT notify.create_rule('r', 'x', 'dir.t', ARRAY['key:customer:{row.id;drop}']);
-- errors: actor and supervisors take no argument; spelling matters
SELECT notify.create_rule('r', 'x', 'dir.t', '{actor:user:1}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{supervisors:}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{Actor}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{supervisor}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{team:sales}');
-- errors: recipient keys, including those of a prefix without a directory
SELECT notify.create_rule('r', 'x', 'dir.t', '{recipient:vendor:1}');
SELECT notify.create_rule('r', 'x', 'dir.t', '{recipient:user:99}');
SELECT count(*) AS rules FROM notify.rule WHERE name = 'r';

-- a group a rule sends to cannot be dropped
SELECT notify.drop_group('sales');
SELECT notify.create_group('empty') > 0 AS created;
SELECT notify.add_member('empty', 'user:3');
SELECT notify.drop_group('empty');
SELECT notify.drop_group('empty');
SELECT notify.drop_group(NULL);
SELECT count(*) AS orphan_members FROM notify.group_member m
 WHERE NOT EXISTS (SELECT 1 FROM notify.recipient_group g WHERE g.id = m.group_id);

--
-- preferences
--
-- Sara (user:1): in group sales (order.created immediate, quote.approved off), an actor
-- (visit.recorded), a possible contact agent (ticket.new); she supervises nobody (any more)
SELECT * FROM notify.preferences('user:1');
-- Bob (user:2): in support (ticket.new), a supervisor (visit.recorded on backup), an actor
SELECT * FROM notify.preferences('user:2');
-- customers from the directory: the group, key patterns and recipient: spec that reach them
SELECT * FROM notify.preferences('customer:17');
SELECT * FROM notify.preferences('customer:18');
-- stored preferences override the defaults, and stand for event types no rule covers
SELECT notify.set_preference('user:1', 'quote.approved', 'immediate');
SELECT notify.set_preference('user:1', 'order.created', 'off');
SELECT notify.set_preference('user:1', 'order.created', 'digest');   -- upsert
SELECT notify.set_preference('user:1', 'zzz.unused', 'off', 'backup');
SELECT notify.set_preference('customer:17', 'payment.received', 'off');
SELECT recipient_key, event_type, channel, mode FROM notify.preference ORDER BY 1, 2, 3;
SELECT * FROM notify.preferences('user:1');
SELECT * FROM notify.preferences('customer:17');
-- a disabled rule is not something one could receive (order.created is gone)
SELECT notify.enable_rule('to sales', false);
SELECT * FROM notify.preferences('customer:17');
SELECT notify.enable_rule('to sales', true);
-- two rules of one event type and channel that differ: immediate wins (quote.approved)
SELECT notify.create_rule('to sales on quotes', 'quote.approved', 'dir.t', '{group:sales}') > 0 AS created;
SELECT * FROM notify.preferences('customer:17');
-- a key pattern reaches only the keys it can produce
SELECT notify.create_rule('to pairs', 'pair.made', 'dir.t', ARRAY['key:user:{row.a}-{row.b}']) > 0 AS created;
SELECT notify.set_recipient('user:4-5', 'pair@example.com') > 0 AS ok;
SELECT * FROM notify.preferences('user:4-5') WHERE event_type = 'pair.made';
SELECT * FROM notify.preferences('user:2') WHERE event_type = 'pair.made';
-- errors: modes, keys, event types, channels
SELECT notify.set_preference('user:1', 'order.created', 'sometimes');
SELECT notify.set_preference('user:1', 'order.created', NULL);
SELECT notify.set_preference('user:1', 'order.created', 'OFF');
SELECT notify.set_preference('user:99', 'order.created', 'off');
SELECT notify.set_preference('user', 'order.created', 'off');
SELECT notify.set_preference('user:1', 'order created', 'off');
SELECT notify.set_preference('user:1', NULL, 'off');
SELECT notify.set_preference('user:1', 'order.created', 'off', 'sms');
SELECT notify.set_preference('user:1', 'order.created', 'off', NULL);
SELECT * FROM notify.preferences('user:99');
SELECT * FROM notify.preferences('user');
SELECT * FROM notify.preferences(NULL);
-- a key dropped from the directory still shows what was stored for it
SELECT notify.drop_recipient('user:3');
SELECT * FROM notify.preferences('user:3');

--
-- rights: a notify_admin member manages the directory, an ordinary role cannot
--
CREATE ROLE regress_notify_dir_admin IN ROLE notify_admin;
CREATE ROLE regress_notify_dir_user;
GRANT SELECT ON regress_customers TO regress_notify_dir_admin;
SET ROLE regress_notify_dir_admin;
SELECT notify.create_group('by admin') > 0 AS created;
SELECT notify.add_member('by admin', 'customer:18');
SELECT notify.set_supervisor('customer:18', 'user:1');
SELECT notify.set_preference('customer:18', 'invoice.paid', 'off');
SELECT * FROM notify.preferences('customer:18');
SELECT notify.add_directory('buyer', 'SELECT email, name AS display_name, NULL AS phone, lang AS locale FROM regress_customers WHERE id = $1::int');
-- the owner is whoever stored the row, whatever the row says
UPDATE notify.directory SET owner = 'postgres' WHERE prefix = 'buyer';
SELECT notify.remove_member('by admin', 'customer:18');
SELECT notify.unset_supervisor('customer:18', 'user:1');
SELECT notify.drop_group('by admin');
RESET ROLE;
SELECT prefix, owner FROM notify.directory ORDER BY prefix;
-- the query is checked with the rights of whoever registers it
REVOKE SELECT ON regress_customers FROM regress_notify_dir_admin;
SET ROLE regress_notify_dir_admin;
SELECT notify.add_directory('buyer', 'SELECT email, name AS display_name, NULL AS phone, lang AS locale FROM regress_customers WHERE id = $1::int');
SELECT notify.drop_directory('buyer');
RESET ROLE;
SET ROLE regress_notify_dir_user;
SELECT notify.create_group('by user');
SELECT notify.add_member('sales', 'user:1');
SELECT notify.set_supervisor('user:1', 'user:2');
SELECT notify.set_preference('user:1', 'order.created', 'off');
SELECT * FROM notify.preferences('user:1');
SELECT notify.add_directory('x', 'SELECT 1');
SELECT * FROM notify.group_member;
RESET ROLE;

-- clean up
SELECT notify.drop_rule(name) FROM notify.rule ORDER BY name;
SELECT notify.drop_group(name) FROM notify.recipient_group ORDER BY name;
SELECT notify.drop_directory(prefix) FROM notify.directory ORDER BY prefix;
DELETE FROM notify.supervisor;
DELETE FROM notify.preference;
DELETE FROM notify.recipient;
DELETE FROM notify.template;
DELETE FROM notify.channel;
DROP TABLE regress_customers;
DROP ROLE regress_notify_dir_admin;
DROP ROLE regress_notify_dir_user;

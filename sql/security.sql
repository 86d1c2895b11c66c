--
-- security: the permission boundaries, as an application role and as a
-- notify_admin member, with the errors they get.
--
\set SHOW_CONTEXT never

CREATE TABLE sec_orders (id int PRIMARY KEY, total numeric);
CREATE TABLE sec_salaries (who text, amount int);
INSERT INTO sec_salaries VALUES ('ceo', 99999);
SELECT notify.watch('sec_orders', 'sec.order') IS NOT NULL AS watched;
SELECT notify.set_smtp('smtp://127.0.0.1:25', 'erp@example.com', 'erp', 's3cret-pw', tls => 'off', name => 'sec');

CREATE ROLE regress_sec_app;            -- the ERP's application role
GRANT INSERT, SELECT ON sec_orders TO regress_sec_app;
CREATE ROLE regress_sec_admin IN ROLE notify_admin;

-- 1. the application role: its table rights are all it needs, from the first insert of
--    a new session on (the capture trigger writes the event as the outbox's owner) ...
\c -
SET ROLE regress_sec_app;
INSERT INTO sec_orders VALUES (1, 10);
-- ... and it can see or do nothing in schema notify
SELECT count(*) FROM notify.event;
SELECT * FROM notify.delivery_log;
SELECT notify.emit('sec.order', '{}');
SELECT notify.create_rule('x', 'x', 'x', '{email:a@example.com}');
SELECT notify.schedule('x', '@daily', 'SELECT 1', 'x');
RESET ROLE;
SELECT event_type, op, row->>'id' AS id FROM notify.event WHERE event_type = 'sec.order';

-- 2. a notify_admin member manages the configuration and reads the log ...
SET ROLE regress_sec_admin;
SELECT notify.set_template('sec', 'Order {{row.id}}', 'Total {{row.total}}');
SELECT notify.create_rule('sec', 'sec.order', 'sec', '{email:boss@example.com}', channel => 'sec') > 0 AS rule;
SELECT count(*) >= 0 AS reads_log FROM notify.delivery_log;
SELECT name, has_password FROM notify.channels WHERE name = 'sec';
-- ... but never sees a secret
SELECT * FROM notify.channel_secret;
SELECT row_to_json(c)::text LIKE '%s3cret%' AS view_shows_secret FROM notify.channels c WHERE name = 'sec';
-- ... cannot read through a rule or a schedule what it cannot read itself
SELECT notify.create_rule('peek', 'sec.order', 'sec', '{email:boss@example.com}', channel => 'sec',
                          context_query => 'SELECT to_jsonb(s) FROM public.sec_salaries s');
SELECT notify.schedule('peek', '@daily', 'SELECT * FROM public.sec_salaries', 'sec.peek');
-- ... cannot make its rule or schedule run as someone else
SELECT notify.schedule('mine', '@daily', 'SELECT 1 AS x', 'sec.mine') > 0 AS scheduled;
UPDATE notify.schedule SET owner = 'postgres' WHERE name = 'mine';
UPDATE notify.rule SET owner = 'postgres' WHERE name = 'sec';
SELECT (SELECT owner FROM notify.schedule WHERE name = 'mine') AS schedule_owner,
       (SELECT owner FROM notify.rule WHERE name = 'sec') AS rule_owner;
-- ... cannot plant objects the worker would execute with its rights
CREATE TRIGGER sec_plant BEFORE INSERT ON notify.message FOR EACH ROW EXECUTE FUNCTION notify._stamp_owner();
CREATE RULE sec_plant AS ON INSERT TO notify.event DO ALSO NOTHING;
CREATE POLICY sec_plant ON notify.rule USING (true);
ALTER TABLE notify.message DISABLE TRIGGER ALL;
ALTER TABLE notify.schedule DISABLE TRIGGER stamp_owner;
SET session_replication_role = replica;
-- ... cannot write the queue or the log behind the worker's back
INSERT INTO notify.message (event_type, address, channel) VALUES ('x', 'a@example.com', 'sec');
UPDATE notify.message SET status = 'sent';
DELETE FROM notify.attempt;
INSERT INTO notify.event (event_type, op) VALUES ('x', 'EMIT');
-- ... nor change the worker's settings
ALTER SYSTEM SET notify.workers = 1;
SET notify.retention = 0;
RESET ROLE;

-- 3. every SECURITY DEFINER function pins its search_path
SELECT p.oid::regprocedure AS definer_without_search_path
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace AND p.prosecdef
   AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog, pg_temp%', false);
-- every function pins its search_path, but those that run no SQL of their own,
-- and the capture trigger and emit (on the ERP's hot path: they pin it in C
-- around the statement they run, when they run one)
SELECT p.oid::regprocedure AS not_pinned
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace
   AND NOT coalesce(p.proconfig::text LIKE '%search_path=pg_catalog, pg_temp%', false)
 ORDER BY 1::text;
-- and PUBLIC can execute nothing in the schema
SELECT p.oid::regprocedure AS executable_by_public
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace AND has_function_privilege('public', p.oid, 'EXECUTE');
-- no setting holds a secret
SELECT name FROM pg_settings WHERE setting LIKE '%s3cret%';

SELECT notify.unschedule('mine');
SELECT notify.drop_rule('sec');
SELECT notify.unwatch('sec_orders', 'sec.order');
DELETE FROM notify.event;
DELETE FROM notify.channel WHERE name = 'sec';
DROP TABLE sec_orders, sec_salaries;
DROP OWNED BY regress_sec_app, regress_sec_admin;
DROP ROLE regress_sec_app;
DROP ROLE regress_sec_admin;

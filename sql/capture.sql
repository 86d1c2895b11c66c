--
-- capture: notify.watch / notify.unwatch / notify.emit and the trigger.
-- The worker runs in the background and may set processed_at/status on
-- events at any time: only the columns written by the capture are shown.
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

CREATE TABLE erp_order (
    id          integer PRIMARY KEY,
    customer_id integer,
    seller_id   integer,
    status      text NOT NULL DEFAULT 'draft',
    amount      numeric(12,2),
    note        text
);

-- trigger names carry the watch's id: shown as N so that the file does not
-- depend on what other tests watched before
CREATE FUNCTION pg_temp.n(t text) RETURNS text LANGUAGE sql
    AS $$ SELECT regexp_replace(t, 'notify_[0-9]+_', 'notify_N_', 'g') $$;

-- the events of one type, in the order they were written
CREATE FUNCTION pg_temp.events(t text)
    RETURNS TABLE (event_type text, op text, table_name text, actor text,
                   "row" jsonb, old jsonb, changed text[])
    LANGUAGE sql AS $$
    SELECT e.event_type, e.op, e.table_name, e.actor, e.row, e.old, e.changed
      FROM notify.event e WHERE e.event_type = t ORDER BY e.id
$$;

-- INSERT, with the actor from a column and a prefix
SELECT pg_temp.n(notify.watch('erp_order', 'order.created', actor_column => 'seller_id',
                              actor_prefix => 'seller')) AS triggers;
-- UPDATE with a condition over OLD and NEW
SELECT pg_temp.n(notify.watch('erp_order', 'order.approved', '{update}',
        condition => $$OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'approved'$$))
       AS triggers;
-- UPDATE and DELETE for the audit, operations normalised and deduplicated
SELECT pg_temp.n(notify.watch('public.erp_order'::regclass, 'order.audit',
                              '{" Update ",DELETE,update}')) AS triggers;

SELECT pg_temp.n(tgname) AS tgname, pg_temp.n(pg_get_triggerdef(oid)) AS definition
  FROM pg_trigger WHERE tgrelid = 'erp_order'::regclass ORDER BY tgname;

SELECT w.tbl, w.event_type, w.ops, w.condition, w.actor_column, w.actor_prefix,
       pg_temp.n(w.triggers::text) AS triggers, w.owner
  FROM notify.watch w ORDER BY w.event_type;

-- committed INSERT: one event, actor 'seller:' || seller_id
INSERT INTO erp_order (id, customer_id, seller_id, amount, note)
VALUES (1, 17, 7, 1000.50, 'first'), (2, 18, NULL, 20, NULL);
SELECT * FROM pg_temp.events('order.created');

-- a rolled-back INSERT leaves no event
BEGIN;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (3, 19, 7, 5);
ROLLBACK;
SELECT count(*) AS events_of_rolled_back_order
  FROM notify.event WHERE event_type = 'order.created' AND row ->> 'id' = '3';

-- an error later in the transaction takes the event away with it
BEGIN;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (4, 19, 7, 5);
INSERT INTO erp_order (id) VALUES (1);  -- duplicate key
COMMIT;
SELECT count(*) AS events_of_failed_transaction
  FROM notify.event WHERE event_type = 'order.created' AND row ->> 'id' = '4';

-- the actor from SET LOCAL notify.actor when the row has none
BEGIN;
SET LOCAL notify.actor = 'user:42';
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (5, 20, NULL, 1);
-- ... and the row's actor column wins over it
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (6, 20, 8, 1);
COMMIT;
SHOW notify.actor;
SELECT row ->> 'id' AS id, actor FROM pg_temp.events('order.created');

-- UPDATE: only the updates that match the condition become order.approved;
-- every update is audited with the changed columns in table order
UPDATE erp_order SET note = 'edited' WHERE id = 1;          -- no status change
UPDATE erp_order SET status = 'sent' WHERE id = 1;          -- not approved
UPDATE erp_order SET status = 'approved', amount = 999.99 WHERE id = 1;  -- yes
UPDATE erp_order SET status = 'approved' WHERE id = 1;      -- already approved
UPDATE erp_order SET note = NULL WHERE id = 2;              -- null to null: nothing changed
SELECT * FROM pg_temp.events('order.approved');
SELECT op, row ->> 'id' AS id, changed, old ->> 'note' AS old_note, row ->> 'note' AS new_note
  FROM pg_temp.events('order.audit');

-- DELETE: row and old are both the deleted row, no changed columns
DELETE FROM erp_order WHERE id = 2;
SELECT * FROM pg_temp.events('order.audit') WHERE op = 'DELETE';

-- emit: returns the new event's id; payload in row; actor from the argument,
-- else from notify.actor, else none
SELECT notify.emit('invoice.reminder', '{"invoice": 12, "due": "2024-05-01"}', 'user:1') > 0 AS emitted;
BEGIN;
SET LOCAL notify.actor = 'user:2';
SELECT notify.emit('invoice.reminder', '{"invoice": 13}') > 0 AS emitted;
SELECT notify.emit('invoice.reminder', '{"invoice": 14}', 'user:3') > 0 AS emitted;
COMMIT;
SELECT notify.emit('invoice.reminder', NULL) > 0 AS emitted;
SELECT * FROM pg_temp.events('invoice.reminder');
-- emit's ids increase
SELECT notify.emit('id.check', '{}') < notify.emit('id.check', '{}') AS increasing;
-- a rolled-back emit leaves nothing
BEGIN;
SELECT notify.emit('emit.rolled_back', '{}') > 0 AS emitted;
ROLLBACK;
SELECT count(*) AS rolled_back_emits FROM notify.event WHERE event_type = 'emit.rolled_back';

-- errors
SELECT notify.watch('erp_order', 'order created');
SELECT notify.watch('erp_order', NULL);
SELECT notify.watch('erp_order', 'order.x', '{INSERT,TRUNCATE}');
SELECT notify.watch('erp_order', 'order.x', '{}');
SELECT notify.watch('erp_order', 'order.x', actor_column => 'salesman_id');
SELECT notify.watch('erp_order', 'order.x', actor_column => 'seller_id', actor_prefix => 'sel:ler');
SELECT notify.watch('erp_order', 'order.created');
-- (terse: PostgreSQL's own error quotes the CREATE TRIGGER, with the watch id in it)
\set VERBOSITY terse
SELECT notify.watch('erp_order', 'order.x', '{INSERT}', condition => 'OLD.status = ''x''');
SELECT notify.watch('erp_order', 'order.x', '{UPDATE}', condition => 'NEW.no_such_column = 1');
\set VERBOSITY default
-- a condition is one expression: it cannot close the WHEN clause and add statements
SELECT notify.watch('erp_order', 'order.x', '{INSERT}', condition => 'true) EXECUTE FUNCTION pg_catalog.now(); DROP TABLE erp_order; --');
SELECT notify.watch('erp_order', 'order.x', '{INSERT}', condition => 'NEW.total > 0) --');
SELECT notify.watch('erp_order', 'order.x', '{INSERT}', condition => 'true FROM pg_class WHERE true');
SELECT notify.watch('erp_order', 'order.x', '{INSERT}', condition => 'NEW.total > 0; SELECT 1');
SELECT to_regclass('erp_order') IS NOT NULL AS erp_order_still_there;
SELECT notify.watch('no_such_table', 'order.x');
SELECT notify.watch(NULL, 'order.x');
SELECT notify.unwatch(NULL, 'order.x');
SELECT notify.unwatch('erp_order', 'order.unknown');
SELECT notify.emit('bad type!', '{}');
SELECT notify.emit('', '{}');
SELECT notify.emit(NULL, '{}');
-- the failed watches left nothing behind
SELECT count(*) AS watches FROM notify.watch;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'erp_order'::regclass;

-- the trigger function is for triggers only
SELECT notify.capture();
CREATE TABLE not_after (id integer);
CREATE TRIGGER t BEFORE INSERT ON not_after FOR EACH ROW EXECUTE FUNCTION notify.capture('x');
INSERT INTO not_after VALUES (1);
DROP TABLE not_after;

-- an application role with nothing but INSERT on a watched table: the event
-- is written with the extension's rights
CREATE ROLE regress_notify_app;
GRANT INSERT ON erp_order TO regress_notify_app;
SET ROLE regress_notify_app;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (10, 30, 9, 42.00);
SELECT count(*) FROM notify.event;  -- the role cannot read the outbox
SELECT notify.emit('x', '{}');      -- nor call the functions
RESET ROLE;
SELECT * FROM pg_temp.events('order.created') WHERE row ->> 'id' = '10';

-- watch runs with the caller's rights: a notify_admin member needs the
-- TRIGGER privilege on the table, as for CREATE TRIGGER by hand
CREATE ROLE regress_notify_manager IN ROLE notify_admin;
SET ROLE regress_notify_manager;
\set VERBOSITY terse
SELECT notify.watch('erp_order', 'order.by_manager');
\set VERBOSITY default
RESET ROLE;
GRANT TRIGGER ON erp_order TO regress_notify_manager;
SET ROLE regress_notify_manager;
SELECT pg_temp.n(notify.watch('erp_order', 'order.by_manager')) AS triggers;
SELECT w.event_type, w.owner FROM notify.watch w WHERE w.event_type = 'order.by_manager';
RESET ROLE;
SELECT notify.unwatch('erp_order', 'order.by_manager');

-- tables whose names need quoting, and long event types
CREATE TABLE "Order Lines" (id integer, "Qty" integer);
SELECT pg_temp.n(notify.watch('"Order Lines"', 'order_line.changed.' || repeat('x', 60), '{INSERT,UPDATE}'))
       AS triggers;
INSERT INTO "Order Lines" VALUES (1, 2);
UPDATE "Order Lines" SET "Qty" = 3;
SELECT op, table_name, row, old, changed FROM pg_temp.events('order_line.changed.' || repeat('x', 60));
SELECT notify.unwatch('"Order Lines"', 'order_line.changed.' || repeat('x', 60));
DROP TABLE "Order Lines";

-- the captured row equals to_jsonb(row) for every kind of column (capture
-- writes it without to_jsonb, see src/rowjson.c), also after the table
-- changes and after its schema is renamed
CREATE SCHEMA rowjson_s;
CREATE TYPE rowjson_s.mood AS ENUM ('sad', 'happy');
CREATE TYPE rowjson_s.pair AS (a integer, b text);
CREATE DOMAIN rowjson_s.posint AS integer CHECK (VALUE > 0);
CREATE TABLE rowjson_s.kinds (
    id integer, b boolean, i2 smallint, i8 bigint, n numeric, n2 numeric(6,2),
    f4 real, f8 double precision, d date, ts timestamp, tstz timestamptz,
    t text, vc varchar(10), ch char(3), j json, jb jsonb, u uuid, by bytea,
    iv interval, m money, o oid, ip inet, arr integer[], tarr text[][],
    rec rowjson_s.pair, e rowjson_s.mood, dom rowjson_s.posint, rng int4range,
    x xml, pt point
);
SELECT pg_temp.n(notify.watch('rowjson_s.kinds', 'rowjson.kinds', '{insert,update}')) AS triggers;
INSERT INTO rowjson_s.kinds VALUES
  (1, true, -32768, 9223372036854775807, 'NaN', 1234.5, 'Infinity', -1.5e-300,
   'infinity', '2026-03-29 02:30:00.123456', '2026-10-25 01:59:59+02',
   E'tab\there "quoted" \\ é 😀 \u0001', 'abc', 'x', '{"b": [1, 2.50, null], "a": "é"}',
   '"just a string"', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '\xdeadbeef',
   '1 day 02:03:04', 12.34, 4294967295, '192.168.0.1/24', '{1,NULL,3}',
   '{{a,b},{"c d",NULL}}', ROW(7, 'seven'), 'happy', 42, '[1,10)',
   '<a>x</a>', '(1.5,2)'),
  (2, NULL, 0, 0, '-Infinity', -0.01, 'NaN', 0, '-infinity', '-infinity', 'infinity',
   '', NULL, NULL, 'null', '[]', NULL, '\x', '-1 month', NULL, 0, NULL, '{}',
   NULL, ROW(NULL, NULL), NULL, NULL, 'empty', NULL, NULL),
  (3, false, 1, -1, 12345678901234567890.123456789, 0, -0.0, 1e308, '2026-01-01',
   '1999-12-31 23:59:59', '2000-01-01 00:00:00+14', repeat('long ', 500), 'ten chars!',
   'ab', '123', '{"nested": {"k": [true, false]}}', NULL, NULL, NULL, NULL, NULL, NULL,
   '{-1}', '{{x}}', NULL, 'sad', 1, '(,)', NULL, NULL);
-- what to_jsonb gives now, before the table changes
CREATE TEMP TABLE rowjson_expected AS
    SELECT 'INSERT' AS op, k.id, to_jsonb(k) AS j FROM rowjson_s.kinds k;
ALTER TABLE rowjson_s.kinds DROP COLUMN by, ADD COLUMN added text DEFAULT 'dflt';
INSERT INTO rowjson_s.kinds (id, t) VALUES (4, 'after alter');
UPDATE rowjson_s.kinds SET t = 'updated' WHERE id = 1;
ALTER SCHEMA rowjson_s RENAME TO rowjson_r;
INSERT INTO rowjson_r.kinds (id, t) VALUES (5, 'after schema rename');
INSERT INTO rowjson_expected
    SELECT CASE k.id WHEN 1 THEN 'UPDATE' ELSE 'INSERT' END, k.id, to_jsonb(k)
      FROM rowjson_r.kinds k WHERE k.id IN (1, 4, 5);
SELECT e.op, e.table_name, x.id, e.row = x.j AS row_equals_to_jsonb,
       e.old = (SELECT j FROM rowjson_expected o WHERE o.op = 'INSERT' AND o.id = x.id) - 'by'
           || '{"added": "dflt"}' AS old_equals,
       (SELECT count(*) FROM jsonb_object_keys(e.row)) AS keys
  FROM notify.event e
  JOIN rowjson_expected x ON x.id = (e.row ->> 'id')::integer AND x.op = e.op
 WHERE e.event_type = 'rowjson.kinds' ORDER BY e.id;
SELECT e.row -> 'n' AS n, e.row -> 'f4' AS f4, e.row -> 'f8' AS f8, e.row -> 'd' AS d,
       e.row -> 'tstz' AS tstz, e.row -> 'j' AS j, e.row -> 'rec' AS rec, e.row -> 'dom' AS dom
  FROM notify.event e WHERE e.event_type = 'rowjson.kinds' AND e.op = 'INSERT' ORDER BY e.id LIMIT 3;
-- a table of scalar columns only is written directly in jsonb's key order
-- (shorter keys first, then bytewise): every key is found by ->, and the
-- text is to_jsonb's
CREATE TABLE rowjson_r.scalars (
    "bb" integer, "a" text, "aa" numeric, "b" boolean, "ccc" date, "é" real,
    "A" timestamptz, "Zz" uuid, "_" text, "long name with spaces" double precision
);
SELECT pg_temp.n(notify.watch('rowjson_r.scalars', 'rowjson.scalars')) AS triggers;
INSERT INTO rowjson_r.scalars VALUES
  (1, 'x', 'NaN', true, '2026-01-01', 'Infinity', '2026-03-29 01:30+00',
   'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', 'empty key', 1e-10),
  (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL);
SELECT k.bb, e.row = to_jsonb(k) AS equal, e.row::text = to_jsonb(k)::text AS same_text,
       (SELECT bool_and(e.row -> key IS NOT DISTINCT FROM to_jsonb(k) -> key)
          FROM jsonb_object_keys(to_jsonb(k)) key) AS every_key_found
  FROM notify.event e JOIN rowjson_r.scalars k ON (e.row ->> 'bb')::int IS NOT DISTINCT FROM k.bb
 WHERE e.event_type = 'rowjson.scalars' ORDER BY e.id;
SELECT notify.unwatch('rowjson_r.scalars', 'rowjson.scalars');
SELECT notify.unwatch('rowjson_r.kinds', 'rowjson.kinds');
DROP SCHEMA rowjson_r CASCADE;

-- the rendering context (notify._event_context, in C) is the one the SQL
-- definition of version 0.1 built, for every event written so far and for
-- emitted scalars, changes naming missing or null columns, and schedule rows
CREATE FUNCTION pg_temp.ctx_sql(e notify.event) RETURNS jsonb LANGUAGE sql AS $$
    SELECT jsonb_build_object(
        'row', e.row, 'old', e.old,
        'changes', CASE WHEN e.changed IS NULL THEN NULL ELSE
            (SELECT coalesce(jsonb_agg(jsonb_build_object(
                        'column', c.col, 'old', e.old -> c.col, 'new', e.row -> c.col) ORDER BY c.n), '[]')
               FROM unnest(e.changed) WITH ORDINALITY AS c(col, n)) END,
        'event', jsonb_build_object(
            'id', e.id, 'type', e.event_type, 'op', e.op, 'table', e.table_name,
            'occurred_at', e.occurred_at, 'actor', e.actor, 'schedule', e.schedule))
    || CASE WHEN e.rows IS NULL THEN '{}'::jsonb
            ELSE jsonb_build_object('rows', e.rows, 'row_count', jsonb_array_length(e.rows)) END
$$;
SELECT count(*) > 0 AS emitted FROM (SELECT notify.emit('ctx.scalar', '42'), notify.emit('ctx.array', '[1, "a"]'),
                                             notify.emit('ctx.string', '"s"'), notify.emit('ctx.null', 'null')) x;
INSERT INTO notify.event (event_type, op, actor, row, old, changed)
VALUES ('ctx.changes', 'UPDATE', 'tester', '{"a": 1, "b": null, "c": [1]}', '{"a": 0, "c": {"x": 1}}',
        '{a,b,c,gone,NULL}'),
       ('ctx.changes', 'UPDATE', NULL, '{"a": 1}', '7', '{}');
INSERT INTO notify.event (event_type, op, schedule, rows, columns)
VALUES ('ctx.schedule', 'SCHEDULE', 'nightly', '[{"sku": "A-1", "qty": 0}, {"sku": "B", "qty": null}]', '{sku,qty}'),
       ('ctx.schedule', 'SCHEDULE', 'nightly', '[]', '{}');
SELECT count(*) AS events, count(*) FILTER (WHERE notify._event_context(e) IS DISTINCT FROM pg_temp.ctx_sql(e))
       AS different
  FROM notify.event e;
SELECT jsonb_pretty(notify._event_context(e) - 'event') AS context
  FROM notify.event e WHERE e.event_type = 'ctx.changes' ORDER BY e.id LIMIT 1;
SELECT notify._event_context(e) -> 'row_count' AS row_count
  FROM notify.event e WHERE e.event_type = 'ctx.schedule' ORDER BY e.id;

-- one transaction writes many events through the outbox it opened once: a savepoint
-- rolled back takes its events away and the others stay; an error caught in a
-- subtransaction too; a transaction that changes notify.event meanwhile goes on
BEGIN;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (21, 40, 7, 1);
SAVEPOINT s1;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (22, 40, 7, 1);
ROLLBACK TO s1;
DO $$ BEGIN
    INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (23, 40, 7, 1);
    INSERT INTO erp_order (id) VALUES (21);     -- duplicate key: the block's events go
EXCEPTION WHEN unique_violation THEN NULL;
END $$;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (24, 40, 7, 1);
ALTER TABLE notify.event ALTER COLUMN actor SET STATISTICS 200;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (25, 40, 7, 1);
COMMIT;
SELECT array_agg((row ->> 'id')::int ORDER BY id) AS captured
  FROM notify.event WHERE event_type = 'order.created' AND (row ->> 'id')::int BETWEEN 21 AND 25;
BEGIN;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (26, 40, 7, 1);
ROLLBACK;
SELECT count(*) AS rolled_back FROM notify.event WHERE (row ->> 'id')::int = 26;
-- DDL on notify.event in the transaction that captured finds it free
-- (the lock first: a worker fanning out meanwhile would deadlock with the DDL)
BEGIN;
LOCK TABLE notify.event IN ACCESS EXCLUSIVE MODE;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (27, 40, 7, 1);
CREATE INDEX event_regress_idx ON notify.event (actor);
DROP INDEX notify.event_regress_idx;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (28, 40, 7, 1);
COMMIT;
SELECT array_agg((row ->> 'id')::int ORDER BY id) AS captured
  FROM notify.event WHERE event_type = 'order.created' AND (row ->> 'id')::int BETWEEN 27 AND 28;
ALTER TABLE notify.event ALTER COLUMN actor SET STATISTICS -1;

-- unwatch drops the triggers; later changes are not captured
SELECT notify.unwatch('erp_order', 'order.created');
SELECT pg_temp.n(tgname) AS tgname FROM pg_trigger WHERE tgrelid = 'erp_order'::regclass ORDER BY 1;
INSERT INTO erp_order (id, customer_id, seller_id, amount) VALUES (11, 30, 9, 1);
SELECT count(*) AS captured_after_unwatch
  FROM notify.event WHERE event_type = 'order.created' AND row ->> 'id' = '11';
SELECT notify.unwatch('erp_order', 'order.created');
-- a watch can be set again after unwatch
SELECT pg_temp.n(notify.watch('erp_order', 'order.created')) AS triggers;
SELECT notify.unwatch('erp_order', 'order.created');
SELECT notify.unwatch('erp_order', 'order.approved');
SELECT notify.unwatch('erp_order', 'order.audit');
SELECT count(*) AS watches FROM notify.watch;
SELECT count(*) AS triggers FROM pg_trigger WHERE tgrelid = 'erp_order'::regclass;

REVOKE ALL ON erp_order FROM regress_notify_app, regress_notify_manager;
DROP ROLE regress_notify_app;
DROP ROLE regress_notify_manager;
DROP TABLE erp_order;

--
-- schedules: notify.schedule's checks, cron errors that name the field,
-- next_run, the dedupe pattern and the CSV of a report's rows.
--
\set SHOW_CONTEXT never

CREATE TABLE sched_invoice (id int PRIMARY KEY, due date);
INSERT INTO sched_invoice VALUES (1, '2026-01-10'), (2, '2026-01-20');

-- a valid schedule, as the views show it
SELECT notify.schedule('reminders', '0 9 * * 1-5',
                       'SELECT id, due FROM sched_invoice', 'invoice.due',
                       dedupe_key => 'invoice-{row.id}-due') > 0 AS created;
SELECT name, cron, event_type, owner, per_row, dedupe_key, next_run > now() AS in_future, last_run
  FROM notify.schedules;

-- cron expressions: what is wrong, and where
SELECT notify.schedule('bad', '61 * * * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '* 24 * * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '* * 0 * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '* * * 13 *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '* * * * fry', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '*/0 * * * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '5-1 * * * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '* * *', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '@reboot', 'SELECT 1 AS x', 'x');
SELECT notify.schedule('bad', '0 0 31 2 *', 'SELECT 1 AS x', 'x');
-- the other arguments
SELECT notify.schedule('bad', '@daily', '', 'x');
SELECT notify.schedule('bad', '@daily', 'SELECT nope FROM sched_invoice', 'x');
SELECT notify.schedule('bad', '@daily', 'SELECT 1 AS x', NULL);
SELECT notify.schedule('bad', '@daily', 'SELECT 1 AS x', 'x', dedupe_key => 'always-the-same');
SELECT count(*) AS bad_schedules FROM notify.schedule WHERE name = 'bad';
SELECT notify.unschedule('nope');
SELECT notify.run_schedule('nope');

-- next_run: tz-independent expressions (every quarter hour, the first of the month at midnight UTC)
SELECT notify.next_run('*/15 * * * *', '2026-05-05 10:07:00+00') AT TIME ZONE 'UTC' AS quarter;
SELECT notify.next_run('*/15 * * * *', '2026-05-05 10:15:00+00') AT TIME ZONE 'UTC' AS strictly_after;
SELECT notify.next_run('0 0 29 2 *', '2027-01-01') > '2028-02-28' AS leap_day_next_year;
SELECT notify.next_run('0 0 30 2 *') AS never;
SELECT notify.next_run(NULL) AS null_cron;

-- the dedupe pattern
SELECT notify._expand_pattern('invoice-{row.id}-due-{row.customer.name}',
                              '{"row": {"id": 7, "customer": {"name": "ACME"}}}');
SELECT notify._expand_pattern('x-{row.missing}-y', '{"row": {}}');

-- RFC 4180: header, CRLF, quotes doubled, fields with , " or line breaks quoted, nulls empty
SELECT pg_catalog.convert_from(notify._rows_csv(
    '[{"sku": "A-1", "name": "Tornillo \"M6\", inox", "qty": 0},
      {"sku": "B-2", "name": "two\nlines", "qty": null}]', ARRAY['sku', 'name', 'qty']), 'UTF8');

-- a report run by hand: one event with every row, in the query's column order
SELECT notify.schedule('report', '@weekly', 'SELECT due, id FROM sched_invoice ORDER BY id',
                       'invoice.report', per_row => false) > 0 AS created;
SELECT notify.run_schedule('report');
SELECT e.event_type, e.op, e.schedule, e.columns, jsonb_array_length(e.rows) AS rows,
       notify._event_context(e) -> 'row_count' AS row_count
  FROM notify.event e WHERE e.schedule = 'report';
-- reminders: each invoice once, however often it runs
SELECT notify.run_schedule('reminders') AS first, notify.run_schedule('reminders') AS second;
SELECT key FROM notify.dedupe ORDER BY key;
SELECT s.name, r.fire_time, r.events, r.skipped, r.status FROM notify.schedule_run r
  JOIN notify.schedule s ON s.id = r.schedule_id ORDER BY r.id;

SELECT notify.unschedule('report');
SELECT notify.unschedule('reminders');
SELECT count(*) AS schedules_left FROM notify.schedule;
DELETE FROM notify.event;
DELETE FROM notify.dedupe;
DROP TABLE sched_invoice;

"""Schedules (scenarios S7-S11, S16): reports, reminders, alerts and special
dates, run with notify.run_schedule rather than waiting on the clock, and
one schedule fired by the worker's own clock."""
import csv
import io
import time

import psycopg
import pytest

from harness import wait_until, set_guc




@pytest.fixture
def madrid(cluster, db):
    set_guc(cluster, db, "notify.timezone", "Europe/Madrid")
    yield
    set_guc(cluster, db, "notify.timezone", None)


def utc(db, expr, after):
    return db.execute("SELECT to_char(notify.next_run(%s, %s::timestamptz) AT TIME ZONE 'UTC', "
                      "'YYYY-MM-DD HH24:MI')", (expr, after)).fetchone()[0]


def test_s16_next_fire_times_in_the_seed_examples_and_across_dst(db, madrid):
    # every day at 07:00, Madrid: 06:00 UTC in winter, 05:00 UTC in summer
    assert utc(db, "0 7 * * *", "2026-03-28 12:00+00") == "2026-03-29 05:00"
    assert utc(db, "0 7 * * *", "2026-10-24 12:00+00") == "2026-10-25 06:00"
    # every minute from 08:00 to the end of the day
    assert utc(db, "* 8-23 * * *", "2026-01-10 22:58:30+00") == "2026-01-10 22:59"   # 23:59 local
    assert utc(db, "* 8-23 * * *", "2026-01-10 22:59:00+00") == "2026-01-11 07:00"   # then 08:00
    # 02:30 on the day 02:00-03:00 does not exist: once, at 03:00 local (01:00 UTC), not zero times
    assert utc(db, "30 2 * * *", "2026-03-29 00:00+00") == "2026-03-29 01:00"
    assert utc(db, "30 2 * * *", "2026-03-29 01:00+00") == "2026-03-30 00:30"        # next day, normal
    # 02:30 on the day it happens twice: once, at the first
    assert utc(db, "30 2 * * *", "2026-10-25 00:00+00") == "2026-10-25 00:30"
    assert utc(db, "30 2 * * *", "2026-10-25 00:30+00") == "2026-10-26 01:30"
    assert utc(db, "@monthly", "2026-11-23 12:00+00") == "2026-11-30 23:00"           # Dec 1st 00:00 CET
    assert db.execute("SELECT notify.next_run('0 0 30 2 *')").fetchone()[0] is None


@pytest.mark.parametrize("expr, field", [
    ("61 * * * *", "minute field: 61 is out of range 0-59"),
    ("* 24 * * *", "hour field"),
    ("* * * * fry", 'day-of-week field: unknown name "fry"'),
    ("* * *", "expected 5 fields, got 3"),
    ("0 0 30 2 *", "never fires"),
])
def test_malformed_cron_names_the_field(db, uniq, expr, field):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as e:
        db.execute("SELECT notify.schedule(%s, %s, 'SELECT 1 AS x', 'x')", (f"bad_{uniq}", expr))
    assert field in str(e.value) and f"bad_{uniq}" in str(e.value)


def rule(db, name, etype, subject, text, recipients, html=None, **kw):
    db.execute("SELECT notify.set_template(%s, %s, %s, %s)", (name, subject, text, html))
    extra = "".join(f", {k} => %s" for k in kw)
    db.execute(f"SELECT notify.create_rule(%s, %s, %s, %s{extra})",
               (name, etype, name, recipients, *kw.values()))


def test_s9_reminder_once_per_invoice_however_often_it_runs(db, smtp, uniq):
    db.execute(f"CREATE TABLE inv_{uniq} (id int PRIMARY KEY, customer_email text, due date, paid boolean)")
    db.execute(f"INSERT INTO inv_{uniq} VALUES (1, 'a_{uniq}@example.com', current_date + 3, false), "
               f"(2, 'b_{uniq}@example.com', current_date + 3, true), "
               f"(3, 'c_{uniq}@example.com', current_date + 30, false)")
    etype = f"invoice.due.{uniq}"
    rule(db, f"due_{uniq}", etype, "Invoice {{row.id}} is due on {{row.due}}", "Please pay.",
         ["field:row.customer_email"])
    db.execute("SELECT notify.schedule(%s, '0 9 * * *', %s, %s, dedupe_key => %s)",
               (f"due_{uniq}", f"SELECT id, customer_email, due FROM inv_{uniq} "
                               f"WHERE NOT paid AND due <= current_date + 5", etype,
                "invoice-{row.id}-due-reminder"))
    counts = [db.execute("SELECT notify.run_schedule(%s)", (f"due_{uniq}",)).fetchone()[0] for _ in range(3)]
    assert counts == [1, 0, 0]
    [mail] = smtp.wait_for(f"a_{uniq}@example.com")
    assert mail.subject.startswith("Invoice 1 is due on ")
    db.execute(f"UPDATE inv_{uniq} SET due = current_date + 2 WHERE id = 3")
    assert db.execute("SELECT notify.run_schedule(%s)", (f"due_{uniq}",)).fetchone()[0] == 1
    smtp.wait_for(f"c_{uniq}@example.com")
    time.sleep(0.5)
    assert len(smtp.to(f"a_{uniq}@example.com")) == 1 and smtp.to(f"b_{uniq}@example.com") == []
    runs = db.execute("SELECT events, skipped, status FROM notify.schedule_run r JOIN notify.schedule s "
                      "ON s.id = r.schedule_id WHERE s.name = %s ORDER BY r.id", (f"due_{uniq}",)).fetchall()
    assert runs == [(1, 0, "ok"), (0, 1, "ok"), (0, 1, "ok"), (1, 1, "ok")]


def test_s8_report_as_html_table_and_csv_attachment(db, smtp, uniq):
    db.execute(f"CREATE TABLE stock_{uniq} (sku text, name text, qty int)")
    db.execute(f"INSERT INTO stock_{uniq} VALUES ('A-1', 'Tornillo \"M6\", inox', 0), "
               f"('B-2', 'Tuerca\nmariposa', 3), ('C-3', 'Arandela', 7)")
    etype = f"report.stock.{uniq}"
    to = f"boss_{uniq}@example.com"
    rule(db, f"rep_{uniq}", etype, "Stock: {{row_count}} items",
         "{{#rows}}{{sku}} {{qty}}\n{{/rows}}", [f"email:{to}"],
         html="<table>{{#rows}}<tr><td>{{sku}}</td><td>{{name}}</td><td>{{qty}}</td></tr>{{/rows}}</table>",
         attach_rows_csv="stock.csv")
    db.execute("SELECT notify.schedule(%s, '0 8 * * 1', %s, %s, per_row => false)",
               (f"rep_{uniq}", f"SELECT sku, name, qty FROM stock_{uniq} ORDER BY sku", etype))
    assert db.execute("SELECT notify.run_schedule(%s)", (f"rep_{uniq}",)).fetchone()[0] == 1
    [mail] = smtp.wait_for(to)
    assert mail.subject == "Stock: 3 items"
    html = mail.part("text/html")
    assert html.count("<tr>") == 3 and "Tornillo &quot;M6&quot;, inox" in html
    att = [p for p in mail.message.walk() if p.get_filename() == "stock.csv"]
    assert len(att) == 1 and att[0].get_content_type() == "text/csv"
    raw = att[0].get_payload(decode=True)
    assert b"\r\n" in raw
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"), newline="")))
    assert rows == [["sku", "name", "qty"], ["A-1", 'Tornillo "M6", inox', "0"],
                    ["B-2", "Tuerca\nmariposa", "3"], ["C-3", "Arandela", "7"]]


def test_s7_activity_counts_per_user_and_one_aggregate(db, smtp, uniq):
    db.execute(f"CREATE TABLE appr_{uniq} (user_email text, invoice int, approved_at timestamptz)")
    db.execute(f"INSERT INTO appr_{uniq} SELECT 'u' || (g % 3) || '_{uniq}@example.com', g, now() "
               f"FROM generate_series(1, 10) g")
    per_user, total = f"activity.user.{uniq}", f"activity.all.{uniq}"
    rule(db, f"pu_{uniq}", per_user, "You approved {{row.n}} invoices today", ".", ["field:row.user_email"])
    rule(db, f"all_{uniq}", total, "{{row_count}} users approved invoices",
         "{{#rows}}{{user_email}}: {{n}}\n{{/rows}}", [f"email:cfo_{uniq}@example.com", f"email:ceo_{uniq}@example.com"])
    q = (f"SELECT user_email, count(*) AS n FROM appr_{uniq} "
         f"WHERE approved_at > now() - interval '1 day' GROUP BY 1 ORDER BY 1")
    db.execute("SELECT notify.schedule(%s, '0 19 * * 1-5', %s, %s)", (f"pu_{uniq}", q, per_user))
    db.execute("SELECT notify.schedule(%s, '0 19 * * 1-5', %s, %s, per_row => false)", (f"all_{uniq}", q, total))
    assert db.execute("SELECT notify.run_schedule(%s)", (f"pu_{uniq}",)).fetchone()[0] == 3
    assert db.execute("SELECT notify.run_schedule(%s)", (f"all_{uniq}",)).fetchone()[0] == 1
    for i, n in ((0, 3), (1, 4), (2, 3)):
        [m] = smtp.wait_for(f"u{i}_{uniq}@example.com")
        assert m.subject == f"You approved {n} invoices today"
    for boss in ("cfo", "ceo"):
        [m] = smtp.wait_for(f"{boss}_{uniq}@example.com")
        assert m.subject == "3 users approved invoices"
        assert f"u1_{uniq}@example.com: 4" in m.part("text/plain")


def test_s10_out_of_stock_and_absence_alerts(db, smtp, uniq):
    db.execute(f"CREATE TABLE parts_{uniq} (ref text, qty int)")
    db.execute(f"INSERT INTO parts_{uniq} VALUES ('P1', 0), ('P2', 5), ('P3', 0)")
    db.execute(f"CREATE TABLE sync_{uniq} (interface text, last_run timestamptz)")
    db.execute(f"INSERT INTO sync_{uniq} VALUES ('bank', now() - interval '12 days'), ('shop', now())")
    to = f"stock_{uniq}@example.com"
    rule(db, f"oos_{uniq}", f"oos.{uniq}", "Out of stock: {{row.ref}}", ".", [f"email:{to}"])
    rule(db, f"abs_{uniq}", f"absent.{uniq}", "Interface {{row.interface}} has not run for {{row.days}} days",
         ".", [f"email:{to}"])
    db.execute("SELECT notify.schedule(%s, '*/30 8-18 * * *', %s, %s, dedupe_key => %s)",
               (f"oos_{uniq}", f"SELECT ref FROM parts_{uniq} WHERE qty = 0", f"oos.{uniq}",
                "oos-{row.ref}-" + time.strftime("%Y%m%d")))
    db.execute("SELECT notify.schedule(%s, '0 9 * * *', %s, %s)",
               (f"abs_{uniq}", f"SELECT interface, extract(day FROM now() - last_run)::int AS days "
                               f"FROM sync_{uniq} WHERE last_run < now() - interval '10 days'", f"absent.{uniq}"))
    assert db.execute("SELECT notify.run_schedule(%s)", (f"oos_{uniq}",)).fetchone()[0] == 2
    assert db.execute("SELECT notify.run_schedule(%s)", (f"abs_{uniq}",)).fetchone()[0] == 1
    mails = smtp.wait_for(to, count=3)
    assert sorted(m.subject for m in mails) == ["Interface bank has not run for 12 days",
                                                "Out of stock: P1", "Out of stock: P3"]


def test_s11_birthday_mail(db, smtp, uniq):
    db.execute(f"CREATE TABLE staff_{uniq} (name text, email text, born date)")
    db.execute(f"INSERT INTO staff_{uniq} VALUES ('Ana', 'ana_{uniq}@example.com', "
               f"(current_date - interval '30 years')::date), "
               f"('Luis', 'luis_{uniq}@example.com', (current_date - interval '40 years')::date + 1)")
    rule(db, f"bday_{uniq}", f"birthday.{uniq}", "Happy birthday, {{row.name}}!", ".", ["field:row.email"])
    db.execute("SELECT notify.schedule(%s, '0 8 * * *', %s, %s, dedupe_key => %s)",
               (f"bday_{uniq}", f"SELECT name, email, extract(year FROM current_date)::int AS year "
                                f"FROM staff_{uniq} WHERE to_char(born, 'MM-DD') = to_char(current_date, 'MM-DD')",
                f"birthday.{uniq}", "birthday-{row.email}-{row.year}"))
    assert db.execute("SELECT notify.run_schedule(%s)", (f"bday_{uniq}",)).fetchone()[0] == 1
    assert db.execute("SELECT notify.run_schedule(%s)", (f"bday_{uniq}",)).fetchone()[0] == 0
    [m] = smtp.wait_for(f"ana_{uniq}@example.com")
    assert m.subject == "Happy birthday, Ana!"
    assert smtp.to(f"luis_{uniq}@example.com") == []


def test_failing_schedule_is_recorded_and_others_run(db, smtp, cluster, uniq):
    """The worker's own clock fires '* * * * *' schedules; one fails every
    time (its error recorded), the other sends."""
    to = f"tick_{uniq}@example.com"
    db.execute(f"CREATE TABLE t_{uniq} (n int)")
    db.execute(f"INSERT INTO t_{uniq} VALUES (0)")
    rule(db, f"tick_{uniq}", f"tick.{uniq}", "tick", ".", [f"email:{to}"])
    db.execute("SELECT notify.schedule(%s, '* * * * *', %s, %s)",
               (f"bad_{uniq}", f"SELECT 1 / n AS x FROM t_{uniq}", f"tick.{uniq}"))
    db.execute("SELECT notify.schedule(%s, '* * * * *', 'SELECT 1 AS x', %s)", (f"good_{uniq}", f"tick.{uniq}"))
    # due at the next minute: the worker wakes for it on its own
    [m] = smtp.wait_for(to, timeout=75)
    st = dict((r[0], r[1:]) for r in db.execute(
        "SELECT name, last_status, last_error, last_events, next_run > now() FROM notify.schedules "
        "WHERE name IN (%s, %s)", (f"bad_{uniq}", f"good_{uniq}")))
    print(st)
    assert st[f"good_{uniq}"][0] == "ok" and st[f"good_{uniq}"][2] == 1 and st[f"good_{uniq}"][3]
    assert st[f"bad_{uniq}"][0] == "failed" and "division by zero" in st[f"bad_{uniq}"][1]
    db.execute("SELECT notify.unschedule(%s)", (f"bad_{uniq}",))
    db.execute("SELECT notify.unschedule(%s)", (f"good_{uniq}",))


def test_schedule_query_runs_as_its_owner(db, cluster, smtp, uniq):
    db.execute(f"CREATE TABLE secret_{uniq} (v int); INSERT INTO secret_{uniq} VALUES (42)")
    db.execute(f"CREATE ROLE sched_{uniq} LOGIN IN ROLE notify_admin")
    db.execute(f"GRANT SELECT ON secret_{uniq} TO sched_{uniq}")
    with cluster.connect() as conn:
        conn.execute(f"SET ROLE sched_{uniq}")
        conn.execute("SELECT notify.schedule(%s, '0 0 1 1 *', %s, %s)",
                     (f"own_{uniq}", f"SELECT v FROM public.secret_{uniq}", f"own.{uniq}"))
    db.execute(f"REVOKE SELECT ON secret_{uniq} FROM sched_{uniq}")
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        db.execute("SELECT notify.run_schedule(%s)", (f"own_{uniq}",))     # run by a superuser
    assert f"permission denied for table secret_{uniq}" in str(e.value)


def digest_rule(db, uniq, etype, digest_schedule="0 8 * * *", default_mode="immediate", digest_tpl=None):
    db.execute("SELECT notify.set_recipient(%s, %s, %s)", (f"user:a{uniq}", f"a_{uniq}@example.com", "Ana"))
    db.execute("SELECT notify.set_recipient(%s, %s, %s)", (f"user:b{uniq}", f"b_{uniq}@example.com", "Bea"))
    db.execute("SELECT notify.set_template(%s, 'Order {{row.n}}', 'Order {{row.n}} for {{row.who}}', "
               "'<p>Order <b>{{row.n}}</b></p>')", (f"ord_{uniq}",))
    if digest_tpl:
        db.execute("SELECT notify.set_template(%s, %s, %s)", (f"ord_{uniq}.digest", *digest_tpl))
    db.execute("SELECT notify.create_rule(%s, %s, %s, %s, default_mode => %s, digest_schedule => %s)",
               (f"ord_{uniq}", etype, f"ord_{uniq}", [f"recipient:user:a{uniq}", f"recipient:user:b{uniq}"],
                default_mode, digest_schedule))


def close_digests(db, etype):
    """notify.send_digests() until no entry of etype is held: a worker sending
    digests at that moment holds the lock, and the call then returns 0."""
    def held():
        db.execute("SELECT notify.send_digests()")
        return db.execute("SELECT count(*) FROM notify.message WHERE event_type = %s AND status = 'digest'",
                          (etype,)).fetchone()[0] == 0
    wait_until(held, timeout=30, interval=0.2, what="digests closed")


def test_digest_preference_holds_events_for_one_mail(db, smtp, uniq):
    etype = f"order.{uniq}"
    digest_rule(db, uniq, etype)
    db.execute("SELECT notify.set_preference(%s, %s, 'digest')", (f"user:a{uniq}", etype))
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g, 'who', 'José <jr>')) "
               "FROM generate_series(1, 5) g", (etype,))
    smtp.wait_for(f"b_{uniq}@example.com", count=5)       # Bea: immediate, one each
    time.sleep(0.5)
    assert smtp.to(f"a_{uniq}@example.com") == []          # Ana: held for the digest
    held = db.execute("SELECT count(*), min(next_attempt_at) > now() FROM notify.message "
                      "WHERE status = 'digest' AND address = %s", (f"a_{uniq}@example.com",)).fetchone()
    assert held == (5, True)
    close_digests(db, etype)
    [m] = smtp.wait_for(f"a_{uniq}@example.com")
    assert m.subject == f"ord_{uniq}: 5 notifications"
    text = m.part("text/plain")
    assert all(f"Order {n} for José <jr>" in text for n in range(1, 6))
    assert text.index("Order 1 for") < text.index("Order 5 for")
    assert "Order <b>3</b>" in m.part("text/html")
    rows = db.execute("SELECT status, count(*) FROM notify.delivery_log WHERE event_type = %s "
                      "AND address = %s GROUP BY 1 ORDER BY 1", (etype, f"a_{uniq}@example.com")).fetchall()
    assert rows == [("digested", 5), ("sent", 1)] or rows == [("digested", 5), ("queued", 1)] \
        or rows == [("digested", 5), ("sending", 1)]
    # an empty period sends nothing
    assert db.execute("SELECT notify.send_digests()").fetchone()[0] == 0


def test_digest_template_and_thousands_of_events(db, smtp, uniq):
    etype = f"bulk.{uniq}"
    digest_rule(db, uniq, etype, default_mode="digest",
                digest_tpl=("{{event_count}} orders from {{period_start}} to {{period_end}}",
                            "{{#events}}#{{row.n}};{{/events}}"))
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g, 'who', 'x')) "
               "FROM generate_series(1, 2000) g", (etype,))
    wait_until(lambda: db.execute("SELECT count(*) FROM notify.message WHERE event_type = %s "
                                  "AND status = 'digest'", (etype,)).fetchone()[0] == 4000,
               timeout=60, what="4000 digest entries")
    close_digests(db, etype)
    for who in ("a", "b"):
        [m] = smtp.wait_for(f"{who}_{uniq}@example.com", timeout=30)
        assert m.subject.startswith("2000 orders from ")
        body = m.part("text/plain")
        assert [int(x) for x in body.strip().strip("#;").split(";#")] == list(range(1, 2001))


def test_digest_sent_by_the_workers_clock(db, smtp, uniq):
    etype = f"tick.{uniq}"
    digest_rule(db, uniq, etype, digest_schedule="* * * * *", default_mode="digest")
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g, 'who', 'x')) FROM generate_series(1, 3) g",
               (etype,))
    [m] = smtp.wait_for(f"a_{uniq}@example.com", timeout=75)
    assert m.subject == f"ord_{uniq}: 3 notifications"


def test_missed_runs_happen_once_on_return(db, smtp, uniq):
    """A schedule whose fire times passed while the server was down (here: its
    next run set three days back) runs once when the worker sees it, then
    waits for its next time: no burst of 72 hourly runs."""
    to = f"missed_{uniq}@example.com"
    rule(db, f"missed_{uniq}", f"missed.{uniq}", "missed", ".", [f"email:{to}"])
    db.execute("SELECT notify.schedule(%s, '@hourly', 'SELECT 1 AS x', %s)", (f"missed_{uniq}", f"missed.{uniq}"))
    db.execute("UPDATE notify.schedule SET next_run = now() - interval '3 days' WHERE name = %s", (f"missed_{uniq}",))
    db.execute("SELECT notify._wake_worker()")
    smtp.wait_for(to, timeout=20)
    time.sleep(2)
    runs = db.execute("SELECT r.fire_time < now() - interval '2 days', r.status, r.events FROM notify.schedule_run r "
                      "JOIN notify.schedule s ON s.id = r.schedule_id WHERE s.name = %s", (f"missed_{uniq}",)).fetchall()
    nxt = db.execute("SELECT next_run > now(), next_run < now() + interval '1 hour 1 minute' "
                     "FROM notify.schedule WHERE name = %s", (f"missed_{uniq}",)).fetchone()
    assert runs == [(True, "ok", 1)], runs
    assert nxt == (True, True)
    assert len(smtp.to(to)) == 1
    db.execute("SELECT notify.unschedule(%s)", (f"missed_{uniq}",))

"""Fault tests 4 and 5: what a row or a server's refusal can do to one
message must stay with that message.  Each test prints what it injected
and what it counted.  (Fault 6, DROP DATABASE / DROP EXTENSION while the
workers run, is in test/e2e/test_worker_lifecycle.py: it needs a cluster
of its own.)"""
from harness import wait_until


def counts(db, etype):
    return dict(db.execute("SELECT status, count(*) FROM notify.delivery_log "
                           "WHERE event_type = %s GROUP BY 1", (etype,)).fetchall())


def test_550_for_some_recipients_and_451_for_others(db, smtp, uniq):
    etype = f"mix.{uniq}"
    db.execute("SELECT notify.set_template(%s, 'mix {{row.n}}', 'n = {{row.n}}')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'])",
               (f"rule_{uniq}", etype, f"tpl_{uniq}"))
    ok = [f"ok{i}_{uniq}@example.com" for i in range(20)]
    gone = [f"gone{i}_{uniq}@example.com" for i in range(20)]
    busy = [f"busy{i}_{uniq}@example.com" for i in range(20)]
    for a in gone:
        smtp.rcpt_replies[a] = "550 5.1.1 No such user here"
    for a in busy:
        smtp.rcpt_replies[a] = "451 4.2.1 Mailbox busy, try again later"
    try:
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', n, 'to', a)) "
                   "FROM unnest(%s::text[]) WITH ORDINALITY AS t(a, n)", (etype, ok + gone + busy))
        wait_until(lambda: counts(db, etype).get("failed", 0) == 20 and
                   db.execute("SELECT count(DISTINCT m.id) FROM notify.attempt a JOIN notify.message m "
                              "ON m.id = a.message_id WHERE m.event_type = %s AND a.smtp_code = 451",
                              (etype,)).fetchone()[0] == 20,
                   timeout=30, what="20 failed and 20 refused for now")
        for a in busy:                      # the mailboxes free up
            del smtp.rcpt_replies[a]
        final = wait_until(lambda: (c := counts(db, etype)).get("sent", 0) == 40 and c, timeout=30,
                           what="40 sent")
    finally:
        for a in gone + busy:
            smtp.rcpt_replies.pop(a, None)
    rows = db.execute("SELECT address, status, attempts, last_error FROM notify.delivery_log "
                      "WHERE event_type = %s", (etype,)).fetchall()
    by = {a: (s, n, e) for a, s, n, e in rows}
    retried = [by[a][1] for a in busy]
    print(f"\n[550/451] injected: 550 for {len(gone)} recipients, 451 for {len(busy)} until freed, "
          f"{len(ok)} normal; counted: {final}; attempts of the 451 ones {min(retried)}-{max(retried)}; "
          f"sample failure: {by[gone[0]][2]!r}")
    assert final == {"sent": 40, "failed": 20}
    assert all(by[a][0] == "failed" and by[a][1] == 1 and "550" in by[a][2] for a in gone), \
        "a 550 fails at once, with the server's reply, and is not retried"
    assert all(by[a][0] == "sent" and by[a][1] >= 2 for a in busy)
    assert all(by[a][0] == "sent" and by[a][1] == 1 for a in ok)
    for a in gone:
        assert smtp.to(a) == []
    for a in ok + busy:
        assert len(smtp.to(a)) == 1


def test_bad_rows_fail_alone(db, smtp, uniq):
    """100 events: the context query raises for 4, the template cannot render
    5 (a bill of materials nested deeper than partials may go), 3 carry an
    address with CR/LF; the other 88 are delivered."""
    etype = f"rows.{uniq}"
    to = f"{uniq}@example.com"
    partial = f"bom_{uniq}"
    db.execute("SELECT notify.set_template(%s, 'part', %s)",
               (partial, "{{name}}{{#parts}} ({{> " + partial + "}}){{/parts}}"))
    db.execute("SELECT notify.set_template(%s, 'bom {{row.n}}', %s)",
               (f"tpl_{uniq}", "{{#row.tree}}{{> " + partial + "}}{{/row.tree}} {{extra.ratio}}"))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'], context_query => %s)",
               (f"rule_{uniq}", etype, f"tpl_{uniq}",
                "SELECT jsonb_build_object('ratio', 100 / mod(($1->'row'->>'n')::int, 25))"))
    # n % 25 = 0: division by zero (n = 25, 50, 75, 100); n % 20 = 1: a tree 80 deep;
    # n % 33 = 2: an address that tries to add a recipient
    db.execute("""
        CREATE FUNCTION pg_temp.tree(depth int) RETURNS jsonb LANGUAGE sql AS $$
            SELECT CASE WHEN depth = 0 THEN jsonb_build_object('name', 'screw', 'parts', '[]'::jsonb)
                        ELSE jsonb_build_object('name', 'part' || depth, 'parts',
                                                jsonb_build_array(pg_temp.tree(depth - 1))) END $$""")
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', n, "
               "  'to', CASE WHEN n %% 33 = 2 THEN %s || E'>\\r\\nRCPT TO:<x@evil.example' ELSE %s END, "
               "  'tree', pg_temp.tree(CASE WHEN n %% 20 = 1 THEN 80 ELSE 2 END))) "
               "FROM generate_series(1, 100) n", (etype, to, to))
    try:
        mails = smtp.wait_for(to, count=88, timeout=30)
    except AssertionError:
        print(counts(db, etype), db.execute("SELECT DISTINCT left(last_error, 200) FROM notify.delivery_log "
                                            "WHERE event_type = %s", (etype,)).fetchall())
        raise

    def settled():
        c = counts(db, etype)
        return sum(c.values()) == 100 and "queued" not in c and "sending" not in c and c
    final = wait_until(settled, timeout=30, what="all 100 settled")
    failed = db.execute("SELECT (e.row->>'n')::int, d.last_error FROM notify.delivery_log d "
                        "JOIN notify.event e ON e.id = d.event_id WHERE d.event_type = %s "
                        "AND d.status = 'failed' ORDER BY 1", (etype,)).fetchall()
    reasons = {n: e for n, e in failed}
    print(f"\n[bad rows] injected: 4 context-query errors, 5 render errors, 3 CR/LF addresses in 100 "
          f"events; counted: {final}, {len(mails)} mails; reasons: "
          f"{ {n: r[:60] for n, r in list(reasons.items())[:4]} }")
    assert sorted(reasons) == sorted({25, 50, 75, 100} | {1, 21, 41, 61, 81} | {2, 35, 68})
    assert all("division by zero" in reasons[n] for n in (25, 50, 75, 100))
    assert all("partial" in reasons[n].lower() for n in (1, 21, 41, 61, 81))
    assert all("address" in reasons[n] for n in (2, 35, 68))
    assert final == {"sent": 88, "failed": 12}
    assert len(mails) == 88 and smtp.to("x@evil.example") == []
    assert sorted(int(m.subject.split()[1]) for m in mails) == \
        sorted(set(range(1, 101)) - set(reasons))


def test_message_that_cannot_be_queued_fails_its_event_alone(db, smtp, uniq):
    """Fan-out queues the messages of many events with one INSERT.  When
    that INSERT fails (here a constraint the DBA added rejects one
    address), each event's messages are queued again on their own: the
    event whose message is refused fails with the reason, and the other 49
    events of the batch are mailed."""
    etype = f"q.{uniq}"
    bad = f"refused_{uniq}@example.com"
    good = [f"ok{i}_{uniq}@example.com" for i in range(49)]
    con = f"reject_{uniq}"
    db.execute("SELECT notify.set_template(%s, 'q {{row.n}}', 'n = {{row.n}}')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'])",
               (f"rule_{uniq}", etype, f"tpl_{uniq}"))
    db.execute(f"ALTER TABLE notify.message ADD CONSTRAINT {con} CHECK (address <> '{bad}') NOT VALID")
    try:
        addresses = good[:20] + [bad] + good[20:]
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', n, 'to', a)) "
                   "FROM unnest(%s::text[]) WITH ORDINALITY AS t(a, n)", (etype, addresses))
        wait_until(lambda: db.execute("SELECT count(*) FROM notify.event WHERE event_type = %s "
                                      "AND status <> 'pending'", (etype,)).fetchone()[0] == 50,
                   timeout=30, what="50 events processed")
        for a in good:
            smtp.wait_for(a, timeout=30)
    finally:
        db.execute(f"ALTER TABLE notify.message DROP CONSTRAINT IF EXISTS {con}")
    events = dict(db.execute("SELECT status, count(*) FROM notify.event WHERE event_type = %s GROUP BY 1",
                             (etype,)).fetchall())
    [error] = db.execute("SELECT last_error FROM notify.event WHERE event_type = %s AND status = 'failed'",
                         (etype,)).fetchone()
    queued = db.execute("SELECT count(*) FROM notify.message WHERE event_type = %s", (etype,)).fetchone()[0]
    print(f"\n[refused message] injected: a CHECK constraint on notify.message refusing 1 of 50 addresses; "
          f"counted: events {events}, {queued} messages queued; error: {error!r}")
    assert events == {"done": 49, "failed": 1}
    assert con in error
    assert queued == 49
    assert smtp.to(bad) == []
    for a in good:
        assert len(smtp.to(a)) == 1

"""The event cursor never skips an event that commits out of id order.

The workers look for events from a low-water mark over event ids instead of
an index of unprocessed events (src/fanout.c, advance_low_water, with the
argument why it is safe).  This test tries to break it: 12 clients capture
events in transactions that take their ids and then wait (0 to 1.5 s, some
much longer) before committing, so that later ids commit first and the
workers move the mark meanwhile; some transactions roll back, some emit
before any other write, some capture in a savepoint that is rolled back.
Every committed event must be fanned out and mailed once, none of the
rolled-back ones.
"""
import random
import threading
import time

from harness import Cluster, SmtpServer, wait_until

CLIENTS = 12
PER_CLIENT = 40


def test_events_committed_out_of_order_are_all_sent():
    smtp = SmtpServer()
    cluster = Cluster(dbname="lowwater", settings={"notify.workers": "4", "notify.poll_interval": "'1s'"})
    try:
        db = cluster.connect()
        db.execute("CREATE EXTENSION notify_ext")
        db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')", (f"smtp://127.0.0.1:{smtp.port}",))
        db.execute("SELECT notify.set_template('t', 'lw {{row.n}}', 'x')")
        db.execute("SELECT notify.create_rule('r', 'lw', 't', ARRAY['email:lw@example.com'])")
        db.execute("SELECT notify.create_rule('re', 'lw.emit', 't', ARRAY['email:lw@example.com'])")
        db.execute("CREATE TABLE lw (n int PRIMARY KEY)")
        db.execute("SELECT notify.watch('lw', 'lw')")
        committed, rolled_back = set(), set()
        lock = threading.Lock()
        errors = []

        def client(c):
            rng = random.Random(c)
            try:
                conn = cluster.connect(autocommit=False)
                for i in range(PER_CLIENT):
                    n = c * 1000 + i
                    kind = rng.random()
                    if kind < 0.15:
                        # emit first: the transaction's first write takes an event id
                        conn.execute("SELECT notify.emit('lw.emit', jsonb_build_object('n', %s::int))", (n,))
                    else:
                        conn.execute("INSERT INTO lw VALUES (%s)", (n,))
                    if kind > 0.9:
                        conn.execute("SAVEPOINT s")
                        conn.execute("INSERT INTO lw VALUES (%s)", (n + 500,))
                        conn.execute("ROLLBACK TO s")
                    # hold the id while others commit later ids; now and then much longer
                    time.sleep(rng.random() * (4.0 if rng.random() < 0.05 else 0.15))
                    if rng.random() < 0.1:
                        conn.rollback()
                        with lock:
                            rolled_back.add(n)
                    else:
                        conn.commit()
                        with lock:
                            committed.add(n)
                conn.close()
            except Exception as e:      # noqa: BLE001
                errors.append(repr(e))

        threads = [threading.Thread(target=client, args=(c,)) for c in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        t_commits = time.monotonic() - t0

        def mailed():
            return {int(m.subject.split()[1]) for m in smtp.to("lw@example.com")}
        try:
            wait_until(lambda: committed <= mailed(), timeout=60, interval=0.2, what="every committed event mailed")
        finally:
            cur = db.execute("SELECT low_water, candidate FROM notify.event_cursor").fetchone()
            pending = db.execute("SELECT count(*) FROM notify.event WHERE processed_at IS NULL").fetchone()[0]
            print(f"\n[low water] {len(committed)} committed, {len(rolled_back)} rolled back by {CLIENTS} clients "
                  f"in {t_commits:.1f} s; cursor {cur}; unprocessed events {pending}")
        got = smtp.to("lw@example.com")
        ns = [int(m.subject.split()[1]) for m in got]
        assert set(ns) == committed
        assert not (set(ns) & rolled_back)
        assert len(ns) == len(set(ns)), "an event mailed twice"
        low = db.execute("SELECT low_water FROM notify.event_cursor").fetchone()[0]
        top = db.execute("SELECT max(id) FROM notify.event").fetchone()[0]
        assert low > top * 0.5, f"the cursor did not move ({low} of {top})"
    finally:
        cluster.destroy()
        smtp.stop()

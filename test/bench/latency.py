"""Latency under a steady load: COMMIT to the SMTP server's 250 after DATA.

A client inserts into a table watched with notify.watch, one row per
transaction (autocommit), paced at a steady rate (default 200 rows/s for
30 s). The SMTP server is the test harness's aiosmtpd SmtpServer
(test/lib/harness.py), in this process, which notes `wall_time` when it has
the message, just before it answers 250; the row's id is read back from the
subject. Latency = wall_time - the COMMIT's time, per mail, where the
COMMIT's time is the server's own: pg_xact_commit_timestamp(xmin) of the
row (track_commit_timestamp = on). Cross-check, client side: time.time()
right after the INSERT returned (the COMMIT is done then; this one is
shifted by the client's own scheduling, as the server runs in a thread of
the same Python process), and just before it was sent (an upper bound).

Settings: the notify_ext defaults (notify.workers = 2, notify.poll_interval
= 5s: the commit wakes a worker, not the poll). A warm-up of 50 rows goes
first, not counted.

Usage: /usr/bin/python3 test/bench/latency.py [--rate 200] [--seconds 30]
Last line: latency: p50 X ms, p99 Y ms, max Z ms over N mails at R/s (targets < 20 ms, < 100 ms)
"""
import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from benchlib import loadavg, pct, wait_mails  # noqa: E402
from harness import Cluster, SmtpServer  # noqa: E402

TARGET_P50_MS = 20
TARGET_P99_MS = 100
WARMUP = 50


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--workers", type=int, default=None, help="notify.workers (default: the extension's)")
    args = ap.parse_args()
    n = int(args.rate * args.seconds)

    settings = {"track_commit_timestamp": "on"}
    if args.workers:
        settings["notify.workers"] = str(args.workers)
    c = Cluster(settings=settings)
    server = SmtpServer()
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')",
                       (f"smtp://127.0.0.1:{server.port}",))
            db.execute("CREATE TABLE orders (id int PRIMARY KEY, email text NOT NULL, total numeric NOT NULL)")
            db.execute("SELECT notify.watch('orders', 'order.created')")
            db.execute("SELECT notify.set_template('lat', 'Latency {{row.id}}', "
                       "E'Hello,\\n\\nyour order {{row.id}} for {{row.total}} EUR was registered.\\n')")
            db.execute("SELECT notify.create_rule('lat', 'order.created', 'lat', ARRAY['field:row.email'])")
            workers = db.execute("SHOW notify.workers").fetchone()[0]
            poll = db.execute("SHOW notify.poll_interval").fetchone()[0]
            insert = "INSERT INTO orders (id, email, total) VALUES (%s, %s, %s)"
            for i in range(-WARMUP, 0):
                db.execute(insert, (i, f"warm{-i}@example.com", 1))
                time.sleep(0.01)
            wait_mails(server, WARMUP, 30)

            commit_at = {}
            sent_at = {}
            behind = 0
            start = time.time() + 0.1
            for i in range(1, n + 1):
                due = start + (i - 1) / args.rate
                now = time.time()
                if due > now:
                    time.sleep(due - now)
                elif now - due > 0.005:
                    behind += 1
                t_send = time.time()
                db.execute(insert, (i, f"customer{i}@example.com", 100.50 + i))
                commit_at[i] = time.time()
                sent_at[i] = t_send
            duration = commit_at[n] - sent_at[1]
            wait_mails(server, WARMUP + n, 60)
            committed = dict(db.execute("SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                                        "FROM orders WHERE id > 0"))

        lat, client, upper = [], [], []
        for m in server.mails:
            mid = int(re.match(r"Latency (-?\d+)", m.subject).group(1))
            if mid > 0:
                lat.append(1000 * (m.wall_time - committed[mid]))
                client.append(1000 * (m.wall_time - commit_at[mid]))
                upper.append(1000 * (m.wall_time - sent_at[mid]))
        assert len(lat) == n, (len(lat), n)
        for values in (lat, client, upper):
            values.sort()
        commit_ms = statistics.median(1000 * (commit_at[i] - sent_at[i]) for i in commit_at)
    finally:
        server.stop()
        c.destroy()
    print(f"{n} single-row autocommit INSERTs in {duration:.1f} s = {n / duration:.0f}/s "
          f"({behind} started more than 5 ms late); INSERT+COMMIT round trip median {commit_ms:.2f} ms; "
          f"notify.workers = {workers}, notify.poll_interval = {poll}; load average {loadavg()}")
    print(f"COMMIT (server's commit timestamp) -> 250 after DATA: p50 {pct(lat, 50):.1f} ms, "
          f"p90 {pct(lat, 90):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {lat[-1]:.1f} ms, min {lat[0]:.1f} ms")
    print(f"COMMIT returned to the client -> 250 after DATA: p50 {pct(client, 50):.1f} ms, "
          f"p99 {pct(client, 99):.1f} ms, max {client[-1]:.1f} ms, min {client[0]:.1f} ms")
    print(f"INSERT sent -> 250 after DATA (upper bound): p50 {pct(upper, 50):.1f} ms, "
          f"p99 {pct(upper, 99):.1f} ms, max {upper[-1]:.1f} ms")
    print(f"latency: p50 {pct(lat, 50):.1f} ms, p99 {pct(lat, 99):.1f} ms, max {lat[-1]:.1f} ms over {n} mails "
          f"at {n / duration:.0f}/s (targets < {TARGET_P50_MS} ms, < {TARGET_P99_MS} ms)")


if __name__ == "__main__":
    main()

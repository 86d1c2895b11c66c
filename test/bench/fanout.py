"""Fan-out cost: events/s (and messages rendered/s) through fan-out, for a
rule with 3 recipient specs (a group of N members, default 50, a literal
address and a field of the row): N + 2 messages per event.

The worker is paused (notify.enabled = off) while the events are committed,
then resumed; the figure is events / (commit of the last fan-out
transaction - resume time). The commit time is the server's own
(pg_xact_commit_timestamp of the event rows fan-out updated,
track_commit_timestamp = on): processed_at is now(), the fan-out
transaction's start, which would leave the last batch's work out. The
rule's channel is removed before resuming, so the sender only does its
bookkeeping (claim, record a retry an hour away) and never the network:
what is timed is fan-out plus that bookkeeping, on this machine.

Each message is rendered: subject, text with a section over the row's
lines, HTML (the recipient's display name is in all three).

Usage: /usr/bin/python3 test/bench/fanout.py [events] [--group-size N]
  test/bench/fanout.py 500                      500 events, group of 50: 26,000 messages
  test/bench/fanout.py --group-size 10000 1     one event to a group of 10,000: 10,002 messages
Last line: fan-out: X events/s = Y messages rendered/s (...)
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from harness import Cluster  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("events", type=int, nargs="?", default=500)
    ap.add_argument("--group-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=None, help="notify.workers (default: the extension's)")
    args = ap.parse_args()
    n_events, group = args.events, args.group_size
    per_event = group + 2
    settings = {"notify.poll_interval": "'1s'", "notify.retry_backoff": "'1h'",
                "notify.enabled": "off", "notify.batch_size": "100", "track_commit_timestamp": "on"}
    if args.workers:
        settings["notify.workers"] = str(args.workers)
    c = Cluster(settings=settings)
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp('smtp://127.0.0.1:9', 'erp@example.com', tls => 'off', name => 'bench')")
            db.execute("SELECT notify.create_group('team')")
            db.execute("SELECT count(notify.set_recipient('user:' || i, 'user' || i || '@example.com', "
                       "'User Número ' || i)) FROM generate_series(0, %s - 1) i", (group,))
            db.execute("SELECT count(notify.add_member('team', 'user:' || i)) FROM generate_series(0, %s - 1) i",
                       (group,))
            db.execute("SELECT notify.set_template('t', 'Order {{row.id}} for {{recipient.display_name}}', "
                       "'Dear {{recipient.display_name}},\n{{#row.lines}}- {{sku}} x {{qty}}\n{{/row.lines}}"
                       "Total {{row.total}}\n', '<p>Dear {{recipient.display_name}}</p><p>{{row.total}}</p>')")
            db.execute("SELECT notify.create_rule('r', 'order.created', 't', "
                       "ARRAY['group:team', 'email:boss@example.com', 'field:row.contact'], channel => 'bench')")
            db.execute("""SELECT notify.emit('order.created', jsonb_build_object(
                              'id', g, 'total', 100.50 + g, 'contact', 'c' || g || '@example.com',
                              'lines', '[{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]'::jsonb))
                          FROM generate_series(1, %s) g""", (n_events,))
            db.execute("DELETE FROM notify.channel WHERE name = 'bench'")
            workers = db.execute("SHOW notify.workers").fetchone()[0]
            db.execute("ALTER SYSTEM SET notify.enabled = on")
            t0 = time.time()
            db.execute("SELECT pg_reload_conf()")
            while db.execute("SELECT count(*) FROM notify.event WHERE processed_at IS NULL").fetchone()[0]:
                time.sleep(0.05)
            last = db.execute("SELECT extract(epoch FROM max(pg_xact_commit_timestamp(xmin)))::float8 "
                              "FROM notify.event").fetchone()[0]
            started = db.execute("SELECT extract(epoch FROM min(processed_at))::float8 FROM notify.event").fetchone()[0]
            msgs = db.execute("SELECT count(*) FROM notify.message").fetchone()[0]
            failed = db.execute("SELECT count(*) FROM notify.event WHERE status = 'failed'").fetchone()[0]
            elapsed = last - t0
            assert failed == 0 and msgs == n_events * per_event, (failed, msgs)
            print(f"events: {n_events}, group of {group}, messages rendered: {msgs}, elapsed: {elapsed:.2f} s "
                  f"(first fan-out transaction began {started - t0:.3f} s after the resume); "
                  f"notify.workers = {workers}")
            print(f"fan-out: {n_events / elapsed:.1f} events/s = {msgs / elapsed:.0f} messages rendered/s "
                  f"(rule of 3 specs, group of {group}, {per_event} messages per event)")
    finally:
        c.destroy()


if __name__ == "__main__":
    main()

"""Fan-out cost: events/s (and messages rendered/s) through fan-out, for a
rule with 3 recipient specs (a group of 50 members, a literal address and a
field of the row): 52 messages per event.

The worker is paused (notify.enabled = off) while the events are committed,
then resumed; the figure is events / (last processed_at - resume time). The
rule's channel is removed before resuming, so the sender only does its
bookkeeping (claim, record a retry an hour away) and never the network:
what is timed is fan-out plus that bookkeeping, on this machine.
Usage: /usr/bin/python3 test/bench/fanout.py [events]
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "lib"))
from harness import Cluster  # noqa: E402


def main():
    n_events = int(sys.argv[1]) if len(sys.argv) > 1 else 500
    c = Cluster(settings={"notify.poll_interval": "'1s'", "notify.retry_backoff": "'1h'",
                          "notify.enabled": "off", "notify.batch_size": "100"})
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp('smtp://127.0.0.1:9', 'erp@example.com', tls => 'off', name => 'bench')")
            db.execute("SELECT notify.create_group('team')")
            for i in range(50):
                db.execute("SELECT notify.set_recipient(%s, %s, %s)",
                           (f"user:{i}", f"user{i}@example.com", f"User Número {i}"))
                db.execute("SELECT notify.add_member('team', %s)", (f"user:{i}",))
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
            db.execute("ALTER SYSTEM SET notify.enabled = on")
            t0 = time.time()
            db.execute("SELECT pg_reload_conf()")
            while db.execute("SELECT count(*) FROM notify.event WHERE processed_at IS NULL").fetchone()[0]:
                time.sleep(0.05)
            last = db.execute("SELECT extract(epoch FROM max(processed_at)) FROM notify.event").fetchone()[0]
            msgs = db.execute("SELECT count(*) FROM notify.message").fetchone()[0]
            failed = db.execute("SELECT count(*) FROM notify.event WHERE status = 'failed'").fetchone()[0]
            elapsed = float(last) - t0
            assert failed == 0 and msgs == n_events * 52, (failed, msgs)
            print(f"events: {n_events}, messages rendered: {msgs}, elapsed: {elapsed:.2f} s")
            print(f"fan-out: {n_events / elapsed:.0f} events/s = {msgs / elapsed:.0f} messages/s "
                  f"(rule of 3 specs, group of 50)")
    finally:
        c.destroy()


if __name__ == "__main__":
    main()

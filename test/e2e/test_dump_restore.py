"""pg_dump / pg_restore of a database with the extension: the configuration
comes back (with each row's owner), the queue neither loses nor repeats a
message; the restored database knows it is a copy and sends nothing until
it is adopted, and adopt_copy(send_pending => true) (a restore that replaces
a lost original) sends what was queued."""
import os
import subprocess

from harness import Cluster, PG_BIN, _as_pg_user, wait_until

CONFIG = ["notify.recipient", "notify.template", "notify.rule", "notify.channel", "notify.channel_secret",
          "notify.watch", "notify.recipient_group", "notify.group_member", "notify.supervisor",
          "notify.preference", "notify.directory", "notify.schedule", "notify.dedupe"]


def snapshot(conn):
    out = {}
    for t in CONFIG + ["notify.event", "notify.message", "notify.attempt", "notify.schedule_run"]:
        out[t] = sorted(map(str, conn.execute(f"SELECT to_jsonb(x) - 'updated_at' FROM {t} x").fetchall()))
    return out


def test_dump_and_restore_round_trip(smtp):
    src = Cluster(dbname="erpdump", settings={"notify.enabled": "off"})
    dst = None
    try:
        with src.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("CREATE ROLE dump_admin LOGIN IN ROLE notify_admin")
            db.execute("CREATE TABLE orders (id int PRIMARY KEY, email text)")
            db.execute("GRANT SELECT ON orders TO dump_admin")
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', 'erp', 'pw-1', tls => 'off')",
                       (f"smtp://127.0.0.1:{smtp.port}",))
            db.execute("SELECT notify.watch('orders', 'order.created')")
            db.execute("SELECT notify.set_recipient('user:1', 'ana@example.com', 'Ana')")
            db.execute("SELECT notify.create_group('sales')")
            db.execute("SELECT notify.add_member('sales', 'user:1')")
            db.execute("SELECT notify.set_preference('user:1', 'order.created', 'immediate')")
            db.execute("SELECT notify.set_template('order', 'Order {{row.id}}', 'for {{row.email}}')")
            db.execute("SET ROLE dump_admin")
            db.execute("SELECT notify.create_rule('order', 'order.created', 'order', ARRAY['field:row.email'])")
            db.execute("SELECT notify.schedule('daily', '0 7 * * *', 'SELECT id FROM public.orders', 'order.daily')")
            db.execute("RESET ROLE")
            db.execute("INSERT INTO orders SELECT g, 'c' || g || '@example.com' FROM generate_series(1, 5) g")
            db.execute("SELECT notify.emit('order.created', '{\"id\": 99, \"email\": \"z@example.com\"}')")
            # the workers are paused (notify.enabled = off): 6 events wait; and 3 messages
            # queued as a fan-out would have left them
            db.execute("INSERT INTO notify.message (event_type, rule_name, address, channel, subject, text_body) "
                       "SELECT 'order.created', 'order', 'q' || g || '@example.com', 'email', 'queued ' || g, 'x' "
                       "FROM generate_series(1, 3) g")
            before = snapshot(db)
        dump = os.path.join(src.dir, "erp.dump")     # a directory the postgres user can write
        r = subprocess.run(_as_pg_user([os.path.join(PG_BIN, "pg_dump"), "-h", src.sock, "-p", str(src.port),
                                        "-U", "postgres", "-Fc", "-f", dump, "erpdump"]),
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

        # roles are the cluster's, not the database's: the DBA creates them first
        dst = Cluster(dbname="erpdump", settings={"notify.enabled": "off"})
        with dst.connect() as db:
            db.execute("CREATE ROLE dump_admin LOGIN")
        r = subprocess.run(_as_pg_user([os.path.join(PG_BIN, "pg_restore"), "-h", dst.sock, "-p", str(dst.port),
                                        "-U", "postgres", "-d", "erpdump", dump]),
                           capture_output=True, text=True)
        print(r.stderr)
        assert r.returncode == 0, r.stderr
        with dst.connect() as db:
            after = snapshot(db)
            for t in before:
                assert after[t] == before[t], f"{t} differs after restore"
            owners = dict(db.execute("SELECT name, owner::text FROM notify.rule UNION ALL "
                                     "SELECT name, owner::text FROM notify.schedule").fetchall())
            assert owners == {"order": "dump_admin", "daily": "dump_admin"}
            assert db.execute("SELECT password FROM notify.channel_secret").fetchone()[0] == "pw-1"
            queued = db.execute("SELECT count(*) FROM notify.message WHERE status = 'queued'").fetchone()[0]
            events = db.execute("SELECT count(*) FROM notify.event").fetchone()[0]
            print(f"restored: {events} events, {queued} queued messages")
            assert events == 6 and queued == 3
            # new rows get new ids, not ones the restored rows hold
            new_id = db.execute("SELECT notify.emit('order.created', '{\"id\": 100, \"email\": \"y@example.com\"}')"
                                ).fetchone()[0]
            assert new_id > db.execute("SELECT max(id) FROM notify.event WHERE id <> %s", (new_id,)).fetchone()[0]
            # the capture trigger came back with the table: a new order is an event
            db.execute("INSERT INTO orders VALUES (6, 'c6@example.com')")
            assert db.execute("SELECT count(*) FROM notify.event").fetchone()[0] == 8
            # a restore is a copy: it says so, and waits to be adopted
            reason = db.execute("SELECT copy_reason FROM notify._identity()").fetchone()[0]
            state = db.execute("SELECT state FROM notify.worker_status()").fetchone()[0]
            print(f"restored database: {state}")
            assert "restored from a dump of database erpdump" in reason
            assert state.startswith("a copy: nothing is sent until SELECT notify.adopt_copy()")
            summary = db.execute("SELECT notify.adopt_copy(send_pending => true)").fetchone()[0]
            print(summary)
            assert "adopted" in summary and "what it inherited is sent too" in summary
            assert db.execute("SELECT copy_reason FROM notify._identity()").fetchone()[0] is None
            # sending resumes: every queued message goes out once
            db.execute("ALTER SYSTEM SET notify.enabled = on")
        dst.reload()
        with dst.connect() as db:
            # drained: every event processed and no message queued or being sent
            # (a claimed message is 'sending' until its outcome is recorded)
            wait_until(lambda: db.execute("SELECT count(*) FROM notify.message WHERE status IN ('queued', 'sending')"
                                          ).fetchone()[0] == 0 and
                       db.execute("SELECT count(*) FROM notify.event WHERE processed_at IS NULL").fetchone()[0] == 0,
                       timeout=30, what="queue drained")
            sent = db.execute("SELECT address, count(*) FROM notify.message WHERE status = 'sent' GROUP BY 1"
                              ).fetchall()
        got = {a: len(smtp.to(a)) for a, _ in sent}
        print(f"sent after restore: {sorted(sent)}; received {got}")
        assert all(n == 1 for _, n in sent) and all(v == 1 for v in got.values())
        assert set(got) == {f"c{i}@example.com" for i in range(1, 7)} | {"z@example.com", "y@example.com"} \
            | {f"q{i}@example.com" for i in range(1, 4)}
    finally:
        src.destroy()
        if dst:
            dst.destroy()

"""Every database (issue 15): one cluster, started with notify.database
unset, serves every database that creates the extension, on demand; DDL is
never blocked by the workers; a copy (template, restored dump) keeps quiet
until adopt_copy(); a flooded database does not delay another's mail; the
bounds change on reload.  Each test makes databases of its own (fresh
names) and prints what it measured (pytest -s)."""
import os
import re
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from harness import Cluster, PG_BIN, SmtpServer, _as_pg_user, set_guc, wait_until

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from benchlib import SmtpSink  # noqa: E402


@pytest.fixture(scope="module")
def mc(smtp):
    # notify.database is not set: '*'.  Workers leave after 2 s idle here
    # (10 s by default) so that the tests see them come and go quickly.
    c = Cluster(dbname="postgres", settings={
        "notify.poll_interval": "'30s'", "notify.worker_idle_timeout": "'2s'",
        "notify.retry_backoff": "'1s'", "notify.workers": "2", "notify.max_workers": "8",
        "max_worker_processes": "16"})
    yield c
    if os.environ.get("NOTIFY_KEEP_LOG"):
        print(c.log())
    c.destroy()


def setup_db(cluster, smtp_port, name):
    """A new database with the extension, a channel and a rule `ping` that
    mails row.to with the subject '<database> <n>'."""
    with cluster.connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{name}"')
    with cluster.connect(name) as db:
        db.execute("CREATE EXTENSION notify_ext")
        db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')",
                   (f"smtp://127.0.0.1:{smtp_port}",))
        db.execute("SELECT notify.set_template('ping', '{{row.db}} {{row.n}}', 'n = {{row.n}}')")
        db.execute("SELECT notify.create_rule('ping', 'ping', 'ping', ARRAY['field:row.to'])")


def emit(db, n, to, count=1):
    db.execute("SELECT notify.emit('ping', jsonb_build_object('db', current_database(), 'n', g, 'to', %s::text)) "
               "FROM generate_series(%s::int, %s::int) g", (to, n, n + count - 1))


def workers_in(conn, dbname=None):
    """pids of the notify_ext workers connected to dbname (every database: None)."""
    if dbname is None:
        return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'notify_ext worker'")]
    return [r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'notify_ext worker' "
                                       "AND datname = %s", (dbname,))]


def token_of(db):
    return db.execute("SELECT token FROM notify.identity_local").fetchone()[0]


def numbers(mails):
    return [int(m.subject.split()[-1]) for m in mails]


def test_three_databases_created_after_start_each_send_within_a_second(mc, smtp, uniq):
    names = [f"co{i}_{uniq}" for i in range(3)]
    for name in names:
        setup_db(mc, smtp.port, name)
    latencies, ids = {}, {}
    for name in names:
        with mc.connect(name) as db:
            to = f"{name}@example.com"
            t0 = time.monotonic()
            emit(db, 1, to)
            [mail] = smtp.wait_for(to, timeout=5)
            latencies[name] = mail.received_at - t0
            ids[name] = mail.message["Message-ID"]
            assert mail.subject == f"{name} 1"
            assert token_of(db) in ids[name]
    print("first mail of each database, commit -> received:",
          {n: f"{1000 * v:.0f} ms" for n, v in latencies.items()})
    print("Message-IDs:", ids)
    assert all(v < 1.0 for v in latencies.values())
    assert len(set(ids.values())) == 3, "the same message number in three databases: three Message-IDs"
    assert not re.search(r"FATAL|ERROR", mc.log())


def test_database_without_the_extension_never_has_a_process(mc, uniq):
    plain = f"plain_{uniq}"
    with mc.connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{plain}"')
    with mc.connect(plain) as db:
        db.execute("CREATE TABLE t (id int)")
        db.execute("INSERT INTO t SELECT generate_series(1, 1000)")
        seen = 0
        for _ in range(40):
            seen = max(seen, len(workers_in(db, plain)))
            time.sleep(0.05)
    print(f"database without the extension, created after start: at most {seen} worker(s) in 2 s")
    assert seen == 0
    # after a restart the launcher looks at every database once (the census):
    # a short-lived worker, that leaves at once
    mc.restart()
    t0 = time.monotonic()
    samples = []
    with mc.connect("postgres") as c:
        while time.monotonic() - t0 < 3:
            samples.append((time.monotonic() - t0, len(workers_in(c, plain))))
            time.sleep(0.02)
        cluster_wide = len(workers_in(c))
    present = [t for t, n in samples if n]
    print(f"after a restart: a census worker in {plain} during {len(present)} of {len(samples)} samples "
          f"(20 ms apart){f', last at {present[-1]:.2f} s' if present else ''}; workers in the cluster "
          f"3 s after start: {cluster_wide}")
    assert all(n == 0 for t, n in samples if t > 2.0)


def test_drop_database_while_it_sends_3000_mails(mc, smtp, uniq):
    victim, other = f"drop_{uniq}", f"other_{uniq}"
    setup_db(mc, smtp.port, victim)
    setup_db(mc, smtp.port, other)
    victim_to, other_to = f"{victim}@example.com", f"{other}@example.com"
    with mc.connect(victim) as db:
        emit(db, 1, victim_to, 3000)
    wait_until(lambda: len(smtp.to(victim_to)) >= 200, timeout=30, what="the victim sending")

    stop = threading.Event()
    sent_other = []

    def keep_sending():
        with mc.connect(other) as db:
            n = 0
            while not stop.is_set():
                n += 1
                emit(db, n, other_to)
                sent_other.append((n, time.monotonic()))
                time.sleep(0.1)

    th = threading.Thread(target=keep_sending)
    th.start()
    try:
        time.sleep(0.5)
        before = len(smtp.to(victim_to))
        with mc.connect("postgres") as c:
            n_workers = len(workers_in(c, victim))
            t0 = time.monotonic()
            c.execute(f'DROP DATABASE "{victim}"')
            took = time.monotonic() - t0
        time.sleep(1.5)
    finally:
        stop.set()
        th.join()
    received = smtp.wait_for(other_to, count=len(sent_other), timeout=10)
    arrival = {int(m.subject.split()[-1]): m.received_at for m in received}
    worst = max(arrival[n] - t for n, t in sent_other)
    print(f"DROP DATABASE (no FORCE) of a database sending 3,000 mails ({before} received, {n_workers} "
          f"worker(s) there): {1000 * took:.0f} ms; the other database meanwhile: {len(sent_other)} "
          f"mails, slowest {1000 * worst:.0f} ms")
    assert took < 5
    assert worst < 2
    assert "is being accessed by other users" not in mc.log()
    with mc.connect("postgres") as c:
        assert c.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (victim,)).fetchone()[0] == 0


def test_rename_and_template_copy_while_sending(mc, smtp, uniq):
    src, renamed, copy = f"src_{uniq}", f"ren_{uniq}", f"cpy_{uniq}"
    setup_db(mc, smtp.port, src)
    to = f"{src}@example.com"
    total = 1500
    with mc.connect(src) as db:
        emit(db, 1, to, total)
    wait_until(lambda: len(smtp.to(to)) >= 100, timeout=30, what="sending")
    with mc.connect("postgres") as c:
        t0 = time.monotonic()
        c.execute(f'ALTER DATABASE "{src}" RENAME TO "{renamed}"')
        took_rename = time.monotonic() - t0
    at_rename = len(smtp.to(to))
    # the renamed database goes on sending (a rename is no copy)
    wait_until(lambda: len(smtp.to(to)) >= at_rename + 100, timeout=10, what="sending after the rename")
    with mc.connect("postgres") as c:
        t0 = time.monotonic()
        c.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{renamed}"')
        took_template = time.monotonic() - t0
        t_copy = c.execute("SELECT now()").fetchone()[0]
    print(f"while sending: ALTER DATABASE RENAME {1000 * took_rename:.0f} ms, "
          f"CREATE DATABASE ... TEMPLATE {1000 * took_template:.0f} ms")
    assert took_rename < 2 and took_template < 5

    with mc.connect(copy) as db:
        reason = db.execute("SELECT copy_reason FROM notify._identity()").fetchone()[0]
        inherited = db.execute("SELECT count(*) FROM notify.message WHERE status IN ('queued', 'sending')").fetchone()[0]
        # events the original had not fanned out yet (its workers send as they fan out)
        inherited_events = db.execute("SELECT count(*) FROM notify.event WHERE status = 'pending'").fetchone()[0]
        pre_to = f"pre_{uniq}@example.com"
        emit(db, 1, pre_to)                          # captured in the copy, before adoption
        wait_until(lambda: "is a copy" in mc.log(), timeout=5, what="the copy said once in the log")
        time.sleep(1.5)
        emit(db, 2, pre_to)
        time.sleep(1.0)
        state = db.execute("SELECT state FROM notify.worker_status()").fetchone()[0]
        sent_in_copy = db.execute("SELECT count(*) FROM notify.message WHERE status = 'sent' AND sent_at > %s",
                                  (t_copy,)).fetchone()[0]
        procs = workers_in(db, copy)
        lines = [ln for ln in mc.log().splitlines() if f'database "{copy}" is a copy' in ln]
        print(f"template copy: {reason}; inherited {inherited} queued/sending, {inherited_events} events; state: {state}; "
              f"log: {lines}")
        assert "copied from database" in reason
        assert sent_in_copy == 0 and smtp.to(pre_to) == [] and procs == []
        assert state.startswith("a copy")
        assert len(lines) == 1, "one log line, not one per event"

    # the original sends everything, each mail once
    wait_until(lambda: set(numbers(smtp.to(to))) >= set(range(1, total + 1)), timeout=60,
               what=f"all {total} mails of the original")
    time.sleep(1.0)
    got = numbers(smtp.to(to))
    print(f"the original (renamed while sending): {len(set(got))} distinct of {total}, {len(got) - len(set(got))} "
          f"sent twice")
    assert len(got) == total, "a copy, or the rename, sent some mail again"

    with mc.connect(copy) as db:
        summary = db.execute("SELECT notify.adopt_copy()").fetchone()[0]
        print(summary)
        cancelled = db.execute("SELECT count(*) FROM notify.message WHERE status = 'cancelled' "
                               "AND last_error LIKE 'cancelled by notify.adopt_copy()%'").fetchone()[0]
        assert cancelled == inherited
        assert db.execute("SELECT count(*) FROM notify.event WHERE status = 'cancelled'").fetchone()[0] \
            == inherited_events + 2
        new_to = f"new_{uniq}@example.com"
        t0 = time.monotonic()
        emit(db, 1, new_to)
        [mail] = smtp.wait_for(new_to, timeout=5)
        print(f"adopted copy: a new event mailed in {1000 * (mail.received_at - t0):.0f} ms, "
              f"Message-ID {mail.message['Message-ID']}")
        assert token_of(db) in mail.message["Message-ID"]
    with mc.connect(renamed) as orig:
        assert token_of(orig) not in mail.message["Message-ID"]
    time.sleep(1.0)
    assert smtp.to(pre_to) == [] and len(smtp.to(to)) == total


def test_restored_dump_keeps_quiet_until_adopted(mc, smtp, uniq):
    orig, restored = f"orig_{uniq}", f"rest_{uniq}"
    setup_db(mc, smtp.port, orig)
    held_to = f"held_{uniq}@example.com"
    with mc.connect(orig) as db:
        # what a dump carries: messages waiting for a retry, one being sent
        db.execute("""INSERT INTO notify.message (event_type, address, channel, subject, text_body, status,
                                                  next_attempt_at, lease_until, claimed_by)
                      SELECT 'ping', %s, 'email', 'held ' || g, 'x',
                             CASE WHEN g = 1 THEN 'sending' ELSE 'queued' END,
                             now() + interval '1 hour', now() + interval '1 hour', 1
                        FROM generate_series(1, 5) g""", (held_to,))
        orig_token = token_of(db)
    dump = os.path.join(mc.dir, f"{orig}.dump")
    r = subprocess.run(_as_pg_user([os.path.join(PG_BIN, "pg_dump"), "-h", mc.sock, "-p", str(mc.port),
                                    "-U", "postgres", "-Fc", "-f", dump, orig]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with mc.connect("postgres") as c:
        c.execute(f'CREATE DATABASE "{restored}"')
    r = subprocess.run(_as_pg_user([os.path.join(PG_BIN, "pg_restore"), "-h", mc.sock, "-p", str(mc.port),
                                    "-U", "postgres", "-d", restored, dump]), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with mc.connect(restored) as db:
        reason = db.execute("SELECT copy_reason FROM notify._identity()").fetchone()[0]
        # due now, and woken: still nothing goes out
        db.execute("UPDATE notify.message SET next_attempt_at = now(), lease_until = now() - interval '1 s'")
        pre_to = f"pre_{uniq}@example.com"
        emit(db, 1, pre_to)
        db.execute("SELECT notify._wake_worker()")
        time.sleep(2.0)
        state = db.execute("SELECT state FROM notify.worker_status()").fetchone()[0]
        statuses = dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())
        print(f"restored dump: {reason}; {state}; messages {statuses}")
        assert "restored from a dump of database" in reason and orig in reason
        assert state.startswith("a copy")
        assert smtp.to(held_to) == [] and smtp.to(pre_to) == []
        assert statuses == {"queued": 4, "sending": 1}
        assert workers_in(db, restored) == []

        summary = db.execute("SELECT notify.adopt_copy()").fetchone()[0]
        print(summary)
        assert "inherited and cancelled: 5 message(s), 1 event(s)" in summary
        assert db.execute("SELECT copy_reason FROM notify._identity()").fetchone()[0] is None
        new_token = token_of(db)
        assert new_token != orig_token
        new_to = f"new_{uniq}@example.com"
        t0 = time.monotonic()
        emit(db, 2, new_to)
        [mail] = smtp.wait_for(new_to, timeout=5)
        print(f"adopted: a new event mailed in {1000 * (mail.received_at - t0):.0f} ms; "
              f"Message-ID {mail.message['Message-ID']} (original's token {orig_token})")
        assert new_token in mail.message["Message-ID"]
    time.sleep(1.0)
    assert smtp.to(held_to) == [] and smtp.to(pre_to) == []
    with mc.connect(orig) as db:
        # the original keeps its queue
        assert db.execute("SELECT count(*) FROM notify.message WHERE address = %s AND status IN ('queued', 'sending')",
                          (held_to,)).fetchone()[0] == 5


def flood(db, n, channel="email"):
    db.execute("INSERT INTO notify.message (event_type, address, channel, subject, text_body) "
               "SELECT 'flood', 'f' || g || '@example.com', %s, 'flood ' || g, 'x' "
               "FROM generate_series(1, %s) g", (channel, n))
    db.execute("SELECT notify._wake_worker()")


def stop_flood(db):
    db.execute("UPDATE notify.message SET status = 'cancelled' WHERE status = 'queued'")


def test_flooded_database_does_not_delay_another(mc, smtp, uniq):
    """100,000 messages queued in one database, every worker slot taken by
    it (notify.workers = notify.max_workers = 4), and workers leave as soon
    as they are idle: each mail of the other database needs a slot given
    up by the flooded one."""
    sink = SmtpSink()
    big, calm = f"big_{uniq}", f"calm_{uniq}"
    setup_db(mc, sink.port, big)
    setup_db(mc, smtp.port, calm)
    calm_to = f"{calm}@example.com"
    try:
        with mc.connect("postgres") as c:
            set_guc(mc, c, "notify.workers", 4)
            set_guc(mc, c, "notify.max_workers", 4)
            set_guc(mc, c, "notify.worker_idle_timeout", 0)
        with mc.connect(big) as db:
            flood(db, 100_000)
            wait_until(lambda: len(workers_in(db, big)) == 4, timeout=15, what="4 workers on the flood")
            wait_until(lambda: sink.messages() >= 1000, timeout=30, what="the flood flowing")
            at_start = sink.messages()
            queued = db.execute("SELECT count(*) FROM notify.message WHERE status = 'queued'").fetchone()[0]
        latencies = []
        t_run = time.monotonic()
        with mc.connect(calm) as db:
            for n in range(1, 51):
                t0 = time.monotonic()
                emit(db, n, calm_to)
                mails = smtp.wait_for(calm_to, count=n, timeout=10)
                latencies.append(mails[-1].received_at - t0)
                time.sleep(0.1)
            starts = db.execute("SELECT last_value FROM notify.worker_seq").fetchone()[0]
        run = time.monotonic() - t_run
        flooded = sink.messages() - at_start
        with mc.connect(big) as db:
            big_workers = len(workers_in(db, big))
        latencies.sort()
        p50, p99 = latencies[24], latencies[min(49, int(0.99 * 50))]
        print(f"flood: {queued} queued, {flooded} sent by it during the {run:.1f} s run "
              f"({flooded / run:.0f}/s), {big_workers} workers on it at the end; the other database: "
              f"50 mails, {starts} worker starts there, commit -> received p50 {1000 * p50:.0f} ms, "
              f"p99 {1000 * p99:.0f} ms, max {1000 * latencies[-1]:.0f} ms")
        assert p99 < 1.0
        assert flooded > 1000, "the flood must go on meanwhile"
    finally:
        with mc.connect(big) as db:
            stop_flood(db)
        with mc.connect("postgres") as c:
            for g in ("notify.workers", "notify.max_workers", "notify.worker_idle_timeout"):
                set_guc(mc, c, g, None)
        sink.stop()


def test_a_worker_giving_its_slot_up_hands_back_what_it_had_not_started(mc, smtp, uniq):
    """notify.max_workers = 1: a database that waits for the slot makes the one worker of
    another database leave in the middle of its batch.  What that worker had claimed and not
    started goes back to the queue at once.  It stayed 'sending' until its lease ran out
    (notify.lease, 300 s here): with no other worker left in the database, nobody took it
    back sooner (in test/bench/multidb.py, one of 200 mails came 60 s late)."""
    slow = SmtpServer()
    slow.data_delay = lambda mail: 0.5
    a, b = f"ga_{uniq}", f"gb_{uniq}"
    to_a, to_b = f"{a}@example.com", f"{b}@example.com"
    setup_db(mc, slow.port, a)
    setup_db(mc, smtp.port, b)
    try:
        with mc.connect("postgres") as c:
            set_guc(mc, c, "notify.max_workers", 1)
            set_guc(mc, c, "notify.workers", 1)
            set_guc(mc, c, "notify.lease", "300s")
        with mc.connect(a) as db:
            emit(db, 1, to_a, count=10)       # one claim of 10 (less than a full one)
            slow.wait_for(to_a, count=3, timeout=20)
        t0 = time.monotonic()
        with mc.connect(b) as db:
            emit(db, 1, to_b)
            smtp.wait_for(to_b, timeout=20)
        t_b = time.monotonic() - t0
        with mc.connect(a) as db:
            states = db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1 ORDER BY 1").fetchall()
        mails = slow.wait_for(to_a, count=10, timeout=30)
        t_a = time.monotonic() - t0
        print(f"database b's mail {1000 * t_b:.0f} ms after its commit (the slot given up); "
              f"database a meanwhile {states}; all 10 of a's mails {t_a:.1f} s after b's commit")
        assert sorted(set(numbers(mails))) == list(range(1, 11))
    finally:
        with mc.connect("postgres") as c:
            for g in ("notify.max_workers", "notify.workers", "notify.lease"):
                set_guc(mc, c, g, None)
        slow.stop()


def test_raising_max_workers_on_reload_takes_effect(mc, uniq):
    sink = SmtpSink()
    big = f"grow_{uniq}"
    setup_db(mc, sink.port, big)
    try:
        with mc.connect("postgres") as c:
            set_guc(mc, c, "notify.workers", 4)
            set_guc(mc, c, "notify.max_workers", 1)
        with mc.connect(big) as db:
            flood(db, 50_000)
            wait_until(lambda: len(workers_in(db)) == 1, timeout=10, what="one worker")
            most = 0
            for _ in range(20):
                most = max(most, len(workers_in(db)))
                time.sleep(0.05)
            with mc.connect("postgres") as c:
                c.execute("ALTER SYSTEM SET notify.max_workers = 4")
                t0 = time.monotonic()
                c.execute("SELECT pg_reload_conf()")
            wait_until(lambda: len(workers_in(db, big)) == 4, timeout=10, interval=0.02, what="4 workers")
            took = time.monotonic() - t0
            with mc.connect("postgres") as c:
                c.execute("ALTER SYSTEM SET notify.max_workers = 2")
                t1 = time.monotonic()
                c.execute("SELECT pg_reload_conf()")
            wait_until(lambda: len(workers_in(db, big)) <= 2, timeout=10, interval=0.02, what="2 workers")
            took_down = time.monotonic() - t1
        print(f"notify.max_workers = 1: at most {most} worker; raised to 4 on reload: 4 workers "
              f"{1000 * took:.0f} ms later; lowered to 2: {1000 * took_down:.0f} ms later")
        assert most == 1 and took < 5 and took_down < 5
    finally:
        with mc.connect(big) as db:
            stop_flood(db)
        with mc.connect("postgres") as c:
            for g in ("notify.workers", "notify.max_workers"):
                set_guc(mc, c, g, None)
        sink.stop()


def test_a_database_named_before_it_exists_is_quiet(smtp, uniq):
    """notify.database naming a database that does not exist yet: one LOG
    line, no FATAL every few seconds; served once it is created, without a
    restart.  A database the list does not name refuses the extension."""
    c = Cluster(dbname="postgres", settings={"notify.database": "'later_db, other_db'"})
    try:
        time.sleep(3)
        lines = [ln for ln in c.log().splitlines() if "named by notify.database does not exist" in ln]
        print("\n".join(lines))
        assert len(lines) == 2 and any('"later_db"' in ln for ln in lines)
        assert not re.search(r"FATAL|ERROR", c.log())
        setup_db(c, smtp.port, "later_db")
        with c.connect("later_db") as db:
            t0 = time.monotonic()
            emit(db, 1, f"later_{uniq}@example.com")
            smtp.wait_for(f"later_{uniq}@example.com", timeout=5)
            print(f"created after start: first mail in {1000 * (time.monotonic() - t0):.0f} ms")
            assert time.monotonic() - t0 < 1
        with c.connect("postgres") as pc:
            pc.execute("CREATE DATABASE elsewhere")
        with c.connect("elsewhere") as db:
            with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as exc:
                db.execute("CREATE EXTENSION notify_ext")
            print(exc.value, exc.value.diag.message_hint)
            assert "notify.database" in str(exc.value)
    finally:
        c.destroy()


def test_missing_worker_slot_says_what_to_change(smtp, uniq):
    """Every background worker slot taken (max_worker_processes = 2: our
    launcher and logical replication's): a log line that names notify_ext,
    notify.max_workers, notify.workers and max_worker_processes, once; the
    event waits, and is sent after the setting is raised."""
    c = Cluster(dbname="slots", settings={"max_worker_processes": "2"})
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')", (f"smtp://127.0.0.1:{smtp.port}",))
            db.execute("SELECT notify.set_template('ping', '{{row.db}} {{row.n}}', 'n = {{row.n}}')")
            db.execute("SELECT notify.create_rule('ping', 'ping', 'ping', ARRAY['field:row.to'])")
            to = f"slots_{uniq}@example.com"
            emit(db, 1, to)
            wait_until(lambda: "no background worker slot is free" in c.log(), timeout=10, what="the log line")
            time.sleep(3)
            state = db.execute("SELECT state FROM notify.worker_status()").fetchone()[0]
        log = c.log()
        i = log.index("no background worker slot is free")
        said = log[log.rfind("\n", 0, i) + 1:log.find("\n", log.find("HINT", i))]
        print(said)
        print("worker_status:", state)
        assert log.count("no background worker slot is free") == 1
        for word in ("notify_ext", "notify.max_workers", "notify.workers", "max_worker_processes"):
            assert word in said
        assert "max_worker_processes" in state
        assert smtp.to(to) == []
        c.stop()
        with open(os.path.join(c.data, "postgresql.auto.conf"), "a") as f:
            f.write("max_worker_processes = 8\n")
        c.start()
        # the launcher's census finds the waiting event after the restart
        smtp.wait_for(to, timeout=10)
    finally:
        c.destroy()

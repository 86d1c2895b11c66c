"""Fault injection: the worker killed mid-run (SIGTERM, SIGKILL) and an
immediate shutdown of the cluster under load.  (Relay outages: test_relay.py.)

Each test makes its own cluster (and its own SMTP server), so it may kill,
stop and restart them; it stops only what it started.  What was injected and
what was counted is printed (run pytest with -s to see it).
"""
import asyncio
import math
import os
import re
import threading
import time
from collections import Counter, defaultdict

import psycopg
import pytest
from aiosmtpd.controller import Controller

from harness import Cluster, SmtpServer, _Recorder, free_port, wait_until

FROM = "erp@example.com"
BULK_TO = "bulk@example.com"


# --------------------------------------------------------------------------- SMTP

class _SlowRecorder(_Recorder):
    """The harness's recorder, optionally taking `delay` seconds per DATA
    (before the mail is recorded and before the 250 is sent)."""

    def __init__(self, server, delay):
        super().__init__(server)
        self.delay = delay

    async def handle_DATA(self, smtp, session, envelope):
        if self.delay:
            await asyncio.sleep(self.delay)
        return await super().handle_DATA(smtp, session, envelope)


class _TrackingController(Controller):
    """Keeps the client sessions so that crash() can reset them, as a dying
    server process would (Controller.stop() alone only cancels its tasks)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sessions = []

    def factory(self):
        proto = super().factory()
        self.sessions.append(proto)
        return proto

    def crash(self):
        def abort_all():
            for proto in self.sessions:
                if proto.transport is not None:
                    proto.transport.abort()
        self.loop.call_soon_threadsafe(abort_all)
        self.stop()


class FaultSmtp(SmtpServer):
    """SmtpServer on a chosen port (to come back where the worker expects
    it), sharing the mail list of a predecessor, optionally slow."""

    def __init__(self, port=None, delay=0.0, share=None):
        self.port = port or free_port()
        if share is not None:
            self.mails, self.cond = share.mails, share.cond
        else:
            self.mails, self.cond = [], threading.Condition()
        self.rcpt_replies = {}
        self.data_delay = None
        self.in_data = self.max_in_data = 0
        self.controller = _TrackingController(
            _SlowRecorder(self, delay), hostname="127.0.0.1", port=self.port,
            decode_data=False, data_size_limit=50 * 1024 * 1024)
        self.controller.start()
        self.running = True

    def count(self):
        with self.cond:
            return len(self.mails)

    def snapshot(self):
        with self.cond:
            return list(self.mails)

    def crash(self):
        self.controller.crash()
        self.running = False

    def stop(self):
        if self.running:
            self.controller.stop()
            self.running = False


# sent messages whose outcome may wait for a commit (RECORD_EVERY in src/sender.c)
RECORD_WINDOW = 16

def numbers(mails, prefix):
    """The n of each mail whose subject is `prefix n`, in arrival order."""
    out = []
    for m in mails:
        match = re.fullmatch(re.escape(prefix) + r" (\d+)", m.subject)
        assert match, f"unexpected subject {m.subject!r}"
        out.append(int(match.group(1)))
    return out


def tally(mails, prefix):
    """(distinct n's, duplicates by Message-ID, duplicates by n, n's with >1 Message-ID)."""
    ns = numbers(mails, prefix)
    mids = [m.message["Message-ID"] for m in mails]
    ids_of_n = defaultdict(set)
    for n, mid in zip(ns, mids):
        ids_of_n[n].add(mid)
    split = {n: ids for n, ids in ids_of_n.items() if len(ids) > 1}
    return set(ns), len(mids) - len(set(mids)), len(ns) - len(set(ns)), split


# --------------------------------------------------------------------------- cluster

BAD_LOG = re.compile(r"PANIC|TRAP:|terminated by signal|was terminated by exception|"
                     r"notify_ext worker (ERROR|FATAL)|ERROR|FATAL")


def log_lines(cluster, pattern=BAD_LOG):
    return [line for line in cluster.log().splitlines() if pattern.search(line)]


WORKERS = 4


def worker_pids(conn):
    return sorted(r[0] for r in conn.execute("SELECT pid FROM pg_stat_activity "
                                             "WHERE backend_type = 'notify_ext worker'"))


def worker_pid(conn):
    """Some worker's pid, once all WORKERS are running."""
    pids = worker_pids(conn)
    return pids[0] if len(pids) == WORKERS else None


def connect_when_up(cluster, timeout=60):
    def attempt():
        try:
            conn = cluster.connect()
            conn.execute("SELECT 1")
            return conn
        except psycopg.OperationalError:
            return None
    return wait_until(attempt, timeout=timeout, interval=0.2, what="server accepting connections")


@pytest.fixture
def env():
    """make(smtp, settings) -> a fresh cluster with the extension, an SMTP
    channel to `smtp`, template and rule `bulk` (subject `m {{row.n}}`).
    Teardown destroys the clusters and stops the SMTP servers made here."""
    clusters, servers = [], []

    def make(smtp, settings=None):
        servers.append(smtp)
        conf = {"notify.poll_interval": "'1s'", "notify.workers": str(WORKERS)}
        conf.update(settings or {})
        c = Cluster(dbname="fault", settings=conf)
        clusters.append(c)
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION notify_ext")
            conn.execute("SELECT notify.set_smtp(%s, %s, tls => 'off')",
                         (f"smtp://127.0.0.1:{smtp.port}", FROM))
            conn.execute("SELECT notify.set_template('bulk', 'm {{row.n}}', 'n = {{row.n}}')")
            conn.execute("SELECT notify.create_rule('bulk', 'bulk', 'bulk', ARRAY[%s])",
                          (f"email:{BULK_TO}",))
        return c

    make.servers = servers
    yield make
    for c in clusters:
        lines = log_lines(c)
        if lines:
            print(f"server log, notable lines ({len(lines)}):")
            for line in lines[:40]:
                print("   ", line)
        if os.environ.get("NOTIFY_KEEP_LOG"):
            print(c.log())
        c.destroy()
    for s in servers:
        s.stop()


def wait_all_numbers(smtp, prefix, wanted, timeout, what):
    wanted = set(wanted)

    def done():
        return wanted <= set(numbers(smtp.snapshot(), prefix))
    try:
        wait_until(done, timeout=timeout, interval=0.25, what=what)
    except AssertionError:
        got = set(numbers(smtp.snapshot(), prefix))
        missing = sorted(wanted - got)
        raise AssertionError(f"{what}: {len(missing)} of {len(wanted)} never arrived "
                             f"(first: {missing[:20]})") from None


def status_counts(conn):
    return dict(conn.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())


# --------------------------------------------------------------------------- 1. kill the worker

N_KILL = 5000
KILL_AT = 1000


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_worker_killed_while_sending(env, how):
    smtp = FaultSmtp()
    cluster = env(smtp)
    t_start = time.monotonic()
    conn = cluster.connect()
    batch = int(conn.execute("SHOW notify.batch_size").fetchone()[0])

    # the workers are started for the work: one, then as many as the backlog asks for
    conn.execute("SELECT notify.emit('bulk', jsonb_build_object('n', g)) "
                 "FROM generate_series(1, %s) g", (N_KILL,))
    wait_until(lambda: worker_pid(conn), timeout=30, interval=0.01, what="workers running")
    wait_until(lambda: smtp.count() >= KILL_AT, timeout=60, interval=0.002,
               what=f"{KILL_AT} mails received")
    old_pids = worker_pids(conn)
    old_pid = old_pids[0]
    at_kill = smtp.count()
    t_kill = time.monotonic()
    if how == "sigterm":
        killed = conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE backend_type = 'notify_ext worker'").fetchall()
        assert killed == [(True,)] * WORKERS
    else:
        os.kill(old_pid, 9)
    after_signal = smtp.count()
    print(f"\n[{how}] injected: {'pg_terminate_backend of all' if how == 'sigterm' else 'SIGKILL of one'} "
          f"of {WORKERS} workers {old_pids} after {at_kill} of {N_KILL} mails received "
          f"(batch_size {batch}); {after_signal} received when the signal call returned")

    if how == "sigterm":
        # only the workers go: this session survives, and the launcher starts
        # new ones for the work they left (after a second: an exit nobody asked
        # for counts as a failure, so that a fault cannot make workers spin)
        wait_until(lambda: not set(worker_pids(conn)) & set(old_pids), timeout=10, interval=0.01,
                   what="workers exit")
        print(f"[{how}] workers gone {time.monotonic() - t_kill:.3f} s after the signal; "
              f"{smtp.count()} received then")
        new_pid = wait_until(lambda: not set(worker_pids(conn)) & set(old_pids) and worker_pid(conn),
                             timeout=30, interval=0.2, what="workers restarted")
    else:
        # the postmaster resets every backend: this session is gone too, and a
        # session opened before the postmaster noticed the kill goes with the reset
        conn.close()
        deadline = time.monotonic() + 60
        while True:
            conn = connect_when_up(cluster)
            try:
                # the killed worker's pid can still show until the postmaster notices
                new_pid = wait_until(lambda: not set(worker_pids(conn)) & set(old_pids)
                                     and worker_pid(conn),
                                     timeout=30, interval=0.2, what="workers restarted")
                break
            except psycopg.OperationalError:
                conn.close()
                if time.monotonic() > deadline:
                    raise
    t_back = time.monotonic()
    print(f"[{how}] workers back {worker_pids(conn)} {t_back - t_kill:.1f} s later; "
          f"{smtp.count()} mails received so far")
    assert new_pid != old_pid

    try:
        wait_all_numbers(smtp, "m", range(1, N_KILL + 1), timeout=90, what=f"all {N_KILL} mails")
    except AssertionError:
        print(f"[{how}] messages {status_counts(conn)}; channels "
              f"{conn.execute('SELECT name, state, last_error, next_probe_at FROM notify.channels').fetchall()}; "
              f"held {conn.execute(chr(39).join(['SELECT count(*) FROM notify.message WHERE next_attempt_at = ', 'infinity', ''])).fetchone()}")
        raise
    t_all = time.monotonic()
    sent = wait_until(lambda: status_counts(conn).get("sent", 0) >= N_KILL and status_counts(conn),
                      timeout=30, interval=0.25, what=f"{N_KILL} 'sent' in notify.message")
    time.sleep(0.5)   # anything still in flight would show up as an extra duplicate
    mails = smtp.snapshot()
    distinct, dup_mid, dup_n, split = tally(mails, "m")
    log_sent = conn.execute("SELECT count(*) FROM notify.delivery_log "
                            "WHERE event_type = 'bulk' AND status = 'sent'").fetchone()[0]
    n_msgs = conn.execute("SELECT count(*) FROM notify.message").fetchone()[0]
    multi = conn.execute("SELECT count(*) FROM notify.message WHERE attempts > 1").fetchone()[0]
    took_back = re.findall(r"took back (\d+) message", cluster.log())
    print(f"[{how}] counted: {len(mails)} mails received, {len(distinct)} distinct n, "
          f"duplicates by Message-ID {dup_mid}, by n {dup_n}; delivery_log 'sent' {log_sent}, "
          f"message rows {n_msgs} {sent}, messages tried >1 time {multi}, "
          f"worker 'took back' log: {took_back}")
    print(f"[{how}] timing: kill at {t_kill - t_start:.1f} s, worker back after "
          f"{t_back - t_kill:.1f} s, all {N_KILL} received {t_all - t_kill:.1f} s after the kill")

    assert distinct == set(range(1, N_KILL + 1))
    assert not split, f"one event got several messages (fan-out ran twice): {dict(list(split.items())[:5])}"
    assert dup_mid == dup_n
    # each worker commits outcomes every 16 messages (RECORD_EVERY in src/sender.c)
    assert dup_mid <= RECORD_WINDOW * WORKERS, \
        f"{dup_mid} duplicates > the {RECORD_WINDOW} x {WORKERS} messages whose outcome may wait"
    assert log_sent == N_KILL and n_msgs == N_KILL
    bad = [line for line in log_lines(cluster, re.compile(r"PANIC|TRAP:|terminated by signal (?!9)|"
                                                            r"was terminated by exception"))]
    assert not bad, bad
    if how == "sigkill":
        assert len(re.findall(r"notify_ext worker.*was terminated by signal 9", cluster.log())) == 1
    else:
        assert "terminated by signal" not in cluster.log()
    conn.close()


# --------------------------------------------------------------------------- 3. immediate shutdown

LOAD_S = 2.0
RB_BASE = 1_000_000


def test_immediate_shutdown_under_load(env):
    smtp = FaultSmtp()
    cluster = env(smtp)
    to = "orders@example.com"
    with cluster.connect() as conn:
        batch = int(conn.execute("SHOW notify.batch_size").fetchone()[0])
        conn.execute("CREATE TABLE orders (id int PRIMARY KEY, note text)")
        conn.execute("SELECT notify.watch('orders'::regclass, 'order.created')")
        conn.execute("SELECT notify.set_template('order', 'c {{row.id}}', 'order {{row.id}}')")
        conn.execute("SELECT notify.create_rule('order', 'order.created', 'order', ARRAY[%s])",
                     (f"email:{to}",))

    committed, ambiguous, never = [], [], []     # `never`: rolled back or failed before COMMIT
    stop = threading.Event()
    errors = []

    def committer():
        conn = cluster.connect(autocommit=False)
        i = 0
        try:
            while not stop.is_set():
                i += 1
                try:
                    conn.execute("INSERT INTO orders VALUES (%s, 'committed')", (i,))
                except psycopg.Error as e:
                    never.append(i)
                    errors.append(f"committer insert {i}: {type(e).__name__}")
                    return
                try:
                    conn.commit()
                except psycopg.Error as e:
                    ambiguous.append(i)
                    errors.append(f"committer commit {i}: {type(e).__name__}")
                    return
                committed.append(i)
        finally:
            conn.close()

    def rollbacker():
        conn = cluster.connect(autocommit=False)
        j = RB_BASE
        try:
            while not stop.is_set():
                j += 1
                never.append(j)      # whatever happens, it never reaches COMMIT
                try:
                    conn.execute("INSERT INTO orders VALUES (%s, 'rolled back')", (j,))
                    conn.rollback()
                except psycopg.Error as e:
                    errors.append(f"rollbacker {j}: {type(e).__name__}")
                    return
        finally:
            conn.close()

    threads = [threading.Thread(target=committer), threading.Thread(target=rollbacker)]
    for t in threads:
        t.start()
    time.sleep(LOAD_S)
    mailed_before = smtp.count()
    committed_before = len(committed)
    t0 = time.monotonic()
    cluster.stop("immediate")
    t_stop = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    print(f"\n[immediate] injected: pg_ctl stop -m immediate after {LOAD_S} s of load "
          f"({committed_before} commits returned, {mailed_before} mails received; stop took "
          f"{t_stop:.2f} s); client errors: {errors}")
    print(f"[immediate] committed ids {len(committed)}, ambiguous {ambiguous}, "
          f"rolled back / never committed {len(never)}")
    assert len(committed) > 100 and len(never) > 100, "the load did not run"

    t1 = time.monotonic()
    cluster.start()
    conn = connect_when_up(cluster)
    ids_in_table = {r[0] for r in conn.execute("SELECT id FROM orders").fetchall()}
    assert set(committed) <= ids_in_table, "PostgreSQL lost committed rows (not the extension)"
    assert not (set(never) & ids_in_table)
    wait_all_numbers(smtp, "c", committed, timeout=60, what="every committed order mailed")
    t_all = time.monotonic() - t1

    def settled():
        ev = conn.execute("SELECT count(*) FROM notify.event WHERE processed_at IS NULL").fetchone()[0]
        st = status_counts(conn)
        return ev == 0 and not st.get("queued") and not st.get("sending") and st
    final = wait_until(settled, timeout=30, interval=0.25, what="queue drained")
    time.sleep(0.5)
    mails = smtp.snapshot()
    distinct, dup_mid, dup_n, split = tally(mails, "c")
    ghosts = sorted(distinct & set(never))
    amb_mailed = sorted(distinct & set(ambiguous))
    events = conn.execute("SELECT count(*) FROM notify.event WHERE event_type = 'order.created'").fetchone()[0]
    extra = sorted(distinct - set(committed) - set(ambiguous))
    print(f"[immediate] restarted; all {len(committed)} committed ids mailed {t_all:.1f} s after "
          f"start; counted {len(mails)} mails, {len(distinct)} distinct ids, duplicates by "
          f"Message-ID {dup_mid}, by id {dup_n}; rolled-back ids mailed {len(ghosts)}; ambiguous "
          f"mailed {amb_mailed}; events {events}, rows in table {len(ids_in_table)}; messages {final}")

    assert set(committed) <= distinct
    assert not ghosts, f"rolled-back / uncommitted ids were mailed: {ghosts[:20]}"
    assert not extra, f"mails for ids never inserted: {extra[:20]}"
    assert not split
    assert dup_mid == dup_n and dup_mid <= RECORD_WINDOW * WORKERS, \
        f"{dup_mid} duplicates > the {RECORD_WINDOW} messages an outcome may wait"
    assert final.get("sent") == events == len(ids_in_table), (final, events, len(ids_in_table))
    assert not log_lines(cluster, re.compile(r"PANIC|TRAP:|terminated by signal")), \
        log_lines(cluster)
    conn.close()

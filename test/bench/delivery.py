"""Delivery throughput: committed events to mails accepted by an SMTP server.

notify_ext: 20,000 events committed in ONE transaction (INSERT ... SELECT
generate_series into a table watched with notify.watch, so each row goes
through the C capture trigger), one rule with one recipient per event
(`field:row.email`), a text template padded to ~2 KB. notify.workers = 4
(4 SMTP connections), notify.batch_size = 100 (default). The mails go to
Postfix's smtp-sink on 127.0.0.1. Timed: from the COMMIT (client clock taken
just before COMMIT is sent) to max(sent_at) of the 20,000 messages, i.e.
fan-out (rendering) and sending together. sent_at is set by the worker's
recording transaction, which starts after the 250 of every message it
records: the figure is a (tight) upper bound of the last 250. Cross-checked
with smtp-sink's own counter (-c). A warm-up of 200 events goes first
(connections opened, plans prepared), not counted.

Baselines in the same run, each against a fresh smtp-sink:
  (a) smtp-source -d -s 4 -m 20000 -l 2000: raw SMTP, 4 sessions, each
      reusing its connection, 2,000-byte payload (Postfix's own load
      generator, C, no database);
  (b) a plain Python loop over an outbox table in the same database:
      outbox(id, address, subject, body, status, sent_at), 20,000 rows with
      the same ~2 KB bodies; it claims batches of 100 with
      UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 100)
      RETURNING and commits, sends each over ONE reused smtplib connection
      (headers built by string formatting, no MIME library), then marks the
      batch sent with one UPDATE and commits.

Usage: /usr/bin/python3 test/bench/delivery.py [--messages N] [--workers W]
       [--batch-size B] [--rounds R]
Last line: delivery: notify N msgs/s, smtp-source N msgs/s, python N msgs/s;
           notify/smtp-source = X (target >= 0.5), notify/python = Y (target >= 3)
"""
import argparse
import email.utils
import os
import re
import resource
import shutil
import signal
import smtplib
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from benchlib import SMTP_SOURCE, SmtpSink, loadavg  # noqa: E402
from harness import Cluster  # noqa: E402

TARGET_SOURCE = 0.5
TARGET_PYTHON = 3.0
TARGET_CLUSTER_US = 150     # CPU of the whole cluster per delivered message (issue 17)
WARMUP = 200
FROM = "erp@example.com"

# ~1.9 KB of ASCII text in 72-column lines, appended to every body
PAD = "".join(f"Line {i:02d}: the quick brown fox jumps over the lazy dog, "
              f"0123456789 abcdefgh.\n" for i in range(24))


def proc_cpu(pid):
    """utime + stime of a process, in seconds (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def cluster_cpu(c):
    """CPU seconds of the whole cluster so far: the postmaster, its children
    that ended (the postmaster's cutime + cstime: workers that started and
    left during a run count too) and those still running."""
    with open(os.path.join(c.data, "postmaster.pid")) as f:
        pm = int(f.readline())
    with open(f"/proc/{pm}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    total = sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total + sum(proc_cpu(p) for p in cluster_pids(c) if p != pm)


def cluster_pids(c):
    """The postmaster and all its children."""
    with open(os.path.join(c.data, "postmaster.pid")) as f:
        pm = int(f.readline())
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pm)], capture_output=True, text=True).stdout
    return [pm] + [int(p) for p in out.split()]


def run_smtp_source(n, sessions):
    sink = SmtpSink()
    try:
        cpu0 = proc_cpu(sink.proc.pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        subprocess.run([SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(n), "-l", "2000",
                        "-f", FROM, "-t", "rcpt@example.com", f"127.0.0.1:{sink.port}"],
                       check=True, capture_output=True)
        elapsed = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        got = sink.messages()
        sink_cpu = proc_cpu(sink.proc.pid) - cpu0
    finally:
        sink.stop()
    assert got == n, f"smtp-sink counted {got} of {n}"
    print(f"smtp-source: {n} messages, {sessions} sessions, 2000-byte payload: {elapsed:.2f} s = "
          f"{n / elapsed:.0f} msgs/s (smtp-sink counted {got})")
    print(f"  CPU: smtp-source {client_cpu:.2f} s ({1e6 * client_cpu / n:.0f} us/msg), "
          f"smtp-sink {sink_cpu:.2f} s; load average {loadavg()}")
    return n / elapsed, client_cpu / n


def run_python(c, n):
    sink = SmtpSink()
    try:
        with c.connect() as db:
            db.execute("DROP TABLE IF EXISTS outbox")
            db.execute("""CREATE TABLE outbox (id bigserial PRIMARY KEY, address text NOT NULL,
                              subject text NOT NULL, body text NOT NULL,
                              status text NOT NULL DEFAULT 'queued', sent_at timestamptz)""")
            db.execute("CREATE INDEX outbox_queued ON outbox (id) WHERE status = 'queued'")
            db.execute("""INSERT INTO outbox (address, subject, body)
                          SELECT 'customer' || g || '@example.com', 'Order ' || g || ' registered',
                                 'Hello,' || chr(10) || chr(10) || 'your order ' || g || ' for '
                                 || (100.50 + g) || ' EUR was registered.' || chr(10) || chr(10) || %s
                            FROM generate_series(1, %s::int) g""", (PAD, n))
            db.execute("VACUUM ANALYZE outbox")
        conn = c.connect(autocommit=False)
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()[0]
        conn.commit()
        smtp = smtplib.SMTP("127.0.0.1", sink.port)
        smtp.ehlo()
        sent = 0
        cpu0 = (time.process_time(), proc_cpu(backend), proc_cpu(sink.proc.pid))
        t0 = time.monotonic()
        while True:
            rows = conn.execute("""UPDATE outbox SET status = 'sending'
                                    WHERE id IN (SELECT id FROM outbox WHERE status = 'queued'
                                                  ORDER BY id LIMIT 100 FOR UPDATE SKIP LOCKED)
                                    RETURNING id, address, subject, body""").fetchall()
            conn.commit()
            if not rows:
                break
            for mid, address, subject, body in rows:
                msg = (f"Date: {email.utils.formatdate(localtime=True)}\r\n"
                       f"From: {FROM}\r\nTo: {address}\r\nSubject: {subject}\r\n"
                       f"Message-ID: <outbox.{mid}@example.com>\r\n"
                       "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n"
                       "Content-Transfer-Encoding: 7bit\r\n\r\n" + body).encode()
                smtp.sendmail(FROM, [address], msg)
            conn.execute("UPDATE outbox SET status = 'sent', sent_at = now() WHERE id = ANY(%s)",
                         ([r[0] for r in rows],))
            conn.commit()
            sent += len(rows)
        elapsed = time.monotonic() - t0
        py_cpu, be_cpu, sink_cpu = (time.process_time() - cpu0[0], proc_cpu(backend) - cpu0[1],
                                    proc_cpu(sink.proc.pid) - cpu0[2])
        smtp.quit()
        conn.close()
        got = sink.messages()
    finally:
        sink.stop()
    assert sent == n and got == n, (sent, got)
    print(f"python (smtplib, 1 connection, outbox claimed by 100): {n} messages in {elapsed:.2f} s = "
          f"{n / elapsed:.0f} msgs/s (smtp-sink counted {got})")
    print(f"  CPU: python {py_cpu:.2f} s + its backend {be_cpu:.2f} s = {1e6 * (py_cpu + be_cpu) / n:.0f} us/msg, "
          f"smtp-sink {sink_cpu:.2f} s; load average {loadavg()}")
    return n / elapsed, (py_cpu + be_cpu) / n


def wait_sent(db, first_id, n, timeout):
    deadline = time.monotonic() + timeout
    while True:
        sent, bad, retried = db.execute(
            """SELECT count(*) FILTER (WHERE status = 'sent'),
                      count(*) FILTER (WHERE status IN ('failed', 'dead')),
                      count(*) FILTER (WHERE attempts > 1)
                 FROM notify.message WHERE id >= %s""", (first_id,)).fetchone()
        if sent >= n:
            return retried
        if bad or time.monotonic() > deadline:
            raise AssertionError(f"{sent} of {n} sent, {bad} failed/dead, {retried} retried")
        time.sleep(0.5)


def perf_start(pids, outdir):
    os.makedirs(outdir, exist_ok=True)
    data = os.path.join(outdir, "perf-delivery.data")
    return data, subprocess.Popen(["perf", "record", "-e", "cpu-clock", "-F", "250", "--call-graph", "dwarf,8192",
                                   "-o", data, "-p", ",".join(map(str, pids))],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def perf_stop(rec, data, outdir):
    rec.send_signal(signal.SIGINT)
    rec.wait()
    for children in (False, True):
        kind = "children" if children else "self"
        rep = subprocess.run(["perf", "report", "-i", data, "--stdio", "--children" if children else "--no-children",
                              "--sort", "symbol", "-g", "none", "--percent-limit", "0.5"],
                             capture_output=True, text=True)
        path = os.path.join(outdir, f"perf-delivery-{kind}.txt")
        with open(path, "w") as f:
            f.write(rep.stdout)
        rows = [ln for ln in rep.stdout.splitlines() if re.match(r"^\s*[\d.]+%", ln)]
        print(f"  perf ({kind}, workers), {path}:")
        for ln in rows[:25 if children else 20]:
            print("   " + ln.strip())


def run_notify(c, sink, n, first_row, perf=None):
    """Commit n events; return msgs/s."""
    with c.connect() as db:
        first_msg = db.execute("SELECT coalesce(max(id), 0) + 1 FROM notify.message").fetchone()[0]
        sink0 = sink.messages()
        # workers start on demand: those running now, and any the run starts
        pids = {r[0] for r in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'notify_ext worker'")}
        cpu0 = {p: proc_cpu(p) for p in cluster_pids(c)}
        total0 = cluster_cpu(c)
        sink_cpu0 = proc_cpu(sink.proc.pid)
        if perf:
            data, rec = perf_start(sorted(pids), perf)
            time.sleep(1)
        with c.connect(autocommit=False) as tx:
            tx.execute("""INSERT INTO orders (id, email, total)
                          SELECT g, 'customer' || g || '@example.com', 100.50 + g
                            FROM generate_series(%s::int, %s::int) g""", (first_row, first_row + n - 1))
            t0 = time.time()
            tx.commit()
        t_commit = time.time()
        retried = wait_sent(db, first_msg, n, timeout=600)
        if perf:
            perf_stop(rec, data, perf)
        last_sent, fanned = db.execute(
            """SELECT extract(epoch FROM max(m.sent_at)),
                      (SELECT extract(epoch FROM max(e.processed_at)) FROM notify.event e
                        WHERE e.id >= (SELECT min(event_id) FROM notify.message WHERE id >= %s))
                 FROM notify.message m WHERE m.id >= %s""", (first_msg, first_msg)).fetchone()
        first_sent = db.execute("SELECT extract(epoch FROM min(sent_at)) FROM notify.message WHERE id >= %s",
                                (first_msg,)).fetchone()[0]
        # the sink counts at the final dot; give it the last few
        deadline = time.monotonic() + 5
        while sink.messages() - sink0 < n and time.monotonic() < deadline:
            time.sleep(0.05)
        got = sink.messages() - sink0
        pids |= {r[0] for r in db.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'notify_ext worker'")}
        # workers that left during the run (notify.worker_idle_timeout) are in the whole
        # cluster's figure (the postmaster's cutime), not in this one: only those still here
        alive = {p for p in pids if os.path.exists(f"/proc/{p}")}
        worker_cpu = sum(proc_cpu(p) - cpu0.get(p, 0.0) for p in alive)
        total_cpu = cluster_cpu(c) - total0
        sink_cpu = proc_cpu(sink.proc.pid) - sink_cpu0
    elapsed = float(last_sent) - t0
    other_cpu = total_cpu - worker_cpu
    print(f"notify_ext: {n} events committed in one transaction (commit took {1000 * (t_commit - t0):.1f} ms); "
          f"last mail accepted {elapsed:.2f} s after COMMIT = {n / elapsed:.0f} msgs/s; "
          f"fan-out finished after ~{float(fanned) - t0:.2f} s, first mail after {float(first_sent) - t0:.3f} s; "
          f"{retried} retried; smtp-sink counted {got}")
    print(f"  CPU: the whole cluster {total_cpu:.2f} s = {1e6 * total_cpu / n:.0f} us/msg (target <= {TARGET_CLUSTER_US}): "
          f"{len(alive)} workers {worker_cpu:.2f} s ({1e6 * worker_cpu / n:.0f} us/msg)"
          f"{f' ({len(pids) - len(alive)} more left during the run)' if len(pids) > len(alive) else ''}, "
          f"the rest (the committing backend's capture, WAL writer, checkpointer, launcher, workers that left) {other_cpu:.2f} s; "
          f"smtp-sink {sink_cpu:.2f} s; load average {loadavg()}")
    assert got == n, f"smtp-sink counted {got} of {n}"
    return n / elapsed, total_cpu / n


def setup_notify(c, sink, workers):
    with c.connect() as db:
        db.execute("CREATE EXTENSION notify_ext")
        db.execute("SELECT notify.set_smtp(%s, %s, tls => 'off')", (f"smtp://127.0.0.1:{sink.port}", FROM))
        db.execute("CREATE TABLE orders (id int PRIMARY KEY, email text NOT NULL, total numeric NOT NULL)")
        db.execute("SELECT notify.watch('orders', 'order.created')")
        db.execute("SELECT notify.set_template('order_created', 'Order {{row.id}} registered', %s)",
                   ("Hello,\n\nyour order {{row.id}} for {{row.total}} EUR was registered.\n\n" + PAD,))
        db.execute("SELECT notify.create_rule('order to customer', 'order.created', 'order_created', "
                   "ARRAY['field:row.email'])")
        size = db.execute("SELECT octet_length(text_body) FROM notify.render('order_created', "
                          "'{\"row\": {\"id\": 12345, \"total\": 12445.50}}')").fetchone()[0]
        print(f"template text body: {size} bytes; notify.workers = {workers}")
        # warm-up: connections opened, plans prepared
        db.execute("INSERT INTO orders SELECT g, 'warm' || g || '@example.com', 1 FROM generate_series(%s::int, -1) g",
                   (-WARMUP,))
        wait_sent(db, 1, WARMUP, timeout=120)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--perf", metavar="DIR", help="perf record the workers during notify's run; reports in DIR")
    ap.add_argument("--auto-explain", metavar="MS", type=float,
                    help="diagnosis: log (auto_explain, with ANALYZE and BUFFERS) the plans of statements "
                         "slower than MS ms; copies the server log to /tmp/notify_bench_delivery.log")
    args = ap.parse_args()
    n = args.messages

    settings = {"notify.workers": str(args.workers), "notify.batch_size": str(args.batch_size),
                "notify.retention": "0"}
    if args.auto_explain is not None:
        settings.update({"shared_preload_libraries": "'notify_ext,auto_explain'",
                         "auto_explain.log_min_duration": f"'{args.auto_explain}ms'",
                         "auto_explain.log_analyze": "on", "auto_explain.log_buffers": "on",
                         "auto_explain.log_nested_statements": "on", "log_min_messages": "log"})
    c = Cluster(settings=settings)
    sink = SmtpSink()
    res = {"notify": [], "source": [], "python": []}
    cpu = {"notify": [], "source": [], "python": []}
    try:
        setup_notify(c, sink, args.workers)
        for r in range(args.rounds):
            print(f"-- round {r + 1}, load average {loadavg()}")
            for key, run in (("source", lambda: run_smtp_source(n, args.workers)),
                             ("notify", lambda: run_notify(c, sink, n, 1 + r * n, args.perf)),
                             ("python", lambda: run_python(c, n))):
                rate, per_msg = run()
                res[key].append(rate)
                cpu[key].append(per_msg)
    finally:
        sink.stop()
        if args.auto_explain is not None:
            shutil.copy(c.logfile, "/tmp/notify_bench_delivery.log")
        c.destroy()
    med = {k: statistics.median(v) for k, v in res.items()}
    note = f" (medians of {args.rounds} rounds)" if args.rounds > 1 else ""
    print(f"delivery: notify {med['notify']:.0f} msgs/s, smtp-source {med['source']:.0f} msgs/s, "
          f"python {med['python']:.0f} msgs/s{note}; "
          f"notify/smtp-source = {med['notify'] / med['source']:.2f} (target >= {TARGET_SOURCE}), "
          f"notify/python = {med['notify'] / med['python']:.2f} (target >= {TARGET_PYTHON:g}); "
          f"CPU/msg (sink excluded): notify's whole cluster {1e6 * statistics.median(cpu['notify']):.0f} us "
          f"(target <= {TARGET_CLUSTER_US}), "
          f"smtp-source {1e6 * statistics.median(cpu['source']):.0f} us, "
          f"python {1e6 * statistics.median(cpu['python']):.0f} us")


if __name__ == "__main__":
    main()

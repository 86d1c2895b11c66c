"""Through a real Postfix: notify_ext -> Postfix (its own instance, test/lib/
mailstack.py: relayhost = the final server, no DNS, loopback) -> a final
SMTP server, the harness's aiosmtpd (FinalSmtp), which notes the wall time
at which it has each mail. That is the recommended production set-up
(notify_ext -> a local Postfix -> the internet or a provider), with the
internet replaced by a server on loopback: what it measures is notify_ext
and Postfix together.

For each notify.workers value (default 2 and 8), on a fresh cluster:
  throughput: N messages (default 2,000: events committed 200 to a
    transaction, one rule, one recipient each, a ~1 KB text mail), from the
    first COMMIT (the server's commit timestamp) to the last mail received
    at the final server; messages/s;
  latency: single-row autocommit INSERTs into a watched table at a steady
    rate (default 100/s for 10 s), COMMIT (pg_xact_commit_timestamp of the
    row) -> the final server has the mail (two SMTP hops: notify_ext ->
    Postfix's 250, Postfix's queue manager -> smtp -> the final server);
    p50, p99, max.
The channel is as in production: tls 'off' to the local relay, a
bounce_address, so every envelope is a VERP address (one more string per
message). Postfix is mailstack's: queue_run_delay 1 s; its other settings
are Postfix's defaults (default_destination_concurrency_limit 20,
in_flow_delay 1 s).

Usage: /usr/bin/python3 test/bench/postfix.py [--workers 2,8] [--messages 2000]
       [--rate 100] [--seconds 10]
Last line: postfix: workers 2: N msgs/s, p50 X ms, p99 Y ms; workers 8: ...
"""
import argparse
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from benchlib import SMTP_SOURCE, loadavg, pct, wait_mails  # noqa: E402
from harness import Cluster  # noqa: E402
from mailstack import FinalSmtp, Postfix  # noqa: E402

BODY = "".join(f"Line {i:02d} of the invoice notice: the quick brown fox jumps over the lazy dog.\n"
               for i in range(12))
WARMUP = 50


def ids_of(final, kind):
    """(id, wall_time) of the final server's mails whose subject is '<kind> <id>'."""
    out = {}
    for m in list(final.mails):
        mo = re.match(rf"{kind} (\d+)$", m.subject)
        if mo:
            out[int(mo.group(1))] = m.wall_time
    return out


def smtp_source_rate(n, sessions, through_postfix):
    """Postfix's smtp-source (C, no database): n mails of ~1 KB over `sessions` connections,
    to the final server directly or through a Postfix; msgs/s until the final server has them."""
    final = FinalSmtp(refuse={})
    postfix = Postfix(final.port) if through_postfix else None
    try:
        port = postfix.port if postfix else final.port
        t0 = time.time()
        subprocess.run([SMTP_SOURCE, "-d", "-s", str(sessions), "-m", str(n), "-l", "1000",
                        "-f", "erp@erp.test", "-t", "src@dest.test", f"127.0.0.1:{port}"],
                       check=True, capture_output=True, timeout=600)
        wait_mails(final, n, 600, where=" at the final server")
        return n / (max(m.wall_time for m in final.mails) - t0)
    finally:
        if postfix:
            postfix.destroy()
        final.stop()


def run(workers, args):
    final = FinalSmtp(refuse={})
    postfix = Postfix(final.port)
    c = Cluster(settings={"notify.workers": str(workers), "track_commit_timestamp": "on",
                          "max_worker_processes": str(max(8, workers + 4))})
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', bounce_address => 'bounces@erp.test')",
                       (f"smtp://127.0.0.1:{postfix.port}",))
            db.execute("CREATE TABLE orders (id int PRIMARY KEY, kind text NOT NULL, email text NOT NULL)")
            db.execute("SELECT notify.watch('orders', 'order.created')")
            db.execute("SELECT notify.set_template('pf', '{{row.kind}} {{row.id}}', %s)",
                       ("Hello,\n\n" + BODY,))
            db.execute("SELECT notify.create_rule('pf', 'order.created', 'pf', ARRAY['field:row.email'])")
            db.execute("INSERT INTO orders SELECT g, 'Warm', 'warm' || g || '@dest.test' "
                       "FROM generate_series(1, %s) g", (WARMUP,))
            wait_mails(final, WARMUP, 60, where=" at the final server")

            # throughput: committed 200 to a transaction, as fast as the client goes
            n = args.messages
            base = 1_000_000
            db.autocommit = False
            for start in range(0, n, 200):
                db.execute("INSERT INTO orders SELECT g, 'Bulk', 'bulk' || g || '@dest.test' "
                           "FROM generate_series(%s, %s) g", (base + start, base + min(start + 200, n) - 1))
                db.commit()
            db.autocommit = True
            wait_mails(final, WARMUP + n, 600, where=" at the final server")
            first_commit = db.execute("SELECT min(extract(epoch FROM pg_xact_commit_timestamp(xmin)))::float8 "
                                      "FROM orders WHERE kind = 'Bulk'").fetchone()[0]
            # when Postfix had the last one (its 250, as the worker recorded it: an upper bound)
            handed = db.execute("SELECT extract(epoch FROM max(sent_at))::float8 FROM notify.message "
                                "WHERE subject LIKE 'Bulk %'").fetchone()[0]
            bulk = ids_of(final, "Bulk")
            assert len(bulk) == n, (len(bulk), n)
            last = max(bulk.values())
            rate = n / (last - first_commit)

            # latency: single-row commits at a steady rate
            m = int(args.rate * args.seconds)
            lbase = 2_000_000
            behind = 0
            t0 = time.time() + 0.1
            for i in range(m):
                due = t0 + i / args.rate
                now = time.time()
                if due > now:
                    time.sleep(due - now)
                elif now - due > 0.005:
                    behind += 1
                db.execute("INSERT INTO orders VALUES (%s, 'Lat', %s)", (lbase + i, f"lat{i}@dest.test"))
            wait_mails(final, WARMUP + n + m, 120, where=" at the final server")
            committed = dict(db.execute("SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                                        "FROM orders WHERE kind = 'Lat'"))
            got = ids_of(final, "Lat")
            assert len(got) == m, (len(got), m)
            lat = sorted(1000 * (got[i] - committed[i]) for i in got)
            verp = final.mails[-1].mail_from
            conc = postfix.postconf("default_destination_concurrency_limit", "in_flow_delay").split("\n")
    finally:
        c.destroy()
        postfix.destroy()
        final.stop()
    print(f"notify.workers = {workers}: {n} messages (200 per COMMIT) from the first COMMIT to the last at the "
          f"final server in {last - first_commit:.2f} s = {rate:.0f} msgs/s; all handed to Postfix (its 250) "
          f"after {handed - first_commit:.2f} s = {n / (handed - first_commit):.0f} msgs/s")
    print(f"notify.workers = {workers}: {m} single-row commits at {args.rate:.0f}/s ({behind} started > 5 ms late): "
          f"COMMIT -> final server p50 {pct(lat, 50):.1f} ms, p90 {pct(lat, 90):.1f} ms, "
          f"p99 {pct(lat, 99):.1f} ms, max {lat[-1]:.1f} ms")
    print(f"  (envelope {verp}; Postfix {', '.join(x for x in conc if x)}; load average {loadavg()})")
    return rate, pct(lat, 50), pct(lat, 99)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="2,8")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--rate", type=float, default=100)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    results = [(w, run(int(w), args)) for w in args.workers.split(",")]
    # what the path allows without notify_ext: the final server alone, and Postfix in front of it
    direct = smtp_source_rate(args.messages, 8, False)
    relayed = smtp_source_rate(args.messages, 8, True)
    print(f"smtp-source -s 8, {args.messages} mails of 1 KB: to the final server directly {direct:.0f} msgs/s; "
          f"through Postfix {relayed:.0f} msgs/s")
    print("postfix: " + "; ".join(f"workers {w}: {r:.0f} msgs/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms"
                                  for w, (r, p50, p99) in results)
          + f"; smtp-source through Postfix {relayed:.0f} msgs/s")


if __name__ == "__main__":
    main()

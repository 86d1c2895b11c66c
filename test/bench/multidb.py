"""Every database: what 200 databases with the extension cost when idle,
and how fast one event in each of them is mailed.

A cluster (notify.database unset: '*'; notify_ext's defaults otherwise:
notify.max_workers = 4, notify.workers = 2, notify.worker_idle_timeout =
10s) gets a template database with the extension (marked IS_TEMPLATE, as a
hosting provider would put it in template1), then N databases created from
it (CREATE DATABASE ... TEMPLATE ... STRATEGY FILE_COPY): each is a copy of
a template, which its first worker adopts by itself (docs/operations.md).
The cluster is restarted, so that the launcher's census looks at every
database once; then, once the launcher is alone again:

  1. idle: the cluster's processes and their memory, from /proc (RSS and
     PSS from smaps_rollup; PSS shares what several processes map, such as
     shared buffers, between them), the notify_ext ones apart;
  2. one event in each database, committed one after the other from
     connections opened beforehand: time from the first COMMIT until all N
     mails are received (aiosmtpd, test/lib/harness.py), and the most
     workers seen at once;
  3. idle again: how long until the launcher is alone again.

Usage: /usr/bin/python3 test/bench/multidb.py [--databases 200] [--max-workers N]
Last line: multidb: N databases idle: P processes (notify_ext: L), ... ; one event in each: all N mails in X s
"""
import argparse
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from benchlib import loadavg  # noqa: E402
from harness import Cluster, SmtpServer, wait_until  # noqa: E402


def cluster_processes(cluster):
    """(pid, kind, rss_kb, pss_kb) of the postmaster and its children."""
    with open(os.path.join(cluster.data, "postmaster.pid")) as f:
        pm = int(f.readline())
    out = []
    for pid in [pm] + children(pm):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            rss = pss = 0
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss = int(line.split()[1])
                    elif line.startswith("Pss:"):
                        pss = int(line.split()[1])
        except OSError:
            continue            # gone meanwhile
        kind = cmd.split(":", 1)[1].strip() if ":" in cmd else "postmaster"
        out.append((pid, kind, rss, pss))
    return out


def children(ppid):
    kids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == ppid:
                kids.append(int(d))
        except OSError:
            pass
    return kids


def notify_kinds(procs):
    return [p for p in procs if p[1].startswith("notify_ext")]


def describe(procs):
    total_rss = sum(p[2] for p in procs) / 1024
    total_pss = sum(p[3] for p in procs) / 1024
    ours = notify_kinds(procs)
    return (f"{len(procs)} processes, RSS {total_rss:.1f} MB, PSS {total_pss:.1f} MB; notify_ext: "
            f"{len(ours)} ({', '.join(sorted(set(p[1].split(' for ')[0] for p in ours))) or 'none'}), "
            f"RSS {sum(p[2] for p in ours) / 1024:.1f} MB, PSS {sum(p[3] for p in ours) / 1024:.1f} MB")


def notify_workers(conn):
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'notify_ext worker'").fetchone()[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--databases", type=int, default=200)
    ap.add_argument("--max-workers", type=int, default=None, help="notify.max_workers (default: the extension's)")
    args = ap.parse_args()
    n = args.databases
    settings = {"max_connections": str(n + 50), "notify.poll_interval": "'30s'"}
    if args.max_workers:
        settings["notify.max_workers"] = str(args.max_workers)
        settings["max_worker_processes"] = str(args.max_workers + 8)
    smtp = SmtpServer()
    c = Cluster(dbname="postgres", settings=settings)
    try:
        with c.connect("postgres") as pc:
            max_workers = pc.execute("SHOW notify.max_workers").fetchone()[0]
            idle_timeout = pc.execute("SHOW notify.worker_idle_timeout").fetchone()[0]
            before = describe(cluster_processes(c))
            pc.execute("CREATE DATABASE tmpl")
        with c.connect("tmpl") as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')", (f"smtp://127.0.0.1:{smtp.port}",))
            db.execute("SELECT notify.set_template('ping', '{{row.db}}', 'hello from {{row.db}}')")
            db.execute("SELECT notify.create_rule('ping', 'ping', 'ping', ARRAY['field:row.to'])")
        t0 = time.monotonic()
        with c.connect("postgres") as pc:
            pc.execute("ALTER DATABASE tmpl IS_TEMPLATE true")
            for i in range(n):
                pc.execute(f"CREATE DATABASE db{i:03d} TEMPLATE tmpl STRATEGY FILE_COPY")
        t_create = time.monotonic() - t0
        print(f"{n} databases with the extension created from a template in {t_create:.1f} s; "
              f"notify.max_workers = {max_workers}, notify.worker_idle_timeout = {idle_timeout}")
        print(f"before any database had the extension: {before}")

        # a restart: the launcher's census looks at each database once
        c.restart()
        t0 = time.monotonic()
        most = 0
        with c.connect("postgres") as pc:
            last_seen = [t0]

            def alone():
                # the census starts its workers in batches: alone for 2 s on end
                nonlocal most
                w = notify_workers(pc)
                most = max(most, w)
                if w > 0:
                    last_seen[0] = time.monotonic()
                return w == 0 and time.monotonic() - last_seen[0] > 2.0
            wait_until(alone, timeout=600, interval=0.02, what="the census to end")
            t_census = last_seen[0] - t0
            adopted = c.log().count("it adopts itself")
            print(f"after a restart, the census of {n + 2} databases took {t_census:.1f} s "
                  f"(at most {most} workers at once; {adopted} template copies adopted themselves)")
            time.sleep(2)
            idle = cluster_processes(c)
            print(f"idle, {n} databases with the extension: {describe(idle)}")
            for pid, kind, rss, pss in idle:
                print(f"    {pid:>7} {kind[:60]:<60} RSS {rss / 1024:6.1f} MB  PSS {pss / 1024:6.1f} MB")

        conns = [c.connect(f"db{i:03d}") for i in range(n)]
        seen = [0]
        stop = threading.Event()

        def sample():
            with c.connect("postgres") as pc:
                while not stop.is_set():
                    seen[0] = max(seen[0], notify_workers(pc))
                    time.sleep(0.02)
        th = threading.Thread(target=sample)
        th.start()
        try:
            t0 = time.monotonic()
            for i, db in enumerate(conns):
                db.execute("SELECT notify.emit('ping', jsonb_build_object('db', current_database(), "
                           "'to', current_database() || '@example.com'))")
            t_commits = time.monotonic() - t0
            with smtp.cond:
                while len(smtp.mails) < n:
                    left = 600 - (time.monotonic() - t0)
                    if left <= 0:
                        raise AssertionError(f"{len(smtp.mails)} of {n} mails after 600 s")
                    smtp.cond.wait(left)
            t_all = time.monotonic() - t0
            last = max(m.received_at for m in smtp.mails)
            got = {m.rcpt_tos[0].split("@")[0] for m in smtp.mails}
        finally:
            stop.set()
            th.join()
            for db in conns:
                db.close()
        assert got == {f"db{i:03d}" for i in range(n)}, "a database's mail is missing or doubled"
        print(f"one event in each of the {n} databases ({t_commits:.2f} s to commit them all): all {n} mails "
              f"received {t_all:.2f} s after the first COMMIT; at most {seen[0]} workers at once")
        with c.connect("postgres") as pc:
            wait_until(lambda: notify_workers(pc) == 0, timeout=120, interval=0.1, what="idle again")
            t_idle = time.monotonic() - last
        print(f"the launcher alone again {t_idle:.1f} s after the last mail; load average {loadavg()}")
        print(f"multidb: {n} databases idle: {len(idle)} processes (notify_ext: {len(notify_kinds(idle))}), "
              f"PSS {sum(p[3] for p in idle) / 1024:.1f} MB (notify_ext {sum(p[3] for p in notify_kinds(idle)) / 1024:.1f} MB); "
              f"one event in each: all {n} mails in {t_all:.2f} s (notify.max_workers = {max_workers})")
    finally:
        c.destroy()
        smtp.stop()


if __name__ == "__main__":
    main()

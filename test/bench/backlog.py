"""Backlog: does claiming a batch stay cheap when the queue is long, and does
the space come back after a purge?

The workers are paused (notify.enabled = off) for the whole run; messages
are written straight into notify.message with INSERT ... SELECT
generate_series: one processed event per 10 messages, each message
status 'queued', due now, a ~300-byte text body.

1. Claim cost. At backlogs of 10k, 100k and 1M queued messages (filled in
   steps, ANALYZE after each, as autovacuum would soon do), the worker's
   claim statement, its text read from src/sender.c (claim_plan), is
   PREPAREd with the worker's parameters ($1 = SEND_CLAIM_SIZE = 16,
   $2 = notify.lease, $3 = worker slot 0, $4 = notify.workers) and EXECUTEd
   in a transaction that is rolled back, 25 times; the first 5 run with
   custom plans, then PostgreSQL settles on the generic plan as it does for
   the worker's SPI plan. Reported: the median wall time of the last 20, in
   ms per batch, as seen by this client (round trip included), the plan's
   shape and its buffers. Also the sender's next-due query (next_due_plan),
   which the worker runs after a claim that is not a full batch.
2. Space. Sizes (pg_total_relation_size: heap, TOAST and indexes) of
   notify.message, notify.event and notify.attempt before filling, after
   filling, after every message is marked sent with one attempt row each
   (what a drain leaves behind: the UPDATE and INSERT are done directly,
   not by the workers), after notify.purge('0 seconds') (which deletes
   finished messages older than now() - 0, their attempts by cascade, then
   processed events without messages), and after VACUUM, twice (the second
   is what the next autovacuum does: it hands the index pages the first
   one deleted to the free space map). VACUUM gives the heap back (its
   pages are all empty, so it is truncated) but keeps the indexes' pages
   allocated for reuse, as PostgreSQL always does: a second cycle (the
   same fill, drain, purge and VACUUMs) shows whether they are reused,
   which is what keeps the tables bounded. Then REINDEX TABLE of the three
   gives the index space back too (the only way, with VACUUM FULL).

Takes about 2 minutes.
Usage: /usr/bin/python3 test/bench/backlog.py [--max 1000000] [--no-second-cycle]
Last line: backlog: claim ms/batch 10k X, 100k Y, 1M Z (1M/10k = R); after purge + VACUUM: heap+TOAST A MB /
           before B MB, indexes kept for reuse C MB, second cycle / first = D; after REINDEX / before = E
"""
import argparse
import os
import re
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "lib"))
from benchlib import loadavg  # noqa: E402
from harness import Cluster  # noqa: E402

SENDER_C = os.path.join(HERE, "..", "..", "src", "sender.c")
NOTIFY_H = os.path.join(HERE, "..", "..", "src", "notify_ext.h")
TABLES = ("notify.message", "notify.event", "notify.attempt")
MSGS_PER_EVENT = 10


def plan_text(name):
    """The SQL of `name = notify_keep_plan("..." "...", nargs, types)` in
    src/sender.c: its string literals joined, comments skipped."""
    src = open(SENDER_C).read()
    m = re.search(r"\b" + name + r"\s*=\s*notify_keep_plan\((.*?)\);", src, re.S)
    body = re.sub(r"/\*.*?\*/", "", m.group(1), flags=re.S)
    return "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', body))


def claim_size():
    m = re.search(r"#define\s+SEND_CLAIM_SIZE\s+(\d+)", open(NOTIFY_H).read())
    return int(m.group(1))


def sizes(db):
    return {t: db.execute("SELECT pg_total_relation_size(%s)", (t,)).fetchone()[0] for t in TABLES}


def heap_sizes(db):
    """Heap and TOAST, without the indexes."""
    return {t: db.execute("SELECT pg_table_size(%s)", (t,)).fetchone()[0] for t in TABLES}


def map_forks(db):
    """Free space and visibility maps of the three tables (VACUUM makes them)."""
    return db.execute("""SELECT sum(pg_relation_size(c.oid, 'fsm') + pg_relation_size(c.oid, 'vm'))
                           FROM pg_class c WHERE c.oid IN ('notify.message'::regclass, 'notify.event'::regclass,
                                                           'notify.attempt'::regclass)""").fetchone()[0]


def fmt_size(b):
    return f"{b / 1048576:.1f} MB" if b >= 1048576 else f"{b // 1024} kB"


def fmt_sizes(s):
    return ", ".join(f"{t.split('.')[1]} {fmt_size(s[t])}" for t in TABLES) + f" (total {fmt_size(sum(s.values()))})"


def fill(db, first, count):
    """count queued messages (and their processed events) from id `first` on."""
    t0 = time.monotonic()
    e_first = (first - 1) // MSGS_PER_EVENT + 1
    e_last = (first + count - 2) // MSGS_PER_EVENT + 1
    db.execute("""INSERT INTO notify.event (id, event_type, op, table_name, row, processed_at, status)
                  SELECT g, 'order.created', 'INSERT', 'orders',
                         jsonb_build_object('id', g, 'total', 100.50 + g, 'email', 'c' || g || '@example.com'),
                         now(), 'done'
                    FROM generate_series(%s::bigint, %s::bigint) g""", (e_first, e_last))
    db.execute("""INSERT INTO notify.message (id, event_id, event_type, rule_id, rule_name, recipient_key,
                                              address, channel, status, subject, text_body)
                  SELECT g, (g - 1) / %s + 1, 'order.created', 1, 'order to customer', NULL,
                         'customer' || g || '@example.com', 'email', 'queued', 'Order ' || g || ' registered',
                         'Hello,' || chr(10) || chr(10) || 'your order ' || g || ' for ' || (100.50 + g)
                         || ' EUR was registered on ' || now() || '.' || chr(10) || chr(10)
                         || 'Kind regards,' || chr(10) || 'The ERP' || chr(10) || repeat('-', 60) || chr(10)
                         || 'Reference ' || md5(g::text) || ', ' || md5((g + 1)::text) || chr(10)
                    FROM generate_series(%s::bigint, %s::bigint) g""",
               (MSGS_PER_EVENT, first, first + count - 1))
    db.execute("ANALYZE notify.message")
    db.execute("ANALYZE notify.event")
    return time.monotonic() - t0


def drain(db):
    """What sending every message leaves: status 'sent', one attempt each."""
    t0 = time.monotonic()
    db.execute("""INSERT INTO notify.attempt (message_id, started_at, finished_at, outcome, smtp_code, response)
                  SELECT id, now(), now(), 'sent', 250, '250 2.0.0 Ok: queued'
                    FROM notify.message WHERE status = 'queued'""")
    db.execute("""UPDATE notify.message SET status = 'sent', attempts = 1, sent_at = now(),
                         smtp_response = '250 2.0.0 Ok: queued' WHERE status = 'queued'""")
    return time.monotonic() - t0


def measure_claim(db, workers, size, label):
    db.execute("DEALLOCATE ALL")
    db.execute(f"PREPARE claim(int, int, int, int) AS {plan_text('claim_plan')}")
    db.execute(f"PREPARE next_due AS {plan_text('next_due_plan')}")
    execute = f"EXECUTE claim({int(size)}, 60, 0, {int(workers)})"
    times, nd_times = [], []
    for i in range(25):
        db.execute("BEGIN")
        t0 = time.perf_counter()
        got = len(db.execute(execute).fetchall())
        times.append(1000 * (time.perf_counter() - t0))
        t0 = time.perf_counter()
        db.execute("EXECUTE next_due").fetchall()
        nd_times.append(1000 * (time.perf_counter() - t0))
        db.execute("ROLLBACK")
        assert got == size, (got, size)
    db.execute("BEGIN")
    plan = [r[0] for r in db.execute("EXPLAIN (ANALYZE, BUFFERS) " + execute)]
    nd_plan = [r[0] for r in db.execute("EXPLAIN (ANALYZE, BUFFERS) EXECUTE next_due")]
    db.execute("ROLLBACK")
    claim_ms = statistics.median(times[5:])
    nd_ms = statistics.median(nd_times[5:])
    scans = sorted({re.sub(r"\s+\(.*", "", ln.strip().lstrip("-> ")) for ln in plan if "Scan" in ln})
    buffers = next((ln.strip() for ln in plan if "Buffers" in ln), "")
    nd_scan = next((re.sub(r"\s+\(.*", "", ln.strip().lstrip("-> ")) for ln in nd_plan if "Scan" in ln), "")
    print(f"backlog {label:>4}: claim of {size}: {claim_ms:.2f} ms/batch (custom plans, first 5: "
          f"{statistics.median(times[:5]):.2f} ms); generic plan: {'; '.join(scans)}; top {buffers}")
    print(f"              next-due query: {nd_ms:.2f} ms ({nd_scan})")
    return claim_ms, nd_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=1000000, help="largest backlog (steps: max/100, max/10, max)")
    ap.add_argument("--no-second-cycle", action="store_true")
    args = ap.parse_args()
    steps = [args.max // 100, args.max // 10, args.max]
    size = claim_size()

    c = Cluster(settings={"notify.enabled": "off", "notify.retention": "0", "shared_buffers": "'512MB'",
                          "max_wal_size": "'4GB'", "checkpoint_timeout": "'30min'"})
    t_start = time.monotonic()
    try:
        with c.connect(prepare_threshold=None) as db:   # PREPAREs and DEALLOCATEs its own
            db.execute("CREATE EXTENSION notify_ext")
            workers = int(db.execute("SHOW notify.workers").fetchone()[0])
            db.execute("VACUUM notify.message, notify.event, notify.attempt")
            before, before_heap, before_maps = sizes(db), heap_sizes(db), map_forks(db)
            print(f"notify.workers = {workers}, SEND_CLAIM_SIZE = {size}; load average {loadavg()}")
            print(f"sizes before filling: {fmt_sizes(before)}")
            claim = {}
            done = 0
            for step in steps:
                secs = fill(db, done + 1, step - done)
                print(f"filled {step - done} messages in {secs:.1f} s")
                done = step
                claim[step] = measure_claim(db, workers, size, label=f"{step // 1000}k" if step < 1000000
                                            else f"{step / 1000000:g}M")
            filled = sizes(db)
            print(f"sizes after filling: {fmt_sizes(filled)}")
            print(f"marked {done} messages sent, one attempt each, in {drain(db):.1f} s")
            drained = sizes(db)
            print(f"sizes after draining: {fmt_sizes(drained)}")

            def purge_vacuum():
                t0 = time.monotonic()
                n = db.execute("SELECT notify.purge('0 seconds')").fetchone()[0]
                t_purge = time.monotonic() - t0
                purged = sizes(db)
                left = db.execute("SELECT (SELECT count(*) FROM notify.message), (SELECT count(*) FROM notify.event), "
                                  "(SELECT count(*) FROM notify.attempt)").fetchone()
                assert left == (0, 0, 0), left
                print(f"notify.purge('0 seconds'): {n} rows in {t_purge:.1f} s; sizes: {fmt_sizes(purged)}")
                t0 = time.monotonic()
                db.execute("VACUUM notify.message, notify.event, notify.attempt")
                print(f"after VACUUM ({time.monotonic() - t0:.1f} s): {fmt_sizes(sizes(db))}")
                # the next (auto)vacuum hands the index pages the first one deleted to the free space map
                db.execute("VACUUM notify.message, notify.event, notify.attempt")
                vacuumed, heap = sizes(db), heap_sizes(db)
                print(f"after a second VACUUM: {fmt_sizes(vacuumed)}; of which heap and TOAST "
                      f"{fmt_size(sum(heap.values()))}")
                return vacuumed, heap

            first, first_heap = purge_vacuum()
            second = None
            if not args.no_second_cycle:
                print("second cycle: the same fill, drain, purge and VACUUMs")
                print(f"filled {args.max} messages in {fill(db, done + 1, args.max):.1f} s, "
                      f"drained in {drain(db):.1f} s")
                second, _ = purge_vacuum()
            db.execute("REINDEX TABLE notify.message")
            db.execute("REINDEX TABLE notify.event")
            db.execute("REINDEX TABLE notify.attempt")
            reindexed = sizes(db)
            after_maps = map_forks(db)
            print(f"after REINDEX TABLE of the three: {fmt_sizes(reindexed)}; of which free space and "
                  f"visibility maps: {fmt_size(after_maps)} (before filling: {fmt_size(before_maps)})")
    finally:
        c.destroy()
    print(f"total time {time.monotonic() - t_start:.0f} s")
    lo, hi = steps[0], steps[-1]
    label = {s: (f"{s // 1000}k" if s < 1000000 else f"{s / 1000000:g}M") for s in steps}
    line = ("backlog: claim ms/batch " + ", ".join(f"{label[s]} {claim[s][0]:.2f}" for s in steps) +
            f" ({label[hi]}/{label[lo]} = {claim[hi][0] / claim[lo][0]:.2f}); after purge + VACUUM: "
            f"heap+TOAST {fmt_size(sum(first_heap.values()))} (before {fmt_size(sum(before_heap.values()))}), "
            f"indexes kept for reuse {fmt_size(sum(first.values()) - sum(first_heap.values()))}")
    if second is not None:
        line += f", second cycle / first = {sum(second.values()) / sum(first.values()):.2f}"
    line += (f"; after REINDEX {fmt_size(sum(reindexed.values()))} / before {fmt_size(sum(before.values()))} = "
             f"{sum(reindexed.values()) / sum(before.values()):.2f}, without the {fmt_size(after_maps - before_maps)} "
             f"of free space and visibility maps = "
             f"{(sum(reindexed.values()) - after_maps + before_maps) / sum(before.values()):.2f} (target: within 10%)")
    print(line)


if __name__ == "__main__":
    main()

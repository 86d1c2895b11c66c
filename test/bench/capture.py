"""Capture cost on the ERP's hot path: pgbench TPS of a one-row INSERT per
transaction into three tables of the same 10-column "orders" shape:

  orders_plain    no trigger
  orders_watched  notify.watch('orders_watched', 'order'): the C trigger
                  notify.capture() writes one notify.event row per insert
  orders_plpgsql  the hand-written alternative: a PL/pgSQL AFTER INSERT
                  FOR EACH ROW trigger doing
                  INSERT INTO outbox(payload) VALUES (to_jsonb(NEW)) into an
                  outbox shaped like notify.event where it costs: a generated
                  key with its primary key, a status, processed_at, and
                  notify.event's own CHECK constraints and secondary indexes,
                  copied from the catalog at start (today: the status CHECK
                  and the partial index "(id) WHERE processed_at IS NULL"),
                  so the comparison follows notify.event when it changes.

Setup, stated because it matters for the figures:
  * a throwaway cluster (test/lib/harness.py), the extension preloaded;
    fsync = off as in the harness (commits still write their WAL; only the
    flush to disk is skipped, so CPU per row is what is compared; --fsync
    turns it on), synchronous_commit at its default (on), full_page_writes
    on, autovacuum on, shared_buffers 256MB; max_wal_size 4GB and
    checkpoint_timeout 30min so that no checkpoint lands inside a run (a
    VACUUM of the tables and a CHECKPOINT are done between runs instead);
  * notify.enabled = off and notify.poll_interval = 1h: the workers neither
    fan out nor send nor poll during the measurement. They are still woken
    at every commit that wrote an event (that wake-up is part of capture's
    cost, as in production) and then only check that the extension exists;
    their CPU time is counted;
  * pgbench -n -c 2 -j 2 -T <seconds> (-M simple by default, --protocol to
    change), after a warm-up of each variant; the three variants are
    interleaved, their order rotated each round, and the median TPS of each
    variant over the rounds is compared.

Besides TPS, each run reports the CPU time per transaction of pgbench, of
the two backends (their CPU rate, sampled from /proc while they run) and of
the notify_ext workers. On a machine shared with other work, TPS moves with
the others' load; CPU per transaction much less: the "cpu-bound estimate"
ratios are the cross-check.

Checks afterwards that notify.event holds exactly one 'order' event per row
of orders_watched (and the outbox one row per row of orders_plpgsql), and
that the last event's row equals to_jsonb() of its order.

--diagnose-wakeup: each round also runs watched with the notify_ext workers
SIGSTOPped (their latch stays set, so a commit's SetLatch returns at once):
the difference to the normal watched run is what waking the workers at every
commit costs. Not part of the summary.

--perf DIR: after the measured rounds, one more watched, plpgsql and plain
run each (not counted) with `perf record` (cpu-clock, DWARF call graphs)
attached to their backends; prints the inclusive share of backend time of
the functions that tell where capture's time goes; reports and data in DIR.

--erp-order: a realistic ERP transaction instead of one row: an order header,
5 order lines (one INSERT each) and a stock UPDATE per line, in one
transaction; watched (and, in the PL/pgSQL variant, captured) on the header
and the lines, not the stock. The same script, unwatched, is "plain".

Usage: /usr/bin/python3 test/bench/capture.py [--seconds N] [--rounds R]
       [--warmup S] [--protocol simple|extended|prepared] [--fsync]
       [--diagnose-wakeup] [--perf DIR] [--erp-order]
The last line printed is the summary:
  capture: watched/unwatched = X (target >= 0.85), watched/plpgsql = Y (target >= 1.2)
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from harness import PG_BIN, Cluster, _as_pg_user  # noqa: E402

VARIANTS = ("plain", "watched", "plpgsql")
TARGET_UNWATCHED = 0.85
TARGET_PLPGSQL = 1.2

ORDERS_COLUMNS = """
    id               bigserial PRIMARY KEY,
    customer_id      int,
    salesperson      text,
    status           text,
    total            numeric(12,2),
    currency         text,
    created_at       timestamptz DEFAULT now(),
    notes            text,
    shipping_address text,
    priority         int
"""

SCHEMA = f"""
CREATE TABLE orders_plain ({ORDERS_COLUMNS});
CREATE TABLE orders_watched ({ORDERS_COLUMNS});
CREATE TABLE orders_plpgsql ({ORDERS_COLUMNS});

-- The hand-written outbox, shaped like notify.event where it costs: a
-- generated key with its primary key index, a status, processed_at. The
-- CHECK constraints and secondary indexes of notify.event are copied onto it
-- by mirror_event_shape(), so that the comparison follows notify.event.
CREATE TABLE outbox (
    id           bigserial PRIMARY KEY,
    created_at   timestamptz NOT NULL DEFAULT now(),
    payload      jsonb,
    processed_at timestamptz,
    status       text NOT NULL DEFAULT 'pending'
);

CREATE FUNCTION outbox_capture() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO outbox(payload) VALUES (to_jsonb(NEW));
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_capture AFTER INSERT ON orders_plpgsql
    FOR EACH ROW EXECUTE FUNCTION outbox_capture();
"""

# One order per transaction, every column but id and created_at given
# (those two come from their defaults), values varying per row.
PGBENCH_SCRIPT = r"""\set cust random(1, 20000)
\set cents random(100, 5000000)
\set prio random(1, 5)
INSERT INTO orders_{variant} (customer_id, salesperson, status, total, currency, notes, shipping_address, priority) VALUES (:cust, 'seller-' || (:cust % 40), 'new', :cents / 100.0, 'EUR', 'Please deliver between 9:00 and 17:00; call the warehouse first', 'Calle Mayor 12, 3B, 28013 Madrid, Spain', :prio);
"""


# --erp-order: lines and stock next to each orders_* table.
ERP_SCHEMA = """
CREATE TABLE lines_{v} (
    id          bigserial PRIMARY KEY,
    order_id    bigint NOT NULL REFERENCES orders_{v} (id),
    line_no     int NOT NULL,
    product_id  int NOT NULL,
    qty         int NOT NULL,
    price       numeric(12,2) NOT NULL,
    discount    numeric(5,2) NOT NULL DEFAULT 0,
    description text
);
CREATE INDEX ON lines_{v} (order_id);
CREATE TABLE stock_{v} (
    product_id int PRIMARY KEY,
    qty        int NOT NULL,
    reserved   int NOT NULL DEFAULT 0,
    updated_at timestamptz
) WITH (fillfactor = 80);
INSERT INTO stock_{v} SELECT g, 100000000, 0, now() FROM generate_series(1, 20000) g;
"""
ERP_PLPGSQL = """
CREATE TRIGGER outbox_capture AFTER INSERT ON lines_plpgsql
    FOR EACH ROW EXECUTE FUNCTION outbox_capture();
"""
ERP_SCRIPT = r"""\set cust random(1, 20000)
\set cents random(100, 5000000)
\set prio random(1, 5)
""" + "".join(f"\\set p{i} random(1, 20000)\n\\set q{i} random(1, 9)\n" for i in range(1, 6)) + r"""BEGIN;
INSERT INTO orders_{variant} (customer_id, salesperson, status, total, currency, notes, shipping_address, priority) VALUES (:cust, 'seller-' || (:cust % 40), 'new', :cents / 100.0, 'EUR', 'Please deliver between 9:00 and 17:00; call the warehouse first', 'Calle Mayor 12, 3B, 28013 Madrid, Spain', :prio) RETURNING id AS order_id \gset
""" + "".join(f"INSERT INTO lines_{{variant}} (order_id, line_no, product_id, qty, price, discount, description) VALUES (:order_id, {i}, :p{i}, :q{i}, 12.50 * {i}, 0, 'Article {i}, box of 12');\n" for i in range(1, 6)) + "".join(f"UPDATE stock_{{variant}} SET qty = qty - :q{i}, updated_at = now() WHERE product_id = :p{i};\n" for i in range(1, 6)) + "END;\n"

# What tells where a trigger's time goes, in a backend's profile.
PERF_KEYS = [
    ("PostgresMain", "everything the backend does"),
    ("exec_simple_query", "one statement, simple protocol"),
    ("AfterTriggerEndQuery", "the AFTER ROW triggers"),
    ("notify_capture", "notify_ext's C trigger"),
    ("plpgsql_exec_trigger", "the PL/pgSQL trigger"),
    ("SPI_execute_plan", "notify.capture's INSERT INTO notify.event"),
    ("SPI_execute_plan_with_paramlist", "PL/pgSQL's INSERT INTO outbox"),
    ("standard_ExecutorStart", "executor start-up (both statements)"),
    ("ExecConstraints", "CHECK constraints, compiled again per statement"),
    ("to_jsonb", "the row as jsonb"),
    ("heap_insert", "heap inserts (order and event)"),
    ("ExecInsertIndexTuples", "index inserts"),
    ("nextval_internal", "sequences"),
    ("CommitTransactionCommand", "commit"),
    ("XLogFlush", "WAL write at commit"),
    ("XLogFileInit", "new WAL segments"),
    ("notify_xact_callback", "notify_ext at commit: waking the workers"),
    ("__x64_sys_kill", "kill(): SetLatch of another process"),
    ("secure_write", "replies to the client"),
]


def mirror_event_shape(db):
    """Give outbox notify.event's CHECK constraints and secondary indexes
    (those over columns outbox has too); returns what was done."""
    done = []
    checks = db.execute("""SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
                            WHERE conrelid = 'notify.event'::regclass AND contype = 'c'
                            ORDER BY conname""").fetchall()
    for name, definition in checks:
        try:
            with db.transaction():
                db.execute(f"ALTER TABLE outbox ADD {definition}")
            done.append(f"{definition} (as {name})")
        except Exception as e:  # a column outbox lacks
            done.append(f"NOT {definition} ({str(e).splitlines()[0]})")
    indexes = db.execute("""SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index
                             WHERE indrelid = 'notify.event'::regclass AND NOT indisprimary
                             ORDER BY 1""").fetchall()
    for i, (name, definition) in enumerate(indexes):
        ddl, n = re.subn(r"^CREATE (UNIQUE )?INDEX \S+ ON notify\.event ",
                         rf"CREATE \1INDEX outbox_mirror_{i} ON public.outbox ", definition)
        try:
            if n != 1:
                raise ValueError("unexpected index definition")
            with db.transaction():
                db.execute(ddl)
            done.append(f"{ddl} (as {name})")
        except Exception as e:
            done.append(f"NOT {definition} ({str(e).splitlines()[0]})")
    return done


def fmt_cpu(us):
    def f(x):
        return "?" if x is None else f"{x:.1f}"
    return (f"client {f(us['client'])} + backends {f(us['backends'])} + workers {f(us['workers'])}"
            f" = {f(total_cpu(us))} us")


def total_cpu(us):
    return None if None in us.values() else sum(us.values())


def median_cpu(runs):
    return {k: (statistics.median([r[k] for r in runs]) if all(r[k] is not None for r in runs) else None)
            for k in ("client", "backends", "workers")}


def pgbench_bin():
    p = os.path.join(PG_BIN, "pgbench")
    return p if os.path.exists(p) else shutil.which("pgbench")


class Bench:
    def __init__(self, args):
        self.args = args
        settings = {
            # The worker: paused, and no polling between wake-ups.
            "notify.enabled": "off",
            "notify.poll_interval": "'1h'",
            # A benchmark server rather than the harness's small defaults.
            "shared_buffers": "'256MB'",
            "max_wal_size": "'4GB'",
            "checkpoint_timeout": "'30min'",
            "log_min_messages": "warning",
        }
        if args.fsync:
            settings["fsync"] = "on"
        self.cluster = Cluster(dbname="bench_capture", settings=settings)
        self.scripts = {}
        self.inserted = {v: 0 for v in VARIANTS}

    def setup(self):
        erp = self.args.erp_order
        for v in VARIANTS:
            path = os.path.join(self.cluster.dir, f"insert_{v}.sql")
            with open(path, "w") as f:
                f.write((ERP_SCRIPT if erp else PGBENCH_SCRIPT).replace("{variant}", v))
            os.chmod(path, 0o644)
            self.scripts[v] = path
        with self.cluster.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute(SCHEMA)
            if erp:
                for v in VARIANTS:
                    db.execute(ERP_SCHEMA.replace("{v}", v))
                db.execute(ERP_PLPGSQL)
            mirrored = mirror_event_shape(db)
            trg = db.execute("SELECT notify.watch('orders_watched', 'order')").fetchone()[0]
            if erp:
                trg += ", " + db.execute("SELECT notify.watch('lines_watched', 'order.line')").fetchone()[0]
            cfg = db.execute("""SELECT string_agg(name || '=' || setting, ', ' ORDER BY name)
                                  FROM pg_settings WHERE name IN ('fsync', 'synchronous_commit',
                                  'full_page_writes', 'shared_buffers', 'autovacuum', 'wal_level',
                                  'notify.enabled', 'notify.poll_interval', 'notify.workers')""").fetchone()[0]
            ver = db.execute("SELECT version()").fetchone()[0]
        print(f"server: {ver}")
        print(f"settings: {cfg} (shared_buffers in 8kB pages, poll_interval in ms); "
              f"notify_ext worker processes: {len(self.worker_pids())}")
        print(f"watched by notify_ext: trigger {trg}; hand-written: trigger outbox_capture")
        for m in mirrored:
            print(f"outbox mirrors notify.event: {m}")

    def worker_pids(self):
        with self.cluster.connect() as db:
            return [r[0] for r in db.execute("SELECT pid FROM pg_stat_activity "
                                             "WHERE backend_type = 'notify_ext worker'")]

    @staticmethod
    def cpu_seconds(pids):
        """utime + stime of processes, in seconds (None if unknown)."""
        if not pids:
            return None
        total = 0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except (OSError, IndexError, ValueError):
                return None
        return total / os.sysconf("SC_CLK_TCK")

    def between_runs(self):
        """Same starting state for every run: no dirty backlog, no pending vacuum."""
        with self.cluster.connect() as db:
            db.execute("VACUUM orders_plain, orders_watched, orders_plpgsql, outbox, notify.event")
            if self.args.erp_order:
                db.execute("VACUUM " + ", ".join(f"lines_{v}, stock_{v}" for v in VARIANTS))
            db.execute("CHECKPOINT")
        time.sleep(1)

    def pgbench_cmd(self, variant, seconds):
        return _as_pg_user([pgbench_bin(), "-h", self.cluster.sock, "-p", str(self.cluster.port),
                            "-U", "postgres", "-n", "-c", "2", "-j", "2", "-T", str(seconds),
                            "-M", self.args.protocol, "-f", self.scripts[variant]]
                           # two clients' stock updates may deadlock now and then: retried, as an ERP would
                           + (["--max-tries", "100"] if self.args.erp_order else [])
                           + [self.cluster.dbname])

    @staticmethod
    def parse(out):
        tps = re.search(r"^tps = ([0-9.]+) \(without initial connection time\)", out, re.M)
        n = re.search(r"^number of transactions actually processed: (\d+)", out, re.M)
        failed = re.search(r"^number of failed transactions: (\d+)", out, re.M)
        lat = re.search(r"^latency average = ([0-9.]+) ms", out, re.M)
        if not (tps and n):
            raise RuntimeError("could not read pgbench's output:\n" + out)
        if failed and int(failed.group(1)):
            raise RuntimeError("pgbench reports failed transactions:\n" + out)
        return float(tps.group(1)), int(n.group(1)), float(lat.group(1)) if lat else None

    def run(self, variant, seconds, stop_workers=False):
        """One pgbench run. Returns tps, transactions, mean latency (ms) and
        the CPU time per transaction, in us, of pgbench (client), of the two
        backends (their CPU rate, sampled from /proc while they run, over
        the tps) and of the notify_ext workers. stop_workers: with the workers
        SIGSTOPped (a diagnostic: their latch stays set, so commits wake
        nobody)."""
        wpids = self.worker_pids()
        w0 = self.cpu_seconds(wpids)
        if stop_workers:
            for pid in wpids:
                os.kill(pid, signal.SIGSTOP)
        first = last = None
        with tempfile.TemporaryFile(mode="w+") as out:
            try:
                p = subprocess.Popen(self.pgbench_cmd(variant, seconds), stdout=out,
                                     stderr=subprocess.STDOUT, text=True)
                backends = []
                with self.cluster.connect() as db:
                    deadline = time.monotonic() + 10
                    while len(backends) < 2 and p.poll() is None and time.monotonic() < deadline:
                        backends = [r[0] for r in db.execute(
                            "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")]
                        time.sleep(0.02)
                while True:
                    pid, status, ru = os.wait4(p.pid, os.WNOHANG)
                    if pid:
                        break
                    c = self.cpu_seconds(backends)
                    if c is not None:
                        first = first or (time.monotonic(), c)
                        last = (time.monotonic(), c)
                    time.sleep(0.25)
            finally:
                if stop_workers:
                    for pid in wpids:
                        os.kill(pid, signal.SIGCONT)
            p.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            text = out.read()
        w1 = self.cpu_seconds(wpids)
        if p.returncode != 0:
            raise RuntimeError(f"pgbench failed ({p.returncode}):\n{text}")
        tps, n, lat = self.parse(text)
        self.inserted[variant] += n
        us = {"client": 1e6 * (ru.ru_utime + ru.ru_stime) / n,
              "backends": None, "workers": None}
        if first and last and last[0] - first[0] > 1:
            us["backends"] = 1e6 * (last[1] - first[1]) / (last[0] - first[0]) / tps
        if w0 is not None and w1 is not None:
            us["workers"] = 1e6 * (w1 - w0) / n
        return tps, n, lat, us

    def run_under_perf(self, variant, seconds, outdir):
        """One uncounted run, `perf record` (cpu-clock, DWARF call graphs)
        attached to its two backends for a few seconds in its middle; prints
        the inclusive share of backend time of the functions that tell
        where capture's time goes, then the self-time top."""
        os.makedirs(outdir, exist_ok=True)
        seconds = max(seconds, 8)
        pb = subprocess.Popen(self.pgbench_cmd(variant, seconds), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
        pids = []
        deadline = time.monotonic() + 10
        with self.cluster.connect() as db:
            while len(pids) < 2 and time.monotonic() < deadline:
                pids = [r[0] for r in db.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgbench'")]
                time.sleep(0.05)
        replaced = False
        for pid in pids:
            try:
                with open(f"/proc/{pid}/maps") as f:
                    replaced |= "notify_ext.so (deleted)" in f.read()
            except OSError:
                pass
        time.sleep(2)
        data = os.path.join(outdir, f"perf-{variant}.data")
        record_for = min(6, seconds - 4)
        rec = subprocess.run(["perf", "record", "-e", "cpu-clock", "-F", "999", "--call-graph", "dwarf,16384",
                              "-o", data, "-p", ",".join(map(str, pids)), "--", "sleep", str(record_for)],
                             capture_output=True, text=True)
        out, err = pb.communicate()
        self.inserted[variant] += self.parse(out)[1]
        if rec.returncode != 0:
            print(f"perf record failed: {rec.stderr.strip()}")
            return
        entries = {}
        for children in (True, False):
            rep = subprocess.run(["perf", "report", "-i", data, "--stdio",
                                  "--children" if children else "--no-children",
                                  "--sort", "symbol", "-g", "none", "--percent-limit", "0.3"],
                                 capture_output=True, text=True)
            with open(os.path.join(outdir, f"perf-{variant}-{'children' if children else 'self'}.txt"), "w") as f:
                f.write(rep.stdout)
            rows = []
            for ln in rep.stdout.splitlines():
                m = re.match(r"^\s*([\d.]+)%\s+(?:([\d.]+)%\s+)?\[(.)\]\s+(\S+)", ln)
                if m and not m.group(4).startswith("0x"):
                    rows.append((float(m.group(1)), m.group(4), m.group(3)))
            if children:
                for pct, sym, _ in rows:
                    entries[sym] = max(pct, entries.get(sym, 0))
            else:
                top = rows[:15]
        print(f"-- perf, {variant}: backends {pids}, {record_for}s, reports in {outdir}")
        if replaced:
            print("   note: notify_ext.so was replaced on disk after the server started: perf can neither "
                  "name nor unwind through it, so notify_capture and its callers are missing or understated")
        print("   share of backend time, inclusive (a function and what it calls):")
        for sym, what in PERF_KEYS:
            if sym in entries:
                print(f"   {entries[sym]:6.2f}%  {sym:<34} {what}")
        print("   top self time: " + ", ".join(f"{sym} {pct:.1f}%" for pct, sym, _ in top))

    def verify(self):
        with self.cluster.connect() as db:
            watched = db.execute("SELECT count(*) FROM orders_watched").fetchone()[0]
            events = db.execute("SELECT count(*) FROM notify.event WHERE event_type = 'order'").fetchone()[0]
            other = db.execute("SELECT count(*) FROM notify.event WHERE event_type NOT IN ('order', 'order.line')").fetchone()[0]
            line_events = db.execute("SELECT count(*) FROM notify.event WHERE event_type = 'order.line'").fetchone()[0]
            lines = db.execute("SELECT count(*) FROM lines_watched").fetchone()[0] if self.args.erp_order else 0
            lines_pl = db.execute("SELECT count(*) FROM lines_plpgsql").fetchone()[0] if self.args.erp_order else 0
            plpgsql = db.execute("SELECT count(*) FROM orders_plpgsql").fetchone()[0]
            outbox = db.execute("SELECT count(*) FROM outbox").fetchone()[0]
            plain = db.execute("SELECT count(*) FROM orders_plain").fetchone()[0]
            sample = db.execute("""SELECT e.row = to_jsonb(o), e.op, e.table_name
                                     FROM notify.event e JOIN orders_watched o ON o.id = (e.row->>'id')::bigint
                                    ORDER BY e.id DESC LIMIT 1""").fetchone()
        print(f"rows: orders_plain {plain}, orders_watched {watched}, orders_plpgsql {plpgsql}; "
              f"notify.event 'order' events {events}, outbox rows {outbox}")
        assert watched == self.inserted["watched"], (watched, self.inserted["watched"])
        assert plpgsql == self.inserted["plpgsql"], (plpgsql, self.inserted["plpgsql"])
        assert events == watched, f"notify.event has {events} 'order' events for {watched} rows"
        assert other == 0, f"{other} unexpected events"
        assert outbox == plpgsql + lines_pl, (outbox, plpgsql, lines_pl)
        if self.args.erp_order:
            assert line_events == lines and lines == 5 * watched, (line_events, lines, watched)
        assert sample == (True, "INSERT", "public.orders_watched"), sample
        print(f"correctness: {events} 'order' events = {watched} rows inserted into orders_watched "
              f"(pgbench counted {self.inserted['watched']}); last event's row = to_jsonb(the order): OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=20, help="pgbench -T per measured run (20)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the three variants (3)")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up seconds per variant (5)")
    ap.add_argument("--protocol", default="simple", choices=("simple", "extended", "prepared"),
                    help="pgbench -M (simple)")
    ap.add_argument("--fsync", action="store_true", help="fsync = on (the harness turns it off)")
    ap.add_argument("--erp-order", action="store_true",
                    help="a header, 5 lines and 5 stock updates per transaction (header and lines watched)")
    ap.add_argument("--perf", metavar="DIR", help="profile an extra watched and plpgsql run into DIR")
    ap.add_argument("--diagnose-wakeup", action="store_true",
                    help="each round, also run watched with the workers SIGSTOPped (not in the summary)")
    args = ap.parse_args()
    if pgbench_bin() is None:
        sys.exit("pgbench not found")

    b = Bench(args)
    try:
        b.setup()
        print(f"pgbench -n -c 2 -j 2 -T {args.seconds} -M {args.protocol}; {args.rounds} rounds, "
              f"order rotated each round; warm-up {args.warmup}s per variant; {os.cpu_count()} CPUs")
        for v in VARIANTS:
            b.run(v, args.warmup)
        tps = {v: [] for v in VARIANTS}
        cpu = {v: [] for v in VARIANTS}
        nowake = []
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            runs = [(v, False) for v in order]
            if args.diagnose_wakeup:
                runs.append(("watched", True))
            cells = []
            for v, stop in runs:
                b.between_runs()
                t, n, lat, us = b.run(v, args.seconds, stop_workers=stop)
                if stop:
                    nowake.append((t, us))
                else:
                    tps[v].append(t)
                    cpu[v].append(us)
                label = "watched, workers stopped" if stop else v
                cells.append(f"  {label:<25} {t:8.1f} tps  {n:7d} tx  latency {lat:.3f} ms  "
                             f"cpu/tx: {fmt_cpu(us)}")
            print(f"round {r + 1}:\n" + "\n".join(cells), flush=True)
        med = {v: statistics.median(tps[v]) for v in VARIANTS}
        print("median tps: " + ", ".join(f"{v} {med[v]:.1f}" for v in VARIANTS))
        cpu_med = {v: median_cpu(cpu[v]) for v in VARIANTS}
        if nowake:
            m = statistics.median(t for t, _ in nowake)
            c = total_cpu(median_cpu([us for _, us in nowake]))
            print(f"diagnostic, watched with the workers stopped (no wake-up at commit): median {m:.1f} tps; "
                  f"/plain = {m / med['plain']:.3f}, /plpgsql = {m / med['plpgsql']:.3f}; the wake-ups "
                  f"cost the watched run {100 * (1 - med['watched'] / m):.1f}% of its tps")
            if c and total_cpu(cpu_med["plain"]) and total_cpu(cpu_med["plpgsql"]):
                print(f"diagnostic, cpu per transaction with the workers stopped: {c:.1f} us; cpu-bound estimate "
                      f"watched/plain = {total_cpu(cpu_med['plain']) / c:.2f}, "
                      f"watched/plpgsql = {total_cpu(cpu_med['plpgsql']) / c:.2f}")
        print("median cpu per transaction (us): " + "; ".join(f"{v} {fmt_cpu(cpu_med[v])}" for v in VARIANTS))
        tot = {v: total_cpu(cpu_med[v]) for v in VARIANTS}
        if all(tot.values()):
            print(f"cpu-bound estimate (1/cpu per transaction, all processes): watched/plain = "
                  f"{tot['plain'] / tot['watched']:.2f}, watched/plpgsql = {tot['plpgsql'] / tot['watched']:.2f}; "
                  f"backends only: watched/plain = {cpu_med['plain']['backends'] / cpu_med['watched']['backends']:.2f}, "
                  f"watched/plpgsql = {cpu_med['plpgsql']['backends'] / cpu_med['watched']['backends']:.2f}")
        per_round = [(tps["watched"][i] / tps["plain"][i], tps["watched"][i] / tps["plpgsql"][i])
                     for i in range(args.rounds)]
        print("per-round ratios watched/plain, watched/plpgsql: "
              + "; ".join(f"{a:.3f}, {c:.3f}" for a, c in per_round))
        us = {v: 1e6 / med[v] for v in VARIANTS}
        print(f"time per transaction and client (2/tps): plain {2 * us['plain']:.1f} us, watched "
              f"{2 * us['watched']:.1f} us, plpgsql {2 * us['plpgsql']:.1f} us; capture "
              f"adds {2 * (us['watched'] - us['plain']):.1f} us (C) vs {2 * (us['plpgsql'] - us['plain']):.1f} us "
              f"(PL/pgSQL)")
        if args.perf:
            b.between_runs()
            b.run_under_perf("watched", args.seconds, args.perf)
            b.between_runs()
            b.run_under_perf("plpgsql", args.seconds, args.perf)
            b.between_runs()
            b.run_under_perf("plain", args.seconds, args.perf)
        b.verify()
        r1 = med["watched"] / med["plain"]
        r2 = med["watched"] / med["plpgsql"]
        ok = "met" if r1 >= TARGET_UNWATCHED and r2 >= TARGET_PLPGSQL else "NOT met"
        print(f"targets {ok}")
        print(f"capture{' (ERP order: header + 5 lines + 5 stock updates)' if args.erp_order else ''}: "
              f"watched/unwatched = {r1:.2f} (target >= {TARGET_UNWATCHED}), "
              f"watched/plpgsql = {r2:.2f} (target >= {TARGET_PLPGSQL})")
    finally:
        b.cluster.destroy()


if __name__ == "__main__":
    main()

"""When the relay is down, the channel fails, not every message.

1. Two relays down for 60 s with notify.max_attempts = 3 and
   notify.retry_backoff = 1s: nothing becomes dead, the workers probe each
   channel instead of trying every message (fewer probe attempts than one
   per two queued messages), the server log says once per channel that it
   fails and once that it works again; after the restart, the channel
   resumed with notify.resume() delivers everything within 10 s, the other
   within its probe backoff.
2. A real Postfix between notify_ext and the final server, stopped and
   started mid-run: every committed message arrives; duplicates only where
   Postfix itself redelivers.
3. tls 'verify' against a server without STARTTLS: nothing is sent in clear
   text, the channel shows the reason, the log names the channel once, and
   no attempt row claims a 250.
4. A webhook gateway answering 503 is the channel's failure; a 404 about
   one message is that message's.

Counts and times are printed (pytest -s).
"""
import os
import re
import sys
import time
from collections import Counter

# the bare SMTP server and the HTTP gateway of the end-to-end tests
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "e2e"))

from harness import Cluster, wait_until
from mailstack import FinalSmtp, Postfix, require_binaries
from test_faults import FaultSmtp, numbers, tally

OUTAGE_S = 60


def make_cluster(settings=None):
    conf = {"notify.poll_interval": "'1s'", "notify.workers": "4", "notify.max_attempts": "3",
            "notify.retry_backoff": "'1s'"}
    conf.update(settings or {})
    c = Cluster(dbname="relay", settings=conf)
    with c.connect() as db:
        db.execute("CREATE EXTENSION notify_ext")
        db.execute("SELECT notify.set_template('bulk', 'm {{row.n}}', 'n = {{row.n}}')")
    return c


def channel_rule(db, name, port, to, tls="off"):
    db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => %s, name => %s)",
               (f"smtp://127.0.0.1:{port}", tls, name))
    db.execute("SELECT notify.create_rule(%s, %s, 'bulk', ARRAY[%s], channel => %s)",
               (f"r_{name}", f"ev.{name}", f"email:{to}", name))


def emit(db, name, first, last):
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g)) FROM generate_series(%s::int, %s::int) g",
               (f"ev.{name}", first, last))


def health(db, name):
    return db.execute("SELECT state, failing_since, last_error, next_probe_at FROM notify.channels "
                      "WHERE name = %s", (name,)).fetchone()


def log_count(cluster, pattern):
    return len(re.findall(pattern, cluster.log()))


def test_relays_down_60s_nothing_dead_probes_then_resume():
    a, b = FaultSmtp(), FaultSmtp()
    cluster = make_cluster()
    servers = [a, b]
    try:
        db = cluster.connect()
        channel_rule(db, "ch_a", a.port, "a@example.com")
        channel_rule(db, "ch_b", b.port, "b@example.com")
        emit(db, "ch_a", 1, 200)
        emit(db, "ch_b", 1, 200)
        wait_until(lambda: a.count() >= 200 and b.count() >= 200, timeout=60, what="the first 200 each")

        # both relays go down; the ERP goes on committing events meanwhile
        a.crash()
        b.crash()
        t_down = time.monotonic()
        wall_down = db.execute("SELECT now()").fetchone()[0]
        for first in range(201, 801, 100):
            emit(db, "ch_a", first, first + 99)
            emit(db, "ch_b", first, first + 99)
            time.sleep(2)
        queued = 2 * 600
        while time.monotonic() - t_down < OUTAGE_S:
            time.sleep(1)
        st = dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())
        probes = dict(db.execute("SELECT m.channel, count(*) FROM notify.attempt t JOIN notify.message m "
                                 "ON m.id = t.message_id WHERE t.started_at >= %s AND t.outcome <> 'sent' "
                                 "GROUP BY 1", (wall_down,)).fetchall())
        ha, hb = health(db, "ch_a"), health(db, "ch_b")
        log_rows = db.execute("SELECT status, next_attempt_at, last_error FROM notify.delivery_log "
                              "WHERE channel = 'ch_b' AND status = 'queued' LIMIT 1").fetchone()
        print(f"\n[relays down] after {OUTAGE_S} s: messages {st}; attempts that reached no relay per channel "
              f"{probes} for {queued} queued; ch_a {ha[0]} since {ha[1]}: {ha[2]!r}, next probe {ha[3]}")
        print(f"[relays down] a queued message's log row: {log_rows}")
        assert "waiting for channel ch_b, which is failing" in log_rows[2]
        assert st.get("dead", 0) == 0 and st.get("failed", 0) == 0, st
        assert ha[0] == "failing" and hb[0] == "failing"
        assert "Connection refused" in ha[2] or "connect" in ha[2].lower()
        assert sum(probes.values()) < queued / 2, "each message tried the dead relay on its own"
        assert log_rows[1] is not None, "delivery_log does not say when the next attempt is due"
        # once per channel, however many messages wait
        for ch in ("ch_a", "ch_b"):
            assert log_count(cluster, rf'channel "{ch}" is failing') == 1, cluster.log()[-3000:]
        attempts = db.execute("SELECT max(attempts) FROM notify.message").fetchone()[0]
        assert attempts <= 1, f"attempts were spent on the channel's failure ({attempts})"

        # both come back; ch_a is resumed by the operator, ch_b waits for its probe
        a2 = FaultSmtp(port=a.port, share=a)
        b2 = FaultSmtp(port=b.port, share=b)
        servers += [a2, b2]
        t_up = time.monotonic()
        next_probe_b = db.execute("SELECT extract(epoch FROM next_probe_at - now()) FROM notify.channels "
                                  "WHERE name = 'ch_b'").fetchone()[0]
        due = db.execute("SELECT notify.resume('ch_a')").fetchone()[0]
        wait_until(lambda: set(range(1, 801)) <= set(numbers(a2.snapshot(), "m")), timeout=10,
                   what="every ch_a message within 10 s of resume()")
        t_a = time.monotonic() - t_up
        wait_until(lambda: set(range(1, 801)) <= set(numbers(b2.snapshot(), "m")),
                   timeout=max(float(next_probe_b), 0) + 15, what="every ch_b message after its probe")
        t_b = time.monotonic() - t_up
        wait_until(lambda: db.execute("SELECT count(*) FROM notify.message WHERE status <> 'sent'")
                   .fetchone()[0] == 0, timeout=30, what="all recorded sent")
        dist_a, dup_a, _, _ = tally(a2.snapshot(), "m")
        dist_b, dup_b, _, _ = tally(b2.snapshot(), "m")
        recovered = [log_count(cluster, rf'channel "{ch}" (works again|resumed by)') for ch in ("ch_a", "ch_b")]
        print(f"[relays down] resume('ch_a') made {due} due; all ch_a delivered {t_a:.1f} s after the restart; "
              f"ch_b (next probe was {float(next_probe_b):.1f} s away) {t_b:.1f} s after; duplicates by Message-ID "
              f"{dup_a} / {dup_b}; 'works again' lines {recovered}")
        assert len(dist_a) == 800 and len(dist_b) == 800
        assert due >= 600
        assert recovered == [1, 1]
        assert health(db, "ch_a")[0] == "ok" and health(db, "ch_b")[0] == "ok"
    finally:
        cluster.destroy()
        for s in servers:
            s.stop()


def test_real_postfix_stopped_and_started_mid_run():
    require_binaries()
    final = FinalSmtp()
    postfix = Postfix(final.port)
    cluster = make_cluster()
    try:
        db = cluster.connect()
        channel_rule(db, "relay", postfix.port, "ok@dest.test")
        n = 400
        emit(db, "relay", 1, n)
        wait_until(lambda: len(final.to("ok@dest.test")) >= 100, timeout=60, what="100 through Postfix")
        postfix.stop()
        t_stop = time.monotonic()
        got_at_stop = len(final.to("ok@dest.test"))
        time.sleep(10)
        failing = health(db, "relay")
        postfix.start()
        t_start = time.monotonic()

        def all_there():
            return set(range(1, n + 1)) <= set(numbers(final.to("ok@dest.test"), "m"))
        try:
            wait_until(all_there, timeout=90, interval=0.25, what=f"all {n} at the final server")
        except AssertionError:
            print(f"[postfix] messages {db.execute('SELECT status, count(*) FROM notify.message GROUP BY 1').fetchall()}; "
                  f"channel {health(db, 'relay')}; workers "
                  f"{db.execute('SELECT * FROM notify.worker_status()').fetchall()}; "
                  f"not sent {db.execute(chr(10).join(['SELECT id, status, attempts, next_attempt_at, lease_until, last_error', 'FROM notify.message WHERE status <> ' + chr(39) + 'sent' + chr(39) + ' LIMIT 5'])).fetchall()}")
            raise
        mails = final.to("ok@dest.test")
        distinct, dup_mid, dup_n, split = tally(mails, "m")
        st = dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())
        print(f"\n[postfix] stopped after {got_at_stop} of {n} reached the final server, for "
              f"{t_start - t_stop:.0f} s; channel meanwhile: {failing[0]} ({failing[2]!r}); all {n} there "
              f"{time.monotonic() - t_start:.1f} s after the start; {len(mails)} mails, duplicates by "
              f"Message-ID {dup_mid}; messages {st}")
        # which side sent each duplicate: notify_ext (a message it tried more than once, one
        # transfer in flight per worker when Postfix stopped) or Postfix itself (delivered to
        # the final server, stopped before it noted it, delivered again after the start: at most
        # its destination concurrency, 20 by default)
        tries = dict(db.execute(
            "SELECT (e.row->>'n')::int, count(*) FILTER (WHERE a.outcome <> 'channel') "
            "FROM notify.message m JOIN notify.event e ON e.id = m.event_id "
            "LEFT JOIN notify.attempt a ON a.message_id = m.id GROUP BY 1").fetchall())
        counts = Counter(numbers(mails, "m"))
        dup_numbers = [k for k, c in counts.items() if c > 1]
        ours = [k for k in dup_numbers if tries.get(k, 0) > 1]
        print(f"[postfix] duplicated messages {sorted(dup_numbers)}: tried more than once by notify_ext "
              f"{sorted(ours)}, the rest delivered twice by Postfix")
        assert failing[0] == "failing"
        assert len(distinct) == n and not split
        assert len(ours) <= 4, f"{len(ours)} messages sent twice by notify_ext (4 workers)"
        assert dup_mid <= 4 + 20, f"{dup_mid} duplicates"
    finally:
        cluster.destroy()
        postfix.destroy()
        final.stop()


def test_tls_verify_without_starttls_sends_nothing_in_clear():
    from test_transport import RawSmtp
    raw = RawSmtp(offer_starttls=False)
    cluster = make_cluster()
    try:
        db = cluster.connect()
        channel_rule(db, "strict", raw.port, "x@example.com", tls="verify")
        emit(db, "strict", 1, 20)
        wait_until(lambda: health(db, "strict")[0] == "failing", timeout=20, what="the channel failing")
        time.sleep(4)                         # a few probes
        h = health(db, "strict")
        rows = db.execute("SELECT outcome, smtp_code, response FROM notify.attempt").fetchall()
        commands = Counter(line.split(" ")[0].upper() for line in raw.lines)
        print(f"\n[tls verify] channel {h[0]}: {h[2]!r}; attempts {Counter(r[0] for r in rows)}; "
              f"the server heard {dict(commands)}")
        assert set(commands) <= {"EHLO", "QUIT"}, f"sent in clear: {raw.lines}"
        assert "STARTTLS" in h[2] and "verify" in h[2]
        assert rows and all(r[0] == "channel" and r[1] is None for r in rows), rows
        assert not any("250" in (r[2] or "") for r in rows)
        assert log_count(cluster, r'channel "strict" is failing') == 1
        assert db.execute("SELECT count(*) FROM notify.message WHERE status = 'queued'").fetchone()[0] == 20
    finally:
        cluster.destroy()
        raw.stop()


def test_webhook_gateway_5xx_is_the_channel_and_4xx_the_message():
    from test_webhook import Gateway
    gw = Gateway()
    cluster = make_cluster()
    try:
        db = cluster.connect()
        db.execute("SELECT notify.set_recipient('user:1', 'u@example.com', phone => '+1')")
        db.execute("SELECT notify.set_webhook('gw', %s, '{\"n\": {{row.n}}}')", (gw.url("/sms"),))
        db.execute("SELECT notify.create_rule('gw', 'ev.gw', 'bulk', ARRAY['recipient:user:1'], channel => 'gw')")
        gw.reply("/sms", *([(503, b"down for maintenance")] * 1000))
        emit(db, "gw", 1, 30)
        wait_until(lambda: health(db, "gw")[0] == "failing", timeout=20, what="the gateway's channel failing")
        time.sleep(3)
        tries = len(gw.to("/sms"))
        st = dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())
        gw.reply("/sms")                                     # 200 from now on
        db.execute("SELECT notify.resume('gw')")
        wait_until(lambda: db.execute("SELECT count(*) FROM notify.message WHERE status = 'sent'")
                   .fetchone()[0] == 30, timeout=20, what="all 30 sent after resume()")
        # a 4xx about one message fails that message only
        gw.reply("/sms", (404, b"no such number"))
        emit(db, "gw", 31, 32)
        wait_until(lambda: dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1")
                                .fetchall()).get("sent") == 31, timeout=20, what="31 sent")
        final = dict(db.execute("SELECT status, count(*) FROM notify.message GROUP BY 1").fetchall())
        print(f"\n[webhook] 503: {tries} requests for 30 messages while failing, messages {st}; after "
              f"resume and one 404: {final}, channel {health(db, 'gw')[0]}")
        assert tries < 15 and st == {"queued": 30}
        assert final == {"sent": 31, "failed": 1} and health(db, "gw")[0] == "ok"
    finally:
        cluster.destroy()
        gw.stop()

"""Outcome classes and the operator's tools: 5xx fails at once, 4xx is
retried with backoff; retry, cancel, purge and worker_status."""
import time

import psycopg
import pytest

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from harness import free_port, wait_until


class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


def rule(db, uniq):
    etype = f"ops.{uniq}"
    db.execute("SELECT notify.set_template(%s, 'ops {{row.n}}', 'body {{row.n}}')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, %s)",
               (f"rule_{uniq}", etype, f"tpl_{uniq}", ["field:row.to"]))
    return etype


def message(db, etype, address):
    return db.execute("SELECT message_id, status, attempts, last_error, smtp_response "
                      "FROM notify.delivery_log WHERE event_type = %s AND address = %s",
                      (etype, address)).fetchone()


def test_550_fails_at_once_and_451_is_retried(db, smtp, uniq):
    etype = rule(db, uniq)
    gone, busy = f"gone_{uniq}@example.com", f"busy_{uniq}@example.com"
    smtp.rcpt_replies[gone] = "550 5.1.1 No such user here"
    smtp.rcpt_replies[busy] = "451 4.3.0 Mailbox busy, try later"
    db.execute("SELECT notify.emit(%s, %s)", (etype, f'{{"n": 1, "to": "{gone}"}}'))
    db.execute("SELECT notify.emit(%s, %s)", (etype, f'{{"n": 2, "to": "{busy}"}}'))

    failed = wait_until(lambda: (m := message(db, etype, gone)) and m[1] == "failed" and m,
                        what="550 recorded as failed")
    assert failed[2] == 1, "a permanent refusal is not retried"
    assert "550" in failed[3] and "No such user" in failed[3]
    first_retry = wait_until(lambda: db.execute(
        "SELECT a.outcome, a.smtp_code, a.response FROM notify.attempt a JOIN notify.message m "
        "ON m.id = a.message_id WHERE m.event_type = %s AND m.address = %s", (etype, busy)).fetchone(),
        what="451 attempt")
    assert first_retry[0] == "retry" and first_retry[1] == 451
    del smtp.rcpt_replies[busy]                     # the mailbox frees up
    smtp.wait_for(busy, timeout=20)                 # retry_backoff is 1 s in this cluster
    sent = wait_until(lambda: (m := message(db, etype, busy)) and m[1] == "sent" and m, what="sent")
    assert sent[2] >= 2
    del smtp.rcpt_replies[gone]
    assert smtp.to(gone) == []


def test_retry_requeues_a_failed_message(db, smtp, uniq):
    etype = rule(db, uniq)
    to = f"later_{uniq}@example.com"
    smtp.rcpt_replies[to] = "550 5.7.1 Rejected"
    db.execute("SELECT notify.emit(%s, %s)", (etype, f'{{"n": 1, "to": "{to}"}}'))
    mid = wait_until(lambda: (m := message(db, etype, to)) and m[1] == "failed" and m[0], what="failed")
    del smtp.rcpt_replies[to]
    db.execute("SELECT notify.retry(%s)", (mid,))
    smtp.wait_for(to, timeout=10)
    status, attempts = wait_until(lambda: (m := message(db, etype, to)) and m[1] == "sent" and m[1:3],
                                  what="sent after retry")
    assert attempts == 2, "attempts keep counting across a manual retry"
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as exc:
        db.execute("SELECT notify.retry(%s)", (mid,))
    assert "only queued, failed, dead or bounced messages can be retried" in str(exc.value)


def test_cancel_a_message_waiting_for_its_retry(db, smtp, uniq):
    etype = rule(db, uniq)
    to = f"cancel_{uniq}@example.com"
    smtp.rcpt_replies[to] = "452 4.2.2 Over quota"
    db.execute("SELECT notify.emit(%s, %s)", (etype, f'{{"n": 1, "to": "{to}"}}'))
    mid = wait_until(lambda: (m := message(db, etype, to)) and m[1] == "queued" and m[2] >= 1 and m[0],
                     what="queued for retry")
    db.execute("SELECT notify.cancel(%s)", (mid,))
    assert message(db, etype, to)[1] == "cancelled"
    del smtp.rcpt_replies[to]
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as exc:
        db.execute("SELECT notify.cancel(%s)", (mid,))
    assert "cancelled" in str(exc.value)
    with pytest.raises(psycopg.errors.UndefinedObject):
        db.execute("SELECT notify.retry(-1)")
    time.sleep(2.5)                                 # past the backoff: still nothing sent
    assert smtp.to(to) == []


def test_purge_removes_finished_rows_only(db, smtp, uniq):
    etype = rule(db, uniq)
    to = f"purge_{uniq}@example.com"
    db.execute("SELECT notify.emit(%s, %s)", (etype, f'{{"n": 1, "to": "{to}"}}'))
    smtp.wait_for(to)
    wait_until(lambda: (m := message(db, etype, to)) and m[1] == "sent", what="sent")
    assert db.execute("SELECT notify.purge('1 hour')").fetchone()[0] >= 0
    assert message(db, etype, to) is not None, "younger than the interval: kept"
    assert db.execute("SELECT notify.purge('0 seconds')").fetchone()[0] >= 2
    assert message(db, etype, to) is None
    assert db.execute("SELECT count(*) FROM notify.event WHERE event_type = %s", (etype,)).fetchone()[0] == 0
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        db.execute("SELECT notify.purge('-1 day')")


def test_worker_status(db, smtp, uniq):
    """Each worker running in this database has a row of its own figures: its
    pid, its state, what it sent in the last minute, the message it is on
    (issue 13: no queue totals repeated on every row). The queue's totals
    are queue_status()'s, in one row."""
    etype = rule(db, uniq)
    to = f"status_{uniq}@example.com"
    smtp.data_delay = lambda mail: 0.2 if to in mail.rcpt_tos else 0
    try:
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g, 'to', %s::text)) FROM generate_series(1, 24) g",
                   (etype, to))
        # while they send: each busy worker says which message it is on
        busy = wait_until(lambda: [r for r in db.execute(
            "SELECT pid, state, message_id, channel FROM notify.worker_status()").fetchall()
            if r[2] is not None], timeout=10, what="a worker showing its message")
        print("busy:", busy)
        assert all(r[3] == "email" and r[1] == "sending" for r in busy)
        smtp.wait_for(to, count=24, timeout=30)
    finally:
        smtp.data_delay = None
    wait_until(lambda: db.execute("SELECT count(*) FROM notify.message WHERE address = %s AND status = 'sent'",
                                  (to,)).fetchone()[0] == 24, what="all recorded as sent")
    cur = db.execute("SELECT * FROM notify.worker_status() ORDER BY worker")
    cols = [d.name for d in cur.description]
    rows = cur.fetchall()
    print(cols)
    for r in rows:
        print("  ", r)
    assert cols[:4] == ["pid", "state", "sent_last_minute", "last_error"]
    assert "queued" not in cols and "sending" not in cols
    pids = {r[0] for r in db.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'notify_ext worker' "
                                     "AND datname = current_database()")}
    assert {r[0] for r in rows} == pids and 1 <= len(pids) <= 4
    per_worker = [r[2] for r in rows]
    assert len({r[4] for r in rows}) == len(rows), "each worker has its own number"
    assert all(r[5] == "erp" for r in rows)
    cur = db.execute("SELECT * FROM notify.queue_status()")
    q = dict(zip([d.name for d in cur.description], cur.fetchone()))
    print(q)
    # the database's count holds what workers that already left sent too
    assert q["sent_last_minute"] >= 24 and q["sent_last_minute"] >= sum(per_worker)
    assert q["workers"] == len(rows) and q["state"].startswith("served by")
    assert q["sending"] == 0 and q["copy_reason"] is None


def test_test_smtp_reports_steps_and_never_the_password(db, smtp, uniq):
    report = db.execute("SELECT notify.test_smtp()").fetchone()[0]
    print(report)
    assert "EHLO" in report and report.rstrip().endswith("OK: connected and greeted")

    to = f"probe_{uniq}@example.com"
    report = db.execute("SELECT notify.test_smtp('email', %s)", (to,)).fetchone()[0]
    assert f"OK: test message accepted for {to}" in report
    [mail] = smtp.wait_for(to)
    assert mail.subject == "notify_ext test message"

    # a server that requires AUTH (PLAIN/LOGIN over the loopback, no TLS for the test)
    secret = f"S3cret-{uniq}"
    accepted = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        ok = auth_data.login == b"erp" and auth_data.password == secret.encode()
        accepted.append(ok)
        return AuthResult(success=ok)

    auth_port = free_port()
    ctl = Controller(Sink(), hostname="127.0.0.1", port=auth_port, authenticator=authenticator,
                     auth_required=True, auth_require_tls=False)
    ctl.start()
    try:
        for password, expect in ((secret, "OK: connected"), (secret + "-wrong", "FAILED")):
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', 'erp', %s, tls => 'off', name => %s)",
                       (f"smtp://127.0.0.1:{auth_port}", password, f"auth_{uniq}"))
            report = db.execute("SELECT notify.test_smtp(%s)", (f"auth_{uniq}",)).fetchone()[0]
            print(report)
            assert expect in report
            assert "password set" in report and "(credentials hidden)" in report
            assert password not in report and secret not in report
    finally:
        ctl.stop()
    assert True in accepted and False in accepted    # the server really checked both

    db.execute("SELECT notify.set_smtp('smtp://127.0.0.1:9', 'erp@example.com', tls => 'off', name => %s)",
               (f"closed_{uniq}",))
    t0 = time.monotonic()
    report = db.execute("SELECT notify.test_smtp(%s)", (f"closed_{uniq}",)).fetchone()[0]
    assert "FAILED" in report and time.monotonic() - t0 < 15


def test_a_dead_senders_messages_go_back_to_the_queue_when_its_lease_runs_out(db, smtp, uniq):
    """A message left 'sending' by a sender that is gone goes back to the
    queue once its lease ran out, and is sent as its second attempt; one
    whose lease still runs stays its holder's.  The holders here carry worker
    numbers no worker has had yet (workers are numbered in order from
    notify.worker_seq): a worker starting now takes them for workers started
    after it, which it leaves alone; only the lease decides."""
    expired = f"expired_{uniq}@example.com"
    held = f"held_{uniq}@example.com"
    db.execute("""INSERT INTO notify.message (event_type, address, channel, status, attempts, subject,
                                              text_body, lease_until, claimed_by)
                  VALUES (%s, %s, 'email', 'sending', 1, 'left behind', 'body',
                          now() - interval '1 second', 2000000001),
                         (%s, %s, 'email', 'sending', 1, 'still held', 'body',
                          now() + interval '1 hour', 2000000000)""",
               (f"lease.{uniq}", expired, f"lease.{uniq}", held))
    db.execute("SELECT notify._wake_worker()")
    [mail] = smtp.wait_for(expired, timeout=15)
    assert mail.subject == "left behind"
    row = wait_until(lambda: db.execute("SELECT status, attempts FROM notify.message WHERE address = %s "
                                        "AND status = 'sent'", (expired,)).fetchone(),
                     what="the expired one recorded as sent")
    assert row == ("sent", 2)
    time.sleep(1.5)
    assert smtp.to(held) == []
    assert db.execute("SELECT status, claimed_by FROM notify.message WHERE address = %s",
                      (held,)).fetchone() == ("sending", 2000000000)
    db.execute("UPDATE notify.message SET status = 'cancelled', lease_until = NULL WHERE address = %s", (held,))


def test_test_smtp_says_quit_and_each_test_mail_has_its_own_message_id(db, smtp, uniq):
    """A receiver that drops duplicate Message-IDs must not drop the next
    test; a relay must not log a lost connection after test_smtp."""
    from test_transport import RawSmtp
    to = f"twice_{uniq}@example.com"
    for _ in range(2):
        report = db.execute("SELECT notify.test_smtp('email', %s)", (to,)).fetchone()[0]
        assert f"OK: test message accepted for {to}" in report
    mails = smtp.wait_for(to, count=2)
    ids = [m.message["Message-ID"] for m in mails]
    print(f"test mails' Message-IDs: {ids}")
    assert len(set(ids)) == 2 and all(i.endswith("@example.com>") for i in ids)

    raw = RawSmtp(offer_starttls=False)
    try:
        db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off', name => %s)",
                   (f"smtp://127.0.0.1:{raw.port}", f"raw_{uniq}"))
        report = db.execute("SELECT notify.test_smtp(%s)", (f"raw_{uniq}",)).fetchone()[0]
        print(report)
        wait_until(lambda: "QUIT" in raw.lines, timeout=5, what="QUIT at the server")
    finally:
        raw.stop()
    assert "> QUIT" in report and "< 221 bye" in report
    assert report.rstrip().endswith("OK: connected and greeted")

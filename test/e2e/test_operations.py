"""Outcome classes and the operator's tools: 5xx fails at once, 4xx is
retried with backoff; retry, cancel, purge and worker_status."""
import time

import psycopg
import pytest

from harness import wait_until


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
    assert "only failed or dead messages can be retried" in str(exc.value)


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


def test_worker_status(db):
    pid, state, queued, sending, sent_last_minute, last_error = \
        db.execute("SELECT * FROM notify.worker_status()").fetchone()
    assert pid == db.execute("SELECT pid FROM pg_stat_activity "
                             "WHERE backend_type = 'notify_ext worker'").fetchone()[0]
    assert state in ("idle", "sending", "fanning out")
    assert queued >= 0 and sending >= 0 and sent_last_minute >= 0

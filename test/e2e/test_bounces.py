"""Bounces and suppression (issue 16) through the real mail path, nothing
mocked: notify_ext -> a real Postfix (test/lib/mailstack.py) -> a final SMTP
server that refuses nobody*@ (550 5.1.1) and later*@ (450) after Postfix
accepted the mail -> Postfix's own DSN, to the VERP envelope sender
bounces+m<id>.<tag>@bounce.test, delivered over LMTP into a real Dovecot
(plus-addressing) -> notify_ext reads it over IMAPS (tls 'verify', the
throwaway CA as notify.tls_ca_file): the message becomes 'bounced', the
address suppressed, a rule on notify.bounced tells the salesperson.

One cluster and one mail stack for the module; the workers' own reads are
kept out of the way (notify.bounce_poll_interval = 1 day) except in the
tests about them, which set it to 1 s and back. Every wait is bounded.
"""
import imaplib
import os
import re
import socket
import statistics
import threading
import time

import psycopg
import pytest

from harness import Cluster, set_guc, wait_until
from mailstack import Dovecot, MailStack, Postfix

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLES = os.path.join(HERE, "..", "unit", "dsn-samples")
BOUNCE = "bounces@bounce.test"
PASSWORD = "secret"          # the mail stack's Dovecot user
DAY = 86400


@pytest.fixture(scope="module")
def ms():
    with MailStack(imaps=True) as stack:
        yield stack


@pytest.fixture(scope="module")
def bc(ms):
    c = Cluster(dbname="erpb", settings={
        "notify.poll_interval": "'30s'", "notify.retry_backoff": "'1s'", "notify.workers": "2",
        "notify.bounce_poll_interval": f"'{DAY}s'", "track_commit_timestamp": "on",
        "notify.tls_ca_file": f"'{ms.dovecot.ca.ca_cert}'"})
    try:
        with c.connect() as db:
            db.execute("CREATE EXTENSION notify_ext")
            db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', bounce_address => %s)",
                       (f"smtp://127.0.0.1:{ms.postfix.port}", BOUNCE))
            db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s)",
                       (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", PASSWORD))
            # set_bounce_mailbox makes it due: the workers read it once, then not for a day
            wait_until(lambda: db.execute("SELECT last_checked_at IS NOT NULL AND state = 'ok' "
                                          "FROM notify.bounce_mailboxes").fetchone()[0],
                       timeout=20, what="the workers' first read of the mailbox")
        yield c
    except BaseException:
        print(c.log()[-4000:])
        raise
    finally:
        if os.environ.get("NOTIFY_KEEP_LOG"):
            print(c.log())
        c.destroy()


@pytest.fixture
def db(bc):
    conn = bc.connect()
    yield conn
    conn.close()


@pytest.fixture(scope="module")
def tag(bc, ms):
    """This database's VERP tag, as the relay saw it in a first message's envelope."""
    with bc.connect() as db:
        setup_rule(db, "tagprobe")
        mid = emit(db, "tagprobe", "tagprobe@dest.test")
    [mail] = ms.final.wait_for("tagprobe@dest.test", timeout=30)
    m = re.fullmatch(r"bounces\+m(\d+)\.([0-9a-f]{12})@bounce\.test", mail.mail_from)
    assert m and int(m.group(1)) == mid, mail.mail_from
    return m.group(2)


# -- helpers ----------------------------------------------------------------------

def setup_rule(db, name, channel="email"):
    db.execute("SELECT notify.set_template(%s, %s, 'Hello, this is about {{row.n}}.')",
               (name, "Invoice {{row.n}} " + name))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'], channel => %s)",
               (name, name, name, channel))


def emit(db, name, to, n=1):
    """One event of type `name` for `to`; returns its message's id once fanned out."""
    ev = db.execute("SELECT notify.emit(%s, jsonb_build_object('n', %s::int, 'to', %s::text))",
                    (name, n, to)).fetchone()[0]
    return wait_until(lambda: (db.execute("SELECT id FROM notify.message WHERE event_id = %s", (ev,))
                               .fetchone() or [None])[0], timeout=20, what=f"the message of event {ev}")


def status(db, mid):
    return db.execute("SELECT status, last_error FROM notify.message WHERE id = %s", (mid,)).fetchone()


def dsn_for(ms, mid, tag, timeout=30, count=1):
    """The DSN(s) Postfix delivered to Dovecot for message mid (found by their VERP To)."""
    return ms.dovecot.wait_for_messages(count, timeout=timeout, criteria=f'TO "+m{mid}.{tag}@"')


def flags_of(ms, mid, tag):
    return [m.flags for m in ms.dovecot.messages(criteria=f'TO "+m{mid}.{tag}@"')]


def append(ms, raw, flags=""):
    """Puts a mail into the bounce mailbox as an IMAP client would (junk, a crafted report)."""
    client = ms.dovecot.imap()
    try:
        typ, data = client.append("INBOX", flags, imaplib.Time2Internaldate(time.time()), raw)
        assert typ == "OK", data
    finally:
        client.logout()


def sample(name, **subst):
    with open(os.path.join(SAMPLES, name), "rb") as f:
        raw = f.read()
    for old, new in subst.items():
        raw = raw.replace(old.encode(), new.encode())
    return raw


def log_count(bc, pattern):
    return len(re.findall(pattern, bc.log()))


def make_due(db):
    db.execute("UPDATE notify.bounce_mailbox SET next_check_at = now()")


def quiet_workers(bc, db):
    """notify.bounce_poll_interval back to a day, and the workers' next read a day away."""
    set_guc(bc, db, "notify.bounce_poll_interval", f"{DAY}s")
    db.execute("UPDATE notify.bounce_mailbox SET next_check_at = now() + interval '1 day'")


# -- the envelope -----------------------------------------------------------------

def test_envelope_sender_names_the_message(db, ms, bc, tag, uniq):
    """MAIL FROM is bounce_address (or from_address) +m<id>.<tag>; From: stays from_address;
    test_smtp's mails carry +test.<tag>."""
    setup_rule(db, uniq)
    mid = emit(db, uniq, f"ok-{uniq}@dest.test")
    [mail] = ms.final.wait_for(f"ok-{uniq}@dest.test", timeout=30)
    assert mail.mail_from == f"bounces+m{mid}.{tag}@bounce.test"
    assert mail.message["From"] == "erp@erp.test"
    assert mail.message["Message-ID"] == f"<notify.message.{tag}.{mid}@erp.test>"
    # without a bounce_address, the from_address carries the token
    db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', name => %s)",
               (f"smtp://127.0.0.1:{ms.postfix.port}", f"ch{uniq}"))
    setup_rule(db, f"{uniq}b", channel=f"ch{uniq}")
    mid2 = emit(db, f"{uniq}b", f"ok2-{uniq}@dest.test")
    [mail2] = ms.final.wait_for(f"ok2-{uniq}@dest.test", timeout=30)
    assert mail2.mail_from == f"erp+m{mid2}.{tag}@erp.test"
    report = db.execute("SELECT notify.test_smtp('email', %s)", (f"test-{uniq}@dest.test",)).fetchone()[0]
    assert "OK: test message accepted" in report, report
    [test_mail] = ms.final.wait_for(f"test-{uniq}@dest.test", timeout=30)
    assert test_mail.mail_from == f"bounces+test.{tag}@bounce.test"
    # the channels view shows it
    assert db.execute("SELECT bounce_address FROM notify.channels WHERE name = 'email'").fetchone()[0] == BOUNCE
    # an address that cannot carry a token is refused as bounce_address
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="without '\\+'"):
        db.execute("SELECT notify.set_smtp('smtp://127.0.0.1:25', 'erp@erp.test', name => 'x', "
                   "bounce_address => 'b+x@bounce.test')")
    print(f"envelope: {mail.mail_from} (From: {mail.message['From']}), {mail2.mail_from}, "
          f"test_smtp: {test_mail.mail_from}")


# -- the whole loop ---------------------------------------------------------------

def erp_setup(db, u, seller):
    """An ERP table watched with the seller as actor, a rule to the customer, and a rule on
    notify.bounced that tells the salesperson."""
    db.execute(f"CREATE TABLE orders_{u} (id serial PRIMARY KEY, customer_email text NOT NULL, "
               "seller_id int NOT NULL, total numeric NOT NULL)")
    db.execute(f"SELECT notify.watch('orders_{u}', 'order.{u}', actor_column => 'seller_id', "
               "actor_prefix => 'seller')")
    db.execute("SELECT notify.set_recipient(%s, %s, 'Sara Seller')",
               (f"seller:{seller}", f"sara-{u}@sales.test"))
    db.execute("SELECT notify.set_template(%s, 'Invoice for order {{row.id}}', "
               "'Dear customer, your invoice for {{row.total}} EUR is attached.')", (f"inv_{u}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.customer_email'])",
               (f"inv_{u}", f"order.{u}", f"inv_{u}"))
    db.execute("SELECT notify.set_template(%s, 'The address {{row.address}} bounced', "
               "'Your mail \"{{row.subject}}\" (message {{row.message_id}}) to {{row.address}} bounced: "
               "{{row.status}} {{row.diagnostic}}. Please check the customer''s address.')", (f"tell_{u}",))
    db.execute("SELECT notify.create_rule(%s, 'notify.bounced', %s, ARRAY['actor'])", (f"tell_{u}", f"tell_{u}"))


def erp_insert(db, u, to, seller):
    """The ERP's insert; returns (message id, the COMMIT's time: the server's commit timestamp)."""
    oid, committed = None, None
    db.execute(f"INSERT INTO orders_{u} (customer_email, seller_id, total) VALUES (%s, %s, 1200.50)",
               (to, seller))
    oid, committed = db.execute(f"SELECT id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                                f"FROM orders_{u} ORDER BY id DESC LIMIT 1").fetchone()
    mid = wait_until(lambda: (db.execute("SELECT m.id FROM notify.message m JOIN notify.event e ON e.id = m.event_id "
                                         "WHERE e.row->>'id' = %s AND e.event_type = %s AND m.address = %s",
                                         (str(oid), f"order.{u}", to)).fetchone() or [None])[0],
                     timeout=20, what="the order's message")
    return mid, committed


def watch_refusal(ms, address, out):
    """Notes when the final server refuses `address` (polled every 2 ms, in a thread)."""
    def run():
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(a.lower() == address.lower() for a, _ in list(ms.final.refused)):
                out.append(time.time())
                return
            time.sleep(0.002)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def loop(db, bc, ms, tag, u, seller, read):
    """ERP insert -> ... -> bounced -> salesperson told -> next message suppressed; prints the
    time of each stage. `read` makes notify_ext read the mailbox (check_bounces, or the worker)."""
    to = f"nobody-{u}@dest.test"
    refused = []
    watcher = watch_refusal(ms, to, refused)
    mid, t_commit = erp_insert(db, u, to, seller)
    wait_until(lambda: status(db, mid)[0] == "sent", timeout=30, interval=0.005, what="sent")
    t_sent = db.execute("SELECT extract(epoch FROM sent_at)::float8 FROM notify.message WHERE id = %s",
                        (mid,)).fetchone()[0]
    watcher.join(60)
    assert refused, "the final server never refused the address"
    dsn_for(ms, mid, tag)
    t_dsn = time.time()
    t_read0 = time.time()
    read()
    wait_until(lambda: status(db, mid)[0] == "bounced", timeout=30, interval=0.01, what="bounced")
    t_bounced = db.execute("SELECT extract(epoch FROM received_at)::float8 FROM notify.bounce_mail "
                           "WHERE message_id = %s AND action = 'bounced'", (mid,)).fetchone()[0]
    st, last_error = status(db, mid)
    [told] = ms.final.wait_for(f"sara-{u}@sales.test", timeout=30)
    # \Seen once the records committed
    wait_until(lambda: all("\\Seen" in f for f in flags_of(ms, mid, tag)), timeout=10, what="\\Seen")

    # the next message to that address is suppressed, naming the bounce
    mid2, t_commit2 = erp_insert(db, u, to.upper(), seller)
    wait_until(lambda: status(db, mid2)[0] != "queued", timeout=10, what="the next message settled")
    st2, err2 = status(db, mid2)
    explained = db.execute("SELECT reason FROM notify.explain(%s, jsonb_build_object('customer_email', %s::text))",
                           (f"order.{u}", to)).fetchall()
    supp = db.execute("SELECT reason, status, message_id FROM notify.suppressions WHERE lower(address) = %s",
                      (to,)).fetchone()
    event = db.execute("SELECT actor, row FROM notify.event WHERE event_type = 'notify.bounced' "
                       "AND (row->>'message_id')::bigint = %s", (mid,)).fetchone()

    print(f"\nloop ({read.__name__}): message {mid} to {to}")
    print(f"  COMMIT -> Postfix accepted (250, sent_at)      {1000 * (t_sent - t_commit):8.1f} ms")
    print(f"  -> the final server refused it (550 5.1.1)      {1000 * (refused[0] - t_commit):8.1f} ms")
    print(f"  -> Postfix's DSN in Dovecot (seen over IMAP)    {1000 * (t_dsn - t_commit):8.1f} ms (polled every 0.2 s)")
    print(f"  -> 'bounced' (its bounce_mail row)              {1000 * (t_bounced - t_commit):8.1f} ms "
          f"({1000 * (t_bounced - t_read0):.1f} ms after the DSN was seen)")
    print(f"  -> the salesperson's mail at the final server   {1000 * (told.wall_time - t_commit):8.1f} ms")
    print(f"  next message {mid2}: {st2} {1000 * (time.time() - t_commit2):.0f} ms after its COMMIT")
    print(f"  last_error: {last_error}")
    print(f"  suppressed: {err2}")
    print(f"  told: {told.subject}")

    assert st == "bounced"
    assert last_error.startswith("bounce report from mx.test: 5.1.1 failed; 127.0.0.1 said: 550 5.1.1 <")
    assert "User unknown" in last_error
    assert told.subject == f"The address {to} bounced"
    assert f"message {mid}" in told.message.get_body(("plain",)).get_content()
    assert event[0] == f"seller:{seller}"
    assert {k: event[1][k] for k in ("address", "message_id", "event_type", "rule", "status", "reason")} == \
        {"address": to, "message_id": mid, "event_type": f"order.{u}", "rule": f"inv_{u}",
         "status": "5.1.1", "reason": "bounce"}
    assert "User unknown" in event[1]["diagnostic"] and "recipient_key" in event[1]
    assert supp == ("bounce", "5.1.1", mid)
    assert st2 == "suppressed"
    assert err2.startswith("address suppressed: bounced ") and f"message {mid}" in err2
    assert "5.1.1: 550 5.1.1" in err2 and "notify.unsuppress(" in err2
    assert any(r[0].startswith("suppressed: address suppressed: bounced") for r in explained), explained
    return mid, to


def test_whole_loop_with_check_bounces(db, bc, ms, tag, uniq):
    erp_setup(db, uniq, 7001)

    def check_bounces():
        n = db.execute("SELECT notify.check_bounces()").fetchone()[0]
        assert n >= 1
    mid, to = loop(db, bc, ms, tag, uniq, 7001, check_bounces)
    db.execute("SELECT notify.drop_rule(%s)", (f"tell_{uniq}",))


def test_whole_loop_with_the_workers_poll(db, bc, ms, tag, uniq):
    erp_setup(db, uniq, 7002)
    set_guc(bc, db, "notify.bounce_poll_interval", "1s")
    make_due(db)
    try:
        def worker_poll():
            pass            # the workers read every second: nothing to call
        loop(db, bc, ms, tag, uniq, 7002, worker_poll)
    finally:
        quiet_workers(bc, db)
        db.execute("SELECT notify.drop_rule(%s)", (f"tell_{uniq}",))


# -- what changes nothing ---------------------------------------------------------

def test_delayed_notice_and_expired_4xx_change_nothing(db, bc, ms, tag, uniq):
    """A relay of its own that warns of delays after 1 s and gives up a 450 after 4 s: its
    'delayed' DSN and its 'failed' with 4.2.1 leave the message sent and the address free."""
    with Postfix(ms.final.port, dovecot=ms.dovecot, delay_warning_time=1, maximal_queue_lifetime=4,
                 bounce_queue_lifetime=4) as quick:
        db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', name => %s, bounce_address => %s)",
                   (f"smtp://127.0.0.1:{quick.port}", f"q{uniq}", BOUNCE))
        setup_rule(db, uniq, channel=f"q{uniq}")
        to = f"later-{uniq}@dest.test"
        mid = emit(db, uniq, to)
        wait_until(lambda: status(db, mid)[0] == "sent", timeout=30, what="sent")
        dsns = dsn_for(ms, mid, tag, count=2, timeout=60)
    kinds = sorted(re.search(rb"Action: (\w+)", d.raw).group(1).decode() for d in dsns)
    n = db.execute("SELECT notify.check_bounces('email')").fetchone()[0]
    rows = db.execute("SELECT action, status, note FROM notify.bounce_mail WHERE message_id = %s ORDER BY id",
                      (mid,)).fetchall()
    print(f"\nPostfix's DSNs for {to}: {kinds}; check_bounces examined {n}; recorded: {rows}")
    assert kinds == ["delayed", "failed"]
    assert [r[0] for r in rows] == ["delayed", "delayed"]
    assert {r[1] for r in rows} == {"4.2.1"}
    assert any("temporary status 4.2.1" in r[2] for r in rows)
    assert status(db, mid) == ("sent", None)
    assert db.execute("SELECT count(*) FROM notify.suppressions WHERE lower(address) = %s", (to,)).fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM notify.event WHERE event_type = 'notify.bounced' "
                      "AND (row->>'message_id')::bigint = %s", (mid,)).fetchone()[0] == 0
    assert all("\\Seen" in f for f in flags_of(ms, mid, tag))


def test_junk_is_left_alone_and_a_malformed_report_does_not_stop_the_next(db, bc, ms, tag, uniq):
    """An auto-reply, spam, a malformed report, then Postfix's real bounce: the bounce is
    processed, the rest recorded as ignored and flagged \\Seen; checked twice, the second
    examines nothing."""
    setup_rule(db, uniq)
    append(ms, sample("auto_reply.eml"))
    append(ms, sample("spam.eml"))
    append(ms, sample("malformed_report.eml"))
    to = f"nobody-{uniq}@dest.test"
    mid = emit(db, uniq, to)
    dsn_for(ms, mid, tag)
    before = db.execute("SELECT coalesce(max(id), 0) FROM notify.bounce_mail").fetchone()[0]
    t0 = time.time()
    n = db.execute("SELECT notify.check_bounces()").fetchone()[0]
    took = time.time() - t0
    rows = db.execute("SELECT uid, kind, action, message_id, note, seen FROM notify.bounce_mail WHERE id > %s "
                      "ORDER BY uid", (before,)).fetchall()
    print(f"\ncheck_bounces examined {n} mails in {1000 * took:.0f} ms:")
    for r in rows:
        print(f"  {r}")
    assert n == 4
    assert [(r[1], r[2]) for r in rows] == [("other", "ignored"), ("other", "ignored"),
                                            ("malformed", "ignored"), ("delivery-status", "bounced")]
    assert rows[3][3] == mid and status(db, mid)[0] == "bounced"
    assert all(r[5] for r in rows)
    assert not ms.dovecot.messages(criteria="UNSEEN"), "every examined mail is flagged \\Seen"
    # processing once: nothing is examined twice
    assert db.execute("SELECT notify.check_bounces()").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM notify.bounce_mail WHERE id > %s", (before,)).fetchone()[0] == 4


def test_leave_unseen_keeps_junk_unread_and_never_fetches_it_again(db, bc, ms, tag, uniq):
    db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s, leave_unseen => true)",
               (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", PASSWORD))
    db.execute("UPDATE notify.bounce_mailbox SET next_check_at = now() + interval '1 day'")
    try:
        subject = f"A question from a customer {uniq}"
        append(ms, f"From: someone@customer.test\r\nTo: {BOUNCE}\r\nSubject: {subject}\r\n\r\nHello?\r\n".encode())
        assert db.execute("SELECT notify.check_bounces()").fetchone()[0] == 1
        row = db.execute("SELECT action, seen, subject FROM notify.bounce_mail WHERE subject = %s",
                         (subject,)).fetchone()
        assert row == ("ignored", False, subject)
        unseen = ms.dovecot.messages(criteria=f'UNSEEN SUBJECT "{subject}"')
        assert len(unseen) == 1
        assert db.execute("SELECT notify.check_bounces()").fetchone()[0] == 0
        assert ms.dovecot.messages(criteria=f'UNSEEN SUBJECT "{subject}"'), "still unread for a person"
        assert db.execute("SELECT count(*) FROM notify.bounce_mail WHERE subject = %s", (subject,)).fetchone()[0] == 1
    finally:
        db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s)",
                   (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", PASSWORD))
        db.execute("UPDATE notify.bounce_mailbox SET next_check_at = now() + interval '1 day'")


def test_complaint_suppresses_and_tells(db, bc, ms, tag, uniq):
    """An RFC 5965 abuse report about a message that was delivered: the message stays sent,
    the address is suppressed (complaint), notify.bounced says so."""
    setup_rule(db, uniq)
    to = f"complainer-{uniq}@dest.test"
    mid = emit(db, uniq, to)
    ms.final.wait_for(to, timeout=30)
    append(ms, sample("abuse_report_arf.eml", **{
        "erp+m49.db7f3a@example.com": f"bounces+m{mid}.{tag}@bounce.test",
        "complainer@isp.example.net": to,
        "notify.message.49.db7f3a@example.com": f"notify.message.{tag}.{mid}@erp.test"}))
    assert db.execute("SELECT notify.check_bounces()").fetchone()[0] == 1
    assert status(db, mid)[0] == "sent"
    supp = db.execute("SELECT reason, status, message_id, diagnostic FROM notify.suppressions "
                      "WHERE address = %s", (to,)).fetchone()
    event = db.execute("SELECT row->>'reason', row->>'status' FROM notify.event WHERE event_type = 'notify.bounced' "
                       "AND (row->>'message_id')::bigint = %s", (mid,)).fetchone()
    print(f"\ncomplaint: {supp}; event {event}")
    assert supp[:3] == ("complaint", "abuse", mid)
    assert event == ("complaint", "abuse")
    mid2 = emit(db, uniq, to, n=2)
    wait_until(lambda: status(db, mid2)[0] == "suppressed", timeout=10, what="suppressed")
    assert status(db, mid2)[1].startswith("address suppressed: complaint (abuse)")


def test_unsuppress_then_the_next_message_is_sent(db, bc, ms, tag, uniq):
    setup_rule(db, uniq)
    to = f"nobody-{uniq}@dest.test"
    mid = emit(db, uniq, to)
    dsn_for(ms, mid, tag)
    db.execute("SELECT notify.check_bounces()")
    assert status(db, mid)[0] == "bounced"
    assert status(db, emit(db, uniq, to, n=2))[0] == "suppressed"
    assert db.execute("SELECT notify.unsuppress(%s)", (to.upper(),)).fetchone()[0] is True
    assert db.execute("SELECT notify.unsuppress(%s)", (to,)).fetchone()[0] is False
    mid3 = emit(db, uniq, to, n=3)
    wait_until(lambda: status(db, mid3)[0] == "sent", timeout=30, what="sent after unsuppress")
    # the relay took it (and refuses it again later: a new bounce, a new suppression)
    print(f"\nafter unsuppress: message {mid3} {status(db, mid3)[0]}")


def test_the_mailbox_password_stays_hidden(db, bc, ms, tag, uniq):
    """pg_settings, every relation notify_admin can read, check_bounces' error and the
    server log of a refused login (the workers' and the session's) never show it."""
    secret = f"Wr0ng-Bounce-Pa55-{uniq}"
    db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', name => %s)",
               (f"smtp://127.0.0.1:{ms.postfix.port}", f"pw{uniq}"))
    # passed as a bind parameter (see docs/security.md): never in the statement's text
    db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s, channel => %s)",
               (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", secret, f"pw{uniq}"))
    # the workers read it at once (set_bounce_mailbox makes it due) and fail to log in
    wait_until(lambda: f'bounce mailbox of channel "pw{uniq}" cannot be read' in bc.log(), timeout=30,
               what="the workers' failed login")
    with pytest.raises(psycopg.errors.ConnectionFailure) as e:
        db.execute("SELECT notify.check_bounces(%s)", (f"pw{uniq}",))
    assert "login" in str(e.value)
    admin = f"adm_{uniq}"
    db.execute(f"CREATE ROLE {admin} IN ROLE notify_admin")
    rels = db.execute("SELECT c.oid::regclass::text FROM pg_class c WHERE c.relkind IN ('r', 'v', 'm') "
                      "AND has_table_privilege(%s, c.oid, 'SELECT') "
                      "AND c.relnamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)",
                      (admin,)).fetchall()
    import base64
    forms = [secret, base64.b64encode(secret.encode()).decode(),
             base64.b64encode(f"\0bounces\0{secret}".encode()).decode()]
    found = []
    for (rel,) in rels:
        for (text,) in db.execute(f"SELECT row_to_json(x)::text FROM {rel} x"):
            found += [(rel, f) for f in forms if f in text]
    settings = db.execute("SELECT name FROM pg_settings WHERE setting LIKE %s", (f"%{secret}%",)).fetchall()
    log = bc.log()
    print(f"\n{len(rels)} relations notify_admin can read, none holds the password; "
          f"error: {str(e.value).splitlines()[0]}")
    print("log: " + [line for line in log.splitlines() if f'"pw{uniq}" cannot be read' in line][0])
    assert not found and not settings
    assert secret not in log and forms[1] not in log and forms[2] not in log
    assert db.execute("SELECT has_password FROM notify.bounce_mailboxes WHERE channel = %s",
                      (f"pw{uniq}",)).fetchone()[0] is True
    with bc.connect() as adm:
        adm.execute(f"SET ROLE {admin}")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            adm.execute("SELECT * FROM notify.bounce_mailbox_secret")
    db.execute("SELECT notify.drop_bounce_mailbox(%s)", (f"pw{uniq}",))
    db.execute(f"DROP ROLE {admin}")


# -- the mailbox's server down --------------------------------------------------------

def latency_through_postfix(db, ms, uniq, label, n=20):
    """n single-row commits to ok addresses: COMMIT -> final server (through Postfix), ms."""
    setup_rule(db, f"{uniq}{label}")
    sent = {}
    for i in range(n):
        to = f"ok-{label}-{i}-{uniq}@dest.test"
        ev = db.execute("SELECT notify.emit(%s, jsonb_build_object('n', %s::int, 'to', %s::text))",
                        (f"{uniq}{label}", i, to)).fetchone()[0]
        sent[to] = db.execute("SELECT extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8 "
                              "FROM notify.event WHERE id = %s", (ev,)).fetchone()[0]
        time.sleep(0.05)
    lat = sorted(1000 * (ms.final.wait_for(to, timeout=30)[0].wall_time - t) for to, t in sent.items())
    return lat


def test_imap_down_retried_quietly_and_sending_goes_on(db, bc, ms, tag, uniq):
    """Dovecot stopped: the workers' reads fail every second, one log line; mail keeps
    flowing through Postfix meanwhile; Dovecot back: one line, and the waiting DSN is read.
    Then a server that accepts and never greets: a worker waits out its connect timeout
    (10 s) while the other one sends."""
    base = latency_through_postfix(db, ms, uniq, "base")
    failing = r'bounce mailbox of channel "email" cannot be read'
    again = r'bounce mailbox of channel "email" can be read again'
    n_fail, n_again = log_count(bc, failing), log_count(bc, again)
    ms.dovecot.stop()
    set_guc(bc, db, "notify.bounce_poll_interval", "1s")
    try:
        make_due(db)
        wait_until(lambda: log_count(bc, failing) > n_fail, timeout=20, what="the failure's log line")
        t_down = time.time()
        down = latency_through_postfix(db, ms, uniq, "down")
        # a bounce while the mailbox is down: Postfix keeps its DSN until Dovecot is back
        setup_rule(db, uniq)
        to = f"nobody-{uniq}@dest.test"
        mid = emit(db, uniq, to)
        time.sleep(max(0.0, 5 - (time.time() - t_down)))
        reads = db.execute("SELECT state, last_error FROM notify.bounce_mailboxes WHERE channel = 'email'").fetchone()
        assert reads[0] == "failing" and reads[1].startswith("connect:"), reads
        assert log_count(bc, failing) == n_fail + 1, "one line however many reads failed"
        ms.dovecot.start()
        ms.postfix.flush()
        wait_until(lambda: status(db, mid)[0] == "bounced", timeout=60, what="the waiting bounce read")
        wait_until(lambda: log_count(bc, again) > n_again, timeout=20, what="the recovery's log line")
        assert log_count(bc, failing) == n_fail + 1 and log_count(bc, again) == n_again + 1
        line = [x for x in bc.log().splitlines() if re.search(failing, x)][-1]
        print(f"\n{line.split('LOG:', 1)[1].strip()}")
        print([x for x in bc.log().splitlines() if re.search(again, x)][-1].split("LOG:", 1)[1].strip())
        print(f"COMMIT -> final server through Postfix, 20 mails each: IMAP up p50 {statistics.median(base):.1f} ms "
              f"max {base[-1]:.1f} ms; IMAP down (reads failing every second) p50 {statistics.median(down):.1f} ms "
              f"max {down[-1]:.1f} ms")
        assert statistics.median(down) < 1000 and down[-1] < 5000

        # a server that takes the connection and never greets: a worker is held 10 s
        silent = socket.socket()
        silent.bind(("127.0.0.1", 0))
        silent.listen(5)
        db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', name => %s)",
                   (f"smtp://127.0.0.1:{ms.postfix.port}", f"sil{uniq}"))
        db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', 'x', 'off', %s)",
                   (f"imap://127.0.0.1:{silent.getsockname()[1]}/INBOX", f"sil{uniq}"))
        wait_until(lambda: db.execute("SELECT next_check_at > now() AND last_checked_at IS NULL "
                                      "FROM notify.bounce_mailbox WHERE channel = %s", (f"sil{uniq}",)).fetchone()[0],
                   timeout=10, interval=0.01, what="a worker waiting for the silent server")
        held = latency_through_postfix(db, ms, uniq, "held")
        states = [r[0] for r in db.execute("SELECT state FROM notify.worker_status()")]
        wait_until(lambda: f'bounce mailbox of channel "sil{uniq}" cannot be read' in bc.log(), timeout=30,
                   what="the silent server's failure")
        print(f"a worker held by a silent IMAP server (states after: {states}): "
              f"p50 {statistics.median(held):.1f} ms, max {held[-1]:.1f} ms")
        print([x for x in bc.log().splitlines() if f'"sil{uniq}" cannot be read' in x][-1].split("LOG:", 1)[1].strip())
        assert statistics.median(held) < 1000 and held[-1] < 2000
        db.execute("SELECT notify.drop_bounce_mailbox(%s)", (f"sil{uniq}",))
        silent.close()
    finally:
        if ms.dovecot.proc is None:
            ms.dovecot.start()
        quiet_workers(bc, db)


# -- TLS --------------------------------------------------------------------------------

def test_imaps_verify_and_no_starttls(db, bc, ms, uniq):
    """imaps:// with tls 'verify' checks the throwaway CA's certificate (notify.tls_ca_file);
    'verify' against an imap:// server without STARTTLS refuses to log in."""
    db.execute("SELECT notify.set_smtp(%s, 'erp@erp.test', tls => 'off', name => %s)",
               (f"smtp://127.0.0.1:{ms.postfix.port}", f"tls{uniq}"))
    # the module's mailbox is imaps:// + verify: check_bounces works (others have read it)
    assert db.execute("SELECT url, tls FROM notify.bounce_mailboxes WHERE channel = 'email'").fetchone() == \
        (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", "verify")
    assert db.execute("SELECT notify.check_bounces('email')").fetchone()[0] >= 0
    # without notify.tls_ca_file, the system's store does not know the throwaway CA
    db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s, 'verify', %s)",
               (f"imaps://127.0.0.1:{ms.dovecot.imaps_port}/INBOX", PASSWORD, f"tls{uniq}"))
    set_guc(bc, db, "notify.tls_ca_file", "")
    try:
        with bc.connect() as fresh, pytest.raises(psycopg.errors.ConnectionFailure) as untrusted:
            fresh.execute("SELECT notify.check_bounces(%s)", (f"tls{uniq}",))
    finally:
        set_guc(bc, db, "notify.tls_ca_file", ms.dovecot.ca.ca_cert)
    with Dovecot(user="bounces", password=PASSWORD, imaps=False) as plain:
        db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s, 'verify', %s)",
                   (f"imap://127.0.0.1:{plain.imap_port}/INBOX", PASSWORD, f"tls{uniq}"))
        with pytest.raises(psycopg.errors.ConnectionFailure) as no_starttls:
            db.execute("SELECT notify.check_bounces(%s)", (f"tls{uniq}",))
        plain_log = plain.log()
        db.execute("SELECT notify.set_bounce_mailbox(%s, 'bounces', %s, 'off', %s)",
                   (f"imap://127.0.0.1:{plain.imap_port}/INBOX", PASSWORD, f"tls{uniq}"))
        assert db.execute("SELECT notify.check_bounces(%s)", (f"tls{uniq}",)).fetchone()[0] == 0
    db.execute("SELECT notify.drop_bounce_mailbox(%s)", (f"tls{uniq}",))
    print(f"\nuntrusted certificate: {str(untrusted.value).splitlines()[0]}")
    print(f"no STARTTLS: {str(no_starttls.value).splitlines()[0]}")
    assert "TLS:" in str(untrusted.value)
    assert "does not offer STARTTLS" in str(no_starttls.value)
    assert "user=<bounces>" not in plain_log, "the login never crossed the link in clear text"


# -- the SQL interface's checks -------------------------------------------------------

def test_set_bounce_mailbox_refuses_what_cannot_work(db, bc):
    bad = [
        (("file:///etc/passwd", "u", "p"), "invalid bounce mailbox URL"),
        (("imap://user:pw@127.0.0.1/INBOX", "u", "p"), "invalid bounce mailbox URL"),
        (("https://127.0.0.1/", "u", "p"), "invalid bounce mailbox URL"),
        (("imaps://127.0.0.1/INBOX", "u", None), "needs a password"),
        (("imaps://127.0.0.1/INBOX", None, "p"), "needs a user name"),
    ]
    for args, msg in bad:
        with pytest.raises(psycopg.Error, match=msg):
            db.execute("SELECT notify.set_bounce_mailbox(%s, %s, %s)", args)
    with pytest.raises(psycopg.Error, match="cannot be used with an imaps"):
        db.execute("SELECT notify.set_bounce_mailbox('imaps://127.0.0.1/INBOX', 'u', 'p', 'off')")
    with pytest.raises(psycopg.Error, match="there is no SMTP channel"):
        db.execute("SELECT notify.set_bounce_mailbox('imaps://127.0.0.1/INBOX', 'u', 'p', channel => 'nope')")
    with pytest.raises(psycopg.Error, match="has no bounce mailbox"):
        db.execute("SELECT notify.check_bounces('nope')")

"""Self-test of test/lib/mailstack.py: a real Postfix relays to the final
server, bounces what it refuses into Dovecot as a DSN of its own, survives
a stop/start, and Dovecot serves IMAP and IMAPS. Needs no PostgreSQL."""
import email
import email.policy
import email.utils
import imaplib
import os
import smtplib
import socket
import ssl

import pytest

from mailstack import (MailStack, Postfix, _group_pids, mail_stack,  # noqa: F401
                       missing_binaries)

VERP = "bounces+m42.tok@bounce.test"


def raw_mail(to, subject, msgid, body="Hello from the ERP.\r\n"):
    # with Date and Message-ID, Postfix adds nothing but its Received header
    return (f"From: ERP <erp@erp.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{msgid}@erp.test>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


def delivery_status(msg):
    """The per-recipient fields of a message/delivery-status part, as a dict."""
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            fields = {}
            for block in part.get_payload():       # header blocks: per-message, per-recipient
                for k, v in block.items():
                    fields[k] = str(v)
            return fields
    raise AssertionError("no message/delivery-status part")


def test_binaries_installed():
    missing = missing_binaries()
    assert not missing, ("Postfix/Dovecot missing (apt-get install postfix dovecot-imapd "
                         f"dovecot-lmtpd): {missing}")


def test_relay_delivers_to_final_server(mail_stack):
    ms = mail_stack
    data = raw_mail("ok@dest.test", "relay ok", "ok-1")
    qid = ms.send("sender@erp.test", ["ok@dest.test"], data)
    assert qid
    [got] = ms.final.wait_for("ok@dest.test", timeout=15)
    assert got.mail_from == "sender@erp.test"
    assert got.rcpt_tos == ["ok@dest.test"]
    # Postfix prepends its Received header and passes the rest untouched
    assert got.data.startswith(b"Received: from client.test")
    assert f"by mx.test (Postfix) with ESMTP id {qid}".encode() in got.data
    received_end = got.data.index(b"\r\nFrom: ") + 2
    assert got.data[received_end:] == data
    assert got.message["Message-ID"] == "<ok-1@erp.test>"
    ms.postfix.wait_log(rf"{qid}: to=<ok@dest.test>, relay=127\.0\.0\.1.*status=sent")


def test_refused_recipient_bounces_into_dovecot_as_dsn(mail_stack):
    ms = mail_stack
    assert ms.bounce_address("m42.tok") == VERP
    qid = ms.send(VERP, ["nobody@dest.test"], raw_mail("nobody@dest.test", "to nobody", "nb-1"))
    ms.postfix.wait_log(rf"{qid}: to=<nobody@dest.test>.*dsn=5\.1\.1, status=bounced")
    assert ("nobody@dest.test",
            "550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown") \
        in ms.final.refused
    ms.dovecot.wait_for_messages(1, timeout=20, criteria=f'UNSEEN TO "{VERP}"')

    # what a bounce processor does: IMAP login, INBOX, UNSEEN, RFC822
    imap = imaplib.IMAP4("127.0.0.1", ms.dovecot.imap_port, timeout=10)
    try:
        imap.login("bounces", "secret")
        assert imap.select("INBOX")[0] == "OK"
        typ, data = imap.search(None, "UNSEEN")
        assert typ == "OK"
        nums = data[0].split()
        assert nums
        found = None
        for n in nums:
            typ, parts = imap.fetch(n, "(RFC822)")
            assert typ == "OK"
            msg = email.message_from_bytes(parts[0][1], policy=email.policy.default)
            if msg["To"] == VERP and "nb-1@erp.test" in parts[0][1].decode(errors="replace"):
                found = msg
        assert found is not None
    finally:
        imap.logout()

    msg = found
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["Return-Path"] == "<>"                  # null envelope sender
    assert msg["Delivered-To"] == VERP                 # LMTP RCPT TO kept the detail
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mx.test"
    status = delivery_status(msg)
    assert status["Action"] == "failed"
    assert status["Status"] == "5.1.1"
    assert status["Final-Recipient"] == "rfc822; nobody@dest.test"
    assert status["X-Postfix-Sender"] == f"rfc822; {VERP}"
    assert "550 5.1.1" in status["Diagnostic-Code"]
    returned = [p for p in msg.walk() if p.get_content_type() == "message/rfc822"]
    assert returned and returned[0].get_payload()[0]["Message-ID"] == "<nb-1@erp.test>"
    # RFC822 fetch marked it read
    [seen] = [m for m in ms.dovecot.messages(criteria=f'TO "{VERP}"')
              if b"nb-1@erp.test" in m.raw]
    assert "\\Seen" in seen.flags


def test_temporary_refusal_bounces_after_queue_lifetime(mail_stack):
    """A 450 is retried; with maximal_queue_lifetime = 0 the first failure
    expires at once: a second relay on the same final server and Dovecot."""
    ms = mail_stack
    verp = ms.bounce_address("m43.tmp")
    # the module's relay keeps it queued, deferred with the 450
    qid = ms.send(verp, ["later@dest.test"], raw_mail("later@dest.test", "later", "lt-1"))
    ms.postfix.wait_log(rf"{qid}: to=<later@dest.test>.*dsn=4\.2\.1, status=deferred")
    [queued] = [m for m in ms.postfix.queue() if m["queue_id"] == qid]
    assert queued["queue_name"] in ("deferred", "active")
    assert "450 4.2.1" in queued["recipients"][0]["delay_reason"]
    assert qid in ms.postfix.queue_ids()
    assert "later@dest.test" in ms.postfix.mailq()

    with Postfix(ms.final.port, dovecot=ms.dovecot, maximal_queue_lifetime=0,
                 bounce_queue_lifetime=0) as quick:
        verp2 = ms.bounce_address("m44.exp")
        quick.send(verp2, ["later@dest.test"], raw_mail("later@dest.test", "later", "lt-2"))
        [dsn] = ms.dovecot.wait_for_messages(1, timeout=20, criteria=f'TO "{verp2}"')
        status = delivery_status(dsn.message)
        assert status["Action"] == "failed"
        assert status["Status"] == "4.2.1"


def test_outage_stop_refuses_connections_start_flows_again(mail_stack):
    ms = mail_stack
    port = ms.postfix.port
    pgid = ms.postfix.master_pid
    ms.postfix.stop()
    try:
        assert not _group_pids(pgid)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with pytest.raises((ConnectionRefusedError, smtplib.SMTPServerDisconnected)):
            ms.send("sender@erp.test", ["ok2@dest.test"], raw_mail("ok2@dest.test", "x", "x"))
    finally:
        ms.postfix.start()
    assert ms.postfix.master_pid != pgid
    ms.send("sender@erp.test", ["ok2@dest.test"], raw_mail("ok2@dest.test", "after", "ok-2"))
    [got] = ms.final.wait_for("ok2@dest.test", timeout=15)
    assert got.message["Message-ID"] == "<ok-2@erp.test>"


def test_imaps_with_throwaway_certificate(mail_stack):
    dv = mail_stack.dovecot
    assert dv.imaps_port and dv.imaps_port != dv.imap_port
    client = dv.imap(tls=True)             # verifies the chain and IP:127.0.0.1
    try:
        assert client.select("INBOX", readonly=True)[0] == "OK"
        cert = client.sock.getpeercert()
        assert ("IP Address", "127.0.0.1") in cert["subjectAltName"]
    finally:
        client.logout()
    # the system trust store does not know the throwaway CA
    with pytest.raises(ssl.SSLCertVerificationError):
        imaplib.IMAP4_SSL("127.0.0.1", dv.imaps_port, ssl_context=ssl.create_default_context(),
                          timeout=10)


def test_teardown_stops_every_process_and_removes_directories():
    with MailStack() as ms:
        groups = [ms.postfix.master_pid, ms.dovecot.proc.pid]
        dirs = [ms.postfix.dir, ms.dovecot.dir]
        ports = [ms.postfix.port, ms.dovecot.imap_port, ms.dovecot.lmtp_port, ms.final.port]
        assert all(_group_pids(g) for g in groups)
    assert not any(_group_pids(g) for g in groups)
    assert not any(os.path.exists(d) for d in dirs)
    for p in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", p), timeout=2).close()


def test_timings_are_short(mail_stack):
    """The relay's retry timers are what the module promises (seconds)."""
    conf = mail_stack.postfix.postconf("queue_run_delay", "minimal_backoff_time",
                                       "maximal_backoff_time", "relayhost")
    assert "queue_run_delay = 1s" in conf
    assert "maximal_backoff_time = 2s" in conf
    assert f"relayhost = [127.0.0.1]:{mail_stack.final.port}" in conf

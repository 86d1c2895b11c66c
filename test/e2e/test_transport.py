"""The SMTP transport under stress: TLS that fails closed, certificates
checked, implicit TLS, a server that never answers the final dot (unknown
outcome), and the per-channel rate limit shared by the workers."""
import collections
import socket
import threading
import time

import pytest
from aiosmtpd.controller import Controller

from harness import free_port, wait_until, set_guc

from tls import ThrowawayCA


@pytest.fixture(scope="module")
def ca():
    return ThrowawayCA()




def channel_rule(db, uniq, url, tls, to, rate=None):
    name = f"ch_{uniq}"
    db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', username => %s, password => %s, "
               "tls => %s, name => %s, rate_per_minute => %s)",
               (url, "erp" if tls != "off" else None, "s3cret" if tls != "off" else None, tls, name, rate))
    db.execute("SELECT notify.set_template(%s, 'tls {{row.n}}', 'body {{row.n}}')", (f"tpl_{uniq}",))
    etype = f"tr.{uniq}"
    db.execute("SELECT notify.create_rule(%s, %s, %s, %s, channel => %s)",
               (f"rule_{uniq}", etype, f"tpl_{uniq}", [f"email:{to}"], name))
    return etype


def log_row(db, etype):
    return db.execute("SELECT status, attempts, last_error FROM notify.delivery_log "
                      "WHERE event_type = %s", (etype,)).fetchone()


class _TlsRecorder:
    def __init__(self):
        self.mails = []
        self.peers = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # PIPELINING, as Postfix offers it: the client pipelines through TLS too
        session.host_name = hostname
        responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_DATA(self, server, session, envelope):
        self.mails.append((envelope.rcpt_tos, session.ssl is not None, session.authenticated))
        self.peers.append(session.peer)
        return "250 OK"


def _auth_ok(server, session, envelope, mechanism, auth_data):
    from aiosmtpd.smtp import AuthResult
    return AuthResult(success=auth_data.login == b"erp" and auth_data.password == b"s3cret")


@pytest.fixture
def starttls_server(ca):
    handler = _TlsRecorder()
    port = free_port()
    ctl = Controller(handler, hostname="127.0.0.1", port=port, tls_context=ca.server_context(),
                     require_starttls=True, authenticator=_auth_ok, auth_required=True)
    ctl.start()
    yield handler, port
    ctl.stop()


def test_verify_with_trusted_ca_sends_over_starttls_and_authenticates(db, cluster, ca, starttls_server, uniq):
    handler, port = starttls_server
    to = f"{uniq}@example.com"
    set_guc(cluster, db, "notify.tls_ca_file", ca.ca_cert)
    try:
        etype = channel_rule(db, uniq, f"smtp://127.0.0.1:{port}", "verify", to)
        db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
        wait_until(lambda: handler.mails, timeout=15, what="mail over STARTTLS")
        report = db.execute("SELECT notify.test_smtp(%s)", (f"ch_{uniq}",)).fetchone()[0]
    finally:
        set_guc(cluster, db, "notify.tls_ca_file", None)
    print(report)
    assert handler.mails == [([to], True, True)], "sent over TLS, after AUTH"
    assert wait_until(lambda: log_row(db, etype)[0] == "sent", what="sent in the log")
    assert "STARTTLS" in report and "OK: connected, greeted and authenticated" in report
    assert "s3cret" not in report


def test_pipelined_messages_over_starttls(db, starttls_server, uniq):
    """20 messages in one transaction over STARTTLS and AUTH to a server that
    offers PIPELINING: each arrives once, over TLS, authenticated; envelopes
    pipelined behind the data before them go through the TLS layer (whose
    decrypted bytes are read before the socket is polled)."""
    handler, port = starttls_server
    to = f"{uniq}@example.com"
    etype = channel_rule(db, uniq, f"smtp://127.0.0.1:{port}", "require", to)
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g)) FROM generate_series(1, 20) g", (etype,))
    wait_until(lambda: len(handler.mails) >= 20, timeout=20, what="20 mails over STARTTLS")
    sent = wait_until(lambda: (n := db.execute("SELECT count(*) FROM notify.message WHERE event_type = %s "
                                               "AND status = 'sent'", (etype,)).fetchone()[0]) == 20 and n,
                      what="20 sent in the log")
    time.sleep(0.3)
    per_connection = sorted(collections.Counter(handler.peers).values(), reverse=True)
    print(f"20 mails over STARTTLS, messages per connection {per_connection}")
    assert len(handler.mails) == 20 and sent == 20
    assert all(rcpt == [to] and tls and authed for rcpt, tls, authed in handler.mails)
    assert per_connection[0] > 1, "a connection carried several messages"


def test_verify_refuses_a_certificate_it_cannot_trust(db, starttls_server, uniq):
    handler, port = starttls_server
    etype = channel_rule(db, uniq, f"smtp://127.0.0.1:{port}", "verify", f"{uniq}@example.com")
    db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
    first = wait_until(lambda: (r := log_row(db, etype)) and r[2] and r, timeout=15, what="a failure logged")
    # Under the whole suite's load the first try has, now and then, failed before the TLS
    # handshake ("Send failure: Broken pipe", a plain write): the channel's failure too, so
    # the next probe (retry_backoff 1 s) meets the certificate.
    row = wait_until(lambda: (r := log_row(db, etype)) and r[2] and
                     ("certificate" in r[2].lower() or "ssl" in r[2].lower()) and r,
                     timeout=15, what="the certificate's failure logged")
    print(first, row)
    # the channel's failure, not the message's: it waits, no attempt spent
    assert first[0] == "queued" and first[1] == 0, "a failure before the message is the channel's"
    assert row[0] == "queued" and row[1] == 0, "a TLS failure is the channel's"
    state = db.execute("SELECT state, last_error FROM notify.channels WHERE name = %s", (f"ch_{uniq}",)).fetchone()
    assert state[0] == "failing" and "certificate" in state[1].lower(), state
    assert handler.mails == []
    db.execute("SELECT notify.cancel(m.id) FROM notify.message m WHERE m.event_type = %s", (etype,))


def test_verify_never_rides_on_a_connection_opened_without_verification(db, cluster, starttls_server, uniq):
    """Two channels to the same relay, the same login: 'require' (no certificate check) and
    'verify' (the relay's CA not trusted).  libcurl would reuse the connection the first left
    open for the second (it does not compare TLS settings for STARTTLS): the 'verify' channel's
    mail would go over a session whose certificate nobody checked.  It must not be sent."""
    handler, port = starttls_server
    set_guc(cluster, db, "notify.workers", "1")     # one worker: one pool, one connection cache
    try:
        e_req = channel_rule(db, f"{uniq}r", f"smtp://127.0.0.1:{port}", "require", f"r{uniq}@example.com")
        e_ver = channel_rule(db, f"{uniq}v", f"smtp://127.0.0.1:{port}", "verify", f"v{uniq}@example.com")
        db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (e_req,))
        wait_until(lambda: handler.mails, timeout=15, what="the 'require' channel's mail")
        db.execute("SELECT notify.emit(%s, '{\"n\": 2}')", (e_ver,))
        row = wait_until(lambda: (r := log_row(db, e_ver)) and (r[2] or r[0] == "sent") and r, timeout=15,
                         what="the 'verify' channel's outcome")
        time.sleep(1)
        print(row, handler.mails)
        assert handler.mails == [([f"r{uniq}@example.com"], True, True)], "the 'verify' mail went out unverified"
        assert row[0] == "queued" and "certificate" in row[2].lower(), row
        db.execute("SELECT notify.cancel(m.id) FROM notify.message m WHERE m.event_type = %s", (e_ver,))
    finally:
        set_guc(cluster, db, "notify.workers", None)


def test_require_sends_to_a_self_signed_server_over_smtps(db, ca, uniq):
    handler = _TlsRecorder()
    port = free_port()
    # aiosmtpd does not count implicit TLS as TLS for auth_require_tls: the
    # listening socket is TLS-only, so nothing here is ever in clear text
    ctl = Controller(handler, hostname="127.0.0.1", port=port, ssl_context=ca.server_context(),
                     authenticator=_auth_ok, auth_required=True, auth_require_tls=False)
    ctl.start()
    try:
        to = f"{uniq}@example.com"
        etype = channel_rule(db, uniq, f"smtps://127.0.0.1:{port}", "require", to)
        db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
        try:
            wait_until(lambda: handler.mails, timeout=15, what="mail over implicit TLS")
        except AssertionError:
            print(log_row(db, etype))
            raise
    finally:
        ctl.stop()
    assert [(rcpt, authed) for rcpt, _, authed in handler.mails] == [([to], True)]


class RawSmtp:
    """A bare-bones server that records every line a client sends; it
    offers AUTH but no STARTTLS, or offers STARTTLS and then refuses it."""

    def __init__(self, offer_starttls):
        self.offer_starttls = offer_starttls
        self.lines = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        conn.settimeout(10)
        f = conn.makefile("rb")
        conn.sendall(b"220 raw ESMTP\r\n")
        try:
            for line in f:
                self.lines.append(line.decode("latin-1").rstrip("\r\n"))
                cmd = line[:4].upper()
                if cmd in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-raw\r\n" + (b"250-STARTTLS\r\n" if self.offer_starttls else b"")
                                 + b"250 AUTH PLAIN LOGIN\r\n")
                elif cmd == b"STAR":
                    conn.sendall(b"454 4.7.0 TLS not available due to local problem\r\n")
                elif cmd == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    break
                elif cmd == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                else:
                    conn.sendall(b"250 OK\r\n")
        except OSError:
            pass
        conn.close()

    def stop(self):
        self.stopping = True
        self.thread.join()
        self.sock.close()


@pytest.mark.parametrize("tls", ["verify", "require"])
@pytest.mark.parametrize("offer", [False, True], ids=["no-starttls", "starttls-refused"])
def test_tls_modes_fail_closed(db, uniq, tls, offer):
    """Without TLS, nothing after EHLO: no AUTH (credentials), no envelope."""
    raw = RawSmtp(offer_starttls=offer)
    try:
        etype = channel_rule(db, uniq, f"smtp://127.0.0.1:{raw.port}", tls, f"{uniq}@example.com")
        db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
        row = wait_until(lambda: (r := log_row(db, etype)) and r[2] and r, timeout=15,
                         what="failure logged")
        report = db.execute("SELECT notify.test_smtp(%s)", (f"ch_{uniq}",)).fetchone()[0]
    finally:
        raw.stop()
    print(f"[{tls}, STARTTLS {'offered then refused' if offer else 'not offered'}] "
          f"client sent: {raw.lines}; logged: {row}")
    sent = {line.split(" ")[0].upper() for line in raw.lines}
    assert "EHLO" in sent
    assert not sent & {"AUTH", "MAIL", "RCPT", "DATA"}, raw.lines
    assert not any("s3cret" in line or "ZXJw" in line for line in raw.lines)
    assert row[0] == "queued", "retried once the server offers TLS again"
    assert "FAILED" in report
    db.execute("SELECT notify.cancel(m.id) FROM notify.message m WHERE m.event_type = %s", (etype,))


def test_no_reply_after_final_dot_is_unknown_and_retried_with_same_message_id(db, cluster, smtp, uniq):
    to = f"{uniq}@example.com"
    tries = []

    def delay(mail):
        if to not in mail.rcpt_tos:
            return 0
        tries.append(time.monotonic())
        if len(tries) > 1:
            return 0
        # the first try: the server keeps the message, then is silent past
        # smtp_data_timeout (its 250 is lost, as when a link drops)
        smtp._add(mail)
        return 4.0

    set_guc(cluster, db, "notify.smtp_data_timeout", 2)
    smtp.data_delay = delay
    try:
        etype = f"unk.{uniq}"
        db.execute("SELECT notify.set_template(%s, 'unknown {{row.n}}', 'body')", (f"tpl_{uniq}",))
        db.execute("SELECT notify.create_rule(%s, %s, %s, %s)",
                   (f"rule_{uniq}", etype, f"tpl_{uniq}", [f"email:{to}"]))
        db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
        mails = smtp.wait_for(to, count=2, timeout=20)
        attempts = wait_until(lambda: (a := db.execute(
            "SELECT a.outcome, a.response, m.status FROM notify.attempt a JOIN notify.message m "
            "ON m.id = a.message_id WHERE m.event_type = %s ORDER BY a.id", (etype,)).fetchall())
            and len(a) >= 2 and a[-1][0] == "sent" and a, what="attempts recorded")
        err = db.execute("SELECT a.response FROM notify.attempt a JOIN notify.message m "
                         "ON m.id = a.message_id WHERE m.event_type = %s AND a.outcome = 'unknown'",
                         (etype,)).fetchone()
    finally:
        smtp.data_delay = None
        set_guc(cluster, db, "notify.smtp_data_timeout", None)
    print(f"attempts: {attempts}; copies received: {len(mails)}; error: {err}")
    assert [a[0] for a in attempts] == ["unknown", "sent"]
    assert attempts[-1][2] == "sent"
    ids = {m.message["Message-ID"] for m in mails}
    assert len(ids) == 1, f"the retry must carry the same Message-ID: {ids}"
    assert "unknown outcome" in err[0] and "same Message-ID" in err[0]


def test_rate_limit_spaces_messages_over_all_workers(db, smtp, uniq):
    to = f"{uniq}@example.com"
    etype = channel_rule(db, uniq, f"smtp://127.0.0.1:{smtp.port}", "off", to, rate=120)
    db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g)) FROM generate_series(1, 6) g", (etype,))
    mails = smtp.wait_for(to, count=6, timeout=20)
    times = sorted(m.received_at for m in mails)
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"6 messages at 120/min: gaps {[round(g, 3) for g in gaps]}")
    assert min(gaps) >= 0.45, "120 per minute is one every 0.5 s"
    rows = db.execute("SELECT attempts FROM notify.message WHERE event_type = %s", (etype,)).fetchall()
    assert all(r[0] == 1 for r in rows), "waiting for the rate limit is not an attempt"

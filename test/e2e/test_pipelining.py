"""The mail transaction notify_ext speaks itself (src/smtp.c), with and
without PIPELINING (RFC 2920): a server that records every read it makes
shows what came in one write; refusals in the middle of a pipelined chain
(550 to RCPT TO, 451 to the final dot) settle their own message only; a
server without PIPELINING gets one command at a time."""
import re
import socket
import threading
import time

import pytest

from harness import SmtpServer, wait_until


class RecordingSmtp:
    """A real, minimal SMTP server on a socket of its own that keeps every
    chunk each recv() returned, to see what the client wrote at once.
    RCPT TO an address in refuse_rcpt gets 550; the final dot of a message
    whose data contains one of refuse_data's strings gets 451 once."""

    def __init__(self, pipelining=True, refuse_rcpt=(), refuse_data=(), drop_at=None):
        self.pipelining = pipelining
        self.drop_at = drop_at    # the message whose final dot gets no reply: the connection is cut
        self.refuse_rcpt = {a.lower() for a in refuse_rcpt}
        self.refuse_data = set(refuse_data)
        self.refused_data = set()
        self.chunks = []          # (session number, bytes) of every recv
        self.mails = []           # (rcpt, data) of every message accepted
        self.sessions = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stopping = False
        self.conns = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        self.sock.settimeout(0.2)
        while not self.stopping:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with self.lock:
                self.sessions += 1
                n = self.sessions
                self.conns.append(conn)
            threading.Thread(target=self._session, args=(conn, n), daemon=True).start()

    def _session(self, conn, n):
        buf = b""
        out = []
        rcpt = None
        in_data = False
        data = []

        def lines():
            nonlocal buf
            while b"\r\n" in buf:
                line, buf = buf.split(b"\r\n", 1)
                yield line

        conn.settimeout(20)
        conn.sendall(b"220 rec ESMTP\r\n")
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                with self.lock:
                    self.chunks.append((n, chunk))
                buf += chunk
                for line in lines():
                    if in_data:
                        if line == b".":
                            in_data = False
                            body = b"\r\n".join(data)
                            key = next((k for k in self.refuse_data
                                        if k.encode() in body and k not in self.refused_data), None)
                            if self.drop_at and self.drop_at.encode() in body:
                                # the server keeps the message and dies before its 250
                                self.drop_at = None
                                with self.lock:
                                    self.mails.append((rcpt, body))
                                conn.shutdown(socket.SHUT_RDWR)
                                raise OSError("dropped")
                            if key:
                                self.refused_data.add(key)
                                out.append(b"451 4.3.0 try again later\r\n")
                            else:
                                with self.lock:
                                    self.mails.append((rcpt, body))
                                out.append(b"250 2.0.0 Ok: queued as R%d\r\n" % len(self.mails))
                            data = []
                        else:
                            data.append(line[1:] if line.startswith(b".") else line)
                        continue
                    cmd = line[:4].upper()
                    if cmd == b"EHLO":
                        out.append(b"250-rec\r\n" + (b"250-PIPELINING\r\n" if self.pipelining else b"")
                                   + b"250 8BITMIME\r\n")
                    elif cmd == b"MAIL":
                        rcpt = None
                        out.append(b"250 2.1.0 Ok\r\n")
                    elif cmd == b"RCPT":
                        addr = line[8:].strip(b"<> ").decode().lower()
                        if addr in self.refuse_rcpt:
                            out.append(b"550 5.1.1 <%s>: no such user\r\n" % addr.encode())
                        else:
                            rcpt = addr
                            out.append(b"250 2.1.5 Ok\r\n")
                    elif cmd == b"DATA":
                        if rcpt is None:
                            out.append(b"554 5.5.1 no valid recipients\r\n")
                        else:
                            in_data = True
                            out.append(b"354 go ahead\r\n")
                    elif cmd == b"RSET":
                        rcpt = None
                        out.append(b"250 2.0.0 Ok\r\n")
                    elif cmd == b"QUIT":
                        out.append(b"221 bye\r\n")
                    else:
                        out.append(b"502 5.5.2 what?\r\n")
                # a pipelining server answers a group at once (RFC 2920 3.1)
                if out:
                    conn.sendall(b"".join(out))
                    out = []
        except OSError:
            pass
        conn.close()

    def mails_to(self, address):
        with self.lock:
            return [m for m in self.mails if m[0] == address.lower()]

    def stop(self):
        self.stopping = True
        self.thread.join()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.sock.close()


def channel(db, uniq, port, suffix=""):
    name = f"ch_{uniq}{suffix}"
    db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off', name => %s)",
               (f"smtp://127.0.0.1:{port}", name))
    return name


def statuses(db, etype):
    return dict(db.execute("SELECT status, count(*) FROM notify.message WHERE event_type = %s "
                           "GROUP BY status", (etype,)).fetchall())


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-at-a-time"])
def test_chain_of_messages_with_refusals_in_the_middle(db, uniq, pipelining):
    """40 messages in one transaction over a server that records its reads.
    Three recipients are refused at RCPT TO (550: failed, nothing sent),
    one message's final dot gets 451 once (retried, then sent); every other
    arrives once, byte for byte what the log says was sent.  With
    PIPELINING, one read holds a message's final dot and the next
    message's MAIL FROM, RCPT TO and DATA (one round trip per message);
    without it, no read holds two commands."""
    n = 40
    refused = {f"r{i}_{uniq}@example.com" for i in (5, 17, 33)}
    server = RecordingSmtp(pipelining=pipelining, refuse_rcpt=refused, refuse_data={f"body 12 {uniq}"})
    try:
        ch = channel(db, uniq, server.port)
        etype = f"pipe.{uniq}"
        db.execute("SELECT notify.set_template(%s, 'pipe {{row.n}}', %s)",
                   (f"tpl_{uniq}", "body {{row.n}} " + uniq + "\n.\n..leading dots stay\n"))
        db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'], channel => %s)",
                   (f"rule_{uniq}", etype, f"tpl_{uniq}", ch))
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g, 'to', 'r' || g || '_' || %s || '@example.com')) "
                   "FROM generate_series(1, %s) g", (etype, uniq, n))
        st = wait_until(lambda: (s := statuses(db, etype)) and s.get("sent", 0) == n - 3
                        and s.get("failed", 0) == 3 and s, timeout=30, what="every message settled")
        chunks = list(server.chunks)
        mails = list(server.mails)
        retried = db.execute("SELECT m.attempts, array_agg(a.outcome ORDER BY a.id) FROM notify.message m "
                             "JOIN notify.attempt a ON a.message_id = m.id "
                             "WHERE m.event_type = %s AND m.attempts > 1 GROUP BY m.id", (etype,)).fetchall()
        failed = db.execute("SELECT address, last_error FROM notify.message WHERE event_type = %s "
                            "AND status = 'failed' ORDER BY address", (etype,)).fetchall()
        responses = db.execute("SELECT count(DISTINCT smtp_response) FROM notify.message "
                               "WHERE event_type = %s AND status = 'sent'", (etype,)).fetchone()[0]
    finally:
        server.stop()

    both = [c for _, c in chunks if re.search(rb"\r\n\.\r\nMAIL FROM:<[^>]*>\r\nRCPT TO:<[^>]*>\r\nDATA\r\n$", c)]
    multi = [c for _, c in chunks if len(re.findall(rb"^(MAIL|RCPT|DATA|RSET)", c, re.M)) > 1]
    print(f"[{'pipelining' if pipelining else 'one at a time'}] {st}; {server.sessions} sessions, "
          f"{len(chunks)} reads, {len(both)} held a final dot and the next envelope, "
          f"{len(multi)} held several commands; retried {retried}; failed {failed[0]}")
    assert len(mails) == n - 3
    got = sorted(int(re.search(rb"body (\d+) ", d).group(1)) for _, d in mails)
    assert got == sorted(set(range(1, n + 1)) - {5, 17, 33}), got
    # the data arrives as it was rendered: the lone dot and the leading dots are unstuffed back
    assert all(b"\r\n.\r\n..leading dots stay" in d for _, d in mails)
    assert {a for a, _ in failed} == refused
    assert all("550 5.1.1" in e and "RCPT TO" in e for _, e in failed), failed
    assert retried == [(2, ["retry", "sent"])]
    assert responses == n - 3, "each message's own 250 is its logged response"
    if pipelining:
        assert len(both) >= n // 4, "the next message's envelope goes with the data before it"
    else:
        assert not multi, multi[:3]


def test_server_without_pipelining_gets_each_command_apart(db, uniq):
    """aiosmtpd without PIPELINING: every message arrives, in order of
    commands, one at a time (the client waits for each reply)."""
    server = SmtpServer(pipelining=False)
    try:
        ch = channel(db, uniq, server.port)
        to = f"{uniq}@example.com"
        etype = f"nopipe.{uniq}"
        db.execute("SELECT notify.set_template(%s, 'np {{row.n}}', 'body {{row.n}}')", (f"tpl_{uniq}",))
        db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s], channel => %s)",
                   (f"rule_{uniq}", etype, f"tpl_{uniq}", f"email:{to}", ch))
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g)) FROM generate_series(1, 20) g", (etype,))
        mails = server.wait_for(to, count=20, timeout=20)
        time.sleep(0.3)
        mails = server.to(to)
    finally:
        server.stop()
    assert sorted(int(m.subject.split()[1]) for m in mails) == list(range(1, 21))


def test_connection_cut_in_a_chain_settles_both_messages(db, uniq):
    """The server takes message 10's data and cuts the connection before
    its 250, with message 11's envelope already sent behind it (PIPELINING).
    Message 10's outcome is unknown (retried, same Message-ID: the server
    may have it); message 11 waits for its channel like any message whose
    connection failed, without spending an attempt; nothing stays
    'sending' until its lease runs out (a minute): all 30 are settled
    within seconds, 10 delivered twice and every other once."""
    server = RecordingSmtp(pipelining=True, drop_at=f"body 10 {uniq}")
    try:
        ch = channel(db, uniq, server.port)
        etype = f"cut.{uniq}"
        db.execute("SELECT notify.set_template(%s, 'cut {{row.n}}', %s)",
                   (f"tpl_{uniq}", "body {{row.n}} " + uniq + "\n"))
        db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s], channel => %s)",
                   (f"rule_{uniq}", etype, f"tpl_{uniq}", f"email:{uniq}@example.com", ch))
        t0 = time.monotonic()
        db.execute("SELECT notify.emit(%s, jsonb_build_object('n', g)) FROM generate_series(1, 30) g", (etype,))
        wait_until(lambda: statuses(db, etype).get("sent", 0) == 30, timeout=20, interval=0.1,
                   what="all 30 sent, none left 'sending' until its lease ends")
        took = time.monotonic() - t0
        tries = db.execute("SELECT (regexp_match(m.subject, '[0-9]+'))[1]::int, array_agg(a.outcome ORDER BY a.id) "
                           "FROM notify.message m JOIN notify.attempt a ON a.message_id = m.id "
                           "WHERE m.event_type = %s GROUP BY m.id HAVING count(*) > 1", (etype,)).fetchall()
        mails = list(server.mails)
    finally:
        server.stop()
    counts = {}
    for _, body in mails:
        k = int(re.search(rb"body (\d+) ", body).group(1))
        counts[k] = counts.get(k, 0) + 1
    ids = {}
    for _, body in mails:
        if b"body 10 " in body:
            ids.setdefault(re.search(rb"Message-ID: (<[^>]+>)", body).group(1), 0)
    print(f"cut after message 10's data: all 30 sent in {took:.1f} s; tried more than once {tries}; "
          f"received {sorted(counts.items())[:12]}...")
    assert took < 15
    assert counts == {k: (2 if k == 10 else 1) for k in range(1, 31)}, counts
    assert len(ids) == 1, "the retry of message 10 carries the same Message-ID"
    assert (10, ["unknown", "sent"]) in tries
    assert all(k == 10 or outcomes[-1] == "sent" and "unknown" not in outcomes for k, outcomes in tries), tries

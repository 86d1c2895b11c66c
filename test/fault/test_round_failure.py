"""A worker's round fails while an SMTP transfer is in flight.

The transfer waits for a server that has not greeted yet; meanwhile the
worker renews the lease of the message it holds, and a one-shot trigger on
notify.message makes that UPDATE fail: the round's transaction aborts with
the transfer still open.  The worker must give the transfer up (nothing of
it may write into the next round's memory), take the message back, and send
it once when the server answers; the attempt rows must tell exactly that.

Run with NOTIFY_SERVER_PRELOAD=<libasan.so> and an ASan build of the
extension to have AddressSanitizer watch the worker while it happens.
"""
import socket
import threading
import time

from harness import Cluster, SmtpServer, free_port, wait_until


class HoldThenForward:
    """A TCP proxy on 127.0.0.1: while holding, it accepts connections and
    says nothing (an SMTP server that never greets); once released, new
    connections are forwarded to `target_port`.  It closes what it opened."""

    def __init__(self, target_port):
        self.port = free_port()
        self.target_port = target_port
        self.holding = True
        self.held = []
        self.accepted = 0
        self.closed_by_client = 0
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                holding = self.holding
            if holding:
                self.held.append(conn)
                threading.Thread(target=self._watch_held, args=(conn,), daemon=True).start()
            else:
                threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _watch_held(self, conn):
        try:
            conn.settimeout(None)
            if conn.recv(1) == b"":
                with self.lock:
                    self.closed_by_client += 1
        except OSError:
            pass

    def _forward(self, conn):
        up = socket.create_connection(("127.0.0.1", self.target_port))

        def pipe(a, b):
            try:
                while True:
                    data = a.recv(65536)
                    if not data:
                        break
                    b.sendall(data)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        threading.Thread(target=pipe, args=(up, conn), daemon=True).start()
        pipe(conn, up)

    def release(self):
        with self.lock:
            self.holding = False

    def stop(self):
        self.running = False
        self.sock.close()
        for c in self.held:
            c.close()
        self.thread.join(timeout=2)


def test_round_fails_while_a_transfer_is_in_flight():
    smtp = SmtpServer()
    proxy = HoldThenForward(smtp.port)
    cluster = Cluster(dbname="roundfail", settings={
        "notify.workers": "1", "notify.lease": "'6s'", "notify.smtp_timeout": "'40s'",
        "notify.poll_interval": "'1s'", "notify.retry_backoff": "'1s'"})
    try:
        db = cluster.connect()
        db.execute("CREATE EXTENSION notify_ext")
        db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')",
                   (f"smtp://127.0.0.1:{proxy.port}",))
        db.execute("SELECT notify.set_template('t', 'round failure {{row.n}}', 'body')")
        db.execute("SELECT notify.create_rule('r', 'rf', 't', ARRAY['email:once@example.com'])")
        # the one-shot failure: a sequence, so that the rollback does not re-arm it
        db.execute("CREATE SEQUENCE public.fail_once")
        db.execute("""CREATE FUNCTION public.fail_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF pg_catalog.nextval('public.fail_once') = 1 THEN
                    RAISE EXCEPTION 'injected failure while a transfer is in flight';
                END IF;
                RETURN NEW;
            END $$""")
        t0 = db.execute("SELECT now()").fetchone()[0]
        db.execute("SELECT notify.emit('rf', '{\"n\": 1}')")
        # the message is claimed and its transfer waits for the silent server
        wait_until(lambda: db.execute("SELECT status FROM notify.message WHERE event_type = 'rf'")
                   .fetchone() == ("sending",), timeout=20, what="message claimed")
        wait_until(lambda: proxy.accepted >= 1, timeout=10, what="a connection to the silent server")
        # the next UPDATE of notify.message (the lease renewal, 2 s into the transfer) fails
        db.execute("CREATE TRIGGER fail_once BEFORE UPDATE ON notify.message "
                   "FOR EACH ROW EXECUTE FUNCTION public.fail_once()")
        # the connection already open stays silent; the next ones reach the server
        proxy.release()
        wait_until(lambda: "injected failure while a transfer is in flight" in cluster.log(),
                   timeout=20, what="the round's failure")
        t_fail = time.monotonic()
        # the worker gives the transfer up: it closes the connection it held
        wait_until(lambda: proxy.closed_by_client >= 1, timeout=10, what="the abandoned connection closed")
        abandoned_after = time.monotonic() - t_fail
        got = smtp.wait_for("once@example.com", timeout=30)
        time.sleep(2)                                   # any second copy would come now
        got = smtp.to("once@example.com")
        row = db.execute("SELECT id, status, attempts FROM notify.message WHERE event_type = 'rf'").fetchone()
        attempts = db.execute("SELECT started_at, finished_at, outcome, response FROM notify.attempt "
                              "WHERE message_id = %s ORDER BY id", (row[0],)).fetchall()
        t1 = db.execute("SELECT now()").fetchone()[0]
        log = cluster.log()
        print(f"\n[round failure] connection given up {abandoned_after:.1f} s after the failure; "
              f"{len(got)} mail(s) received; message {row}; attempts:")
        for a in attempts:
            print(f"    {a[0]} .. {a[1]} {a[2]}: {a[3]}")
        assert len(got) == 1, "sent more than once"
        assert row[1] == "sent"
        # one attempt taken back (the abandoned transfer), one sent; as many as the counter says
        assert [a[2] for a in attempts] == ["unknown", "sent"], attempts
        assert row[2] == len(attempts)
        assert "taken back" in attempts[0][3]
        for started, finished, _, _ in attempts:
            assert t0 <= started <= finished <= t1, "an attempt row with times from elsewhere"
        assert "terminated by signal" not in log and "PANIC" not in log
        assert "ERROR:  AddressSanitizer" not in log and "AddressSanitizer" not in log
    except BaseException:
        print(cluster.log()[-6000:])
        raise
    finally:
        cluster.destroy()
        proxy.stop()
        smtp.stop()

"""src/imap.c, the bounce mailbox's IMAP transport, against a real Dovecot
(test/lib/mailstack.py): the module is compiled with test/imap_driver.c,
which performs the commands it is given and prints one line per step.
Needs no PostgreSQL.

Besides Dovecot, a few small servers of our own, on 127.0.0.1, stand where
Dovecot cannot show something: a TCP proxy that records what the client
sends (the login must never cross a link without TLS) or slows the server
down (a transfer in progress to abort or time out), a server that accepts
and never speaks, and a scripted IMAP server that misbehaves on purpose.
"""
import base64
import email.utils
import hashlib
import imaplib
import os
import random
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from mailstack import Dovecot, require_binaries
from tls import ThrowawayCA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DRIVER = os.path.join(ROOT, "test", "imap_driver")
SOURCES = [os.path.join(ROOT, "test", "imap_driver.c"), os.path.join(ROOT, "src", "imap.c")]
CFLAGS = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-O1", "-g", "-I" + os.path.join(ROOT, "src")]
SAN_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
PASSWORD = "s3cret-Pa55word"
STEP = re.compile(r"^(\w+) (ok|refused|failed) ms=(\d+)((?: \w+=\S*)*)(?:: (.*))?$")
_out_dirs = []


# -- the driver ----------------------------------------------------------------

def build(output, extra=()):
    subprocess.run(["cc", *CFLAGS, *extra, "-o", output, *SOURCES, "-lcurl"],
                   check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def driver():
    build(DRIVER)
    return DRIVER


@pytest.fixture(scope="module", autouse=True)
def remove_out_dirs():
    yield
    for d in _out_dirs:
        shutil.rmtree(d, ignore_errors=True)


class Step:
    def __init__(self, m):
        self.name, self.status, self.ms = m.group(1), m.group(2), int(m.group(3))
        self.fields = dict(kv.split("=", 1) for kv in m.group(4).split())
        self.error = m.group(5)

    def __repr__(self):
        return f"<{self.name} {self.status} {self.ms}ms {self.fields} {self.error!r}>"


class Run:
    def __init__(self, proc, elapsed, out_dir):
        self.stdout, self.stderr = proc.stdout, proc.stderr
        self.returncode, self.elapsed, self.out_dir = proc.returncode, elapsed, out_dir
        self.steps = []
        for line in proc.stdout.splitlines():
            m = STEP.match(line)
            assert m, f"unparsable driver line {line!r}; stderr: {proc.stderr}"
            self.steps.append(Step(m))

    def step(self, name, index=0):
        return [s for s in self.steps if s.name == name][index]

    def message(self, uid):
        with open(os.path.join(self.out_dir, f"{uid}.eml"), "rb") as f:
            return f.read()


def run_driver(binary, url, *commands, tls="verify", ca=None, user="bounces",
               password=PASSWORD, timeout=30, env=None):
    """Runs one driver session (or urlcheck); returns a Run with its steps."""
    out_dir = tempfile.mkdtemp(prefix="imap_driver_")
    _out_dirs.append(out_dir)
    e = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
         "IMAP_URL": url or "", "IMAP_USER": user, "IMAP_PASSWORD": password,
         "IMAP_TLS": tls, "IMAP_CA_FILE": ca or "", "IMAP_OUT_DIR": out_dir,
         "ASAN_OPTIONS": "detect_leaks=1:abort_on_error=1",
         "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}
    e.update(env or {})
    t = time.monotonic()
    proc = subprocess.run([binary, *commands], env=e, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.monotonic() - t
    assert proc.returncode == 0, f"driver exited {proc.returncode}: {proc.stdout}{proc.stderr}"
    return Run(proc, elapsed, out_dir)


# -- Dovecot -------------------------------------------------------------------

def destroy_fast(dovecot):
    """Dovecot's master, on SIGTERM, waits ~5 s for its processes' stats-writer
    handshakes to time out; these instances are ours and throwaway, so their
    process group (Dovecot(): start_new_session, pgid = our child's pid) gets
    SIGKILL, then destroy() removes the rest."""
    if dovecot.proc is not None and dovecot.proc.poll() is None:
        os.killpg(dovecot.proc.pid, signal.SIGKILL)
        dovecot.proc.wait(5)
    dovecot.destroy()


@pytest.fixture(scope="module")
def dovecot():
    """IMAP with STARTTLS, and IMAPS, with a throwaway CA's certificate."""
    require_binaries()
    d = Dovecot(password=PASSWORD, imaps=True)
    yield d
    destroy_fast(d)


@pytest.fixture(scope="module")
def plain_dovecot():
    """IMAP without TLS at all: no STARTTLS in its capabilities."""
    d = Dovecot(password=PASSWORD, imaps=False)
    yield d
    destroy_fast(d)


@pytest.fixture
def own_dovecot():
    """A Dovecot for one test (a failed login penalises the IP for the next
    logins; a stopped one serves no one)."""
    d = Dovecot(password=PASSWORD, imaps=False)
    yield d
    destroy_fast(d)


def mailbox_with(dovecot, name, messages):
    """Creates mailbox `name` and APPENDs the messages (bytes, CRLF lines);
    returns their UIDs, from APPENDUID."""
    c = dovecot.imap()
    try:
        typ, data = c.create(imap_quote(name))
        assert typ == "OK", data
        uids = []
        for m in messages:
            typ, data = c.append(imap_quote(name), None, None, m)
            assert typ == "OK", data
            uids.append(int(re.search(rb"APPENDUID \d+ (\d+)", data[0]).group(1)))
        return uids
    finally:
        c.logout()


def imap_quote(name):
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def flags_of(dovecot, mailbox):
    """{uid: flags} by imaplib, read-only (EXAMINE)."""
    c = dovecot.imap()
    try:
        assert c.select(imap_quote(mailbox), readonly=True)[0] == "OK"
        typ, data = c.uid("FETCH", "1:*", "(UID FLAGS)")
        assert typ == "OK", data
        out = {}
        for item in data:
            m = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)", item)
            out[int(m.group(1))] = m.group(2).decode().split()
        return out
    finally:
        c.logout()


def uidvalidity_of(dovecot, mailbox):
    c = dovecot.imap()
    try:
        typ, data = c.status(imap_quote(mailbox), "(UIDVALIDITY)")
        return int(re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1))
    finally:
        c.logout()


def url(dovecot, mailbox="", tls=True):
    quoted = "".join(c if c.isalnum() or c in "-._" else "%%%02X" % ord(c) for c in mailbox)
    if tls:
        return f"imaps://127.0.0.1:{dovecot.imaps_port}/{quoted}"
    return f"imap://127.0.0.1:{dovecot.imap_port}/{quoted}"


# -- messages --------------------------------------------------------------------

def simple_message(subject, body="A line.\r\n"):
    return (f"From: ERP <erp@erp.test>\r\nTo: bounces@bounce.test\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{subject}@erp.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}").encode()


def tricky_message():
    """A body that looks like the server's replies: every tag the driver's
    session uses (nx1...) and libcurl's (A001...), untagged FETCH and BYE,
    a lone ')', literal announcements, and 8-bit bytes (UTF-8 and not)."""
    lines = [b")", b"* 1 FETCH (UID 1 BODY[] {5}", b"hello)", b"* BYE fake server shutdown",
             b"+ go ahead", b"{12}", b"a line that ends like a literal {3}", b"* SEARCH 1 2 3"]
    lines += [b"nx%d OK fake tagged reply" % i for i in range(1, 20)]
    lines += [b"A%03d OK fake tagged reply" % i for i in range(1, 6)]
    lines += ["Grüße, ünïcödé, € — 8-bit UTF-8".encode(), b"raw Latin-1: \xe9t\xe9 \xff\xfe", b")"]
    head = simple_message("tricky", "")
    return head + b"\r\n".join(lines) + b"\r\n"


def big_message(size=5 * 1024 * 1024):
    rnd = random.Random(42)
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789 ()*{}"
    line = lambda: "".join(rnd.choice(alphabet) for _ in range(76)).encode()  # noqa: E731
    pool = [line() for _ in range(512)]
    head = simple_message("big", "")
    body, n, i = [], len(head), 0
    while n < size:
        body.append(pool[i % 512])
        n += 78
        i += 1
    return head + b"\r\n".join(body) + b"\r\n"


# -- small servers of our own --------------------------------------------------------

class Proxy:
    """A TCP proxy from 127.0.0.1:.port to 127.0.0.1:target. Records what the
    client sends (.from_client); counts what the server sends (.to_client),
    paced to `rate` bytes/s if given, or passed on in pieces of `chunk`
    bytes 1 ms apart (so that lines and literals arrive cut anywhere)."""

    def __init__(self, target, rate=None, chunk=None):
        self.target, self.rate, self.chunk = target, rate, chunk
        self.from_client = bytearray()
        self.to_client = 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.sockets, self.threads = [], []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._thread(self._accept)

    def _thread(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        self.threads.append(t)
        t.start()

    def _accept(self):
        while not self.stopping.is_set():
            if not select.select([self.listener], [], [], 0.1)[0]:
                continue
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                return
            upstream.settimeout(None)
            self.sockets += [client, upstream]
            self._thread(self._pump, client, upstream, True)
            self._thread(self._pump, upstream, client, False)

    def _pump(self, src, dst, from_client):
        while not self.stopping.is_set():
            try:
                if not select.select([src], [], [], 0.1)[0]:
                    continue
                data = src.recv(16384)
                if not data:
                    break
                with self.lock:
                    if from_client:
                        self.from_client += data
                    else:
                        self.to_client += len(data)
                if self.chunk and not from_client:
                    for i in range(0, len(data), self.chunk):
                        dst.sendall(data[i:i + self.chunk])
                        time.sleep(0.001)
                else:
                    dst.sendall(data)
            except (OSError, ValueError):
                break
            if self.rate and not from_client:
                time.sleep(len(data) / self.rate)
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.stopping.set()
        self.listener.close()
        for t in self.threads:
            t.join(5)
        for s in self.sockets:
            s.close()


class SilentServer:
    """Accepts connections and never says a word."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=8)
        self.port = self.listener.getsockname()[1]
        self.conns = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while not self.stopping.is_set():
            if select.select([self.listener], [], [], 0.1)[0]:
                try:
                    self.conns.append(self.listener.accept()[0])
                except OSError:
                    return

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()
        for c in self.conns:
            c.close()


class ScriptedImap:
    """An IMAP server that logs in anyone (AUTHENTICATE PLAIN, SASL-IR) and
    answers every other command with `script(tag, command)` -> bytes.
    `login(password)` -> bytes answers AUTHENTICATE instead, when given."""

    def __init__(self, script=None, login=None):
        self.script, self.login = script, login
        self.commands = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping.is_set():
            if not select.select([self.listener], [], [], 0.1)[0]:
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(10)
            try:
                self._session(conn.makefile("rwb"))
            except (OSError, ValueError):
                pass
            finally:
                conn.close()

    def _session(self, f):
        caps = b"IMAP4rev1 SASL-IR AUTH=PLAIN"
        f.write(b"* OK [CAPABILITY " + caps + b"] scripted server ready\r\n")
        f.flush()
        for line in f:
            tag, _, command = line.rstrip(b"\r\n").partition(b" ")
            verb = command.split(b" ")[0].upper()
            self.commands.append(command if verb != b"AUTHENTICATE" else b"AUTHENTICATE")
            if verb == b"CAPABILITY":
                reply = b"* CAPABILITY " + caps + b"\r\n" + tag + b" OK done\r\n"
            elif verb == b"AUTHENTICATE":
                password = base64.b64decode(command.split(b" ")[2]).split(b"\0")[2]
                reply = self.login(tag, password) if self.login else tag + b" OK logged in\r\n"
            elif verb == b"LOGOUT":
                reply = b"* BYE see you\r\n" + tag + b" OK bye\r\n"
            else:
                reply = self.script(tag, command)
            f.write(reply)
            f.flush()
            if verb == b"LOGOUT":
                return

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


@pytest.fixture
def servers():
    """Closes whatever small servers the test opened."""
    opened = []
    yield opened
    for s in opened:
        s.close()


# -- the tests ---------------------------------------------------------------------------

def test_url_validation(driver):
    cases = {
        "imap://127.0.0.1:143/INBOX": None,
        "imaps://mail.example.com": None,
        "IMAPS://mail.example.com:993/": None,
        "imap://[::1]:1143/Bounces%20Box": None,
        "imap://mail.example.com/INBOX/bounces": None,
        "smtp://mail.example.com/": "only imap:// and imaps://",
        "https://mail.example.com/": "only imap:// and imaps://",
        "imap:///INBOX": "no host",
        "imap://": "no host",
        "imap://bounces:pw@mail.example.com/": "user name or password",
        "imap://mail.example.com/INBOX;UIDVALIDITY=5": ";parameters",
        "imap://mail.example.com/INBOX?UNSEEN": "query",
        "imap://mail.example.com:0/": "port",
        "imap://mail.example.com:70000/": "port",
        "imap://mail.example.com:12a/": "unexpected character",
        "imap://mail.example.com/IN BOX": "percent-encoded",
        "imap://mail.example.com/IN%0D%0ABOX": "printable ASCII",
        "imap://mail.example.com/%C3%A9": "printable ASCII",
        "imap://mail.example.com/%zz": "percent-encoding",
        "": "no URL",
    }
    run = subprocess.run([driver, "urlcheck", *cases], capture_output=True, text=True, timeout=10)
    lines = run.stdout.splitlines()
    assert len(lines) == len(cases), run.stdout
    for (u, expected), line in zip(cases.items(), lines):
        if expected is None:
            assert line == "url ok", (u, line)
        else:
            assert line.startswith("url refused: url: ") and expected in line, (u, line)


def test_tls_settings_refused(driver):
    run = run_driver(driver, "imaps://127.0.0.1:1/", "search", tls="off")
    assert run.step("open").error == ("tls setting: tls 'off' cannot be used with an imaps:// URL "
                                      "(use 'verify' or 'require')")
    run = run_driver(driver, "imap://127.0.0.1:1/", "search", tls="none")
    assert run.step("open").error == ("tls setting: unknown tls mode (use 'verify', 'require', "
                                      "'try' or 'off')")


def test_fetch_is_byte_exact_and_leaves_messages_unseen(driver, dovecot):
    mailbox = "Bounces 2024"          # a space: percent-encoded in the URL
    messages = [simple_message("one"), tricky_message(), big_message()]
    uids = mailbox_with(dovecot, mailbox, messages)
    run = run_driver(driver, url(dovecot, mailbox), "fetchall", ca=dovecot.ca.ca_cert)

    assert run.step("open").status == "ok", run.stdout
    assert int(run.step("open").fields["uidvalidity"]) == uidvalidity_of(dovecot, mailbox)
    assert run.step("search").fields["uids"] == ",".join(map(str, uids))
    for uid, sent in zip(uids, messages):
        got = run.message(uid)
        assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest(), \
            f"uid {uid}: {len(got)} bytes fetched, {len(sent)} appended"
    assert [s.status for s in run.steps] == ["ok"] * (3 + len(uids))
    big = [s for s in run.steps if s.name == "fetch"][2]
    assert int(big.fields["len"]) == len(messages[2]) > 5 * 1024 * 1024
    print(f"\n  fetchall of {len(uids)} messages (5 MB one: {big.ms} ms), "
          f"driver run {run.elapsed:.2f} s")

    # BODY.PEEK[]: fetching did not set \Seen
    flags = flags_of(dovecot, mailbox)
    assert all("\\Seen" not in flags[u] for u in uids), flags
    again = run_driver(driver, url(dovecot, mailbox), "search", ca=dovecot.ca.ca_cert)
    assert again.step("search").fields["uids"] == ",".join(map(str, uids))


def test_replies_cut_anywhere(driver, dovecot, servers):
    """The server's bytes arriving 5 at a time: lines, literal announcements
    and literals split across reads."""
    mailbox = "chunked"
    messages = [tricky_message(), simple_message("chunked")]
    uids = mailbox_with(dovecot, mailbox, messages)
    proxy = Proxy(dovecot.imap_port, chunk=5)
    servers.append(proxy)
    run = run_driver(driver, f"imap://127.0.0.1:{proxy.port}/{mailbox}", "fetchall", tls="off")
    assert [s.status for s in run.steps] == ["ok"] * 5, run.stdout
    assert [run.message(u) for u in uids] == messages


def test_lmtp_delivered_message(driver, dovecot):
    """A message delivered the way Postfix delivers bounces (LMTP): Dovecot
    prepends Return-Path and Delivered-To, the rest is what was sent."""
    data = simple_message("via-lmtp", "Delivered over LMTP.\r\n")
    with smtplib.LMTP("127.0.0.1", dovecot.lmtp_port, timeout=10) as lmtp:
        lmtp.sendmail("postmaster@mx.test", ["bounces+m7.tok@bounce.test"], data)
    run = run_driver(driver, url(dovecot, tls=False), "fetchall", ca=dovecot.ca.ca_cert)
    uids = run.step("search").fields["uids"].split(",")
    got = [run.message(u) for u in uids]
    mine = [m for m in got if m.endswith(data)]
    assert len(mine) == 1, got
    assert b"Delivered-To: bounces+m7.tok@bounce.test\r\n" in mine[0]


def test_mark_seen(driver, dovecot):
    mailbox = "seen"
    uids = mailbox_with(dovecot, mailbox, [simple_message(f"seen{i}") for i in range(3)])
    run = run_driver(driver, url(dovecot, mailbox), "seen", str(uids[1]), "seen", str(uids[1]),
                     "seen", "999", "fetch", "999", "search", ca=dovecot.ca.ca_cert)
    seen = [s for s in run.steps if s.name == "seen"]
    assert [s.status for s in seen] == ["ok", "ok", "refused"], run.stdout
    assert seen[2].error == "store: no message with UID 999 (expunged, or never there)"
    assert run.step("fetch").status == "refused"
    assert run.step("fetch").error == "fetch: no message with UID 999 (expunged, or never there)"
    assert run.step("search").fields["uids"] == f"{uids[0]},{uids[2]}"
    flags = flags_of(dovecot, mailbox)
    assert "\\Seen" in flags[uids[1]] and "\\Seen" not in flags[uids[0]], flags


def test_size_cap_refuses_that_message_only(driver, dovecot, servers):
    mailbox = "sizecap"
    small, big = simple_message("small"), big_message()
    uids = mailbox_with(dovecot, mailbox, [big, small])
    proxy = Proxy(dovecot.imap_port)          # counts the bytes the server sends
    servers.append(proxy)
    run = run_driver(driver, f"imap://127.0.0.1:{proxy.port}/{mailbox}", "fetch", str(uids[0]),
                     "fetch", str(uids[1]), ca=dovecot.ca.ca_cert,
                     env={"IMAP_MAX_MESSAGE_BYTES": str(1024 * 1024)})
    first, second = run.step("fetch", 0), run.step("fetch", 1)
    assert first.status == "refused", run.stdout
    assert first.error == (f"fetch: message UID {uids[0]} is {len(big)} bytes, "
                           f"over the limit of 1048576")
    assert second.status == "ok" and run.message(uids[1]) == small, run.stdout
    # the partial fetch stopped the transfer at the limit + 1 (the rest is TLS and replies)
    assert 1024 * 1024 < proxy.to_client < 1024 * 1024 + 20000, proxy.to_client


def test_session_outlives_connect_timeout(driver, dovecot):
    """The connect timeout bounds the login only: libcurl's timers do not
    reach the commands of a session that stays open longer."""
    run = run_driver(driver, url(dovecot), "search", "sleep", "700", "search",
                     ca=dovecot.ca.ca_cert, env={"IMAP_CONNECT_TIMEOUT_MS": "300"})
    assert [s.status for s in run.steps] == ["ok", "ok", "ok", "ok"], run.stdout


def test_select_of_missing_mailbox(driver, dovecot):
    run = run_driver(driver, url(dovecot, "NoSuchBox"), "search", ca=dovecot.ca.ca_cert)
    assert run.step("open").status == "failed"
    assert run.step("open").error.startswith("select: server said: NO Mailbox doesn't exist: NoSuchBox")


def test_starttls_verified_on_imap_url(driver, dovecot):
    before = dovecot.log().count("TLS, session=")
    run = run_driver(driver, url(dovecot, tls=False), "search", ca=dovecot.ca.ca_cert)
    assert run.step("open").status == "ok", run.stdout
    assert dovecot.log().count("TLS, session=") == before + 1   # Dovecot saw the login over TLS


def test_untrusted_ca_is_refused(driver, dovecot):
    other = ThrowawayCA()
    try:
        for u in (url(dovecot), url(dovecot, tls=False)):
            run = run_driver(driver, u, "search", ca=other.ca_cert)
            err = run.step("open").error
            assert run.step("open").status == "failed"
            assert err.startswith("TLS: SSL certificate problem: unable to get local issuer"), err
        # tls=require takes any certificate
        run = run_driver(driver, url(dovecot), "search", tls="require", ca=other.ca_cert)
        assert run.step("open").status == "ok", run.stdout
    finally:
        shutil.rmtree(other.dir, ignore_errors=True)


def test_no_starttls_no_login(driver, plain_dovecot, servers):
    """tls=verify or require against an imap:// server without STARTTLS:
    refused after CAPABILITY, the credentials never sent (the proxy records
    every byte the client sends). tls=off through the same proxy does log in:
    the recording sees a login when there is one."""
    proxy = Proxy(plain_dovecot.imap_port)
    servers.append(proxy)
    u = f"imap://127.0.0.1:{proxy.port}/"
    secrets = [PASSWORD.encode(), base64.b64encode(b"\0bounces\0" + PASSWORD.encode())]
    for tls in ("verify", "require"):
        with proxy.lock:
            proxy.from_client.clear()
        run = run_driver(driver, u, "search", tls=tls)
        assert run.step("open").status == "failed"
        assert run.step("open").error == (
            "TLS: the server does not offer STARTTLS, and this tls mode does not log in "
            "without TLS: nothing was sent after CAPABILITY")
        sent = bytes(proxy.from_client)
        assert re.fullmatch(rb"A\d{3} CAPABILITY\r\n", sent), sent
        assert not any(s in sent for s in secrets)
    with proxy.lock:
        proxy.from_client.clear()
    run = run_driver(driver, u, "search", tls="off")
    assert run.step("search").status == "ok", run.stdout
    assert b"AUTHENTICATE PLAIN " + secrets[1] in bytes(proxy.from_client)


def test_wrong_password(driver, own_dovecot):
    wrong = "Wr0ng-pa55-7f3a9c"
    run = run_driver(driver, url(own_dovecot, tls=False), "search", tls="off", password=wrong)
    step = run.step("open")
    assert step.status == "failed"
    assert step.error == ("login: Login denied; server said: NO [AUTHENTICATIONFAILED] "
                          "Authentication failed.")
    assert wrong not in run.stdout + run.stderr
    assert wrong not in own_dovecot.log()
    print(f"\n  refused login: {step.ms} ms (Dovecot's auth_failure_delay)")


def test_password_echoed_by_server_is_hidden(driver, servers):
    server = ScriptedImap(login=lambda tag, pw: tag + b" NO [AUTHENTICATIONFAILED] password "
                          + pw + b" is wrong, and so is " + pw[:4] + b"\r\n")
    servers.append(server)
    run = run_driver(driver, f"imap://127.0.0.1:{server.port}/", "search", tls="off")
    assert run.step("open").error == ("login: Login denied; server said: NO [AUTHENTICATIONFAILED] "
                                      f"password *** is wrong, and so is {PASSWORD[:4]}")
    assert PASSWORD not in run.stdout + run.stderr


def test_stopped_dovecot_is_a_connect_error(driver, own_dovecot):
    u = url(own_dovecot, tls=False)
    assert run_driver(driver, u, "search", tls="off").step("search").status == "ok"
    destroy_fast(own_dovecot)
    run = run_driver(driver, u, "search", tls="off", env={"IMAP_CONNECT_TIMEOUT_MS": "2000"})
    step = run.step("open")
    assert step.status == "failed"
    assert step.error.startswith("connect: Failed to connect to 127.0.0.1 port"), step.error
    assert step.ms < 2000


def test_silent_server_times_out_in_connect_timeout(driver, servers):
    silent = SilentServer()
    servers.append(silent)
    for scheme, step_name in (("imap", "greeting"), ("imaps", "TLS")):
        run = run_driver(driver, f"{scheme}://127.0.0.1:{silent.port}/", "search",
                         tls="off" if scheme == "imap" else "verify",
                         env={"IMAP_CONNECT_TIMEOUT_MS": "800"})
        step = run.step("open")
        assert step.error == f"{step_name}: timed out after 800 ms (the connect timeout)"
        assert 750 <= step.ms < 1500, step


def test_abort_during_login(driver, servers):
    silent = SilentServer()
    servers.append(silent)
    run = run_driver(driver, f"imaps://127.0.0.1:{silent.port}/", "search",
                     env={"IMAP_ABORT_AFTER_MS": "300"})
    step = run.step("open")
    assert step.error == "TLS: aborted"
    assert step.ms < 700, step          # polled every 100 ms, not libcurl's once a second


def test_abort_and_timeout_during_fetch(driver, dovecot, servers):
    """A 5 MB fetch through a link paced to 1 MB/s (~5 s): the abort callback
    stops it within a poll slice; a 500 ms command timeout stops it too."""
    mailbox = "slow"
    big = big_message()
    [uid] = mailbox_with(dovecot, mailbox, [big])
    slow = Proxy(dovecot.imap_port, rate=1024 * 1024)
    servers.append(slow)
    u = f"imap://127.0.0.1:{slow.port}/{mailbox}"

    run = run_driver(driver, u, "fetch", str(uid), ca=dovecot.ca.ca_cert,
                     env={"IMAP_ABORT_AFTER_MS": "1000"})
    step = run.step("fetch")
    assert step.status == "failed" and step.error == "fetch: aborted", run.stdout
    close = run.step("close")
    assert 1000 <= int(close.fields["total"]) < 1400, run.stdout
    assert close.ms < 100
    assert slow.to_client < len(big) // 2

    run = run_driver(driver, u, "fetch", str(uid), "search", ca=dovecot.ca.ca_cert,
                     env={"IMAP_TIMEOUT_MS": "500"})
    step = run.step("fetch")
    assert step.status == "failed", run.stdout
    assert step.error == "fetch: timed out after 500 ms waiting for the server"
    assert 500 <= step.ms < 800
    assert [s.name for s in run.steps] == ["open", "fetch", "close"]   # no command after a failure


def test_hostile_server_replies(driver, servers):
    """Replies Dovecot would not send: another message's FETCH with a body
    before ours (skipped), and a literal announced far over the size limit
    (the session gives up instead of reading it)."""
    body = b"Subject: x\r\n\r\nnx2 OK not the end (this fetch's own tag)\r\n"

    def script(tag, command):
        if command.startswith(b"SELECT"):
            return (b"* 3 EXISTS\r\n* OK [UIDVALIDITY 42] UIDs valid\r\n" + tag
                    + b" OK [READ-WRITE] selected\r\n")
        if command.startswith(b"UID FETCH 7 "):
            return (b"* 1 FETCH (UID 3 FLAGS (\\Seen) BODY[]<0> {5}\r\n))))))\r\n"
                    b"* 2 FETCH (UID 7 RFC822.SIZE %d BODY[]<0> {%d}\r\n" % (len(body), len(body))
                    + body + b" FLAGS ())\r\n" + tag + b" OK done\r\n")
        if command.startswith(b"UID FETCH 8 "):
            return b"* 3 FETCH (UID 8 BODY[]<0> {99999999999}\r\n"
        return tag + b" BAD unexpected\r\n"

    server = ScriptedImap(script)
    servers.append(server)
    run = run_driver(driver, f"imap://127.0.0.1:{server.port}/", "fetch", "7", "fetch", "8",
                     "search", tls="off")
    assert run.step("open").fields["uidvalidity"] == "42"
    assert run.step("fetch", 0).status == "ok" and run.message(7) == body, run.stdout
    assert run.step("fetch", 1).status == "failed"
    assert run.step("fetch", 1).error == ("fetch: the server announced a 99999999999-byte "
                                          "literal, over the limit of 10485761")
    assert [s.name for s in run.steps] == ["open", "fetch", "fetch", "close"]
    assert server.commands[-1].startswith(b"UID FETCH 8 ")     # no LOGOUT into a broken session


def test_asan_session(dovecot, tmp_path):
    """The driver under AddressSanitizer and UBSan (leaks too): a session
    with every command, a refused message, and a failed login."""
    binary = str(tmp_path / "imap_driver_asan")
    build(binary, SAN_FLAGS)
    mailbox = "asan"
    tricky = tricky_message()
    uids = mailbox_with(dovecot, mailbox, [tricky, big_message(), simple_message("a")])
    run = run_driver(binary, url(dovecot, mailbox), "fetchall", "seen", str(uids[0]), "seen", "999",
                     "search", ca=dovecot.ca.ca_cert, timeout=60,
                     env={"IMAP_MAX_MESSAGE_BYTES": str(1024 * 1024)})
    assert [s.status for s in run.steps] == ["ok", "ok", "ok", "refused", "ok", "ok", "refused",
                                             "ok", "ok"], run.stdout + run.stderr
    assert run.message(uids[0]) == tricky
    run = run_driver(binary, url(dovecot, mailbox, tls=False), "search", ca=dovecot.ca.ca_cert,
                     password="wrong")
    assert run.step("open").error.startswith("login: Login denied")
    run = subprocess.run([binary, "urlcheck", "imap://h/%", "imap://[::1", "imap://h:99999999999/"],
                         capture_output=True, text=True, timeout=20)
    assert run.returncode == 0 and run.stdout.count("url refused") == 3, run.stdout + run.stderr

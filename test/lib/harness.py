"""Real parts for notify_ext's end-to-end tests: a throwaway PostgreSQL
cluster with the extension preloaded, and a real SMTP server (aiosmtpd)
that records the bytes it receives.

Everything listens on 127.0.0.1 or a Unix socket in a private directory,
and every process started here is stopped here.
"""
import asyncio
import email
import email.policy
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import psycopg
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPProtocol

PG_BIN = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                        check=True).stdout.strip()


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user(cmd):
    """PostgreSQL refuses to run as root: run its tools as `postgres` then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + cmd
    return cmd


class Cluster:
    """A PostgreSQL cluster in a temporary directory, owned by this test run."""

    def __init__(self, dbname="erp", settings=None):
        self.dbname = dbname
        self.dir = tempfile.mkdtemp(prefix="notify_ext_pg_")
        self.data = os.path.join(self.dir, "data")
        self.sock = self.dir
        self.port = free_port()
        self.logfile = os.path.join(self.dir, "server.log")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o755)
        subprocess.run(_as_pg_user([os.path.join(PG_BIN, "initdb"), "-D", self.data,
                                    "-U", "postgres", "--auth=trust", "-E", "UTF8",
                                    "--locale=C.UTF-8", "--no-sync"]),
                       check=True, capture_output=True)
        conf = {
            "listen_addresses": "''",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.sock}'",
            "shared_preload_libraries": "'notify_ext'",
            "fsync": "off",
            # "log" would hide ERRORs (LOG ranks above ERROR there); NOTIFY_LOG_MIN_MESSAGES=debug1
            # shows the workers coming and going
            "log_min_messages": os.environ.get("NOTIFY_LOG_MIN_MESSAGES", "warning"),
            "log_line_prefix": "'%m [%p] %b '",
        }
        conf.update(settings or {})
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            for k, v in conf.items():
                f.write(f"{k} = {v}\n")
        self.start()
        # notify.database is left at '*': the launcher serves whatever database
        # creates the extension, with no restart
        if dbname != "postgres":
            with self.connect("postgres") as conn:
                conn.execute(f'CREATE DATABASE "{dbname}"')

    def pg_ctl(self, *args, check=True):
        # NOTIFY_SERVER_WRAPPER: an executable run as the server instead of postgres
        # (e.g. a script that runs postgres under valgrind), for debugging the extension
        wrapper = os.environ.get("NOTIFY_SERVER_WRAPPER")
        return subprocess.run(_as_pg_user([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data,
                                           "-l", self.logfile, "-w", "-t", "120"]
                                          + (["-p", wrapper] if wrapper else []) + list(args)),
                              check=check, capture_output=True, text=True, env=self._server_env())

    @staticmethod
    def _server_env():
        """The server's environment; NOTIFY_SERVER_PRELOAD runs it under a
        sanitizer runtime (e.g. libasan) for debugging the extension."""
        env = dict(os.environ)
        if env.get("NOTIFY_SERVER_PRELOAD"):
            env["LD_PRELOAD"] = env["NOTIFY_SERVER_PRELOAD"]
        return env

    def start(self):
        self.pg_ctl("start")

    def stop(self, mode="fast"):
        self.pg_ctl("stop", "-m", mode, check=False)

    def restart(self):
        self.pg_ctl("restart", "-m", "fast")

    def reload(self):
        self.pg_ctl("reload")

    def connect(self, dbname=None, autocommit=True, **kw):
        return psycopg.connect(host=self.sock, port=self.port, user="postgres",
                               dbname=dbname or self.dbname, autocommit=autocommit, **kw)

    def log(self):
        with open(self.logfile, errors="replace") as f:
            return f.read()

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class ReceivedMail:
    def __init__(self, mail_from, rcpt_tos, data, peer):
        self.mail_from = mail_from
        self.rcpt_tos = list(rcpt_tos)
        self.data = data                    # the exact bytes after DATA
        self.peer = peer                    # (host, port) of the client connection
        self.received_at = time.monotonic()
        self.wall_time = time.time()
        self.message = email.message_from_bytes(data, policy=email.policy.default)

    @property
    def subject(self):
        return str(self.message["Subject"])

    def part(self, content_type):
        for p in self.message.walk():
            if p.get_content_type() == content_type:
                return p.get_content()
        return None


class _Recorder:
    def __init__(self, server):
        self.server = server

    async def handle_EHLO(self, smtp, session, envelope, hostname, responses):
        # offers PIPELINING (RFC 2920) as Postfix does, unless the server is
        # made without it; aiosmtpd reads pipelined commands in order anyway
        session.host_name = hostname
        if getattr(self.server, "pipelining", True):
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        code = self.server.rcpt_replies.get(address.lower())
        if code:
            return code
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, smtp, session, envelope):
        server = self.server
        mail = ReceivedMail(envelope.mail_from, envelope.rcpt_tos, envelope.original_content,
                            session.peer)
        delay = server.data_delay(mail) if server.data_delay else 0
        with server.cond:
            server.in_data += 1
            server.max_in_data = max(server.max_in_data, server.in_data)
        try:
            if delay:
                await asyncio.sleep(delay)
        finally:
            with server.cond:
                server.in_data -= 1
        # the message is the server's once it has it, whether or not the
        # client is still there to hear the 250 (as with a real server)
        server._add(mail)
        return "250 2.0.0 Ok: queued"


class SmtpServer:
    """aiosmtpd on 127.0.0.1: keeps every message received, by envelope
    recipient.  It offers PIPELINING, as Postfix does (pipelining=False:
    not, and the client must wait for each reply)."""

    def __init__(self, pipelining=True):
        self.pipelining = pipelining
        self.port = free_port()
        self.mails = []
        self.rcpt_replies = {}              # address -> reply, to make the server refuse
        self.data_delay = None              # mail -> seconds to wait before the 250 after DATA
        self.in_data = 0                    # DATA phases in progress right now
        self.max_in_data = 0                # the most seen at once
        self.cond = threading.Condition()
        self.controller = Controller(_Recorder(self), hostname="127.0.0.1", port=self.port,
                                     decode_data=False, data_size_limit=50 * 1024 * 1024)
        self.controller.start()

    def _add(self, mail):
        with self.cond:
            self.mails.append(mail)
            self.cond.notify_all()

    def to(self, address):
        address = address.lower()
        with self.cond:
            return [m for m in self.mails if address in [r.lower() for r in m.rcpt_tos]]

    def wait_for(self, address, count=1, timeout=15):
        """The mails to `address`, once there are `count` of them; fails after timeout."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [m for m in self.mails if address.lower() in [r.lower() for r in m.rcpt_tos]]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} mail(s) to {address} within {timeout}s, "
                                         f"got {len(got)}")
                self.cond.wait(left)

    def stop(self):
        self.controller.stop()


def wait_until(predicate, timeout=15, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def set_guc(cluster, db, name, value):
    """ALTER SYSTEM SET name = value (RESET when None), reload, and give the
    workers a moment to read the file at their next wake-up."""
    from psycopg import sql
    if value is None:
        db.execute(sql.SQL("ALTER SYSTEM RESET {}").format(sql.Identifier(name)))
    else:
        db.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.Identifier(name), sql.Literal(str(value))))
    cluster.reload()
    time.sleep(1.0)

"""A real mail path for notify_ext's end-to-end tests: a Postfix relay, the
final SMTP server it relays to (aiosmtpd), and a Dovecot that receives the
non-delivery reports (DSNs) Postfix itself generates.

    client --SMTP--> Postfix 127.0.0.1:<postfix.port> --SMTP--> FinalSmtp 127.0.0.1:<final.port>
                        |  (the final server refuses some recipients after
                        |   Postfix has accepted the mail: Postfix bounces)
                        +--LMTP--> Dovecot 127.0.0.1:<lmtp_port> --> Maildir <-- IMAP(S) (imaplib)

Everything listens on 127.0.0.1 on free ports, lives in a private temporary
directory, and every process started here is stopped here, by its pid /
process group (Postfix's master and Dovecot's master each lead a process
group of their own children; nothing else is ever signalled).

Usage
-----
    with MailStack() as ms:                      # final server + Dovecot + Postfix
        ms.send("bounces+m42.tok@bounce.test", ["nobody@dest.test"], raw_bytes)
        dsn = ms.dovecot.wait_for_messages(1)[0]  # ImapMessage: .message, .raw, .flags
        ms.postfix.stop(); ms.postfix.start()     # a relay outage

or separately: FinalSmtp(refuse=...), Dovecot(user, password, imaps=True),
Postfix(final.port, dovecot=dovecot, queue_run_delay=1, ...). The pytest
fixture `mail_stack` (import it into a test module) gives one MailStack per
module.

Final server rules (FinalSmtp.DEFAULT_REFUSE, by local-part prefix):
  nobody*  -> 550 5.1.1 <addr>: Recipient address rejected: User unknown
  later*   -> 450 4.2.1 <addr>: Recipient address rejected: Mailbox busy, try again later
Postfix accepted the mail before, so it generates the DSN itself: at once for
the 550, after maximal_queue_lifetime for the 450 (0 = after the first try).

Plus-addressing (VERP-style bounce addresses), as set up here; the same lines
serve a production set-up where the bounce domain's mail is handed by Postfix
to Dovecot over LMTP:

  Postfix main.cf
    recipient_delimiter     = +
    virtual_mailbox_domains = bounce.example.com
    virtual_mailbox_maps    = texthash:/etc/postfix/vmailbox   # or hash: + postmap
        # /etc/postfix/vmailbox holds one line:  bounces@bounce.example.com  OK
        # the lookup of bounces+m42.abcd@bounce.example.com falls back to
        # bounces@bounce.example.com because of recipient_delimiter
    virtual_transport       = lmtp:inet:127.0.0.1:24        # Dovecot's LMTP listener
  (or virtual_transport = lmtp:unix:private/dovecot-lmtp with Dovecot's
   unix_listener in Postfix's queue directory). Postfix hands the full
   address (bounces+m42.abcd@bounce.example.com) to LMTP in RCPT TO.

  Dovecot
    recipient_delimiter  = +      # LMTP strips "+detail" before the user lookup
    auth_username_format = %Ln    # user "bounces" (lower-cased, domain dropped),
                                  # the same name the IMAP login uses
    lmtp_save_to_detail_mailbox = no   # (default) every detail lands in INBOX
    service lmtp { inet_listener lmtp { address = 127.0.0.1  port = 24 } }
  The delivered message keeps the full address in its Delivered-To header and,
  for a Postfix DSN, in To: so the detail (m42.abcd) can be read back.

Pitfalls found (Debian 12: Postfix 3.7, Dovecot 2.3.19)
  * `postfix -c DIR start` as root needs no alternate_config_directories and
    not even a /etc/postfix/main.cf (the Debian package with "No
    configuration" leaves none); that check (mail_conf_checkdir) applies only
    to the set-gid programs run by non-root users (postqueue, postdrop,
    sendmail -C). Every command here runs as root with `-c DIR`, and the
    daemons find DIR through MAIL_CONFIG, which `postfix -c` exports and
    import_environment passes on by default.
  * data_directory must be owned by mail_owner (postfix), else the master
    dies with "open lock file .../master.lock: Permission denied".
  * maillog_file must start with one of maillog_file_prefixes (default
    "/var, /dev/stdout"), so the private directory is added to it; the
    master.cf needs the postlog unix-dgram postlogd service for it.
  * Debian's master.cf chroots most daemons into the queue directory; ours
    sets chroot n everywhere (nothing to copy into a chroot).
  * `postfix stop` returns before the daemons are gone (it only waits for the
    master's lock): stop() waits until the master's process group is empty
    (then SIGKILLs it), so the port really refuses connections afterwards and
    `postfix start` does not find the old master running.
  * The private directory must be 0755 (mkdtemp makes 0700): the postfix
    daemons and Dovecot's mail user (here `mail`, uid 8) must traverse it.
  * Dovecot refuses mail uids below first_valid_uid (500 by default) and uid
    0: mail is stored as the system user `mail` (uid/gid 8, always present on
    Debian) with first_valid_uid = 8.
  * Dovecot is run in the foreground (-F) as our child, in a session of its
    own; state_dir, base_dir, instance_name are private so the system-wide
    instance (if any) is untouched.
  * The packages' system services: Debian's postfix with "No configuration"
    has no main.cf and so cannot start; where policy-rc.d forbids starting
    services (containers) neither starts at install. Where one does run (a
    systemd machine), it listens on 25/143/993/110, which the stack here does
    not use: it does not interfere.
"""
import email
import email.policy
import imaplib
import json
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import subprocess
import tempfile
import time

import pytest

from harness import SmtpServer, _Recorder, free_port
from tls import ThrowawayCA

# -- installation --------------------------------------------------------------

REQUIRED_BINARIES = {
    "postfix": "/usr/sbin/postfix",
    "postqueue": "/usr/sbin/postqueue",
    "dovecot": "/usr/sbin/dovecot",
    "doveadm": "/usr/bin/doveadm",
    "dovecot imap": "/usr/lib/dovecot/imap",
    "dovecot lmtp": "/usr/lib/dovecot/lmtp",
}
PACKAGES = ["postfix", "dovecot-imapd", "dovecot-lmtpd"]


def missing_binaries():
    return [f"{name} ({path})" for name, path in REQUIRED_BINARIES.items()
            if not os.access(path, os.X_OK)]


def require_binaries():
    """Fails loudly (no skip) when Postfix or Dovecot is not installed."""
    missing = missing_binaries()
    if missing:
        raise RuntimeError(
            "mail stack binaries missing: " + ", ".join(missing) + ". Install them with: "
            "echo 'postfix postfix/main_mailer_type select No configuration' | "
            "debconf-set-selections; DEBIAN_FRONTEND=noninteractive apt-get install -y "
            "--no-install-recommends " + " ".join(PACKAGES))


# -- processes -----------------------------------------------------------------

def _group_pids(pgid):
    """The live processes whose process group is `pgid`. Zombies are left
    out: a daemonized master that exits is re-parented to PID 1, which in a
    container may take its time to reap it; `ps` still lists it then."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces, split after ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(d))
    return pids


def _wait_group_gone(pgid, timeout):
    deadline = time.monotonic() + timeout
    while _group_pids(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _kill_group(pgid, timeout=10):
    """SIGTERM, then SIGKILL, the process group `pgid` that this module started."""
    if not _group_pids(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    if not _wait_group_gone(pgid, timeout):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _wait_group_gone(pgid, 5)


def _port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(predicate, timeout, what, interval=0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _private_dir(prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    os.chmod(d, 0o755)              # the daemons' users must traverse it
    return d


# -- the final SMTP server -----------------------------------------------------

class _RuleRecorder(_Recorder):
    async def handle_RCPT(self, smtp, session, envelope, address, rcpt_options):
        reply = self.server.refusal(address)
        if reply:
            self.server.refused.append((address, reply))
            return reply
        return await super().handle_RCPT(smtp, session, envelope, address, rcpt_options)


class FinalSmtp(SmtpServer):
    """The server Postfix relays to: harness.SmtpServer (records .mails as
    harness.ReceivedMail: mail_from, rcpt_tos, data = raw bytes, message)
    that also refuses recipients by rule.

    refuse: {local-part prefix: reply} (reply may use {addr}), or a callable
    address -> reply or None. Default DEFAULT_REFUSE. Refusals seen are kept
    in .refused as (address, reply)."""

    DEFAULT_REFUSE = {
        "nobody": "550 5.1.1 <{addr}>: Recipient address rejected: User unknown",
        "later": "450 4.2.1 <{addr}>: Recipient address rejected: Mailbox busy, try again later",
    }

    def __init__(self, refuse=None):
        super().__init__()
        self.refuse = self.DEFAULT_REFUSE if refuse is None else refuse
        self.refused = []
        # aiosmtpd makes each connection's protocol from controller.handler:
        # no connection has been made yet.
        self.controller.handler = _RuleRecorder(self)

    def refusal(self, address):
        if callable(self.refuse):
            return self.refuse(address)
        local = address.split("@", 1)[0].lower()
        for prefix, reply in self.refuse.items():
            if local.startswith(prefix.lower()):
                return reply.format(addr=address)
        return self.rcpt_replies.get(address.lower())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# -- Dovecot -------------------------------------------------------------------

class ImapMessage:
    def __init__(self, uid, flags, raw):
        self.uid = uid
        self.flags = flags                  # e.g. ("\\Seen", "\\Recent")
        self.raw = raw                      # the bytes as stored
        self.message = email.message_from_bytes(raw, policy=email.policy.default)

    def __repr__(self):
        return f"<ImapMessage uid={self.uid} flags={self.flags} subject={self.message['Subject']!r}>"


class Dovecot:
    """Dovecot with one passwd-file user whose Maildir is in a private
    directory: IMAP (and IMAPS with a throwaway CA's certificate when
    imaps=True) and LMTP on 127.0.0.1, free ports. Mail is stored as the
    system user `mail_user` (default `mail`)."""

    def __init__(self, user="bounces", password="secret", imaps=False, mail_user="mail",
                 hostname="imap.test", start_timeout=20):
        require_binaries()
        self.user, self.password = user, password
        self.hostname = hostname
        self.dir = _private_dir("notify_ext_dovecot_")
        self.proc = None
        self.ca = None
        try:
            self._configure(imaps, mail_user)
            self.start(start_timeout)
        except BaseException:
            self.destroy()
            raise

    def _configure(self, imaps, mail_user):
        d, hostname = self.dir, self.hostname
        pw = pwd.getpwnam(mail_user)
        self.home = os.path.join(d, "home", self.user)
        os.makedirs(self.home)
        os.chown(self.home, pw.pw_uid, pw.pw_gid)
        os.chmod(self.home, 0o700)
        self.imap_port = free_port()
        self.lmtp_port = free_port()
        self.imaps_port = free_port() if imaps else None
        if imaps:
            self.ca = ThrowawayCA()
        self.users_file = os.path.join(d, "users")
        with open(self.users_file, "w") as f:
            # user:password:uid:gid:gecos:home:shell:extra
            f.write(f"{self.user}:{{PLAIN}}{self.password}:{pw.pw_uid}:{pw.pw_gid}::{self.home}::\n")
        # the auth process reads it as default_internal_user (dovecot)
        os.chown(self.users_file, 0, pwd.getpwnam("dovecot").pw_gid)
        os.chmod(self.users_file, 0o640)
        self.logfile = os.path.join(d, "dovecot.log")
        tls = (f"ssl = yes\nssl_cert = <{self.ca.cert}\nssl_key = <{self.ca.key}\n"
               if imaps else "ssl = no\n")
        self.conf = os.path.join(d, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(f"""\
base_dir = {d}/run
hostname = {hostname}
state_dir = {d}/state
instance_name = notify_ext_dovecot_{self.imap_port}
log_path = {self.logfile}
info_log_path = {self.logfile}
protocols = imap lmtp
listen = 127.0.0.1
{tls}disable_plaintext_auth = no
auth_mechanisms = plain login
auth_username_format = %Ln
recipient_delimiter = +
lmtp_save_to_detail_mailbox = no
first_valid_uid = {pw.pw_uid}
first_valid_gid = {pw.pw_gid}
mail_location = maildir:~/Maildir
default_login_user = dovenull
default_internal_user = dovecot
passdb {{
  driver = passwd-file
  args = scheme=PLAIN {self.users_file}
}}
userdb {{
  driver = passwd-file
  args = {self.users_file}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {self.imaps_port or 0}
    ssl = yes
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
}}
protocol lmtp {{
  postmaster_address = postmaster@localhost
}}
""")

    def start(self, timeout=20):
        log = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(["/usr/sbin/dovecot", "-F", "-c", self.conf],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         start_new_session=True)
        finally:
            log.close()
        ports = [p for p in (self.imap_port, self.imaps_port, self.lmtp_port) if p]

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.log()}")
            return all(_port_open(p) for p in ports)
        _wait(up, timeout, "dovecot to listen")

    def stop(self, timeout=10):
        """Stops the master we started (SIGTERM, then SIGKILL to its group)."""
        if self.proc is None:
            return
        pgid = self.proc.pid                # start_new_session: pid == pgid
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(pgid, timeout)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def destroy(self):
        self.stop()
        if self.ca is not None:
            shutil.rmtree(self.ca.dir, ignore_errors=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    close = destroy

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def ssl_context(self):
        """A client context that trusts the throwaway CA (imaps=True only)."""
        ctx = ssl.create_default_context(cafile=self.ca.ca_cert)
        return ctx

    def imap(self, tls=False):
        """A logged-in imaplib client (IMAPS when tls=True); the caller logs out."""
        if tls:
            client = imaplib.IMAP4_SSL("127.0.0.1", self.imaps_port,
                                       ssl_context=self.ssl_context(), timeout=10)
        else:
            client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=10)
        client.login(self.user, self.password)
        return client

    def messages(self, mailbox="INBOX", criteria="ALL", tls=False):
        """The messages in `mailbox` matching the IMAP SEARCH `criteria`, with
        their flags, fetched with BODY.PEEK[] (their flags stay as they are)."""
        client = self.imap(tls)
        try:
            typ, _ = client.select(mailbox, readonly=True)
            assert typ == "OK", f"select {mailbox}: {typ}"
            typ, data = client.uid("SEARCH", None, criteria)
            assert typ == "OK", f"search {criteria}: {typ} {data}"
            out = []
            for uid in data[0].split():
                typ, parts = client.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
                assert typ == "OK", f"fetch {uid}: {typ}"
                for part in parts:
                    if isinstance(part, tuple):
                        flags = imaplib.ParseFlags(part[0])
                        out.append(ImapMessage(int(uid), tuple(f.decode() for f in flags), part[1]))
            return out
        finally:
            client.logout()

    def wait_for_messages(self, count=1, timeout=20, mailbox="INBOX", criteria="ALL"):
        """The messages once there are at least `count`; fails after timeout."""
        got = []

        def enough():
            got[:] = self.messages(mailbox, criteria)
            return len(got) >= count
        try:
            _wait(enough, timeout, f"{count} message(s) in {mailbox}", interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}; got {len(got)}; dovecot log:\n{self.log()[-3000:]}") from None
        return got


# -- Postfix -------------------------------------------------------------------

_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command
{listen} inet n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix:
    """A Postfix instance of our own: `postfix -c <dir>/etc`, its own queue
    and data directories, smtpd on 127.0.0.1:<port>, relaying everything to
    [127.0.0.1]:relay_port, no DNS. With `dovecot`, the bounce domain is a
    virtual mailbox domain delivered over LMTP to it (plus-addressing on
    both sides), so DSNs to bounce_user+anything@bounce_domain land in its
    INBOX; without it, DSNs are relayed to the final server like any mail.

    Timers are in seconds (or Postfix time strings): the defaults make a
    deferred mail retried within ~2 s. maximal_queue_lifetime = 0 bounces a
    temporary failure after its first try. `extra` adds main.cf lines."""

    def __init__(self, relay_port, dovecot=None, bounce_domain="bounce.test",
                 bounce_user=None, myhostname="mx.test",
                 queue_run_delay=1, minimal_backoff_time=1, maximal_backoff_time=2,
                 maximal_queue_lifetime="1d", bounce_queue_lifetime="1d",
                 delay_warning_time=0, extra=None, start_timeout=20):
        require_binaries()
        self.dir = _private_dir("notify_ext_postfix_")
        self.config_dir = os.path.join(self.dir, "etc")
        self.queue_dir = os.path.join(self.dir, "queue")
        self.data_dir = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "postfix.log")
        self.port = free_port()
        self.relay_port = relay_port
        self.bounce_domain = bounce_domain
        self.bounce_user = bounce_user or (dovecot.user if dovecot else "bounces")
        self.master_pid = None
        try:
            os.mkdir(self.config_dir, 0o755)
            os.mkdir(self.queue_dir, 0o755)
            os.mkdir(self.data_dir, 0o700)
            pw = pwd.getpwnam("postfix")
            os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
            # the log file is written by postlogd and, when Postfix is stopped, by
            # postsuper running as the mail owner (it warns about queue files a stop
            # cut short, then cannot start): it must be the mail owner's from the start
            with open(self.logfile, "a"):
                pass
            os.chown(self.logfile, pw.pw_uid, pw.pw_gid)
            os.chmod(self.logfile, 0o644)
            t = _postfix_time
            main = {
                "compatibility_level": "3.6",
                "queue_directory": self.queue_dir,
                "data_directory": self.data_dir,
                "maillog_file": self.logfile,
                "maillog_file_prefixes": f"{self.dir}, /var, /dev/stdout",
                "myhostname": myhostname,
                "mydomain": myhostname,
                "myorigin": myhostname,
                "mydestination": "",
                "local_recipient_maps": "",
                "alias_maps": "",
                "alias_database": "",
                "biff": "no",
                "append_dot_mydomain": "no",
                "inet_interfaces": "loopback-only",
                "inet_protocols": "ipv4",
                "mynetworks": "127.0.0.0/8",
                "relayhost": f"[127.0.0.1]:{relay_port}",
                # no DNS anywhere: numeric next hops, /etc/hosts for names
                "smtp_dns_support_level": "disabled",
                "lmtp_dns_support_level": "disabled",
                "smtp_host_lookup": "native",
                "lmtp_host_lookup": "native",
                "smtpd_peername_lookup": "no",
                "smtp_tls_security_level": "none",
                "smtpd_tls_security_level": "none",
                "smtp_connect_timeout": "5s",
                "queue_run_delay": t(queue_run_delay),
                "minimal_backoff_time": t(minimal_backoff_time),
                "maximal_backoff_time": t(maximal_backoff_time),
                "maximal_queue_lifetime": t(maximal_queue_lifetime),
                "bounce_queue_lifetime": t(bounce_queue_lifetime),
                "delay_warning_time": t(delay_warning_time),
                "recipient_delimiter": "+",
            }
            if dovecot is not None:
                vmailbox = os.path.join(self.config_dir, "vmailbox")
                with open(vmailbox, "w") as f:
                    f.write(f"{self.bounce_user}@{bounce_domain} OK\n")
                main.update({
                    "virtual_mailbox_domains": bounce_domain,
                    "virtual_mailbox_maps": f"texthash:{vmailbox}",
                    "virtual_transport": f"lmtp:inet:127.0.0.1:{dovecot.lmtp_port}",
                })
            main.update(extra or {})
            with open(os.path.join(self.config_dir, "main.cf"), "w") as f:
                for k, v in main.items():
                    f.write(f"{k} = {v}\n")
            with open(os.path.join(self.config_dir, "master.cf"), "w") as f:
                f.write(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
            self.start(start_timeout)
        except BaseException:
            self.destroy()
            raise

    # -- commands
    def _run(self, *cmd, check=True, timeout=30):
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited with {p.returncode}: "
                               f"{p.stdout}{p.stderr}\n--- postfix log:\n{self.log()[-3000:]}")
        return p

    def postfix(self, *args, check=True):
        return self._run("/usr/sbin/postfix", "-c", self.config_dir, *args, check=check)

    def postqueue(self, *args, check=True):
        return self._run("/usr/sbin/postqueue", "-c", self.config_dir, *args, check=check)

    def postconf(self, *args):
        return self._run("/usr/sbin/postconf", "-c", self.config_dir, *args).stdout

    def _read_master_pid(self):
        try:
            with open(os.path.join(self.queue_dir, "pid", "master.pid")) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    @property
    def running(self):
        return self.master_pid is not None and bool(_group_pids(self.master_pid))

    def start(self, timeout=20):
        """postfix start; returns once smtpd answers on .port."""
        if self.running:
            return
        stale = self._read_master_pid()     # master.pid outlives a stopped master
        self.postfix("start")

        def new_master():
            pid = self._read_master_pid()
            return pid if pid and pid != stale and _group_pids(pid) else None
        self.master_pid = _wait(new_master, timeout, "a new postfix master in master.pid")
        _wait(lambda: _port_open(self.port), timeout, f"postfix on port {self.port}")

    def stop(self, timeout=10):
        """postfix stop, then waits for the master's process group (its
        daemons) to be gone; SIGKILLs what is left after timeout."""
        if self.master_pid is None:
            return
        pgid = self.master_pid
        if _group_pids(pgid):
            self.postfix("stop", check=False)
            if not _wait_group_gone(pgid, timeout):
                _kill_group(pgid, 5)
        self.master_pid = None

    def destroy(self):
        try:
            self.stop()
        finally:
            pid = self._read_master_pid() if os.path.isdir(self.queue_dir) else None
            if pid and _group_pids(pid):     # a master that start() did not see
                _kill_group(pid)
            shutil.rmtree(self.dir, ignore_errors=True)

    close = destroy

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    # -- queue and log
    def queue(self):
        """The queue as `postqueue -j` tells it: one dict per message
        (queue_id, queue_name, sender, recipients[{address, delay_reason}], ...)."""
        out = self.postqueue("-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self):
        return [m["queue_id"] for m in self.queue()]

    def mailq(self):
        return self.postqueue("-p").stdout

    def flush(self):
        """postqueue -f: retry every deferred message now."""
        self.postqueue("-f")

    def log(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern, timeout=20):
        """The first match of regex `pattern` in the log; fails after timeout."""
        rx = re.compile(pattern)
        try:
            return _wait(lambda: rx.search(self.log()), timeout, f"postfix log /{pattern}/",
                         interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}; log:\n{self.log()[-3000:]}") from None

    def wait_queue_empty(self, timeout=20):
        _wait(lambda: not self.queue(), timeout, "postfix queue to empty", interval=0.2)

    def send(self, mail_from, rcpt_tos, data, timeout=10):
        """Submits raw `data` (bytes or str) over SMTP to this relay; returns
        the queue id from the 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.port, timeout=timeout) as s:
            s.ehlo("client.test")
            s.mail(mail_from)
            for r in rcpt_tos:
                code, msg = s.rcpt(r)
                if code != 250:
                    raise smtplib.SMTPRecipientsRefused({r: (code, msg)})
            code, msg = s.data(data)
            if code != 250:
                raise smtplib.SMTPDataError(code, msg)
            m = re.search(rb"queued as ([0-9A-Za-z]+)", msg)
            return m.group(1).decode() if m else None


def _postfix_time(v):
    return f"{v}s" if isinstance(v, (int, float)) else str(v)


# -- everything together -------------------------------------------------------

class MailStack:
    """FinalSmtp + Dovecot + Postfix wired together; .final, .dovecot, .postfix.
    Keyword arguments other than refuse/imaps/user/password go to Postfix."""

    def __init__(self, refuse=None, imaps=False, user="bounces", password="secret", **postfix):
        self.final = self.dovecot = self.postfix = None
        try:
            require_binaries()
            self.final = FinalSmtp(refuse)
            self.dovecot = Dovecot(user, password, imaps=imaps)
            self.postfix = Postfix(self.final.port, dovecot=self.dovecot, **postfix)
        except BaseException:
            self.close()
            raise

    def bounce_address(self, detail):
        """The plus-address whose DSNs land in Dovecot's INBOX."""
        return f"{self.postfix.bounce_user}+{detail}@{self.postfix.bounce_domain}"

    def send(self, mail_from, rcpt_tos, data, **kw):
        return self.postfix.send(mail_from, rcpt_tos, data, **kw)

    def close(self):
        for part in (self.postfix, self.dovecot):
            if part is not None:
                try:
                    part.destroy()
                except Exception:
                    pass
        if self.final is not None:
            self.final.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(scope="module")
def mail_stack():
    """One MailStack (with IMAPS) per test module; import it into the module."""
    with MailStack(imaps=True) as ms:
        yield ms

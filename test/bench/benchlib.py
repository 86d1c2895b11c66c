"""Shared parts of the benchmarks in test/bench: Postfix's smtp-sink as a
throwaway SMTP server, and small helpers.

Everything started here listens on 127.0.0.1 and is stopped here.
"""
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))
from harness import free_port  # noqa: E402,F401

SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1: accepts every message and throws it
    away.  `-c` makes it print running counters ("sess=N quit=N mesg=N",
    updated at every final dot); they go to a file, read by `messages()`.
    As root it must drop privileges (`-u nobody`) after binding."""

    def __init__(self, backlog=1000):
        self.port = free_port()
        fd, self.counter_file = tempfile.mkstemp(prefix="notify_bench_sink_")
        os.close(fd)
        cmd = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            cmd += ["-u", "nobody"]
        cmd += [f"127.0.0.1:{self.port}", str(backlog)]
        self._out = open(self.counter_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    s.recv(200)     # the greeting
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"smtp-sink did not start: {self.output()[-500:]}")
                time.sleep(0.05)

    def output(self):
        with open(self.counter_file, "rb") as f:
            return f.read().decode(errors="replace")

    def messages(self):
        """Messages the sink has taken so far (its last `mesg=` counter)."""
        found = re.findall(r"mesg=(\d+)", self.output())
        return int(found[-1]) if found else 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        os.unlink(self.counter_file)


def pct(sorted_values, p):
    """Nearest-rank percentile of sorted values."""
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def wait_mails(server, count, timeout, where=""):
    """Wait until an SMTP server of the harness (aiosmtpd: .mails, .cond) holds count
    mails; fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    with server.cond:
        while len(server.mails) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{len(server.mails)} of {count} mails{where} after {timeout} s")
            server.cond.wait(left)


def loadavg():
    with open("/proc/loadavg") as f:
        return f.read().split()[0]

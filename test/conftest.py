"""Fixtures shared by test/e2e and test/fault: one cluster and one SMTP
server per session (tests stay independent through fresh names), and a
fresh name per test."""
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "lib"))

from harness import Cluster, SmtpServer  # noqa: E402

_counter = itertools.count(1)


@pytest.fixture(scope="session")
def smtp():
    server = SmtpServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def cluster(smtp):
    # A long poll interval: every test that receives mail in time proves the
    # commit wake-up, not the poll.
    c = Cluster(settings={"notify.poll_interval": "'30s'", "notify.retry_backoff": "'1s'",
                          "notify.workers": "4"})
    try:
        with c.connect() as conn:
            conn.execute("CREATE EXTENSION notify_ext")
            conn.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')",
                         (f"smtp://127.0.0.1:{smtp.port}",))
        yield c
    finally:
        if os.environ.get("NOTIFY_KEEP_LOG"):
            print(c.log())
        c.destroy()


@pytest.fixture
def db(cluster):
    conn = cluster.connect()
    yield conn
    conn.close()


@pytest.fixture
def uniq(request):
    """A name no other test uses: tables, event types, rules, addresses."""
    base = "".join(ch if ch.isalnum() else "_" for ch in request.node.name.lower())[:30]
    return f"{base}_{os.getpid()}_{next(_counter)}"

"""The webhook channel (DESIGN S14): the same event as a mail and as a POST
to an SMS gateway, a JSON body that business data cannot break, outcome
classes (2xx sent; 408, 429, 5xx, timeouts retried; other 4xx failed),
header secrets that no one but the extension's owner can read, and
set_webhook's errors. The gateway is a real HTTP server on 127.0.0.1 that
records every request it gets."""
import http.server
import json
import threading
import time

import psycopg
import pytest
from psycopg import sql

from harness import free_port, wait_until, set_guc
from tls import ThrowawayCA


class Gateway:
    """A real HTTP server: records method, path, headers and body of every
    request; answers each path with the statuses queued for it (then 200)."""

    def __init__(self, tls_context=None):
        self.requests = []
        self.scheme = "https" if tls_context else "http"
        self.replies = {}       # path -> [(status, body) or ('hang', seconds)], used in order
        self.cond = threading.Condition()
        gateway = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"     # keep-alive: the worker may reuse its connection

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                with gateway.cond:
                    queue = gateway.replies.get(self.path, [])
                    reply = queue.pop(0) if queue else (200, b'{"status": "queued"}')
                    gateway.requests.append({"method": self.command, "path": self.path,
                                             "headers": {k.lower(): v for k, v in self.headers.items()},
                                             "body": body, "at": time.monotonic(),
                                             "peer": self.client_address})
                    gateway.cond.notify_all()
                status, payload = reply
                if status == "hang":
                    time.sleep(payload)
                    status, payload = 200, b"late"
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(payload)))
                    if status in (301, 302, 307, 308):
                        self.send_header("Location", "http://127.0.0.1:1/elsewhere")
                    self.end_headers()
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True     # the client gave up waiting (timeout test)

            def log_message(self, *args):
                pass

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        if tls_context:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path):
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def reply(self, path, *replies):
        with self.cond:
            self.replies[path] = list(replies)

    def to(self, path):
        with self.cond:
            return [r for r in self.requests if r["path"] == path]

    def wait_for(self, path, count=1, timeout=20):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [r for r in self.requests if r["path"] == path]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} request(s) to {path} within {timeout}s, "
                                         f"got {len(got)}")
                self.cond.wait(left)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def gateway():
    g = Gateway()
    yield g
    g.stop()


SMS_BODY = ('{"to": "{{recipient.phone}}", "from": "ERP", "subject": "{{message.subject}}",\n'
            ' "text": "{{message.text}}", "note": "{{row.note}}", "order": {{row.id}}}')


def webhook_rule(db, uniq, gateway, path, body=SMS_BODY, headers=None, content_type="application/json",
                 specs=None, rate=None, phone="+34600111222"):
    """A recipient with a phone, a template, a webhook channel and a rule to it."""
    key = f"user:{uniq}"
    db.execute("SELECT notify.set_recipient(%s, %s, %s, %s)", (key, f"{uniq}@example.com", "Ana", phone))
    db.execute("SELECT notify.set_template(%s, 'Order {{row.id}}', 'Order {{row.id}}: {{row.note}}')",
               (f"tpl_{uniq}",))
    db.execute("SELECT notify.set_webhook(%s, %s, %s, %s, %s, %s)",
               (f"sms_{uniq}", gateway.url(path), body, json.dumps(headers or {}), content_type, rate))
    etype = f"wh.{uniq}"
    db.execute("SELECT notify.create_rule(%s, %s, %s, %s, channel => %s)",
               (f"sms_rule_{uniq}", etype, f"tpl_{uniq}", specs or [f"recipient:{key}"], f"sms_{uniq}"))
    return etype


def log_rows(db, etype):
    return db.execute("SELECT message_id, address, status, attempts, last_error, smtp_response, channel "
                      "FROM notify.delivery_log WHERE event_type = %s ORDER BY message_id", (etype,)).fetchall()


def attempts_of(db, message_id):
    return db.execute("SELECT outcome, smtp_code, response FROM notify.attempt WHERE message_id = %s "
                      "ORDER BY id", (message_id,)).fetchall()


def wait_status(db, etype, status, timeout=20):
    return wait_until(lambda: (rows := log_rows(db, etype)) and all(r[2] == status for r in rows) and rows,
                      timeout=timeout, what=f"messages {status}")




def test_s14_same_event_by_mail_and_by_webhook(db, smtp, gateway, uniq):
    path = f"/sms/{uniq}"
    etype = webhook_rule(db, uniq, gateway, path, headers={"Authorization": f"Bearer tok-{uniq}"})
    # the same event also by mail, to the same recipient
    db.execute("SELECT notify.create_rule(%s, %s, %s, %s)",
               (f"mail_rule_{uniq}", etype, f"tpl_{uniq}", [f"recipient:user:{uniq}"]))
    note = 'He said "deliver before 9"\nand \\ a backslash, a tab\t, é and </script>'
    db.execute("SELECT notify.emit(%s, jsonb_build_object('id', 42, 'note', %s::text))", (etype, note))

    mail = smtp.wait_for(f"{uniq}@example.com")[0]
    assert mail.subject == "Order 42"
    assert f"Order 42: {note}" in mail.part("text/plain").replace("\r\n", "\n")

    req = gateway.wait_for(path)[0]
    print(req["body"].decode())
    assert req["method"] == "POST"
    assert req["headers"]["content-type"] == "application/json"
    assert req["headers"]["authorization"] == f"Bearer tok-{uniq}"
    body = json.loads(req["body"])     # a quote and a newline in the data did not break the document
    assert body == {"to": "+34600111222", "from": "ERP", "subject": "Order 42",
                    "text": f"Order 42: {note}", "note": note, "order": 42}

    rows = wait_until(lambda: (r := log_rows(db, etype)) and len(r) == 2 and all(x[2] == "sent" for x in r) and r,
                      what="both sent")
    by_channel = {r[6]: r for r in rows}
    assert by_channel[f"sms_{uniq}"][1] == "+34600111222", "the log's address is the recipient's phone"
    assert by_channel["email"][1] == f"{uniq}@example.com"
    msg_id = by_channel[f"sms_{uniq}"][0]
    assert req["headers"]["x-notify-message-id"] == f"notify.message.{msg_id}"
    assert by_channel[f"sms_{uniq}"][5] == '200 OK: {"status": "queued"}'
    assert attempts_of(db, msg_id) == [("sent", 200, '200 OK: {"status": "queued"}')]


def test_2xx_is_sent_and_the_response_logged(db, gateway, uniq):
    path = f"/sms/{uniq}"
    gateway.reply(path, (202, b"accepted as id 7\nsecond line"))
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, '{\"id\": 1, \"note\": \"x\"}')", (etype,))
    gateway.wait_for(path)
    row = wait_status(db, etype, "sent")[0]
    assert row[3] == 1 and row[4] is None
    assert row[5] == "202 Accepted: accepted as id 7", "the status line and the body's first line"
    assert attempts_of(db, row[0]) == [("sent", 202, "202 Accepted: accepted as id 7")]


def test_500_fails_the_channel_then_200_sends(db, gateway, uniq):
    path = f"/sms/{uniq}"
    gateway.reply(path, (500, b"gateway overloaded"))
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, '{\"id\": 2, \"note\": \"x\"}')", (etype,))
    reqs = gateway.wait_for(path, count=2)
    row = wait_status(db, etype, "sent")[0]
    # a 5xx is the gateway's trouble: the channel failed, the message spent no attempt
    assert row[3] == 1
    atts = attempts_of(db, row[0])
    print(atts)
    assert atts[0][:2] == ("channel", 500) and "gateway overloaded" in atts[0][2]
    assert atts[-1][:2] == ("sent", 200)
    ids = {r["headers"]["x-notify-message-id"] for r in reqs}
    assert len(ids) == 1, "the retry carries the same X-Notify-Message-Id"
    assert reqs[0]["body"] == reqs[1]["body"]


def test_404_fails_at_once(db, gateway, uniq):
    path = f"/sms/{uniq}"
    gateway.reply(path, (404, b"no such route"))
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, '{\"id\": 3, \"note\": \"x\"}')", (etype,))
    gateway.wait_for(path)
    row = wait_status(db, etype, "failed")[0]
    assert row[3] == 1
    assert "404" in row[4] and "no such route" in row[4]
    assert attempts_of(db, row[0]) == [("failed", 404, row[4])]
    time.sleep(2.5)     # longer than the backoff: nothing is retried
    assert len(gateway.to(path)) == 1


def test_429_and_408_fail_the_channel(db, gateway, uniq):
    path = f"/sms/{uniq}"
    gateway.reply(path, (429, b"slow down"), (408, b"request timeout"))
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, '{\"id\": 4, \"note\": \"x\"}')", (etype,))
    gateway.wait_for(path, count=3)
    row = wait_status(db, etype, "sent")[0]
    assert [a[:2] for a in attempts_of(db, row[0])] == [("channel", 429), ("channel", 408), ("sent", 200)]


def test_other_4xx_fail_but_redirects_wait_for_a_fixed_url(db, gateway, uniq):
    path = f"/sms/{uniq}"
    gateway.reply(path, (401, b"bad token"))
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, '{\"id\": 5, \"note\": \"x\"}')", (etype,))
    row = wait_status(db, etype, "failed")[0]
    assert "401" in row[4]

    path2 = f"/moved/{uniq}"
    gateway.reply(path2, (301, b""))
    db.execute("SELECT notify.set_webhook(%s, %s, '{}')", (f"sms_{uniq}", gateway.url(path2)))
    db.execute("SELECT notify.emit(%s, '{\"id\": 6, \"note\": \"x\"}')", (etype,))
    # the second message's row, once it has an outcome (the first one's is already there)
    row = wait_until(lambda: (rs := log_rows(db, etype)) and len(rs) == 2
                     and (r := max(rs, key=lambda x: x[0]))[4] and r, what="redirect logged")
    print(row)
    assert row[2] == "queued", "a redirect is the channel's URL to fix: the message waits"
    assert "not followed" in row[4] and "127.0.0.1:1/elsewhere" in row[4]
    assert len(gateway.to(path2)) == 1 and gateway.to("/elsewhere") == []
    db.execute("SELECT notify.cancel(%s)", (row[0],))


def test_timeout_is_unknown_and_refused_connection_fails_the_channel(db, cluster, gateway, uniq):
    path = f"/slow/{uniq}"
    gateway.reply(path, ("hang", 4))
    etype = webhook_rule(db, uniq, gateway, path)
    set_guc(cluster, db, "notify.webhook_timeout", "1s")
    try:
        db.execute("SELECT notify.emit(%s, '{\"id\": 7, \"note\": \"x\"}')", (etype,))
        row = wait_status(db, etype, "sent", timeout=30)[0]
    finally:
        set_guc(cluster, db, "notify.webhook_timeout", None)
    atts = attempts_of(db, row[0])
    print(atts)
    assert atts[0][0] == "unknown" and "notify.webhook_timeout" in atts[0][2]
    assert atts[-1][:2] == ("sent", 200)
    reqs = gateway.to(path)
    assert len({r["headers"]["x-notify-message-id"] for r in reqs}) == 1

    # nobody listening
    closed = free_port()
    db.execute("SELECT notify.set_webhook(%s, %s, '{}')", (f"sms_{uniq}", f"http://127.0.0.1:{closed}/x"))
    db.execute("SELECT notify.emit(%s, '{\"id\": 8, \"note\": \"x\"}')", (etype,))
    row = wait_until(lambda: (r := log_rows(db, etype)[-1]) and r[4] and r, what="refusal logged")
    print(row)
    assert row[2] == "queued" and row[3] == 0
    assert "connect" in row[4].lower()
    assert attempts_of(db, row[0])[0][:2] == ("channel", None)
    db.execute("SELECT notify.cancel(%s)", (row[0],))


def test_https_certificate_is_checked_against_notify_tls_ca_file(db, cluster, uniq):
    ca = ThrowawayCA()
    tls_gateway = Gateway(ca.server_context())
    try:
        path = f"/tls/{uniq}"
        etype = webhook_rule(db, uniq, tls_gateway, path)
        db.execute("SELECT notify.emit(%s, '{\"id\": 12, \"note\": \"x\"}')", (etype,))
        row = wait_until(lambda: (r := log_rows(db, etype)) and r[0][4] and r[0], what="TLS failure logged")
        print(row)
        assert row[2] == "queued", "an untrusted certificate is retried, never ignored"
        assert "certificate" in row[4].lower() or "ssl" in row[4].lower()
        assert tls_gateway.to(path) == []
        set_guc(cluster, db, "notify.tls_ca_file", ca.ca_cert)
        try:
            req = tls_gateway.wait_for(path, timeout=20)[0]
            wait_status(db, etype, "sent")
        finally:
            set_guc(cluster, db, "notify.tls_ca_file", None)
        assert json.loads(req["body"])["order"] == 12
        assert db.execute("SELECT tls FROM notify.channels WHERE name = %s", (f"sms_{uniq}",)).fetchone()[0] == "verify"
    finally:
        tls_gateway.stop()


def test_address_is_the_phone_else_the_key(db, gateway, uniq):
    path = f"/sms/{uniq}"
    s = uniq
    db.execute(f"CREATE TABLE customers_{s} (id int PRIMARY KEY, name text, email text, mobile text)")
    db.execute(f"INSERT INTO customers_{s} VALUES (17, 'José', 'jose_{s}@example.com', '+34 611 000 017')")
    db.execute("SELECT notify.add_directory(%s, %s)",
               (f"cust{s}", f"SELECT email, name AS display_name, mobile AS phone, NULL AS locale "
                            f"FROM customers_{s} WHERE id = $1::int"))
    db.execute("SELECT notify.set_recipient(%s, %s)", (f"nophone:{s}", f"np_{s}@example.com"))
    db.execute("SELECT notify.set_recipient(%s, %s, 'Ana', '+34600111222')", (f"user:{s}", f"{s}@example.com"))
    db.execute("SELECT notify.create_group(%s)", (f"g_{s}",))
    db.execute("SELECT notify.add_member(%s, %s)", (f"g_{s}", f"nophone:{s}"))
    db.execute("SELECT notify.add_member(%s, %s)", (f"g_{s}", f"user:{s}"))
    body = '{"to": "{{recipient.phone}}", "key": "{{recipient.key}}", "name": "{{recipient.display_name}}"}'
    etype = webhook_rule(db, uniq, gateway, path, body=body,
                         specs=[f"group:g_{s}", f"key:cust{s}:{{row.customer_id}}", "field:row.mobile",
                                f"email:lit_{s}@example.com"])
    explained = db.execute("SELECT spec, recipient_key, address, reason FROM notify.explain(%s, %s)",
                           (etype, json.dumps({"id": 9, "customer_id": 17, "mobile": "+1 555 0100"}))).fetchall()
    print(explained)
    assert [(e[1], e[2]) for e in explained] == [
        (f"nophone:{s}", f"nophone:{s}"), (f"user:{s}", "+34600111222"),
        (f"cust{s}:17", "+34 611 000 017"), (None, "+1 555 0100"), (None, None)]
    assert "no phone number and no key" in explained[-1][3]

    db.execute("SELECT notify.emit(%s, %s)",
               (etype, json.dumps({"id": 9, "customer_id": 17, "mobile": "+1 555 0100"})))
    reqs = gateway.wait_for(path, count=4)
    bodies = sorted((json.loads(r["body"])["to"], json.loads(r["body"])["key"]) for r in reqs)
    assert bodies == sorted([("", f"nophone:{s}"), ("+34600111222", f"user:{s}"),
                             ("+34 611 000 017", f"cust{s}:17"), ("+1 555 0100", "")])
    rows = wait_status(db, etype, "sent")
    assert sorted(r[1] for r in rows) == sorted([f"nophone:{s}", "+34600111222", "+34 611 000 017",
                                                 "+1 555 0100"])
    assert {json.loads(r["body"])["name"] for r in reqs} >= {"José", "Ana"}


def test_plain_text_body_is_not_json_escaped(db, gateway, uniq):
    path = f"/text/{uniq}"
    etype = webhook_rule(db, uniq, gateway, path, body="SMS to {{recipient.phone}}: {{message.subject}} {{row.note}}",
                         content_type="text/plain; charset=utf-8")
    db.execute("SELECT notify.emit(%s, %s)", (etype, json.dumps({"id": 10, "note": 'say "hi" & <b>'})))
    req = gateway.wait_for(path)[0]
    assert req["headers"]["content-type"] == "text/plain; charset=utf-8"
    assert req["body"].decode() == 'SMS to +34600111222: Order 10 say "hi" & <b>'


def test_content_type_header_is_the_content_type(db, gateway, uniq):
    """pg_net users write the media type as a header: it is the request's
    Content-Type, sent once, and not among the stored headers."""
    path = f"/ct/{uniq}"
    etype = webhook_rule(db, uniq, gateway, path, content_type=None,
                         headers={"Content-Type": "application/vnd.sms+json", "Authorization": "Bearer t"})
    assert db.execute("SELECT content_type, header_names FROM notify.channels WHERE name = %s",
                      (f"sms_{uniq}",)).fetchone() == ("application/vnd.sms+json", ["Authorization"])
    db.execute("SELECT notify.emit(%s, %s)", (etype, json.dumps({"id": 11, "note": 'a "quote"'})))
    req = gateway.wait_for(path)[0]
    assert req["headers"]["content-type"] == "application/vnd.sms+json"
    assert req["headers"]["authorization"] == "Bearer t"
    # +json: the body is still escaped for JSON
    assert json.loads(req["body"])["note"] == 'a "quote"'


def test_rate_limit_applies_to_webhooks(db, gateway, uniq):
    path = f"/rated/{uniq}"
    etype = webhook_rule(db, uniq, gateway, path, rate=120)
    db.execute("SELECT notify.emit(%s, jsonb_build_object('id', g, 'note', 'x')) FROM generate_series(1, 4) g",
               (etype,))
    reqs = gateway.wait_for(path, count=4)
    times = sorted(r["at"] for r in reqs)
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"4 requests at 120/min: gaps {[round(g, 3) for g in gaps]}")
    assert min(gaps) >= 0.45
    rows = wait_status(db, etype, "sent")
    assert all(r[3] == 1 for r in rows), "waiting for the rate limit is not an attempt"


def test_connections_are_reused(db, gateway, uniq):
    path = f"/reuse/{uniq}"
    etype = webhook_rule(db, uniq, gateway, path)
    db.execute("SELECT notify.emit(%s, jsonb_build_object('id', g, 'note', 'x')) FROM generate_series(1, 12) g",
               (etype,))
    reqs = gateway.wait_for(path, count=12)
    peers = {r["peer"] for r in reqs}
    print(f"12 requests over {len(peers)} connection(s)")
    assert len(peers) <= 4, "one kept-alive connection per worker (notify.workers = 4), not one per message"
    wait_status(db, etype, "sent")


def test_header_secret_is_never_visible(db, cluster, gateway, uniq):
    path = f"/secret/{uniq}"
    secret = f"Bearer s3cret-{uniq}"
    etype = webhook_rule(db, uniq, gateway, path, headers={"Authorization": secret, "X-Api-Key": f"k-{uniq}"})
    db.execute("SELECT notify.emit(%s, '{\"id\": 11, \"note\": \"x\"}')", (etype,))
    req = gateway.wait_for(path)[0]
    assert req["headers"]["authorization"] == secret and req["headers"]["x-api-key"] == f"k-{uniq}"
    wait_status(db, etype, "sent")

    row = db.execute("SELECT header_names, row_to_json(c)::text FROM notify.channels c WHERE name = %s",
                     (f"sms_{uniq}",)).fetchone()
    assert row[0] == ["Authorization", "X-Api-Key"]
    assert "s3cret" not in row[1] and f"k-{uniq}" not in row[1]
    settings = db.execute("SELECT string_agg(coalesce(setting, '') || ' ' || coalesce(reset_val, ''), ' ') "
                          "FROM pg_settings").fetchone()[0]
    assert "s3cret" not in settings
    for query in ("SELECT row_to_json(m)::text FROM notify.message m WHERE event_type = %s",
                  "SELECT row_to_json(a)::text FROM notify.attempt a JOIN notify.message m "
                  "ON m.id = a.message_id WHERE m.event_type = %s",
                  "SELECT row_to_json(l)::text FROM notify.delivery_log l WHERE event_type = %s"):
        for (text,) in db.execute(query, (etype,)).fetchall():
            assert "s3cret" not in text

    role = f"ops_{uniq}"[:60]
    db.execute(sql.SQL("CREATE ROLE {} IN ROLE notify_admin").format(sql.Identifier(role)))
    try:
        with cluster.connect() as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            seen = conn.execute("SELECT name, header_names, row_to_json(c)::text FROM notify.channels c "
                                "WHERE name = %s", (f"sms_{uniq}",)).fetchone()
            assert seen[1] == ["Authorization", "X-Api-Key"] and "s3cret" not in seen[2]
            for q in ("SELECT * FROM notify.channel_secret",
                      "SELECT headers FROM notify.channel_secret WHERE channel = 'x'"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                    conn.execute(q)
            # a notify_admin may replace the headers (set_webhook), never read them back
            conn.execute("SELECT notify.set_webhook(%s, %s, '{}', '{\"Authorization\": \"Bearer new\"}')",
                         (f"sms_{uniq}", gateway.url(path)))
            assert "Bearer new" not in conn.execute("SELECT row_to_json(c)::text FROM notify.channels c "
                                                    "WHERE name = %s", (f"sms_{uniq}",)).fetchone()[0]
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("UPDATE notify.channel SET url = 'http://evil.example/' WHERE name = %s",
                             (f"sms_{uniq}",))
    finally:
        db.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert db.execute("SELECT headers FROM notify.channel_secret WHERE channel = %s",
                      (f"sms_{uniq}",)).fetchone()[0] == {"Authorization": "Bearer new"}


@pytest.mark.parametrize("args, message", [
    (("file:///etc/passwd", "{}"), "invalid webhook URL 'file:///etc/passwd'"),
    (("gopher://gw.example.com/", "{}"), "invalid webhook URL"),
    (("smtp://gw.example.com:25", "{}"), "invalid webhook URL"),
    (("https://user:pw@gw.example.com/send", "{}"), "must not carry credentials"),
    (("https://gw.example.com/send", "{}", '{"Authorization": "Bearer x\\r\\nX-Evil: 1"}'),
     'the value of header "Authorization" of channel'),
    (("https://gw.example.com/send", "{}", '{"X-Key": "a\\nb"}'), "line break or another control character"),
    (("https://gw.example.com/send", "{}", '{"Bad Name": "x"}'), 'invalid header name "Bad Name"'),
    (("https://gw.example.com/send", "{}", '{"X-Key": 5}'), "must be a string"),
    (("https://gw.example.com/send", "{}", '["x"]'), "must be a JSON object"),
    (("https://gw.example.com/send", "{}", '{"Content-Type": "text/plain"}', "application/json"),
     "the Content-Type header of channel 'bad_"),
    (("https://gw.example.com/send", "{}", '{"Host": "gw.example.com"}'), "is set by the transport"),
    (("https://gw.example.com/send", '{"to": "{{recipient.phone}}",\n "text": "{{#row.items}}"}'),
     'syntax error in body_template of channel "{name}", line 2, column 11: unclosed section "row.items"'),
    (("https://gw.example.com/send", "{}", "{}", "json"), "invalid content_type"),
    (("https://gw.example.com/send", None), "needs a body_template"),
])
def test_set_webhook_errors(db, uniq, args, message):
    name = f"bad_{uniq}"
    with pytest.raises(psycopg.errors.Error) as err:
        db.execute(f"SELECT notify.set_webhook(%s{', %s' * len(args)})", (name,) + args)
    print(err.value)
    assert message.format(name=name) in str(err.value)
    if "header" in message:
        assert "Bearer x" not in str(err.value), "a header value is never echoed: it may be a secret"
    assert db.execute("SELECT count(*) FROM notify.channel WHERE name = %s", (name,)).fetchone()[0] == 0

"""The first mail: a committed business row becomes a mail whose bytes the
SMTP server received; a rolled-back one becomes nothing."""
import email.utils
import re
import time

import psycopg
import pytest

from harness import wait_until


def setup_orders(db, uniq, template_html=True, condition=None, ops="{INSERT}"):
    """An ERP orders table, watched, with a rule mailing the order's contact."""
    table = f"orders_{uniq}"
    etype = f"order.{uniq}"
    db.execute(f"""CREATE TABLE {table} (
        id serial PRIMARY KEY, customer text NOT NULL, contact_email text,
        total numeric(12,2) NOT NULL, status text NOT NULL DEFAULT 'new',
        note text, created_at date DEFAULT '2026-11-23')""")
    db.execute("SELECT notify.watch(%s::regclass, %s, %s::text[], %s)", (table, etype, ops, condition))
    db.execute("SELECT notify.set_template(%s, %s, %s, %s)", (
        f"tpl_{uniq}",
        "Pedido {{row.id}} de {{row.customer}}",
        "Hola {{row.customer}},\nTotal: {{row.total}} EUR\n{{#row.note}}Nota: {{row.note}}\n{{/row.note}}",
        "<p>Hola {{row.customer}}</p><p>Total: <b>{{row.total}}</b></p>" if template_html else None))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.contact_email'])",
               (f"rule_{uniq}", etype, f"tpl_{uniq}"))
    return table, etype


def test_committed_insert_is_mailed_with_proper_mime(db, smtp, uniq):
    table, etype = setup_orders(db, uniq)
    to = f"{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total, note) VALUES (%s, %s, %s, %s)",
               ("José Núñez & <Hijos>", to, "1000.50", "Entrega urgente"))
    [mail] = smtp.wait_for(to)
    msg = mail.message

    # envelope: exactly the recipient, from the channel's address with the message's VERP token
    assert mail.rcpt_tos == [to]
    verp = re.fullmatch(r"erp\+m(\d+)\.([0-9a-f]{12})@example\.com", mail.mail_from)
    assert verp, mail.mail_from
    # headers, decoded
    assert mail.subject == "Pedido 1 de José Núñez & <Hijos>"
    assert b"Subject: =?UTF-8?" in mail.data, "a non-ASCII subject must be RFC 2047-encoded"
    assert msg["From"] == "erp@example.com"
    assert msg["To"] == to
    # the database's token (12 hex digits) makes it unique across databases and clusters;
    # the envelope's VERP token carries the same
    assert msg["Message-ID"] == f"<notify.message.{verp.group(2)}.{verp.group(1)}@example.com>"
    assert email.utils.parsedate_to_datetime(msg["Date"]).tzinfo is not None
    assert msg["MIME-Version"] == "1.0"
    # both parts; HTML escaping in the HTML part only; numbers as jsonb prints them
    text = mail.part("text/plain")
    html = mail.part("text/html")
    assert text == "Hola José Núñez & <Hijos>,\r\nTotal: 1000.50 EUR\r\nNota: Entrega urgente\r\n" or \
        text.replace("\r\n", "\n") == "Hola José Núñez & <Hijos>,\nTotal: 1000.50 EUR\nNota: Entrega urgente\n"
    assert "<p>Hola José Núñez &amp; &lt;Hijos&gt;</p>" in html
    assert "<b>1000.50</b>" in html
    # every line of the raw message ends in CRLF (no bare LF on the wire)
    assert b"\n" not in mail.data.replace(b"\r\n", b"")

    # the delivery log tells the same story
    row = db.execute("SELECT status, attempts, address, rule, smtp_response, sent_at IS NOT NULL "
                     "FROM notify.delivery_log WHERE event_type = %s", (etype,)).fetchone()
    assert row is not None
    status, attempts, address, rule, response, has_sent_at = row
    if status != "sent":  # the log is written right after the 250: give it a moment
        status = wait_until(lambda: db.execute(
            "SELECT status FROM notify.delivery_log WHERE event_type = %s AND status = 'sent'",
            (etype,)).fetchone(), what="status sent")[0]
        response = db.execute("SELECT smtp_response FROM notify.delivery_log WHERE event_type = %s",
                              (etype,)).fetchone()[0]
    assert status == "sent"
    assert address == to and rule == f"rule_{uniq}"
    assert response.startswith("250")
    mid = db.execute("SELECT message_id FROM notify.delivery_log WHERE event_type = %s", (etype,)).fetchone()[0]
    token = db.execute("SELECT token FROM notify.identity_local").fetchone()[0]
    assert msg["Message-ID"] == f"<notify.message.{token}.{mid}@example.com>"


def test_text_only_template_sends_single_text_part(db, smtp, uniq):
    table, _ = setup_orders(db, uniq, template_html=False)
    to = f"{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Łukasz Żółć', %s, 5)", (to,))
    [mail] = smtp.wait_for(to)
    assert mail.subject == "Pedido 1 de Łukasz Żółć"
    assert mail.part("text/html") is None
    assert "Hola Łukasz Żółć" in mail.part("text/plain")
    assert [p.get_content_type() for p in mail.message.walk() if not p.is_multipart()] == ["text/plain"]


def test_rolled_back_transaction_sends_nothing(db, cluster, smtp, uniq):
    table, etype = setup_orders(db, uniq)
    ghost = f"ghost_{uniq}@example.com"
    real = f"real_{uniq}@example.com"
    with cluster.connect(autocommit=False) as conn:
        conn.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Ghost', %s, 1)", (ghost,))
        conn.rollback()
        conn.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Real', %s, 2)", (real,))
        conn.commit()
    # the committed one arrives; by then the rolled-back one would have too
    smtp.wait_for(real)
    time.sleep(0.5)
    assert smtp.to(ghost) == []
    assert db.execute("SELECT count(*) FROM notify.event WHERE event_type = %s", (etype,)).fetchone()[0] == 1


def test_commit_wakes_worker_within_a_second(db, smtp, uniq):
    """poll_interval is 30 s in this cluster: only the commit wake-up can be this fast."""
    table, _ = setup_orders(db, uniq)
    latencies = []
    for i in range(5):
        to = f"{uniq}_{i}@example.com"
        t0 = time.monotonic()
        db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('C', %s, 1)", (to,))
        [mail] = smtp.wait_for(to, timeout=5)
        latencies.append(mail.received_at - t0)
    latencies.sort()
    print(f"commit -> SMTP DATA received: median {latencies[2] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms (poll interval 30 s)")
    assert latencies[-1] < 1.0


def test_crlf_in_subject_cannot_add_a_header(db, smtp, uniq):
    table, _ = setup_orders(db, uniq)
    to = f"{uniq}@example.com"
    evil = "Acme\r\nBcc: victim@evil.example\r\nX-Injected: yes"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES (%s, %s, 1)", (evil, to))
    [mail] = smtp.wait_for(to)
    assert mail.rcpt_tos == [to]
    assert mail.message["Bcc"] is None
    assert mail.message["X-Injected"] is None
    header_block = mail.data.split(b"\r\n\r\n", 1)[0]
    assert not re.search(rb"^(Bcc|X-Injected):", header_block, re.M | re.I)
    assert "Bcc: victim@evil.example" in mail.subject  # kept as text, on one line


def test_dot_line_in_body_does_not_end_the_message(db, smtp, uniq):
    table, _ = setup_orders(db, uniq, template_html=False)
    to = f"{uniq}@example.com"
    note = "line one\n.\nMAIL FROM:<x@evil.example>\n.\nline after"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total, note) VALUES ('Dot', %s, 1, %s)",
               (to, note))
    [mail] = smtp.wait_for(to)
    assert "line after" in mail.part("text/plain")
    time.sleep(0.3)
    assert len(smtp.to(to)) == 1


def test_update_and_delete_carry_old_row_and_changes(db, smtp, uniq):
    table = f"quotes_{uniq}"
    etype = f"quote.approved.{uniq}"
    to = f"{uniq}@example.com"
    db.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, status text, amount numeric, owner text)")
    db.execute("SELECT notify.watch(%s::regclass, %s, '{UPDATE}', "
               "$$OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'approved'$$)", (table, etype))
    db.execute("SELECT notify.set_template(%s, 'Quote {{row.id}}: {{old.status}} -> {{row.status}}', "
               "'{{#changes}}{{column}}: {{old}} -> {{new}}\n{{/changes}}')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])",
               (f"rule_{uniq}", etype, f"tpl_{uniq}", f"email:{to}"))
    db.execute(f"INSERT INTO {table} VALUES (7, 'draft', 100, 'ana')")
    db.execute(f"UPDATE {table} SET amount = 120 WHERE id = 7")          # no status change: no mail
    db.execute(f"UPDATE {table} SET status = 'approved', amount = 150.00 WHERE id = 7")
    [mail] = smtp.wait_for(to)
    assert mail.subject == "Quote 7: draft -> approved"
    body = mail.part("text/plain").replace("\r\n", "\n")
    assert body == "status: draft -> approved\namount: 120 -> 150.00\n"
    time.sleep(0.3)
    assert len(smtp.to(to)) == 1


def test_emit_with_recipient_and_literal_address(db, smtp, uniq):
    etype = f"sync.error.{uniq}"
    tech = f"tech_{uniq}@example.com"
    ops = f"ops_{uniq}@example.com"
    db.execute("SELECT notify.set_recipient(%s, %s, 'María Ops', NULL, 'es')", (f"user:{uniq}", tech))
    db.execute("SELECT notify.set_template(%s, 'Sync error: {{row.interface}}', "
               "'Hi {{recipient.display_name}}: {{row.message}}')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s, %s, %s])",
               (f"rule_{uniq}", etype, f"tpl_{uniq}", f"recipient:user:{uniq}", f"email:{ops}",
                f"email:{tech.upper()}"))
    eid = db.execute("SELECT notify.emit(%s, %s::jsonb)",
                     (etype, '{"interface": "bank", "message": "timeout"}')).fetchone()[0]
    assert eid > 0
    [m1] = smtp.wait_for(tech)
    [m2] = smtp.wait_for(ops)
    assert m1.subject == "Sync error: bank"
    assert m1.part("text/plain").startswith("Hi María Ops: timeout")
    assert m1.message["To"].addresses[0].display_name == "María Ops"
    assert b"=?UTF-8?" in m1.data.split(b"\r\nTo:")[1].split(b"\r\n")[0]
    # the same address through two specs is mailed once
    time.sleep(0.3)
    assert len(smtp.to(tech)) == 1
    assert m2.part("text/plain").startswith("Hi : timeout")


def test_invalid_address_fails_that_message_only(db, smtp, uniq):
    table, etype = setup_orders(db, uniq)
    good = f"{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Bad', %s, 1)",
               ("not an address\r\nRCPT TO:<x@evil.example>",))
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Good', %s, 1)", (good,))
    smtp.wait_for(good)
    status, error = wait_until(lambda: db.execute(
        "SELECT status, last_error FROM notify.delivery_log WHERE event_type = %s AND status = 'failed'",
        (etype,)).fetchone(), what="failed row")
    assert "invalid email address" in error
    assert smtp.to("x@evil.example") == []


def test_event_that_cannot_render_is_failed_in_log(db, smtp, uniq):
    """A rule whose template was dropped fails its events visibly; other events go on."""
    table, etype = setup_orders(db, uniq)
    db.execute("DELETE FROM notify.template WHERE name = %s", (f"tpl_{uniq}",))
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('X', %s, 1)",
               (f"{uniq}@example.com",))
    row = wait_until(lambda: db.execute(
        "SELECT status, last_error, message_id FROM notify.delivery_log WHERE event_type = %s",
        (etype,)).fetchone(), what="failed event in the log")
    assert row[0] == "failed" and row[2] is None
    assert f'template "tpl_{uniq}" does not exist' in row[1]
    # the worker is still alive and sending
    other_table, _ = setup_orders(db, uniq + "b")
    db.execute(f"INSERT INTO {other_table} (customer, contact_email, total) VALUES ('Y', %s, 1)",
               (f"{uniq}b@example.com",))
    smtp.wait_for(f"{uniq}b@example.com")


def test_template_syntax_error_names_line_and_column(db, uniq):
    with pytest.raises(psycopg.errors.SyntaxError) as exc:
        db.execute("SELECT notify.set_template(%s, 'ok', %s)",
                   (f"tpl_{uniq}", "Dear {{row.name}},\n\nYour items:\n    {{#row.items}}- {{name}}\n"))
    assert "line 4, column 5" in str(exc.value)
    assert "text_body" in str(exc.value)
    assert db.execute("SELECT count(*) FROM notify.template WHERE name = %s",
                      (f"tpl_{uniq}",)).fetchone()[0] == 0


def test_disabled_rule_is_skipped(db, smtp, uniq):
    table, etype = setup_orders(db, uniq)
    db.execute("SELECT notify.enable_rule(%s, false)", (f"rule_{uniq}",))
    off = f"off_{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('Off', %s, 1)", (off,))
    wait_until(lambda: db.execute("SELECT processed_at FROM notify.event WHERE event_type = %s",
                                  (etype,)).fetchone()[0], what="event processed")
    db.execute("SELECT notify.enable_rule(%s, true)", (f"rule_{uniq}",))
    on = f"on_{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) VALUES ('On', %s, 1)", (on,))
    smtp.wait_for(on)
    time.sleep(0.3)
    assert smtp.to(off) == []


def test_connections_are_reused_across_messages(db, smtp, uniq):
    """Connection reuse: 40 messages travel over at most notify.workers (4)
    SMTP sessions, not one each."""
    table, _ = setup_orders(db, uniq, template_html=False)
    to = f"{uniq}@example.com"
    db.execute(f"INSERT INTO {table} (customer, contact_email, total) "
               f"SELECT 'C' || g, %s, g FROM generate_series(1, 40) g", (to,))
    mails = smtp.wait_for(to, count=40)
    ports = {m.peer for m in mails}
    workers = int(db.execute("SHOW notify.workers").fetchone()[0])
    print(f"40 messages over {len(ports)} connection(s), notify.workers = {workers}")
    assert 1 <= len(ports) <= workers, f"expected at most {workers} connections, saw {len(ports)}"


def test_messages_are_sent_in_parallel(db, smtp, uniq):
    """notify.workers (4) workers send at once: with a server that
    takes 1 s to accept each message, 8 messages take about 2 s, not 8."""
    table, _ = setup_orders(db, uniq, template_html=False)
    to = f"{uniq}@example.com"
    smtp.max_in_data = 0
    smtp.data_delay = lambda mail: 1.0 if to in mail.rcpt_tos else 0
    try:
        start = time.monotonic()
        db.execute(f"INSERT INTO {table} (customer, contact_email, total) "
                   f"SELECT 'C' || g, %s, g FROM generate_series(1, 8) g", (to,))
        smtp.wait_for(to, count=8, timeout=20)
        elapsed = time.monotonic() - start
    finally:
        smtp.data_delay = None
    print(f"8 messages at 1 s each: {elapsed:.2f} s, at most {smtp.max_in_data} in DATA at once")
    workers = int(db.execute("SHOW notify.workers").fetchone()[0])
    assert smtp.max_in_data == workers == 4
    assert elapsed < 5, f"8 slow messages took {elapsed:.1f} s: not sent in parallel"


def test_edited_template_is_used_for_the_next_event(db, smtp, uniq):
    """Compiled templates are cached for one fan-out batch only."""
    etype = f"edit.{uniq}"
    to = f"{uniq}@example.com"
    db.execute("SELECT notify.set_template(%s, 'version 1', 'one')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])", (f"rule_{uniq}", etype, f"tpl_{uniq}", f"email:{to}"))
    db.execute("SELECT notify.emit(%s, '{}')", (etype,))
    smtp.wait_for(to)
    db.execute("SELECT notify.set_template(%s, 'version 2', 'two')", (f"tpl_{uniq}",))
    db.execute("SELECT notify.emit(%s, '{}')", (etype,))
    mails = smtp.wait_for(to, count=2)
    assert sorted(m.subject for m in mails) == ["version 1", "version 2"]

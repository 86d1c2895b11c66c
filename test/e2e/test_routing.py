"""Who hears about what (DESIGN S1-S4, S6, S12, S13), written as an ERP would
use it: salespeople and supervisors, customers and contacts with agents,
quotes with states, tickets. Envelope recipients are checked exactly."""
import time

import pytest

from harness import wait_until


@pytest.fixture
def erp(db, uniq):
    """A small ERP of this test's own: names carry the test's unique suffix."""
    s = uniq
    db.execute(f"""
        CREATE TABLE users_{s} (id int PRIMARY KEY, name text, email text, locale text);
        CREATE TABLE customers_{s} (id int PRIMARY KEY, name text, email text, agent_id int);
        CREATE TABLE contacts_{s} (id int PRIMARY KEY, customer_id int, name text, email text, agent_id int);
        CREATE TABLE orders_{s} (id serial PRIMARY KEY, customer_id int, seller_id int, total numeric(12,2));
        CREATE TABLE quotes_{s} (id int PRIMARY KEY, customer_id int, contact_id int, status text,
                                 total numeric(12,2), seller_id int);
        CREATE TABLE tickets_{s} (id serial PRIMARY KEY, contact_id int, subject text);
        CREATE TABLE ticket_msgs_{s} (id serial PRIMARY KEY, ticket_id int, author text, body text,
                                      contact_email text);
        INSERT INTO users_{s} VALUES (1, 'Sara Seller', 'sara_{s}@example.com', 'es'),
                                     (2, 'Bob Boss', 'bob_{s}@example.com', NULL),
                                     (3, 'Otto Other', 'otto_{s}@example.com', 'ES_es'),
                                     (4, 'Ada Agent', 'ada_{s}@example.com', NULL),
                                     (5, 'Gus Group', 'gus_{s}@example.com', NULL);
        INSERT INTO customers_{s} VALUES (17, 'José Núñez SL', 'jose_{s}@example.com', 4),
                                         (18, 'No Agent SA', 'noagent_{s}@example.com', NULL);
        INSERT INTO contacts_{s} VALUES (70, 17, 'Carla Contact', 'carla_{s}@example.com', 3),
                                        (71, 18, 'Nico Noagent', 'nico_{s}@example.com', NULL);
    """)
    # the ERP's tables stay the source of truth: keys resolve live
    db.execute("SELECT notify.add_directory(%s, %s)",
               (f"user{s}", f"SELECT email, name AS display_name, NULL::text AS phone, locale "
                            f"FROM users_{s} WHERE id = $1::int"))
    db.execute("SELECT notify.add_directory(%s, %s)",
               (f"customer{s}", f"SELECT email, name AS display_name, NULL::text AS phone, "
                                f"NULL::text AS locale FROM customers_{s} WHERE id = $1::int"))
    return s


def template(db, name, subject, body, html=None, locale=None):
    db.execute("SELECT notify.set_template(%s, %s, %s, %s, %s)", (name, subject, body, html, locale))


def settle(db, etype):
    """Wait until the worker fanned out every event of this type, and the mail went out."""
    wait_until(lambda: db.execute("SELECT count(*) = 0 FROM notify.event WHERE event_type = %s "
                                  "AND processed_at IS NULL", (etype,)).fetchone()[0], what="fan-out")
    wait_until(lambda: db.execute("SELECT count(*) = 0 FROM notify.message WHERE event_type = %s "
                                  "AND status IN ('queued', 'sending')", (etype,)).fetchone()[0],
               what="sending")


def rcpts(smtp, s, etype_subject):
    return sorted(r for m in smtp.mails if m.subject == etype_subject for r in m.rcpt_tos)


def test_s1_salesperson_gets_a_copy_of_their_order(db, smtp, erp):
    s = erp
    etype = f"order.created.{s}"
    db.execute(f"SELECT notify.watch('orders_{s}', %s, actor_column => 'seller_id', actor_prefix => %s)",
               (etype, f"user{s}"))
    template(db, f"copy_{s}", "Copia: pedido {{row.id}} ({{recipient.display_name}})", "Total {{row.total}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['actor'])", (f"s1_{s}", etype, f"copy_{s}"))
    db.execute(f"INSERT INTO orders_{s} (customer_id, seller_id, total) VALUES (17, 1, 250)")
    db.execute(f"INSERT INTO orders_{s} (customer_id, seller_id, total) VALUES (17, NULL, 5)")  # no actor
    [mail] = smtp.wait_for(f"sara_{s}@example.com")
    assert mail.rcpt_tos == [f"sara_{s}@example.com"]
    assert mail.subject == "Copia: pedido 1 (Sara Seller)"
    settle(db, etype)
    assert db.execute("SELECT count(*) FROM notify.message WHERE event_type = %s", (etype,)).fetchone()[0] == 1


def test_s2_supervisor_hears_of_subordinates_only_with_preferences(db, smtp, erp):
    s = erp
    etype = f"visit.{s}"
    db.execute("SELECT notify.set_supervisor(%s, %s)", (f"user{s}:1", f"user{s}:2"))   # Bob supervises Sara
    template(db, f"visit_{s}", "Visit by {{event.actor}}", "Visit {{row.client}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['supervisors'])", (f"s2_{s}", etype, f"visit_{s}"))
    db.execute("SELECT notify.emit(%s, '{\"client\": \"A\"}', %s)", (etype, f"user{s}:1"))
    db.execute("SELECT notify.emit(%s, '{\"client\": \"B\"}', %s)", (etype, f"user{s}:3"))  # Otto: no boss
    [mail] = smtp.wait_for(f"bob_{s}@example.com")
    assert mail.subject == f"Visit by user{s}:1" and mail.rcpt_tos == [f"bob_{s}@example.com"]
    settle(db, etype)
    assert len(smtp.to(f"bob_{s}@example.com")) == 1

    # Bob switches this event type off: the next one is suppressed, visibly
    db.execute("SELECT notify.set_preference(%s, %s, 'off')", (f"user{s}:2", etype))
    prefs = db.execute("SELECT event_type, channel, mode, is_default FROM notify.preferences(%s)",
                       (f"user{s}:2",)).fetchall()
    assert (etype, "email", "off", False) in prefs
    db.execute("SELECT notify.emit(%s, '{\"client\": \"C\"}', %s)", (etype, f"user{s}:1"))
    settle(db, etype)
    rows = db.execute("SELECT status, last_error FROM notify.delivery_log WHERE event_type = %s "
                      "ORDER BY message_id", (etype,)).fetchall()
    assert [r[0] for r in rows] == ["sent", "suppressed"]
    assert "preference" in rows[1][1]
    assert len(smtp.to(f"bob_{s}@example.com")) == 1
    why = db.execute("SELECT recipient_key, mode, reason FROM notify.explain(%s, '{}', %s)",
                     (etype, f"user{s}:1")).fetchall()
    assert why == [(f"user{s}:2", "off", f"suppressed: recipient's preference for {etype} is off")]


def test_s3_customer_mail_resolved_live_from_erp_table(db, smtp, erp):
    s = erp
    etype = f"payment.{s}"
    template(db, f"pay_{s}", "Pago recibido, {{recipient.display_name}}", "Importe {{row.amount}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])",
               (f"s3_{s}", etype, f"pay_{s}", f"key:customer{s}:{{row.customer_id}}"))
    db.execute("SELECT notify.emit(%s, '{\"customer_id\": 17, \"amount\": 99.5}')", (etype,))
    [mail] = smtp.wait_for(f"jose_{s}@example.com")
    assert mail.subject == "Pago recibido, José Núñez SL"
    # a changed address is used from the next message on: no sync job
    db.execute(f"UPDATE customers_{s} SET email = 'jose.new_{s}@example.com' WHERE id = 17")
    db.execute("SELECT notify.emit(%s, '{\"customer_id\": 17, \"amount\": 1}')", (etype,))
    [mail2] = smtp.wait_for(f"jose.new_{s}@example.com")
    assert mail2.rcpt_tos == [f"jose.new_{s}@example.com"]


def test_s4_quote_approved_group_plus_agents_if_any(db, smtp, erp):
    s = erp
    etype = f"quote.approved.{s}"
    db.execute("SELECT notify.create_group(%s)", (f"sales_admins_{s}",))
    db.execute("SELECT notify.add_member(%s, %s)", (f"sales_admins_{s}", f"user{s}:5"))
    db.execute("SELECT notify.add_member(%s, %s)", (f"sales_admins_{s}", f"user{s}:1"))
    db.execute(f"""SELECT notify.watch('quotes_{s}', %s, '{{UPDATE}}',
        $$OLD.status IS DISTINCT FROM NEW.status AND NEW.status = 'approved'$$)""", (etype,))
    # the contact's agent and the customer's agent, looked up by the context query
    db.execute("SELECT notify.set_template(%s, %s, %s)", (
        f"approved_{s}", "Presupuesto {{row.id}} aprobado",
        "Cliente: {{extra.customer}}\nContacto: {{extra.contact}}\n"))
    db.execute("""SELECT notify.create_rule(%s, %s, %s,
                    ARRAY[%s, %s, %s],
                    context_query => %s)""", (
        f"s4_{s}", etype, f"approved_{s}",
        f"group:sales_admins_{s}", f"key:user{s}:{{extra.contact_agent}}", f"key:user{s}:{{extra.customer_agent}}",
        f"""SELECT jsonb_build_object('customer', cu.name, 'contact', co.name,
                                      'contact_agent', co.agent_id, 'customer_agent', cu.agent_id)
              FROM customers_{s} cu JOIN contacts_{s} co ON co.customer_id = cu.id
             WHERE cu.id = ($1->'row'->>'customer_id')::int AND co.id = ($1->'row'->>'contact_id')::int"""))
    db.execute(f"INSERT INTO quotes_{s} VALUES (1, 17, 70, 'draft', 100, 1), (2, 18, 71, 'draft', 50, 1)")
    db.execute(f"UPDATE quotes_{s} SET status = 'approved' WHERE id IN (1, 2)")
    settle(db, etype)
    q1 = sorted(r for m in smtp.mails if m.subject == "Presupuesto 1 aprobado" for r in m.rcpt_tos)
    q2 = sorted(r for m in smtp.mails if m.subject == "Presupuesto 2 aprobado" for r in m.rcpt_tos)
    # quote 1: the group, the contact's agent (Otto) and the customer's agent (Ada)
    assert q1 == sorted([f"gus_{s}@example.com", f"sara_{s}@example.com",
                         f"otto_{s}@example.com", f"ada_{s}@example.com"])
    # quote 2: customer and contact without agents: only the group
    assert q2 == sorted([f"gus_{s}@example.com", f"sara_{s}@example.com"])
    body = next(m for m in smtp.mails if m.subject == "Presupuesto 1 aprobado").part("text/plain")
    assert "Cliente: José Núñez SL" in body and "Contacto: Carla Contact" in body
    why = db.execute("SELECT spec, recipient_key, reason FROM notify.explain(%s, %s)",
                     (etype, '{"customer_id": 18, "contact_id": 71}')).fetchall()
    assert (f"key:user{s}:{{extra.contact_agent}}", None, "resolves to nobody for this event") in why


def test_s6_tickets_three_watches_on_one_table(db, smtp, erp):
    s = erp
    db.execute("SELECT notify.create_group(%s)", (f"support_{s}",))
    db.execute("SELECT notify.add_member(%s, %s)", (f"support_{s}", f"user{s}:5"))
    db.execute(f"SELECT notify.watch('tickets_{s}', %s)", (f"ticket.new.{s}",))
    db.execute(f"SELECT notify.watch('ticket_msgs_{s}', %s, condition => $$NEW.author = 'customer'$$)",
               (f"ticket.customer_reply.{s}",))
    db.execute(f"SELECT notify.watch('ticket_msgs_{s}', %s, condition => $$NEW.author = 'us'$$)",
               (f"ticket.our_reply.{s}",))
    template(db, f"tk_{s}", "[{{event.type}}] ticket {{row.ticket_id}}{{row.id}}", "{{row.body}}{{row.subject}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])",
               (f"s6a_{s}", f"ticket.new.{s}", f"tk_{s}", f"group:support_{s}"))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])",
               (f"s6b_{s}", f"ticket.customer_reply.{s}", f"tk_{s}", f"group:support_{s}"))
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.contact_email'])",
               (f"s6c_{s}", f"ticket.our_reply.{s}", f"tk_{s}"))
    db.execute(f"INSERT INTO tickets_{s} (contact_id, subject) VALUES (70, 'Printer broken')")
    db.execute(f"INSERT INTO ticket_msgs_{s} (ticket_id, author, body, contact_email) "
               f"VALUES (1, 'customer', 'Still broken', 'carla_{s}@example.com')")
    db.execute(f"INSERT INTO ticket_msgs_{s} (ticket_id, author, body, contact_email) "
               f"VALUES (1, 'us', 'Fixed', 'carla_{s}@example.com')")
    support = smtp.wait_for(f"gus_{s}@example.com", count=2)
    [contact] = smtp.wait_for(f"carla_{s}@example.com")
    assert sorted(m.subject.split("]")[0] for m in support) == \
        sorted([f"[ticket.new.{s}", f"[ticket.customer_reply.{s}"])
    assert contact.subject.startswith(f"[ticket.our_reply.{s}]")
    assert contact.part("text/plain").startswith("Fixed")


def test_s13_tech_contact_gets_sync_error_alerts(db, smtp, erp):
    s = erp
    etype = f"sync.error.{s}"
    db.execute("SELECT notify.set_recipient(%s, %s, 'Tech Contact')", (f"tech:{s}", f"tech_{s}@example.com"))
    template(db, f"sync_{s}", "Sync error in {{row.interface}}", "{{row.message}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s])",
               (f"s13_{s}", etype, f"sync_{s}", f"recipient:tech:{s}"))
    db.execute("SELECT notify.emit(%s, '{\"interface\": \"bank\", \"message\": \"timeout\"}')", (etype,))
    [mail] = smtp.wait_for(f"tech_{s}@example.com")
    assert mail.subject == "Sync error in bank"


def test_failing_context_query_fails_that_event_only(db, smtp, erp):
    s = erp
    etype = f"ctx.fail.{s}"
    template(db, f"cf_{s}", "ctx {{row.n}}", "{{extra.x}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s], context_query => %s)",
               (f"cf_{s}", etype, f"cf_{s}", f"email:cf_{s}@example.com",
                "SELECT jsonb_build_object('x', 10 / ($1->'row'->>'n')::int)"))
    db.execute("SELECT notify.emit(%s, '{\"n\": 0}')", (etype,))
    db.execute("SELECT notify.emit(%s, '{\"n\": 5}')", (etype,))
    [mail] = smtp.wait_for(f"cf_{s}@example.com")
    assert mail.subject == "ctx 5" and mail.part("text/plain").startswith("2")
    err = wait_until(lambda: db.execute("SELECT last_error FROM notify.delivery_log WHERE event_type = %s "
                                        "AND status = 'failed'", (etype,)).fetchone(), what="failed event")
    assert "division by zero" in err[0]


def test_context_query_runs_as_rule_owner(db, cluster, smtp, erp):
    """A notify_admin member cannot read a table through a rule's context query."""
    s = erp
    etype = f"ctx.owner.{s}"
    db.execute(f"CREATE TABLE salaries_{s} (amount int); INSERT INTO salaries_{s} VALUES (99999)")
    db.execute(f"CREATE ROLE admin_{s} LOGIN IN ROLE notify_admin")
    template(db, f"co_{s}", "owner {{row.n}}", "{{extra.salary}}")
    query = f"SELECT jsonb_build_object('salary', amount) FROM salaries_{s}"
    with cluster.connect() as conn:
        conn.execute(f"SET ROLE admin_{s}")
        # refused at once: the rule's author cannot read the table
        with pytest.raises(Exception) as exc:
            conn.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s], context_query => %s)",
                         (f"co_{s}", etype, f"co_{s}", f"email:co_{s}@example.com", query))
        assert f"permission denied for table salaries_{s}" in str(exc.value)
        # allowed while granted; the grant is then revoked: the worker must not read it for them
        db.execute(f"GRANT SELECT ON salaries_{s} TO admin_{s}")
        conn.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s], context_query => %s)",
                     (f"co_{s}", etype, f"co_{s}", f"email:co_{s}@example.com", query))
        db.execute(f"REVOKE SELECT ON salaries_{s} FROM admin_{s}")
    db.execute("SELECT notify.emit(%s, '{\"n\": 1}')", (etype,))
    err = wait_until(lambda: db.execute("SELECT last_error FROM notify.delivery_log WHERE event_type = %s "
                                        "AND status = 'failed'", (etype,)).fetchone(), what="failed event")
    assert f"permission denied for table salaries_{s}" in err[0]
    time.sleep(0.3)
    assert smtp.to(f"co_{s}@example.com") == []


def test_s5_payment_mails_admins_and_customer_with_invoice_pdf(db, smtp, erp):
    s = erp
    etype = f"payment.recorded.{s}"
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 40 + b"\n%%EOF\n"      # binary, 10 KB
    db.execute(f"CREATE TABLE invoices_{s} (id int PRIMARY KEY, customer_id int, number text, pdf bytea)")
    db.execute(f"CREATE TABLE payments_{s} (id serial PRIMARY KEY, invoice_id int, customer_id int, amount numeric)")
    db.execute(f"INSERT INTO invoices_{s} VALUES (7, 17, 'Nº 7', %s)", (pdf,))
    db.execute("SELECT notify.create_group(%s)", (f"admins_{s}",))
    db.execute("SELECT notify.add_member(%s, %s)", (f"admins_{s}", f"user{s}:2"))
    db.execute(f"SELECT notify.watch('payments_{s}', %s)", (etype,))
    template(db, f"paid_{s}", "Pago de la factura {{row.invoice_id}}", "Importe: {{row.amount}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s, %s], attachments_query => %s)", (
        f"s5_{s}", etype, f"paid_{s}", f"group:admins_{s}", f"key:customer{s}:{{row.customer_id}}",
        # read by position, whatever the columns are called (here: ?column?, ?column?, pdf)
        f"SELECT 'Factura ' || number || '.pdf', 'application/pdf', pdf "
        f"FROM invoices_{s} WHERE id = ($1->'row'->>'invoice_id')::int"))
    db.execute(f"INSERT INTO payments_{s} (invoice_id, customer_id, amount) VALUES (7, 17, 1210.00)")
    [boss] = smtp.wait_for(f"bob_{s}@example.com")
    [customer] = smtp.wait_for(f"jose_{s}@example.com")
    for mail in (boss, customer):
        assert mail.subject == "Pago de la factura 7"
        atts = [p for p in mail.message.walk() if p.get_content_disposition() == "attachment"]
        assert len(atts) == 1
        assert atts[0].get_content_type() == "application/pdf"
        assert atts[0].get_filename() == "Factura Nº 7.pdf"
        assert atts[0].get_payload(decode=True) == pdf
        assert "Importe: 1210.00" in mail.part("text/plain")


def test_s12_audit_of_changes_and_deletions(db, smtp, erp):
    s = erp
    etype = f"customer.audit.{s}"
    db.execute(f"SELECT notify.watch('customers_{s}', %s, '{{UPDATE,DELETE}}')", (etype,))
    template(db, f"audit_{s}", "{{event.op}} {{event.table}} {{row.id}}",
             "{{#changes}}{{column}}: {{old}} -> {{new}}\n{{/changes}}"
             "{{^changes}}deleted: {{old.name}} <{{old.email}}>\n{{/changes}}")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s, %s])",
               (f"s12_{s}", etype, f"audit_{s}", f"email:audit_{s}@example.com", f"email:dpo_{s}@example.com"))
    db.execute(f"UPDATE customers_{s} SET email = 'x_{s}@example.com', agent_id = NULL WHERE id = 17")
    db.execute(f"DELETE FROM customers_{s} WHERE id = 18")
    mails = smtp.wait_for(f"audit_{s}@example.com", count=2)
    assert len(smtp.wait_for(f"dpo_{s}@example.com", count=2)) == 2
    by_subject = {m.subject: m.part("text/plain").replace("\r\n", "\n") for m in mails}
    assert by_subject[f"UPDATE public.customers_{s} 17"] == \
        f"email: jose_{s}@example.com -> x_{s}@example.com\nagent_id: 4 -> \n"
    assert by_subject[f"DELETE public.customers_{s} 18"] == f"deleted: No Agent SA <noagent_{s}@example.com>\n"


def test_recipient_locale_picks_template_variant(db, smtp, erp):
    s = erp
    etype = f"welcome.{s}"
    template(db, f"welcome_{s}", "Welcome {{recipient.display_name}}", "Hello")
    template(db, f"welcome_{s}", "Bienvenida {{recipient.display_name}}", "Hola", locale="es")
    db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY[%s, %s, %s])",
               (f"loc_{s}", etype, f"welcome_{s}", f"recipient:user{s}:1", f"recipient:user{s}:2",
                f"recipient:user{s}:3"))
    db.execute("SELECT notify.emit(%s, '{}')", (etype,))
    [sara] = smtp.wait_for(f"sara_{s}@example.com")      # locale es
    [bob] = smtp.wait_for(f"bob_{s}@example.com")        # no locale
    assert sara.subject == "Bienvenida Sara Seller" and sara.part("text/plain").startswith("Hola")
    assert bob.subject == "Welcome Bob Boss" and bob.part("text/plain").startswith("Hello")
    [otto] = smtp.wait_for(f"otto_{s}@example.com")      # 'ES_es': tags compare case-insensitively
    assert otto.subject == "Bienvenida Otto Other"

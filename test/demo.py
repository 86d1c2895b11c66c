"""The ERP scenario of the demo: customers and orders, one order committed,
one rolled back; exactly one mail arrives, and the delivery log says so."""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "lib"))
from harness import Cluster, SmtpServer  # noqa: E402

SQL_SETUP = """
CREATE EXTENSION notify_ext;
SELECT notify.set_smtp('smtp://127.0.0.1:{port}', 'erp@example.com', tls => 'off');

CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, email text NOT NULL);
CREATE TABLE orders (id serial PRIMARY KEY, customer_id int REFERENCES customers,
                     total numeric(12,2) NOT NULL, created_at date NOT NULL DEFAULT current_date);
INSERT INTO customers VALUES (17, 'José Núñez', 'jose@example.com');

SELECT notify.watch('orders', 'order.created');
SELECT notify.set_template('order_created',
  'Pedido {{{{row.id}}}} registrado',
  'Hola,\n\nhemos registrado el pedido {{{{row.id}}}} por {{{{row.total}}}} EUR.\n',
  '<p>Hola,</p><p>hemos registrado el pedido <b>{{{{row.id}}}}</b> por {{{{row.total}}}} EUR.</p>');
SELECT notify.create_rule('order to sales', 'order.created', 'order_created',
                          ARRAY['email:sales@example.com']);
"""


def main():
    smtp = SmtpServer()
    print(f"== SMTP server (aiosmtpd) listening on 127.0.0.1:{smtp.port}")
    cluster = Cluster(dbname="erp")
    print(f"== PostgreSQL cluster in {cluster.dir}, notify_ext preloaded; database erp")
    try:
        with cluster.connect() as db:
            for stmt in SQL_SETUP.format(port=smtp.port).split(";\n"):
                if stmt.strip():
                    db.execute(stmt)
            print("== ERP schema created; orders watched; rule 'order to sales' mails sales@example.com")

            with cluster.connect(autocommit=False) as erp:
                erp.execute("INSERT INTO orders (customer_id, total) VALUES (17, 99.90)")
                erp.rollback()
                print("== order inserted and ROLLED BACK: must send nothing")
                t0 = time.monotonic()
                erp.execute("INSERT INTO orders (customer_id, total) VALUES (17, 1000.50)")
                erp.commit()
                print("== order inserted and COMMITTED")

            mails = smtp.wait_for("sales@example.com", timeout=15)
            print(f"== first mail received {1000 * (mails[0].received_at - t0):.0f} ms after COMMIT")
            time.sleep(1)
            mails = smtp.to("sales@example.com")
            print(f"== mails received: {len(mails)}\n")
            for m in mails:
                print(f"MAIL FROM:<{m.mail_from}>  RCPT TO:{m.rcpt_tos}")
                print(m.data.decode("utf-8", "replace"))
            print("== notify.delivery_log")
            time.sleep(0.2)
            for row in db.execute("SELECT message_id, event_type, rule, address, status, attempts, "
                                  "subject, smtp_response FROM notify.delivery_log ORDER BY 1"):
                print("  ", row)
            if len(mails) != 1:
                print("DEMO FAILED: expected exactly one mail", file=sys.stderr)
                return 1
            return 0
    finally:
        cluster.destroy()
        smtp.stop()


if __name__ == "__main__":
    sys.exit(main())

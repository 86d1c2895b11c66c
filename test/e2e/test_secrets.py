"""The SMTP password is never visible: not in pg_settings, not in
notify.test_smtp's report, not in the server log of a refused login, not
in any table or view a notify_admin member can read."""
import base64

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult

from harness import free_port, wait_until


class Sink:
    async def handle_DATA(self, server, session, envelope):
        return "250 OK"


def forms(secret):
    """The password as it could leak: plain, base64 alone, and inside AUTH PLAIN."""
    return [secret, base64.b64encode(secret.encode()).decode(),
            base64.b64encode(b"\0erp\0" + secret.encode()).decode(),
            base64.b64encode(b"erp\0erp\0" + secret.encode()).decode()]


def test_password_never_visible(db, cluster, uniq):
    secret = f"Pw-{uniq}-x9"
    port = free_port()
    ctl = Controller(Sink(), hostname="127.0.0.1", port=port, auth_required=True, auth_require_tls=False,
                     authenticator=lambda *a: AuthResult(success=False))      # every login refused
    ctl.start()
    try:
        ch = f"sec_{uniq}"
        db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', 'erp', %s, tls => 'off', name => %s)",
                   (f"smtp://127.0.0.1:{port}", secret, ch))
        db.execute("SELECT notify.set_template(%s, 's', 'b')", (f"t_{uniq}",))
        db.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['email:x@example.com'], channel => %s)",
                   (f"r_{uniq}", f"sec.{uniq}", f"t_{uniq}", ch))
        db.execute("SELECT notify.emit(%s, '{}')", (f"sec.{uniq}",))
        err = wait_until(lambda: db.execute("SELECT last_error FROM notify.delivery_log WHERE event_type = %s "
                                            "AND last_error IS NOT NULL", (f"sec.{uniq}",)).fetchone(),
                         what="the refused login in the log")[0]
        report = db.execute("SELECT notify.test_smtp(%s)", (ch,)).fetchone()[0]
    finally:
        ctl.stop()
    print(f"logged: {err}\nreport:\n{report}")
    assert "FAILED" in report and "(credentials hidden)" in report

    # every relation of schema notify that notify_admin may read, every row, as text
    readable = [r[0] for r in db.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'notify'::regnamespace "
        "AND c.relkind IN ('r', 'v') AND has_table_privilege('notify_admin', c.oid, 'SELECT')")]
    assert "notify.channel_secret" not in readable and "notify.channels" in readable
    dumped = "\n".join(str(db.execute(f"SELECT coalesce(string_agg(to_jsonb(x)::text, E'\\n'), '') FROM {t} x")
                          .fetchone()[0]) for t in readable)
    settings = "\n".join(r[0] or "" for r in db.execute("SELECT setting FROM pg_settings"))
    log = cluster.log()
    for f in forms(secret):
        assert f not in report, "test_smtp report"
        assert f not in dumped, "a relation notify_admin can read"
        assert f not in settings, "pg_settings"
        assert f not in log, "the server log"
    print(f"checked {len(readable)} readable relations, pg_settings, the server log, the report")

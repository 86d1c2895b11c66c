"""Nobody becomes superuser through notify_ext.

A notify_admin member registers queries that the worker (a superuser
session) runs: a rule's context and attachments queries, a directory, a
schedule.  Each of them calls set_config() on search_path and
application_name.  The member has also planted, in a schema of theirs,
operators that shadow =, <, <=, || for text, integer, bigint and
timestamptz: each records its call and, called by a superuser, makes the
member superuser.  Nothing the queries set may outlive them: no worker and
no caller session shows the values afterwards, no shadow is ever called,
and the member is not superuser at the end.

The second test calls every function of schema notify (from pg_proc) as a
notify_admin member whose search_path starts with another role's schema
full of such shadows: zero calls.
"""
import psycopg
import pytest
from psycopg import sql

from harness import wait_until

TYPES = ["text", "integer", "bigint", "timestamptz"]
# the function each shadow computes, so the query still gives right answers
REAL = {("=", "text"): "texteq", ("<", "text"): "text_lt", ("<=", "text"): "text_le",
        ("||", "text"): "textcat",
        ("=", "integer"): "int4eq", ("<", "integer"): "int4lt", ("<=", "integer"): "int4le",
        ("=", "bigint"): "int8eq", ("<", "bigint"): "int8lt", ("<=", "bigint"): "int8le",
        ("=", "timestamptz"): "timestamptz_eq", ("<", "timestamptz"): "timestamptz_lt",
        ("<=", "timestamptz"): "timestamptz_le"}
RESULT = {"=": "boolean", "<": "boolean", "<=": "boolean", "||": "text"}


def plant_shadows(conn, schema, victim_role):
    """Operators in `schema` shadowing pg_catalog's: each call is recorded
    in schema.calls (and raised as a WARNING, which a rolled-back call
    cannot take back); called by a superuser, it makes victim_role one."""
    s = sql.Identifier(schema)
    conn.execute(sql.SQL("CREATE TABLE {}.calls (who text, op text, at timestamptz DEFAULT now())").format(s))
    conn.execute(sql.SQL("GRANT INSERT, SELECT ON {}.calls TO PUBLIC").format(s))
    conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO PUBLIC").format(s))
    for (op, typ), real in REAL.items():
        fn = sql.Identifier(f"spy_{real}")
        conn.execute(sql.SQL("""
            CREATE FUNCTION {s}.{fn}(a {t}, b {t}) RETURNS {r} LANGUAGE plpgsql AS $body$
            BEGIN
                RAISE WARNING 'SHADOW OPERATOR CALLED: % % by %', {opl}, {tl}, current_user;
                INSERT INTO {s}.calls (who, op) VALUES (current_user, {opl} || ' ' || {tl});
                IF (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname OPERATOR(pg_catalog.=) current_user) THEN
                    EXECUTE {alter};
                END IF;
                RETURN pg_catalog.{real}(a, b);
            END $body$""").format(
            s=s, fn=fn, t=sql.SQL(typ), r=sql.SQL(RESULT[op]), opl=sql.Literal(op), tl=sql.Literal(typ),
            alter=sql.Literal(f'ALTER ROLE "{victim_role}" SUPERUSER'), real=sql.SQL(real)))
        conn.execute(sql.SQL("CREATE OPERATOR {s}.{op} (LEFTARG = {t}, RIGHTARG = {t}, FUNCTION = {s}.{fn})")
                     .format(s=s, op=sql.SQL(op), t=sql.SQL(typ), fn=fn))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION {s}.{fn}({t}, {t}) TO PUBLIC")
                     .format(s=s, fn=fn, t=sql.SQL(typ)))


def connect_as(cluster, role, **kw):
    return psycopg.connect(host=cluster.sock, port=cluster.port, user=role, dbname=cluster.dbname,
                           autocommit=True, **kw)


def is_superuser(db, role):
    return db.execute("SELECT rolsuper FROM pg_roles WHERE rolname = %s", (role,)).fetchone()[0]


def session_settings(conn):
    return conn.execute("SELECT current_setting('search_path'), current_setting('application_name')").fetchone()


def test_stored_queries_cannot_change_the_worker_or_the_caller(db, cluster, smtp, uniq):
    mallory = f"mallory_{uniq}"
    evil = f"evil_{uniq}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE notify_admin").format(sql.Identifier(mallory)))
    db.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(evil), sql.Identifier(mallory)))
    m = connect_as(cluster, mallory)
    plant_shadows(m, evil, mallory)

    leak = (f"pg_catalog.set_config('search_path', '{evil}, pg_catalog', false) IS NOT NULL"
            f" AND pg_catalog.set_config('application_name', 'pwned_{uniq}', false) IS NOT NULL")
    ev = f"esc.{uniq}"
    m.execute("SELECT notify.set_template(%s, 'esc {{row.n}} {{extra.k}}', 'body')", (f"t_{uniq}",))
    # a directory whose query leaks
    m.execute("SELECT notify.add_directory(%s, %s)",
              (f"dir{uniq}", f"SELECT 'dir_{uniq}@example.com' AS email, NULL AS display_name, NULL AS phone, "
                             f"NULL AS locale WHERE {leak}"))
    # a rule whose context query and attachments query leak
    m.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to', %s], "
              "context_query => %s, attachments_query => %s)",
              (f"r_{uniq}", ev, f"t_{uniq}", f"key:dir{uniq}:1",
               f"SELECT pg_catalog.jsonb_build_object('k', 'v') WHERE {leak}",
               f"SELECT 'a.txt' AS filename, 'text/plain' AS content_type, 'hello'::bytea AS content WHERE {leak}"))
    # a schedule whose query leaks, and a rule for its events
    m.execute("SELECT notify.schedule(%s, '0 0 1 1 *', %s, %s)",
              (f"s_{uniq}", f"SELECT 'sched_{uniq}@example.com' AS to, 7 AS n WHERE {leak}", f"{ev}.s"))
    m.execute("SELECT notify.create_rule(%s, %s, %s, ARRAY['field:row.to'])",
              (f"rs_{uniq}", f"{ev}.s", f"t_{uniq}"))
    assert not is_superuser(db, mallory)

    # the worker runs all four: the event's rule (context, attachments, directory) ...
    db.execute("SELECT notify.emit(%s, jsonb_build_object('to', %s::text, 'n', 1))", (ev, f"row_{uniq}@example.com"))
    got = smtp.wait_for(f"row_{uniq}@example.com", timeout=20)
    assert got[0].subject == "esc 1 v"
    assert got[0].part("text/plain") is not None
    smtp.wait_for(f"dir_{uniq}@example.com", timeout=20)
    # ... and the schedule, made due now
    db.execute("UPDATE notify.schedule SET next_run = now() - interval '1 s' WHERE name = %s", (f"s_{uniq}",))
    db.execute("SELECT notify._wake_worker()")
    smtp.wait_for(f"sched_{uniq}@example.com", timeout=20)
    # more rounds of every worker after the leaks (statements of theirs planned since)
    for i in range(8):
        db.execute("SELECT notify.emit(%s, jsonb_build_object('to', %s::text, 'n', %s::int))",
                   (ev, f"more_{uniq}@example.com", i))
    smtp.wait_for(f"more_{uniq}@example.com", count=8, timeout=20)

    # a superuser's session calling explain() and run_schedule() is left as it was
    before = session_settings(db)
    rows = db.execute("SELECT rule, address FROM notify.explain(%s, %s)",
                      (ev, '{"to": "x@example.com", "n": 2}')).fetchall()
    assert (f"r_{uniq}", "x@example.com") in rows
    assert session_settings(db) == before, "explain() changed its caller's session"
    assert db.execute("SELECT notify.run_schedule(%s)", (f"s_{uniq}",)).fetchone()[0] == 1
    assert session_settings(db) == before, "run_schedule() changed its caller's session"
    # ... and so is a notify_admin member's own
    before_m = session_settings(m)
    m.execute("SELECT * FROM notify.explain(%s, %s)", (ev, '{"to": "y@example.com"}')).fetchall()
    assert session_settings(m) == before_m

    # no worker shows the values
    apps = db.execute("SELECT pid, application_name FROM pg_stat_activity "
                      "WHERE backend_type = 'notify_ext worker'").fetchall()
    assert apps and all(a == "notify_ext worker" for _, a in apps), apps
    calls = db.execute(sql.SQL("SELECT who, op FROM {}.calls").format(sql.Identifier(evil))).fetchall()
    log = cluster.log()
    print(f"worker sessions: {apps}; shadow calls: {calls}")
    assert calls == [], "a shadow operator was called"
    assert "SHADOW OPERATOR CALLED" not in log
    assert f"pwned_{uniq}" not in log
    assert not is_superuser(db, mallory), "the notify_admin member became superuser"
    m.close()


# Arguments for the functions of schema notify, by name; others get values by type.
ARGS = {
    "watch": ["{tbl}", "'hostile2.{u}'", "'{{INSERT,UPDATE}}'", "'NEW.n > 0'", "NULL", "NULL"],
    "unwatch": ["{tbl}", "'hostile.{u}'"],
    "emit": ["'hostile.{u}'", "'{{\"n\": 1, \"to\": \"h@example.com\"}}'", "'user:{u}'"],
    "explain": ["'hostile.{u}'", "'{{\"n\": 1, \"to\": \"h@example.com\"}}'", "'user:{u}'"],
    "render": ["'t_{u}'", "'{{\"row\": {{\"n\": 1}}}}'", "'es-ES'"],
    "set_template": ["'t2_{u}'", "'s {{{{row.n}}}}'", "'b'", "'<p>b</p>'", "'es'"],
    "drop_template": ["'t_{u}'", "NULL"],
    "create_rule": ["'r2_{u}'", "'hostile.{u}'", "'t_{u}'", "ARRAY['group:g_{u}', 'supervisors', 'actor']",
                    "'email'", "'SELECT $1'", "'SELECT ''a'', ''b'', ''c''::bytea'", "'x.csv'",
                    "'immediate'", "'0 8 * * *'"],
    "drop_rule": ["'r_{u}'"],
    "enable_rule": ["'r_{u}'", "false"],
    "set_recipient": ["'user:{u}'", "'u@example.com'", "'U'", "'+1'", "'es'"],
    "drop_recipient": ["'user:{u}'"],
    "create_group": ["'g2_{u}'", "'d'"],
    "drop_group": ["'g_{u}'"],
    "add_member": ["'g_{u}'", "'user:{u}'"],
    "remove_member": ["'g_{u}'", "'user:{u}'"],
    "set_supervisor": ["'user:{u}'", "'boss:{u}'"],
    "unset_supervisor": ["'user:{u}'", "'boss:{u}'"],
    "set_preference": ["'user:{u}'", "'hostile.{u}'", "'off'", "'email'"],
    "preferences": ["'user:{u}'"],
    "add_directory": ["'cust2{u}'", "'SELECT ''c@example.com'' AS email, NULL AS display_name, NULL AS phone, "
                      "NULL AS locale WHERE $1 = ''1'''"],
    "drop_directory": ["'cust{u}'"],
    "set_smtp": ["'smtp://127.0.0.1:9'", "'erp@example.com'", "'u'", "'p'", "'off'", "'ch_{u}'", "60"],
    "set_webhook": ["'wh_{u}'", "'http://127.0.0.1:9/x'", "'{{\"t\": \"{{{{message.subject}}}}\"}}'",
                    "'{{\"Authorization\": \"Bearer x\"}}'", "'application/json'", "60"],
    "test_smtp": ["'ch_{u}'", "NULL"],
    "schedule": ["'s2_{u}'", "'*/5 * * * *'", "'SELECT 1 AS n'", "'hostile.{u}'", "false",
                 "'k-{{row.n}}'"],
    "unschedule": ["'s_{u}'"],
    "run_schedule": ["'s_{u}'"],
    "next_run": ["'0 8 * * 1-5'", "'2026-03-29 01:30+00'"],
    "_check_address": ["'a@example.com'", "'to'"],
    "_check_key": ["'user:{u}'"],
    "_check_spec": ["'key:customer:{{row.n}}'"],
    "_cron_check": ["'*/5 8-18 * * 1-5'"],
    "_cron_prev": ["'0 8 * * *'", "now()"],
    "_group_id": ["'g_{u}'"],
    "_query_columns": ["'SELECT 1 = 1, ''a'' || ''b'''", "'jsonb'"],
    "_rows_csv": ["'[{{\"a\": 1}}]'", "'{{a}}'"],
    "retry": ["{msg}"],
    "cancel": ["{msg}"],
    "purge": ["'0 s'"],
    "set_bounce_mailbox": ["'imap://127.0.0.1:9/INBOX'", "'u'", "'p'", "'off'", "'ch_{u}'", "false"],
    "drop_bounce_mailbox": ["'ch_{u}'"],
    "check_bounces": ["NULL"],
    "_check_bounce_mailbox": ["'imaps://127.0.0.1/INBOX'", "'verify'"],
    "unsuppress": ["'h@example.com'"],
}
BY_TYPE = {"text": "'x'", "jsonb": "'{{}}'", "bigint": "1", "integer": "1", "boolean": "false",
           "text[]": "'{{}}'", "regclass": "{tbl}", "interval": "'1 day'",
           "timestamp with time zone": "now()", "name": "'n'", "regtype": "'jsonb'", "notify.event": None}


def test_every_function_is_safe_under_a_hostile_search_path(db, cluster, smtp, uniq):
    trudy = f"trudy_{uniq}"
    alice = f"alice_{uniq}"
    other = f"other_{uniq}"
    db.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(trudy)))
    db.execute(sql.SQL("CREATE ROLE {} LOGIN IN ROLE notify_admin").format(sql.Identifier(alice)))
    db.execute(sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(sql.Identifier(other), sql.Identifier(trudy)))
    with connect_as(cluster, trudy) as t:
        plant_shadows(t, other, trudy)

    # something for each function to work on, made by alice with a normal path
    tbl = f"public.orders_{uniq}"
    db.execute(f"CREATE TABLE {tbl} (id integer GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n integer, to_addr text)")
    db.execute(sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.SQL(tbl), sql.Identifier(alice)))
    a = connect_as(cluster, alice)
    u = uniq
    for stmt in [
        f"SELECT notify.set_recipient('user:{u}', 'u@example.com')",
        f"SELECT notify.set_recipient('boss:{u}', 'b@example.com')",
        f"SELECT notify.create_group('g_{u}')",
        f"SELECT notify.add_member('g_{u}', 'user:{u}')",
        f"SELECT notify.set_template('t_{u}', 's {{{{row.n}}}}', 'b {{{{row.n}}}}')",
        f"SELECT notify.create_rule('r_{u}', 'hostile.{u}', 't_{u}', ARRAY['field:row.to', 'group:g_{u}'])",
        f"SELECT notify.schedule('s_{u}', '0 0 1 1 *', 'SELECT 1 AS n', 'hostile.{u}')",
        f"SELECT notify.watch('{tbl}', 'hostile.{u}')",
        f"SELECT notify.set_smtp('smtp://127.0.0.1:{smtp.port}', 'erp@example.com', tls => 'off', name => 'ch_{u}')",
        f"SELECT notify.add_directory('cust{u}', 'SELECT ''c@example.com'' AS email, NULL AS display_name, "
        f"NULL AS phone, NULL AS locale')",
    ]:
        a.execute(stmt)
    msg = db.execute("INSERT INTO notify.message (event_type, address, channel, status, subject) "
                     "VALUES (%s, 'f@example.com', 'email', 'failed', 's') RETURNING id",
                     (f"hostile.{u}",)).fetchone()[0]

    funcs = db.execute("""
        SELECT p.proname, p.oid::regprocedure::text,
               array(SELECT format_type(t, NULL) FROM unnest(p.proargtypes) t),
               p.prokind, p.prorettype = 'trigger'::regtype
          FROM pg_proc p WHERE p.pronamespace = 'notify'::regnamespace ORDER BY 1""").fetchall()
    warnings = []
    a.add_notice_handler(lambda d: warnings.append(d.message_primary))
    a.execute(sql.SQL("SET search_path = {}, pg_catalog, public").format(sql.Identifier(other)))
    called, failed = [], []
    for name, sig, argtypes, kind, is_trigger in funcs:
        if is_trigger:
            continue            # trigger functions: fired by the capture test below
        if name in ARGS:
            args = [x.format(u=u, tbl=f"'{tbl}'", msg=msg) for x in ARGS[name]]
        else:
            args = []
            for t in argtypes:
                v = BY_TYPE.get(t)
                if v is None:
                    args = None
                    break
                args.append(v.format(tbl=f"'{tbl}'"))
            if args is None and name == "_event_context":
                args = ["(SELECT e FROM notify.event e ORDER BY id DESC LIMIT 1)"]
        args = args[:len(argtypes)]
        call = f"SELECT * FROM {sig.split('(')[0]}({', '.join(f'{v}::{t}' if not v.startswith('(') else v for v, t in zip(args, argtypes))})"
        try:
            a.execute("BEGIN")
            a.execute(call).fetchall()
            called.append(name)
        except psycopg.Error as e:
            failed.append((name, str(e).splitlines()[0]))
        finally:
            a.execute("ROLLBACK")
    # the capture trigger, fired by the ERP's own insert under the hostile path
    a.execute(f"INSERT INTO {tbl} (n, to_addr) VALUES (1, 'c@example.com')")
    print(f"called {len(called)} functions without error: {called}")
    print(f"refused (their own checks, as alice): {failed}")
    shadow_calls = [w for w in warnings if "SHADOW OPERATOR CALLED" in w]
    print(f"shadow calls: {len(shadow_calls)} {shadow_calls[:5]}")
    assert len(called) >= 30, "too few functions ran to mean anything"
    assert shadow_calls == []
    assert db.execute(sql.SQL("SELECT count(*) FROM {}.calls").format(sql.Identifier(other))).fetchone()[0] == 0
    assert not is_superuser(db, trudy)
    a.close()

"""ALTER EXTENSION notify_ext UPDATE from every released version (0.1,
0.2) to this one: nothing is lost, the workers
wait for the update (and say so) instead of failing, and the updated schema
is the same as a fresh install's, object for object."""
import psycopg
import pytest

from harness import Cluster, wait_until

CURRENT = "0.3"

# every object of schema notify, described without OIDs
SCHEMA = """
SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
       || CASE WHEN a.attnotnull THEN ' not null' ELSE '' END
       || coalesce(' default ' || pg_get_expr(d.adbin, d.adrelid), '')
       || coalesce(' identity ' || nullif(a.attidentity::text, ''), '')
       || coalesce(' compression ' || nullif(a.attcompression::text, ''), '')
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
  LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
 WHERE c.relnamespace = 'notify'::regnamespace AND c.relkind IN ('r', 'v')
UNION ALL
SELECT 'constraint ' || conrelid::regclass || ' ' || conname || ' ' || pg_get_constraintdef(oid)
  FROM pg_constraint WHERE connamespace = 'notify'::regnamespace
UNION ALL
SELECT 'index ' || pg_get_indexdef(indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
 WHERE c.relnamespace = 'notify'::regnamespace
UNION ALL
SELECT 'function ' || pg_get_functiondef(p.oid) || ' acl ' || coalesce(p.proacl::text, '')
  FROM pg_proc p WHERE p.pronamespace = 'notify'::regnamespace
UNION ALL
SELECT 'view ' || c.relname || ' ' || pg_get_viewdef(c.oid)
  FROM pg_class c WHERE c.relnamespace = 'notify'::regnamespace AND c.relkind = 'v'
UNION ALL
SELECT 'acl ' || c.relname || ' ' || coalesce(c.relacl::text, '')
  FROM pg_class c WHERE c.relnamespace = 'notify'::regnamespace AND c.relkind IN ('r', 'v', 'S')
UNION ALL
SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
 WHERE c.relnamespace = 'notify'::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'dumped ' || x::regclass::text
  FROM pg_extension e, unnest(e.extconfig) x WHERE e.extname = 'notify_ext'
ORDER BY 1
"""

DATA = ["notify.recipient", "notify.template", "notify.rule", "notify.channel", "notify.channel_secret",
        "notify.recipient_group", "notify.group_member", "notify.preference", "notify.event",
        "notify.message", "notify.attempt"]


def columns(db):
    return {t: [r[0] for r in db.execute("SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass "
                                         "AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (t,))]
            for t in DATA}


def rows(db, cols):
    """Each table's rows, as 0.1 had its columns."""
    return {t: sorted(map(str, db.execute(
        f"SELECT to_jsonb(x) FROM (SELECT {', '.join(cols[t])} FROM {t}) x").fetchall())) for t in DATA}


@pytest.mark.parametrize("old", ["0.1", "0.2"])
def test_update_keeps_everything_and_matches_a_fresh_install(smtp, old):
    c = Cluster(dbname="erpup", settings={"notify.poll_interval": "'1s'"})
    try:
        with c.connect() as db:
            db.execute(f"CREATE EXTENSION notify_ext VERSION '{old}'")
            db.execute("SELECT notify.set_smtp(%s, 'erp@example.com', tls => 'off')",
                       (f"smtp://127.0.0.1:{smtp.port}",))
            db.execute("SELECT notify.set_recipient('user:1', 'up1@example.com', 'Ana')")
            db.execute("SELECT notify.create_group('g')")
            db.execute("SELECT notify.add_member('g', 'user:1')")
            db.execute("SELECT notify.set_preference('user:1', 'x', 'immediate')")
            db.execute("SELECT notify.set_template('t', 'up {{row.n}}', 'n = {{row.n}}')")
            db.execute("SELECT notify.create_rule('r', 'up.event', 't', ARRAY['group:g', 'field:row.to'])")
            # the library does not serve an older schema: events wait, and the log says why
            wait_until(lambda: "Run ALTER EXTENSION notify_ext UPDATE" in c.log(), timeout=20,
                       what="workers waiting for the update")
            # a new function called through an old declaration refuses instead of crashing
            # (0.2 declares worker_status as this version does)
            if old == "0.1":
                try:
                    db.execute("SELECT * FROM notify.worker_status()")
                    raise AssertionError("worker_status ran against the 0.1 declaration")
                except psycopg.Error as e:
                    assert "ALTER EXTENSION notify_ext UPDATE" in (e.diag.message_hint or "")
            db.execute("SELECT notify.emit('up.event', jsonb_build_object('n', g, 'to', 'up' || g || '@example.com')) "
                       "FROM generate_series(2, 4) g")
            db.execute("INSERT INTO notify.message (event_type, address, channel, status, subject, sent_at) "
                       "VALUES ('old', 'old@example.com', 'email', 'sent', 'sent long ago', now())")
            cols_01 = columns(db)
            before = rows(db, cols_01)
            assert f"is version {old}, the library is {CURRENT}" in c.log()
            assert "Run ALTER EXTENSION notify_ext UPDATE" in c.log()

            db.execute("ALTER EXTENSION notify_ext UPDATE")
            assert db.execute("SELECT extversion FROM pg_extension WHERE extname = 'notify_ext'").fetchone()[0] == CURRENT
            after = rows(db, cols_01)
            for t in DATA:
                assert after[t] == before[t], f"{t} changed in the update"
            new_cols = {t: sorted(set(c) - set(cols_01[t])) for t, c in columns(db).items() if set(c) - set(cols_01[t])}
            print(f"rows of {len(DATA)} tables kept; columns added: {new_cols}")

            # the workers notice and send what waited: 3 events, each to its address and to Ana
            for n in (2, 3, 4):
                smtp.wait_for(f"up{n}@example.com", timeout=30)
            smtp.wait_for("up1@example.com", count=3, timeout=30)
            # and the new version's features work on the updated schema
            db.execute("SELECT notify.schedule('s', '@daily', 'SELECT 1 AS x', 'up.sched')")
            assert db.execute("SELECT notify.run_schedule('s')").fetchone()[0] == 1
            db.execute("SELECT notify.unschedule('s')")
            updated = [r[0] for r in db.execute(SCHEMA)]

            db.execute("DROP EXTENSION notify_ext")
            db.execute("CREATE EXTENSION notify_ext")
            fresh = [r[0] for r in db.execute(SCHEMA)]
        missing = sorted(set(fresh) - set(updated))
        extra = sorted(set(updated) - set(fresh))
        print(f"{len(fresh)} objects in a fresh {CURRENT}; missing after the update: {missing[:5]}; extra: {extra[:5]}")
        assert not missing and not extra
    except BaseException:
        print(c.log()[-5000:])
        raise
    finally:
        c.destroy()

--
-- setup: what CREATE EXTENSION notify_ext installs, and its rights.
-- (CREATE EXTENSION in a database notify.database does not name is refused;
-- that needs a second database and is tested end-to-end.)
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

-- the extension, its schema and its version
SELECT e.extname, e.extversion, n.nspname AS schema, e.extrelocatable
  FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
 WHERE e.extname = 'notify_ext';

-- every function of the interface, with its arguments and result
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS arguments,
       pg_get_function_result(p.oid) AS result
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace
 ORDER BY p.proname, arguments;

-- tables and views
SELECT c.relname, c.relkind
  FROM pg_class c
 WHERE c.relnamespace = 'notify'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'm')
 ORDER BY c.relname;

-- the views' columns (the delivery log and channels are read by users)
SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod) AS type
  FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
 WHERE c.relnamespace = 'notify'::regnamespace AND c.relkind = 'v'
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY c.relname, a.attnum;

-- the management role exists and cannot log in
SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb
  FROM pg_roles WHERE rolname = 'notify_admin';

-- the notify.* settings are registered (only names and defaults that do not depend on the run)
SELECT name, context, vartype
  FROM pg_settings
 WHERE name LIKE 'notify.%' AND name <> 'notify.database'
 ORDER BY name;
SHOW notify.database;

-- PUBLIC (grantee 0) holds no right on anything in schema notify.
-- A NULL ACL means the default one: for a function that includes EXECUTE for PUBLIC.
SELECT p.oid::regprocedure AS function_executable_by_public
  FROM pg_proc p, aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
 WHERE p.pronamespace = 'notify'::regnamespace AND a.grantee = 0;
SELECT c.relname AS relation_accessible_by_public, a.privilege_type
  FROM pg_class c,
       aclexplode(coalesce(c.relacl, acldefault(CASE WHEN c.relkind = 'S' THEN 's' ELSE 'r' END::"char",
                                                c.relowner))) a
 WHERE c.relnamespace = 'notify'::regnamespace AND a.grantee = 0;
SELECT n.nspname AS schema_usable_by_public, a.privilege_type
  FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
 WHERE n.nspname = 'notify' AND a.grantee = 0;

-- notify_admin may use the schema
SELECT has_schema_privilege('notify_admin', 'notify', 'USAGE') AS admin_uses_schema;

-- the secrets are granted to nobody
SELECT count(*) AS secret_grants
  FROM pg_class c, aclexplode(c.relacl) a
 WHERE c.oid = 'notify.channel_secret'::regclass AND a.grantee <> c.relowner;

-- every SECURITY DEFINER function pins search_path
SELECT p.oid::regprocedure AS security_definer, p.proconfig
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace AND p.prosecdef
 ORDER BY p.oid::regprocedure::text;
SELECT p.oid::regprocedure AS security_definer_without_search_path
  FROM pg_proc p
 WHERE p.pronamespace = 'notify'::regnamespace AND p.prosecdef
   AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) c WHERE c LIKE 'search\_path=%');
-- and no pinned search_path puts a schema writable by others before pg_catalog
SELECT p.oid::regprocedure AS function, c AS setting
  FROM pg_proc p, unnest(p.proconfig) c
 WHERE p.pronamespace = 'notify'::regnamespace AND c LIKE 'search\_path=%'
   AND c NOT LIKE 'search\_path=pg\_catalog%';

-- the configuration tables are dumped with pg_dump, and so are the sequences
-- of their identity columns (else a restored database reuses taken ids)
SELECT x.oid::regclass AS dumped, c.relkind
  FROM pg_extension e, unnest(e.extconfig) x(oid), pg_class c
 WHERE e.extname = 'notify_ext' AND c.oid = x.oid
 ORDER BY x.oid::regclass::text;
SELECT t.relname AS config_table_with_undumped_sequence
  FROM pg_extension e, unnest(e.extconfig) x(oid), pg_class t, pg_depend d, pg_class s
 WHERE e.extname = 'notify_ext' AND t.oid = x.oid
   AND d.refobjid = t.oid AND d.classid = 'pg_class'::regclass AND d.objid = s.oid
   AND s.relkind = 'S' AND NOT s.oid = ANY (e.extconfig);

-- this database's identity: a token of 12 hexadecimal digits, the same in
-- the table pg_dump dumps and the one it does not; a database that is no
-- copy is left alone by adopt_copy()
SELECT (SELECT token FROM notify.identity) = (SELECT token FROM notify.identity_local) AS same_token,
       (SELECT token FROM notify.identity_local) ~ '^[0-9a-f]{12}$' AS token_form,
       (SELECT database_name FROM notify.identity_local) = current_database() AS this_database;
SELECT copy_reason, source_is_template FROM notify._identity();
SELECT notify.adopt_copy();
-- which tables pg_dump dumps: identity yes, identity_local no
SELECT x::regclass AS dumped FROM pg_extension e, unnest(e.extconfig) x
 WHERE e.extname = 'notify_ext' AND x::regclass::text LIKE 'notify.identity%';

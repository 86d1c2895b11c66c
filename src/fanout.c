/*-------------------------------------------------------------------------
 *
 * fanout.c
 *	  Event x rules x recipient specs -> rendered messages.
 *
 * The worker calls fanout_pending_events inside a transaction: it claims a
 * batch of events with FOR UPDATE SKIP LOCKED, writes their messages and
 * marks them processed, all in that one transaction, so an event is either
 * fully fanned out or not at all.  Each event runs in its own
 * subtransaction: a failing event (missing template, bad data) is marked
 * failed with its error and the batch goes on.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/transam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/jsonb.h"
#include "utils/plancache.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "funcapi.h"
#include "fmgr.h"
#include "lib/stringinfo.h"

#include "mime.h"
#include "notify_ext.h"
#include "template.h"

/* One claimed event, copied out of SPI's memory. */
typedef struct PendingEvent
{
	int64		id;
	char	   *event_type;
	Jsonb	   *context;
} PendingEvent;

/* One rule that applies to an event. */
typedef struct RuleInfo
{
	int64		id;
	char	   *name;
	char	   *template;
	char	   *channel;
	char	   *default_mode;
	char	   *context_query;	/* NULL: no `extra` */
	char	   *attachments_query;	/* NULL: no attachments */
	char	   *attach_rows_csv;	/* NULL: no CSV of a report's rows */
	Oid			owner;			/* the role its queries run as */
	bool		webhook;		/* its channel is a webhook: addressed by phone or key */
	char	   *body_template;	/* webhook: the channel's body */
	bool		body_json;		/* webhook: the body is JSON, values are escaped for it */
	Datum	   *specs;
	int			nspecs;
} RuleInfo;

/* Who a spec resolved to. */
typedef struct Recipient
{
	char	   *key;			/* NULL for literal addresses */
	char	   *email;
	char	   *display_name;
	char	   *phone;
	char	   *locale;
} Recipient;

/*
 * What one rule decides for one recipient of one event: the same answer
 * serves fan-out (which writes it as a message) and notify.explain (which
 * shows it).
 */
typedef struct Delivery
{
	const RuleInfo *rule;
	const char *spec;
	Recipient  *recipient;		/* NULL: the spec resolved to nobody */
	const char *address;		/* where it goes: email, or a webhook's phone or key */
	const char *mode;			/* immediate, digest, off */
	const char *status;			/* queued, suppressed, failed, or NULL: skipped */
	const char *reason;
	const TmplValue *ctx;		/* the rule's context (with `extra`) */
} Delivery;

PG_FUNCTION_INFO_V1(notify_explain);

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr cursor_lock_plan = NULL;
static SPIPlanPtr first_unprocessed_plan = NULL;
static SPIPlanPtr cursor_update_plan = NULL;
static SPIPlanPtr sequence_plan = NULL;
static SPIPlanPtr rules_plan = NULL;
static SPIPlanPtr recipient_plan = NULL;
static SPIPlanPtr directory_plan = NULL;
static SPIPlanPtr group_plan = NULL;
static SPIPlanPtr supervisors_plan = NULL;
static SPIPlanPtr preference_plan = NULL;
static SPIPlanPtr attachment_plan = NULL;
static SPIPlanPtr csv_plan = NULL;
static SPIPlanPtr insert_message_plan = NULL;
static SPIPlanPtr mark_done_plan = NULL;
static SPIPlanPtr mark_failed_plan = NULL;

#define MSG_NARGS 13
/* the message columns fan-out fills: event_id, event_type, rule_id, rule_name, ... */
static const Oid msg_column_type[MSG_NARGS] = {INT8OID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID,
TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};

/*
 * Messages waiting to be queued, a column array each.  Fan-out plans and
 * renders an event's messages into `current`; when the event went well
 * they join `pending`, and `pending` is queued by one INSERT for many
 * events (a statement per message was 10% of the worker's time).  An
 * event that fails leaves nothing behind: its rows in `current` are
 * dropped, and rows it queued itself (more than MSG_FLUSH_ROWS of its
 * own) went with its subtransaction.
 */
#define MSG_FLUSH_ROWS 256

typedef struct MessageRows
{
	int			n;
	int			cap;
	Datum	   *values[MSG_NARGS];
	bool	   *nulls[MSG_NARGS];
} MessageRows;

static MessageRows current_rows;
static MessageRows pending_rows;

/*
 * Whether any address is suppressed (bounce.c), asked once per batch (and
 * per explain): only then is each mail address looked up.
 */
static bool suppressions_exist = false;
static MemoryContext rows_cxt = NULL;	/* the batch's: staged values live there */

/* prepare_plans: the statements fan-out runs for every batch. */
static void
prepare_plans(void)
{
	Oid			int8_t[1] = {INT8OID};
	Oid			text_t[1] = {TEXTOID};
	Oid			failed_t[2] = {INT8OID, TEXTOID};
	Oid			msg_array_t[MSG_NARGS];

	for (int i = 0; i < MSG_NARGS; i++)
		msg_array_t[i] = msg_column_type[i] == INT8OID ? INT8ARRAYOID : TEXTARRAYOID;

	/* the last one prepared: a failure half-way prepares again next time */
	if (mark_failed_plan != NULL)
		return;
	/*
	 * The context is built above the lock: in the same SELECT list it would
	 * be built for every row the scan passes, including those another
	 * worker holds and SKIP LOCKED then drops.
	 */
	claim_plan = notify_keep_plan(
						   "SELECT (c.e).id, (c.e).event_type, notify._event_context(c.e) "
						   "FROM (SELECT e FROM notify.event e"
						   "       WHERE e.id >= (SELECT x.low_water FROM notify.event_cursor x)"
						   "         AND e.processed_at IS NULL "
						   "      ORDER BY e.id LIMIT $1 FOR UPDATE SKIP LOCKED) c "
						   "ORDER BY (c.e).id",
						   1, int8_t);
	cursor_lock_plan = notify_keep_plan(
								 "SELECT x.low_water, x.candidate, x.candidate_xid FROM notify.event_cursor x"
								 " FOR UPDATE SKIP LOCKED",
								 0, NULL);
	/* the first event not processed in [low_water, candidate], by the primary key */
	first_unprocessed_plan = notify_keep_plan(
									   "SELECT e.id FROM notify.event e WHERE e.id >= $1 AND e.id <= $2"
									   "   AND e.processed_at IS NULL ORDER BY e.id LIMIT 1",
									   2, (Oid[]) {INT8OID, INT8OID});
	cursor_update_plan = notify_keep_plan(
								   "UPDATE notify.event_cursor SET low_water = $1, candidate = $2, candidate_xid = $3",
								   3, (Oid[]) {INT8OID, INT8OID, INT8OID});
	sequence_plan = notify_keep_plan(
							  "SELECT pg_catalog.pg_sequence_last_value("
							  "  pg_catalog.pg_get_serial_sequence('notify.event', 'id')::pg_catalog.regclass),"
							  "  (SELECT s.seqcache FROM pg_catalog.pg_sequence s"
							  "    WHERE s.seqrelid = pg_catalog.pg_get_serial_sequence('notify.event', 'id')::pg_catalog.regclass)",
							  0, NULL);
	rules_plan = notify_keep_plan(
						   "SELECT r.id, r.name, r.template, r.channel, r.default_mode, r.recipients, "
						   "       r.context_query, r.owner::oid, r.attachments_query, "
						   "       c.kind, c.body_template, c.content_type, r.attach_rows_csv "
						   "FROM notify.rule r LEFT JOIN notify.channel c ON c.name = r.channel "
						   "WHERE r.event_type = $1 AND r.enabled ORDER BY r.id",
						   1, text_t);
	directory_plan = notify_keep_plan(
							   "SELECT d.query, d.owner::oid FROM notify.directory d WHERE d.prefix = $1",
							   1, text_t);
	group_plan = notify_keep_plan(
						   "SELECT m.recipient_key FROM notify.group_member m "
						   "JOIN notify.recipient_group g ON g.id = m.group_id "
						   "WHERE g.name = $1 ORDER BY m.added_at, m.recipient_key",
						   1, text_t);
	supervisors_plan = notify_keep_plan(
								 "SELECT s.supervisor_key FROM notify.supervisor s "
								 "WHERE s.subordinate_key = $1 ORDER BY s.supervisor_key",
								 1, text_t);
	{
		Oid			att_t[5] = {INT8OID, INT8OID, TEXTOID, TEXTOID, BYTEAOID};

		attachment_plan = notify_keep_plan(
									"INSERT INTO notify.attachment (event_id, rule_id, filename, content_type, content) "
									"VALUES ($1, $2, $3, $4, $5)",
									5, att_t);
	}
	{
		Oid			csv_t[3] = {INT8OID, INT8OID, TEXTOID};

		csv_plan = notify_keep_plan(
							 "INSERT INTO notify.attachment (event_id, rule_id, filename, content_type, content) "
							 "SELECT e.id, $2, $3, 'text/csv; charset=utf-8', notify._rows_csv(e.rows, e.columns) "
							 "  FROM notify.event e WHERE e.id = $1 AND e.rows IS NOT NULL",
							 3, csv_t);
	}
	{
		Oid			pref_t[3] = {TEXTOID, TEXTOID, TEXTOID};

		preference_plan = notify_keep_plan(
									"SELECT p.mode FROM notify.preference p "
									"WHERE p.recipient_key = $1 AND p.event_type = $2 AND p.channel = $3",
									3, pref_t);
	}
	recipient_plan = notify_keep_plan(
							   "SELECT r.email, r.display_name, r.phone, r.locale "
							   "FROM notify.recipient r WHERE r.key = $1",
							   1, text_t);
	/*
	 * Messages are queued many rows at a time (see MessageRows), as arrays
	 * of columns, in order: their ids follow the order they were planned.
	 * Always the generic plan: left to choose, the plan cache finds custom
	 * plans cheaper and plans this INSERT again at every execution.
	 */
	{
		Oid			insert_t[MSG_NARGS + 3];

		for (int i = 0; i < MSG_NARGS; i++)
			insert_t[i] = msg_array_t[i];
		insert_t[MSG_NARGS] = INT4OID;	/* $14: how many of the first rows this worker sends itself */
		insert_t[MSG_NARGS + 1] = INT4OID;	/* $15: notify.lease */
		insert_t[MSG_NARGS + 2] = INT4OID;	/* $16: this worker's number */

		/*
		 * Direct send: of the first $14 rows, those queued go in already
		 * claimed by this worker ('sending', under a lease, their first
		 * attempt counted), as a claim would leave them, and the worker
		 * sends them after this transaction commits (sender.c).  Each
		 * saves the claim: an UPDATE of a row that carries its body, and
		 * its index entries.  RETURNING gives each row's id in the order
		 * of the rows, and for those claimed whether they have files.
		 */
		insert_message_plan = SPI_prepare_cursor(
										"INSERT INTO notify.message AS n (event_id, event_type, rule_id, rule_name, "
										"recipient_key, address, display_name, channel, status, subject, "
										"text_body, html_body, last_error, next_attempt_at, attempts, lease_until, claimed_by) "
										"SELECT m.event_id, m.event_type, m.rule_id, m.rule_name, m.recipient_key, m.address,"
										"       m.display_name, m.channel,"
										"       CASE WHEN m.status = 'queued' AND m.ord <= $14 THEN 'sending' ELSE m.status END,"
										"       m.subject, m.text_body, m.html_body, m.last_error,"
				/* a digest entry waits for the end of its period */
										"       CASE WHEN m.status = 'digest' THEN COALESCE(notify.next_run("
										"            (SELECT r.digest_schedule FROM notify.rule r WHERE r.id = m.rule_id),"
										"            pg_catalog.now()), pg_catalog.now()) ELSE pg_catalog.now() END,"
										"       CASE WHEN m.status = 'queued' AND m.ord <= $14 THEN 1 ELSE 0 END,"
										"       CASE WHEN m.status = 'queued' AND m.ord <= $14"
										"            THEN pg_catalog.now() + pg_catalog.make_interval(secs => $15) END,"
										"       CASE WHEN m.status = 'queued' AND m.ord <= $14 THEN $16 END"
										"  FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2), pg_catalog.unnest($3),"
										"       pg_catalog.unnest($4), pg_catalog.unnest($5), pg_catalog.unnest($6),"
										"       pg_catalog.unnest($7), pg_catalog.unnest($8), pg_catalog.unnest($9),"
										"       pg_catalog.unnest($10), pg_catalog.unnest($11), pg_catalog.unnest($12),"
										"       pg_catalog.unnest($13)) WITH ORDINALITY"
										"    AS m(event_id, event_type, rule_id, rule_name, recipient_key, address,"
										"         display_name, channel, status, subject, text_body, html_body, last_error, ord)"
										" RETURNING n.id, n.status,"
										"   CASE WHEN n.status = 'sending' THEN EXISTS (SELECT 1 FROM notify.attachment a"
										"     WHERE a.event_id = n.event_id AND a.rule_id = n.rule_id) END",
										MSG_NARGS + 3, insert_t, CURSOR_OPT_GENERIC_PLAN);
	}
	if (insert_message_plan == NULL || SPI_keepplan(insert_message_plan) != 0)
		elog(ERROR, "notify_ext: could not prepare the message insert: %s", SPI_result_code_string(SPI_result));
	{
		Oid			ids_t[1] = {INT8ARRAYOID};

		/* the batch's events that went well, in one statement */
		mark_done_plan = notify_keep_plan(
								   "UPDATE notify.event SET processed_at = pg_catalog.now(), status = 'done' "
								   "WHERE id = ANY ($1)",
								   1, ids_t);
	}
	mark_failed_plan = notify_keep_plan(
								 "UPDATE notify.event SET processed_at = pg_catalog.now(), status = 'failed', "
								 "last_error = $2 WHERE id = $1",
								 2, failed_t);
}

/* text_or_null: a palloc'd copy of column n, or NULL. */
static char *
text_or_null(HeapTuple tup, TupleDesc desc, int n)
{
	return SPI_getvalue(tup, desc, n);
}

/* string_value: a TmplValue string (or null when s is NULL). */
static TmplValue *
string_value(const char *s)
{
	TmplValue  *v = palloc0(sizeof(TmplValue));

	if (s == NULL)
		v->kind = TV_NULL;
	else
	{
		v->kind = TV_STRING;
		v->str = pstrdup(s);
		v->len = strlen(s);
	}
	return v;
}

/* ascii_lower: addresses compare case-insensitively for de-duplication (they are ASCII). */
static char *
ascii_lower(const char *s)
{
	char	   *copy = pstrdup(s);

	for (char *p = copy; *p; p++)
		*p = pg_ascii_tolower((unsigned char) *p);
	return copy;
}

/*
 * content_type_is_json: application/json or any +json type (RFC 6839),
 * parameters aside: a webhook body of that type escapes values for JSON.
 */
static bool
content_type_is_json(const char *content_type)
{
	size_t		len;
	char	   *type;

	if (content_type == NULL)
		return false;
	len = strcspn(content_type, "; ");
	type = ascii_lower(pnstrdup(content_type, len));
	return strcmp(type, "application/json") == 0 ||
		(len > 5 && strcmp(type + len - 5, "+json") == 0);
}

/* object_value: an empty object with room for n members. */
static TmplValue *
object_value(size_t n)
{
	TmplValue  *v = palloc0(sizeof(TmplValue));

	v->kind = TV_OBJECT;
	v->keys = palloc(sizeof(char *) * Max(n, 1));
	v->keylens = palloc(sizeof(size_t) * Max(n, 1));
	v->items = palloc(sizeof(TmplValue *) * Max(n, 1));
	return v;
}

/* object_add: append a member (names are static or outlive the object). */
static void
object_add(TmplValue *obj, const char *name, TmplValue *value)
{
	obj->keys[obj->count] = (char *) name;
	obj->keylens[obj->count] = strlen(name);
	obj->items[obj->count] = value;
	obj->count++;
}

/*
 * context_with_member: the event's context plus one member, sharing the
 * event's members: building it costs one small object per message, not a
 * copy of the row.  The last member wins on lookup, so it shadows any
 * member of that name in the base.
 */
static TmplValue *
context_with_member(const TmplValue *base, const char *name, TmplValue *value)
{
	size_t		n = (base && base->kind == TV_OBJECT) ? base->count : 0;
	TmplValue  *ctx = object_value(n + 1);

	for (size_t i = 0; i < n; i++)
	{
		ctx->keys[i] = base->keys[i];
		ctx->keylens[i] = base->keylens[i];
		ctx->items[i] = base->items[i];
	}
	ctx->count = n;
	object_add(ctx, name, value);
	return ctx;
}

/* recipient_value: `recipient` as templates see it. */
static TmplValue *
recipient_value(const Recipient *r)
{
	TmplValue  *rv = object_value(5);

	object_add(rv, "key", string_value(r->key));
	object_add(rv, "email", string_value(r->email));
	object_add(rv, "display_name", string_value(r->display_name));
	object_add(rv, "phone", string_value(r->phone));
	object_add(rv, "locale", string_value(r->locale));
	return rv;
}

/* value_at_path: the value at a dotted path (row.contact_email), or NULL. */
static const TmplValue *
value_at_path(const TmplValue *ctx, const char *path)
{
	char	   *copy = pstrdup(path);
	char	   *save = NULL;
	const TmplValue *v = ctx;

	for (char *part = strtok_r(copy, ".", &save); part != NULL && v != NULL;
		 part = strtok_r(NULL, ".", &save))
	{
		if (v->kind != TV_OBJECT)
			return NULL;
		v = tmpl_value_get(v, part);
	}
	return v;
}

/* scalar_text: a string, number or boolean as text; NULL for null, missing, arrays, objects. */
static char *
scalar_text(const TmplValue *v)
{
	if (v == NULL)
		return NULL;
	switch (v->kind)
	{
		case TV_STRING:
			return v->len > 0 ? pnstrdup(v->str, v->len) : NULL;
		case TV_NUMBER:
			return pstrdup(v->str);
		case TV_BOOL:
			return pstrdup(v->boolean ? "true" : "false");
		default:
			return NULL;
	}
}

/*
 * lookup_key: a recipient by key: one stored with set_recipient, else one
 * found live through the directory of its prefix.  NULL when nobody.
 */
static Recipient *
lookup_key(const char *key)
{
	MemoryContext target = CurrentMemoryContext;
	Datum		arg = CStringGetTextDatum(key);
	const char *colon = strchr(key, ':');
	Recipient  *r;
	HeapTuple	tup;
	TupleDesc	desc;
	int			ret;

	/*
	 * A lookup per recipient: not through notify_run_plan, whose settings
	 * for the plan (a GUC nest level and three settings per call) cost more
	 * than the lookup (fan-out to a group of 50 ran at half the speed).  The
	 * recipients change seldom; their statistics follow (autovacuum), and
	 * with them the plan.
	 */
	ret = SPI_execute_plan(recipient_plan, &arg, NULL, true, 1);
	MemoryContextSwitchTo(target);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "recipient lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0 && colon != NULL)
	{
		/* not stored: ask the ERP's own tables through the prefix's directory */
		char	   *query;
		Oid			owner;
		bool		isnull;
		Oid			argtype = TEXTOID;
		Datum		id;
		char	   *prefix = pnstrdup(key, colon - key);

		arg = CStringGetTextDatum(prefix);
		ret = SPI_execute_plan(directory_plan, &arg, NULL, true, 1);
		MemoryContextSwitchTo(target);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "directory lookup failed: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			return NULL;
		query = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		owner = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
		id = CStringGetTextDatum(colon + 1);
		ret = notify_execute_as_owner(owner, psprintf("directory \"%s\"", prefix),
									  psprintf("SELECT q.email::text, q.display_name::text, q.phone::text, q.locale::text "
											   "FROM (%s\n) q LIMIT 1", query),
									  1, &argtype, &id, true, 0);
		if (ret != SPI_OK_SELECT)
			elog(ERROR, "directory query for prefix \"%s\" failed: %s", prefix, SPI_result_code_string(ret));
	}
	if (SPI_processed == 0)
		return NULL;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	r = palloc0(sizeof(Recipient));
	r->key = pstrdup(key);
	r->email = text_or_null(tup, desc, 1);
	r->display_name = text_or_null(tup, desc, 2);
	r->phone = text_or_null(tup, desc, 3);
	r->locale = text_or_null(tup, desc, 4);
	return r;
}

/* keys_of: the first column of a saved plan's result, for one text argument. */
static List *
keys_of(SPIPlanPtr plan, const char *arg)
{
	Datum		a = CStringGetTextDatum(arg);
	uint64		n = notify_run_plan(plan, &a, NULL, true, 0, SPI_OK_SELECT, "recipient lookup");
	List	   *keys = NIL;

	for (uint64 i = 0; i < n; i++)
		keys = lappend(keys, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
	return keys;
}

/*
 * expand_key_pattern: 'customer:{row.customer_id}' -> 'customer:17'; NULL
 * when a path is null or missing (the customer has no agent: nobody).
 */
static char *
expand_key_pattern(const char *pattern, const TmplValue *ctx)
{
	StringInfoData buf;
	const char *p = pattern;

	initStringInfo(&buf);
	while (*p)
	{
		const char *close;
		char	   *value;

		if (*p != '{')
		{
			appendStringInfoChar(&buf, *p++);
			continue;
		}
		close = strchr(p, '}');
		if (close == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("unbalanced braces in recipient spec \"key:%s\"", pattern)));
		value = scalar_text(value_at_path(ctx, pnstrdup(p + 1, close - p - 1)));
		if (value == NULL)
			return NULL;
		appendStringInfoString(&buf, value);
		p = close + 1;
	}
	return buf.data;
}

/* recipients_of_keys: the recipients behind a list of keys, skipping unknown ones. */
static List *
recipients_of_keys(List *keys)
{
	List	   *out = NIL;
	ListCell   *lc;

	foreach(lc, keys)
	{
		Recipient  *r = lookup_key((const char *) lfirst(lc));

		if (r != NULL)
			out = lappend(out, r);
	}
	return out;
}

/*
 * resolve_spec: the recipients one spec stands for, for this event.
 * A spec that resolves to nobody (a null field, an event without actor,
 * a deleted recipient) yields an empty list: "the agent, if any".
 */
static List *
resolve_spec(const char *spec, const TmplValue *ctx)
{
	const char *colon = strchr(spec, ':');
	const char *arg = colon ? colon + 1 : "";
	size_t		kindlen = colon ? (size_t) (colon - spec) : strlen(spec);
	char	   *actor = scalar_text(value_at_path(ctx, "event.actor"));
	Recipient  *r;

#define KIND_IS(k) (kindlen == strlen(k) && strncmp(spec, k, kindlen) == 0)
	if (colon == NULL && strcmp(spec, "actor") == 0)
		return actor ? recipients_of_keys(list_make1(actor)) : NIL;
	if (colon == NULL && strcmp(spec, "supervisors") == 0)
		return actor ? recipients_of_keys(keys_of(supervisors_plan, actor)) : NIL;
	if (KIND_IS("email"))
	{
		r = palloc0(sizeof(Recipient));
		r->email = pstrdup(arg);
		return list_make1(r);
	}
	if (KIND_IS("field"))
	{
		char	   *address = scalar_text(value_at_path(ctx, arg));

		if (address == NULL)
			return NIL;
		r = palloc0(sizeof(Recipient));
		r->email = address;
		return list_make1(r);
	}
	if (KIND_IS("recipient"))
		return recipients_of_keys(list_make1(pstrdup(arg)));
	if (KIND_IS("group"))
		return recipients_of_keys(keys_of(group_plan, arg));
	if (KIND_IS("key"))
	{
		char	   *key = expand_key_pattern(arg, ctx);

		return key ? recipients_of_keys(list_make1(key)) : NIL;
	}
#undef KIND_IS
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown recipient spec \"%s\"", spec)));
	return NIL;
}

/* preference_mode: the recipient's stored mode for this event type and channel, or NULL. */
static char *
preference_mode(const char *key, const char *event_type, const char *channel)
{
	Datum		args[3];

	args[0] = CStringGetTextDatum(key);
	args[1] = CStringGetTextDatum(event_type);
	args[2] = CStringGetTextDatum(channel);
	if (notify_run_plan(preference_plan, args, NULL, true, 1, SPI_OK_SELECT, "preference lookup") == 0)
		return NULL;
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

/*
 * rule_extra: what the rule's context_query returns for this event (one
 * jsonb, `extra` in templates), run as the rule's owner.
 */
static TmplValue *
rule_extra(const RuleInfo *rule, Jsonb *context)
{
	Oid			argtype = JSONBOID;
	Datum		arg = JsonbPGetDatum(context);
	int			ret;
	bool		isnull;
	Datum		d;

	ret = notify_execute_as_owner(rule->owner, psprintf("rule \"%s\"", rule->name),
								  rule->context_query, 1, &argtype, &arg, true, 0);
	if (ret < 0 || SPI_tuptable == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("context_query of rule \"%s\" did not return rows", rule->name)));
	if (SPI_processed == 0)
		return NULL;
	if (SPI_tuptable->tupdesc->natts != 1 ||
		SPI_gettypeid(SPI_tuptable->tupdesc, 1) != JSONBOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("context_query of rule \"%s\" must return one jsonb column", rule->name)));
	d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (isnull)
		return NULL;
	return jsonb_to_tmpl_value(DatumGetJsonbP(d));
}

/*
 * plan_deliveries: for one event, every rule's decision for every
 * recipient, in order: who gets it, who is suppressed (and why), who is
 * skipped as a duplicate, which specs resolved to nobody.
 */
static List *
plan_deliveries(const char *event_type, List *rules, const TmplValue *base, Jsonb *context)
{
	List	   *out = NIL;
	ListCell   *lc;

	foreach(lc, rules)
	{
		RuleInfo   *rule = (RuleInfo *) lfirst(lc);
		const TmplValue *ctx = base;
		List	   *seen = NIL;

		if (rule->context_query != NULL)
		{
			TmplValue  *extra = rule_extra(rule, context);

			if (extra != NULL)
				ctx = context_with_member(base, "extra", extra);
		}

		for (int s = 0; s < rule->nspecs; s++)
		{
			char	   *spec = TextDatumGetCString(rule->specs[s]);
			List	   *recipients = resolve_spec(spec, ctx);
			ListCell   *rc;

			if (recipients == NIL)
			{
				Delivery   *d = palloc0(sizeof(Delivery));

				d->rule = rule;
				d->spec = spec;
				d->ctx = ctx;
				d->reason = "resolves to nobody for this event";
				out = lappend(out, d);
				continue;
			}
			foreach(rc, recipients)
			{
				Recipient  *r = (Recipient *) lfirst(rc);
				Delivery   *d = palloc0(sizeof(Delivery));
				char		errbuf[256];
				char	   *pref = NULL;
				char	   *lowered;
				ListCell   *sc;

				d->rule = rule;
				d->spec = spec;
				d->ctx = ctx;
				d->recipient = r;
				out = lappend(out, d);
				if (rule->webhook)
				{
					/*
					 * A webhook (an SMS gateway) is addressed by phone, else
					 * by key; field:PATH names a phone number there.
					 */
					if (r->key == NULL && r->phone == NULL && strncmp(spec, "field:", 6) == 0)
					{
						r->phone = r->email;
						r->email = NULL;
					}
					if (r->phone != NULL && r->phone[0] != '\0')
						d->address = r->phone;
					else if (r->key != NULL)
						d->address = r->key;
					else
					{
						d->reason = "recipient has no phone number and no key";
						continue;
					}
					lowered = pstrdup(d->address);
				}
				else
				{
					if (r->email == NULL || r->email[0] == '\0')
					{
						d->reason = "recipient has no email address";
						continue;
					}
					d->address = r->email;
					lowered = ascii_lower(r->email);
				}
				foreach(sc, seen)
				{
					if (strcmp((char *) lfirst(sc), lowered) == 0)
					{
						d->reason = "duplicate: this address already gets this rule's message";
						break;
					}
				}
				if (d->reason != NULL)
					continue;
				seen = lappend(seen, lowered);

				if (r->key != NULL)
					pref = preference_mode(r->key, event_type, rule->channel);
				d->mode = pref ? pref : rule->default_mode;
				if (!rule->webhook && !mime_check_address(r->email, errbuf, sizeof(errbuf)))
				{
					d->status = "failed";
					d->reason = psprintf("recipient spec \"%s\": %s", spec, errbuf);
				}
				else if (strcmp(d->mode, "off") == 0)
				{
					d->status = "suppressed";
					d->reason = pref ? psprintf("recipient's preference for %s is off", event_type)
						: "rule's default_mode is off";
				}
				else if (strcmp(d->mode, "digest") == 0)
				{
					/* held for the digest of the rule's digest_schedule period */
					d->status = "digest";
					d->reason = pref ? "recipient's preference: in the next digest"
						: "rule's default mode: in the next digest";
				}
				else
				{
					d->status = "queued";
					d->reason = pref ? "recipient's preference" : "rule's default mode";
				}

				/*
				 * An address that bounced (or complained) gets nothing more,
				 * immediate or in a digest: a 'suppressed' row that names the
				 * bounce.
				 */
				if (!rule->webhook && suppressions_exist &&
					(strcmp(d->status, "queued") == 0 || strcmp(d->status, "digest") == 0))
				{
					char	   *why = bounce_suppression_reason(r->email);

					if (why != NULL)
					{
						d->status = "suppressed";
						d->reason = why;
					}
				}
			}
		}
	}
	return out;
}

/* rows_reset: no rows, the arrays kept for reuse. */
static void
rows_reset(MessageRows *rows)
{
	rows->n = 0;
}

/* rows_add: room for one more row; returns its index. */
static int
rows_add(MessageRows *rows)
{
	if (rows->n == rows->cap)
	{
		int			cap = rows->cap == 0 ? 64 : rows->cap * 2;

		for (int c = 0; c < MSG_NARGS; c++)
		{
			rows->values[c] = rows->cap == 0 ? MemoryContextAlloc(rows_cxt, sizeof(Datum) * cap)
				: repalloc(rows->values[c], sizeof(Datum) * cap);
			rows->nulls[c] = rows->cap == 0 ? MemoryContextAlloc(rows_cxt, sizeof(bool) * cap)
				: repalloc(rows->nulls[c], sizeof(bool) * cap);
		}
		rows->cap = cap;
	}
	return rows->n++;
}

/*
 * How many of a fan-out batch's messages its worker may send itself (the
 * rest are queued for every worker); set per batch by fanout_pending_events.
 */
static int	direct_budget = 0;
static bool batch_full = false;	/* the fan-out batch took as many events as it could */

/* messages the last fan-out batch queued for every worker to send */
int			fanout_queued = 0;


/*
 * insert_rows: queue rows [from, to) with one INSERT; with direct true,
 * the first of them (up to direct_budget) go to this worker's sender,
 * claimed (see insert_message_plan).
 */
static void
insert_rows(MessageRows *rows, int from, int to, bool direct)
{
	Datum		args[MSG_NARGS + 3];
	int			claim = direct ? Min(direct_budget, to - from) : 0;
	uint64		n;

	if (to <= from)
		return;
	for (int c = 0; c < MSG_NARGS; c++)
		args[c] = notify_array(rows->values[c] + from, rows->nulls[c] + from, to - from, msg_column_type[c]);
	args[MSG_NARGS] = Int32GetDatum(claim);
	args[MSG_NARGS + 1] = Int32GetDatum(notify_lease);
	args[MSG_NARGS + 2] = Int32GetDatum(notify_worker_id);
	n = notify_run_plan(insert_message_plan, args, NULL, false, 0, SPI_OK_INSERT_RETURNING, "queueing messages");
	if (n != (uint64) (to - from))
		elog(ERROR, "notify_ext: %llu rows returned for %d messages queued", (unsigned long long) n, to - from);
	for (uint64 i = 0; i < n; i++)
	{
		/* the staged columns of a message's texts (see insert_message) */
		static const int text_col[DIRECT_NTEXTS] = {5, 6, 9, 10, 11, 7};
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int			r = from + (int) i;
		DirectText	texts[DIRECT_NTEXTS];
		char	   *status = TextDatumGetCString(SPI_getbinval(tup, desc, 2, &isnull));

		if (strcmp(status, "queued") == 0)
			fanout_queued++;
		if (strcmp(status, "sending") != 0)
			continue;
		for (int t = 0; t < DIRECT_NTEXTS; t++)
		{
			texts[t].value = rows->values[text_col[t]][r];
			texts[t].isnull = rows->nulls[text_col[t]][r];
		}
		sender_add_direct(DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull)), texts,
						  DatumGetInt64(rows->values[0][r]), DatumGetInt64(rows->values[2][r]),
						  DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull)));
		direct_budget--;
	}
}

/*
 * insert_message: one notify.message row, status queued, suppressed or
 * failed, staged in `current` (see MessageRows).  An event that makes
 * more than MSG_FLUSH_ROWS messages queues them itself as it goes, in
 * its own subtransaction, so that memory stays bounded.
 */
static void
insert_message(const PendingEvent *ev, const RuleInfo *rule, const Recipient *r, const char *address,
			   const char *status, const RenderedMessage *msg, const char *error)
{
	MemoryContext old = MemoryContextSwitchTo(rows_cxt);
	int			i = rows_add(&current_rows);
	Datum	   *v[MSG_NARGS];
	bool	   *n[MSG_NARGS];

	for (int c = 0; c < MSG_NARGS; c++)
	{
		v[c] = &current_rows.values[c][i];
		n[c] = &current_rows.nulls[c][i];
		*n[c] = false;
	}
	*v[0] = Int64GetDatum(ev->id);
	*v[1] = CStringGetTextDatum(ev->event_type);
	*v[2] = Int64GetDatum(rule->id);
	*v[3] = CStringGetTextDatum(rule->name);
#define SET_TEXT(c, s) do { if ((s) != NULL) *v[c] = CStringGetTextDatum(s); else *n[c] = true; } while (0)
	SET_TEXT(4, r->key);
	SET_TEXT(5, address);
	SET_TEXT(6, r->display_name);
	SET_TEXT(7, rule->channel);
	SET_TEXT(8, status);
	SET_TEXT(9, msg ? msg->subject : NULL);
	SET_TEXT(10, msg ? msg->text_body : NULL);
	SET_TEXT(11, msg ? msg->html_body : NULL);
	SET_TEXT(12, error);
#undef SET_TEXT
	MemoryContextSwitchTo(old);
	if (current_rows.n >= MSG_FLUSH_ROWS)
	{
		/* in the event's subtransaction, which may yet roll back: queued, never sent directly */
		insert_rows(&current_rows, 0, current_rows.n, false);
		rows_reset(&current_rows);
	}
}

/*
 * render_webhook_body: what a webhook message POSTs.  The rule's template,
 * rendered as for mail, is the body's `message` {subject, text}; the
 * channel's body_template makes the request body out of it and the rest
 * of the context.  The subject is kept for the log; the body is stored as
 * the message's text, so the sender only sends bytes.
 */
static RenderedMessage *
render_webhook_body(const RuleInfo *rule, const Recipient *r, const TmplValue *ctx,
					const RenderedMessage *mail)
{
	TmplValue  *message = object_value(2);
	RenderedMessage *out = palloc0(sizeof(RenderedMessage));

	if (rule->body_template == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("webhook channel \"%s\" of rule \"%s\" has no body_template",
						rule->channel, rule->name)));
	object_add(message, "subject", string_value(mail->subject));
	object_add(message, "text", string_value(mail->text_body));
	out->subject = mail->subject;
	out->text_body = render_body_template(rule->channel, rule->body_template, rule->body_json,
										  r->locale, context_with_member(ctx, "message", message));
	out->html_body = NULL;
	return out;
}

/* load_rules: the enabled rules for an event type. */
static List *
load_rules(const char *event_type)
{
	Datum		arg = CStringGetTextDatum(event_type);
	uint64		n = notify_run_plan(rules_plan, &arg, NULL, true, 0, SPI_OK_SELECT, "rule lookup");
	List	   *rules = NIL;

	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		RuleInfo   *rule = palloc0(sizeof(RuleInfo));
		bool		isnull;
		ArrayType  *specs;

		rule->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		rule->name = SPI_getvalue(tup, desc, 2);
		rule->template = SPI_getvalue(tup, desc, 3);
		rule->channel = SPI_getvalue(tup, desc, 4);
		rule->default_mode = SPI_getvalue(tup, desc, 5);
		rule->context_query = SPI_getvalue(tup, desc, 7);
		rule->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 8, &isnull));
		rule->attachments_query = SPI_getvalue(tup, desc, 9);
		{
			char	   *kind = SPI_getvalue(tup, desc, 10);

			rule->webhook = kind != NULL && strcmp(kind, "webhook") == 0;
		}
		rule->body_template = SPI_getvalue(tup, desc, 11);
		rule->body_json = content_type_is_json(SPI_getvalue(tup, desc, 12));
		rule->attach_rows_csv = SPI_getvalue(tup, desc, 13);
		specs = DatumGetArrayTypePCopy(SPI_getbinval(tup, desc, 6, &isnull));
		deconstruct_array(specs, TEXTOID, -1, false, TYPALIGN_INT, &rule->specs, NULL, &rule->nspecs);
		rules = lappend(rules, rule);
	}
	SPI_freetuptable(SPI_tuptable);
	return rules;
}

/*
 * The rules of the event types met in the current fan-out batch, kept for
 * the batch (in its memory context): a batch of a hundred events of one
 * type looks its rules up once, not a hundred times.  A rule changed
 * while a batch runs applies from the next batch.
 */
typedef struct BatchRules
{
	char	   *event_type;
	List	   *rules;
} BatchRules;

static List *batch_rules = NIL;
static MemoryContext batch_rules_cxt = NULL;

/* batch_rules_begin: a new batch, whose lookups live in cxt. */
static void
batch_rules_begin(MemoryContext cxt)
{
	batch_rules = NIL;
	batch_rules_cxt = cxt;
}

/* rules_for: load_rules, once per event type and batch. */
static List *
rules_for(const char *event_type)
{
	ListCell   *lc;
	MemoryContext old;
	BatchRules *entry;

	foreach(lc, batch_rules)
	{
		entry = (BatchRules *) lfirst(lc);
		if (strcmp(entry->event_type, event_type) == 0)
			return entry->rules;
	}
	old = MemoryContextSwitchTo(batch_rules_cxt);
	entry = palloc(sizeof(BatchRules));
	entry->rules = load_rules(event_type);
	entry->event_type = pstrdup(event_type);
	batch_rules = lappend(batch_rules, entry);
	MemoryContextSwitchTo(old);
	return entry->rules;
}

/*
 * store_attachments: run the rule's attachments_query (as its owner) and
 * keep the files for this event's messages of that rule: the invoice PDF
 * stored in the ERP, read once however many recipients get it.
 */
static void
store_attachments(const PendingEvent *ev, const RuleInfo *rule)
{
	Oid			argtype = JSONBOID;
	Datum		arg = JsonbPGetDatum(ev->context);
	SPITupleTable *files;
	uint64		nfiles;
	int			ret;

	if (rule->attach_rows_csv != NULL)
	{
		Datum		v[3] = {Int64GetDatum(ev->id), Int64GetDatum(rule->id),
		CStringGetTextDatum(rule->attach_rows_csv)};

		/* a report's rows as CSV (nothing for an event that carries no rows) */
		notify_run_plan(csv_plan, v, NULL, false, 0, SPI_OK_INSERT, "storing the CSV of the rows");
	}
	if (rule->attachments_query == NULL)
		return;
	/*
	 * The query returns (filename, content_type, content), read by
	 * position whatever the columns are called ("SELECT name,
	 * 'application/pdf', pdf FROM ..." is the usual way to write it).
	 */
	ret = notify_execute_as_owner(rule->owner, psprintf("rule \"%s\"", rule->name),
								  rule->attachments_query, 1, &argtype, &arg, true, 0);
	if (ret != SPI_OK_SELECT || SPI_tuptable == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("attachments_query of rule \"%s\" did not return rows", rule->name)));
	files = SPI_tuptable;
	nfiles = SPI_processed;
	if (files->tupdesc->natts != 3 || SPI_gettypeid(files->tupdesc, 3) != BYTEAOID)
		ereport(ERROR,
				(errcode(ERRCODE_DATATYPE_MISMATCH),
				 errmsg("attachments_query of rule \"%s\" must return three columns: filename, content_type and content (bytea)",
						rule->name),
				 errdetail("It returns %d column(s)%s.", files->tupdesc->natts,
						   files->tupdesc->natts >= 3 ? psprintf(", the third of type %s",
																format_type_be(SPI_gettypeid(files->tupdesc, 3))) : "")));
	for (uint64 i = 0; i < nfiles; i++)
	{
		Datum		v[5];
		bool		isnull;

		v[0] = Int64GetDatum(ev->id);
		v[1] = Int64GetDatum(rule->id);
		for (int c = 0; c < 3; c++)
		{
			if (c < 2)
			{
				/* text of whatever type the column is (varchar, name, text) */
				char	   *t = SPI_getvalue(files->vals[i], files->tupdesc, c + 1);

				isnull = (t == NULL);
				if (!isnull)
					v[c + 2] = CStringGetTextDatum(t);
			}
			else
				v[c + 2] = SPI_getbinval(files->vals[i], files->tupdesc, c + 1, &isnull);
			if (isnull)
				ereport(ERROR,
						(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
						 errmsg("attachments_query of rule \"%s\" returned a null %s",
								rule->name, c == 0 ? "filename" : c == 1 ? "content_type" : "content")));
		}
		notify_run_plan(attachment_plan, v, NULL, false, 0, SPI_OK_INSERT, "storing an attachment");
	}
	SPI_freetuptable(files);
}

/*
 * fanout_event: every message of one event.  The same address is
 * messaged once per event and rule, whichever specs lead to it.
 */
static int
fanout_event(const PendingEvent *ev)
{
	List	   *rules = rules_for(ev->event_type);
	List	   *deliveries;
	TmplValue  *base;
	ListCell   *lc;
	int			count = 0;


	if (rules == NIL)
		return 0;
	base = jsonb_to_tmpl_value(ev->context);
	deliveries = plan_deliveries(ev->event_type, rules, base, ev->context);

	foreach(lc, rules)
	{
		RuleInfo   *rule = (RuleInfo *) lfirst(lc);
		ListCell   *dc;

		if (rule->attachments_query == NULL && rule->attach_rows_csv == NULL)
			continue;
		foreach(dc, deliveries)
		{
			Delivery   *d = (Delivery *) lfirst(dc);

			if (d->rule == rule && d->status != NULL && strcmp(d->status, "queued") == 0)
			{
				store_attachments(ev, rule);
				break;
			}
		}
	}

	foreach(lc, deliveries)
	{
		Delivery   *d = (Delivery *) lfirst(lc);
		RenderedMessage *msg = NULL;

		if (d->status == NULL)
			continue;			/* nobody, or a duplicate: no message */
		/* a digest's entries are rendered now, as the message each would have been */
		if (strcmp(d->status, "queued") == 0 || strcmp(d->status, "digest") == 0)
		{
			TmplValue  *ctx = context_with_member(d->ctx, "recipient", recipient_value(d->recipient));

			msg = render_template_value(d->rule->template, d->recipient->locale, ctx);
			if (d->rule->webhook)
				msg = render_webhook_body(d->rule, d->recipient, ctx, msg);
		}
		insert_message(ev, d->rule, d->recipient, d->address, d->status, msg,
					   (strcmp(d->status, "queued") == 0 || strcmp(d->status, "digest") == 0)
					   ? NULL : d->reason);
		count++;
	}
	return count;
}

/* mark_failed: record an event's failure, with its error. */
static void
mark_failed(int64 id, const char *error)
{
	Datum		v[2];

	v[0] = Int64GetDatum(id);
	v[1] = CStringGetTextDatum(error);
	notify_run_plan(mark_failed_plan, v, NULL, false, 0, SPI_OK_UPDATE, "marking an event failed");
}

/* mark_done: the events that went well, in one statement. */
static void
mark_done(Datum *ids, int n)
{
	Datum		arg;

	if (n == 0)
		return;
	arg = PointerGetDatum(construct_array(ids, n, INT8OID, sizeof(int64), true, TYPALIGN_DOUBLE));
	notify_run_plan(mark_done_plan, &arg, NULL, false, 0, SPI_OK_UPDATE, "marking events done");
}

/* claim_events: a batch of unprocessed events, locked for this transaction. */
static List *
claim_events(int batch_size)
{
	Datum		arg = Int64GetDatum(batch_size);
	uint64		n = notify_run_plan(claim_plan, &arg, NULL, false, 0, SPI_OK_SELECT, "claiming events");
	List	   *events = NIL;

	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		PendingEvent *ev = palloc0(sizeof(PendingEvent));
		bool		isnull;
		Datum		ctx;

		ev->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		ev->event_type = SPI_getvalue(tup, desc, 2);
		ctx = SPI_getbinval(tup, desc, 3, &isnull);
		ev->context = isnull ? NULL : DatumGetJsonbPCopy(ctx);
		events = lappend(events, ev);
	}
	SPI_freetuptable(SPI_tuptable);
	return events;
}

/*
 * The low-water mark over event ids (notify.event_cursor): every event
 * below it is processed, and none can still appear below it.  The claim
 * reads the primary key from there.
 *
 * Why it never skips an event, even one that commits out of id order:
 *
 *  1. Every event id is taken by a transaction that already has its xid
 *     (capture.c takes the xid before nextval; the worker's own inserts,
 *     schedules and bounces, come after a write of the same transaction).
 *  2. The id sequence has CACHE 1, so ids are handed out in increasing order
 *     in time: an id <= S was handed out before S was read.
 *  3. A candidate is recorded as (S, NX): S the sequence's last value, then
 *     NX = ReadNextFullTransactionId().  Every transaction holding an id <= S
 *     got its xid before its id (1), its id before S was read (2), so its
 *     xid is < NX.
 *  4. The mark passes S only once a fresh snapshot's xmin >= NX: no xid < NX
 *     is running, so every transaction holding an id <= S has ended, and the
 *     events it committed are visible to this transaction's next statement.
 *     The mark then goes to the first of them still unprocessed (another
 *     worker's claim in progress counts as unprocessed), or to S + 1.
 *
 * An insert that breaks (1) (a superuser's INSERT INTO notify.event whose
 * default nextval runs before the row gets its xid, a microsecond apart)
 * could still slip below the mark: the worker looks at the LOW_WATER_RECHECK
 * ids below it once a minute and moves the mark back to any it finds.
 * test/fault/test_low_water.py tries to break all this with transactions
 * committing out of id order.
 */
#define LOW_WATER_EVERY_MS 100
#define LOW_WATER_RECHECK 10000
#define LOW_WATER_RECHECK_MS 60000

static TimestampTz low_water_at = 0;

/* full_xid_before: the FullTransactionId of xid, an xid handed out before next. */
static FullTransactionId
full_xid_before(FullTransactionId next, TransactionId xid)
{
	uint32		epoch = EpochFromFullTransactionId(next);

	if (xid > XidFromFullTransactionId(next))
		epoch--;
	return FullTransactionIdFromEpochAndXid(epoch, xid);
}
static TimestampTz low_water_rechecked_at = 0;

static void
advance_low_water(bool idle)
{
	/* idle: no event was claimed (the cursor still moves, to be ready for the next) */
	TimestampTz now = GetCurrentTimestamp();
	int64		low;
	int64		candidate;
	bool		has_candidate;
	bool		isnull;
	FullTransactionId next;
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	int64		new_low;

	if (!TimestampDifferenceExceeds(low_water_at, now, LOW_WATER_EVERY_MS) && now >= low_water_at)
		return;
	low_water_at = now;
	/* another worker moves it now: it is theirs */
	if (notify_run_plan(cursor_lock_plan, NULL, NULL, false, 1, SPI_OK_SELECT, "locking the event cursor") == 0)
		return;
	low = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	candidate = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	has_candidate = !isnull;
	if (has_candidate)
	{
		uint64		cxid = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull));
		Snapshot	snap = GetLatestSnapshot();
		FullTransactionId xmin = full_xid_before(ReadNextFullTransactionId(), snap->xmin);

		if (U64FromFullTransactionId(xmin) < cxid)
			return;				/* a transaction that may hold an id <= candidate still runs */
		args[0] = Int64GetDatum(low);
		args[1] = Int64GetDatum(candidate);
		new_low = notify_run_plan(first_unprocessed_plan, args, NULL, false, 1, SPI_OK_SELECT,
								  "finding the first unprocessed event") == 1
			? DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull))
			: candidate + 1;
		low = Max(low, new_low);
	}

	/* once a minute, the ids just below the mark: a straggler moves it back */
	if (TimestampDifferenceExceeds(low_water_rechecked_at, now, LOW_WATER_RECHECK_MS) || now < low_water_rechecked_at)
	{
		low_water_rechecked_at = now;
		args[0] = Int64GetDatum(Max(low - LOW_WATER_RECHECK, 0));
		args[1] = Int64GetDatum(low - 1);
		if (low > 0 && notify_run_plan(first_unprocessed_plan, args, NULL, false, 1, SPI_OK_SELECT,
									   "looking below the event cursor") == 1)
		{
			int64		straggler = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

			ereport(LOG,
					(errmsg("notify_ext: event %lld was committed below the event cursor (%lld); the cursor goes back to it",
							(long long) straggler, (long long) low)));
			low = straggler;
		}
	}

	/* the next candidate: the sequence's value, then the next xid (in that order: see above) */
	if (notify_run_plan(sequence_plan, NULL, NULL, true, 1, SPI_OK_SELECT, "reading the event id sequence") != 1)
		return;
	candidate = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	if (isnull)
		candidate = 0;			/* no event yet */
	if (DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull)) != 1)
	{
		/* (2) does not hold: the mark stays where it is, and says why */
		ereport(WARNING,
				(errmsg("notify_ext: the sequence of notify.event's ids has a CACHE other than 1; events are looked for from id %lld on",
						(long long) low),
				 errhint("ALTER SEQUENCE it with CACHE 1: the workers rely on ids being handed out in order.")));
		return;
	}
	next = ReadNextFullTransactionId();
	args[0] = Int64GetDatum(low);
	args[1] = Int64GetDatum(candidate);
	args[2] = Int64GetDatum((int64) U64FromFullTransactionId(next));
	notify_run_plan(cursor_update_plan, args, nulls, false, 0, SPI_OK_UPDATE, "moving the event cursor");
}

/* fanout_one: try_fanout_event's work, in its subtransaction. */
static void
fanout_one(void *arg)
{
	fanout_event((PendingEvent *) arg);
}

/*
 * try_fanout_event: fan out one event in a subtransaction; returns NULL,
 * or the error that rolled it back.
 */
static char *
try_fanout_event(PendingEvent *ev, MemoryContext outer, MemoryContext event_cxt)
{
	return notify_try_subxact(fanout_one, ev, outer, event_cxt);
}

/* rows_move: the rows of src join dst; src is left empty. */
static void
rows_move(MessageRows *dst, MessageRows *src)
{
	for (int i = 0; i < src->n; i++)
	{
		int			j = rows_add(dst);

		for (int c = 0; c < MSG_NARGS; c++)
		{
			dst->values[c][j] = src->values[c][i];
			dst->nulls[c][j] = src->nulls[c][i];
		}
	}
	rows_reset(src);
}

typedef struct RowRange
{
	int			from;
	int			to;
} RowRange;

/* insert_range: try_insert_rows's work, in its subtransaction. */
static void
insert_range(void *arg)
{
	RowRange   *r = (RowRange *) arg;

	insert_rows(&pending_rows, r->from, r->to, true);
}

/*
 * flush_pending: queue the pending rows with one INSERT.  Should that
 * fail, each event's rows go again in a subtransaction of their own, and
 * an event whose rows cannot be queued fails alone: it is marked failed
 * here and taken out of done[] (*ndone is updated).
 */
static void
flush_pending(MemoryContext outer, MemoryContext work_cxt, Datum *done, int *ndone)
{
	RowRange	all = {0, pending_rows.n};
	char	   *error;

	if (pending_rows.n == 0)
		return;

	/*
	 * What this worker sends itself: all of a full batch's messages (more
	 * events wait, for the other workers to fan out and send), or its fair
	 * share of the last ones, the rest queued for the other workers to
	 * send at the same time.
	 */
	if (direct_budget > 0 && !batch_full)
		direct_budget = Min(direct_budget, (pending_rows.n + Max(notify_workers, 1) - 1) / Max(notify_workers, 1));
	error = notify_try_subxact(insert_range, &all, outer, work_cxt);
	MemoryContextReset(work_cxt);
	if (error != NULL)
	{
		RowRange	one;

		for (one.from = 0; one.from < pending_rows.n; one.from = one.to)
		{
			int64		id = DatumGetInt64(pending_rows.values[0][one.from]);

			for (one.to = one.from + 1;
				 one.to < pending_rows.n && DatumGetInt64(pending_rows.values[0][one.to]) == id;
				 one.to++)
				;
			error = notify_try_subxact(insert_range, &one, outer, work_cxt);
			MemoryContextReset(work_cxt);
			if (error != NULL)
			{
				int			k = 0;

				ereport(LOG,
						(errmsg("notify_ext: event %lld failed: its messages could not be queued: %s",
								(long long) id, error)));
				mark_failed(id, error);
				for (int i = 0; i < *ndone; i++)
					if (DatumGetInt64(done[i]) != id)
						done[k++] = done[i];
				*ndone = k;
			}
		}
	}
	rows_reset(&pending_rows);
}

/*
 * fanout_pending_events: fan out one batch; returns the number of events
 * processed (failed ones included).  Runs inside the caller's transaction
 * and SPI connection.
 */
int
fanout_pending_events(int batch_size)
{
	List	   *events;
	ListCell   *lc;
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext event_cxt;
	Datum	   *done;
	int			ndone = 0;

	prepare_plans();
	direct_budget = notify_direct_send ? batch_size : 0;
	fanout_queued = 0;
	events = claim_events(batch_size);
	if (events == NIL)
	{
		advance_low_water(true);
		return 0;
	}
	notify_refresh_snapshot();
	batch_full = list_length(events) >= batch_size;

	done = palloc(sizeof(Datum) * list_length(events));
	suppressions_exist = bounce_suppressions_exist();
	batch_rules_begin(outer);
	/* the staged rows live in the batch's context, which the round resets */
	rows_cxt = outer;
	memset(&current_rows, 0, sizeof(current_rows));
	memset(&pending_rows, 0, sizeof(pending_rows));
	event_cxt = AllocSetContextCreate(outer, "notify fanout event", ALLOCSET_DEFAULT_SIZES);
	render_cache_begin();
	foreach(lc, events)
	{
		PendingEvent *ev = (PendingEvent *) lfirst(lc);
		char	   *error;

		CHECK_FOR_INTERRUPTS();
		error = try_fanout_event(ev, outer, event_cxt);

		/*
		 * Marked in the transaction that locked the event, not in its
		 * subtransaction: an update from there would turn the row's lock
		 * into a MultiXact, which every later claim's scan then has to look
		 * up.  Failures one by one (each has its error), the rest at once.
		 */
		if (error != NULL)
		{
			ereport(LOG,
					(errmsg("notify_ext: event %lld (%s) failed: %s",
							(long long) ev->id, ev->event_type, error)));
			rows_reset(&current_rows);
			mark_failed(ev->id, error);
		}
		else
		{
			rows_move(&pending_rows, &current_rows);
			done[ndone++] = Int64GetDatum(ev->id);
		}
		MemoryContextReset(event_cxt);
		if (pending_rows.n >= MSG_FLUSH_ROWS)
			flush_pending(outer, event_cxt, done, &ndone);
	}
	flush_pending(outer, event_cxt, done, &ndone);
	mark_done(done, ndone);
	render_cache_end();
	MemoryContextDelete(event_cxt);
	rows_cxt = NULL;
	advance_low_water(false);
	return list_length(events);
}

/*
 * notify_explain: notify.explain(event_type, payload, actor): who would
 * hear about such an event and why, or why not, without sending anything.
 * It runs the same resolution as the worker (plan_deliveries), so its
 * answer cannot drift from what fan-out does.
 */
Datum
notify_explain(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	MemoryContext caller = CurrentMemoryContext;
	char	   *event_type;
	Datum		args[3];
	char		nulls[3] = {' ', ' ', ' '};
	Oid			types[3] = {TEXTOID, JSONBOID, TEXTOID};
	Jsonb	   *context;
	List	   *rules;
	List	   *deliveries;
	ListCell   *lc;
	bool		isnull;
	int			ret;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("notify.explain: event_type must not be null")));
	event_type = text_to_cstring(PG_GETARG_TEXT_PP(0));
	InitMaterializedSRF(fcinfo, 0);

	SPI_connect();
	prepare_plans();
	args[0] = CStringGetTextDatum(event_type);
	if (PG_ARGISNULL(1))
		nulls[1] = 'n';
	else
		args[1] = PG_GETARG_DATUM(1);
	if (PG_ARGISNULL(2))
		nulls[2] = 'n';
	else
		args[2] = PG_GETARG_DATUM(2);
	ret = SPI_execute_with_args("SELECT pg_catalog.jsonb_build_object("
								"'row', coalesce($2, '{}'::jsonb), 'old', NULL, 'changes', NULL, "
								"'event', pg_catalog.jsonb_build_object('id', NULL, 'type', $1, 'op', 'EMIT', "
								"'table', NULL, 'occurred_at', pg_catalog.now(), "
								"'actor', coalesce($3, pg_catalog.current_setting('notify.actor', true))))",
								3, types, args, nulls, true, 1);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not build the event context: %s", SPI_result_code_string(ret));
	context = DatumGetJsonbPCopy(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));

	rules = load_rules(event_type);
	suppressions_exist = bounce_suppressions_exist();
	deliveries = plan_deliveries(event_type, rules, jsonb_to_tmpl_value(context), context);
	foreach(lc, deliveries)
	{
		Delivery   *d = (Delivery *) lfirst(lc);
		Datum		values[6];
		bool		vnulls[6] = {false, false, false, false, false, false};
		const char *reason = d->reason;

		if (d->status != NULL && strcmp(d->status, "queued") == 0)
			reason = psprintf("will be sent (%s)", d->reason);
		else if (d->status != NULL && strcmp(d->status, "failed") == 0)
			reason = psprintf("will fail: %s", d->reason);
		else if (d->status != NULL && strcmp(d->status, "suppressed") == 0)
			reason = psprintf("suppressed: %s", d->reason);
		values[0] = CStringGetTextDatum(d->rule->name);
		values[1] = CStringGetTextDatum(d->spec);
		if (d->recipient && d->recipient->key)
			values[2] = CStringGetTextDatum(d->recipient->key);
		else
			vnulls[2] = true;
		if (d->address)
			values[3] = CStringGetTextDatum(d->address);
		else if (d->recipient && d->recipient->email && !d->rule->webhook)
			values[3] = CStringGetTextDatum(d->recipient->email);
		else
			vnulls[3] = true;
		if (d->mode)
			values[4] = CStringGetTextDatum(d->mode);
		else
			vnulls[4] = true;
		values[5] = CStringGetTextDatum(reason);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, vnulls);
	}
	SPI_finish();
	MemoryContextSwitchTo(caller);
	return (Datum) 0;
}

PG_FUNCTION_INFO_V1(notify_query_columns);

/*
 * notify_query_columns: notify._query_columns(query, argtype): the types
 * of the columns a user's query returns, parsed (not run) as the worker
 * will run it: with the caller's rights and the search_path of the
 * caller's own sessions ("$user", public), switched for the parse only.
 * create_rule checks an attachments_query's shape with it: three columns,
 * read by position, the third bytea.
 */
Datum
notify_query_columns(PG_FUNCTION_ARGS)
{
	char	   *query = text_to_cstring(PG_GETARG_TEXT_PP(0));
	Oid			argtype = PG_GETARG_OID(1);
	MemoryContext caller = CurrentMemoryContext;
	SPIPlanPtr	plan;
	CachedPlanSource *source;
	TupleDesc	desc;
	Datum	   *types;
	int			nest;

	SPI_connect();
	nest = NewGUCNestLevel();
	(void) set_config_option("search_path", NOTIFY_OWNER_SEARCH_PATH, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	plan = SPI_prepare(query, 1, &argtype);
	AtEOXact_GUC(false, nest);
	if (plan == NULL)
		elog(ERROR, "could not prepare the query: %s", SPI_result_code_string(SPI_result));
	if (list_length(SPI_plan_get_plan_sources(plan)) != 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the query must be one statement")));
	source = (CachedPlanSource *) linitial(SPI_plan_get_plan_sources(plan));
	desc = source->resultDesc;
	if (desc == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("the query returns no rows"),
				 errhint("It must be a SELECT (or a statement with RETURNING).")));
	MemoryContextSwitchTo(caller);
	types = palloc(sizeof(Datum) * Max(desc->natts, 1));
	for (int i = 0; i < desc->natts; i++)
		types[i] = ObjectIdGetDatum(TupleDescAttr(desc, i)->atttypid);
	SPI_finish();
	MemoryContextSwitchTo(caller);
	PG_RETURN_ARRAYTYPE_P(construct_array(types, desc->natts, REGTYPEOID, sizeof(Oid), true, TYPALIGN_INT));
}

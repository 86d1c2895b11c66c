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

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/resowner.h"

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

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr rules_plan = NULL;
static SPIPlanPtr recipient_plan = NULL;
static SPIPlanPtr insert_message_plan = NULL;
static SPIPlanPtr mark_done_plan = NULL;
static SPIPlanPtr mark_failed_plan = NULL;

#define MSG_NARGS 13

/* keep_plan: prepare once for the life of the worker. */
static SPIPlanPtr
keep_plan(const char *sql, int nargs, Oid *types)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, types);

	if (plan == NULL)
		elog(ERROR, "SPI_prepare failed for \"%s\": %s", sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "SPI_keepplan failed");
	return plan;
}

/* prepare_plans: the statements fan-out runs for every batch. */
static void
prepare_plans(void)
{
	Oid			int8_t[1] = {INT8OID};
	Oid			text_t[1] = {TEXTOID};
	Oid			failed_t[2] = {INT8OID, TEXTOID};
	Oid			msg_t[MSG_NARGS] = {INT8OID, TEXTOID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID};

	if (claim_plan != NULL)
		return;
	claim_plan = keep_plan(
						   "SELECT e.id, e.event_type, notify._event_context(e) "
						   "FROM notify.event e WHERE e.processed_at IS NULL "
						   "ORDER BY e.id LIMIT $1 FOR UPDATE SKIP LOCKED",
						   1, int8_t);
	rules_plan = keep_plan(
						   "SELECT r.id, r.name, r.template, r.channel, r.default_mode, r.recipients "
						   "FROM notify.rule r WHERE r.event_type = $1 AND r.enabled ORDER BY r.id",
						   1, text_t);
	recipient_plan = keep_plan(
							   "SELECT r.email, r.display_name, r.phone, r.locale "
							   "FROM notify.recipient r WHERE r.key = $1",
							   1, text_t);
	insert_message_plan = keep_plan(
									"INSERT INTO notify.message (event_id, event_type, rule_id, rule_name, "
									"recipient_key, address, display_name, channel, status, subject, "
									"text_body, html_body, last_error) "
									"VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
									MSG_NARGS, msg_t);
	mark_done_plan = keep_plan(
							   "UPDATE notify.event SET processed_at = pg_catalog.now(), status = 'done' "
							   "WHERE id = $1",
							   1, int8_t);
	mark_failed_plan = keep_plan(
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

/*
 * context_with_recipient: the event's context plus `recipient`, sharing
 * the event's members: building it costs one small object per message,
 * not a copy of the row.
 */
static TmplValue *
context_with_recipient(const TmplValue *base, const Recipient *r)
{
	static const char *const rkeys[] = {"key", "email", "display_name", "phone", "locale"};
	TmplValue  *rv = palloc0(sizeof(TmplValue));
	TmplValue  *ctx = palloc0(sizeof(TmplValue));
	size_t		n = base ? base->count : 0;

	rv->kind = TV_OBJECT;
	rv->count = 5;
	rv->keys = palloc(sizeof(char *) * 5);
	rv->keylens = palloc(sizeof(size_t) * 5);
	rv->items = palloc(sizeof(TmplValue *) * 5);
	for (int i = 0; i < 5; i++)
	{
		rv->keys[i] = (char *) rkeys[i];
		rv->keylens[i] = strlen(rkeys[i]);
	}
	rv->items[0] = string_value(r->key);
	rv->items[1] = string_value(r->email);
	rv->items[2] = string_value(r->display_name);
	rv->items[3] = string_value(r->phone);
	rv->items[4] = string_value(r->locale);

	ctx->kind = TV_OBJECT;
	ctx->count = n + 1;
	ctx->keys = palloc(sizeof(char *) * (n + 1));
	ctx->keylens = palloc(sizeof(size_t) * (n + 1));
	ctx->items = palloc(sizeof(TmplValue *) * (n + 1));
	for (size_t i = 0; i < n; i++)
	{
		ctx->keys[i] = base->keys[i];
		ctx->keylens[i] = base->keylens[i];
		ctx->items[i] = base->items[i];
	}
	/* last member wins on lookup, so this shadows any `recipient` in the base */
	ctx->keys[n] = "recipient";
	ctx->keylens[n] = strlen("recipient");
	ctx->items[n] = rv;
	return ctx;
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

/*
 * resolve_spec: the recipients one spec stands for, for this event.
 * A spec that resolves to nobody (a null field, a deleted recipient)
 * yields an empty list: "the agent, if any".
 */
static List *
resolve_spec(const char *spec, const TmplValue *ctx)
{
	const char *colon = strchr(spec, ':');
	const char *arg = colon ? colon + 1 : "";
	size_t		kindlen = colon ? (size_t) (colon - spec) : strlen(spec);
	Recipient  *r;

	if (kindlen == 5 && strncmp(spec, "email", 5) == 0)
	{
		r = palloc0(sizeof(Recipient));
		r->email = pstrdup(arg);
		return list_make1(r);
	}
	if (kindlen == 5 && strncmp(spec, "field", 5) == 0)
	{
		const TmplValue *v = value_at_path(ctx, arg);

		if (v == NULL || v->kind != TV_STRING || v->len == 0)
			return NIL;
		r = palloc0(sizeof(Recipient));
		r->email = pnstrdup(v->str, v->len);
		return list_make1(r);
	}
	if (kindlen == 9 && strncmp(spec, "recipient", 9) == 0)
	{
		MemoryContext target = CurrentMemoryContext;
		Datum		key = CStringGetTextDatum(arg);
		int			ret = SPI_execute_plan(recipient_plan, &key, NULL, true, 1);
		HeapTuple	tup;
		TupleDesc	desc;

		MemoryContextSwitchTo(target);

		if (ret != SPI_OK_SELECT)
			elog(ERROR, "recipient lookup failed: %s", SPI_result_code_string(ret));
		if (SPI_processed == 0)
			return NIL;
		tup = SPI_tuptable->vals[0];
		desc = SPI_tuptable->tupdesc;
		r = palloc0(sizeof(Recipient));
		r->key = pstrdup(arg);
		r->email = text_or_null(tup, desc, 1);
		r->display_name = text_or_null(tup, desc, 2);
		r->phone = text_or_null(tup, desc, 3);
		r->locale = text_or_null(tup, desc, 4);
		SPI_freetuptable(SPI_tuptable);
		if (r->email == NULL)
			return NIL;
		return list_make1(r);
	}
	ereport(ERROR,
			(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
			 errmsg("unknown recipient spec \"%s\"", spec)));
	return NIL;
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

/* insert_message: one notify.message row; status queued, suppressed or failed. */
static void
insert_message(const PendingEvent *ev, const RuleInfo *rule, const Recipient *r,
			   const char *status, const RenderedMessage *msg, const char *error)
{
	Datum		v[MSG_NARGS];
	char		n[MSG_NARGS];
	int			ret;

	memset(n, ' ', sizeof(n));
	v[0] = Int64GetDatum(ev->id);
	v[1] = CStringGetTextDatum(ev->event_type);
	v[2] = Int64GetDatum(rule->id);
	v[3] = CStringGetTextDatum(rule->name);
#define SET_TEXT(i, s) do { if ((s) != NULL) v[i] = CStringGetTextDatum(s); else n[i] = 'n'; } while (0)
	SET_TEXT(4, r->key);
	SET_TEXT(5, r->email);
	SET_TEXT(6, r->display_name);
	SET_TEXT(7, rule->channel);
	SET_TEXT(8, status);
	SET_TEXT(9, msg ? msg->subject : NULL);
	SET_TEXT(10, msg ? msg->text_body : NULL);
	SET_TEXT(11, msg ? msg->html_body : NULL);
	SET_TEXT(12, error);
#undef SET_TEXT
	{
		MemoryContext target = CurrentMemoryContext;

		ret = SPI_execute_plan(insert_message_plan, v, n, false, 0);
		MemoryContextSwitchTo(target);
	}
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not queue message: %s", SPI_result_code_string(ret));
}

/* load_rules: the enabled rules for an event type. */
static List *
load_rules(const char *event_type)
{
	MemoryContext target = CurrentMemoryContext;
	Datum		arg = CStringGetTextDatum(event_type);
	int			ret = SPI_execute_plan(rules_plan, &arg, NULL, true, 0);
	List	   *rules = NIL;

	MemoryContextSwitchTo(target);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "rule lookup failed: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
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
		specs = DatumGetArrayTypePCopy(SPI_getbinval(tup, desc, 6, &isnull));
		deconstruct_array(specs, TEXTOID, -1, false, TYPALIGN_INT, &rule->specs, NULL, &rule->nspecs);
		rules = lappend(rules, rule);
	}
	SPI_freetuptable(SPI_tuptable);
	return rules;
}

/*
 * fanout_event: every message of one event.  The same address is
 * messaged once per event and rule, whichever specs lead to it.
 */
static int
fanout_event(const PendingEvent *ev)
{
	List	   *rules = load_rules(ev->event_type);
	TmplValue  *base;
	ListCell   *lc;
	int			count = 0;

	if (rules == NIL)
		return 0;
	base = jsonb_to_tmpl_value(ev->context);

	foreach(lc, rules)
	{
		RuleInfo   *rule = (RuleInfo *) lfirst(lc);
		List	   *seen = NIL;

		for (int s = 0; s < rule->nspecs; s++)
		{
			char	   *spec = TextDatumGetCString(rule->specs[s]);
			List	   *recipients = resolve_spec(spec, base);
			ListCell   *rc;

			foreach(rc, recipients)
			{
				Recipient  *r = (Recipient *) lfirst(rc);
				char		errbuf[256];
				char	   *lowered = ascii_lower(r->email);
				ListCell   *sc;
				bool		dup = false;
				RenderedMessage *msg;

				foreach(sc, seen)
				{
					if (strcmp((char *) lfirst(sc), lowered) == 0)
					{
						dup = true;
						break;
					}
				}
				if (dup)
					continue;
				seen = lappend(seen, lowered);

				if (!mime_check_address(r->email, errbuf, sizeof(errbuf)))
				{
					insert_message(ev, rule, r, "failed", NULL,
								   psprintf("recipient spec \"%s\": %s", spec, errbuf));
					count++;
					continue;
				}
				if (strcmp(rule->default_mode, "off") == 0)
				{
					insert_message(ev, rule, r, "suppressed", NULL,
								   "rule's default_mode is off");
					count++;
					continue;
				}
				msg = render_template_value(rule->template, r->locale, context_with_recipient(base, r));
				insert_message(ev, rule, r, "queued", msg, NULL);
				count++;
			}
		}
	}
	return count;
}

/* mark_event: record an event's outcome (done, or failed with its error). */
static void
mark_event(int64 id, const char *error)
{
	Datum		v[2];
	int			ret;
	MemoryContext target = CurrentMemoryContext;

	v[0] = Int64GetDatum(id);

	if (error == NULL)
		ret = SPI_execute_plan(mark_done_plan, v, NULL, false, 0);
	else
	{
		v[1] = CStringGetTextDatum(error);
		ret = SPI_execute_plan(mark_failed_plan, v, NULL, false, 0);
	}
	MemoryContextSwitchTo(target);
	if (ret != SPI_OK_UPDATE)
		elog(ERROR, "could not mark event %lld: %s", (long long) id, SPI_result_code_string(ret));
}

/* claim_events: a batch of unprocessed events, locked for this transaction. */
static List *
claim_events(int batch_size)
{
	MemoryContext target = CurrentMemoryContext;
	Datum		arg = Int64GetDatum(batch_size);
	int			ret = SPI_execute_plan(claim_plan, &arg, NULL, false, 0);
	List	   *events = NIL;

	MemoryContextSwitchTo(target);

	if (ret != SPI_OK_SELECT)
		elog(ERROR, "could not claim events: %s", SPI_result_code_string(ret));
	for (uint64 i = 0; i < SPI_processed; i++)
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
 * try_fanout_event: fan out one event in a subtransaction; returns NULL,
 * or the error that rolled it back.
 */
static char *
try_fanout_event(PendingEvent *ev, MemoryContext outer, MemoryContext event_cxt)
{
	ResourceOwner owner = CurrentResourceOwner;
	char	   *volatile error = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(event_cxt);
	PG_TRY();
	{
		fanout_event(ev);
		mark_event(ev->id, NULL);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(outer);
		edata = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(outer);
		CurrentResourceOwner = owner;
		error = pstrdup(edata->message ? edata->message : "unknown error");
		FreeErrorData(edata);
	}
	PG_END_TRY();
	return error;
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

	prepare_plans();
	events = claim_events(batch_size);
	if (events == NIL)
		return 0;

	event_cxt = AllocSetContextCreate(outer, "notify fanout event", ALLOCSET_DEFAULT_SIZES);
	foreach(lc, events)
	{
		PendingEvent *ev = (PendingEvent *) lfirst(lc);
		char	   *error;

		CHECK_FOR_INTERRUPTS();
		error = try_fanout_event(ev, outer, event_cxt);
		if (error != NULL)
		{
			ereport(LOG,
					(errmsg("notify_ext: event %lld (%s) failed: %s",
							(long long) ev->id, ev->event_type, error)));
			mark_event(ev->id, error);
		}
		MemoryContextReset(event_cxt);
	}
	MemoryContextDelete(event_cxt);
	return list_length(events);
}

/*-------------------------------------------------------------------------
 *
 * capture.c
 *	  The trigger function installed by notify.watch, and notify.emit: both
 *	  write one outbox row in the caller's transaction.
 *
 * This is the ERP's hot path: every watched INSERT pays for it.  The
 * trigger therefore does the least that keeps the event complete (the row
 * as jsonb, the old row, which columns changed) and leaves everything else
 * (rules, recipients, rendering) to the worker.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/sequence.h"
#include "commands/trigger.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "parser/parser.h"
#include "tcop/utility.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "notify_ext.h"

PG_FUNCTION_INFO_V1(notify_capture);
PG_FUNCTION_INFO_V1(notify_emit);

#define EVENT_NARGS 7

/* Saved plans, prepared once per backend. */
static SPIPlanPtr insert_event_plan = NULL;
static SPIPlanPtr emit_event_plan = NULL;

/*
 * The outbox as the direct insert needs it, found once per backend and
 * forgotten when notify.event changes (relcache invalidation).  "direct"
 * holds when the table is exactly what this library knows: plain, without
 * triggers, rules or row security, every column one we fill or leave
 * null, an identity id.  Otherwise the SPI path below is used.
 */
enum
{
	EV_ID, EV_TYPE, EV_OP, EV_TABLE, EV_ACTOR, EV_ROW, EV_OLD, EV_CHANGED,
	EV_OCCURRED, EV_STATUS, EV_NCOLS
};
static const char *const event_col[EV_NCOLS] = {
	"id", "event_type", "op", "table_name", "actor", "row", "old", "changed", "occurred_at", "status"
};
/* columns left null by capture (filled later by the worker, or by schedules) */
static const char *const event_null_col[] = {
	"processed_at", "last_error", "schedule", "rows", "columns"
};

static struct
{
	bool		valid;
	bool		direct;
	Oid			relid;
	Oid			owner;
	Oid			seqid;
	AttrNumber	attnum[EV_NCOLS];
	Datum		pending;		/* 'pending', in TopMemoryContext */
} target;
static bool target_callback = false;

/*
 * The outbox as this transaction writes it: opened, with its indexes, an
 * executor state and a slot, at the transaction's first event and closed
 * at its end (its commit, prepare or abort), so that an ERP transaction of
 * an order and its lines sets up once, not per row.  Opened under the
 * transaction's own resource owner, so that a subtransaction that ends
 * (a savepoint rolled back) does not take it away from the rest; its
 * memory is a child of the transaction's.  An invalidation of notify.event
 * (an ALTER TABLE in the same transaction) closes it: the next row opens
 * it again.
 */
static struct
{
	bool		open;
	bool		stale;
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
} xact_target;
/* target_inval: notify.event (or every relation) changed: look again. */
static void
target_inval(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == target.relid)
	{
		target.valid = false;
		xact_target.stale = true;
	}
}

/* load_target: find notify.event and decide whether the direct insert applies. */
static void
load_target(void)
{
	Oid			nsp = get_namespace_oid("notify", true);
	Oid			relid = OidIsValid(nsp) ? get_relname_relid("event", nsp) : InvalidOid;
	Relation	rel;
	TupleDesc	desc;
	bool		direct;

	if (!target_callback)
	{
		CacheRegisterRelcacheCallback(target_inval, (Datum) 0);
		target.pending = PointerGetDatum(MemoryContextAlloc(TopMemoryContext, VARHDRSZ + 7));
		SET_VARSIZE(DatumGetPointer(target.pending), VARHDRSZ + 7);
		memcpy(VARDATA(DatumGetPointer(target.pending)), "pending", 7);
		target_callback = true;
	}
	if (!OidIsValid(relid))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_TABLE),
				 errmsg("notify_ext's outbox table notify.event does not exist"),
				 errhint("Is the extension installed in this database?")));
	rel = table_open(relid, AccessShareLock);
	desc = RelationGetDescr(rel);
	direct = rel->rd_rel->relkind == RELKIND_RELATION && rel->trigdesc == NULL &&
		rel->rd_rules == NULL && !rel->rd_rel->relrowsecurity;
	memset(target.attnum, 0, sizeof(target.attnum));
	for (int i = 0; i < desc->natts && direct; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		bool		known = false;

		if (att->attisdropped)
			continue;
		for (int c = 0; c < EV_NCOLS && !known; c++)
			if (strcmp(NameStr(att->attname), event_col[c]) == 0)
			{
				target.attnum[c] = att->attnum;
				known = true;
			}
		for (int c = 0; c < (int) lengthof(event_null_col) && !known; c++)
			known = strcmp(NameStr(att->attname), event_null_col[c]) == 0;
		direct = known;
	}
	for (int c = 0; c < EV_NCOLS && direct; c++)
		direct = target.attnum[c] != 0;
	target.seqid = direct ? getIdentitySequence(relid, target.attnum[EV_ID], true) : InvalidOid;
	target.direct = direct && OidIsValid(target.seqid);
	target.relid = relid;
	target.owner = rel->rd_rel->relowner;
	table_close(rel, AccessShareLock);
	target.valid = true;
}

static bool xact_target_callback = false;

/* close_xact_target: the transaction's outbox closed (end of transaction, or stale). */
static void
close_xact_target(void)
{
	ResourceOwner save = CurrentResourceOwner;

	if (!xact_target.open)
		return;
	xact_target.open = false;
	CurrentResourceOwner = TopTransactionResourceOwner;
	ExecCloseIndices(xact_target.rri);
	ExecResetTupleTable(xact_target.estate->es_tupleTable, false);
	FreeExecutorState(xact_target.estate);
	table_close(xact_target.rel, NoLock);
	CurrentResourceOwner = save;
}

/*
 * xact_target_end: at commit or prepare the outbox is closed before the
 * resource owner checks for leaked references; at abort the resource owner
 * releases them and only the flag is forgotten (its memory went with the
 * transaction's).
 */
static void
xact_target_end(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			close_xact_target();
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			xact_target.open = false;
			break;
		default:
			break;
	}
}

/*
 * close_before_utility: any utility command (an ALTER TABLE or TRUNCATE of
 * notify.event, a DROP EXTENSION) may need notify.event not to be in use by
 * this session: the transaction's outbox is closed first, and opened again
 * by the next event.
 */
static ProcessUtility_hook_type prev_process_utility = NULL;

static void
close_before_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					 ProcessUtilityContext context, ParamListInfo params,
					 QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	if (xact_target.open)
	{
		/* statements that never need a table out of use (an ORM's savepoints) keep it */
		switch (nodeTag(pstmt->utilityStmt))
		{
			case T_TransactionStmt:
			case T_VariableSetStmt:
			case T_VariableShowStmt:
			case T_DoStmt:
			case T_CallStmt:
			case T_ExplainStmt:
			case T_CopyStmt:
			case T_PrepareStmt:
			case T_ExecuteStmt:
			case T_DeallocateStmt:
			case T_DeclareCursorStmt:
			case T_FetchStmt:
			case T_ClosePortalStmt:
			case T_NotifyStmt:
			case T_ListenStmt:
			case T_UnlistenStmt:
				break;
			default:
				close_xact_target();
				break;
		}
	}
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

/* notify_capture_init: _PG_init's part for capture (the utility hook above). */
void
notify_capture_init(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = close_before_utility;
}

/* open_xact_target: the transaction's outbox, opened at its first event. */
static void
open_xact_target(void)
{
	ResourceOwner save;
	MemoryContext old;

	if (xact_target.open && !xact_target.stale)
		return;
	close_xact_target();
	if (!xact_target_callback)
	{
		RegisterXactCallback(xact_target_end, NULL);
		xact_target_callback = true;
	}
	save = CurrentResourceOwner;
	CurrentResourceOwner = TopTransactionResourceOwner;
	old = MemoryContextSwitchTo(TopTransactionContext);
	xact_target.rel = table_open(target.relid, RowExclusiveLock);
	xact_target.estate = CreateExecutorState();
	xact_target.rri = makeNode(ResultRelInfo);
	InitResultRelInfo(xact_target.rri, xact_target.rel, 1, NULL, 0);
	ExecOpenIndices(xact_target.rri, false);
	xact_target.slot = ExecInitExtraTupleSlot(xact_target.estate, RelationGetDescr(xact_target.rel),
											  &TTSOpsHeapTuple);
	MemoryContextSwitchTo(old);
	CurrentResourceOwner = save;
	xact_target.open = true;
	xact_target.stale = false;
}

/*
 * insert_event_direct: the outbox row through the table access method and
 * the index AM, without planning or executing a statement: the cost of an
 * ERP insert that is watched is the row, its index entries and its WAL.
 * The values satisfy the table's constraints by construction (the status
 * is 'pending', the other NOT NULL columns are set here).
 */
static int64
insert_event_direct(Datum *args, const char *argnulls)
{
	TupleDesc	desc;
	Datum	   *values;
	bool	   *isnull;
	int64		id;
	HeapTuple	tuple;

	open_xact_target();
	desc = RelationGetDescr(xact_target.rel);
	values = palloc0(sizeof(Datum) * desc->natts);
	isnull = palloc(sizeof(bool) * desc->natts);

	/*
	 * The transaction's id first, then the event's: every event id is taken
	 * by a transaction that already has its xid, which the worker's low-water
	 * mark over event ids relies on (see fanout.c).  (A watched row's own
	 * insert gave the transaction its xid already; emit may be the first
	 * write.)
	 */
	(void) GetCurrentTransactionId();
	id = nextval_internal(target.seqid, false);

	memset(isnull, true, sizeof(bool) * desc->natts);
#define SET_COL(c, v) (values[target.attnum[c] - 1] = (v), isnull[target.attnum[c] - 1] = false)
	SET_COL(EV_ID, Int64GetDatum(id));
	for (int i = 0; i < EVENT_NARGS; i++)
		if (argnulls[i] != 'n')
			SET_COL(EV_TYPE + i, args[i]);
	SET_COL(EV_OCCURRED, TimestampTzGetDatum(GetCurrentTransactionStartTimestamp()));	/* now() */
	SET_COL(EV_STATUS, target.pending);
#undef SET_COL
	tuple = heap_form_tuple(desc, values, isnull);

	ExecStoreHeapTuple(tuple, xact_target.slot, false);
	table_tuple_insert(xact_target.rel, xact_target.slot, GetCurrentCommandId(true), 0, NULL);
	(void) ExecInsertIndexTuples(xact_target.rri, xact_target.slot, xact_target.estate, false, false,
								 NULL, NIL);
	ExecClearTuple(xact_target.slot);
	ResetPerTupleExprContext(xact_target.estate);
	return id;
}

/*
 * insert_event: write one outbox row, as the outbox's owner, so that the
 * ERP's roles need no rights on the notify schema.  Returns the event id.
 * An error here aborts the business transaction, as it must: an event that
 * cannot be recorded must not be silently lost.
 */
static int64
insert_event(Datum *values, const char *nulls, bool want_id)
{
	Oid			save_userid;
	int			save_sec;
	int			ret;
	int64		id = 0;
	SPIPlanPtr	plan;
	int			nest;

	if (!target.valid)
		load_target();
	if (target.direct)
	{
		id = insert_event_direct(values, nulls);
		notify_wake_worker_at_commit();
		return id;
	}

	SPI_connect();
	nest = notify_pin_search_path();

	/*
	 * As the owner from the start: the statement is parsed, and may be
	 * planned again, with the rights of whoever is current, and an ERP role
	 * has none on schema notify (the first insert of a new session would
	 * fail with "permission denied for schema notify").
	 */
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(target.owner,
						   save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	if (insert_event_plan == NULL)
	{
		Oid			types[EVENT_NARGS] = {TEXTOID, TEXTOID, TEXTOID, TEXTOID, JSONBOID, JSONBOID, TEXTARRAYOID};
		const char *cols = "INSERT INTO notify.event (event_type, op, table_name, actor, row, old, changed) "
		"VALUES ($1, $2, $3, $4, $5, $6, $7)";

		insert_event_plan = notify_keep_plan(cols, EVENT_NARGS, types);
		emit_event_plan = notify_keep_plan(psprintf("%s RETURNING id", cols), EVENT_NARGS, types);
	}
	plan = want_id ? emit_event_plan : insert_event_plan;
	/* the xid before the id, as in insert_event_direct */
	(void) GetCurrentTransactionId();
	ret = SPI_execute_plan(plan, values, nulls, false, 0);
	SetUserIdAndSecContext(save_userid, save_sec);
	notify_unpin_search_path(nest);

	if (ret != (want_id ? SPI_OK_INSERT_RETURNING : SPI_OK_INSERT))
		elog(ERROR, "could not write event into notify.event: %s", SPI_result_code_string(ret));
	if (want_id)
	{
		bool		isnull;

		id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
	SPI_finish();

	notify_wake_worker_at_commit();
	return id;
}

/* changed_columns: names of the columns whose value differs, in table order. */
static Datum
changed_columns(HeapTuple oldtup, HeapTuple newtup, TupleDesc tupdesc, bool *isnull)
{
	Datum	   *names = palloc(sizeof(Datum) * tupdesc->natts);
	int			n = 0;

	for (int i = 0; i < tupdesc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(tupdesc, i);
		bool		null1,
					null2;
		Datum		v1,
					v2;

		if (att->attisdropped)
			continue;
		v1 = heap_getattr(oldtup, i + 1, tupdesc, &null1);
		v2 = heap_getattr(newtup, i + 1, tupdesc, &null2);
		if (null1 && null2)
			continue;
		if (null1 != null2 || !datum_image_eq(v1, v2, att->attbyval, att->attlen))
			names[n++] = CStringGetTextDatum(NameStr(att->attname));
	}
	*isnull = false;
	return PointerGetDatum(construct_array(names, n, TEXTOID, -1, false, TYPALIGN_INT));
}

/* session_actor: the transaction's SET LOCAL notify.actor, or NULL. */
static const char *
session_actor(void)
{
	if (notify_actor == NULL || notify_actor[0] == '\0')
		return NULL;
	return notify_actor;
}

/*
 * row_actor: the actor from the row's actor column, with its prefix
 * ('seller' and 7 give 'seller:7'), or NULL when the column is null.
 */
static char *
row_actor(HeapTuple tuple, TupleDesc tupdesc, const char *column, const char *prefix)
{
	int			attno = SPI_fnumber(tupdesc, column);
	char	   *value;

	if (attno <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_COLUMN),
				 errmsg("notify_ext: actor column \"%s\" does not exist", column),
				 errhint("Re-create the watch with notify.unwatch and notify.watch.")));
	value = SPI_getvalue(tuple, tupdesc, attno);
	if (value == NULL)
		return NULL;
	if (prefix != NULL && prefix[0] != '\0')
		return psprintf("%s:%s", prefix, value);
	return value;
}

/*
 * notify_capture: the AFTER ROW trigger.  Arguments: event_type,
 * actor_column ('' for none), actor_prefix ('' for none).
 */
Datum
notify_capture(PG_FUNCTION_ARGS)
{
	TriggerData *trigdata = (TriggerData *) fcinfo->context;
	Trigger    *trigger;
	Relation	rel;
	TupleDesc	tupdesc;
	HeapTuple	row;
	Datum		values[EVENT_NARGS];
	char		nulls[EVENT_NARGS];
	const char *op;
	const char *actor = NULL;
	const char *table_name;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("notify.capture() may only be called as a trigger"),
				 errhint("Use notify.watch() to install it.")));
	if (!TRIGGER_FIRED_AFTER(trigdata->tg_event) || !TRIGGER_FIRED_FOR_ROW(trigdata->tg_event))
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("notify.capture() must be an AFTER ... FOR EACH ROW trigger")));

	trigger = trigdata->tg_trigger;
	if (trigger->tgnargs < 1)
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("notify.capture() needs the event type as its first argument")));

	rel = trigdata->tg_relation;
	tupdesc = RelationGetDescr(rel);
	memset(nulls, ' ', sizeof(nulls));

	if (TRIGGER_FIRED_BY_INSERT(trigdata->tg_event))
	{
		op = "INSERT";
		row = trigdata->tg_trigtuple;
		values[4] = notify_row_to_jsonb(rel, row);
		nulls[5] = 'n';
		nulls[6] = 'n';
	}
	else if (TRIGGER_FIRED_BY_UPDATE(trigdata->tg_event))
	{
		bool		isnull;

		op = "UPDATE";
		row = trigdata->tg_newtuple;
		values[4] = notify_row_to_jsonb(rel, row);
		values[5] = notify_row_to_jsonb(rel, trigdata->tg_trigtuple);
		values[6] = changed_columns(trigdata->tg_trigtuple, row, tupdesc, &isnull);
	}
	else if (TRIGGER_FIRED_BY_DELETE(trigdata->tg_event))
	{
		op = "DELETE";
		row = trigdata->tg_trigtuple;
		values[4] = notify_row_to_jsonb(rel, row);
		values[5] = values[4];
		nulls[6] = 'n';
	}
	else
		ereport(ERROR,
				(errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
				 errmsg("notify.capture() handles INSERT, UPDATE and DELETE only")));

	if (trigger->tgnargs >= 2 && trigger->tgargs[1][0] != '\0')
		actor = row_actor(row, tupdesc, trigger->tgargs[1],
						  trigger->tgnargs >= 3 ? trigger->tgargs[2] : NULL);
	if (actor == NULL)
		actor = session_actor();

	table_name = notify_relation_name(rel);
	values[0] = CStringGetTextDatum(trigger->tgargs[0]);
	values[1] = CStringGetTextDatum(op);
	values[2] = CStringGetTextDatum(table_name);
	if (actor != NULL)
		values[3] = CStringGetTextDatum(actor);
	else
		nulls[3] = 'n';

	insert_event(values, nulls, false);

	return PointerGetDatum(NULL);
}

/* notify_emit: notify.emit(event_type, payload, actor) for events no table shows. */
Datum
notify_emit(PG_FUNCTION_ARGS)
{
	Datum		values[EVENT_NARGS];
	char		nulls[EVENT_NARGS];
	text	   *event_type;
	const char *actor = NULL;
	char	   *type_str;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("notify.emit: event_type must not be null")));
	event_type = PG_GETARG_TEXT_PP(0);
	type_str = text_to_cstring(event_type);
	if (type_str[0] == '\0' || strspn(type_str, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-") != strlen(type_str))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("notify.emit: invalid event type \"%s\"", type_str),
				 errhint("Use letters, digits and _ . : - only, e.g. 'order.created'.")));

	memset(nulls, ' ', sizeof(nulls));
	values[0] = PointerGetDatum(event_type);
	values[1] = CStringGetTextDatum("EMIT");
	nulls[2] = 'n';
	if (!PG_ARGISNULL(2))
		actor = text_to_cstring(PG_GETARG_TEXT_PP(2));
	else
		actor = session_actor();
	if (actor != NULL)
		values[3] = CStringGetTextDatum(actor);
	else
		nulls[3] = 'n';
	if (PG_ARGISNULL(1))
		values[4] = DirectFunctionCall1(jsonb_in, CStringGetDatum("{}"));
	else
		values[4] = PointerGetDatum(PG_GETARG_JSONB_P(1));	/* detoasted: stored as is */
	nulls[5] = 'n';
	nulls[6] = 'n';

	PG_RETURN_INT64(insert_event(values, nulls, true));
}

PG_FUNCTION_INFO_V1(notify_check_condition);

/*
 * notify_check_condition: notify._check_condition(condition): raise unless
 * the text is exactly one SQL expression.  notify.watch pastes a condition
 * into CREATE TRIGGER ... WHEN (condition), and "true) ...; --" would
 * otherwise close the clause and run more statements.  The text is parsed
 * as the only item of a SELECT list, the closing parenthesis on a line of
 * its own so that a trailing "--" cannot swallow it: one statement, one
 * unnamed item, no other clause.  Such a text, put between the same
 * parentheses after WHEN, is that expression or a syntax error, never
 * anything else.  Names are not looked up here: CREATE TRIGGER does that.
 */
Datum
notify_check_condition(PG_FUNCTION_ARGS)
{
	char	   *condition = text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *sql = psprintf("SELECT (%s\n)", condition);
	MemoryContext caller = CurrentMemoryContext;
	List	   *volatile parsed = NIL;
	bool		one = false;

	PG_TRY();
	{
		parsed = raw_parser(sql, RAW_PARSE_DEFAULT);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		edata = CopyErrorData();
		FlushErrorState();
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("condition is not a valid SQL expression: %s", edata->message),
				 errhint("A condition is one boolean expression over NEW and OLD, e.g. NEW.status = 'approved'.")));
	}
	PG_END_TRY();

	if (list_length(parsed) == 1 && IsA(((RawStmt *) linitial(parsed))->stmt, SelectStmt))
	{
		SelectStmt *sel = (SelectStmt *) ((RawStmt *) linitial(parsed))->stmt;

		one = sel->op == SETOP_NONE && sel->fromClause == NIL && sel->whereClause == NULL &&
			sel->groupClause == NIL && sel->havingClause == NULL && sel->windowClause == NIL &&
			sel->sortClause == NIL && sel->limitCount == NULL && sel->limitOffset == NULL &&
			sel->lockingClause == NIL && sel->withClause == NULL && sel->intoClause == NULL &&
			sel->distinctClause == NIL && sel->valuesLists == NIL &&
			list_length(sel->targetList) == 1 &&
			((ResTarget *) linitial(sel->targetList))->name == NULL;
	}
	if (!one)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("condition must be one SQL expression"),
				 errdetail("Condition: %s", condition),
				 errhint("A condition is one boolean expression over NEW and OLD, e.g. NEW.status = 'approved'; it cannot end the WHEN clause or add statements.")));
	PG_RETURN_VOID();
}

/*-------------------------------------------------------------------------
 *
 * spi_util.c
 *	  The SPI idioms every module of notify_ext repeats, written once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "storage/lmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "executor/spi.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "notify_ext.h"

/*
 * notify_pin_search_path: from here to notify_unpin_search_path(nest), the
 * search_path is NOTIFY_PINNED_SEARCH_PATH, whatever the session had.  For
 * the C functions that run SQL in a caller's session without a SET clause
 * of their own (the capture trigger's fallback, emit): a caller whose path
 * starts with a schema another role can write must never run that role's
 * operators through them (CVE-2018-1058).  The plan cache re-analyses a
 * kept plan under whatever path is current, so pinning when the plan is
 * made is not enough: it is pinned whenever one runs.
 */
int
notify_pin_search_path(void)
{
	int			nest = NewGUCNestLevel();

	(void) set_config_option("search_path", NOTIFY_PINNED_SEARCH_PATH, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	return nest;
}

/* notify_unpin_search_path: the caller's search_path (and every setting) back. */
void
notify_unpin_search_path(int nest)
{
	AtEOXact_GUC(false, nest);
}

/*
 * notify_execute_as_owner: run a query a user registered (a rule's context
 * or attachments query, a directory, a schedule) as that user, and only
 * that: with their rights (row-level security applies), in a restricted
 * security context (no SET ROLE, no temporary objects), with the search
 * path a session of theirs starts with ("$user", public), and inside a GUC
 * nest level of its own that is closed as aborted, whatever happened: a
 * set_config() or SET in the query (search_path, application_name, any
 * setting) ends with the query.  This is what PostgreSQL does for index
 * builds and REFRESH MATERIALIZED VIEW; without the nest level a
 * notify_admin member could leave a search_path in the worker's superuser
 * session that runs their operators in the worker's own statements.  On an
 * error the (sub)transaction's abort restores the user and the settings.
 */
int
notify_execute_as_owner(Oid owner, const char *what, const char *sql, int nargs, Oid *types,
						Datum *values, bool read_only, long tcount)
{
	Oid			save_userid;
	int			save_sec;
	int			nest;
	int			ret;
	MemoryContext caller = CurrentMemoryContext;

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(owner)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the role that owns %s no longer exists", what),
				 errhint("Create it again as an existing role, so that its query has someone's rights to run with.")));
	nest = NewGUCNestLevel();
	(void) set_config_option("search_path", NOTIFY_OWNER_SEARCH_PATH, PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	GetUserIdAndSecContext(&save_userid, &save_sec);
	SetUserIdAndSecContext(owner, save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
	ret = SPI_execute_with_args(sql, nargs, types, values, NULL, read_only, tcount);
	SetUserIdAndSecContext(save_userid, save_sec);
	AtEOXact_GUC(false, nest);
	MemoryContextSwitchTo(caller);
	return ret;
}

/*
 * notify_clean_text: a copy of what a server or a network library said
 * (len bytes, not necessarily terminated) that a text column can hold: at
 * most maxlen bytes, cut at a character's boundary, one line (CR, LF and
 * other control characters become spaces), and valid in the database's
 * encoding (a byte that does not start a valid character becomes '?').
 * SMTP replies and libcurl's errors are not guaranteed to be any of that.
 */
char *
notify_clean_text(const char *src, size_t len, size_t maxlen)
{
	int			enc = GetDatabaseEncoding();
	char	   *dst = palloc(Min(len, maxlen) + 1);
	size_t		i = 0;
	size_t		o = 0;

	while (i < len && src[i] != '\0')
	{
		unsigned char c = (unsigned char) src[i];
		int			l;

		if (c < 0x80)
		{
			if (o + 1 > maxlen)
				break;
			dst[o++] = (c < 0x20 || c == 0x7f) ? ' ' : (char) c;
			i++;
			continue;
		}
		l = pg_encoding_verifymbchar(enc, src + i, (int) (len - i));
		if (l <= 0)
		{
			if (o + 1 > maxlen)
				break;
			dst[o++] = '?';
			i++;
			continue;
		}
		if (o + l > maxlen)
			break;
		memcpy(dst + o, src + i, l);
		o += l;
		i += l;
	}
	dst[o] = '\0';
	return dst;
}

/*
 * notify_keep_plan: prepare a statement once for the life of the backend.
 * Plans survive DROP/CREATE EXTENSION: the plan cache re-analyses them
 * against the new objects.
 */
SPIPlanPtr
notify_keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	MemoryContext caller = CurrentMemoryContext;
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "notify_ext: could not prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "notify_ext: could not keep the plan of \"%s\"", sql);

	/*
	 * SPI leaves its procedure context current, which SPI_finish deletes:
	 * what the caller allocates next (a list of claimed messages) must not
	 * go there (a worker crashed on such a list in its first round).
	 */
	MemoryContextSwitchTo(caller);
	return plan;
}

/*
 * Set by the worker: its kept plans are planned with enable_seqscan and
 * enable_bitmapscan off.  A kept plan is planned once, at its first
 * execution, and kept until an invalidation; a worker that starts on a
 * fresh install plans against empty tables, and the plans it keeps then
 * scan notify.event or notify.message whole and sort them for every batch
 * (the event claim read 20,000 rows to return 100: delivery fell from
 * 5,000 to 1,500 msgs/s) until autovacuum's ANALYZE invalidates them.
 * Every statement of the hot path has an index made for it, so the
 * planner is told to use one whatever the statistics say (and JIT is off:
 * the penalty on the seq scans left would make every statement look worth
 * compiling, 150 ms each).  Planning
 * happens inside the execution, so the settings are in force when it does;
 * they last for the statement only (a GUC nest level), never for the
 * queries users register (those run through notify_execute_as_owner).
 */
bool		notify_plan_for_indexes = false;

/*
 * notify_run_plan: execute a kept plan and come back to the caller's
 * memory context (SPI leaves its own current, so what the caller
 * allocates next would otherwise die with the SPI call); an unexpected
 * result code is an error naming what was being done.  Returns
 * SPI_processed.
 */
uint64
notify_run_plan(SPIPlanPtr plan, Datum *values, const char *nulls, bool read_only,
				long tcount, int expected, const char *what)
{
	MemoryContext caller = CurrentMemoryContext;
	int			nest = -1;
	int			ret;

	if (notify_plan_for_indexes)
	{
		nest = NewGUCNestLevel();
		(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		(void) set_config_option("enable_bitmapscan", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
		/* a one-row table has nothing but a seq scan, whose cost is now above jit_above_cost */
		(void) set_config_option("jit", "off", PGC_USERSET, PGC_S_SESSION,
								 GUC_ACTION_SAVE, true, 0, false);
	}
	ret = SPI_execute_plan(plan, values, nulls, read_only, tcount);
	if (nest >= 0)
		AtEOXact_GUC(false, nest);
	MemoryContextSwitchTo(caller);
	if (ret != expected)
		elog(ERROR, "notify_ext: %s failed: %s", what, SPI_result_code_string(ret));
	return SPI_processed;
}

/*
 * notify_try_subxact: run fn(arg) in a subtransaction of its own, in
 * work_cxt, and come back to `outer`.  Returns NULL when it went well
 * (its work is kept), else the error's message, allocated in `outer`
 * (its work is rolled back, the error flushed): one bad event or row
 * fails alone and the batch goes on.
 */
char *
notify_try_subxact(void (*fn) (void *arg), void *arg, MemoryContext outer, MemoryContext work_cxt)
{
	ResourceOwner owner = CurrentResourceOwner;
	char	   *volatile error = NULL;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(work_cxt);
	PG_TRY();
	{
		fn(arg);
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
 * notify_refresh_snapshot: after a claim, read what follows (rules,
 * recipients, channels) with a snapshot at least as new as the claim's.
 * The read-only lookups use the active snapshot, which was taken when the
 * transaction began: a rule created just before an event, both committed
 * between that moment and the claim, was invisible to it, and the event
 * was marked done with nobody told (seen in test_worker_lifecycle.py).
 * Under READ COMMITTED this is a new snapshot; under REPEATABLE READ the
 * transaction's, which the claim used too.
 */
void
notify_refresh_snapshot(void)
{
	PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());
}

/*
 * notify_lock_extension: called first in each of the worker's
 * transactions.  A share lock on the extension itself: a DROP EXTENSION
 * locks the extension before any of its tables, so it now waits for the
 * worker's transaction to end (and a worker's next transaction waits for
 * the DROP) instead of the two taking the tables' locks in opposite orders
 * and deadlocking.  Raises "extension dropped" when it is gone by the time
 * the lock is granted: the worker then waits for it as at start.
 */
void
notify_lock_extension(void)
{
	Oid			ext = get_extension_oid("notify_ext", true);

	if (OidIsValid(ext))
	{
		LockDatabaseObject(ExtensionRelationId, ext, 0, AccessShareLock);
		/* granted after a DROP committed: see the catalog as it is now */
		AcceptInvalidationMessages();
		if (get_extension_oid("notify_ext", true) == ext)
			return;
	}
	ereport(ERROR,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("extension \"notify_ext\" was dropped")));
}

/*
 * notify_array: a one-dimensional array of n values of elemtype (nulls[i]
 * true for a null element), for statements that take a batch's column as
 * one argument (ROWS FROM (unnest($1), ...)).
 */
Datum
notify_array(Datum *values, bool *nulls, int n, Oid elemtype)
{
	int16		len;
	bool		byval;
	char		align;
	int			dims[1] = {n};
	int			lbs[1] = {1};

	get_typlenbyvalalign(elemtype, &len, &byval, &align);
	return PointerGetDatum(construct_md_array(values, nulls, 1, dims, lbs, elemtype, len, byval, align));
}

/*
 * notify_begin_work, notify_end_work: a worker's transaction with SPI and
 * a snapshot, as worker_spi does it; the extension is locked against DROP
 * EXTENSION for its length, and pg_stat_activity says what it does.
 */
void
notify_begin_work(const char *activity)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	notify_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, activity);
}

void
notify_end_work(void)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
}

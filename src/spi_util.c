/*-------------------------------------------------------------------------
 *
 * spi_util.c
 *	  The SPI idioms every module of notify_ext repeats, written once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_extension.h"
#include "commands/extension.h"
#include "storage/lmgr.h"
#include "utils/array.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "executor/spi.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"

#include "notify_ext.h"

/*
 * notify_keep_plan: prepare a statement once for the life of the backend.
 * Plans survive DROP/CREATE EXTENSION: the plan cache re-analyses them
 * against the new objects.
 */
SPIPlanPtr
notify_keep_plan(const char *sql, int nargs, Oid *argtypes)
{
	SPIPlanPtr	plan = SPI_prepare(sql, nargs, argtypes);

	if (plan == NULL)
		elog(ERROR, "notify_ext: could not prepare \"%s\": %s", sql, SPI_result_code_string(SPI_result));
	if (SPI_keepplan(plan) != 0)
		elog(ERROR, "notify_ext: could not keep the plan of \"%s\"", sql);
	return plan;
}

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
	int			ret = SPI_execute_plan(plan, values, nulls, read_only, tcount);

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

/*-------------------------------------------------------------------------
 *
 * spi_util.c
 *	  The SPI idioms every module of notify_ext repeats, written once.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "executor/spi.h"

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

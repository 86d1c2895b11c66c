/*-------------------------------------------------------------------------
 *
 * notify_ext.c
 *	  Library entry point: settings, shared memory, the background worker's
 *	  registration, and waking the worker when a transaction that wrote
 *	  events commits.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "fmgr.h"
#include "funcapi.h"
#include "access/htup_details.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"

#include "notify_ext.h"

PG_MODULE_MAGIC;

char	   *notify_database = NULL;
int			notify_poll_interval = 5000;
int			notify_batch_size = 100;
bool		notify_enabled = true;
int			notify_max_attempts = 10;
int			notify_retry_backoff = 10;
int			notify_lease = 60;
int			notify_retention = 30 * 24 * 3600;
char	   *notify_actor = NULL;

NotifyShared *notify_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Set when this backend's current transaction wrote an event. */
static bool wake_at_commit = false;
static bool xact_callback_registered = false;

void		_PG_init(void);
static void notify_shmem_request(void);
static void notify_shmem_startup(void);
static void notify_xact_callback(XactEvent event, void *arg);
static void define_settings(void);
static void register_worker(void);

PG_FUNCTION_INFO_V1(notify_check_database);
PG_FUNCTION_INFO_V1(notify_wake);
PG_FUNCTION_INFO_V1(notify_worker_shmem);

/* _PG_init: defines the settings; when preloaded, also shared memory and the worker. */
void
_PG_init(void)
{
	define_settings();
	render_init_allocators();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = notify_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = notify_shmem_startup;

	register_worker();
}

/* define_settings: every notify.* GUC; the prefix is reserved so typos are errors. */
static void
define_settings(void)
{
	DefineCustomStringVariable("notify.database",
							   "Database the notify_ext worker connects to; the only one where the extension may be created.",
							   NULL,
							   &notify_database,
							   "postgres",
							   PGC_POSTMASTER,
							   0,
							   NULL, NULL, NULL);

	DefineCustomIntVariable("notify.poll_interval",
							"Fallback interval at which the worker looks for work it was not woken for.",
							"Committed events wake the worker at once; this only bounds the delay of retries and missed wake-ups.",
							&notify_poll_interval,
							5000, 10, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.batch_size",
							"Events fanned out, or messages sent, per worker transaction.",
							NULL,
							&notify_batch_size,
							100, 1, 10000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomBoolVariable("notify.enabled",
							 "Whether the worker processes events and sends messages; turning it off pauses without losing anything.",
							 NULL,
							 &notify_enabled,
							 true,
							 PGC_SIGHUP,
							 0,
							 NULL, NULL, NULL);

	DefineCustomIntVariable("notify.max_attempts",
							"Delivery attempts before a temporarily failing message becomes dead.",
							NULL,
							&notify_max_attempts,
							10, 1, 1000,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.retry_backoff",
							"Delay before the first retry of a temporarily failed message; it doubles at each attempt, up to one hour.",
							NULL,
							&notify_retry_backoff,
							10, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.lease",
							"How long a claimed message may stay in 'sending' before it returns to the queue.",
							NULL,
							&notify_lease,
							60, 5, 24 * 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.retention",
							"Finished events, messages and attempts older than this are purged by the worker; 0 keeps them forever.",
							NULL,
							&notify_retention,
							30 * 24 * 3600, 0, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("notify.actor",
							   "Recipient key of whoever causes the events of this session or transaction (SET LOCAL notify.actor = 'seller:7').",
							   NULL,
							   &notify_actor,
							   NULL,
							   PGC_USERSET,
							   0,
							   NULL, NULL, NULL);

	MarkGUCPrefixReserved("notify");
}

/* register_worker: the one static worker, restarted by the postmaster after a crash. */
static void
register_worker(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	/* a failing worker comes back, but never in a tight loop */
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "notify_ext");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "notify_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "notify_ext worker");
	snprintf(worker.bgw_type, BGW_MAXLEN, "notify_ext worker");
	worker.bgw_main_arg = (Datum) 0;
	RegisterBackgroundWorker(&worker);
}

/* notify_shmem_request: room for the shared state. */
static void
notify_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(NotifyShared)));
}

/* notify_shmem_startup: create or attach to the shared state. */
static void
notify_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	notify_shared = ShmemInitStruct("notify_ext", sizeof(NotifyShared), &found);
	if (!found)
	{
		memset(notify_shared, 0, sizeof(NotifyShared));
		SpinLockInit(&notify_shared->mutex);
		strlcpy(notify_shared->state, "starting", sizeof(notify_shared->state));
	}
	LWLockRelease(AddinShmemInitLock);
}

/* notify_wake_worker: set the worker's latch now, if it is running. */
void
notify_wake_worker(void)
{
	Latch	   *latch = NULL;

	if (notify_shared == NULL)
		return;
	SpinLockAcquire(&notify_shared->mutex);
	latch = notify_shared->worker_latch;
	SpinLockRelease(&notify_shared->mutex);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * notify_wake_worker_at_commit: called by whatever writes an event.  The
 * wake-up must wait for the commit, or the worker would look before the
 * event is visible and go back to sleep; an aborted transaction wakes
 * nobody.
 */
void
notify_wake_worker_at_commit(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(notify_xact_callback, NULL);
		xact_callback_registered = true;
	}
	wake_at_commit = true;
}

/* notify_xact_callback: wake the worker when a transaction with events commits. */
static void
notify_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_at_commit)
				notify_wake_worker();
			wake_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction's events are found by the poll */
			wake_at_commit = false;
			break;
		default:
			break;
	}
}

/* notify_set_worker_state: what the worker does now, shown by worker_status(). */
void
notify_set_worker_state(const char *state)
{
	if (notify_shared == NULL)
		return;
	SpinLockAcquire(&notify_shared->mutex);
	strlcpy(notify_shared->state, state, sizeof(notify_shared->state));
	SpinLockRelease(&notify_shared->mutex);
}

/*
 * notify_check_database: run by the install script.  Refuses databases
 * other than notify.database, warns when the library is not preloaded
 * (nothing would send), and wakes a worker waiting for the extension.
 */
Datum
notify_check_database(PG_FUNCTION_ARGS)
{
	char	   *dbname = get_database_name(MyDatabaseId);

	if (dbname == NULL || strcmp(dbname, notify_database) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("notify_ext can only be created in database \"%s\", the one set by notify.database",
						notify_database),
				 errdetail("This is database \"%s\"; events captured here would never be sent.",
						   dbname ? dbname : "?"),
				 errhint("Create the extension in \"%s\", or set notify.database = '%s' in postgresql.conf and restart the server.",
						 notify_database, dbname ? dbname : "?")));

	if (notify_shared == NULL)
		ereport(WARNING,
				(errmsg("notify_ext is not in shared_preload_libraries, so no worker will send messages"),
				 errhint("Add notify_ext to shared_preload_libraries in postgresql.conf and restart the server.")));

	notify_wake_worker_at_commit();
	PG_RETURN_VOID();
}

/* notify_wake: notify._wake_worker(): wake the worker when this transaction commits. */
Datum
notify_wake(PG_FUNCTION_ARGS)
{
	notify_wake_worker_at_commit();
	PG_RETURN_VOID();
}

/* notify_worker_shmem: the worker's pid, state and last error, as it published them. */
Datum
notify_worker_shmem(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};
	pid_t		pid = 0;
	char		state[128];
	char		last_error[sizeof(((NotifyShared *) 0)->last_error)];

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	if (notify_shared == NULL)
	{
		strlcpy(state, "not running: notify_ext is not in shared_preload_libraries", sizeof(state));
		last_error[0] = '\0';
	}
	else
	{
		SpinLockAcquire(&notify_shared->mutex);
		pid = notify_shared->worker_pid;
		strlcpy(state, notify_shared->state, sizeof(state));
		strlcpy(last_error, notify_shared->last_error, sizeof(last_error));
		SpinLockRelease(&notify_shared->mutex);
		if (pid == 0)
			strlcpy(state, "not running", sizeof(state));
	}
	if (pid != 0)
		values[0] = Int32GetDatum((int32) pid);
	else
		nulls[0] = true;
	values[1] = CStringGetTextDatum(state);
	if (last_error[0])
		values[2] = CStringGetTextDatum(last_error);
	else
		nulls[2] = true;
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

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
int			notify_workers = 2;
int			notify_smtp_timeout = 60;
int			notify_smtp_data_timeout = 600;
char	   *notify_tls_ca_file = NULL;
char	   *notify_timezone = NULL;
int			notify_webhook_timeout = 30;
int			notify_max_age = 5 * 24 * 3600;
int			notify_bounce_poll_interval = 60;

NotifyShared *notify_shared = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Set when this backend's current transaction wrote an event. */
static bool wake_at_commit = false;
static bool wake_all_at_commit = false;	/* CREATE EXTENSION: every worker starts serving */
static bool xact_callback_registered = false;

void		_PG_init(void);
static void notify_shmem_request(void);
static void notify_shmem_startup(void);
static void notify_xact_callback(XactEvent event, void *arg);
static void notify_wake_one_worker(void);
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

	DefineCustomIntVariable("notify.workers",
							"Worker processes, each with its own SMTP connection, sending in parallel.",
							"Each takes a background worker slot (max_worker_processes); connections are kept open and reused across messages.",
							&notify_workers,
							2, 1, NOTIFY_MAX_WORKERS,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.smtp_timeout",
							"How long the worker waits for a server's reply to a command (greeting, EHLO, STARTTLS, AUTH, MAIL, RCPT, DATA) before it gives up and retries the message later.",
							NULL,
							&notify_smtp_timeout,
							60, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.smtp_data_timeout",
							"How long the worker waits for the reply after the end of a message's data (RFC 5321 suggests 10 minutes).",
							"No reply in time is an unknown outcome: the server may have accepted the message, so the retry may deliver it twice, with the same Message-ID.",
							&notify_smtp_data_timeout,
							600, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomStringVariable("notify.tls_ca_file",
							   "File of CA certificates the worker trusts for tls = 'verify'; empty means the system's store.",
							   NULL,
							   &notify_tls_ca_file,
							   "",
							   PGC_SIGHUP,
							   GUC_SUPERUSER_ONLY,
							   NULL, NULL, NULL);

	DefineCustomStringVariable("notify.timezone",
							   "Time zone in which schedules' cron expressions are read; empty means the server's timezone setting.",
							   NULL,
							   &notify_timezone,
							   "",
							   PGC_SIGHUP,
							   0,
							   NULL, NULL, NULL);
	DefineCustomIntVariable("notify.webhook_timeout",
							"How long a webhook request may take, from connecting to the end of the response, before it is given up and retried.",
							"Keep it under notify.lease / 2: a worker renews the leases of its messages between requests.",
							&notify_webhook_timeout,
							30, 1, 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.max_age",
							"How long a message may wait to be sent (its channel failing, its retries going on) before it becomes dead.",
							"Postfix keeps mail 5 days (maximal_queue_lifetime): so does notify_ext by default.",
							&notify_max_age,
							5 * 24 * 3600, 60, INT_MAX,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.bounce_poll_interval",
							"How often the workers read each bounce mailbox (notify.set_bounce_mailbox).",
							"A mailbox that cannot be read is tried again at this interval; notify.check_bounces() reads at once.",
							&notify_bounce_poll_interval,
							60, 1, 24 * 3600,
							PGC_SIGHUP,
							GUC_UNIT_S,
							NULL, NULL, NULL);

	MarkGUCPrefixReserved("notify");
}

/*
 * register_worker: notify.workers static workers, each restarted by the
 * postmaster after a crash.  Several processes rather than one driving
 * several connections: libcurl waits for the reply to an SMTP message's
 * final dot in a blocking call even under its multi interface (curl issue
 * 8555), so one process would send one message at a time whatever it
 * tried; separate processes also keep a stuck server from stopping all
 * sending.
 */
static void
register_worker(void)
{
	for (int i = 0; i < notify_workers; i++)
	{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	/* a failing worker comes back, but never in a tight loop */
	worker.bgw_restart_time = 10;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "notify_ext");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "notify_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "notify_ext worker %d", i + 1);
	snprintf(worker.bgw_type, BGW_MAXLEN, "notify_ext worker");
	worker.bgw_main_arg = Int32GetDatum(i);
	RegisterBackgroundWorker(&worker);
	}
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
		pg_atomic_init_u32(&notify_shared->wake_pending, 0);
		for (int i = 0; i < NOTIFY_MAX_WORKERS; i++)
			strlcpy(notify_shared->workers[i].state, "starting", sizeof(notify_shared->workers[i].state));
	}
	LWLockRelease(AddinShmemInitLock);
}

/* notify_wake_workers_except: set the latch of every running worker but one. */
void
notify_wake_workers_except(int slot)
{
	Latch	   *latches[NOTIFY_MAX_WORKERS];
	int			n = 0;

	if (notify_shared == NULL)
		return;
	SpinLockAcquire(&notify_shared->mutex);
	for (int i = 0; i < NOTIFY_MAX_WORKERS; i++)
		if (i != slot && notify_shared->workers[i].latch != NULL)
			latches[n++] = notify_shared->workers[i].latch;
	SpinLockRelease(&notify_shared->mutex);
	for (int i = 0; i < n; i++)
		SetLatch(latches[i]);
}

/*
 * notify_wake_one_worker: set the latch of one running worker, an idle one
 * if any (a worker in the middle of a transfer would make the event wait).
 */
static void
notify_wake_one_worker(void)
{
	Latch	   *latch = NULL;
	static int	next = 0;

	SpinLockAcquire(&notify_shared->mutex);
	for (int i = 0; i < NOTIFY_MAX_WORKERS && latch == NULL; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[(next + i) % NOTIFY_MAX_WORKERS];

		if (w->latch != NULL && strcmp(w->state, "idle") == 0)
			latch = w->latch;
	}
	for (int i = 0; i < NOTIFY_MAX_WORKERS && latch == NULL; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[(next + i) % NOTIFY_MAX_WORKERS];

		if (w->latch != NULL)
			latch = w->latch;
	}
	SpinLockRelease(&notify_shared->mutex);
	next++;
	if (latch != NULL)
		SetLatch(latch);
	else
		pg_atomic_write_u32(&notify_shared->wake_pending, 0);	/* nobody to wake: the poll finds it */
}

/* notify_wake_worker: set every worker's latch now. */
void
notify_wake_worker(void)
{
	notify_wake_workers_except(-1);
}

/*
 * notify_rate_admit: whether a message of a rate-limited channel may go
 * now.  Messages go 60 / rate_per_minute seconds apart over all workers.
 * One that comes too early is told when to come back (*until): the held
 * back are spread one interval apart from the next free slot, so they
 * come back one at a time, in order, rather than all at once.  More
 * rate-limited channels than there are shared slots are admitted
 * unlimited, with a warning.
 */
bool
notify_rate_admit(const char *channel, int rate_per_minute, TimestampTz now, TimestampTz *until)
{
	int64		interval = (int64) (60.0 * USECS_PER_SEC / rate_per_minute);
	NotifyRateSlot *slot = NULL;
	bool		admit;

	if (notify_shared == NULL)
		return true;
	SpinLockAcquire(&notify_shared->mutex);
	for (int i = 0; i < NOTIFY_MAX_RATED_CHANNELS; i++)
	{
		NotifyRateSlot *r = &notify_shared->rates[i];

		if (strncmp(r->channel, channel, sizeof(r->channel)) == 0)
		{
			slot = r;
			break;
		}
		if (slot == NULL && r->channel[0] == '\0')
			slot = r;
	}
	if (slot == NULL)
	{
		SpinLockRelease(&notify_shared->mutex);
		ereport(WARNING,
				(errmsg("notify_ext: more than %d rate-limited channels; channel \"%s\" is sent without its limit",
						NOTIFY_MAX_RATED_CHANNELS, channel)));
		return true;
	}
	if (slot->channel[0] == '\0')
	{
		strlcpy(slot->channel, channel, sizeof(slot->channel));
		slot->next_slot = slot->defer_tail = 0;
	}
	if (slot->next_slot <= now)
	{
		/* keep to the grid when just late (no drift), else start it again from now */
		slot->next_slot = (slot->next_slot > now - interval ? slot->next_slot : now) + interval;
		admit = true;
	}
	else
	{
		*until = Max(slot->defer_tail, slot->next_slot);
		slot->defer_tail = *until + interval;
		admit = false;
	}
	SpinLockRelease(&notify_shared->mutex);
	return admit;
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

			/*
			 * One worker, once: only the first commit since a worker last
			 * started a round wakes one (an idle one when there is one); the
			 * events of later commits are visible to that round, and its
			 * fan-out wakes the others for the messages.  This runs after the
			 * commit is visible, so the woken worker sees the event.
			 */
			if (wake_all_at_commit)
				notify_wake_worker();
			else if (wake_at_commit && notify_shared != NULL &&
					 pg_atomic_read_u32(&notify_shared->wake_pending) == 0 &&
					 pg_atomic_exchange_u32(&notify_shared->wake_pending, 1) == 0)
				notify_wake_one_worker();
			wake_at_commit = wake_all_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction's events are found by the poll */
			wake_at_commit = wake_all_at_commit = false;
			break;
		default:
			break;
	}
}

/* notify_set_worker_state: what this worker does now, shown by worker_status(). */
void
notify_set_worker_state(const char *state)
{
	if (notify_shared == NULL || notify_worker_slot < 0)
		return;
	SpinLockAcquire(&notify_shared->mutex);
	strlcpy(notify_shared->workers[notify_worker_slot].state, state,
			sizeof(notify_shared->workers[notify_worker_slot].state));
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
	wake_all_at_commit = true;
	PG_RETURN_VOID();
}

/* notify_wake: notify._wake_worker(): wake the worker when this transaction commits. */
Datum
notify_wake(PG_FUNCTION_ARGS)
{
	notify_wake_worker_at_commit();
	PG_RETURN_VOID();
}

/* notify_worker_shmem: each worker's pid, state and last error, as it published them. */
Datum
notify_worker_shmem(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	NotifyWorkerSlot slots[NOTIFY_MAX_WORKERS];
	int			n = 0;

	InitMaterializedSRF(fcinfo, 0);
	/* declared by an older version's SQL: refuse rather than write past its row */
	if (rsinfo->setDesc->natts != 4)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("the notify_ext library is version %s but the extension's SQL objects are older",
						NOTIFY_EXT_VERSION),
				 errhint("Run ALTER EXTENSION notify_ext UPDATE.")));
	if (notify_shared == NULL)
	{
		Datum		values[4] = {0, 0, 0, 0};
		bool		nulls[4] = {true, true, false, true};

		values[2] = CStringGetTextDatum("not running: notify_ext is not in shared_preload_libraries");
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
		return (Datum) 0;
	}
	n = Min(notify_workers, NOTIFY_MAX_WORKERS);
	SpinLockAcquire(&notify_shared->mutex);
	memcpy(slots, notify_shared->workers, sizeof(NotifyWorkerSlot) * n);
	SpinLockRelease(&notify_shared->mutex);
	for (int i = 0; i < n; i++)
	{
		Datum		values[4];
		bool		nulls[4] = {false, false, false, false};

		values[0] = Int32GetDatum(i + 1);
		if (slots[i].pid != 0)
			values[1] = Int32GetDatum((int32) slots[i].pid);
		else
			nulls[1] = true;
		values[2] = CStringGetTextDatum(slots[i].pid != 0 ? slots[i].state : "not running");
		if (slots[i].last_error[0])
			values[3] = CStringGetTextDatum(slots[i].last_error);
		else
			nulls[3] = true;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

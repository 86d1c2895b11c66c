/*-------------------------------------------------------------------------
 *
 * notify_ext.c
 *	  Library entry point: settings, the shared memory's hooks, the
 *	  launcher's registration, the utility hook, and the SQL functions that
 *	  show or change what the processes share.
 *
 * The process model (docs/operations.md, "Every database"): one launcher,
 * connected to no database, starts worker processes on demand in the
 * databases that have work, as dynamic background workers; a worker that
 * has had nothing to do for notify.worker_idle_timeout leaves.  An idle
 * cluster holds the launcher alone, however many databases it has.
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
#include "utils/varlena.h"

#include "notify_ext.h"

PG_MODULE_MAGIC;

char	   *notify_database = NULL;
int			notify_poll_interval = 5000;
int			notify_batch_size = 100;
bool		notify_enabled = true;
int			notify_max_attempts = 10;
int			notify_retry_backoff = 10;
int			notify_lease = 60;
bool		notify_direct_send = true;
int			notify_retention = 30 * 24 * 3600;
char	   *notify_actor = NULL;
int			notify_workers = 2;
int			notify_max_workers = 4;
int			notify_max_databases = 1024;
int			notify_worker_idle_timeout = 10000;
int			notify_smtp_timeout = 60;
int			notify_smtp_data_timeout = 600;
char	   *notify_tls_ca_file = NULL;
char	   *notify_timezone = NULL;
int			notify_webhook_timeout = 30;
int			notify_max_age = 5 * 24 * 3600;
int			notify_bounce_poll_interval = 60;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

void		_PG_init(void);
static void notify_shmem_request(void);
static void notify_shmem_startup(void);
static void define_settings(void);
static bool check_database_list(char **newval, void **extra, GucSource source);

PG_FUNCTION_INFO_V1(notify_check_database);
PG_FUNCTION_INFO_V1(notify_wake);
PG_FUNCTION_INFO_V1(notify_database_changed);
PG_FUNCTION_INFO_V1(notify_worker_shmem);
PG_FUNCTION_INFO_V1(notify_workers_shmem);
PG_FUNCTION_INFO_V1(notify_database_shmem);

/*
 * _PG_init: defines the settings; when preloaded, also shared memory, the
 * launcher and the utility hook (every backend inherits it from the
 * postmaster, which is why preloading is required: a DDL in any session
 * must be able to ask our workers to leave).
 */
void
_PG_init(void)
{
	define_settings();
	render_init_allocators();
	notify_capture_init();

	if (!process_shared_preload_libraries_in_progress)
		return;

	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = notify_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = notify_shmem_startup;

	notify_install_utility_hook();
	notify_register_launcher();
}

/* define_settings: every notify.* GUC; the prefix is reserved so typos are errors. */
static void
define_settings(void)
{
	DefineCustomStringVariable("notify.database",
							   "Databases notify_ext serves: '*' (every database where the extension is created) or a comma-separated list of names.",
							   "CREATE EXTENSION notify_ext is refused in a database the list does not name.",
							   &notify_database,
							   "*",
							   PGC_SIGHUP,
							   0,
							   check_database_list, NULL, NULL);

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

	DefineCustomBoolVariable("notify.direct_send",
							 "A worker sends the messages of the events it fans out itself, without queueing them first.",
							 "Off: every message goes through the queue and is claimed like a retry (one more write of each message).",
							 &notify_direct_send,
							 true,
							 PGC_SIGHUP,
							 0,
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
							"Most worker processes serving one database at once, each with its own SMTP connection.",
							"Workers are started when a database has work and leave when it has none; each takes a background worker slot (max_worker_processes).",
							&notify_workers,
							2, 1, NOTIFY_WORKER_SLOTS,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.max_workers",
							"Most worker processes of the whole cluster, all databases together.",
							"Each takes a background worker slot: max_worker_processes must leave room for them, the launcher and other background workers (parallel query, replication).",
							&notify_max_workers,
							4, 1, NOTIFY_WORKER_SLOTS,
							PGC_SIGHUP,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.max_databases",
							"Databases with the extension whose state shared memory keeps.",
							"A few hundred bytes each; beyond it a database is served only when a worker starts there for another reason.",
							&notify_max_databases,
							1024, 16, 1000000,
							PGC_POSTMASTER,
							0,
							NULL, NULL, NULL);

	DefineCustomIntVariable("notify.worker_idle_timeout",
							"How long a worker with nothing to do stays before it leaves its database.",
							"Its database's next due time (a retry, a schedule, a digest) stays in shared memory, and the launcher starts a worker again then; 0 leaves at once.",
							&notify_worker_idle_timeout,
							10000, 0, 3600 * 1000,
							PGC_SIGHUP,
							GUC_UNIT_MS,
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
 * check_database_list: notify.database is '*' or a list of names that
 * parses (a typo in the quotes would otherwise serve nothing, silently).
 */
static bool
check_database_list(char **newval, void **extra, GucSource source)
{
	char	   *copy;
	List	   *names;
	bool		ok;

	if (*newval == NULL || strcmp(*newval, "*") == 0)
		return true;
	copy = pstrdup(*newval);
	ok = SplitGUCList(copy, ',', &names);
	if (!ok)
		GUC_check_errdetail("notify.database must be '*' or a comma-separated list of database names.");
	else if (names == NIL)
	{
		GUC_check_errdetail("notify.database names no database; '*' serves every database.");
		ok = false;
	}
	list_free(names);
	pfree(copy);
	return ok;
}

/* notify_shmem_request: room for the shared state, and its lock. */
static void
notify_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(notify_shmem_size()));
	RequestNamedLWLockTranche("notify_ext", 1);
}

/* notify_shmem_startup: create or attach to the shared state. */
static void
notify_shmem_startup(void)
{
	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();
	notify_shmem_init();
}

/*
 * notify_check_database: run by the install script (of every version).
 * Refuses a database notify.database does not list, warns when the
 * library is not preloaded (nothing would send), and at commit has a
 * worker look at the database at once.
 */
Datum
notify_check_database(PG_FUNCTION_ARGS)
{
	char	   *dbname = get_database_name(MyDatabaseId);

	if (!notify_database_listed(dbname))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("notify_ext can only be created in the databases notify.database names (\"%s\")",
						notify_database),
				 errdetail("This is database \"%s\"; events captured here would never be sent.",
						   dbname ? dbname : "?"),
				 errhint("Add \"%s\" to notify.database in postgresql.conf and reload, or set it to '*' (every database).",
						 dbname ? dbname : "?")));

	if (notify_shared == NULL)
		ereport(WARNING,
				(errmsg("notify_ext is not in shared_preload_libraries, so no worker will send messages"),
				 errhint("Add notify_ext to shared_preload_libraries in postgresql.conf and restart the server.")));

	notify_database_changed_at_commit();
	PG_RETURN_VOID();
}

/* notify_wake: notify._wake_worker(): wake a worker of this database when this transaction commits. */
Datum
notify_wake(PG_FUNCTION_ARGS)
{
	notify_wake_worker_at_commit();
	PG_RETURN_VOID();
}

/*
 * notify_database_changed: notify._database_changed(), called by the
 * update script and adopt_copy(): at commit, forget what the workers last
 * found here and have one look again.
 */
Datum
notify_database_changed(PG_FUNCTION_ARGS)
{
	notify_database_changed_at_commit();
	PG_RETURN_VOID();
}

/*
 * notify_worker_shmem: notify._worker_shmem() of versions 0.1 and 0.2,
 * whose worker_status() expected one row per static worker.  The library
 * no longer has those: refuse, and say what to do.
 */
Datum
notify_worker_shmem(PG_FUNCTION_ARGS)
{
	ereport(ERROR,
			(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
			 errmsg("the notify_ext library is version %s but the extension's SQL objects are older",
					NOTIFY_EXT_VERSION),
			 errhint("Run ALTER EXTENSION notify_ext UPDATE.")));
	PG_RETURN_VOID();
}

/*
 * describe_database: one line for an operator on why this database has
 * no worker running now, from a copy of its entry (NULL: it has none).
 */
static char *
describe_database(const NotifyDatabase *db, int slots_in_use)
{
	char	   *dbname = get_database_name(MyDatabaseId);
	TimestampTz now = GetCurrentTimestamp();

	if (notify_shared == NULL)
		return pstrdup("not running: notify_ext is not in shared_preload_libraries");
	if (!notify_database_listed(dbname))
		return psprintf("not served: notify.database (\"%s\") does not name this database", notify_database);
	if (!notify_enabled)
		return pstrdup("paused (notify.enabled = off)");
	if (db == NULL)
		return pstrdup("idle: no worker needed (one starts when work comes)");
	if (db->leaving_pid != 0)
		return psprintf("no worker: a DDL of process %d needs the database alone", db->leaving_pid);
	switch (db->state)
	{
		case NOTIFY_DB_OTHER_VERSION:
			return pstrdup("waiting for ALTER EXTENSION notify_ext UPDATE (the library is " NOTIFY_EXT_VERSION ")");
		case NOTIFY_DB_COPY:
			return pstrdup("a copy of another database: nothing is sent until SELECT notify.adopt_copy()");
		case NOTIFY_DB_NO_EXTENSION:
			return pstrdup("no worker: the extension was dropped when a worker last looked");
		default:
			break;
	}
	if (db->requested || (db->due_at != 0 && db->due_at <= now))
	{
		if (db->start_after > now)
			return psprintf("waiting: %d worker start(s) in a row failed (see the server log); next try at %s",
							db->failures, timestamptz_to_str(db->start_after));
		if (notify_shared->bgworker_shortage_at != 0)
			return psprintf("waiting for a background worker slot: all max_worker_processes (%d) are in use (see the server log)",
							max_worker_processes);
		if (slots_in_use >= notify_max_workers)
			return psprintf("waiting for a worker slot: notify.max_workers (%d) workers run in other databases",
							notify_max_workers);
		return pstrdup("starting a worker");
	}
	if (db->due_at != 0)
		return psprintf("idle: no worker needed; one starts at %s, when something falls due",
						timestamptz_to_str(db->due_at));
	return pstrdup("idle: no worker needed (one starts when work comes)");
}

/*
 * copy_database_state: under the shared lock, this database's running
 * workers (copied into slots when not NULL; their number in *running), the
 * slots in use in the cluster (*in_use), and the database's entry (into
 * *db; false when it has none).
 */
static bool
copy_database_state(NotifyWorkerSlot *slots, int *running, int *in_use, NotifyDatabase *db)
{
	NotifyDatabase *e;
	bool		have_db = false;

	*running = 0;
	*in_use = 0;
	if (notify_shared == NULL)
		return false;
	LWLockAcquire(notify_shared->lock, LW_SHARED);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (w->in_use)
			(*in_use)++;
		if (w->in_use && w->dboid == MyDatabaseId && w->pid != 0 && !w->exited)
		{
			if (slots != NULL)
				slots[*running] = *w;
			(*running)++;
		}
	}
	e = notify_database_entry(MyDatabaseId, false);
	if (e != NULL)
	{
		memcpy(db, e, sizeof(*db));
		have_db = true;
	}
	LWLockRelease(notify_shared->lock);
	return have_db;
}

/*
 * notify_workers_shmem: notify._workers(): each running worker of this
 * database with its own figures, as it published them; or, when none is
 * running, one row without a pid that says why.
 */
Datum
notify_workers_shmem(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	NotifyWorkerSlot *slots = palloc(sizeof(NotifyWorkerSlot) * NOTIFY_WORKER_SLOTS);
	NotifyDatabase db;
	bool		have_db = false;
	int			n = 0;
	int			in_use = 0;
	TimestampTz now = GetCurrentTimestamp();

#define WORKERS_NATTS 9
	InitMaterializedSRF(fcinfo, 0);
	have_db = copy_database_state(slots, &n, &in_use, &db);
	for (int i = 0; i < n; i++)
	{
		Datum		values[WORKERS_NATTS];
		bool		nulls[WORKERS_NATTS] = {0};

		values[0] = Int32GetDatum(slots[i].worker_id);
		nulls[0] = slots[i].worker_id == 0;
		values[1] = Int32GetDatum((int32) slots[i].pid);
		values[2] = CStringGetTextDatum(slots[i].state);
		values[3] = TimestampTzGetDatum(slots[i].started_at);
		nulls[3] = slots[i].started_at == 0;
		values[4] = Int64GetDatum(slots[i].message_id);
		nulls[4] = slots[i].message_id == 0;
		values[5] = CStringGetTextDatum(slots[i].channel);
		nulls[5] = slots[i].channel[0] == '\0';
		values[6] = Int64GetDatum((int64) notify_sent_last_minute(&slots[i].sent, now));
		values[7] = CStringGetTextDatum(slots[i].last_error);
		nulls[7] = slots[i].last_error[0] == '\0';
		values[8] = TimestampTzGetDatum(slots[i].last_error_at);
		nulls[8] = slots[i].last_error_at == 0;
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	if (n == 0)
	{
		Datum		values[WORKERS_NATTS] = {0};
		bool		nulls[WORKERS_NATTS] = {true, true, false, true, true, true, false, true, true};

		values[2] = CStringGetTextDatum(describe_database(have_db ? &db : NULL, in_use));
		values[6] = Int64GetDatum(0);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	return (Datum) 0;
}

/*
 * notify_database_shmem: notify._database_shmem(): what shared memory
 * knows of this database, for queue_status(): its state in words, its
 * running workers, what they sent in the last minute, when it next has
 * something due.
 */
Datum
notify_database_shmem(PG_FUNCTION_ARGS)
{
	TupleDesc	tupdesc;
	Datum		values[4];
	bool		nulls[4] = {false, false, false, true};
	NotifyDatabase db;
	bool		have_db = false;
	int			running = 0;
	int			in_use = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (get_call_result_type(fcinfo, NULL, &tupdesc) != TYPEFUNC_COMPOSITE)
		elog(ERROR, "return type must be a row type");
	tupdesc = BlessTupleDesc(tupdesc);
	have_db = copy_database_state(NULL, &running, &in_use, &db);
	if (running > 0)
		values[0] = CStringGetTextDatum(psprintf("served by %d worker%s", running, running > 1 ? "s" : ""));
	else
		values[0] = CStringGetTextDatum(describe_database(have_db ? &db : NULL, in_use));
	values[1] = Int32GetDatum(running);
	values[2] = Int64GetDatum(have_db ? (int64) notify_sent_last_minute(&db.sent, now) : 0);
	if (have_db && db.due_at != 0)
	{
		values[3] = TimestampTzGetDatum(db.due_at);
		nulls[3] = false;
	}
	PG_RETURN_DATUM(HeapTupleGetDatum(heap_form_tuple(tupdesc, values, nulls)));
}

/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  A worker's life in one database: started by the launcher when the
 *	  database has work, it waits for a wake-up (a commit that wrote
 *	  events) or the poll interval, fans out pending events and sends due
 *	  messages until there is nothing left, and leaves when it has had
 *	  nothing to do for notify.worker_idle_timeout, recording in shared
 *	  memory when its database next has something due.
 *
 * Orchestration only: the work itself is in fanout.c and sender.c.  Any
 * error escaping a round is logged, its transaction aborted, and the loop
 * goes on after a pause that grows with repeated failures: the worker
 * must neither die of a bad row nor spin on a persistent fault.
 *
 * A worker leaves (and its database holds no process) when:
 *   - it is idle for notify.worker_idle_timeout, or at once when it was
 *     started for the census, or when another database waits for a slot;
 *   - the launcher asks for its slot (another database waits) or a DDL
 *     needs the database alone: it finishes the message in flight first;
 *   - there is nothing it may do: no extension, an older version of it, a
 *     copy (see identity.c), or notify.enabled = off.  Its database's
 *     state in shared memory then keeps the launcher from starting another
 *     until that changes.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <malloc.h>

#include "access/xact.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "utils/guc.h"
#include "utils/wait_event.h"
#include "utils/array.h"
#include "utils/lsyscache.h"
#include "commands/dbcommands.h"

#include "notify_ext.h"
#include "smtp.h"

/* Longest pause after repeated errors. */
#define MAX_ERROR_PAUSE_MS 60000L

static MemoryContext round_cxt = NULL;

/*
 * A worker listens for commits again at most once per WAKE_GAP_US.  At
 * thousands of commits a second, waking at every one cost the ERP's
 * backends a kill() each and the worker a transaction each (capture
 * benchmark: 41% of the watched TPS); with the gap, the commits of the last
 * 2 ms find the flag still set, skip the wake-up, and are all handled by
 * the next round.  A commit after a quiet spell still wakes the worker at
 * once: only a wake-up that follows the last one closely waits.
 */
#define WAKE_GAP_US 2000
static TimestampTz last_listen = 0;

int			notify_worker_slot = -1;
int32		notify_worker_id = 0;

/*
 * How this worker leaves, read by its exit callback: when its database has
 * something due next (0: nothing known), whether work is left that the
 * launcher must give to a new worker, whether the exit is a failure.
 */
static TimestampTz leave_due_at = 0;
static bool leave_with_request = true;	/* an exit we did not choose: look again */
static bool leave_clean = false;

/* When the last round did something; the idle timeout counts from it. */
static TimestampTz last_work_at = 0;
/* The last round left work due now (a full claim, a full fan-out). */
static bool backlog = false;
static TimestampTz help_asked_at = 0;

/* Whether this worker did anything: a census worker with work stays like any other. */
static bool worked = false;
/* The database's name, read once (a rename makes the workers leave first). */
static char *my_dbname = "?";

static void leave_database(const char *why) pg_attribute_noreturn();

/* find_my_database: this worker's database entry, or NULL (with create: created if needed). */
static NotifyDatabase *
find_my_database(bool create)
{
	static NotifyDatabase *cached = NULL;
	NotifyDatabase *db;

	/* stable while we are connected: only a dropped database's entry is freed */
	if (cached != NULL && cached->dboid == MyDatabaseId)
		return cached;
	LWLockAcquire(notify_shared->lock, create ? LW_EXCLUSIVE : LW_SHARED);
	db = notify_database_entry(MyDatabaseId, create);
	LWLockRelease(notify_shared->lock);
	cached = db;
	return db;
}

/*
 * my_database_entry: this worker's database entry, created if needed: once
 * the extension is found (a census worker in a database without it makes
 * none).
 */
static NotifyDatabase *
my_database_entry(void)
{
	return find_my_database(true);
}

/*
 * worker_exit: the slot says we are gone, and the database's entry says
 * what we left: when something falls due, or that work is left (a new
 * worker is needed: an exit we did not choose, a slot given up with a
 * backlog).  An exit that is neither chosen nor asked for (an error, a
 * crash of the connection) counts as a failure: the next start waits a
 * little longer, so that a persistent fault cannot make workers spin.
 */
static void
worker_exit(int code, Datum arg)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];
	NotifyDatabase *db;
	Latch	   *launcher;
	TimestampTz now = GetCurrentTimestamp();

	sender_shutdown();
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (slot->pid == MyProcPid)
	{
		db = OidIsValid(slot->dboid) ? notify_database_entry(slot->dboid, false) : NULL;
		if (db != NULL)
		{
			if (leave_due_at != 0)
				db->due_at = leave_due_at;
			if (leave_with_request)
				notify_request_worker(db);
			if (!leave_clean && !slot->stop && slot->served && code != 0)
			{
				db->failures++;
				db->start_after = TimestampTzPlusMilliseconds(now, Min(60000L, 1000L << Min(db->failures - 1, 6)));
			}
			if (db->workers_wanted > 0)
				db->workers_wanted--;
		}
		slot->exited = true;
		slot->exiting = true;
		slot->latch = NULL;
		strlcpy(slot->state, "gone", sizeof(slot->state));
	}
	launcher = notify_shared->launcher_latch;
	LWLockRelease(notify_shared->lock);
	if (launcher != NULL)
		SetLatch(launcher);
}

/*
 * take_slot: the slot the launcher registered us in, if it is still ours
 * (its generation is the one we were started with); publishes our pid
 * and latch there.
 */
static bool
take_slot(int slot_index, uint32 generation)
{
	NotifyWorkerSlot *slot;
	bool		ok;

	if (slot_index < 0 || slot_index >= NOTIFY_WORKER_SLOTS)
		return false;
	slot = &notify_shared->workers[slot_index];
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	ok = slot->in_use && slot->generation == generation && slot->pid == 0 && !slot->exited;
	if (ok)
	{
		slot->pid = MyProcPid;
		slot->latch = MyLatch;
		slot->started_at = GetCurrentTimestamp();
		slot->last_error[0] = '\0';
	}
	LWLockRelease(notify_shared->lock);
	return ok;
}

/* database_leaving: whether a DDL needs this database alone (see ddl.c). */
static bool
database_leaving(void)
{
	NotifyDatabase *db;
	bool		leaving = false;

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	db = notify_database_entry(MyDatabaseId, false);
	if (db != NULL)
		leaving = db->leaving_pid != 0;
	LWLockRelease(notify_shared->lock);
	return leaving;
}

/*
 * set_database_state: what this worker found here, for the launcher (no
 * worker is started in a database that waits for something) and for
 * worker_status().  Returns true the first time the state is set since it
 * last changed: the caller logs its one line then.
 */
static bool
set_database_state(NotifyDbState state)
{
	NotifyDatabase *db = my_database_entry();
	bool		first = false;

	if (db == NULL)
		return false;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (db->dboid == MyDatabaseId)
	{
		if (db->state != state)
		{
			db->state = state;
			db->state_logged = false;
		}
		if (!db->state_logged)
		{
			db->state_logged = true;
			first = true;
		}
	}
	LWLockRelease(notify_shared->lock);
	return first;
}

/*
 * listen_for_commits: from now on a commit that wrote events wakes a
 * worker again (see notify_xact_callback).  Before a round: the events
 * committed until now are the round's to find.
 */
static void
listen_for_commits(void)
{
	NotifyDatabase *db = find_my_database(false);

	last_listen = GetCurrentTimestamp();
	if (db != NULL)
		pg_atomic_write_u32(&db->wake_pending, 0);
	pg_memory_barrier();
}

/*
 * coalesce_wakeups: woken within WAKE_GAP_US of the last listen, wait for
 * the rest of the gap first, the flag still set, so that the commits of
 * that time wake nobody and join the round.
 */
static void
coalesce_wakeups(void)
{
	TimestampTz now = GetCurrentTimestamp();

	if (last_listen != 0 && now >= last_listen && now - last_listen < WAKE_GAP_US)
		pg_usleep(WAKE_GAP_US - (now - last_listen));
}

/*
 * keep_freed_memory: libcurl allocates and frees its transfer buffers for
 * every message; with glibc's default 128 kB trim threshold each free gave
 * the top of the heap back to the kernel and the next message took it
 * again (two brk calls and fresh page faults per message: 15-20% of
 * libcurl's CPU time in test/bench/curl_ceiling.c).  The worker keeps up
 * to 32 MB of freed memory for reuse instead.  Blocks of 128 kB and more
 * (a round's memory contexts grow to such blocks) come from the heap too:
 * glibc mapped each apart and unmapped it when the round reset its
 * context, and setting the trim threshold stops glibc from raising that
 * limit by itself (7.5% of the workers' time went to page faults in
 * test/bench/delivery.py).
 */
static void
keep_freed_memory(void)
{
	mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
	mallopt(M_TOP_PAD, 1024 * 1024);
	mallopt(M_MMAP_THRESHOLD, 32 * 1024 * 1024);
}

/* record_worker_error: the last error, for worker_status(). */
static void
record_worker_error(const char *msg)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	strlcpy(slot->last_error, msg ? msg : "", sizeof(slot->last_error));
	slot->last_error_at = GetCurrentTimestamp();
	LWLockRelease(notify_shared->lock);
}

/* What the worker found of the extension in its database. */
typedef enum ExtensionState
{
	EXT_ABSENT,					/* no CREATE EXTENSION yet, or dropped */
	EXT_OTHER_VERSION,			/* installed, but not the library's version */
	EXT_READY
} ExtensionState;

/*
 * extension_state: whether CREATE EXTENSION notify_ext has run here, in
 * the version this library serves (*version: the installed one).
 */
static ExtensionState
extension_state(char *version, size_t len)
{
	ExtensionState state = EXT_ABSENT;

	version[0] = '\0';
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (OidIsValid(get_extension_oid("notify_ext", true)))
	{
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		if (SPI_execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'notify_ext'",
						true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		{
			char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

			strlcpy(version, v ? v : "", len);
			state = strcmp(version, NOTIFY_EXT_VERSION) == 0 ? EXT_READY : EXT_OTHER_VERSION;
		}
		SPI_finish();
		PopActiveSnapshot();
	}
	CommitTransactionCommand();
	return state;
}

/* maybe_dropped: an error that a DROP EXTENSION under a running round raises. */
static bool
maybe_dropped(ErrorData *edata)
{
	return edata->sqlerrcode == ERRCODE_UNDEFINED_TABLE ||
		edata->sqlerrcode == ERRCODE_UNDEFINED_FUNCTION ||
		edata->sqlerrcode == ERRCODE_UNDEFINED_OBJECT ||
		edata->sqlerrcode == ERRCODE_INVALID_SCHEMA_NAME ||
		edata->sqlerrcode == ERRCODE_UNDEFINED_SCHEMA;
}

/*
 * concurrency_conflict: an error that only says another transaction got in
 * the way (a deadlock with a DROP EXTENSION or a DBA's transaction, a
 * lock that could not be had): the round is tried again, it is no fault.
 */
static bool
concurrency_conflict(ErrorData *edata)
{
	return edata->sqlerrcode == ERRCODE_T_R_DEADLOCK_DETECTED ||
		edata->sqlerrcode == ERRCODE_T_R_SERIALIZATION_FAILURE ||
		edata->sqlerrcode == ERRCODE_LOCK_NOT_AVAILABLE;
}

/*
 * emit_error: log an error caught and copied earlier, as the ERROR it was
 * (with its code, detail and context), without throwing it again.
 */
static void
emit_error(ErrorData *edata)
{
	PG_TRY();
	{
		ReThrowError(edata);
	}
	PG_CATCH();
	{
		EmitErrorReport();
		FlushErrorState();
	}
	PG_END_TRY();
}

/* extension_gone: whether the extension is absent now (false if that cannot be told). */
static bool
extension_gone(void)
{
	char		version[64];
	volatile bool gone = false;

	PG_TRY();
	{
		gone = extension_state(version, sizeof(version)) == EXT_ABSENT;
	}
	PG_CATCH();
	{
		FlushErrorState();
		AbortCurrentTransaction();
	}
	PG_END_TRY();
	return gone;
}

/*
 * take_worker_id: this worker's number in its database, from the
 * database's own sequence (notify.worker_seq), published in our slot
 * before we claim anything.  It is what our claims carry
 * (notify.message.claimed_by) and what worker_status() shows: numbers only
 * grow, across restarts too, so that a claim can be told to be a dead
 * predecessor's (see reclaim_orphans).
 */
static void
take_worker_id(void)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];
	bool		isnull;

	if (SPI_execute("SELECT pg_catalog.nextval('notify.worker_seq')::integer", false, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "notify_ext: could not take a worker number from notify.worker_seq");
	notify_worker_id = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	slot->worker_id = notify_worker_id;
	LWLockRelease(notify_shared->lock);
}

/*
 * reclaim_orphans: at start (and after a failed round), take back at once,
 * rather than when their lease runs out, the messages left 'sending' by a
 * worker that is gone: our own (a failed round gave them up), and those of
 * any worker of this database numbered before us that is not running now.
 * Running workers' claims are theirs; so are those of workers numbered
 * after us (started meanwhile).
 *
 * Order matters: the statement's snapshot is taken before the running
 * workers are read.  A claim it can see was committed before it, by a
 * worker that had published its number before claiming: that worker is
 * in the list if it is still running.
 */
static void
reclaim_orphans(void)
{
	int			ret;
	Oid			argtypes[2] = {INT4OID, INT4ARRAYOID};
	Datum		args[2];
	Datum		live[NOTIFY_WORKER_SLOTS];
	int			nlive = 0;
	SPIPlanPtr	plan;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	notify_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "notify_ext: reclaiming messages");
	if (notify_worker_id == 0)
		take_worker_id();
	PopActiveSnapshot();
	PushActiveSnapshot(GetTransactionSnapshot());

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (i != notify_worker_slot && w->in_use && w->dboid == MyDatabaseId && !w->exited &&
			w->worker_id != 0)
			live[nlive++] = Int32GetDatum(w->worker_id);
	}
	LWLockRelease(notify_shared->lock);
	args[0] = Int32GetDatum(notify_worker_id);
	args[1] = PointerGetDatum(construct_array(live, nlive, INT4OID, sizeof(int32), true, TYPALIGN_INT));

	/*
	 * Each is an attempt whose outcome nobody recorded: the log says so
	 * (the server may have the message; the next one has the same
	 * Message-ID).
	 */
	plan = SPI_prepare("WITH t AS (UPDATE notify.message SET status = 'queued', lease_until = NULL, "
					   "next_attempt_at = pg_catalog.now() WHERE status = 'sending' "
					   "AND (claimed_by IS NULL OR claimed_by OPERATOR(pg_catalog.=) $1 "
					   "     OR (claimed_by OPERATOR(pg_catalog.<) $1 AND claimed_by OPERATOR(pg_catalog.<>) ALL ($2))) "
					   "RETURNING id) "
					   "INSERT INTO notify.attempt (message_id, started_at, finished_at, outcome, response) "
					   "SELECT t.id, pg_catalog.now(), pg_catalog.now(), 'unknown', "
					   "'taken back: the worker sending it stopped, or its round failed, before the outcome "
					   "was recorded; it is sent again, with the same Message-ID' FROM t",
					   2, argtypes);
	if (plan == NULL)
		elog(ERROR, "could not prepare the reclaim of messages: %s", SPI_result_code_string(SPI_result));
	ret = SPI_execute_snapshot(plan, args, NULL, GetActiveSnapshot(), InvalidSnapshot, false, true, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not reclaim messages: %s", SPI_result_code_string(ret));
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("notify_ext: took back %llu message(s) that a worker which is gone had claimed",
						(unsigned long long) SPI_processed)));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * check_identity: whether this database is the one the extension was
 * created in (see identity.c); keeps its token for the Message-IDs.
 * *reason says why not; *from_template is set when it was copied from a
 * template database.
 */
static bool
check_identity(char **reason, bool *from_template)
{
	bool		ok = true;
	MemoryContext caller = CurrentMemoryContext;

	*reason = NULL;
	*from_template = false;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_execute("SELECT token, copy_reason, source_is_template FROM notify._identity()", true, 1) != SPI_OK_SELECT ||
		SPI_processed != 1)
		elog(ERROR, "notify_ext: could not read this database's identity");
	else
	{
		HeapTuple	tup = SPI_tuptable->vals[0];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		char	   *why = SPI_getvalue(tup, desc, 2);
		bool		isnull;

		notify_set_database_token(SPI_getvalue(tup, desc, 1));
		if (why != NULL)
		{
			ok = false;
			*reason = MemoryContextStrdup(caller, why);
			*from_template = DatumGetBool(SPI_getbinval(tup, desc, 3, &isnull)) && !isnull;
		}
	}
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);
	return ok;
}

/*
 * adopt_template_copy: a database created from a template database (one
 * marked datistemplate, such as template1 with the extension in it, so
 * that every new database has it) is a copy by the rule, but one meant to
 * be made: it adopts itself, with notify.adopt_copy()'s defaults (what
 * the template had queued is not sent).
 */
static void
adopt_template_copy(void)
{
	char	   *summary = NULL;
	MemoryContext caller = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_execute("SELECT notify.adopt_copy(false)", false, 1) == SPI_OK_SELECT && SPI_processed == 1)
		summary = MemoryContextStrdup(caller,
									  SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(caller);

	/*
	 * Its commit asked the launcher for a worker (the database changed):
	 * this one serves it now, and a census worker would otherwise be
	 * followed by one that waits out notify.worker_idle_timeout (a census
	 * of 200 such databases took 10 s per 4 of them).  A commit that came
	 * meanwhile is seen by this worker's next round.
	 */
	{
		NotifyDatabase *db = my_database_entry();

		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		if (db != NULL && db->dboid == MyDatabaseId)
			db->requested = false;
		LWLockRelease(notify_shared->lock);
	}
	ereport(LOG,
			(errmsg("notify_ext: database \"%s\" was created from a template database; it adopts itself: %s",
					my_dbname, summary ? summary : "?")));
}

/*
 * due_at_leaving: when this database next has something due, read as the
 * worker leaves: the next retry, the end of a lease of a message some
 * worker may have left 'sending', the next schedule or digest, the next
 * read of a bounce mailbox, or now for an event not yet fanned out.  0 when nothing is.
 */
static TimestampTz
due_at_leaving(void)
{
	volatile TimestampTz due = 0;

	PG_TRY();
	{
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		/* dropped meanwhile: nothing is due */
		if (OidIsValid(get_extension_oid("notify_ext", true)) &&
			SPI_execute("SELECT LEAST("
						" (SELECT pg_catalog.min(m.next_attempt_at) FROM notify.message m WHERE m.status = 'queued'),"
						" (SELECT pg_catalog.min(m.lease_until) FROM notify.message m WHERE m.status = 'sending'),"
						" (SELECT pg_catalog.min(m.next_attempt_at) FROM notify.message m WHERE m.status = 'digest'),"
						" (SELECT pg_catalog.min(s.next_run) FROM notify.schedule s),"
						" (SELECT pg_catalog.min(b.next_check_at) FROM notify.bounce_mailbox b),"
						" (SELECT pg_catalog.min(e.occurred_at) FROM notify.event e WHERE e.processed_at IS NULL))",
						true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		{
			bool		isnull;
			Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull && !TIMESTAMP_NOT_FINITE(DatumGetTimestampTz(d)))
				due = Max(DatumGetTimestampTz(d), 1);
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		/* not knowing is no reason to stay: ask for a worker to look again */
		EmitErrorReport();
		FlushErrorState();
		AbortCurrentTransaction();
		due = GetCurrentTimestamp();
	}
	PG_END_TRY();
	return due;
}

/*
 * leave_database: exit, recording why.  A worker that leaves of its own
 * accord has its database's next due time recorded (due: compute it);
 * one asked to give its slot up with work left asks for a new worker.
 */
static void
leave_database(const char *why)
{
	ereport(DEBUG1, (errmsg("notify_ext worker %d leaves database \"%s\": %s",
							notify_worker_id, my_dbname, why)));
	leave_clean = true;
	proc_exit(0);
}

/*
 * try_to_leave: leave if no commit came since the last round (see
 * serve_my_database in shmem.c for the other side): mark ourselves
 * exiting, then look at wake_pending; a commit that came meanwhile keeps
 * us here, unless we were asked to leave (asked), when it is handed to
 * the next worker.  With work left, the launcher is asked for a new
 * worker instead of a due time being recorded.  Returns only when we
 * stay.
 */
static void
try_to_leave(const char *why, bool work_left, bool asked)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];
	NotifyDatabase *db = my_database_entry();

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	slot->exiting = true;
	LWLockRelease(notify_shared->lock);
	pg_memory_barrier();
	if (!work_left && db != NULL && pg_atomic_read_u32(&db->wake_pending) != 0)
	{
		if (asked)
			work_left = true;	/* it goes all the same: the commit is the next worker's */
		else
		{
			LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
			slot->exiting = false;
			LWLockRelease(notify_shared->lock);
			return;
		}
	}
	if (work_left)
	{
		leave_due_at = 0;
		leave_with_request = true;
	}
	else
	{
		leave_due_at = due_at_leaving();
		leave_with_request = false;
	}
	leave_database(why);
}

/*
 * pin_search_path: the worker's session is a superuser's, and its own
 * statements are planned under its search_path: nothing but pg_catalog
 * (and pg_temp, last) may ever be on it.  Set at start (a per-database or
 * per-role setting may have put anything there) and checked before every
 * round: the queries users register run inside GUC nest levels of their
 * own and cannot change it, so a change means a bug; it is logged and
 * undone before any statement of ours runs.
 */
static void
pin_search_path(bool at_start)
{
	if (!at_start && strcmp(namespace_search_path, NOTIFY_PINNED_SEARCH_PATH) == 0)
		return;
	if (!at_start)
		ereport(WARNING,
				(errmsg("notify_ext: the worker's search_path had become \"%s\"; it is set back to \"%s\"",
						namespace_search_path, NOTIFY_PINNED_SEARCH_PATH)));
	SetConfigOption("search_path", NOTIFY_PINNED_SEARCH_PATH, PGC_SUSET, PGC_S_SESSION);
}

/* fanout_round: one fan-out transaction; returns events processed. */
static int
fanout_round(void)
{
	int			n;

	/* what the fan-out claims for this worker to send lives in the round's context */
	sender_direct_begin(CurrentMemoryContext);
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	notify_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "notify_ext: fanning out events");
	notify_set_worker_state("fanning out");
	n = fanout_pending_events(notify_batch_size);
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	sender_direct_ready();
	pgstat_report_stat(false);
	pgstat_report_activity(STATE_IDLE, NULL);
	return n;
}

/*
 * purge_old_rows: apply notify.retention, at most every ten minutes, so
 * the log never grows without bound and the purge never competes with
 * sending for long.
 */
static void
purge_old_rows(void)
{
	NotifyDatabase *db = my_database_entry();
	TimestampTz now = GetCurrentTimestamp();
	int			ret;
	Datum		arg;
	Oid			argtype = INT4OID;
	bool		due;

	/*
	 * The time of the last purge is the database's, not the worker's:
	 * workers come and go, and each would purge at its start.  The first
	 * purge after the server starts comes ten minutes after the first
	 * worker; a database without activity grows no rows to purge.
	 */
	if (notify_retention <= 0 || db == NULL)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (db->purged_at == 0)
		db->purged_at = now;
	due = TimestampDifferenceExceeds(db->purged_at, now, 10 * 60 * 1000);
	if (due)
		db->purged_at = now;
	LWLockRelease(notify_shared->lock);
	if (!due)
		return;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	notify_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "notify_ext: purging rows older than notify.retention");
	arg = Int32GetDatum(notify_retention);
	ret = SPI_execute_with_args("SELECT notify.purge(pg_catalog.make_interval(secs => $1))",
								1, &argtype, &arg, NULL, false, 1);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "notify_ext: purge failed: %s", SPI_result_code_string(ret));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
}

/*
 * Schedules and digests are looked at when one falls due, and otherwise
 * at most once per SCHEDULE_RECHECK_MS (a schedule created or changed
 * meanwhile is found by then): looking at every round, several hundred
 * times a second under load, cost the worker 3% of its time.  A round
 * that skips the look asks to be woken for it; an idle worker sleeps
 * until the next schedule is due.
 */
#define SCHEDULE_RECHECK_MS 1000
static TimestampTz schedules_checked_at = 0;
static TimestampTz schedules_due_at = 0;	/* 0: none due */

static int
run_schedules_if_due(long *next_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz recheck_at = schedules_checked_at + SCHEDULE_RECHECK_MS * (int64) 1000;
	long		next;
	int			ran;

	if (schedules_checked_at != 0 && now >= schedules_checked_at && now < recheck_at &&
		(schedules_due_at == 0 || now < schedules_due_at))
	{
		*next_ms = (recheck_at - now) / 1000 + 1;
		return 0;
	}
	ran = notify_run_due_schedules(&next);
	schedules_checked_at = now;
	schedules_due_at = next >= 0 ? now + next * (int64) 1000 : 0;
	*next_ms = next;
	return ran;
}

/*
 * ask_for_help: the queue has more due than this worker takes at once, or
 * events wait to be fanned out (their messages are sent by the workers
 * that fan them out): ask the launcher for a worker per two due messages
 * or waiting events, up to notify.workers
 * (each sends one message at a time, so a slow server is waited for in
 * parallel; starting a process costs about as much as sending two messages
 * to a relay nearby, so two do not get a second one).  Looked at after a
 * fan-out that made messages and after a full claim, at most every 100 ms.
 */
static void
ask_for_help(void)
{
	NotifyDatabase *db = my_database_entry();
	TimestampTz now = GetCurrentTimestamp();
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(notify_workers);
	int64		due = 0;
	int			running = 0;
	int			wanted;
	bool		isnull;
	Latch	   *launcher = NULL;

	if (db == NULL || notify_workers <= 1 ||
		(help_asked_at != 0 && !TimestampDifferenceExceeds(help_asked_at, now, 100)))
		return;
	help_asked_at = now;
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	arg = Int32GetDatum(notify_workers * 2);
	/* what is due, and the events still to fan out (whose messages the workers send directly) */
	if (SPI_execute_with_args("SELECT (SELECT pg_catalog.count(*) FROM (SELECT 1 FROM notify.message m"
							  "   WHERE m.status = 'queued' AND m.next_attempt_at <= pg_catalog.now() LIMIT $1) q)"
							  " + (SELECT pg_catalog.count(*) FROM (SELECT 1 FROM notify.event e"
							  "   WHERE e.id >= (SELECT x.low_water FROM notify.event_cursor x)"
							  "     AND e.processed_at IS NULL LIMIT $1) p)",
							  1, &argtype, &arg, NULL, true, 1) == SPI_OK_SELECT && SPI_processed == 1)
		due = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(round_cxt);

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
		if (notify_shared->workers[i].in_use && notify_shared->workers[i].dboid == MyDatabaseId &&
			!notify_shared->workers[i].stop && !notify_shared->workers[i].exited)
			running++;
	/* what this worker's fan-out kept to send itself is work in hand too */
	due += sender_direct_pending();
	wanted = (int) Min((int64) notify_workers, Max((due + 1) / 2, 1));
	if (db->dboid == MyDatabaseId)
	{
		db->workers_wanted = wanted;
		if (wanted > running)
			launcher = notify_shared->launcher_latch;
	}
	LWLockRelease(notify_shared->lock);
	if (launcher != NULL)
		SetLatch(launcher);
}

/* no_help_needed: this worker found nothing to do: the database wants no more workers. */
static void
no_help_needed(void)
{
	NotifyDatabase *db = my_database_entry();

	if (db == NULL || db->workers_wanted == 0)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (db->dboid == MyDatabaseId)
		db->workers_wanted = 0;
	LWLockRelease(notify_shared->lock);
}

/*
 * database_changed: whether the extension or the identity may have changed
 * since the worker last looked (CREATE EXTENSION, ALTER EXTENSION UPDATE,
 * a restore writing notify.identity, adopt_copy(): see
 * notify_database_changed_at_commit).  A restore runs CREATE EXTENSION and
 * fills the tables in separate transactions: a worker started by the
 * first must see the original's identity arrive before its next round, not
 * at its next wake-up.
 */
static uint32 changes_seen = 0;

static bool
database_changed(void)
{
	NotifyDatabase *db = find_my_database(false);

	return db != NULL && db->changes != changes_seen;
}

/* note_database_looked_at: the worker has just looked at the extension and the identity. */
static void
note_database_looked_at(void)
{
	NotifyDatabase *db = find_my_database(false);

	if (db != NULL)
		changes_seen = db->changes;
}

/*
 * run_rounds: fan out and send until a round finds less than a batch of
 * each, or the worker is asked to leave.  Returns how long the worker may
 * sleep (ms) before a queued message falls due.
 */
static long
run_rounds(void)
{
	long		sleep_ms = notify_poll_interval;

	backlog = false;
	for (;;)
	{
		int			events;
		int			sent;
		int			scheduled;
		int			bounces;
		long		next_due = -1;
		long		next_schedule = -1;
		long		next_bounce = -1;

		CHECK_FOR_INTERRUPTS();
		/* the extension or the identity changed meanwhile: look again first */
		if (database_changed())
		{
			backlog = true;
			return 0;
		}
		pin_search_path(false);
		MemoryContextReset(round_cxt);
		MemoryContextSwitchTo(round_cxt);
		listen_for_commits();
		events = fanout_round();

		/*
		 * Messages queued (more than this worker sends itself), or more
		 * events than a batch: for every worker, and more may be needed.
		 */
		if (fanout_queued > 0 || events >= notify_batch_size)
		{
			notify_wake_workers_except(notify_worker_slot);
			ask_for_help();
		}
		MemoryContextSwitchTo(round_cxt);
		sent = send_due_messages(SEND_CLAIM_SIZE, &next_due);
		if (sent >= SEND_CLAIM_SIZE)
			ask_for_help();
		MemoryContextSwitchTo(round_cxt);
		/* schedules go after sending: a report's events are fanned out next round */
		scheduled = run_schedules_if_due(&next_schedule);
		MemoryContextSwitchTo(round_cxt);
		/* the bounce mailbox, outside the send path: nothing is claimed now */
		bounces = bounce_poll_if_due(&next_bounce);
		MemoryContextSwitchTo(TopMemoryContext);

		if (events > 0 || sent > 0 || scheduled > 0)
		{
			last_work_at = GetCurrentTimestamp();
			worked = true;
		}
		sleep_ms = notify_poll_interval;
		if (next_due >= 0)
			sleep_ms = Min(sleep_ms, next_due);
		if (next_schedule >= 0)
			sleep_ms = Min(sleep_ms, next_schedule);
		if (next_bounce >= 0)
			sleep_ms = Min(sleep_ms, next_bounce);
		if (scheduled > 0 || bounces > 0)
			sleep_ms = 0;
		backlog = !(events < notify_batch_size && sent < SEND_CLAIM_SIZE && sleep_ms > 0);
		if (!backlog)
			break;
		if (ConfigReloadPending || notify_worker_stop_requested())
			break;
	}
	if (!backlog)
		notify_set_worker_state("idle");
	return sleep_ms;
}

/*
 * leave_if_done: after the rounds, leave when asked to (a DDL, a slot
 * wanted elsewhere: with the work that is left handed back), when started
 * for the census and idle, or when idle for notify.worker_idle_timeout (or
 * at once while another database waits for a slot).  Returns how long the
 * worker may wait before it looks again.
 */
static long
leave_if_done(long sleep_ms, bool census)
{
	TimestampTz now = GetCurrentTimestamp();
	long		idle_ms;

	if (notify_worker_stop_requested() || database_leaving())
		try_to_leave("asked to leave", backlog, true);
	if (backlog)
		return 0;
	no_help_needed();
	if (census || notify_shared->slots_wanted > 0)
		try_to_leave(census ? "census: nothing to do" : "a slot is wanted for another database", false, false);
	idle_ms = (long) ((now - last_work_at) / 1000);
	if (idle_ms >= notify_worker_idle_timeout)
	{
		try_to_leave("idle", false, false);
		return 0;				/* a commit kept us: its round, now */
	}
	return Min(sleep_ms, notify_worker_idle_timeout - idle_ms + 1);
}

/*
 * notify_worker_main: entry point.  Takes the slot the launcher registered
 * us in, connects to its database, finds out whether there is anything to
 * do there (the extension, its version, whether the database is a copy),
 * then serves it until it is time to leave.
 */
void
notify_worker_main(Datum main_arg)
{
	volatile bool ready = false;
	volatile int failures = 0;
	volatile bool census;
	uint32		generation;
	Oid			dboid;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	memcpy(&generation, MyBgworkerEntry->bgw_extra, sizeof(generation));
	if (!take_slot(DatumGetInt32(main_arg), generation))
	{
		/* not the start the launcher meant (it restarted meanwhile) */
		ereport(DEBUG1, (errmsg("notify_ext worker: slot %d is not this worker's any more", DatumGetInt32(main_arg))));
		proc_exit(0);
	}
	notify_worker_slot = DatumGetInt32(main_arg);
	dboid = notify_shared->workers[notify_worker_slot].dboid;
	census = notify_shared->workers[notify_worker_slot].census;
	before_shmem_exit(worker_exit, (Datum) 0);

	/* a DDL that needs the database alone may have begun since the launcher registered us */
	{
		NotifyDatabase *db;
		bool		leaving = false;

		LWLockAcquire(notify_shared->lock, LW_SHARED);
		db = notify_database_entry(dboid, false);
		if (db != NULL)
			leaving = db->leaving_pid != 0;
		LWLockRelease(notify_shared->lock);
		if (leaving)
			leave_database("a DDL needs the database alone");
	}

	BackgroundWorkerInitializeConnectionByOid(dboid, InvalidOid, 0);
	StartTransactionCommand();
	my_dbname = MemoryContextStrdup(TopMemoryContext, get_database_name(MyDatabaseId));
	CommitTransactionCommand();
	/* a setting, not only what pg_stat_activity shows: a nest level restores it */
	SetConfigOption("application_name", "notify_ext worker", PGC_USERSET, PGC_S_SESSION);
	pin_search_path(true);
	notify_plan_for_indexes = true;

	keep_freed_memory();
	smtp_global_init();
	round_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext round", ALLOCSET_DEFAULT_SIZES);
	last_work_at = GetCurrentTimestamp();

	for (;;)
	{
		long		sleep_ms = notify_poll_interval;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
		}

		/*
		 * Awake: a commit from now on may wake a worker again.  (Also at
		 * each round; here too, so that a worker that does not get to a
		 * round never leaves the flag set and later commits unheard.)
		 */
		coalesce_wakeups();
		CHECK_FOR_INTERRUPTS();
		listen_for_commits();

		PG_TRY();
		{
			ExtensionState est;
			char		version[64];

			/*
			 * At every wake-up (once per burst of commits, not per commit): a
			 * round against a dropped extension would only fail.
			 */
			note_database_looked_at();
			est = extension_state(version, sizeof(version));
			if (est == EXT_OTHER_VERSION)
			{
				if (set_database_state(NOTIFY_DB_OTHER_VERSION))
					ereport(WARNING,
							(errmsg("notify_ext: the extension in database \"%s\" is version %s, the library is %s; nothing is sent until it is updated",
									my_dbname, version, NOTIFY_EXT_VERSION),
							 errhint("Run ALTER EXTENSION notify_ext UPDATE in database \"%s\".",
									 my_dbname)));
				leave_with_request = false;
				leave_database("the extension is an older version");
			}
			else if (est == EXT_ABSENT)
			{
				NotifyDatabase *db;

				/* no entry is made for a database that never had the extension */
				LWLockAcquire(notify_shared->lock, LW_SHARED);
				db = notify_database_entry(MyDatabaseId, false);
				LWLockRelease(notify_shared->lock);
				if (db != NULL && set_database_state(NOTIFY_DB_NO_EXTENSION) && ready)
					ereport(LOG, (errmsg("notify_ext: extension dropped from database \"%s\"",
										 my_dbname)));
				leave_with_request = false;
				leave_database("no extension");
			}
			else
			{
				char	   *reason;
				bool		from_template;

				if (!check_identity(&reason, &from_template))
				{
					if (from_template)
					{
						adopt_template_copy();
						sleep_ms = 0;	/* serve it at once */
					}
					else
					{
						if (set_database_state(NOTIFY_DB_COPY))
							ereport(LOG,
									(errmsg("notify_ext: database \"%s\" is a copy: %s; nothing is sent from it",
											my_dbname, reason),
									 errdetail("Its events are captured; what it inherited queued is the original's to send."),
									 errhint("If this database is to send, run SELECT notify.adopt_copy() in it (notify.adopt_copy(send_pending => true) to send what it inherited too).")));
						leave_with_request = false;
						leave_database("a copy");
					}
				}
				else
				{
					if (!ready)
					{
						NotifyDatabase *db = my_database_entry();

						if (set_database_state(NOTIFY_DB_SERVED))
							ereport(LOG,
									(errmsg("notify_ext: serving database \"%s\"",
											my_dbname)));
						reclaim_orphans();
						ready = true;
						LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
						notify_shared->workers[notify_worker_slot].served = true;
						if (db != NULL && db->dboid == MyDatabaseId)
							db->failures = 0;
						LWLockRelease(notify_shared->lock);
						notify_set_worker_state("idle");
					}
					if (!notify_enabled)
					{
						/* paused: the launcher starts a worker again when it is turned on */
						leave_with_request = true;
						leave_database("paused (notify.enabled = off)");
					}
					sleep_ms = run_rounds();
					purge_old_rows();
					if (census && worked)
						census = false; /* it had work: a worker like any other now */
				}
			}
			failures = 0;
		}
		PG_CATCH();
		{
			ErrorData  *edata;
			bool		dropped;
			bool		conflict;

			MemoryContextSwitchTo(TopMemoryContext);
			edata = CopyErrorData();
			conflict = concurrency_conflict(edata);
			FlushErrorState();

			/*
			 * What is in flight is given up first: its claim is rolled back or
			 * about to be taken back (reclaim_orphans), and the round's memory,
			 * where its batch lived, is reset by the next round.
			 */
			sender_abandon_transfers();
			AbortCurrentTransaction();

			/*
			 * A DROP EXTENSION in the middle of a round is no error, whatever
			 * the round tripped over (a missing table, function or schema, a
			 * cache lookup of a dropped relation): say what happened and
			 * leave.  Told by looking, not by the error's code.
			 */
			dropped = extension_gone();
			if (dropped)
			{
				ereport(LOG, (errmsg("notify_ext: extension dropped from database \"%s\" during a round",
									 my_dbname)));
				(void) set_database_state(NOTIFY_DB_NO_EXTENSION);
				leave_with_request = false;
				leave_database("the extension was dropped");
			}
			else if (maybe_dropped(edata))
			{
				/* dropped and created again meanwhile, most likely */
				ereport(WARNING, (errmsg("notify_ext: %s", edata->message)));
			}
			else if (conflict)
				ereport(LOG,
						(errmsg("notify_ext: a round was rolled back by a concurrent transaction and is tried again: %s",
								edata->message)));
			else
				emit_error(edata);
			record_worker_error(edata->message);
			FreeErrorData(edata);
			pgstat_report_activity(STATE_IDLE, NULL);
			/* a persistent fault must not make the worker spin */
			if (conflict)
				sleep_ms = 100;		/* not a fault: a moment, for the other side to finish */
			else
			{
				failures++;
				sleep_ms = Min(MAX_ERROR_PAUSE_MS, 1000L << Min(failures, 6));
			}
			ready = false;
			backlog = true;		/* not idle: it stays to try again */
			last_work_at = GetCurrentTimestamp();
		}
		PG_END_TRY();

		if (ready)
			sleep_ms = leave_if_done(sleep_ms, census);
		else if (notify_worker_stop_requested() || database_leaving())
			try_to_leave("asked to leave", true, true);

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 Max(sleep_ms, 0),
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

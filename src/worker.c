/*-------------------------------------------------------------------------
 *
 * worker.c
 *	  The background worker's loop: wait for a wake-up (a commit that wrote
 *	  events) or the poll interval, then fan out pending events and send
 *	  due messages until there is nothing left, then wait again.
 *
 * Orchestration only: the work itself is in fanout.c and sender.c.  Any
 * error escaping a round is logged, its transaction aborted, and the loop
 * goes on after a pause that grows with repeated failures: the worker
 * must neither die of a bad row nor spin on a persistent fault.
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

/* unpublish_worker: forget our latch in shared memory when we exit. */
static void
unpublish_worker(int code, Datum arg)
{
	NotifyWorkerSlot *slot;

	sender_shutdown();
	if (notify_shared == NULL)
		return;
	slot = &notify_shared->workers[notify_worker_slot];
	SpinLockAcquire(&notify_shared->mutex);
	if (slot->pid == MyProcPid)
	{
		slot->pid = 0;
		slot->latch = NULL;
		strlcpy(slot->state, "stopped", sizeof(slot->state));
	}
	SpinLockRelease(&notify_shared->mutex);
}

/* publish_worker: let backends find our latch to wake us at commit. */
static void
publish_worker(void)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];

	SpinLockAcquire(&notify_shared->mutex);
	slot->pid = MyProcPid;
	slot->latch = MyLatch;
	slot->last_error[0] = '\0';
	SpinLockRelease(&notify_shared->mutex);
	before_shmem_exit(unpublish_worker, (Datum) 0);
}

/*
 * listen_for_commits: from now on a commit that wrote events wakes a
 * worker again (see notify_xact_callback).  Before a round: the events
 * committed until now are the round's to find.
 */
static void
listen_for_commits(void)
{
	last_listen = GetCurrentTimestamp();
	pg_atomic_write_u32(&notify_shared->wake_pending, 0);
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
 * to 32 MB of freed memory for reuse instead.
 */
static void
keep_freed_memory(void)
{
	mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
	mallopt(M_TOP_PAD, 1024 * 1024);
}

/* record_worker_error: the last error, for worker_status(). */
static void
record_worker_error(const char *msg)
{
	NotifyWorkerSlot *slot = &notify_shared->workers[notify_worker_slot];

	SpinLockAcquire(&notify_shared->mutex);
	strlcpy(slot->last_error, msg ? msg : "", sizeof(slot->last_error));
	SpinLockRelease(&notify_shared->mutex);
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
 * reclaim_orphans: at start, messages left 'sending' by this worker's slot
 * can only belong to a predecessor that died: take them back at once
 * rather than waiting for their lease.  Other workers' are theirs.
 */
static void
reclaim_orphans(void)
{
	int			ret;
	Oid			argtype = INT4OID;
	Datum		arg = Int32GetDatum(notify_worker_slot);

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	notify_lock_extension();
	SPI_connect();
	PushActiveSnapshot(GetTransactionSnapshot());
	pgstat_report_activity(STATE_RUNNING, "notify_ext: reclaiming messages");
	/*
	 * Each is an attempt whose outcome nobody recorded: the log says so
	 * (the server may have the message; the next one has the same
	 * Message-ID).
	 */
	ret = SPI_execute_with_args("WITH t AS (UPDATE notify.message SET status = 'queued', lease_until = NULL, "
								"next_attempt_at = pg_catalog.now() WHERE status = 'sending' AND claimed_by = $1 "
								"RETURNING id) "
								"INSERT INTO notify.attempt (message_id, started_at, finished_at, outcome, response) "
								"SELECT t.id, pg_catalog.now(), pg_catalog.now(), 'unknown', "
								"'taken back: the worker sending it stopped, or its round failed, before the outcome "
								"was recorded; it is sent again, with the same Message-ID' FROM t",
								1, &argtype, &arg, NULL, false, 0);
	if (ret != SPI_OK_INSERT)
		elog(ERROR, "could not reclaim messages: %s", SPI_result_code_string(ret));
	if (SPI_processed > 0)
		ereport(LOG,
				(errmsg("notify_ext: took back %llu message(s) a previous worker had claimed",
						(unsigned long long) SPI_processed)));
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	pgstat_report_activity(STATE_IDLE, NULL);
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
	static TimestampTz last_purge = 0;
	TimestampTz now = GetCurrentTimestamp();
	int			ret;
	Datum		arg;
	Oid			argtype = INT4OID;

	if (notify_retention <= 0 || !TimestampDifferenceExceeds(last_purge, now, 10 * 60 * 1000))
		return;
	last_purge = now;
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
 * run_rounds: fan out and send until a round finds less than a batch of
 * each.  Returns how long the worker may sleep (ms) before a queued
 * message falls due.
 */
static long
run_rounds(void)
{
	long		sleep_ms = notify_poll_interval;

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
		pin_search_path(false);
		MemoryContextReset(round_cxt);
		MemoryContextSwitchTo(round_cxt);
		listen_for_commits();
		events = fanout_round();
		/* the messages just made are for every worker to send */
		if (events > 0)
			notify_wake_workers_except(notify_worker_slot);
		MemoryContextSwitchTo(round_cxt);
		sent = send_due_messages(SEND_CLAIM_SIZE, &next_due);
		MemoryContextSwitchTo(round_cxt);
		/* schedules go after sending: a report's events are fanned out next round */
		scheduled = run_schedules_if_due(&next_schedule);
		MemoryContextSwitchTo(round_cxt);
		/* the bounce mailbox, outside the send path: nothing is claimed now */
		bounces = bounce_poll_if_due(&next_bounce);
		MemoryContextSwitchTo(TopMemoryContext);

		sleep_ms = notify_poll_interval;
		if (next_due >= 0)
			sleep_ms = Min(sleep_ms, next_due);
		if (next_schedule >= 0)
			sleep_ms = Min(sleep_ms, next_schedule);
		if (next_bounce >= 0)
			sleep_ms = Min(sleep_ms, next_bounce);
		if (scheduled > 0 || bounces > 0)
			sleep_ms = 0;
		if (events < notify_batch_size && sent < SEND_CLAIM_SIZE && sleep_ms > 0)
			break;
		if (ConfigReloadPending)
			break;
	}
	notify_set_worker_state("idle");
	return sleep_ms;
}

/*
 * notify_worker_main: entry point.  Connects to notify.database, waits
 * quietly for the extension to exist there, then serves it.
 */
void
notify_worker_main(Datum main_arg)
{
	volatile bool ready = false;
	volatile int failures = 0;
	volatile bool version_warned = false;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	notify_worker_slot = DatumGetInt32(main_arg);
	BackgroundWorkerInitializeConnection(notify_database, NULL, 0);
	/* a setting, not only what pg_stat_activity shows: a nest level restores it */
	SetConfigOption("application_name", "notify_ext worker", PGC_USERSET, PGC_S_SESSION);
	pin_search_path(true);

	publish_worker();
	keep_freed_memory();
	smtp_global_init();
	round_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext round", ALLOCSET_DEFAULT_SIZES);

	ereport(LOG, (errmsg("notify_ext worker %d started in database \"%s\"",
						 notify_worker_slot + 1, notify_database)));

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
		 * round, the extension being dropped or paused, never leaves the
		 * flag set and later commits unheard.)
		 */
		coalesce_wakeups();
		CHECK_FOR_INTERRUPTS();
		listen_for_commits();

		PG_TRY();
		{
			ExtensionState est = EXT_READY;
			char		version[64];

			/*
			 * At every wake-up (once per burst of commits, not per commit): a
			 * round against a dropped extension would only fail.
			 */
			est = extension_state(version, sizeof(version));
			if (est == EXT_OTHER_VERSION)
			{
				if (ready || !version_warned)
					ereport(WARNING,
							(errmsg("notify_ext: the extension in database \"%s\" is version %s, the library is %s; nothing is sent until it is updated",
									notify_database, version, NOTIFY_EXT_VERSION),
							 errhint("Run ALTER EXTENSION notify_ext UPDATE in database \"%s\".", notify_database)));
				version_warned = true;
				if (ready)
					sender_shutdown();
				ready = false;
				notify_set_worker_state("waiting for ALTER EXTENSION UPDATE");
			}
			else if (est == EXT_ABSENT)
			{
				if (ready)
				{
					ereport(LOG, (errmsg("notify_ext: extension dropped from database \"%s\"; waiting for it to be created again",
										 notify_database)));
					sender_shutdown();
				}
				ready = false;
				notify_set_worker_state("waiting for CREATE EXTENSION");
			}
			else
			{
				version_warned = false;
				if (!ready)
				{
					reclaim_orphans();
					ready = true;
					notify_set_worker_state("idle");
				}
				if (notify_enabled)
				{
					sleep_ms = run_rounds();
					purge_old_rows();
				}
				else
					notify_set_worker_state("paused (notify.enabled = off)");
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
			 * cache lookup of a dropped relation): say what happened, and
			 * wait for the extension as at start.  Told by looking, not by
			 * the error's code.
			 */
			dropped = extension_gone();
			if (dropped)
			{
				ereport(LOG, (errmsg("notify_ext: extension dropped from database \"%s\" during a round; waiting for it to be created again",
									 notify_database)));
				sender_shutdown();
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
			if (conflict && !dropped)
				sleep_ms = 100;		/* not a fault: a moment, for the other side to finish */
			else
			{
				failures++;
				sleep_ms = Min(MAX_ERROR_PAUSE_MS, 1000L << Min(failures, 6));
			}
			if (dropped)
				sleep_ms = 0;		/* not a fault: go and wait for CREATE EXTENSION */
			ready = false;
		}
		PG_END_TRY();

		(void) WaitLatch(MyLatch,
						 WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 sleep_ms,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

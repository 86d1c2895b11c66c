/*-------------------------------------------------------------------------
 *
 * launcher.c
 *	  The one process that starts per-database workers on demand.
 *
 * The launcher is connected to no database (shared catalogs only), like
 * autovacuum's launcher: it reads pg_database, and learns everything else
 * from shared memory (shmem.c), where backends and workers write which
 * database has work.  It starts a worker (a dynamic background worker,
 * which reports its start and exit back to the launcher) in a database
 *   - that a committed event, a retry(), CREATE EXTENSION or adopt_copy()
 *     asked for (the database's entry is marked requested);
 *   - whose next due time (a retry, a lease that runs out, a schedule, a
 *     digest: recorded by its last worker when it left) has come;
 *   - that nothing is known of yet, once, when the launcher starts (the
 *     census): a worker there looks for the extension, does what is due,
 *     and leaves at once when it finds nothing.  This is how work pending
 *     across a restart is found without the launcher ever connecting to a
 *     database: one short process per database at server start, none
 *     afterwards.  A database without the extension never has another;
 *   - that has workers with a backlog asking for help (up to notify.workers).
 *
 * Fair share.  At most notify.max_workers workers run in the whole
 * cluster, and at most notify.workers in one database.  When every slot is
 * taken and a database with work has no worker, the launcher asks a worker
 * to give its slot up (an idle one first, then one of a database that has
 * several, then the one that has run longest, after at least a second),
 * and serves the databases that waited longest first: a database with a
 * huge backlog keeps its share, never all of the cluster's.
 *
 * Start failures (a database that refuses connections, a missing
 * background worker slot) are retried with a growing pause, never in a
 * tight loop, and said once in the log with what to change.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/genam.h"
#include "access/heapam.h"
#include "access/htup_details.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_database.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"
#include "utils/wait_event.h"

#include "notify_ext.h"

/* A worker that runs this long may be asked to give its slot to a waiting database. */
#define YIELD_AFTER_MS 1000
/* The longest pause between two start attempts after failures. */
#define MAX_START_BACKOFF_MS 60000
/* The launcher looks again at least this often (stale DDL marks, dropped databases). */
#define LAUNCHER_NAP_MS 10000

/* A database of pg_database, as the launcher needs it. */
typedef struct DbInfo
{
	Oid			oid;
	char		name[NAMEDATALEN];
	bool		servable;		/* allows connections, no template, valid, listed */
} DbInfo;

/* A database the census has still to look at. */
typedef struct CensusItem
{
	Oid			oid;
	int			tries;
	TimestampTz not_before;
} CensusItem;

static BackgroundWorkerHandle *handles[NOTIFY_WORKER_SLOTS];
static List *census = NIL;		/* of CensusItem, in TopMemoryContext */
static char *served_setting = NULL; /* notify.database when the census was taken */
static TimestampTz shortage_logged_at = 0;

/*
 * notify_register_launcher: the launcher, a static background worker that
 * the postmaster restarts if it fails (after 5 s: never in a tight loop).
 * It starts once recovery has finished: a standby sends nothing, a
 * promoted one starts sending.
 */
void
notify_register_launcher(void)
{
	BackgroundWorker worker;

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = 5;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "notify_ext");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "notify_launcher_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "notify_ext launcher");
	snprintf(worker.bgw_type, BGW_MAXLEN, "notify_ext launcher");
	RegisterBackgroundWorker(&worker);
}

/* unpublish_launcher: backends stop setting our latch when we exit. */
static void
unpublish_launcher(int code, Datum arg)
{
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (notify_shared->launcher_pid == MyProcPid)
	{
		notify_shared->launcher_pid = 0;
		notify_shared->launcher_latch = NULL;
	}
	LWLockRelease(notify_shared->lock);
}

/*
 * read_databases: pg_database, as autovacuum's launcher reads it (a heap
 * scan in a transaction of its own; we are connected to no database).
 */
static List *
read_databases(MemoryContext cxt)
{
	List	   *dbs = NIL;
	Relation	rel;
	TableScanDesc scan;
	HeapTuple	tup;
	MemoryContext old;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	(void) GetTransactionSnapshot();
	rel = table_open(DatabaseRelationId, AccessShareLock);
	scan = table_beginscan_catalog(rel, 0, NULL);
	while ((tup = heap_getnext(scan, ForwardScanDirection)) != NULL)
	{
		Form_pg_database d = (Form_pg_database) GETSTRUCT(tup);
		DbInfo	   *info;

		old = MemoryContextSwitchTo(cxt);
		info = palloc0(sizeof(DbInfo));
		info->oid = d->oid;
		strlcpy(info->name, NameStr(d->datname), sizeof(info->name));

		/*
		 * A template is never served: it exists to be copied (and a copy of
		 * it adopts itself, see identity.c); serving it would also keep
		 * CREATE DATABASE from copying it.
		 */
		info->servable = d->datallowconn && !d->datistemplate &&
#ifdef DATCONNLIMIT_INVALID_DB
			d->datconnlimit != DATCONNLIMIT_INVALID_DB &&
#endif
			notify_database_listed(info->name);
		dbs = lappend(dbs, info);
		MemoryContextSwitchTo(old);
	}
	table_endscan(scan);
	table_close(rel, AccessShareLock);
	CommitTransactionCommand();
	return dbs;
}

/* find_db: a database of the list by OID; NULL when it does not exist. */
static DbInfo *
find_db(List *dbs, Oid oid)
{
	ListCell   *lc;

	foreach(lc, dbs)
	{
		DbInfo	   *d = (DbInfo *) lfirst(lc);

		if (d->oid == oid)
			return d;
	}
	return NULL;
}

/*
 * take_census: every database we may serve that shared memory knows
 * nothing of is looked at once by a short-lived worker.  Names listed in
 * notify.database that no database has are said once: they are served
 * when they exist and have the extension (CREATE EXTENSION asks for a
 * worker), without a restart and without a line every few seconds.
 */
static void
take_census(void)
{
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "notify_ext census",
											  ALLOCSET_SMALL_SIZES);
	List	   *dbs = read_databases(tmp);
	ListCell   *lc;
	MemoryContext old;

	old = MemoryContextSwitchTo(TopMemoryContext);
	list_free_deep(census);
	census = NIL;
	foreach(lc, dbs)
	{
		DbInfo	   *d = (DbInfo *) lfirst(lc);
		NotifyDatabase *db;
		bool		known;

		if (!d->servable)
			continue;
		LWLockAcquire(notify_shared->lock, LW_SHARED);
		db = notify_database_entry(d->oid, false);
		known = db != NULL && db->state != NOTIFY_DB_UNKNOWN;
		LWLockRelease(notify_shared->lock);
		if (!known)
		{
			CensusItem *c = palloc0(sizeof(CensusItem));

			c->oid = d->oid;
			census = lappend(census, c);
		}
	}
	if (served_setting)
		pfree(served_setting);
	served_setting = pstrdup(notify_database ? notify_database : "*");
	MemoryContextSwitchTo(old);

	if (strcmp(served_setting, "*") != 0)
	{
		char	   *copy = pstrdup(served_setting);
		List	   *names;

		if (SplitGUCList(copy, ',', &names))
		{
			foreach(lc, names)
			{
				char	   *name = (char *) lfirst(lc);
				bool		found = false;
				ListCell   *d;

				foreach(d, dbs)
					if (strcmp(((DbInfo *) lfirst(d))->name, name) == 0)
						found = true;
				if (!found && strcmp(name, "*") != 0)
					ereport(LOG,
							(errmsg("notify_ext: database \"%s\" named by notify.database does not exist (yet)", name),
							 errdetail("It is served once it exists and has the extension; nothing to restart.")));
			}
		}
	}
	MemoryContextDelete(tmp);
	ereport(DEBUG1, (errmsg("notify_ext launcher: census of %d database(s)", list_length(census))));
}

/*
 * backoff_ms: the pause before the next start in a database after
 * `failures` failed starts in a row: 1 s, 2 s, 4 s ... up to a minute.
 */
static long
backoff_ms(int failures)
{
	return Min((long) MAX_START_BACKOFF_MS, 1000L << Min(Max(failures - 1, 0), 6));
}

/*
 * reap_workers: give back the slots of workers that are gone.  A worker
 * that went before it got to its loop (its database refused the
 * connection, a FATAL at start) counts as a failed start, and its
 * database's request is kept for the next try.
 */
static void
reap_workers(void)
{
	TimestampTz now = GetCurrentTimestamp();

	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];
		bool		gone = false;
		pid_t		pid;

		if (!w->in_use)
			continue;
		if (handles[i] != NULL)
			gone = GetBackgroundWorkerPid(handles[i], &pid) == BGWH_STOPPED;
		else
		{
			/*
			 * Registered by an earlier launcher: no handle; the worker says
			 * when it goes, and one that never started is given up after a
			 * minute.
			 */
			gone = w->exited ||
				(w->pid == 0 && TimestampDifferenceExceeds(w->registered_at, now, 60000)) ||
				(w->pid != 0 && kill(w->pid, 0) != 0 && errno == ESRCH);
		}
		if (!gone)
			continue;

		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		if (!w->served)
		{
			NotifyDatabase *db = notify_database_entry(w->dboid, false);

			if (db != NULL && !w->census)
			{
				db->failures++;
				db->start_after = TimestampTzPlusMilliseconds(now, backoff_ms(db->failures));
				notify_request_worker(db);
			}
		}
		w->in_use = false;
		w->pid = 0;
		w->latch = NULL;
		w->exited = false;
		w->exiting = false;
		w->stop = false;
		w->served = false;
		w->dboid = InvalidOid;
		LWLockRelease(notify_shared->lock);
		if (handles[i] != NULL)
		{
			pfree(handles[i]);
			handles[i] = NULL;
		}
	}
}

/*
 * log_shortage: a worker could not be registered: every background worker
 * slot (max_worker_processes) is taken.  PostgreSQL's own message does not
 * say who wanted one; this one does, at most once a minute.
 */
static void
log_shortage(const char *dbname)
{
	TimestampTz now = GetCurrentTimestamp();

	if (shortage_logged_at != 0 && !TimestampDifferenceExceeds(shortage_logged_at, now, 60000))
		return;
	shortage_logged_at = now;
	ereport(LOG,
			(errmsg("notify_ext: no background worker slot is free for a worker in database \"%s\"; it waits for one",
					dbname),
			 errdetail("max_worker_processes (%d) background workers are running; notify_ext wants up to notify.max_workers = %d workers (at most notify.workers = %d per database) plus its launcher.",
					   max_worker_processes, notify_max_workers, notify_workers),
			 errhint("Raise max_worker_processes (restart), or lower notify.max_workers.")));
}

/*
 * start_worker: take a free slot and register a worker in it for a
 * database.  Returns false when no background worker slot was free (the
 * caller stops starting for now); the slot is given back then.
 */
static bool
start_worker(Oid dboid, const char *dbname, bool is_census)
{
	BackgroundWorker worker;
	BackgroundWorkerHandle *handle;
	NotifyWorkerSlot *w = NULL;
	NotifyDatabase *db;
	int			slot = -1;
	uint32		generation;

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
		if (!notify_shared->workers[i].in_use && handles[i] == NULL)
		{
			slot = i;
			break;
		}
	if (slot < 0)
	{
		LWLockRelease(notify_shared->lock);
		return false;
	}
	w = &notify_shared->workers[slot];
	generation = w->generation + 1;
	memset(w, 0, sizeof(*w));
	w->in_use = true;
	w->generation = generation;
	w->dboid = dboid;
	w->census = is_census;
	w->registered_at = GetCurrentTimestamp();
	strlcpy(w->state, "starting", sizeof(w->state));
	/* a worker sees everything committed before it starts: the request is served */
	db = notify_database_entry(dboid, false);
	if (db != NULL)
	{
		db->requested = false;
		db->due_at = 0;
	}
	LWLockRelease(notify_shared->lock);

	memset(&worker, 0, sizeof(worker));
	worker.bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	worker.bgw_start_time = BgWorkerStart_RecoveryFinished;
	worker.bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(worker.bgw_library_name, BGW_MAXLEN, "notify_ext");
	snprintf(worker.bgw_function_name, BGW_MAXLEN, "notify_worker_main");
	snprintf(worker.bgw_name, BGW_MAXLEN, "notify_ext worker for database %s", dbname);
	snprintf(worker.bgw_type, BGW_MAXLEN, "notify_ext worker");
	worker.bgw_main_arg = Int32GetDatum(slot);
	memcpy(worker.bgw_extra, &generation, sizeof(generation));
	worker.bgw_notify_pid = MyProcPid;

	if (!RegisterDynamicBackgroundWorker(&worker, &handle))
	{
		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		w->in_use = false;
		w->dboid = InvalidOid;
		db = notify_database_entry(dboid, false);
		if (db != NULL && !is_census)
			notify_request_worker(db);
		notify_shared->bgworker_shortage_at = GetCurrentTimestamp();
		LWLockRelease(notify_shared->lock);
		log_shortage(dbname);
		return false;
	}
	handles[slot] = handle;
	ereport(DEBUG1, (errmsg("notify_ext launcher: worker registered in slot %d for database \"%s\"%s",
							slot, dbname, is_census ? " (census)" : "")));
	if (notify_shared->bgworker_shortage_at != 0)
	{
		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		notify_shared->bgworker_shortage_at = 0;
		LWLockRelease(notify_shared->lock);
	}
	return true;
}

/* A database that wants a worker, as launch_workers weighs it. */
typedef struct Candidate
{
	Oid			oid;
	TimestampTz since;			/* when it started waiting: the oldest first */
	int			running;		/* its workers (starting ones included) */
	int			wanted;			/* how many it asks for in all */
} Candidate;

static int
candidate_cmp(const void *a, const void *b)
{
	const Candidate *x = a;
	const Candidate *y = b;

	if (x->since != y->since)
		return x->since < y->since ? -1 : 1;
	return x->oid < y->oid ? -1 : x->oid > y->oid ? 1 : 0;
}

/*
 * ask_to_yield: `needed` workers are asked to give their slot to databases
 * that wait for one: idle ones first, then those of the databases with the
 * most workers, then those that have run longest (at least
 * YIELD_AFTER_MS: each database keeps a turn).  Those already asked count.
 */
static void
ask_to_yield(int needed)
{
	TimestampTz now = GetCurrentTimestamp();
	int			per_db_count[NOTIFY_WORKER_SLOTS];
	Latch	   *latches[NOTIFY_WORKER_SLOTS];
	int			nlatches = 0;

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		per_db_count[i] = 0;
		if (w->in_use && w->stop)
			needed--;
		if (!w->in_use)
			continue;
		for (int j = 0; j < NOTIFY_WORKER_SLOTS; j++)
			if (notify_shared->workers[j].in_use && notify_shared->workers[j].dboid == w->dboid)
				per_db_count[i]++;
	}
	while (needed > 0)
	{
		int			best = -1;
		int			best_rank = 0;

		for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
		{
			NotifyWorkerSlot *w = &notify_shared->workers[i];
			int			rank;

			if (!w->in_use || w->stop || w->exited || !w->served || w->latch == NULL)
				continue;
			if (strcmp(w->state, "idle") == 0)
				rank = 3;
			else if (per_db_count[i] > 1)
				rank = 2;
			else if (TimestampDifferenceExceeds(w->started_at, now, YIELD_AFTER_MS))
				rank = 1;
			else
				continue;
			if (best < 0 || rank > best_rank ||
				(rank == best_rank && w->started_at < notify_shared->workers[best].started_at))
			{
				best = i;
				best_rank = rank;
			}
		}
		if (best < 0)
			break;
		notify_shared->workers[best].stop = true;
		latches[nlatches++] = notify_shared->workers[best].latch;
		per_db_count[best]--;
		needed--;
	}
	LWLockRelease(notify_shared->lock);
	for (int i = 0; i < nlatches; i++)
		SetLatch(latches[i]);
}

/*
 * trim_workers: after a reload lowered notify.max_workers or
 * notify.workers, or changed notify.database, the workers beyond the new
 * bounds (or in databases no longer served) are asked to leave.
 */
static void
trim_workers(List *dbs)
{
	int			total = 0;
	Latch	   *latches[NOTIFY_WORKER_SLOTS];
	int			n = 0;

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];
		DbInfo	   *d;
		int			same_db = 0;

		if (!w->in_use || w->stop || w->exited)
			continue;
		total++;
		for (int j = 0; j < i; j++)
			if (notify_shared->workers[j].in_use && !notify_shared->workers[j].stop &&
				!notify_shared->workers[j].exited && notify_shared->workers[j].dboid == w->dboid)
				same_db++;
		d = find_db(dbs, w->dboid);
		if (total > notify_max_workers || same_db >= notify_workers || d == NULL || !d->servable)
		{
			w->stop = true;
			if (w->latch)
				latches[n++] = w->latch;
			total--;
		}
	}
	LWLockRelease(notify_shared->lock);
	for (int i = 0; i < n; i++)
		SetLatch(latches[i]);
}

/*
 * launch_workers: start what the entries ask for, within the bounds, the
 * longest waiting first; ask workers to yield when databases wait for a
 * slot.  Returns how long the launcher may sleep (ms) before something
 * falls due.
 */
static long
launch_workers(void)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz wake_at = TimestampTzPlusMilliseconds(now, LAUNCHER_NAP_MS);
	Candidate  *first = palloc(sizeof(Candidate) * notify_shared->ndatabases);
	Candidate  *more = palloc(sizeof(Candidate) * notify_shared->ndatabases);
	int			nfirst = 0;
	int			nmore = 0;
	int			in_use = 0;
	int			waiting = 0;
	List	   *dbs = NIL;
	bool		shortage = false;
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "notify_ext launch",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(tmp);
	ListCell   *lc;
	List	   *stale = NIL;

	if (!notify_enabled)
	{
		/* paused: nothing starts; requests and due times wait in the entries */
		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		notify_shared->slots_wanted = 0;
		LWLockRelease(notify_shared->lock);
		MemoryContextSwitchTo(old);
		MemoryContextDelete(tmp);
		return LAUNCHER_NAP_MS;
	}

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
		if (notify_shared->workers[i].in_use)
			in_use++;
	for (int e = 0; e < notify_shared->ndatabases; e++)
	{
		NotifyDatabase *db = &notify_shared->databases[e];
		int			running = 0;
		bool		blocked;

		if (db->dboid == InvalidOid)
			continue;
		for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
			if (notify_shared->workers[i].in_use && notify_shared->workers[i].dboid == db->dboid &&
				!notify_shared->workers[i].stop)
				running++;
		if (db->leaving_pid != 0)
		{
			/* a DDL's mark outlives its backend only if that backend died */
			if (BackendPidGetProc(db->leaving_pid) == NULL)
				stale = lappend_oid(stale, db->dboid);
			continue;
		}
		blocked = db->state == NOTIFY_DB_OTHER_VERSION || db->state == NOTIFY_DB_COPY ||
			db->state == NOTIFY_DB_NO_EXTENSION;
		if (blocked)
			continue;
		if (running == 0 && (db->requested || (db->due_at != 0 && db->due_at <= now)))
		{
			if (db->start_after > now)
			{
				wake_at = Min(wake_at, db->start_after);
				continue;
			}
			first[nfirst].oid = db->dboid;
			first[nfirst].since = db->requested ? db->requested_at : db->due_at;
			if (db->requested && db->due_at != 0 && db->due_at <= now)
				first[nfirst].since = Min(db->requested_at, db->due_at);
			first[nfirst].running = 0;
			first[nfirst].wanted = 1;
			nfirst++;
		}
		else if (running == 0 && db->due_at != 0)
			wake_at = Min(wake_at, db->due_at);
		else if (running > 0 && running < notify_workers && db->workers_wanted > running)
		{
			more[nmore].oid = db->dboid;
			more[nmore].since = 0;
			more[nmore].running = running;
			more[nmore].wanted = Min(db->workers_wanted, notify_workers);
			nmore++;
		}
	}
	LWLockRelease(notify_shared->lock);

	foreach(lc, stale)
	{
		NotifyDatabase *db;

		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		db = notify_database_entry(lfirst_oid(lc), false);
		if (db != NULL && db->leaving_pid != 0 && BackendPidGetProc(db->leaving_pid) == NULL)
			db->leaving_pid = 0;
		LWLockRelease(notify_shared->lock);
	}

	if (nfirst > 0 || nmore > 0 || census != NIL)
		dbs = read_databases(tmp);

	qsort(first, nfirst, sizeof(Candidate), candidate_cmp);
	for (int i = 0; i < nfirst; i++)
	{
		DbInfo	   *d = find_db(dbs, first[i].oid);

		if (d == NULL)
		{
			/* dropped (without our hook seeing it commit): forget it */
			LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
			{
				NotifyDatabase *db = notify_database_entry(first[i].oid, false);
				bool		busy = false;

				for (int k = 0; k < NOTIFY_WORKER_SLOTS; k++)
					if (notify_shared->workers[k].in_use && notify_shared->workers[k].dboid == first[i].oid)
						busy = true;
				if (db != NULL && !busy)
					db->dboid = InvalidOid;
			}
			LWLockRelease(notify_shared->lock);
			continue;
		}
		if (!d->servable)
			continue;
		if (in_use >= notify_max_workers || shortage)
		{
			waiting++;
			continue;
		}
		if (!start_worker(d->oid, d->name, false))
		{
			shortage = true;
			waiting++;
			continue;
		}
		in_use++;
	}

	/* the census, when slots are left: the databases nothing is known of yet */
	if (census != NIL && !shortage)
	{
		List	   *keep = NIL;
		MemoryContext o = MemoryContextSwitchTo(TopMemoryContext);

		foreach(lc, census)
		{
			CensusItem *c = (CensusItem *) lfirst(lc);
			DbInfo	   *d = find_db(dbs, c->oid);
			bool		known;
			NotifyDatabase *db;

			if (d == NULL || !d->servable)
			{
				pfree(c);
				continue;
			}
			LWLockAcquire(notify_shared->lock, LW_SHARED);
			db = notify_database_entry(c->oid, false);
			known = db != NULL && (db->state != NOTIFY_DB_UNKNOWN || db->leaving_pid != 0);
			for (int k = 0; k < NOTIFY_WORKER_SLOTS && !known; k++)
				if (notify_shared->workers[k].in_use && notify_shared->workers[k].dboid == c->oid)
					known = true;
			LWLockRelease(notify_shared->lock);
			if (known)
			{
				pfree(c);
				continue;
			}
			if (c->not_before > now || in_use >= notify_max_workers || shortage)
			{
				if (c->not_before > now)
					wake_at = Min(wake_at, c->not_before);
				keep = lappend(keep, c);
				continue;
			}
			if (!start_worker(d->oid, d->name, true))
			{
				shortage = true;
				keep = lappend(keep, c);
				continue;
			}
			in_use++;
			pfree(c);
		}
		list_free(census);
		census = keep;
		MemoryContextSwitchTo(o);
	}

	/* more workers for databases with a backlog, one each per pass, in turn */
	for (int i = 0; i < nmore && !shortage; i++)
	{
		DbInfo	   *d = find_db(dbs, more[i].oid);

		if (d == NULL || !d->servable || in_use >= notify_max_workers)
			continue;
		if (!start_worker(d->oid, d->name, false))
		{
			shortage = true;
			break;
		}
		in_use++;
		if (more[i].running + 1 < more[i].wanted)
			wake_at = Min(wake_at, TimestampTzPlusMilliseconds(now, 10));
	}

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	notify_shared->slots_wanted = waiting;
	LWLockRelease(notify_shared->lock);
	if (waiting > 0)
	{
		ask_to_yield(waiting);
		wake_at = Min(wake_at, TimestampTzPlusMilliseconds(now, 100));
	}
	if (shortage)
		wake_at = Min(wake_at, TimestampTzPlusMilliseconds(now, 1000));
	if (census != NIL && in_use < notify_max_workers && !shortage)
		wake_at = Min(wake_at, TimestampTzPlusMilliseconds(now, 100));

	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
	pfree(first);
	pfree(more);
	{
		long		ms = (long) ((wake_at - GetCurrentTimestamp()) / 1000);

		return Max(ms, 1);
	}
}

/*
 * on_reload: after a SIGHUP.  A new notify.database takes a census of the
 * databases it adds and sends away the workers of those it drops; lower
 * bounds send away the workers beyond them.
 */
static void
on_reload(void)
{
	MemoryContext tmp = AllocSetContextCreate(CurrentMemoryContext, "notify_ext reload",
											  ALLOCSET_SMALL_SIZES);
	MemoryContext old = MemoryContextSwitchTo(tmp);

	if (served_setting == NULL || strcmp(served_setting, notify_database ? notify_database : "*") != 0)
		take_census();
	trim_workers(read_databases(tmp));
	MemoryContextSwitchTo(old);
	MemoryContextDelete(tmp);
}

/*
 * notify_launcher_main: entry point.  Connects to no database, takes the
 * census, then starts and reaps workers as the shared state asks, until
 * the server stops.
 */
void
notify_launcher_main(Datum main_arg)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();

	/* shared catalogs only: pg_database */
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	notify_shared->launcher_pid = MyProcPid;
	notify_shared->launcher_latch = MyLatch;
	LWLockRelease(notify_shared->lock);
	before_shmem_exit(unpublish_launcher, (Datum) 0);

	ereport(LOG,
			(errmsg("notify_ext launcher started: serving %s, at most %d workers (%d per database)",
					notify_database && strcmp(notify_database, "*") != 0
					? psprintf("the databases \"%s\"", notify_database) : "every database with the extension",
					notify_max_workers, notify_workers)));
	if (notify_max_workers >= max_worker_processes)
		ereport(LOG,
				(errmsg("notify_ext: notify.max_workers (%d) leaves no room in max_worker_processes (%d) for the launcher and other background workers",
						notify_max_workers, max_worker_processes),
				 errhint("Raise max_worker_processes (restart) above notify.max_workers.")));

	take_census();

	for (;;)
	{
		long		timeout;

		CHECK_FOR_INTERRUPTS();
		if (ConfigReloadPending)
		{
			ConfigReloadPending = false;
			ProcessConfigFile(PGC_SIGHUP);
			on_reload();
		}
		reap_workers();
		timeout = launch_workers();
		pgstat_report_activity(STATE_IDLE, NULL);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 timeout, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*-------------------------------------------------------------------------
 *
 * shmem.c
 *	  The state the backends, the launcher and the workers share: an entry
 *	  per database that has (or had) work, a slot per worker, the rate
 *	  limits; and the wake-ups that go through them.
 *
 * Who writes what.  A backend that commits events wakes a worker of its
 * own database, or, when none is running, marks its database's entry as
 * requested and sets the launcher's latch: the entry carries the database
 * (MyDatabaseId), which is how the launcher, connected to no database,
 * learns where the work is.  A worker that leaves records in its entry
 * when its database next has something due (a retry, a lease that runs
 * out, a schedule, a digest), so that nobody has to stay to watch the
 * clock.  The launcher takes and gives back the slots.
 *
 * Entries are looked up by a scan (notify.max_databases of them, a few
 * hundred bytes each): a backend does it once and keeps the index, since
 * an entry is freed only when its database is dropped, when no backend is
 * connected to it any more.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/varlena.h"

#include "notify_ext.h"

NotifyShared *notify_shared = NULL;

/* A backend's entry, found once (see the file's comment). */
static int	my_database_index = -1;

/* What this backend's transaction asked for at commit. */
static bool wake_at_commit = false;
static bool changed_at_commit = false;
static bool xact_callback_registered = false;

static void notify_xact_callback(XactEvent event, void *arg);

/* notify_shmem_size: the shared state, with notify.max_databases entries. */
Size
notify_shmem_size(void)
{
	return add_size(offsetof(NotifyShared, databases),
					mul_size(sizeof(NotifyDatabase), notify_max_databases));
}

/* notify_shmem_init: create or attach to the shared state (shmem_startup_hook). */
void
notify_shmem_init(void)
{
	bool		found;

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	notify_shared = ShmemInitStruct("notify_ext", notify_shmem_size(), &found);
	if (!found)
	{
		memset(notify_shared, 0, notify_shmem_size());
		notify_shared->lock = &(GetNamedLWLockTranche("notify_ext"))->lock;
		SpinLockInit(&notify_shared->mutex);
		notify_shared->ndatabases = notify_max_databases;
		for (int i = 0; i < notify_shared->ndatabases; i++)
			pg_atomic_init_u32(&notify_shared->databases[i].wake_pending, 0);
	}
	LWLockRelease(AddinShmemInitLock);
}

/*
 * notify_database_entry: a database's entry; with create, a free one is
 * taken for it when it has none (NULL when every entry is taken).  The
 * caller holds notify_shared->lock, exclusively to create.
 */
NotifyDatabase *
notify_database_entry(Oid dboid, bool create)
{
	NotifyDatabase *free_entry = NULL;

	for (int i = 0; i < notify_shared->ndatabases; i++)
	{
		NotifyDatabase *db = &notify_shared->databases[i];

		if (db->dboid == dboid)
			return db;
		if (free_entry == NULL && db->dboid == InvalidOid)
			free_entry = db;
	}
	if (!create || free_entry == NULL)
		return NULL;
	free_entry->state = NOTIFY_DB_UNKNOWN;
	free_entry->state_logged = false;
	free_entry->requested = false;
	free_entry->requested_at = 0;
	free_entry->due_at = 0;
	free_entry->workers_wanted = 0;
	free_entry->leaving_pid = 0;
	free_entry->failures = 0;
	free_entry->start_after = 0;
	free_entry->purged_at = 0;
	free_entry->changes = 0;
	memset(&free_entry->sent, 0, sizeof(free_entry->sent));
	pg_atomic_write_u32(&free_entry->wake_pending, 0);
	free_entry->dboid = dboid;
	return free_entry;
}

/*
 * my_database: this backend's (or worker's) entry, taken when create is
 * set and there is none; NULL without the shared state or when it is full
 * (said once per process).
 */
static NotifyDatabase *
my_database(bool create)
{
	NotifyDatabase *db;
	static bool full_warned = false;

	if (notify_shared == NULL || !OidIsValid(MyDatabaseId))
		return NULL;
	if (my_database_index >= 0 &&
		notify_shared->databases[my_database_index].dboid == MyDatabaseId)
		return &notify_shared->databases[my_database_index];
	LWLockAcquire(notify_shared->lock, create ? LW_EXCLUSIVE : LW_SHARED);
	db = notify_database_entry(MyDatabaseId, create);
	if (db != NULL)
		my_database_index = db - notify_shared->databases;
	LWLockRelease(notify_shared->lock);
	if (db == NULL && create && !full_warned)
	{
		full_warned = true;
		ereport(WARNING,
				(errmsg("notify_ext: no room in shared memory for the database with OID %u: notify.max_databases (%d) databases have entries",
						MyDatabaseId, notify_max_databases),
				 errdetail("Its events are sent only when a worker is started there for another reason."),
				 errhint("Raise notify.max_databases in postgresql.conf and restart the server.")));
	}
	return db;
}

/* set_launcher_latch: tell the launcher to look at the entries again. */
static void
set_launcher_latch(void)
{
	Latch	   *latch;

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	latch = notify_shared->launcher_latch;
	LWLockRelease(notify_shared->lock);
	if (latch != NULL)
		SetLatch(latch);
}

/*
 * notify_request_worker: mark a database as wanting a worker (the caller
 * holds the lock exclusively, and sets the launcher's latch after it lets
 * go).  The first request's time is kept: the launcher serves the oldest
 * first.
 */
void
notify_request_worker(NotifyDatabase *db)
{
	if (!db->requested)
	{
		db->requested = true;
		db->requested_at = GetCurrentTimestamp();
	}
}

/*
 * wake_database_workers: set the latch of every running worker of a
 * database but `except` (all), or of one: an idle one if there is one, a
 * worker in the middle of a transfer would make the work wait.  Workers on
 * their way out do not count.  Returns how many were woken.
 */
static int
wake_database_workers(Oid dboid, int except, bool all)
{
	Latch	   *latches[NOTIFY_WORKER_SLOTS];
	Latch	   *busy = NULL;
	int			n = 0;
	static int	next = 0;

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	for (int k = 0; k < NOTIFY_WORKER_SLOTS; k++)
	{
		int			i = (next + k) % NOTIFY_WORKER_SLOTS;
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (!w->in_use || w->dboid != dboid || i == except || w->latch == NULL ||
			w->exiting || w->stop || w->exited)
			continue;
		if (all)
			latches[n++] = w->latch;
		else if (n == 0 && strcmp(w->state, "idle") == 0)
			latches[n++] = w->latch;
		else if (busy == NULL)
			busy = w->latch;
	}
	LWLockRelease(notify_shared->lock);
	next++;
	if (!all && n == 0 && busy != NULL)
		latches[n++] = busy;
	for (int i = 0; i < n; i++)
		SetLatch(latches[i]);
	return n;
}

/*
 * serve_my_database: this backend's database has work (a commit wrote
 * events, or asked for the workers): wake one of its workers, or all with
 * `all`, or ask the launcher for one when none is running.  With
 * `changed`, what the workers last found there (no extension, an old
 * version, a copy) is forgotten first: CREATE EXTENSION, ALTER EXTENSION
 * UPDATE or adopt_copy() just changed it.
 *
 * Only the first commit since a worker last started a round does
 * anything (wake_pending): the events of later commits are visible to
 * that round.  A worker about to leave marks itself exiting and then looks
 * at wake_pending (see worker.c, leave_if_idle); the exchange here comes
 * before the scan of the slots, so either the worker sees the flag and
 * stays, or this scan sees it leaving and asks the launcher.
 */
static void
serve_my_database(bool all, bool changed)
{
	NotifyDatabase *db = my_database(true);

	if (db == NULL)
		return;
	if (changed)
	{
		LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
		if (db->dboid == MyDatabaseId)
		{
			db->state = NOTIFY_DB_UNKNOWN;
			db->state_logged = false;
			db->failures = 0;
			db->start_after = 0;
			db->changes++;
		}
		LWLockRelease(notify_shared->lock);
	}
	if (!all && !changed)
	{
		if (pg_atomic_read_u32(&db->wake_pending) != 0 ||
			pg_atomic_exchange_u32(&db->wake_pending, 1) != 0)
			return;
	}
	else
	{
		pg_atomic_write_u32(&db->wake_pending, 1);
		pg_memory_barrier();
	}
	if (wake_database_workers(MyDatabaseId, -1, all || changed) > 0 && !changed)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	if (db->dboid == MyDatabaseId)
		notify_request_worker(db);
	LWLockRelease(notify_shared->lock);
	set_launcher_latch();
}

/* notify_wake_workers_except: wake every running worker of this database but one (a slot). */
void
notify_wake_workers_except(int slot)
{
	if (notify_shared == NULL)
		return;
	(void) wake_database_workers(MyDatabaseId, slot, true);
}

/*
 * notify_pass_wakeup_on: a worker that cannot serve a commit's wake-up now
 * (it waits for a slow server: a bounce mailbox that takes its time) hands
 * it to the other workers of its database, or, when no other is running,
 * has the launcher start one more (up to notify.workers): the commit chose
 * this worker because every worker was busy.
 */
void
notify_pass_wakeup_on(int slot)
{
	NotifyDatabase *db;
	int			running = 0;

	if (notify_shared == NULL)
		return;
	if (wake_database_workers(MyDatabaseId, slot, true) > 0)
		return;
	db = my_database(true);
	if (db == NULL)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (w->in_use && w->dboid == MyDatabaseId && !w->exiting && !w->stop && !w->exited)
			running++;
	}
	if (db->dboid == MyDatabaseId)
		db->workers_wanted = Max(db->workers_wanted, running + 1);
	LWLockRelease(notify_shared->lock);
	set_launcher_latch();
}

/* notify_wake_worker: wake every worker of this database now, or ask for one. */
void
notify_wake_worker(void)
{
	if (notify_shared == NULL)
		return;
	serve_my_database(true, false);
}

/* register_xact_callback: once per process. */
static void
register_xact_callback(void)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(notify_xact_callback, NULL);
		xact_callback_registered = true;
	}
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
	register_xact_callback();
	wake_at_commit = true;
}

/*
 * notify_database_changed_at_commit: this transaction changes what a
 * worker finds in the database (the extension created or updated, a copy
 * adopted): at commit, forget what the workers last found and have one
 * look now.
 */
void
notify_database_changed_at_commit(void)
{
	register_xact_callback();
	changed_at_commit = true;
}

/* notify_xact_callback: wake a worker when a transaction with events commits. */
static void
notify_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			/* after the commit is visible: the woken worker sees the events */
			if (notify_shared != NULL && (wake_at_commit || changed_at_commit))
				serve_my_database(false, changed_at_commit);
			wake_at_commit = changed_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/* a prepared transaction's events: COMMIT PREPARED wakes (see ddl.c) */
			wake_at_commit = changed_at_commit = false;
			break;
		default:
			break;
	}
}

/* my_slot: this worker's slot; NULL in a backend. */
static NotifyWorkerSlot *
my_slot(void)
{
	if (notify_shared == NULL || notify_worker_slot < 0)
		return NULL;
	return &notify_shared->workers[notify_worker_slot];
}

/* notify_set_worker_state: what this worker does now, shown by worker_status(). */
void
notify_set_worker_state(const char *state)
{
	NotifyWorkerSlot *slot = my_slot();

	if (slot == NULL || strcmp(slot->state, state) == 0)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	strlcpy(slot->state, state, sizeof(slot->state));
	if (strcmp(state, "idle") == 0)
	{
		slot->message_id = 0;
		slot->channel[0] = '\0';
	}
	LWLockRelease(notify_shared->lock);
}

/* notify_set_worker_message: the message this worker is sending (0: none), for worker_status(). */
void
notify_set_worker_message(int64 message_id, const char *channel)
{
	NotifyWorkerSlot *slot = my_slot();

	if (slot == NULL)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	slot->message_id = message_id;
	strlcpy(slot->channel, channel ? channel : "", sizeof(slot->channel));
	LWLockRelease(notify_shared->lock);
}

/* notify_sent_add: n messages sent now, into a ring of sent counts. */
void
notify_sent_add(NotifySentRing *ring, int n, TimestampTz now)
{
	int64		sec = now / USECS_PER_SEC;
	int64		start = sec - sec % NOTIFY_SENT_BUCKET_SECS;
	int			b = (int) ((start / NOTIFY_SENT_BUCKET_SECS) % NOTIFY_SENT_BUCKETS);

	if (ring->bucket_start[b] != start)
	{
		ring->bucket_start[b] = start;
		ring->count[b] = 0;
	}
	ring->count[b] += n;
	ring->total += n;
}

/* notify_sent_last_minute: what a ring counted in the last minute (to a bucket's width). */
uint64
notify_sent_last_minute(const NotifySentRing *ring, TimestampTz now)
{
	int64		sec = now / USECS_PER_SEC;
	uint64		sum = 0;

	for (int b = 0; b < NOTIFY_SENT_BUCKETS; b++)
		if (ring->bucket_start[b] > sec - 60 && ring->bucket_start[b] <= sec)
			sum += ring->count[b];
	return sum;
}

/* notify_count_sent: this worker sent n more messages: its figures and its database's. */
void
notify_count_sent(int n)
{
	NotifyWorkerSlot *slot = my_slot();
	NotifyDatabase *db;
	TimestampTz now = GetCurrentTimestamp();

	if (slot == NULL || n <= 0)
		return;
	db = my_database(false);
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	notify_sent_add(&slot->sent, n, now);
	if (db != NULL && db->dboid == MyDatabaseId)
		notify_sent_add(&db->sent, n, now);
	LWLockRelease(notify_shared->lock);
}

/*
 * notify_worker_stop_requested: whether this worker was asked to leave (a
 * DDL needs its database alone, or its slot is wanted for another
 * database): it starts no new message, and leaves after recording what it
 * sent.
 */
bool
notify_worker_stop_requested(void)
{
	NotifyWorkerSlot *slot = my_slot();

	return slot != NULL && slot->stop;
}

/*
 * notify_rate_admit: whether a message of a rate-limited channel may go
 * now.  Messages go 60 / rate_per_minute seconds apart over all the
 * workers of the database (a channel of the same name in another database
 * is another channel).  One that comes too early is told when to come back
 * (*until): the held back are spread one interval apart from the next free
 * slot, so they come back one at a time, in order, rather than all at
 * once.  A slot whose times are long past holds nothing and is taken for
 * another channel; when none is free, the channel is sent unlimited, with
 * a warning.
 */
bool
notify_rate_admit(const char *channel, int rate_per_minute, TimestampTz now, TimestampTz *until)
{
	int64		interval = (int64) (60.0 * USECS_PER_SEC / rate_per_minute);
	NotifyRateSlot *slot = NULL;
	NotifyRateSlot *spare = NULL;
	bool		admit;

	if (notify_shared == NULL)
		return true;
	SpinLockAcquire(&notify_shared->mutex);
	for (int i = 0; i < NOTIFY_MAX_RATED_CHANNELS; i++)
	{
		NotifyRateSlot *r = &notify_shared->rates[i];

		if (r->channel[0] != '\0' && r->dboid == MyDatabaseId &&
			strncmp(r->channel, channel, sizeof(r->channel)) == 0)
		{
			slot = r;
			break;
		}
		if (spare == NULL &&
			(r->channel[0] == '\0' ||
			 (r->next_slot < now - 60 * USECS_PER_SEC && r->defer_tail < now)))
			spare = r;
	}
	if (slot == NULL && spare != NULL)
	{
		slot = spare;
		slot->dboid = MyDatabaseId;
		strlcpy(slot->channel, channel, sizeof(slot->channel));
		slot->next_slot = slot->defer_tail = 0;
	}
	if (slot == NULL)
	{
		SpinLockRelease(&notify_shared->mutex);
		ereport(WARNING,
				(errmsg("notify_ext: more than %d rate-limited channels are busy; channel \"%s\" is sent without its limit",
						NOTIFY_MAX_RATED_CHANNELS, channel)));
		return true;
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
 * notify_database_listed: whether notify.database lets the extension
 * serve this database: '*' is every database, else a comma-separated list
 * of names (double quotes keep commas or spaces, as in other lists of
 * PostgreSQL settings; names are compared as written, not folded).
 */
bool
notify_database_listed(const char *dbname)
{
	char	   *copy;
	List	   *names;
	ListCell   *lc;
	bool		found = false;

	if (notify_database == NULL || strcmp(notify_database, "*") == 0)
		return true;
	if (dbname == NULL)
		return false;
	copy = pstrdup(notify_database);
	if (!SplitGUCList(copy, ',', &names))
		return false;			/* the check hook refuses such a value */
	foreach(lc, names)
	{
		if (strcmp((char *) lfirst(lc), dbname) == 0 || strcmp((char *) lfirst(lc), "*") == 0)
		{
			found = true;
			break;
		}
	}
	list_free(names);
	pfree(copy);
	return found;
}

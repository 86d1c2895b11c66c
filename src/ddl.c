/*-------------------------------------------------------------------------
 *
 * ddl.c
 *	  The utility hook: a command that needs a database to itself first
 *	  asks our workers there to leave, so that it never waits for them nor
 *	  fails because of them.
 *
 * DROP DATABASE (without FORCE), ALTER DATABASE ... RENAME or SET
 * TABLESPACE, and CREATE DATABASE ... TEMPLATE refuse to run while another
 * session is connected to the database (after waiting 5 s for it to go).
 * Our workers are such sessions, started on demand at any moment.  So,
 * before the command runs (TimescaleDB does the same before DROP
 * DATABASE), the hook
 *   - marks the database as leaving in shared memory: the launcher starts
 *     no worker there until this transaction ends (a worker starting just
 *     then sees the mark and leaves before connecting);
 *   - asks its workers to stop: each finishes the message in flight,
 *     records what it sent and leaves; what it had claimed but not sent is
 *     taken back by the next worker (reclaim_orphans) or, if the database
 *     is gone, is gone with it.  A worker still there after
 *     LEAVE_POLITELY_MS (a server that takes its time over one message) is
 *     sent SIGTERM, which gives up its transfer (an unknown outcome: it is
 *     sent again later, with the same Message-ID);
 *   - waits for them, at most LEAVE_WAIT_MS in all, interruptibly.
 * At the end of the transaction the mark goes (the entry too when the
 * database was dropped), and the launcher serves the database again if it
 * still has work: what the workers left is recorded in its entry.
 *
 * The hook is installed in every backend (the library is preloaded), and
 * does nothing for any other command, nor when the database has no
 * worker: it costs one pointer comparison per utility statement.
 *
 * COMMIT PREPARED of a transaction that wrote events wakes a worker too:
 * the transaction's own commit callback never runs for it.  DROP EXTENSION
 * notify_ext wakes the database's workers at commit, so that they see it
 * and leave at once rather than when they next look.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <signal.h>

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/utility.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

#include "notify_ext.h"

/* How long the workers may take to finish their message and leave. */
#define LEAVE_POLITELY_MS 3000
/* How long the command waits for them in all before it goes on anyway. */
#define LEAVE_WAIT_MS 4500

/* A database this backend's transaction asked the workers to leave. */
typedef struct LeavingDb
{
	Oid			dboid;
	bool		dropping;
} LeavingDb;

static ProcessUtility_hook_type prev_utility_hook = NULL;
static List *leaving = NIL;		/* of LeavingDb, in TopMemoryContext */
static bool callback_registered = false;

static void notify_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
						   ProcessUtilityContext context, ParamListInfo params,
						   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc);

/* notify_install_utility_hook: from _PG_init, in the postmaster. */
void
notify_install_utility_hook(void)
{
	prev_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = notify_utility;
}

/*
 * ddl_xact_callback: the transaction that made workers leave is over:
 * the launcher may serve those databases again (a dropped one's entry is
 * freed).
 */
static void
ddl_xact_callback(XactEvent event, void *arg)
{
	ListCell   *lc;
	bool		commit;

	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT)
		commit = true;
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT)
		commit = false;
	else
		return;
	if (leaving == NIL || notify_shared == NULL)
		return;
	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	foreach(lc, leaving)
	{
		LeavingDb  *l = (LeavingDb *) lfirst(lc);
		NotifyDatabase *db = notify_database_entry(l->dboid, false);

		if (db == NULL || db->leaving_pid != MyProcPid)
			continue;
		db->leaving_pid = 0;
		if (commit && l->dropping)
			db->dboid = InvalidOid;
	}
	LWLockRelease(notify_shared->lock);
	list_free_deep(leaving);
	leaving = NIL;
	if (notify_shared->launcher_latch != NULL)
		SetLatch(notify_shared->launcher_latch);
}

/*
 * workers_still_there: how many of the database's workers have not gone
 * yet (a worker registered but not started counts: it will start, see the
 * mark and leave).  With terminate, those still running are sent SIGTERM.
 */
static int
workers_still_there(Oid dboid, bool terminate)
{
	pid_t		pids[NOTIFY_WORKER_SLOTS];
	int			npids = 0;
	int			n = 0;

	LWLockAcquire(notify_shared->lock, LW_SHARED);
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (!w->in_use || w->dboid != dboid)
			continue;
		if (w->pid == 0 && !w->exited)
			n++;				/* registered, not started yet */
		else if (w->pid != 0)
		{
			n++;
			pids[npids++] = w->pid;
		}
	}
	LWLockRelease(notify_shared->lock);
	/* a worker that said it exits is still a session until its process is gone */
	for (int i = 0; i < npids; i++)
	{
		if (BackendPidGetProc(pids[i]) == NULL)
			n--;
		else if (terminate)
			(void) kill(pids[i], SIGTERM);
	}
	return n;
}

/*
 * leave_database: mark the database as leaving, ask its workers to go,
 * and wait for them (see the file's comment).
 */
static void
leave_database(const char *dbname, bool dropping, const char *what)
{
	Oid			dboid;
	NotifyDatabase *db;
	Latch	   *latches[NOTIFY_WORKER_SLOTS];
	int			nlatches = 0;
	TimestampTz start;
	bool		terminated = false;
	MemoryContext old;
	LeavingDb  *l;

	if (dbname == NULL)
		return;
	dboid = get_database_oid(dbname, true);
	if (!OidIsValid(dboid) || dboid == MyDatabaseId)
		return;

	if (!callback_registered)
	{
		RegisterXactCallback(ddl_xact_callback, NULL);
		callback_registered = true;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	l = palloc(sizeof(LeavingDb));
	l->dboid = dboid;
	l->dropping = dropping;
	leaving = lappend(leaving, l);
	MemoryContextSwitchTo(old);

	LWLockAcquire(notify_shared->lock, LW_EXCLUSIVE);
	db = notify_database_entry(dboid, true);
	if (db != NULL)
		db->leaving_pid = MyProcPid;
	for (int i = 0; i < NOTIFY_WORKER_SLOTS; i++)
	{
		NotifyWorkerSlot *w = &notify_shared->workers[i];

		if (!w->in_use || w->dboid != dboid)
			continue;
		w->stop = true;
		if (w->latch != NULL)
			latches[nlatches++] = w->latch;
	}
	LWLockRelease(notify_shared->lock);
	for (int i = 0; i < nlatches; i++)
		SetLatch(latches[i]);

	start = GetCurrentTimestamp();
	while (workers_still_there(dboid, false) > 0)
	{
		TimestampTz now = GetCurrentTimestamp();

		if (!terminated && TimestampDifferenceExceeds(start, now, LEAVE_POLITELY_MS))
		{
			ereport(LOG,
					(errmsg("notify_ext: the workers of database \"%s\" did not leave within %d ms for %s; they are terminated",
							dbname, LEAVE_POLITELY_MS, what)));
			(void) workers_still_there(dboid, true);
			terminated = true;
		}
		if (TimestampDifferenceExceeds(start, now, LEAVE_WAIT_MS))
		{
			ereport(LOG,
					(errmsg("notify_ext: the workers of database \"%s\" are still there after %d ms; %s goes on",
							dbname, LEAVE_WAIT_MS, what)));
			break;
		}
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH, 10,
						 PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* option_value: a DefElem's string value from a CREATE/ALTER DATABASE option list, or NULL. */
static char *
option_value(List *options, const char *name)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *d = (DefElem *) lfirst(lc);

		if (strcmp(d->defname, name) == 0 && d->arg != NULL)
			return defGetString(d);
	}
	return NULL;
}

/* drops_our_extension: whether a DROP EXTENSION names notify_ext. */
static bool
drops_our_extension(DropStmt *stmt)
{
	ListCell   *lc;

	foreach(lc, stmt->objects)
	{
		Node	   *obj = (Node *) lfirst(lc);

		if (IsA(obj, String) && strcmp(strVal(obj), "notify_ext") == 0)
			return true;
	}
	return false;
}

/*
 * notify_utility: the hook.  Looks at the statement, does what the
 * file's comment says for the few that need it, and runs it.
 */
static void
notify_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
			   ProcessUtilityContext context, ParamListInfo params,
			   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (notify_shared != NULL)
	{
		switch (nodeTag(parsetree))
		{
			case T_DropdbStmt:
				leave_database(((DropdbStmt *) parsetree)->dbname, true, "DROP DATABASE");
				break;
			case T_RenameStmt:
				if (((RenameStmt *) parsetree)->renameType == OBJECT_DATABASE)
					leave_database(((RenameStmt *) parsetree)->subname, false,
								   "ALTER DATABASE ... RENAME");
				break;
			case T_CreatedbStmt:
				leave_database(option_value(((CreatedbStmt *) parsetree)->options, "template"),
							   false, "CREATE DATABASE ... TEMPLATE");
				break;
			case T_AlterDatabaseStmt:
				if (option_value(((AlterDatabaseStmt *) parsetree)->options, "tablespace") != NULL)
					leave_database(((AlterDatabaseStmt *) parsetree)->dbname, false,
								   "ALTER DATABASE ... SET TABLESPACE");
				break;
			case T_DropStmt:
				/* its workers are told at commit, and leave: nothing is left to do */
				if (((DropStmt *) parsetree)->removeType == OBJECT_EXTENSION &&
					drops_our_extension((DropStmt *) parsetree))
					notify_wake_worker_at_commit();
				break;
			case T_TransactionStmt:
				if (((TransactionStmt *) parsetree)->kind == TRANS_STMT_COMMIT_PREPARED &&
					OidIsValid(get_extension_oid("notify_ext", true)))
					notify_wake_worker_at_commit();
				break;
			default:
				break;
		}
	}
	if (prev_utility_hook)
		prev_utility_hook(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv,
								dest, qc);
}

/*-------------------------------------------------------------------------
 *
 * health.c
 *	  Channel health: a relay that is down is the channel's fault, not each
 *	  message's (Postfix's "dead destination").
 *
 * When a transfer fails for a reason that is the channel's (no connection,
 * a bad greeting, TLS, the login, 421; a webhook gateway's 5xx), the
 * channel becomes 'failing' in notify.channel_health: its messages are
 * held in the queue (next_attempt_at 'infinity') without spending
 * attempts, and one probe at a time, with a backoff doubling from
 * notify.retry_backoff up to HEALTH_MAX_BACKOFF_S, tries the channel with
 * one of them.  The first answer about a message (a 250, or a refusal of
 * that message) makes the channel 'ok' again and its held messages due at
 * once, for every worker.  The server log says once that a channel fails
 * and once that it works again, never a line per message.
 *
 * Transitions are decided under the health row's lock, so that of several
 * workers finding the relay down at once, one logs the failure and sets the
 * backoff, and the others only hold their messages.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "notify_ext.h"

/* The longest wait between two probes of a failing channel. */
#define HEALTH_MAX_BACKOFF_S 300

/*
 * A probe taken: the channel's next probe is pushed this far, so that no
 * other worker probes meanwhile; the probe's outcome sets the real one.  A
 * worker that dies in the middle leaves it to pass.
 */
#define HEALTH_PROBE_HOLD_S 120

/* A transition waiting for its transaction's commit to be logged. */
typedef struct HealthLog
{
	bool		recovered;
	char	   *channel;
	char	   *reason;			/* failing: why */
	double		next_probe_s;	/* failing: seconds until the next probe */
	double		failed_for_s;	/* recovered: how long it failed */
	int64		released;		/* recovered: messages made due */
} HealthLog;

static SPIPlanPtr probe_plan = NULL;
static SPIPlanPtr ensure_plan = NULL;
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr fail_plan = NULL;
static SPIPlanPtr recover_plan = NULL;
static SPIPlanPtr release_plan = NULL;
static SPIPlanPtr idle_probe_plan = NULL;
static List *pending_logs = NIL;	/* in TopMemoryContext */

/* prepare_plans: the statements of channel health. */
static void
prepare_plans(void)
{
	Oid			text_t[1] = {TEXTOID};

	if (idle_probe_plan != NULL)
		return;

	/*
	 * Failing channels whose probe is due, each taken by one worker: the
	 * row lock makes the others skip it, and the pushed next_probe_at keeps
	 * them away until the probe's outcome is known.
	 */
	probe_plan = notify_keep_plan(
						   "UPDATE notify.channel_health h"
						   "   SET next_probe_at = pg_catalog.now() + pg_catalog.make_interval(secs => "
						   CppAsString2(HEALTH_PROBE_HOLD_S) "), probes = h.probes + 1"
						   " WHERE h.channel = ANY (ARRAY(SELECT x.channel FROM notify.channel_health x"
						   "        WHERE x.state = 'failing' AND x.next_probe_at <= pg_catalog.now()"
						   "        FOR UPDATE SKIP LOCKED))"
						   " RETURNING h.channel",
						   0, NULL);

	/*
	 * A channel-level failure ($1 the channel, $2 why, $3 whether it came
	 * from the probe, $4 notify.retry_backoff).  The row is made and locked
	 * first, in statements of their own, so that of workers failing at once
	 * the first decides and the others, waiting on the lock, see a channel
	 * already failing (a statement's own snapshot would not).  A channel
	 * that was ok starts failing: first probe after notify.retry_backoff.
	 * A failed probe doubles the wait, up to HEALTH_MAX_BACKOFF_S.  A
	 * failure seen by a message sent before the channel was known to fail
	 * changes only the error.  Returns the seconds until the next probe.
	 */
	ensure_plan = notify_keep_plan(
							"INSERT INTO notify.channel_health (channel)"
							" SELECT $1 WHERE EXISTS (SELECT 1 FROM notify.channel c WHERE c.name = $1)"
							" ON CONFLICT (channel) DO NOTHING",
							1, text_t);
	lock_plan = notify_keep_plan(
						  "SELECT h.state FROM notify.channel_health h WHERE h.channel = $1 FOR UPDATE",
						  1, text_t);
	fail_plan = notify_keep_plan(
						  "UPDATE notify.channel_health h SET"
						  "   state = 'failing', last_error = $2, updated_at = pg_catalog.now(),"
						  "   failing_since = CASE WHEN h.state = 'ok' THEN pg_catalog.now() ELSE h.failing_since END,"
						  "   next_probe_at = CASE WHEN h.state = 'ok' THEN pg_catalog.now() + pg_catalog.make_interval(secs => $4)"
						  "                        WHEN $3 THEN pg_catalog.now() + h.backoff"
						  "                        ELSE h.next_probe_at END,"
						  "   backoff = CASE WHEN h.state = 'ok' OR h.backoff IS NULL"
						  "                  THEN LEAST(pg_catalog.make_interval(secs => $4 * 2),"
						  "                             pg_catalog.make_interval(secs => " CppAsString2(HEALTH_MAX_BACKOFF_S) "))"
						  "                  WHEN $3 THEN LEAST(h.backoff * 2, pg_catalog.make_interval(secs => "
						  CppAsString2(HEALTH_MAX_BACKOFF_S) "))"
						  "                  ELSE h.backoff END,"
						  "   probes = CASE WHEN h.state = 'ok' THEN 0 ELSE h.probes END"
						  " WHERE h.channel = $1"
						  " RETURNING pg_catalog.date_part('epoch', h.next_probe_at - pg_catalog.now())",
						  4, (Oid[]) {TEXTOID, TEXTOID, BOOLOID, FLOAT8OID});

	/* A failing channel answered about a message: it works. */
	recover_plan = notify_keep_plan(
							 "UPDATE notify.channel_health h SET state = 'ok', failing_since = NULL,"
							 "       next_probe_at = NULL, backoff = NULL, probes = 0, updated_at = pg_catalog.now()"
							 "  FROM (SELECT x.failing_since FROM notify.channel_health x"
							 "         WHERE x.channel = $1 AND x.state = 'failing' FOR UPDATE) old"
							 " WHERE h.channel = $1"
							 " RETURNING pg_catalog.date_part('epoch', pg_catalog.now() - old.failing_since)",
							 1, text_t);
	/* ... and what it held is due now */
	release_plan = notify_keep_plan(
							 "UPDATE notify.message m SET next_attempt_at = pg_catalog.now()"
							 " WHERE m.status = 'queued' AND m.channel = $1 AND m.next_attempt_at = 'infinity'",
							 1, text_t);
	/* the last one prepared: a failure half-way prepares again next time */
	idle_probe_plan = notify_keep_plan(
								"UPDATE notify.channel_health SET next_probe_at = pg_catalog.now()"
								"       + pg_catalog.make_interval(secs => $2)"
								" WHERE channel = $1 AND state = 'failing'",
								2, (Oid[]) {TEXTOID, FLOAT8OID});
}

/*
 * health_take_probes: the failing channels whose probe is due and that
 * this worker now probes (a list of names, in the caller's context).
 * Called in the claim's transaction.
 */
List *
health_take_probes(void)
{
	List	   *taken = NIL;
	uint64		n;

	prepare_plans();
	n = notify_run_plan(probe_plan, NULL, NULL, false, 0, SPI_OK_UPDATE_RETURNING, "taking channel probes");
	for (uint64 i = 0; i < n; i++)
		taken = lappend(taken, SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1));
	return taken;
}

/*
 * health_nothing_to_probe: a probe found no held message (they were
 * cancelled, or none was queued since): the next message that comes is
 * held, and probes the channel after notify.retry_backoff.
 */
void
health_nothing_to_probe(const char *channel)
{
	Datum		args[2] = {CStringGetTextDatum(channel), Float8GetDatum((double) notify_retry_backoff)};

	prepare_plans();
	notify_run_plan(idle_probe_plan, args, NULL, false, 0, SPI_OK_UPDATE, "rescheduling a probe");
}

/* log_later: a transition, logged once its transaction has committed. */
static void
log_later(HealthLog *entry)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
	HealthLog  *copy = palloc(sizeof(HealthLog));

	*copy = *entry;
	copy->channel = pstrdup(entry->channel);
	copy->reason = entry->reason ? pstrdup(entry->reason) : NULL;
	pending_logs = lappend(pending_logs, copy);
	MemoryContextSwitchTo(old);
}

/*
 * health_channel_failed: record a channel-level failure (in the caller's
 * transaction); probe says whether it was the channel's probe.
 */
void
health_channel_failed(const char *channel, const char *reason, bool probe)
{
	Datum		args[4];
	bool		isnull;
	char	   *was;
	Datum		secs;

	prepare_plans();
	args[0] = CStringGetTextDatum(channel);
	args[1] = CStringGetTextDatum(reason);
	args[2] = BoolGetDatum(probe);
	args[3] = Float8GetDatum((double) notify_retry_backoff);
	notify_run_plan(ensure_plan, args, NULL, false, 0, SPI_OK_INSERT, "recording a failing channel");
	if (notify_run_plan(lock_plan, args, NULL, false, 0, SPI_OK_SELECT, "recording a failing channel") == 0)
		return;					/* the channel was dropped meanwhile */
	was = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
	notify_run_plan(fail_plan, args, NULL, false, 0, SPI_OK_UPDATE_RETURNING, "recording a failing channel");
	secs = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	if (strcmp(was, "ok") == 0)
	{
		HealthLog	entry = {0};

		entry.channel = (char *) channel;
		entry.reason = (char *) reason;
		entry.next_probe_s = isnull ? 0 : DatumGetFloat8(secs);
		log_later(&entry);
	}
}

/*
 * health_channel_works: a channel answered about a message.  If it was
 * failing, it is ok again and its held messages are due now (in the
 * caller's transaction); returns true then (the caller wakes the workers).
 */
bool
health_channel_works(const char *channel)
{
	Datum		arg;
	bool		isnull;
	HealthLog	entry = {0};
	Datum		secs;

	prepare_plans();
	arg = CStringGetTextDatum(channel);
	if (notify_run_plan(recover_plan, &arg, NULL, false, 0, SPI_OK_UPDATE_RETURNING,
						"recording a channel that works again") == 0)
		return false;
	secs = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	entry.recovered = true;
	entry.channel = (char *) channel;
	entry.failed_for_s = isnull ? 0 : DatumGetFloat8(secs);
	entry.released = (int64) notify_run_plan(release_plan, &arg, NULL, false, 0, SPI_OK_UPDATE,
											 "releasing a channel's held messages");
	log_later(&entry);
	return true;
}

/*
 * health_log_transitions: after the transaction that recorded them
 * committed, the server log's one line per transition; forgotten when it
 * was rolled back (discard true).
 */
void
health_log_transitions(bool discard)
{
	ListCell   *lc;

	foreach(lc, pending_logs)
	{
		HealthLog  *e = (HealthLog *) lfirst(lc);

		if (discard)
			continue;
		if (e->recovered)
			ereport(LOG,
					(errmsg("notify_ext: channel \"%s\" works again after %.0f s; %lld waiting message(s) are due now",
							e->channel, e->failed_for_s, (long long) e->released)));
		else
			ereport(LOG,
					(errmsg("notify_ext: channel \"%s\" is failing: %s", e->channel, e->reason),
					 errdetail("Its messages wait in the queue and spend no attempt; one message probes the channel in %.0f s, then at doubling intervals up to %d s.",
							   e->next_probe_s, HEALTH_MAX_BACKOFF_S),
					 errhint("Fix the channel (notify.set_smtp or notify.set_webhook), then call notify.resume('%s') to send its messages now.",
							 e->channel)));
	}
	foreach(lc, pending_logs)
	{
		HealthLog  *e = (HealthLog *) lfirst(lc);

		pfree(e->channel);
		if (e->reason)
			pfree(e->reason);
	}
	list_free_deep(pending_logs);
	pending_logs = NIL;
}

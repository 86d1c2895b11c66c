/*-------------------------------------------------------------------------
 *
 * sender.c
 *	  Claim due messages, send them outside any transaction, record what
 *	  happened.
 *
 * A claim marks messages 'sending' with a lease and commits before the
 * first byte goes to the network: no transaction (and no lock) is held
 * while a server takes its time.  The results of the whole batch are then
 * written in one new transaction.  A crash between the server's 250 and
 * that transaction sends the message again after the lease: delivery is
 * at least once, and the stable Message-ID makes the duplicate visible.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "common/pg_prng.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "fmgr.h"
#include "mime.h"
#include "notify_ext.h"
#include "smtp.h"
#include "webhook.h"

/* A claimed message and, after sending, its result. */
typedef struct ClaimedMessage
{
	OutMessage	out;
	char	   *channel;
	int			attempts;
	TimestampTz started;
	TimestampTz finished;
	bool		tried;			/* false: left to the lease (worker stopping) */
	bool		recorded;		/* its outcome is committed */
	bool		probe;			/* it probes its failing channel */
	bool		hold;			/* held: its channel fails; back to the queue, no attempt */
	int64		event_id;
	int64		rule_id;
	bool		has_attachments;
	SmtpConfig *cfg;			/* its SMTP channel, or */
	WebhookConfig *hook;		/* its webhook channel; both NULL when unusable */
	struct BatchChannel *bc;	/* its channel in this batch */
	TimestampTz defer_until;	/* rate limit: back to the queue until then */
	SendResult	result;
} ClaimedMessage;

/* A channel's settings, loaded once per batch. */
typedef struct BatchChannel
{
	char	   *last_event;		/* "failed" or "answered": the latest of this batch */
	char	   *name;
	SmtpConfig *cfg;			/* an SMTP channel, or */
	WebhookConfig *hook;		/* a webhook channel; both NULL: missing */
	bool		failing;		/* known to fail: only its probe is tried */
	char	   *failure;		/* failed in this batch: why (recorded at the next commit) */
	bool		failure_by_probe;
	bool		answered;		/* a message of it got an answer about itself in this batch */
} BatchChannel;

/* the batch's channels, for the health record at each commit */
static List *batch_channels = NIL;

static SmtpPool *pool = NULL;	/* in TopMemoryContext */

/*
 * Direct send: messages the worker's fan-out inserted already claimed
 * (fanout.c, insert_rows), to be sent by this worker's next send round
 * once the fan-out has committed.  They live in the round's context.
 */
static MemoryContext direct_cxt = NULL;
static List *direct_list = NIL;
static bool direct_ready = false;

static List *claimed_rows(uint64 n);

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr probe_claim_plan = NULL;
static SPIPlanPtr hold_lock_plan = NULL;
static SPIPlanPtr max_age_plan = NULL;

/* what a claim returns of each message */
#define CLAIM_RETURNING \
	"RETURNING m.id, m.address, m.display_name, m.subject, m.text_body, m.html_body," \
	"          m.channel, m.attempts, m.event_id, m.rule_id," \
	"          EXISTS (SELECT 1 FROM notify.attachment a" \
	"                   WHERE a.event_id = m.event_id AND a.rule_id = m.rule_id)"
static SPIPlanPtr expire_plan = NULL;
static SPIPlanPtr channel_plan = NULL;
static SPIPlanPtr record_plan = NULL;
#define RECORD_NARGS 12
static SPIPlanPtr next_due_plan = NULL;
static SPIPlanPtr attachments_plan = NULL;
static SPIPlanPtr defer_plan = NULL;
static SPIPlanPtr renew_plan = NULL;

/* prepare_plans: the sender's statements. */
static void
prepare_plans(void)
{
	Oid			claim_t[4] = {INT4OID, INT4OID, INT4OID, INT4OID};
	Oid			text_t[1] = {TEXTOID};
	Oid			record_t[RECORD_NARGS] = {INT8ARRAYOID, TEXTARRAYOID, TEXTARRAYOID, TEXTARRAYOID,
		FLOAT8ARRAYOID, INT4ARRAYOID, TIMESTAMPTZARRAYOID, TIMESTAMPTZARRAYOID, TEXTARRAYOID,
	INT4ARRAYOID, TEXTARRAYOID, INT4OID};

	/* the last one prepared: a failure half-way prepares again next time */
	if (next_due_plan != NULL)
		return;

	/*
	 * Due messages, in the queue's order, a batch at a time, skipping what
	 * another sender is claiming.  (Those whose lease ran out, a sender
	 * that died, are put back in the queue first: expire_plan.)
	 *
	 * The batch's ids are collected into an array and the rows updated by
	 * primary key: joined to a CTE instead, the planner cannot know the
	 * LIMIT (it is a subquery), assumes 10% of the table, and with a long
	 * queue in the statistics hashes the whole of notify.message (sent
	 * history included) for every batch (test/bench/backlog.py: 400 ms per
	 * batch of 16 at 1M queued; 1.3 ms like this).  The fair-share count
	 * reads the queue in index order, so it never scans the history.
	 */
	claim_plan = notify_keep_plan(
						   "UPDATE notify.message m SET status = 'sending', attempts = m.attempts + 1,"
						   "       lease_until = pg_catalog.now() + pg_catalog.make_interval(secs => $2),"
						   "       claimed_by = $3"
						   " WHERE m.id = ANY (ARRAY("
						   "  SELECT d.id FROM notify.message d"
						   "   WHERE d.status = 'queued' AND d.next_attempt_at <= pg_catalog.now()"
						   "   ORDER BY d.next_attempt_at, d.id"
						   /* a fair share of what is due, so a burst is spread over the workers */
						   "   LIMIT (SELECT GREATEST(1, pg_catalog.ceil(pg_catalog.count(*)::float8 / $4)::integer)"
						   "            FROM (SELECT 1 FROM notify.message q"
						   "                   WHERE q.status = 'queued' AND q.next_attempt_at <= pg_catalog.now()"
						   "                   ORDER BY q.next_attempt_at, q.id"
						   "                   LIMIT $1 * $4) x)"
						   "   FOR UPDATE SKIP LOCKED)) "
						   CLAIM_RETURNING,
						   4, claim_t);

	/*
	 * The probe of a failing channel ($1): the oldest of the messages it
	 * holds, claimed like any other (its attempt is given back if the
	 * channel still fails).
	 */
	probe_claim_plan = notify_keep_plan(
								 "UPDATE notify.message m SET status = 'sending', attempts = m.attempts + 1,"
								 "       lease_until = pg_catalog.now() + pg_catalog.make_interval(secs => $2),"
								 "       claimed_by = $3"
								 " WHERE m.id = (SELECT d.id FROM notify.message d"
								 "   WHERE d.status = 'queued' AND d.next_attempt_at = 'infinity' AND d.channel = $1"
								 "   ORDER BY d.next_attempt_at, d.id LIMIT 1 FOR UPDATE SKIP LOCKED) "
								 CLAIM_RETURNING,
								 3, (Oid[]) {TEXTOID, INT4OID, INT4OID});

	hold_lock_plan = notify_keep_plan(
							   "SELECT h.channel FROM notify.channel_health h WHERE h.channel = ANY ($1)"
							   " ORDER BY h.channel FOR SHARE",
							   1, (Oid[]) {TEXTARRAYOID});

	/*
	 * notify.max_age: a message that has waited this long (its channel
	 * failing for days, or retries spent slowly) is dead.  Read through the
	 * queue's index, so the sweep costs the queue, not the history.
	 */
	max_age_plan = notify_keep_plan(
							 "UPDATE notify.message m SET status = 'dead', lease_until = NULL,"
							 "       last_error = pg_catalog.format('waited longer than notify.max_age (%s) to be sent%s',"
							 "           pg_catalog.make_interval(secs => $1),"
							 "           COALESCE('; last error: ' || m.last_error, ''))"
							 " WHERE m.status = 'queued' AND m.created_at < pg_catalog.now() - pg_catalog.make_interval(secs => $1)",
							 1, (Oid[]) {FLOAT8OID});
	expire_plan = notify_keep_plan(
							"UPDATE notify.message m SET status = 'queued', lease_until = NULL"
							" WHERE m.id = ANY (ARRAY("
							"  SELECT d.id FROM notify.message d"
							"   WHERE d.status = 'sending' AND d.lease_until < pg_catalog.now()"
							"   FOR UPDATE SKIP LOCKED))",
							0, NULL);
	channel_plan = notify_keep_plan(
							 "SELECT c.kind, c.url, c.from_address, c.username, s.password, c.tls, c.rate_per_minute,"
							 "       c.content_type,"
							 "       ARRAY(SELECT h.key FROM pg_catalog.jsonb_each(s.headers) h ORDER BY h.key),"
							 "       ARRAY(SELECT h.value #>> '{}' FROM pg_catalog.jsonb_each(s.headers) h ORDER BY h.key),"
							 "       COALESCE(ch.state = 'failing', false), c.bounce_address"
							 "  FROM notify.channel c LEFT JOIN notify.channel_secret s ON s.channel = c.name"
							 "  LEFT JOIN notify.channel_health ch ON ch.channel = c.name"
							 " WHERE c.name = $1",
							 1, text_t);

	/*
	 * The outcomes of a batch, one array element per message, recorded
	 * with one statement: the UPDATE of the messages and the INSERT of
	 * their attempts (a statement per message paid the executor's start-up
	 * and the CHECK constraints' preparation each time).  r.status is the
	 * new status; a retry goes back to the queue after the backoff (r.delay
	 * seconds), unless attempts are spent ($12 = max).  An attempt row is
	 * written only for a message the UPDATE found still ours: one whose
	 * lease ran out went back to the queue, and its next claim counts.
	 *
	 * "(status || '') = 'sending'" here and in defer_plan and renew_plan:
	 * a plain "status = 'sending'" implies a partial index's predicate,
	 * and a generic plan made while the table was small (a fresh queue)
	 * then reads the row by id through that index (then message_queued_idx,
	 * now message_lease_idx), whose leading column is not the id: every
	 * lookup scans the whole index
	 * (test/bench/delivery.py: 155 buffers per message at 16,000 queued).
	 * Written so, only the primary key can serve "id = $1".
	 */
	record_plan = notify_keep_plan(
							"WITH r AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1), pg_catalog.unnest($2),"
							"                pg_catalog.unnest($3), pg_catalog.unnest($4), pg_catalog.unnest($5),"
							"                pg_catalog.unnest($6), pg_catalog.unnest($7), pg_catalog.unnest($8),"
							"                pg_catalog.unnest($9), pg_catalog.unnest($10), pg_catalog.unnest($11))"
							"     AS r(id, status, error, response, delay, attempts, started, finished, outcome,"
							"          code, attempt_response)),"
							" u AS (UPDATE notify.message m SET"
							"  status = CASE WHEN r.status = 'retry' AND m.attempts >= $12 THEN 'dead'"
							"                WHEN r.status IN ('retry', 'hold') THEN 'queued' ELSE r.status END,"
							"  attempts = CASE WHEN r.status = 'hold' THEN m.attempts - 1 ELSE m.attempts END,"
							"  sent_at = CASE WHEN r.status = 'sent' THEN pg_catalog.now() END,"
							"  last_error = COALESCE(r.error, CASE WHEN r.status = 'hold' THEN m.last_error END),"
							"  smtp_response = COALESCE(r.response, CASE WHEN r.status = 'hold' THEN m.smtp_response END),"
							"  next_attempt_at = CASE WHEN r.status = 'retry'"
							"      THEN pg_catalog.now() + pg_catalog.make_interval(secs => r.delay)"
							"      WHEN r.status = 'hold' THEN CASE WHEN EXISTS (SELECT 1 FROM notify.channel_health h"
							"            WHERE h.channel = m.channel AND h.state = 'failing') THEN 'infinity'"
							"            ELSE pg_catalog.now() END"
							"      ELSE m.next_attempt_at END,"
							"  lease_until = NULL "
							"  FROM r"
							" WHERE m.id = r.id AND (m.status || '') = 'sending' AND m.attempts = r.attempts"
							" RETURNING m.id) "
							"INSERT INTO notify.attempt (message_id, started_at, finished_at, outcome, smtp_code, response)"
							" SELECT r.id, r.started, r.finished, r.outcome, r.code, r.attempt_response"
							"   FROM r JOIN u ON u.id = r.id WHERE r.outcome IS NOT NULL",
							RECORD_NARGS, record_t);
	{
		Oid			att_t[2] = {INT8OID, INT8OID};

		attachments_plan = notify_keep_plan(
									 "SELECT a.filename, a.content_type, a.content FROM notify.attachment a"
									 " WHERE a.event_id = $1 AND a.rule_id = $2 ORDER BY a.id",
									 2, att_t);
	}
	{
		Oid			defer_t[3] = {INT8OID, TIMESTAMPTZOID, INT4OID};
		Oid			renew_t[2] = {INT8ARRAYOID, INT4OID};

		/* a message held back by its channel's rate: this claim does not count */
		defer_plan = notify_keep_plan(
							   "UPDATE notify.message SET status = 'queued', attempts = attempts - 1,"
							   "       next_attempt_at = $2, lease_until = NULL"
							   " WHERE id = $1 AND (status || '') = 'sending' AND attempts = $3",
							   3, defer_t);
		/* messages still ours, in flight or waiting their turn: keep them ours */
		renew_plan = notify_keep_plan(
							   "UPDATE notify.message SET lease_until = pg_catalog.now() + pg_catalog.make_interval(secs => $2)"
							   " WHERE id = ANY ($1) AND (status || '') = 'sending'",
							   2, renew_t);
	}
	/* the next message due, or the next probe of a failing channel (held messages wait for it) */
	next_due_plan = notify_keep_plan(
							  "SELECT pg_catalog.date_part('epoch', LEAST("
							  "  (SELECT pg_catalog.min(m.next_attempt_at) FROM notify.message m"
							  "    WHERE m.status = 'queued' AND m.next_attempt_at < 'infinity'),"
							  "  (SELECT pg_catalog.min(h.next_probe_at) FROM notify.channel_health h"
							  "    WHERE h.state = 'failing')) - pg_catalog.now())",
							  0, NULL);
}

/*
 * sender_abandon_transfers: the worker's round failed (its transaction is
 * aborted, its memory about to be reused): give up what is in flight.  The
 * messages stay 'sending' under this worker's slot and are taken back by
 * reclaim_orphans before the next round.
 */
void
sender_abandon_transfers(void)
{
	smtp_pool_abandon(pool);
	health_log_transitions(true);
	batch_channels = NIL;
}

/* claimed_by_id: the claimed message with this id (a batch holds a few). */
static ClaimedMessage *
claimed_by_id(List *claimed, int64 id)
{
	ListCell   *lc;

	foreach(lc, claimed)
	{
		ClaimedMessage *m = (ClaimedMessage *) lfirst(lc);

		if (m->out.id == id)
			return m;
	}
	elog(ERROR, "notify_ext: a transfer finished for message %lld, which this batch does not hold",
		 (long long) id);
	return NULL;
}

/* sender_shutdown: close every connection (worker exit, extension dropped). */
void
sender_shutdown(void)
{
	smtp_pool_destroy(pool);
	pool = NULL;
	webhook_shutdown();
}

/* text_array: the elements of a text[] column, palloc'd; their number in *n. */
static char **
text_array(HeapTuple tup, TupleDesc desc, int col, int *n)
{
	bool		isnull;
	Datum		d = SPI_getbinval(tup, desc, col, &isnull);
	Datum	   *elems;
	bool	   *nulls;
	char	  **out;

	*n = 0;
	if (isnull)
		return NULL;
	deconstruct_array(DatumGetArrayTypePCopy(d), TEXTOID, -1, false, TYPALIGN_INT, &elems, &nulls, n);
	out = palloc0(sizeof(char *) * Max(*n, 1));
	for (int i = 0; i < *n; i++)
		out[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
	return out;
}

/*
 * load_channel: a channel's settings, palloc'd, into *cfg (SMTP) or *hook
 * (webhook) according to *kind; false when it does not exist.
 */
static bool
load_channel(const char *name, SmtpConfig *cfg, WebhookConfig *hook, char **kind, bool *failing)
{
	Datum		arg = CStringGetTextDatum(name);
	HeapTuple	tup;
	TupleDesc	desc;

	if (notify_run_plan(channel_plan, &arg, NULL, true, 1, SPI_OK_SELECT, "channel lookup") == 0)
		return false;
	tup = SPI_tuptable->vals[0];
	desc = SPI_tuptable->tupdesc;
	*kind = SPI_getvalue(tup, desc, 1);
	cfg->name = pstrdup(name);
	cfg->url = SPI_getvalue(tup, desc, 2);
	cfg->from_address = SPI_getvalue(tup, desc, 3);
	cfg->username = SPI_getvalue(tup, desc, 4);
	cfg->password = SPI_getvalue(tup, desc, 5);
	cfg->tls = SPI_getvalue(tup, desc, 6);
	{
		bool		isnull;
		Datum		rate = SPI_getbinval(tup, desc, 7, &isnull);

		cfg->rate_per_minute = isnull ? 0 : DatumGetInt32(rate);
		cfg->bounce_address = SPI_getvalue(tup, desc, 12);
		if (failing)
			*failing = DatumGetBool(SPI_getbinval(tup, desc, 11, &isnull));
	}
	if (strcmp(*kind, "webhook") == 0)
	{
		int			nvalues;

		hook->name = cfg->name;
		hook->url = cfg->url;
		hook->rate_per_minute = cfg->rate_per_minute;
		hook->content_type = SPI_getvalue(tup, desc, 8);
		if (hook->content_type == NULL)
			hook->content_type = pstrdup("application/json");
		hook->header_names = text_array(tup, desc, 9, &hook->nheaders);
		hook->header_values = text_array(tup, desc, 10, &nvalues);
		Assert(nvalues == hook->nheaders);
	}
	return true;
}

#define LEASE_CHECK_US 1000000
static TimestampTz leases_checked_at = 0;
#define MAX_AGE_CHECK_US (60 * (int64) 1000000)
static TimestampTz max_age_checked_at = 0;

/* claim_messages: mark a batch 'sending' under a lease; the caller commits. */
static List *
claim_messages(int batch_size)
{
	Datum		args[4] = {Int32GetDatum(batch_size), Int32GetDatum(notify_lease),
	Int32GetDatum(notify_worker_id), Int32GetDatum(notify_workers)};
	uint64		n;
	List	   *claimed = NIL;
	int			nestlevel;
	TimestampTz now = GetCurrentTimestamp();

	/*
	 * Messages whose lease ran out (their sender died, or hangs past its
	 * renewals) go back to the queue, looked for once a second: the claim
	 * itself reads the queue only.
	 */
	if (now - leases_checked_at >= LEASE_CHECK_US || now < leases_checked_at)
	{
		notify_run_plan(expire_plan, NULL, NULL, false, 0, SPI_OK_UPDATE,
						"putting messages whose lease ran out back in the queue");
		leases_checked_at = now;
	}
	if (now - max_age_checked_at >= MAX_AGE_CHECK_US || now < max_age_checked_at)
	{
		Datum		age = Float8GetDatum((double) notify_max_age);

		notify_run_plan(max_age_plan, &age, NULL, false, 0, SPI_OK_UPDATE,
						"giving up messages older than notify.max_age");
		max_age_checked_at = now;
	}
	nestlevel = NewGUCNestLevel();

	/*
	 * The claim must read the queue's index in order and stop after a
	 * batch.  Planned while the queue was small (statistics of a fresh
	 * queue), it became a bitmap scan of every due message and a sort, for
	 * every batch of 16: 6% of the worker's time with 20,000 queued.  The
	 * plan is made, and made again, only here, under these settings.
	 */
	(void) set_config_option("enable_bitmapscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("enable_seqscan", "off", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	n = notify_run_plan(claim_plan, args, NULL, false, 0, SPI_OK_UPDATE_RETURNING, "claiming messages");
	AtEOXact_GUC(true, nestlevel);

	claimed = claimed_rows(n);
	SPI_freetuptable(SPI_tuptable);
	return claimed;
}

/*
 * claimed_rows: the claimed messages SPI_tuptable holds (CLAIM_RETURNING),
 * copied into the current context.
 */
static List *
claimed_rows(uint64 n)
{
	List	   *claimed = NIL;

	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		ClaimedMessage *m = palloc0(sizeof(ClaimedMessage));
		bool		isnull;

		m->out.id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
		m->out.address = SPI_getvalue(tup, desc, 2);
		m->out.display_name = SPI_getvalue(tup, desc, 3);
		m->out.subject = SPI_getvalue(tup, desc, 4);
		m->out.text_body = SPI_getvalue(tup, desc, 5);
		m->out.html_body = SPI_getvalue(tup, desc, 6);
		m->channel = SPI_getvalue(tup, desc, 7);
		m->attempts = DatumGetInt32(SPI_getbinval(tup, desc, 8, &isnull));
		m->event_id = DatumGetInt64(SPI_getbinval(tup, desc, 9, &isnull));
		if (isnull)
			m->event_id = -1;
		m->rule_id = DatumGetInt64(SPI_getbinval(tup, desc, 10, &isnull));
		if (isnull)
			m->rule_id = -1;
		m->has_attachments = DatumGetBool(SPI_getbinval(tup, desc, 11, &isnull));
		claimed = lappend(claimed, m);
	}
	return claimed;
}

/* sender_direct_begin: a fan-out starts; what it claims is kept in cxt. */
void
sender_direct_begin(MemoryContext cxt)
{
	direct_cxt = cxt;
	direct_list = NIL;
	direct_ready = false;
}

/* direct_text: a text column of a message the fan-out claimed, copied into direct_cxt; NULL for null. */
static char *
direct_text(const DirectText *t)
{
	return t->isnull ? NULL : TextDatumGetCString(t->value);
}

/*
 * sender_add_direct: a message the fan-out inserted claimed by this worker;
 * its texts are copied into the round's context.
 */
void
sender_add_direct(int64 id, const DirectText *texts, int64 event_id, int64 rule_id, bool has_attachments)
{
	MemoryContext old = MemoryContextSwitchTo(direct_cxt);
	ClaimedMessage *m = palloc0(sizeof(ClaimedMessage));

	m->out.id = id;
	m->out.address = direct_text(&texts[DIRECT_ADDRESS]);
	m->out.display_name = direct_text(&texts[DIRECT_DISPLAY_NAME]);
	m->out.subject = direct_text(&texts[DIRECT_SUBJECT]);
	m->out.text_body = direct_text(&texts[DIRECT_TEXT_BODY]);
	m->out.html_body = direct_text(&texts[DIRECT_HTML_BODY]);
	m->channel = direct_text(&texts[DIRECT_CHANNEL]);
	m->attempts = 1;
	m->event_id = event_id;
	m->rule_id = rule_id;
	m->has_attachments = has_attachments;
	direct_list = lappend(direct_list, m);
	MemoryContextSwitchTo(old);
}

/* sender_direct_pending: messages the committed fan-out left for this worker's next send round. */
int
sender_direct_pending(void)
{
	return direct_ready ? list_length(direct_list) : 0;
}

/* sender_direct_ready: the fan-out committed: its claims are the next send round's. */
void
sender_direct_ready(void)
{
	direct_ready = true;
}

/*
 * claim_probes: for each failing channel whose probe is due and that this
 * worker takes, the one held message that probes it; they go first.
 */
static List *
claim_probes(void)
{
	List	   *probes = NIL;
	ListCell   *lc;
	List	   *channels = health_take_probes();

	foreach(lc, channels)
	{
		char	   *channel = (char *) lfirst(lc);
		Datum		args[3] = {CStringGetTextDatum(channel), Int32GetDatum(notify_lease),
		Int32GetDatum(notify_worker_slot)};
		uint64		n = notify_run_plan(probe_claim_plan, args, NULL, false, 0,
										SPI_OK_UPDATE_RETURNING, "claiming a channel's probe");
		List	   *rows = claimed_rows(n);

		SPI_freetuptable(SPI_tuptable);
		if (rows == NIL)
			health_nothing_to_probe(channel);
		else
			((ClaimedMessage *) linitial(rows))->probe = true;
		probes = list_concat(probes, rows);
	}
	return probes;
}

/*
 * retry_delay: seconds before the next try, doubling from
 * notify.retry_backoff, capped at an hour, with up to 25% jitter so that
 * a queue that failed together does not retry together.
 */
static double
retry_delay(int attempts)
{
	double		delay = notify_retry_backoff;

	for (int i = 1; i < attempts && delay < 3600; i++)
		delay *= 2;
	delay = Min(delay, 3600);
	delay *= 1.0 + 0.25 * pg_prng_double(&pg_global_prng_state);
	/* fractional seconds: truncating would make a queue that failed together retry together */
	return Min(delay, 3600.0);
}

/* An array-valued statement argument being filled, one element per message. */
typedef struct ArrayArg
{
	Oid			elemtype;
	int			n;
	Datum	   *values;
	bool	   *nulls;
} ArrayArg;

static void
array_arg_init(ArrayArg *a, Oid elemtype, int size)
{
	a->elemtype = elemtype;
	a->n = 0;
	a->values = palloc(sizeof(Datum) * size);
	a->nulls = palloc(sizeof(bool) * size);
}

static void
array_arg_add(ArrayArg *a, Datum value, bool isnull)
{
	a->values[a->n] = value;
	a->nulls[a->n] = isnull;
	a->n++;
}

/* array_arg_add_text: a text element; NULL for an empty string. */
static void
array_arg_add_text(ArrayArg *a, const char *s)
{
	array_arg_add(a, s[0] ? CStringGetTextDatum(s) : (Datum) 0, s[0] == '\0');
}

static Datum
array_arg_datum(ArrayArg *a)
{
	return notify_array(a->values, a->nulls, a->n, a->elemtype);
}

/*
 * record_results: status, log and one attempt row per message, in one
 * transaction: two statements for the whole batch.
 */
static void
record_results(List *claimed)
{
	ListCell   *lc;
	int			size = list_length(claimed);
	ArrayArg	r[RECORD_NARGS - 1];
	Datum		args[RECORD_NARGS];
	int			nsent = 0;

	array_arg_init(&r[0], INT8OID, size);	/* id */
	array_arg_init(&r[1], TEXTOID, size);	/* status */
	array_arg_init(&r[2], TEXTOID, size);	/* error */
	array_arg_init(&r[3], TEXTOID, size);	/* response */
	array_arg_init(&r[4], FLOAT8OID, size); /* delay */
	array_arg_init(&r[5], INT4OID, size);	/* attempts */
	array_arg_init(&r[6], TIMESTAMPTZOID, size);	/* started_at */
	array_arg_init(&r[7], TIMESTAMPTZOID, size);	/* finished_at */
	array_arg_init(&r[8], TEXTOID, size);	/* outcome */
	array_arg_init(&r[9], INT4OID, size);	/* smtp_code */
	array_arg_init(&r[10], TEXTOID, size);	/* the attempt's response */

	foreach(lc, claimed)
	{
		ClaimedMessage *m = (ClaimedMessage *) lfirst(lc);
		const char *status;
		const char *outcome;

		if (!m->tried || m->recorded)
			continue;
		m->recorded = true;

		if (m->defer_until != 0)
		{
			Datum		d[3] = {Int64GetDatum(m->out.id), TimestampTzGetDatum(m->defer_until),
			Int32GetDatum(m->attempts)};

			notify_run_plan(defer_plan, d, NULL, false, 0, SPI_OK_UPDATE,
							"putting a message held back by its channel's rate back in the queue");
			continue;
		}

		/*
		 * A message held because its channel fails, or whose try failed for
		 * the channel's reasons, goes back to the queue with its attempt
		 * given back; only a try that reached the channel leaves a row.
		 */
		if (m->hold)
			status = "hold", outcome = "";
		else
			switch (m->result.outcome)
			{
				case SEND_SENT:
					status = outcome = "sent";
					nsent++;
					break;
				case SEND_FAILED:
					status = outcome = "failed";
					break;
				case SEND_UNKNOWN:
					status = "hold";
					outcome = "unknown";
					break;
				case SEND_CHANNEL:
					status = "hold";
					outcome = "channel";
					break;
				default:
					status = outcome = "retry";
					break;
			}
		array_arg_add(&r[0], Int64GetDatum(m->out.id), false);
		array_arg_add_text(&r[1], status);
		array_arg_add_text(&r[2], m->result.error);
		array_arg_add_text(&r[3], m->result.response);
		array_arg_add(&r[4], Float8GetDatum(retry_delay(m->attempts)), false);
		array_arg_add(&r[5], Int32GetDatum(m->attempts), false);
		array_arg_add(&r[6], TimestampTzGetDatum(m->started), false);
		array_arg_add(&r[7], TimestampTzGetDatum(m->finished), false);
		array_arg_add_text(&r[8], outcome);
		array_arg_add(&r[9], Int32GetDatum(m->result.code), m->result.code <= 0);
		/* what went wrong (it quotes the server) or, when all went well, the reply */
		array_arg_add_text(&r[10], m->result.error[0] ? m->result.error : m->result.response);
	}
	if (r[0].n == 0)
		return;
	notify_count_sent(nsent);

	for (int i = 0; i < RECORD_NARGS - 1; i++)
		args[i] = array_arg_datum(&r[i]);
	args[RECORD_NARGS - 1] = Int32GetDatum(notify_max_attempts);
	/*
	 * Through notify_run_plan, planned for the primary key: left to the
	 * plan cache, a plan made on a fresh queue's statistics joined the
	 * outcomes to notify.message by hashing the whole table, for every
	 * 16 messages (36% of the workers' time in test/bench/delivery.py).
	 */
	notify_run_plan(record_plan, args, NULL, false, 0, SPI_OK_INSERT, "recording the outcome of messages");
	if (SPI_processed != (uint64) r[0].n)
		ereport(LOG,
				(errmsg("notify_ext: the outcome of %d of %d messages was not recorded: they were no longer this worker's",
						r[0].n - (int) SPI_processed, r[0].n),
				 errdetail("Their lease ran out (notify.lease) while they were being sent, and they went back to the queue; the next claim sends them again.")));
}

/* load_attachments: the files of a claimed message, copied for use after commit. */
static void
load_attachments(ClaimedMessage *m)
{
	Datum		args[2] = {Int64GetDatum(m->event_id), Int64GetDatum(m->rule_id)};
	uint64		n = notify_run_plan(attachments_plan, args, NULL, true, 0, SPI_OK_SELECT,
									"reading attachments");

	m->out.nattachments = (int) n;
	m->out.attachments = palloc0(sizeof(OutAttachment) * Max(n, 1));
	for (uint64 i = 0; i < n; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		bytea	   *content;

		m->out.attachments[i].filename = SPI_getvalue(tup, desc, 1);
		m->out.attachments[i].content_type = SPI_getvalue(tup, desc, 2);
		content = DatumGetByteaPCopy(SPI_getbinval(tup, desc, 3, &isnull));
		m->out.attachments[i].data = VARDATA(content);
		m->out.attachments[i].len = VARSIZE(content) - VARHDRSZ;
	}
	SPI_freetuptable(SPI_tuptable);
}

/*
 * How many sent messages may wait for their outcome to be committed.  A
 * crash (SIGKILL, power loss) between a server's 250 and that commit sends
 * them again; one commit per RECORD_EVERY messages costs little next to
 * the SMTP exchanges themselves.
 */
#define RECORD_EVERY 16

/*
 * renew_leases: the messages of the batch still in our hands (in flight
 * or waiting for a free connection) keep their lease while we live; a
 * dead worker stops renewing, and its messages return to the queue.
 */
static void
renew_leases(List *claimed)
{
	ListCell   *lc;
	Datum	   *ids = palloc(sizeof(Datum) * Max(list_length(claimed), 1));
	int			n = 0;
	Datum		args[2];

	foreach(lc, claimed)
	{
		ClaimedMessage *m = (ClaimedMessage *) lfirst(lc);

		if (!m->recorded)
			ids[n++] = Int64GetDatum(m->out.id);
	}
	if (n == 0)
		return;
	args[0] = PointerGetDatum(construct_array(ids, n, INT8OID, sizeof(int64), true, TYPALIGN_DOUBLE));
	args[1] = Int32GetDatum(notify_lease);
	notify_run_plan(renew_plan, args, NULL, false, 0, SPI_OK_UPDATE, "renewing the lease of messages being sent");
}

/*
 * note_outcome: what a message's outcome says of its channel.  A failure
 * of the channel's makes the rest of the batch's messages of that channel
 * wait (held, not tried); an answer about the message means the channel
 * works.  Recorded in the health table at the next commit.
 */
static void
note_outcome(ClaimedMessage *m)
{
	BatchChannel *bc = m->bc;

	if (bc == NULL || m->hold || m->defer_until != 0)
		return;
	switch (m->result.outcome)
	{
		case SEND_CHANNEL:
		case SEND_UNKNOWN:
			bc->failing = true;
			if (bc->failure == NULL)
			{
				bc->failure = pstrdup(m->result.error);
				bc->failure_by_probe = m->probe;
			}
			bc->last_event = "failed";
			break;
		default:
			if (m->cfg == NULL && m->hook == NULL)
				break;			/* no channel: nothing said about one */
			bc->failing = false;
			bc->answered = true;
			bc->last_event = "answered";
			break;
	}
}

/*
 * record_health: the batch's channels' failures (failures true) or
 * recoveries (false) since the last commit, in the caller's transaction;
 * true when a channel works again (its held messages are due now).
 *
 * Failures are recorded before the messages, recoveries after: a message
 * held in the same transaction then finds its channel failing, and one
 * released finds itself among those made due.  Messages this batch held
 * without trying (its channel was failing when claimed) are recorded under
 * a share lock on their channel's health row (hold_lock_plan), so that a
 * recovery committed meanwhile by another worker, which takes that row
 * for update, is seen: they are then due at once instead of held for a
 * channel that works.
 */
static bool
record_health(bool failures)
{
	ListCell   *lc;
	bool		recovered = false;

	foreach(lc, batch_channels)
	{
		BatchChannel *bc = (BatchChannel *) lfirst(lc);

		if (bc->last_event == NULL)
			continue;
		if (strcmp(bc->last_event, "failed") == 0)
		{
			if (!failures)
				continue;
			health_channel_failed(bc->name, bc->failure, bc->failure_by_probe);
		}
		else
		{
			if (failures)
				continue;
			if (health_channel_works(bc->name))
				recovered = true;
		}
		bc->last_event = NULL;
		bc->failure = NULL;
		bc->answered = false;
	}
	return recovered;
}

/* lock_held_channels: the health rows of the channels whose messages this batch holds. */
static void
lock_held_channels(List *claimed)
{
	ListCell   *lc;
	Datum	   *names = palloc(sizeof(Datum) * Max(list_length(claimed), 1));
	int			n = 0;
	Datum		arg;

	foreach(lc, claimed)
	{
		ClaimedMessage *m = (ClaimedMessage *) lfirst(lc);

		if (m->hold && m->tried && !m->recorded)
			names[n++] = CStringGetTextDatum(m->channel);
	}
	if (n == 0)
		return;
	arg = PointerGetDatum(construct_array(names, n, TEXTOID, -1, false, TYPALIGN_INT));
	notify_run_plan(hold_lock_plan, &arg, NULL, false, 0, SPI_OK_SELECT, "locking held channels");
}

/*
 * commit_results: record, in a transaction of their own, the outcomes not
 * yet recorded, and renew the leases of the rest when asked.  Interrupts
 * are held: what was sent must be recorded even if a SIGTERM arrived
 * meanwhile, or a restart would send it again.
 */
static void
commit_results(List *claimed, MemoryContext batch, bool renew)
{
	bool		recovered;

	HOLD_INTERRUPTS();
	notify_begin_work("notify_ext: recording results");
	MemoryContextSwitchTo(batch);
	record_health(true);
	lock_held_channels(claimed);
	record_results(claimed);
	recovered = record_health(false);
	if (renew)
		renew_leases(claimed);
	MemoryContextSwitchTo(batch);
	notify_end_work();
	health_log_transitions(false);
	/* a channel that works again: what it held is for every worker to send */
	if (recovered)
		notify_wake_worker();
	RESUME_INTERRUPTS();
	MemoryContextSwitchTo(batch);
}

/* batch_channel: a channel's settings, looked up once per batch. */
static BatchChannel *
batch_channel(List **channels, const char *name)
{
	ListCell   *lc;
	BatchChannel *bc;
	SmtpConfig *cfg = palloc0(sizeof(SmtpConfig));
	WebhookConfig *hook = palloc0(sizeof(WebhookConfig));
	char	   *kind = NULL;

	foreach(lc, *channels)
	{
		bc = (BatchChannel *) lfirst(lc);
		if (strcmp(bc->name, name) == 0)
			return bc;
	}
	bc = palloc0(sizeof(BatchChannel));
	bc->name = pstrdup(name);
	if (load_channel(name, cfg, hook, &kind, &bc->failing))
	{
		if (strcmp(kind, "smtp") == 0)
			bc->cfg = cfg;
		else if (strcmp(kind, "webhook") == 0)
			bc->hook = hook;
	}
	*channels = lappend(*channels, bc);
	batch_channels = *channels;
	return bc;
}

/*
 * start_message: put one claimed message in flight, or settle it at once
 * (unusable channel, held back by the rate limit, invalid before sending,
 * or a webhook's request, which is made here and now).  Returns true when
 * it is in flight.
 */
static bool
start_message(ClaimedMessage *m)
{
	TimestampTz until = 0;
	int			rate = m->cfg ? m->cfg->rate_per_minute : m->hook ? m->hook->rate_per_minute : 0;

	m->started = GetCurrentTimestamp();
	if (m->bc != NULL && m->bc->failing && !m->probe)
	{
		/* its channel fails: it waits for the probe, no attempt spent, nothing tried */
		m->hold = true;
	}
	else if (m->cfg == NULL && m->hook == NULL)
	{
		/* the channel's settings are missing, not the message's: it waits for them */
		m->result.outcome = SEND_RETRY;
		snprintf(m->result.error, sizeof(m->result.error),
				 "channel \"%s\" does not exist", m->channel);
	}
	else if (rate > 0 && !notify_rate_admit(m->channel, rate, m->started, &until))
		m->defer_until = until;
	else if (m->hook != NULL)
	{
		webhook_send(m->hook, &m->out, &m->result);
		if (m->result.aborted)
			return false;		/* the worker stops: left to reclaim_orphans, as above */
	}
	else if (smtp_pool_start(pool, m->cfg, &m->out, &m->result, m->out.id))
	{
		notify_set_worker_message(m->out.id, m->channel);
		return true;
	}
	m->finished = GetCurrentTimestamp();
	m->tried = true;
	note_outcome(m);
	return false;
}

/*
 * send_due_messages: one claim-send-record round.  Returns how many
 * messages were claimed; *next_due_ms is set to when the next queued
 * message falls due (-1 when none), so the worker sleeps no longer.
 * Called outside any transaction; memory is the caller's to reset.
 *
 * One message is in flight at a time per worker (notify.workers workers
 * send in parallel); outcomes are committed every RECORD_EVERY messages,
 * and leases of what is still in our hands renewed every third of
 * notify.lease.
 */
int
send_due_messages(int batch_size, long *next_due_ms)
{
	List	   *claimed;
	List	   *direct = direct_ready ? direct_list : NIL;
	List	   *channels = NIL;
	ListCell   *lc;
	ListCell   *next;
	int			unrecorded = 0;
	MemoryContext batch = CurrentMemoryContext;
	bool		isnull;
	Datum		due;
	TimestampTz last_renew;

	*next_due_ms = -1;

	if (pool == NULL)
		pool = smtp_pool_create();

	notify_begin_work("notify_ext: claiming messages");
	prepare_plans();
	MemoryContextSwitchTo(batch);
	batch_channels = NIL;
	/* what the fan-out just claimed goes first; the queue fills the batch up */
	direct_list = NIL;
	direct_ready = false;
	claimed = list_concat(claim_probes(), direct);
	if (list_length(direct) < batch_size)
		claimed = list_concat(claimed, claim_messages(batch_size - list_length(direct)));
	notify_refresh_snapshot();	/* a channel set up just before its messages were queued */
	foreach(lc, claimed)
	{
		ClaimedMessage *m = (ClaimedMessage *) lfirst(lc);
		BatchChannel *bc;

		MemoryContextSwitchTo(batch);
		bc = batch_channel(&channels, m->channel);
		m->bc = bc;
		m->cfg = bc->cfg;
		m->hook = bc->hook;
		if (m->has_attachments)
			load_attachments(m);
	}
	MemoryContextSwitchTo(batch);
	notify_end_work();
	MemoryContextSwitchTo(batch);
	last_renew = GetCurrentTimestamp();

	if (claimed != NIL)
	{
		notify_set_worker_state("sending");
		pgstat_report_activity(STATE_RUNNING, "notify_ext: sending messages");
		next = list_head(claimed);
		for (;;)
		{
			int64		done_id;
			SendResult	done_result;

			/*
			 * Fill the free connection, or follow the message in flight on
			 * it when its server pipelines (the next envelope then goes with
			 * this data: a round trip per message); a worker asked to stop
			 * starts nothing new.
			 */
			while (next != NULL && !ProcDiePending && !notify_worker_stop_requested() &&
				   (smtp_pool_active(pool) < 1 ||
					(smtp_pool_active(pool) < 2 && ((ClaimedMessage *) lfirst(next))->hook == NULL &&
					 smtp_pool_can_chain(pool, ((ClaimedMessage *) lfirst(next))->cfg))))
			{
				ClaimedMessage *m = (ClaimedMessage *) lfirst(next);

				next = lnext(claimed, next);
				if (!start_message(m))
					unrecorded++;
			}
			if (smtp_pool_active(pool) == 0 &&
				(next == NULL || ProcDiePending || notify_worker_stop_requested()))
				break;

			if (smtp_pool_next_done(pool, 1000, &done_id, &done_result))
			{
				ClaimedMessage *done = claimed_by_id(claimed, done_id);

				done->result = done_result;
				done->finished = GetCurrentTimestamp();
				/*
				 * Cut short because this worker stops: left 'sending', taken back
				 * with an 'unknown' attempt when a worker starts again
				 * (reclaim_orphans); it says nothing of the channel.
				 */
				done->tried = !done_result.aborted;
				if (done->tried)
				{
					note_outcome(done);
					unrecorded++;
				}
			}
			/* a crash resends what is sent but not recorded: keep that window small */
			if (unrecorded >= RECORD_EVERY ||
				TimestampDifferenceExceeds(last_renew, GetCurrentTimestamp(), notify_lease * 1000 / 3))
			{
				bool		renew = TimestampDifferenceExceeds(last_renew, GetCurrentTimestamp(),
															   notify_lease * 1000 / 3);

				commit_results(claimed, batch, renew);
				if (renew)
					last_renew = GetCurrentTimestamp();
				unrecorded = 0;
			}
		}
		/*
		 * Asked to stop (a slot wanted by another database, a DDL, SIGTERM)
		 * with messages claimed but not started: they go back to the
		 * queue, due now, their attempt given back.  Left 'sending', they
		 * waited for their lease to run out (notify.lease, a minute) when no
		 * worker was left in the database to take them back sooner.
		 */
		for (; next != NULL; next = lnext(claimed, next))
		{
			ClaimedMessage *m = (ClaimedMessage *) lfirst(next);

			if (!m->tried)
			{
				m->defer_until = GetCurrentTimestamp();
				m->tried = true;
			}
		}
		commit_results(claimed, batch, false);
		notify_set_worker_state("idle");
	}

	/*
	 * A full batch: the caller claims again at once, so when the next
	 * message falls due does not matter (and finding it reads the queue).
	 */
	if (list_length(claimed) >= batch_size)
		return list_length(claimed);

	notify_begin_work("notify_ext: next due");
	if (notify_run_plan(next_due_plan, NULL, NULL, true, 1, SPI_OK_SELECT, "finding the next due message") == 1)
	{
		due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
		if (!isnull)
		{
			double		secs = DatumGetFloat8(due);

			*next_due_ms = secs <= 0 ? 0 : (long) (secs * 1000.0) + 1;
		}
	}
	notify_end_work();
	MemoryContextSwitchTo(batch);

	return list_length(claimed);
}

PG_FUNCTION_INFO_V1(notify_test_smtp);

/*
 * notify_test_smtp: notify.test_smtp(name, send_to): what happens when the
 * worker talks to this channel's server, step by step, from SQL.
 */
Datum
notify_test_smtp(PG_FUNCTION_ARGS)
{
	MemoryContext fcxt = CurrentMemoryContext;
	char	   *name = PG_ARGISNULL(0) ? "email" : text_to_cstring(PG_GETARG_TEXT_PP(0));
	char	   *send_to = PG_ARGISNULL(1) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(1));
	SmtpConfig	cfg;
	WebhookConfig hook;
	char	   *kind = NULL;
	char	   *report;
	char		errbuf[256];

	if (send_to != NULL && !mime_check_address(send_to, errbuf, sizeof(errbuf)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("notify.test_smtp: send_to: %s", errbuf)));
	memset(&cfg, 0, sizeof(cfg));
	SPI_connect();
	MemoryContextSwitchTo(fcxt);
	prepare_plans();
	if (!load_channel(name, &cfg, &hook, &kind, NULL))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("channel \"%s\" does not exist", name),
				 errhint("Configure it with notify.set_smtp.")));
	if (strcmp(kind, "smtp") != 0)
		ereport(ERROR,
				(errcode(ERRCODE_WRONG_OBJECT_TYPE),
				 errmsg("channel \"%s\" is not an SMTP channel", name)));
	SPI_finish();
	MemoryContextSwitchTo(fcxt);

	smtp_global_init();
	report = smtp_test_connection(&cfg, send_to);
	if (cfg.password)
		explicit_bzero(cfg.password, strlen(cfg.password));
	PG_RETURN_TEXT_P(cstring_to_text(report));
}

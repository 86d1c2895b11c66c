/*-------------------------------------------------------------------------
 *
 * bounce.c
 *	  Did it arrive?  The envelope sender that names each message (VERP),
 *	  the bounce mailbox the workers read, what its reports change, and the
 *	  suppressed addresses fan-out looks up.
 *
 * "sent" means the relay said 250.  A mailbox that no longer exists
 * answers later, with a delivery report to the envelope sender.  Each
 * message goes out from local+m<id>.<tag>@domain (the channel's
 * bounce_address or from_address), so the report names the message even
 * when a relay rewrites headers; the returned Message-ID is the fallback.
 * The reports arrive in an IMAP mailbox (Postfix or the provider delivers
 * the plus-addresses there: see docs/production.md), which a worker reads
 * every notify.bounce_poll_interval, between its rounds and never while it
 * holds messages, and which notify.check_bounces() reads at once.
 *
 * Each mail is examined in a subtransaction of its own (notify_try_subxact):
 * one that cannot be read, or whose processing fails, is recorded as such
 * and the next one is read.  What a mail changes (the message 'bounced',
 * the address suppressed, the notify.bounced event) is written with its
 * row in notify.bounce_mail, whose key (mailbox, UIDVALIDITY, UID) makes
 * sure that it is processed once; the mail is flagged \Seen only after
 * that transaction committed.  A crash in between leaves it unseen and
 * recorded: the next read flags it without processing it again.
 *
 * Reading never stops sending: the IMAP work happens outside any
 * transaction, the worker that reads says so in its state (a commit then
 * wakes an idle worker instead), and a mailbox that cannot be read is
 * tried again at the next interval, quietly (one log line when it starts
 * failing, one when it works again, as channel health does).
 *
 * dsn.c reads the reports and imap.c speaks IMAP; both are plain C.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "common/hashfn.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/lock.h"
#include "utils/builtins.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "dsn.h"
#include "imap.h"
#include "mime.h"
#include "notify_ext.h"
#include "smtp.h"

PG_FUNCTION_INFO_V1(notify_check_bounce_mailbox);
PG_FUNCTION_INFO_V1(notify_check_bounces);

/* Mails fetched and then processed in one transaction, and their bytes at most. */
#define BOUNCE_BATCH_MAILS 25
#define BOUNCE_BATCH_BYTES (16 * 1024 * 1024)
/* Mails one read of a mailbox examines at most; the rest wait for the next (soon). */
#define BOUNCE_MAX_PER_READ 500
/*
 * A worker that takes a mailbox pushes its next read this far (beyond the
 * interval) first: the other workers leave it alone while this one reads,
 * however long the server takes (a silent server holds a read for the
 * connect timeout); the read's end sets the real next one.  A worker that
 * dies in the middle leaves the mailbox to the others after this.
 */
#define BOUNCE_READ_LEASE_S 600
/* A worker looks for a due mailbox at most this often (a new mailbox is read within it). */
#define BOUNCE_RECHECK_MS 1000
/* The longest text kept of a diagnostic, a header or an error. */
#define BOUNCE_TEXT_MAX 1000

/* A bounce mailbox, as the reader needs it (palloc'd). */
typedef struct Mailbox
{
	char	   *channel;
	char	   *url;
	char	   *username;
	char	   *password;
	char	   *tls;
	bool		leave_unseen;
	char	   *identity;		/* url and user: the same mailbox whichever channel names it */
} Mailbox;

/* One mail of the mailbox, and what became of it. */
typedef struct BounceMail
{
	uint32		uid;
	char	   *raw;			/* NULL when it could not be fetched */
	size_t		len;
	char	   *fetch_error;	/* why it could not */
	bool		recorded;		/* examined now (a new row in notify.bounce_mail) */
	bool		flag_seen;		/* to be flagged \Seen after the commit */
	char	   *log_line;		/* a bounce or complaint: said after the commit */
} BounceMail;

/* A permanent failure or a complaint, as recorded. */
typedef struct Verdict
{
	const char *kind;			/* bounce_mail.kind */
	const char *format;
	int64		message_id;		/* 0: none */
	const char *matched_by;
	const char *action;
	char	   *address;
	char	   *status;
	char	   *diagnostic;		/* what the remote MTA said, as reported */
	char	   *last_error;		/* bounced: the message's last_error (bounce_text) */
	char	   *note;
	char	   *from_header;
	char	   *subject;
} Verdict;

static SPIPlanPtr message_plan = NULL;
static SPIPlanPtr record_plan = NULL;
static SPIPlanPtr bounce_plan = NULL;
static SPIPlanPtr suppress_plan = NULL;
static SPIPlanPtr complained_plan = NULL;
static SPIPlanPtr event_plan = NULL;
static SPIPlanPtr known_plan = NULL;
static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr next_plan = NULL;
static SPIPlanPtr failed_plan = NULL;
static SPIPlanPtr works_plan = NULL;
static SPIPlanPtr lock_plan = NULL;
static SPIPlanPtr exists_plan = NULL;
static SPIPlanPtr suppressed_plan = NULL;

#define RECORD_NARGS 16

/* prepare_plans: the bounce reader's statements. */
static void
prepare_plans(void)
{
	Oid			int8_t[1] = {INT8OID};
	Oid			text_t[1] = {TEXTOID};

	/* the last one prepared: a failure half-way prepares again next time */
	if (lock_plan != NULL)
		return;

	message_plan = notify_keep_plan(
							 "SELECT m.address, m.status FROM notify.message m WHERE m.id = $1",
							 1, int8_t);
	record_plan = notify_keep_plan(
							"INSERT INTO notify.bounce_mail (channel, mailbox, uidvalidity, uid, from_header, subject,"
							"       kind, format, message_id, matched_by, action, address, status, diagnostic, note, seen)"
							" VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
							" ON CONFLICT (mailbox, uidvalidity, uid) DO NOTHING RETURNING id",
							RECORD_NARGS,
							(Oid[]) {TEXTOID, TEXTOID, INT8OID, INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID,
							INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, BOOLOID});
	/* sent -> bounced, the contract's only transition; another status is left as it is */
	bounce_plan = notify_keep_plan(
							"UPDATE notify.message m SET status = 'bounced', last_error = $2"
							" WHERE m.id = $1 AND m.status = 'sent'",
							2, (Oid[]) {INT8OID, TEXTOID});
	/* the first reason stays: since, and the message it names, are when it started */
	suppress_plan = notify_keep_plan(
							  "INSERT INTO notify.suppression (address, reason, status, diagnostic, message_id, channel)"
							  " VALUES ($1, $2, $3, $4, $5, $6)"
							  " ON CONFLICT ((pg_catalog.lower(address))) DO NOTHING",
							  6, (Oid[]) {TEXTOID, TEXTOID, TEXTOID, TEXTOID, INT8OID, TEXTOID});
	complained_plan = notify_keep_plan(
								"SELECT 1 FROM notify.bounce_mail b WHERE b.message_id = $1 AND b.action = 'complaint'",
								1, int8_t);

	/*
	 * The event rules route ("tell the salesperson that the customer's
	 * address bounced"): what the message was (its event type, rule,
	 * recipient, subject, event), what the report said, and as actor the
	 * original event's actor, so that a rule's 'actor' spec reaches whoever
	 * caused it.
	 */
	event_plan = notify_keep_plan(
						   "INSERT INTO notify.event (event_type, op, actor, row)"
						   " SELECT 'notify.bounced', 'EMIT', e.actor, pg_catalog.jsonb_build_object("
						   "   'address', m.address, 'message_id', m.id, 'event_type', m.event_type,"
						   "   'rule', m.rule_name, 'recipient_key', m.recipient_key, 'status', $2,"
						   "   'diagnostic', $3, 'reason', $4, 'channel', m.channel, 'subject', m.subject,"
						   "   'event_id', m.event_id, 'actor', e.actor, 'sent_at', m.sent_at,"
						   "   'bounced_at', pg_catalog.now(), 'remote_mta', $5, 'reporting_mta', $6)"
						   "  FROM notify.message m LEFT JOIN notify.event e ON e.id = m.event_id"
						   " WHERE m.id = $1",
						   6, (Oid[]) {INT8OID, TEXTOID, TEXTOID, TEXTOID, TEXTOID, TEXTOID});
	known_plan = notify_keep_plan(
						   "SELECT b.uid, b.seen FROM notify.bounce_mail b"
						   " WHERE b.mailbox = $1 AND b.uidvalidity = $2 AND b.uid = ANY ($3)",
						   3, (Oid[]) {TEXTOID, INT8OID, INT8ARRAYOID});

	/*
	 * A worker takes one due mailbox: its next read is pushed by the
	 * interval and BOUNCE_READ_LEASE_S first, so that the other workers
	 * leave it alone while it is read (two readers at once would still
	 * process each mail once, by bounce_mail's key, but both would be held
	 * by a server that does not answer).
	 */
	claim_plan = notify_keep_plan(
						   "UPDATE notify.bounce_mailbox b"
						   "   SET next_check_at = pg_catalog.now() + pg_catalog.make_interval(secs => $1)"
						   " WHERE b.channel = (SELECT x.channel FROM notify.bounce_mailbox x"
						   "                     WHERE x.next_check_at <= pg_catalog.now()"
						   "                     ORDER BY x.next_check_at LIMIT 1 FOR UPDATE SKIP LOCKED)"
						   " RETURNING b.channel, b.url, b.username,"
						   "   (SELECT s.password FROM notify.bounce_mailbox_secret s WHERE s.channel = b.channel),"
						   "   b.tls, b.leave_unseen",
						   1, (Oid[]) {FLOAT8OID});
	next_plan = notify_keep_plan(
						  "SELECT pg_catalog.date_part('epoch', pg_catalog.min(b.next_check_at) - pg_catalog.now())"
						  "  FROM notify.bounce_mailbox b",
						  0, NULL);

	/*
	 * The mailbox could (not) be read, and its next read is due in $2
	 * seconds (the interval; 0 when more mail waits).  The row is locked
	 * first, in the subquery, so that the state it had is read under the
	 * lock (of two readers, one logs the transition).  A worker never
	 * waits for a row a session holds (check_bounces in an open
	 * transaction, set_bounce_mailbox): it leaves the state to that
	 * session.
	 */
	failed_plan = notify_keep_plan(
							"UPDATE notify.bounce_mailbox b SET state = 'failing', last_error = $3,"
							"       failing_since = CASE WHEN old.state = 'ok' THEN pg_catalog.now() ELSE b.failing_since END,"
							"       last_checked_at = pg_catalog.now(),"
							"       next_check_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2)"
							"  FROM (SELECT x.state FROM notify.bounce_mailbox x WHERE x.channel = $1 FOR UPDATE SKIP LOCKED) old"
							" WHERE b.channel = $1 RETURNING old.state",
							3, (Oid[]) {TEXTOID, FLOAT8OID, TEXTOID});
	works_plan = notify_keep_plan(
						   "UPDATE notify.bounce_mailbox b SET state = 'ok', last_error = NULL, failing_since = NULL,"
						   "       last_checked_at = pg_catalog.now(),"
						   "       next_check_at = pg_catalog.now() + pg_catalog.make_interval(secs => $2)"
						   "  FROM (SELECT x.state, x.failing_since FROM notify.bounce_mailbox x"
						   "         WHERE x.channel = $1 FOR UPDATE SKIP LOCKED) old"
						   " WHERE b.channel = $1"
						   " RETURNING old.state, pg_catalog.date_part('epoch', pg_catalog.now() - old.failing_since)",
						   2, (Oid[]) {TEXTOID, FLOAT8OID});
	lock_plan = notify_keep_plan(
						  "SELECT b.channel, b.url, b.username, s.password, b.tls, b.leave_unseen"
						  "  FROM notify.bounce_mailbox b"
						  "  LEFT JOIN notify.bounce_mailbox_secret s ON s.channel = b.channel"
						  " WHERE $1::text IS NULL OR b.channel = $1"
						  " ORDER BY b.channel FOR UPDATE OF b",
						  1, text_t);
}

/*
 * notify_verp_tag: this database's tag in VERP tokens, its identity token
 * (identity.c: 12 hex digits, kept through a dump and restore, changed by
 * notify.adopt_copy()).  A bounce is taken as one of ours only when its
 * token carries this tag, so that a copy of the database (or another
 * database sharing the mailbox) never marks our messages, nor we theirs.
 * Empty only for a schema older than 0.3 (nothing is then matched by tag).
 */
const char *
notify_verp_tag(void)
{
	return notify_database_token();
}

/*
 * bounce_envelope_sender: the MAIL FROM of a message: base (the channel's
 * bounce_address, else its from_address) with "+m<id>.<tag>" added to its
 * local part, or "+test.<tag>" for a test_smtp mail.  Only the envelope:
 * the From: header stays the from_address.  A base that cannot carry a
 * token (a quoted local part, one that holds a '+' already, or one that
 * would grow past RFC 5321's 64 octets) is used as it is: its bounces are
 * matched by their returned Message-ID.
 */
char *
bounce_envelope_sender(const char *base, long long message_id, bool test)
{
	const char *at = strrchr(base, '@');
	char		detail[64];
	char	   *verp;

	if (at == NULL || at == base || base[0] == '"' || memchr(base, '+', at - base) != NULL)
		return pstrdup(base);
	if (test)
		snprintf(detail, sizeof(detail), "test.%s", notify_verp_tag());
	else
		snprintf(detail, sizeof(detail), "m%lld.%s", message_id, notify_verp_tag());
	if ((size_t) (at - base) + 1 + strlen(detail) > 64)
		return pstrdup(base);
	verp = psprintf("%.*s+%s%s", (int) (at - base), base, detail, at);
	if (!mime_check_address(verp, NULL, 0))
		return pstrdup(base);
	return verp;
}

/* notify_check_bounce_mailbox: notify._check_bounce_mailbox(url, tls): refuse what the reader would. */
Datum
notify_check_bounce_mailbox(PG_FUNCTION_ARGS)
{
	char		err[256];
	char	   *url;
	char	   *tls = PG_ARGISNULL(1) ? "verify" : text_to_cstring(PG_GETARG_TEXT_PP(1));

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("the bounce mailbox's URL must not be null"),
				 errhint("For example imaps://imap.example.com/INBOX.")));
	url = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!imap_url_valid(url, err, sizeof(err)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid bounce mailbox URL: %s", err),
				 errhint("Only imap://host[:port][/MAILBOX] and imaps://host[:port][/MAILBOX] are accepted, without credentials: pass them as arguments.")));
	if (pg_strncasecmp(url, "imaps:", 6) == 0 && strcmp(tls, "off") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("tls 'off' cannot be used with an imaps:// URL"),
				 errhint("imaps:// is TLS from the first byte: use 'verify' (or 'require').")));
	PG_RETURN_VOID();
}

/* -- reading the mails -------------------------------------------------------- */

/*
 * header_value: the value of the first header `name` of a raw mail,
 * unfolded and made storable (one line, valid text, clipped), or NULL.
 * For the operator's view of what arrived: not decoded (RFC 2047 words
 * stay as they are).
 */
static char *
header_value(const char *raw, size_t len, const char *name)
{
	size_t		nlen = strlen(name);
	size_t		i = 0;

	while (i < len)
	{
		size_t		eol = i;

		while (eol < len && raw[eol] != '\n')
			eol++;
		/* an empty line ends the header */
		if (eol == i || (eol == i + 1 && raw[i] == '\r'))
			return NULL;
		if (eol - i > nlen && raw[i + nlen] == ':' && pg_strncasecmp(raw + i, name, nlen) == 0)
		{
			size_t		start = i + nlen + 1;
			size_t		end = eol;
			char	   *clean;
			char	   *p;
			char	   *q;

			/* continuation lines start with white space */
			while (end + 1 < len && (raw[end + 1] == ' ' || raw[end + 1] == '\t'))
			{
				end++;
				while (end < len && raw[end] != '\n')
					end++;
			}
			clean = notify_clean_text(raw + start, end - start, BOUNCE_TEXT_MAX);
			/* runs of spaces (what folding left) become one; trimmed */
			for (p = q = clean; *p; p++)
				if (!(*p == ' ' && (q == clean || q[-1] == ' ')))
					*q++ = *p;
			while (q > clean && q[-1] == ' ')
				q--;
			*q = '\0';
			return clean[0] ? clean : NULL;
		}
		i = eol + 1;
	}
	return NULL;
}

/* dup_or_null: a palloc'd copy of a report's string (they are valid, clipped text). */
static char *
dup_or_null(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/*
 * message_id_of: the message a returned Message-ID names: its id, or 0.
 * The form is <notify.message.TOKEN.ID@domain>, TOKEN this database's
 * (smtp.c); a token of another database names no message of ours.  The
 * form of 0.2, <notify.message.ID@domain>, without a token, is taken too
 * (a report about a mail sent before the update).
 */
static int64
message_id_of(const char *mid)
{
	const char *prefix = "<notify.message.";
	const char *p;
	const char *at;
	const char *dot;
	int64		id = 0;
	int			digits = 0;

	if (mid == NULL || pg_strncasecmp(mid, prefix, strlen(prefix)) != 0)
		return 0;
	p = mid + strlen(prefix);
	at = strchr(p, '@');
	dot = strchr(p, '.');
	if (at == NULL)
		return 0;
	if (dot != NULL && dot < at)
	{
		/* TOKEN.ID@: the token must be ours */
		const char *tag = notify_verp_tag();
		size_t		taglen = strlen(tag);

		if (taglen == 0 || pg_strncasecmp(p, tag, taglen) != 0 || p[taglen] != '.')
			return 0;
		p += taglen + 1;
	}
	for (; isdigit((unsigned char) *p) && digits < 18; p++, digits++)
		id = id * 10 + (*p - '0');
	if (digits == 0)
		return 0;
	return *p == '@' ? id : 0;
}

/* same_address: two addresses, compared without case. */
static bool
same_address(const char *a, const char *b)
{
	return a != NULL && b != NULL && pg_strcasecmp(a, b) == 0;
}

/* clip: s cut to BOUNCE_TEXT_MAX bytes at a character boundary. */
static char *
clip(const char *s)
{
	return s ? notify_clean_text(s, strlen(s), BOUNCE_TEXT_MAX) : NULL;
}

/* recipient_is: whether a report's recipient is this address (final or original). */
static bool
recipient_is(const DsnRecipient *x, const char *address)
{
	return same_address(x->final_recipient, address) || same_address(x->original_recipient, address);
}

/*
 * report_recipient: the recipient of a report a verdict is about: a
 * permanent failure before anything else, the message's own address
 * before another (a forwarding relay may report another), the first
 * otherwise; NULL when the report lists none.
 */
static const DsnRecipient *
report_recipient(const DsnReport *r, const char *address)
{
	const DsnRecipient *best = NULL;
	int			best_score = -1;

	for (int i = 0; i < r->nrecipients; i++)
	{
		const DsnRecipient *x = &r->recipients[i];
		int			score = (dsn_recipient_is_permanent_failure(x) ? 2 : 0) + (recipient_is(x, address) ? 1 : 0);

		if (score > best_score)
		{
			best = x;
			best_score = score;
		}
	}
	return best;
}

/*
 * verdict_of: what a parsed report says, and about which of our messages
 * (looked up here).  Writes nothing.
 */
static void
verdict_of(const DsnReport *r, Verdict *v)
{
	char		token[DSN_VERP_TOKEN_SIZE];
	char		tag[64];
	long long	id = 0;
	char	   *other_tag = NULL;
	bool		test_mail = false;
	char	   *msg_address = NULL;
	char	   *msg_status = NULL;
	const DsnRecipient *rc;
	bool		address_listed = false;

	v->kind = dsn_kind_name(r->kind);
	v->format = r->format != DSN_FORMAT_NONE ? dsn_format_name(r->format) : NULL;

	/*
	 * The VERP token: the first of the report's addresses (best source
	 * first) that carries one of this database; a token with another tag is
	 * someone else's.  Then the returned Message-ID.
	 */
	for (int i = 0; i < r->naddresses && v->message_id == 0; i++)
	{
		if (!dsn_verp_token(r->addresses[i].address, NULL, NULL, token, sizeof(token)))
			continue;
		if (dsn_verp_message(token, &id, tag, sizeof(tag)))
		{
			if (pg_strcasecmp(tag, notify_verp_tag()) == 0)
			{
				v->message_id = id;
				v->matched_by = "verp";
			}
			else if (other_tag == NULL)
				other_tag = pstrdup(tag);
		}
		else if (pg_strncasecmp(token, "test.", 5) == 0 &&
				 pg_strcasecmp(token + 5, notify_verp_tag()) == 0)
			test_mail = true;
	}
	if (v->message_id == 0 && (id = message_id_of(r->returned_message_id)) != 0)
	{
		v->message_id = id;
		v->matched_by = "message-id";
	}

	if (v->message_id != 0)
	{
		Datum		arg = Int64GetDatum(v->message_id);

		if (notify_run_plan(message_plan, &arg, NULL, true, 1, SPI_OK_SELECT, "looking up a bounced message") == 1)
		{
			msg_address = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
			msg_status = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2);
		}
		else
		{
			v->note = psprintf("it names message %lld (by its %s), which does not exist (purged?)",
							   (long long) v->message_id, v->matched_by);
			v->message_id = 0;
		}
	}

	rc = report_recipient(r, msg_address);
	for (int i = 0; i < r->nrecipients; i++)
		address_listed |= recipient_is(&r->recipients[i], msg_address);
	if (rc != NULL)
	{
		v->address = dup_or_null(rc->final_recipient ? rc->final_recipient : rc->original_recipient);
		v->status = rc->status[0] ? pstrdup(rc->status) : NULL;
		v->diagnostic = dup_or_null(rc->diagnostic);
	}

	/*
	 * A match by Message-ID alone is taken only when the report names the
	 * message's own address (a complaint may name none: providers redact
	 * it): a Message-ID is easily quoted, a tagged envelope is not.
	 */
	if (v->message_id != 0 && strcmp(v->matched_by, "message-id") == 0 && !address_listed &&
		(r->kind == DSN_KIND_DELIVERY_STATUS || r->nrecipients > 0))
	{
		v->note = psprintf("its returned Message-ID names message %lld, but not that message's address %s",
						   (long long) v->message_id, msg_address);
		v->message_id = 0;
	}
	/* what is suppressed is the address we send to, whatever a forwarding relay reported */
	if (v->message_id != 0)
		v->address = msg_address;

	switch (r->kind)
	{
		case DSN_KIND_DELIVERY_STATUS:
			if (v->message_id == 0)
			{
				v->action = "unmatched";
				if (v->note == NULL)
					v->note = test_mail ? pstrdup("the report of a notify.test_smtp() test mail")
						: other_tag ? psprintf("its VERP tag %s is another database's (this one's is %s)",
											   other_tag, notify_verp_tag())
						: pstrdup("it names no message of this database (no VERP token, no Message-ID of ours)");
			}
			else if (rc != NULL && dsn_recipient_is_permanent_failure(rc))
			{
				v->action = strcmp(msg_status, "bounced") == 0 ? "duplicate" : "bounced";
				if (strcmp(msg_status, "sent") != 0 && strcmp(msg_status, "bounced") != 0)
					v->note = psprintf("message %lld is %s: its status is left as it is; the address is suppressed",
									   (long long) v->message_id, msg_status);
			}
			else
			{
				v->action = "delayed";
				if (rc != NULL && rc->action == DSN_ACTION_FAILED)
					v->note = psprintf("failed with the temporary status %s (a relay gave up retrying): "
									   "nothing changes", rc->status[0] ? rc->status : "(none)");
				else
					v->note = psprintf("%s%s%s: nothing changes",
									   rc ? dsn_action_name(rc->action) : "no action",
									   rc && rc->status[0] ? " " : "", rc ? rc->status : "");
			}
			break;
		case DSN_KIND_COMPLAINT:
			v->status = dup_or_null(r->feedback_type);
			if (v->message_id == 0)
			{
				v->action = "unmatched";
				if (v->note == NULL)
					v->note = pstrdup("a complaint about no message of this database");
			}
			else if (r->feedback_type != NULL &&
					 (strcmp(r->feedback_type, "abuse") == 0 || strcmp(r->feedback_type, "fraud") == 0))
				v->action = "complaint";
			else
			{
				v->action = "ignored";
				v->note = psprintf("a feedback report of type %s: only abuse and fraud suppress the address",
								   r->feedback_type ? r->feedback_type : "(none)");
			}
			break;
		case DSN_KIND_MALFORMED:
			v->action = "ignored";
			v->note = psprintf("a report that cannot be read: %s", r->error ? r->error : "malformed");
			break;
		default:
			v->action = "ignored";
			v->note = pstrdup(v->message_id != 0
							  ? "not a delivery report (an auto-reply, or a person's answer) about this message"
							  : "not a delivery report: an auto-reply, spam or a person's mail");
			break;
	}
}

/*
 * bounce_text: a bounced message's last_error, so that it is clear it
 * came from a bounce: who reported it, the status, the remote MTA and
 * what it said.
 */
static char *
bounce_text(const DsnReport *r, const Verdict *v)
{
	const DsnRecipient *rc = report_recipient(r, v->address);
	StringInfoData s;

	initStringInfo(&s);
	appendStringInfo(&s, "bounce report%s%s: %s failed", r->reporting_mta ? " from " : "",
					 r->reporting_mta ? r->reporting_mta : "", v->status ? v->status : "");
	if (rc != NULL && rc->remote_mta != NULL)
		appendStringInfo(&s, "; %s said", rc->remote_mta);
	if (v->diagnostic != NULL)
		appendStringInfo(&s, ": %s", v->diagnostic);
	return clip(s.data);
}

/* The arguments of examine_mail, in and out. */
typedef struct ExamineArgs
{
	const Mailbox *mb;
	uint32		uidvalidity;
	BounceMail *mail;
	MemoryContext outer;		/* where what outlives the subtransaction goes */
	const char *error;			/* set: record the mail as an error, with this */
} ExamineArgs;

/* text_arg: a text Datum, or null. */
static void
text_arg(Datum *values, char *nulls, int i, const char *s)
{
	if (s == NULL)
		nulls[i] = 'n';
	else
	{
		values[i] = CStringGetTextDatum(s);
		nulls[i] = ' ';
	}
}

/* record_mail: the mail's row; false when it was recorded before (nothing more to do). */
static bool
record_mail(const ExamineArgs *a, const Verdict *v, bool seen)
{
	Datum		values[RECORD_NARGS];
	char		nulls[RECORD_NARGS];

	memset(nulls, ' ', sizeof(nulls));
	text_arg(values, nulls, 0, a->mb->channel);
	text_arg(values, nulls, 1, a->mb->identity);
	values[2] = Int64GetDatum((int64) a->uidvalidity);
	values[3] = Int64GetDatum((int64) a->mail->uid);
	text_arg(values, nulls, 4, v->from_header);
	text_arg(values, nulls, 5, v->subject);
	text_arg(values, nulls, 6, v->kind);
	text_arg(values, nulls, 7, v->format);
	values[8] = Int64GetDatum(v->message_id);
	nulls[8] = v->message_id != 0 ? ' ' : 'n';
	text_arg(values, nulls, 9, v->message_id != 0 ? v->matched_by : NULL);
	text_arg(values, nulls, 10, v->action);
	text_arg(values, nulls, 11, v->address);
	text_arg(values, nulls, 12, v->status);
	text_arg(values, nulls, 13, clip(v->diagnostic));
	text_arg(values, nulls, 14, clip(v->note));
	values[15] = BoolGetDatum(seen);
	return notify_run_plan(record_plan, values, nulls, false, 0, SPI_OK_INSERT_RETURNING,
						   "recording a bounce mail") == 1;
}

/* emit_bounced: the notify.bounced event of a bounce or complaint. */
static void
emit_bounced(const Verdict *v, const char *reason, const char *remote_mta, const char *reporting_mta)
{
	Datum		values[6];
	char		nulls[6];

	memset(nulls, ' ', sizeof(nulls));
	values[0] = Int64GetDatum(v->message_id);
	text_arg(values, nulls, 1, v->status);
	text_arg(values, nulls, 2, clip(v->diagnostic));
	text_arg(values, nulls, 3, reason);
	text_arg(values, nulls, 4, remote_mta);
	text_arg(values, nulls, 5, reporting_mta);
	notify_run_plan(event_plan, values, nulls, false, 0, SPI_OK_INSERT, "emitting notify.bounced");
	notify_wake_worker_at_commit();
}

/* suppress: the address is not mailed again; true when it was not suppressed yet. */
static bool
suppress(const Verdict *v, const char *reason, const char *channel)
{
	Datum		values[6];
	char		nulls[6];

	memset(nulls, ' ', sizeof(nulls));
	text_arg(values, nulls, 0, v->address);
	text_arg(values, nulls, 1, reason);
	text_arg(values, nulls, 2, v->status);
	text_arg(values, nulls, 3, clip(v->diagnostic));
	values[4] = Int64GetDatum(v->message_id);
	text_arg(values, nulls, 5, channel);
	return notify_run_plan(suppress_plan, values, nulls, false, 0, SPI_OK_INSERT,
						   "suppressing an address") == 1;
}

/*
 * read_report: the verdict on a fetched mail (or, after a failed first
 * try, only what it is), and the MTAs its report names.  dsn.c allocates
 * with malloc: the report is freed on the way out, whatever happens.
 */
static void
read_report(const ExamineArgs *a, Verdict *v, char **remote_mta, char **reporting_mta)
{
	DsnReport	report;

	memset(&report, 0, sizeof(report));
	if (!dsn_parse(a->mail->raw, a->mail->len, &report))
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("out of memory reading a bounce report")));
	PG_TRY();
	{
		if (a->error != NULL)
		{
			v->kind = dsn_kind_name(report.kind);
			v->format = report.format != DSN_FORMAT_NONE ? dsn_format_name(report.format) : NULL;
			v->action = "error";
			v->note = pstrdup(a->error);
		}
		else
		{
			verdict_of(&report, v);
			for (int i = 0; i < report.nrecipients && *remote_mta == NULL; i++)
				*remote_mta = dup_or_null(report.recipients[i].remote_mta);
			*reporting_mta = dup_or_null(report.reporting_mta);
			if (strcmp(v->action, "bounced") == 0 || strcmp(v->action, "duplicate") == 0)
				v->last_error = bounce_text(&report, v);
			else if (strcmp(v->action, "complaint") == 0)
				v->diagnostic = psprintf("%s report%s%s", report.feedback_type,
										 report.reporting_mta ? " from " : "",
										 report.reporting_mta ? report.reporting_mta : "");
		}
	}
	PG_FINALLY();
	{
		dsn_report_free(&report);
	}
	PG_END_TRY();
}

/*
 * examine_mail: one mail, in its own subtransaction: read it, decide,
 * record it and what it changes.  A mail recorded before changes nothing.
 * When a first try failed (a->error), the mail is only recorded, with that
 * error.
 */
static void
examine_mail(void *arg)
{
	ExamineArgs *a = (ExamineArgs *) arg;
	BounceMail *mail = a->mail;
	Verdict		v;
	bool		recognised;
	bool		seen;
	char	   *remote_mta = NULL;
	char	   *reporting_mta = NULL;

	memset(&v, 0, sizeof(v));
	if (mail->raw != NULL)
	{
		v.from_header = header_value(mail->raw, mail->len, "From");
		v.subject = header_value(mail->raw, mail->len, "Subject");
	}
	if (mail->raw == NULL)
	{
		v.kind = "unreadable";
		v.action = a->error ? "error" : "ignored";
		v.note = a->error ? pstrdup(a->error)
			: psprintf("could not be fetched: %s", mail->fetch_error ? mail->fetch_error : "?");
	}
	else
		read_report(a, &v, &remote_mta, &reporting_mta);

	/* flagged \Seen: what was recognised always; the rest unless the mailbox asks to leave it */
	recognised = strcmp(v.action, "bounced") == 0 || strcmp(v.action, "complaint") == 0 ||
		strcmp(v.action, "delayed") == 0 || strcmp(v.action, "duplicate") == 0;
	seen = recognised || !a->mb->leave_unseen;
	if (!record_mail(a, &v, seen))
		return;					/* examined before: by another reader, or before a crash */
	mail->recorded = true;
	mail->flag_seen = seen;

	if (strcmp(v.action, "bounced") == 0)
	{
		Datum		args[2] = {Int64GetDatum(v.message_id), CStringGetTextDatum(v.last_error)};
		bool		now_bounced = notify_run_plan(bounce_plan, args, NULL, false, 0, SPI_OK_UPDATE,
												  "marking a message bounced") == 1;
		bool		newly = suppress(&v, "bounce", a->mb->channel);

		if (now_bounced || newly)
			emit_bounced(&v, "bounce", remote_mta, reporting_mta);
		mail->log_line = MemoryContextStrdup(a->outer,
											 psprintf("notify_ext: message %lld to %s bounced (%s)%s",
													  (long long) v.message_id, v.address,
													  v.status ? v.status : "no status",
													  newly ? "; the address is suppressed" : ""));
	}
	else if (strcmp(v.action, "duplicate") == 0)
		(void) suppress(&v, "bounce", a->mb->channel);
	else if (strcmp(v.action, "complaint") == 0)
	{
		Datum		arg = Int64GetDatum(v.message_id);
		/* this mail's own row is one: more than one is a repeated complaint */
		bool		repeated = notify_run_plan(complained_plan, &arg, NULL, true, 2, SPI_OK_SELECT,
											   "looking for an earlier complaint") > 1;
		bool		newly = suppress(&v, "complaint", a->mb->channel);

		if (!repeated || newly)
			emit_bounced(&v, "complaint", NULL, reporting_mta);
		mail->log_line = MemoryContextStrdup(a->outer,
											 psprintf("notify_ext: %s complaint about message %lld to %s%s",
													  v.status ? v.status : "a", (long long) v.message_id,
													  v.address, newly ? "; the address is suppressed" : ""));
	}
}

/*
 * examine_batch: each fetched mail in a subtransaction of its own, in the
 * caller's transaction (and SPI connection).  A mail whose processing
 * fails is recorded as an error, with the error, and the next one goes
 * on; should even that fail, the mail stays unseen and unrecorded, for the
 * next read.  Returns how many were examined now.
 */
static int
examine_batch(const Mailbox *mb, uint32 uidvalidity, BounceMail *mails, int n)
{
	MemoryContext outer = CurrentMemoryContext;
	MemoryContext work = AllocSetContextCreate(outer, "notify_ext bounce mail", ALLOCSET_DEFAULT_SIZES);
	int			examined = 0;

	prepare_plans();
	for (int i = 0; i < n; i++)
	{
		ExamineArgs a = {mb, uidvalidity, &mails[i], outer, NULL};
		char	   *error;

		CHECK_FOR_INTERRUPTS();
		error = notify_try_subxact(examine_mail, &a, outer, work);
		MemoryContextReset(work);
		if (error != NULL)
		{
			mails[i].recorded = mails[i].flag_seen = false;
			mails[i].log_line = NULL;
			a.error = psprintf("processing failed: %s", error);
			error = notify_try_subxact(examine_mail, &a, outer, work);
			MemoryContextReset(work);
			if (error != NULL)
			{
				ereport(WARNING,
						(errmsg("notify_ext: mail %u of the bounce mailbox of channel \"%s\" could not be recorded: %s",
								mails[i].uid, mb->channel, error)));
				mails[i].recorded = mails[i].flag_seen = false;
			}
		}
		if (mails[i].recorded)
			examined++;
	}
	MemoryContextDelete(work);
	return examined;
}

/* -- the IMAP side -------------------------------------------------------------- */

/* Set when a worker's read passed a commit's wake-up on (once per read). */
static bool wakeup_passed_on = false;

/*
 * imap_abort: polled at least every 100 ms while a session waits for the
 * server.  A stopping worker, or a cancelled check_bounces(), gives up at
 * once.  A worker whose latch a commit set while it reads (every worker
 * was busy, so the commit chose one of them) passes the wake-up on to the
 * others, or has one more started: a server that takes its time must not
 * hold the mail it is woken for.
 */
static int
imap_abort(void *arg)
{
	if (notify_worker_slot >= 0 && !wakeup_passed_on && MyLatch->is_set)
	{
		wakeup_passed_on = true;
		notify_pass_wakeup_on(notify_worker_slot);
	}
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/* open_mailbox: a logged-in session with the mailbox selected, or NULL and err. */
static ImapSession *
open_mailbox(const Mailbox *mb, char *err, size_t errsize)
{
	ImapConfig	cfg;

	memset(&cfg, 0, sizeof(cfg));
	cfg.url = mb->url;
	cfg.username = mb->username;
	cfg.password = mb->password ? mb->password : "";
	cfg.tls = mb->tls;
	cfg.ca_file = notify_tls_ca_file;
	cfg.abort_cb = imap_abort;
	return imap_open(&cfg, err, errsize);
}

/* compare_uids: for bsearch over an ascending UID array. */
static int
compare_uids(const void *a, const void *b)
{
	uint32		x = *(const uint32 *) a;
	uint32		y = *(const uint32 *) b;

	return x < y ? -1 : x > y ? 1 : 0;
}

/*
 * unseen_to_examine: the unseen mails not examined yet (*todo, ascending),
 * and those examined but not flagged though they should be (*flag: a crash
 * came between the commit and the flag).  Needs SPI (and a transaction).
 */
static ImapStatus
unseen_to_examine(ImapSession *session, const Mailbox *mb, List **todo, List **flag,
				  char *err, size_t errsize)
{
	uint32_t   *uids = NULL;
	size_t		n = 0;
	ImapStatus	st = imap_search_unseen(session, &uids, &n, err, errsize);
	Datum	   *elems;
	Datum		args[3];
	uint64		known;
	bool	   *is_known;

	*todo = *flag = NIL;
	if (st != IMAP_OK || n == 0)
	{
		free(uids);
		return st;
	}
	elems = palloc(sizeof(Datum) * n);
	for (size_t i = 0; i < n; i++)
		elems[i] = Int64GetDatum((int64) uids[i]);
	args[0] = CStringGetTextDatum(mb->identity);
	args[1] = Int64GetDatum((int64) imap_uidvalidity(session));
	args[2] = notify_array(elems, NULL, (int) n, INT8OID);
	known = notify_run_plan(known_plan, args, NULL, true, 0, SPI_OK_SELECT, "looking up examined mails");
	is_known = palloc0(sizeof(bool) * n);
	for (uint64 k = 0; k < known; k++)
	{
		bool		isnull;
		uint32		uid = (uint32) DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[k], SPI_tuptable->tupdesc, 1, &isnull));
		bool		seen = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[k], SPI_tuptable->tupdesc, 2, &isnull));
		uint32_t   *hit = bsearch(&uid, uids, n, sizeof(uint32_t), compare_uids);

		/* UID SEARCH's answer is ascending: a mailbox left with many unseen mails stays cheap */
		if (hit == NULL)
			continue;
		is_known[hit - uids] = true;
		if (seen)
			*flag = lappend_int(*flag, (int) uid);
	}
	for (size_t i = 0; i < n; i++)
		if (!is_known[i])
			*todo = lappend_int(*todo, (int) uids[i]);
	free(uids);
	return IMAP_OK;
}

/*
 * fetch_mails: the next mails of *todo (removed from it), at most a batch,
 * copied into the current context.  A mail the server refuses (too large,
 * gone) is kept with its error; a broken session stops it (IMAP_FAILED).
 */
static ImapStatus
fetch_mails(ImapSession *session, List **todo, BounceMail **mails, int *n, char *err, size_t errsize)
{
	size_t		bytes = 0;

	*mails = palloc0(sizeof(BounceMail) * BOUNCE_BATCH_MAILS);
	*n = 0;
	while (*todo != NIL && *n < BOUNCE_BATCH_MAILS && bytes < BOUNCE_BATCH_BYTES)
	{
		BounceMail *m = &(*mails)[*n];
		char	   *data = NULL;
		size_t		len = 0;
		char		ferr[256];
		ImapStatus	st;

		m->uid = (uint32) linitial_int(*todo);
		st = imap_fetch(session, m->uid, &data, &len, ferr, sizeof(ferr));
		if (st == IMAP_FAILED)
		{
			free(data);
			strlcpy(err, ferr, errsize);
			return IMAP_FAILED;
		}
		*todo = list_delete_first(*todo);
		if (st == IMAP_OK)
		{
			m->raw = palloc(len + 1);
			memcpy(m->raw, data, len);
			m->raw[len] = '\0';
			m->len = len;
			bytes += len;
		}
		else
			m->fetch_error = pstrdup(ferr);
		free(data);
		(*n)++;
	}
	return IMAP_OK;
}

/* mailbox_from_row: a Mailbox from the claim's or the lock's row (channel, url, username, password, tls, leave_unseen). */
static Mailbox *
mailbox_from_row(HeapTuple tup, TupleDesc desc)
{
	Mailbox    *mb = palloc0(sizeof(Mailbox));
	bool		isnull;

	mb->channel = SPI_getvalue(tup, desc, 1);
	mb->url = SPI_getvalue(tup, desc, 2);
	mb->username = SPI_getvalue(tup, desc, 3);
	mb->password = SPI_getvalue(tup, desc, 4);
	mb->tls = SPI_getvalue(tup, desc, 5);
	mb->leave_unseen = DatumGetBool(SPI_getbinval(tup, desc, 6, &isnull));
	mb->identity = psprintf("%s (user %s)", mb->url, mb->username);
	return mb;
}

/* forget_password: wipe a mailbox's password before its memory goes. */
static void
forget_password(Mailbox *mb)
{
	if (mb != NULL && mb->password != NULL)
		explicit_bzero(mb->password, strlen(mb->password));
}

/* say_after_commit: the log lines of the bounces and complaints of a batch. */
static void
say_after_commit(BounceMail *mails, int n)
{
	for (int i = 0; i < n; i++)
		if (mails[i].log_line != NULL)
			ereport(LOG, (errmsg_internal("%s", mails[i].log_line)));
}

/* flag_seen: flag these mails \Seen (their records are committed); false when the session broke. */
static bool
flag_seen(ImapSession *session, const uint32 *uids, int n)
{
	for (int i = 0; i < n; i++)
	{
		char		err[256];
		ImapStatus	st = imap_mark_seen(session, uids[i], err, sizeof(err));

		/* an unflagged mail is flagged at the next read (it is recorded): no harm */
		if (st == IMAP_FAILED)
			return false;
	}
	return true;
}

/* -- one reader at a time ----------------------------------------------------------- */

/*
 * A mailbox is read by one reader at a time: the workers take it with the
 * claim (the pushed next_check_at), and besides, every reader holds an
 * advisory lock on the mailbox (its URL and user: channels may share one)
 * while it reads.  A worker only tries it (a session that reads keeps the
 * workers out, they never wait for a user's transaction) and holds it for
 * its read; check_bounces waits for it (a worker's read is bounded by its
 * timeouts) and holds it until its transaction ends, so that a worker
 * never reads what it has examined and not committed yet.
 */
#define BOUNCE_LOCK_KEY 0x6e746662	/* "ntfb" */

/* mailbox_lock_tag: the advisory lock of a mailbox. */
static void
mailbox_lock_tag(LOCKTAG *tag, const Mailbox *mb)
{
	uint32		h = hash_bytes((const unsigned char *) mb->identity, strlen(mb->identity));

	SET_LOCKTAG_ADVISORY(*tag, MyDatabaseId, BOUNCE_LOCK_KEY, h, 2);
}

/* -- the worker's reads ----------------------------------------------------------- */

static TimestampTz bounce_checked_at = 0;
static TimestampTz bounce_due_at = 0;	/* 0: none due */

/* begin_work, end_work: a worker's transaction (spi_util.c), with the plans ready. */
static void
begin_work(const char *activity)
{
	notify_begin_work(activity);
	prepare_plans();
}

static void
end_work(MemoryContext cxt)
{
	notify_end_work();
	MemoryContextSwitchTo(cxt);
}

/* What one read of a mailbox did (in memory: it outlives a longjmp). */
typedef struct ReadResult
{
	int			examined;
	char	   *error;			/* why the mailbox could not be read; NULL */
	bool		more;			/* more mail waits than one read takes */
} ReadResult;

/*
 * record_state: whether the mailbox could be read (error NULL) or not,
 * and when it is read next, in a transaction of its own; the transition,
 * and only it, is logged once committed.
 */
static void
record_state(const Mailbox *mb, const ReadResult *res, MemoryContext cxt)
{
	const char *error = res->error;
	Datum		args[3];
	char	   *was = NULL;
	double		failed_for = 0;
	uint64		n;

	begin_work("notify_ext: recording a bounce mailbox's state");
	MemoryContextSwitchTo(cxt);
	args[0] = CStringGetTextDatum(mb->channel);
	args[1] = Float8GetDatum(res->more ? 0.0 : (double) notify_bounce_poll_interval);
	if (error != NULL)
	{
		args[2] = CStringGetTextDatum(error);
		n = notify_run_plan(failed_plan, args, NULL, false, 0, SPI_OK_UPDATE_RETURNING,
							"recording a failing bounce mailbox");
	}
	else
		n = notify_run_plan(works_plan, args, NULL, false, 0, SPI_OK_UPDATE_RETURNING,
							"recording a bounce mailbox that works");
	if (n == 1)
	{
		bool		isnull;
		Datum		d;

		was = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
		if (error == NULL)
		{
			d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull);
			failed_for = isnull ? 0 : DatumGetFloat8(d);
		}
	}
	end_work(cxt);
	if (was == NULL)
		return;					/* dropped meanwhile */
	if (error != NULL && strcmp(was, "ok") == 0)
		ereport(LOG,
				(errmsg("notify_ext: the bounce mailbox of channel \"%s\" cannot be read: %s", mb->channel, error),
				 errdetail("It is tried again every notify.bounce_poll_interval (%d s), quietly; sending goes on.",
						   notify_bounce_poll_interval),
				 errhint("Check it with SELECT notify.check_bounces('%s'); fix it with notify.set_bounce_mailbox.",
						 mb->channel)));
	else if (error == NULL && strcmp(was, "failing") == 0)
		ereport(LOG,
				(errmsg("notify_ext: the bounce mailbox of channel \"%s\" can be read again after %.0f s",
						mb->channel, failed_for)));
}

/*
 * read_claimed_mailbox: one read of a mailbox the worker took, in
 * transactions of its own: list (one short transaction), then per batch:
 * fetch (no transaction), examine (one transaction), flag what it
 * recorded.  *res says what it did; res->error why it stopped when the
 * mailbox failed.
 */
static void
read_claimed_mailbox(Mailbox *mb, MemoryContext cxt, ReadResult *res)
{
	char		err[512];
	ImapSession *volatile session = NULL;
	MemoryContext batch_cxt;

	err[0] = '\0';
	session = open_mailbox(mb, err, sizeof(err));
	if (session == NULL)
	{
		res->error = pstrdup(err);
		return;
	}
	batch_cxt = AllocSetContextCreate(cxt, "notify_ext bounce batch", ALLOCSET_DEFAULT_SIZES);
	PG_TRY();
	{
		List	   *todo = NIL;
		List	   *flag = NIL;
		ImapStatus	st;
		uint32		uidvalidity = imap_uidvalidity(session);

		begin_work("notify_ext: listing a bounce mailbox");
		MemoryContextSwitchTo(cxt);
		st = unseen_to_examine(session, mb, &todo, &flag, err, sizeof(err));
		end_work(cxt);
		if (st != IMAP_OK)
			res->error = pstrdup(err);
		else if (flag != NIL)
		{
			uint32	   *uids = palloc(sizeof(uint32) * list_length(flag));
			ListCell   *lc;
			int			k = 0;

			foreach(lc, flag)
				uids[k++] = (uint32) lfirst_int(lc);
			if (!flag_seen(session, uids, k))
				res->error = pstrdup("store: the connection was lost");
		}
		while (res->error == NULL && todo != NIL && res->examined < BOUNCE_MAX_PER_READ)
		{
			BounceMail *mails;
			int			n;
			uint32	   *uids;
			int			k = 0;

			/* a batch's mails live until it is flagged, no longer */
			MemoryContextReset(batch_cxt);
			MemoryContextSwitchTo(batch_cxt);
			CHECK_FOR_INTERRUPTS();
			if (fetch_mails(session, &todo, &mails, &n, err, sizeof(err)) != IMAP_OK)
				res->error = MemoryContextStrdup(cxt, err);
			if (n == 0)
				break;
			begin_work("notify_ext: examining bounce mails");
			MemoryContextSwitchTo(batch_cxt);
			res->examined += examine_batch(mb, uidvalidity, mails, n);
			end_work(batch_cxt);
			say_after_commit(mails, n);
			uids = palloc(sizeof(uint32) * n);
			for (int i = 0; i < n; i++)
				if (mails[i].flag_seen)
					uids[k++] = mails[i].uid;
			if (res->error == NULL && !flag_seen(session, uids, k))
				res->error = MemoryContextStrdup(cxt, "store: the connection was lost");
		}
		MemoryContextSwitchTo(cxt);
		/* the rest at the next look, not at the next interval */
		res->more = res->error == NULL && todo != NIL;
	}
	PG_FINALLY();
	{
		imap_close(session);
	}
	PG_END_TRY();
}

/*
 * read_mailbox_caught: read_claimed_mailbox, whose errors (of the IMAP
 * side, of examining) fail the mailbox, not the worker's round: they end
 * up in res->error, the transaction they interrupted aborted.
 */
static void
read_mailbox_caught(Mailbox *mb, MemoryContext cxt, ReadResult *res)
{
	PG_TRY();
	{
		read_claimed_mailbox(mb, cxt, res);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(cxt);
		edata = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		MemoryContextSwitchTo(cxt);
		res->error = psprintf("%s", edata->message);
		FreeErrorData(edata);
		forget_password(mb);
		/* a stopping worker goes now (its exit releases the mailbox's lock) */
		CHECK_FOR_INTERRUPTS();
	}
	PG_END_TRY();
}

/*
 * bounce_poll_if_due: the worker's hook, once per round: read one bounce
 * mailbox whose time has come (notify.bounce_poll_interval after its last
 * read, or at once when it was just configured), outside the send path.
 * The table is looked at when a mailbox falls due, and otherwise at most
 * once per BOUNCE_RECHECK_MS (a new mailbox is found by then).  Returns the
 * mails examined (their notify.bounced events are for the next round to
 * fan out); *next_ms is when to look again (-1: no mailbox).
 *
 * Errors of the IMAP side, and of examining, fail the mailbox, not the
 * round: they are recorded in its state and the worker goes on sending.
 * Only the claim's own transaction may fail the round (the extension
 * dropped meanwhile).
 */
int
bounce_poll_if_due(long *next_ms)
{
	TimestampTz now = GetCurrentTimestamp();
	TimestampTz recheck_at = bounce_checked_at + BOUNCE_RECHECK_MS * (int64) 1000;
	MemoryContext cxt = CurrentMemoryContext;
	Mailbox    *mb = NULL;
	bool		isnull;
	ReadResult *res = palloc0(sizeof(ReadResult));	/* in memory: it outlives a longjmp */
	LOCKTAG		tag;

	*next_ms = -1;
	if (bounce_checked_at != 0 && now >= bounce_checked_at && now < recheck_at &&
		(bounce_due_at == 0 || now < bounce_due_at))
	{
		*next_ms = (recheck_at - now) / 1000 + 1;
		return 0;
	}

	begin_work("notify_ext: looking for a bounce mailbox to read");
	MemoryContextSwitchTo(cxt);
	{
		Datum		arg = Float8GetDatum((double) notify_bounce_poll_interval + BOUNCE_READ_LEASE_S);

		if (notify_run_plan(claim_plan, &arg, NULL, false, 1, SPI_OK_UPDATE_RETURNING,
							"taking a bounce mailbox") == 1)
			mb = mailbox_from_row(SPI_tuptable->vals[0], SPI_tuptable->tupdesc);
	}
	if (mb == NULL &&
		notify_run_plan(next_plan, NULL, NULL, true, 1, SPI_OK_SELECT, "finding the next bounce mailbox") == 1)
	{
		Datum		d = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

		if (!isnull)
			*next_ms = DatumGetFloat8(d) <= 0 ? 0 : (long) (DatumGetFloat8(d) * 1000.0) + 1;
	}
	end_work(cxt);
	bounce_checked_at = now;
	bounce_due_at = *next_ms >= 0 ? now + *next_ms * (int64) 1000 : 0;
	if (mb == NULL)
		return 0;

	/* a session is reading it (check_bounces): that session records its state too */
	mailbox_lock_tag(&tag, mb);
	if (LockAcquire(&tag, ExclusiveLock, true, true) == LOCKACQUIRE_NOT_AVAIL)
	{
		forget_password(mb);
		bounce_checked_at = 0;
		*next_ms = 0;
		return 0;
	}

	/* a commit now wakes an idle worker, not this one (or this one passes it on) */
	notify_set_worker_state("reading bounces");
	wakeup_passed_on = false;
	read_mailbox_caught(mb, cxt, res);
	forget_password(mb);
	PG_TRY();
	{
		record_state(mb, res, cxt);
	}
	PG_FINALLY();
	{
		LockRelease(&tag, ExclusiveLock, true);
	}
	PG_END_TRY();
	/* another mailbox may be due: look again at the next round */
	bounce_checked_at = 0;
	*next_ms = 0;
	return res->examined;
}

/* -- notify.check_bounces() ------------------------------------------------------- */

/*
 * check_bounces reads in the caller's transaction, which only the caller
 * commits: its mails are flagged \Seen from the transaction's commit
 * callback, when their records are durable, over the session kept open
 * until then.  A rollback (of the transaction, or of the subtransaction
 * the call ran in) flags nothing: the mails stay unseen and unrecorded,
 * for the next read.  A prepared transaction flags nothing either; if it
 * commits later, the next read flags what it recorded.
 */
typedef struct PendingFlags
{
	ImapSession *session;
	int			nest_level;		/* the (sub)transaction the records belong to */
	int			n;
	int			cap;
	uint32	   *uids;			/* malloc'd: nothing may fail in the commit callback */
	struct PendingFlags *next;
} PendingFlags;

static PendingFlags *pending = NULL;
static bool callbacks_registered = false;

/* drop_pending: close and forget the sessions of level >= from_level (all: 0), flagging nothing. */
static void
drop_pending(int from_level)
{
	PendingFlags **pp = &pending;

	while (*pp != NULL)
	{
		PendingFlags *p = *pp;

		if (p->nest_level >= from_level)
		{
			*pp = p->next;
			imap_close(p->session);
			free(p->uids);
			free(p);
		}
		else
			pp = &p->next;
	}
}

/* bounce_xact_callback: at commit, flag what the transaction recorded; else forget it. */
static void
bounce_xact_callback(XactEvent event, void *arg)
{
	if (pending == NULL)
		return;
	if (event == XACT_EVENT_COMMIT)
	{
		for (PendingFlags *p = pending; p != NULL; p = p->next)
			for (int i = 0; i < p->n; i++)
			{
				char		err[256];

				if (imap_mark_seen(p->session, p->uids[i], err, sizeof(err)) == IMAP_FAILED)
					break;
			}
		drop_pending(0);
	}
	else if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PREPARE ||
			 event == XACT_EVENT_PARALLEL_ABORT)
		drop_pending(0);
}

/* bounce_subxact_callback: a rolled back subtransaction takes its records, and their flags, along. */
static void
bounce_subxact_callback(SubXactEvent event, SubTransactionId mySubid, SubTransactionId parentSubid,
						void *arg)
{
	int			level = GetCurrentTransactionNestLevel();

	if (event == SUBXACT_EVENT_ABORT_SUB)
		drop_pending(level);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
		for (PendingFlags *p = pending; p != NULL; p = p->next)
			if (p->nest_level >= level)
				p->nest_level = level - 1;
}

/* pending_add: a mail to flag at commit. */
static void
pending_add(PendingFlags *p, uint32 uid)
{
	if (p->n == p->cap)
	{
		int			cap = p->cap ? p->cap * 2 : 64;
		uint32	   *uids = realloc(p->uids, sizeof(uint32) * cap);

		if (uids == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
		p->uids = uids;
		p->cap = cap;
	}
	p->uids[p->n++] = uid;
}

/*
 * check_one_mailbox: read one (locked) mailbox in the caller's
 * transaction; raises when it cannot be read.
 */
static int
check_one_mailbox(Mailbox *mb)
{
	char		err[512];
	PendingFlags *p;
	List	   *todo = NIL;
	List	   *flag = NIL;
	ListCell   *lc;
	uint32		uidvalidity;
	int			examined = 0;
	MemoryContext cxt = CurrentMemoryContext;
	MemoryContext batch_cxt;
	LOCKTAG		tag;

	/* a worker reading it now finishes first; no worker reads it until this transaction ends */
	mailbox_lock_tag(&tag, mb);
	(void) LockAcquire(&tag, ExclusiveLock, false, false);

	p = calloc(1, sizeof(PendingFlags));
	if (p == NULL)
		ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	p->nest_level = GetCurrentTransactionNestLevel();
	p->next = pending;
	pending = p;
	p->session = open_mailbox(mb, err, sizeof(err));
	if (p->session == NULL)
	{
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the bounce mailbox of channel \"%s\" cannot be read: %s", mb->channel, err),
				 errhint("See its settings in notify.bounce_mailboxes; change them with notify.set_bounce_mailbox.")));
	}
	uidvalidity = imap_uidvalidity(p->session);
	if (unseen_to_examine(p->session, mb, &todo, &flag, err, sizeof(err)) != IMAP_OK)
	{
		CHECK_FOR_INTERRUPTS();
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the bounce mailbox of channel \"%s\" cannot be read: %s", mb->channel, err)));
	}
	MemoryContextSwitchTo(cxt);
	foreach(lc, flag)
		pending_add(p, (uint32) lfirst_int(lc));
	batch_cxt = AllocSetContextCreate(cxt, "notify_ext bounce batch", ALLOCSET_DEFAULT_SIZES);
	while (todo != NIL && examined < BOUNCE_MAX_PER_READ)
	{
		BounceMail *mails;
		int			n;

		MemoryContextReset(batch_cxt);
		MemoryContextSwitchTo(batch_cxt);
		if (fetch_mails(p->session, &todo, &mails, &n, err, sizeof(err)) != IMAP_OK)
		{
			CHECK_FOR_INTERRUPTS();
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("the bounce mailbox of channel \"%s\" cannot be read: %s", mb->channel, err)));
		}
		examined += examine_batch(mb, uidvalidity, mails, n);
		MemoryContextSwitchTo(batch_cxt);
		say_after_commit(mails, n);
		for (int i = 0; i < n; i++)
			if (mails[i].flag_seen)
				pending_add(p, mails[i].uid);
	}
	MemoryContextSwitchTo(cxt);
	MemoryContextDelete(batch_cxt);
	return examined;
}

/*
 * notify_check_bounces: notify.check_bounces(channel): read the bounce
 * mailbox of a channel (NULL: of every channel) now, in this session, and
 * return how many mails were examined.  Each mailbox is locked for the
 * transaction: a second check_bounces waits, a worker's read skips it.
 */
Datum
notify_check_bounces(PG_FUNCTION_ARGS)
{
	MemoryContext cxt = CurrentMemoryContext;
	Datum		arg;
	char		argnull = ' ';
	uint64		n;
	List	   *volatile mailboxes = NIL;
	ListCell   *lc;
	volatile int examined = 0;
	char	   *channel = PG_ARGISNULL(0) ? NULL : text_to_cstring(PG_GETARG_TEXT_PP(0));

	if (!callbacks_registered)
	{
		RegisterXactCallback(bounce_xact_callback, NULL);
		RegisterSubXactCallback(bounce_subxact_callback, NULL);
		callbacks_registered = true;
	}
	smtp_global_init();
	SPI_connect();
	MemoryContextSwitchTo(cxt);
	prepare_plans();
	if (channel != NULL)
		arg = CStringGetTextDatum(channel);
	else
		argnull = 'n';
	n = notify_run_plan(lock_plan, &arg, &argnull, false, 0, SPI_OK_SELECT, "locking the bounce mailboxes");
	for (uint64 i = 0; i < n; i++)
		mailboxes = lappend(mailboxes, mailbox_from_row(SPI_tuptable->vals[i], SPI_tuptable->tupdesc));
	if (channel != NULL && mailboxes == NIL)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("channel \"%s\" has no bounce mailbox", channel),
				 errhint("Set one with notify.set_bounce_mailbox.")));
	PG_TRY();
	{
		foreach(lc, mailboxes)
		{
			Mailbox    *mb = (Mailbox *) lfirst(lc);
			Datum		args[2];

			examined += check_one_mailbox(mb);
			forget_password(mb);
			/* it was just read: the workers' next read is an interval away */
			args[0] = CStringGetTextDatum(mb->channel);
			args[1] = Float8GetDatum((double) notify_bounce_poll_interval);
			if (SPI_execute_with_args("UPDATE notify.bounce_mailbox b SET next_check_at = pg_catalog.now()"
									  " + pg_catalog.make_interval(secs => $2), state = 'ok', last_error = NULL,"
									  " failing_since = NULL, last_checked_at = pg_catalog.now() WHERE b.channel = $1",
									  2, (Oid[]) {TEXTOID, FLOAT8OID}, args, NULL, false, 0) != SPI_OK_UPDATE)
				elog(ERROR, "could not record the read of a bounce mailbox");
			MemoryContextSwitchTo(cxt);
		}
	}
	PG_FINALLY();
	{
		foreach(lc, mailboxes)
			forget_password((Mailbox *) lfirst(lc));
	}
	PG_END_TRY();
	SPI_finish();
	MemoryContextSwitchTo(cxt);
	PG_RETURN_INT32(examined);
}

/* -- suppressions, for fan-out ------------------------------------------------------ */

/*
 * bounce_suppressions_exist: whether any address is suppressed; fan-out
 * asks once per batch and looks addresses up only when one is, so that a
 * database that never had a bounce pays one look at an empty table per
 * batch.
 */
bool
bounce_suppressions_exist(void)
{
	if (exists_plan == NULL)
		exists_plan = notify_keep_plan("SELECT EXISTS (SELECT 1 FROM notify.suppression)", 0, NULL);
	if (notify_run_plan(exists_plan, NULL, NULL, true, 1, SPI_OK_SELECT, "looking for suppressions") != 1)
		return false;
	{
		bool		isnull;

		return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}
}

/*
 * bounce_suppression_reason: why a message to this address is not sent
 * (the suppression's bounce or complaint, when, the message it was about),
 * or NULL when it is not suppressed.  One lookup by the index on
 * lower(address).
 */
char *
bounce_suppression_reason(const char *address)
{
	Datum		arg;

	if (suppressed_plan == NULL)
		suppressed_plan = notify_keep_plan(
									"SELECT pg_catalog.format('address suppressed: %s %s (%s)%s; notify.unsuppress(%L) to send to it again',"
									"   CASE s.reason WHEN 'complaint' THEN 'complaint (' || COALESCE(s.status, 'abuse') || ')'"
									"        ELSE 'bounced' END,"
									"   pg_catalog.to_char(s.since, 'YYYY-MM-DD HH24:MI TZ'),"
									"   pg_catalog.left(COALESCE(s.status || ': ', '') || COALESCE(s.diagnostic, 'no diagnostic'), 300),"
									"   COALESCE(', message ' || s.message_id, ''), s.address)"
									"  FROM notify.suppression s WHERE pg_catalog.lower(s.address) = pg_catalog.lower($1)",
									1, (Oid[]) {TEXTOID});
	arg = CStringGetTextDatum(address);
	if (notify_run_plan(suppressed_plan, &arg, NULL, true, 1, SPI_OK_SELECT, "looking up a suppression") != 1)
		return NULL;
	return SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);
}

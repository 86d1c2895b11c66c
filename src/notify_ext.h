/*-------------------------------------------------------------------------
 *
 * notify_ext.h
 *	  What the modules of notify_ext share: settings, the shared-memory
 *	  state, and the entry points each module offers the others.
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_EXT_H
#define NOTIFY_EXT_H

#include "postgres.h"

#include "access/htup.h"
#include "nodes/pg_list.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"
#include "storage/spin.h"
#include "utils/jsonb.h"
#include "utils/relcache.h"
#include "utils/timestamp.h"

/* Settings (GUCs), defined in notify_ext.c */
extern char *notify_database;
extern int	notify_poll_interval;
extern int	notify_batch_size;
extern bool notify_enabled;
extern int	notify_max_attempts;
extern int	notify_retry_backoff;
extern int	notify_lease;
extern int	notify_retention;
extern char *notify_actor;
extern int	notify_workers;
extern int	notify_max_workers;
extern int	notify_max_databases;
extern int	notify_worker_idle_timeout;
extern int	notify_smtp_timeout;
extern int	notify_smtp_data_timeout;
extern char *notify_tls_ca_file;
extern char *notify_timezone;
extern int	notify_webhook_timeout;
extern int	notify_max_age;
extern int	notify_bounce_poll_interval;
extern bool notify_direct_send;

/*
 * Worker slots in shared memory: the most notify.max_workers (and so
 * notify.workers) may ask for.  A compile-time bound so that both settings
 * can change on reload.
 */
#define NOTIFY_WORKER_SLOTS 128
/* Rate-limited channels (database, channel) whose next slot is shared between workers. */
#define NOTIFY_MAX_RATED_CHANNELS 256
/* sent_last_minute: a ring of SENT_BUCKETS buckets of SENT_BUCKET_SECS seconds */
#define NOTIFY_SENT_BUCKETS 12
#define NOTIFY_SENT_BUCKET_SECS 5

/* Messages sent in the last minute, counted in buckets of a few seconds. */
typedef struct NotifySentRing
{
	int64		bucket_start[NOTIFY_SENT_BUCKETS];	/* epoch second the bucket counts from */
	uint32		count[NOTIFY_SENT_BUCKETS];
	uint64		total;
} NotifySentRing;

/*
 * What the workers last found in a database.  The launcher starts no
 * worker in a database whose state is one of the waiting ones until
 * something changes it (CREATE EXTENSION, ALTER EXTENSION UPDATE,
 * notify.adopt_copy()): a copy or an old schema never holds a process.
 */
typedef enum NotifyDbState
{
	NOTIFY_DB_UNKNOWN = 0,		/* no worker looked since the server started */
	NOTIFY_DB_SERVED,			/* the extension is here, in this version, not a copy */
	NOTIFY_DB_NO_EXTENSION,		/* looked: no extension (dropped) */
	NOTIFY_DB_OTHER_VERSION,	/* waits for ALTER EXTENSION notify_ext UPDATE */
	NOTIFY_DB_COPY				/* a copy: waits for notify.adopt_copy() */
} NotifyDbState;

/*
 * One database's entry: created when a backend there first commits work
 * (or a worker first finds the extension there, or a DDL needs it alone),
 * freed when the database is dropped.  A database that never had the
 * extension has none.  Everything the launcher needs to know to start a
 * worker there without connecting to it.
 */
typedef struct NotifyDatabase
{
	Oid			dboid;			/* InvalidOid: a free entry */
	NotifyDbState state;
	bool		state_logged;	/* the state's one log line was written */
	bool		requested;		/* work came that no running worker will see */
	TimestampTz requested_at;	/* since when: the oldest request is served first */
	TimestampTz due_at;			/* 0: nothing due; else a retry, lease, schedule or digest */
	int			workers_wanted; /* a worker with a backlog asks for this many in all */
	int			leaving_pid;	/* a backend whose DDL needs the database alone */
	int			failures;		/* worker starts in a row that ended before serving */
	TimestampTz start_after;	/* after failures: no start before then */
	TimestampTz purged_at;		/* notify.retention last applied here */
	pg_atomic_uint32 wake_pending;	/* 1: woken (or asked for) a worker that has not looked yet */
	uint32		changes;		/* bumped when what a worker finds here may have changed
								 * (the extension, its version, the identity): a running
								 * worker looks again before its next round */
	NotifySentRing sent;		/* sent by every worker of this database */
} NotifyDatabase;

/*
 * A worker slot: taken by the launcher when it registers a worker, filled
 * in by the worker, given back by the launcher when the worker is gone.
 * Backends read it to wake the workers of their database; worker_status()
 * shows it.
 */
typedef struct NotifyWorkerSlot
{
	bool		in_use;			/* taken by the launcher (starting, running or gone but not reaped) */
	uint32		generation;		/* bumped at each use; the worker checks it is the one meant */
	Oid			dboid;
	bool		census;			/* started to look for the extension: leaves as soon as it is idle */
	pid_t		pid;			/* 0: not running (yet, or any more) */
	Latch	   *latch;
	bool		served;			/* got to its loop: its exit is no start failure */
	bool		exited;			/* gone; the launcher reaps the slot */
	bool		exiting;		/* leaving: commits must not count on it any more */
	bool		stop;			/* asked to leave: a slot for another database, or a DDL */
	int32		worker_id;		/* number in its database (notify.worker_seq): claimed_by */
	TimestampTz registered_at;
	TimestampTz started_at;
	char		state[48];		/* what it is doing, for humans */
	int64		message_id;		/* the message in flight, 0: none */
	char		channel[64];	/* ... and its channel */
	NotifySentRing sent;
	char		last_error[256];
	TimestampTz last_error_at;
} NotifyWorkerSlot;

/* A rate-limited channel's next free slot, the same for every worker of its database. */
typedef struct NotifyRateSlot
{
	Oid			dboid;
	char		channel[64];	/* empty: unused */
	TimestampTz next_slot;		/* the next message may go from then on */
	TimestampTz defer_tail;		/* where the next held-back message is put */
} NotifyRateSlot;

/*
 * The shared state.  lock (an LWLock) guards the databases and the slots;
 * mutex (a spinlock) the rate slots, which the sender takes per message.
 * Backends look their database's entry up once and keep its index: an
 * entry is only freed when its database is dropped, when none of its
 * backends is left.
 */
typedef struct NotifyShared
{
	LWLock	   *lock;
	slock_t		mutex;
	pid_t		launcher_pid;
	Latch	   *launcher_latch;
	int			slots_wanted;	/* databases with work and no worker the launcher cannot serve */
	TimestampTz bgworker_shortage_at;	/* a worker could not be registered (max_worker_processes); 0: fine */
	int			ndatabases;		/* entries in databases[] (notify.max_databases) */
	NotifyWorkerSlot workers[NOTIFY_WORKER_SLOTS];
	NotifyRateSlot rates[NOTIFY_MAX_RATED_CHANNELS];
	NotifyDatabase databases[FLEXIBLE_ARRAY_MEMBER];
} NotifyShared;

extern NotifyShared *notify_shared;

/*
 * The search_path of the worker's session and of every function of the
 * extension; user-registered queries run with NOTIFY_OWNER_SEARCH_PATH.
 */
#define NOTIFY_PINNED_SEARCH_PATH "pg_catalog, pg_temp"
#define NOTIFY_OWNER_SEARCH_PATH "\"$user\", public"

/* spi_util.c */
extern int	notify_pin_search_path(void);
extern void notify_unpin_search_path(int nest);
extern int	notify_execute_as_owner(Oid owner, const char *what, const char *sql, int nargs,
									Oid *types, Datum *values, bool read_only, long tcount);
extern char *notify_clean_text(const char *src, size_t len, size_t maxlen);
extern struct _SPI_plan *notify_keep_plan(const char *sql, int nargs, Oid *argtypes);
extern bool notify_plan_for_indexes;
extern void notify_begin_work(const char *activity);
extern void notify_end_work(void);
extern uint64 notify_run_plan(struct _SPI_plan *plan, Datum *values, const char *nulls,
							  bool read_only, long tcount, int expected, const char *what);
extern void notify_refresh_snapshot(void);
extern void notify_lock_extension(void);
extern Datum notify_array(Datum *values, bool *nulls, int n, Oid elemtype);
extern char *notify_try_subxact(void (*fn) (void *arg), void *arg, MemoryContext outer,
								MemoryContext work_cxt);

/* shmem.c: the shared state, the wake-ups, the rate limit */
extern Size notify_shmem_size(void);
extern void notify_shmem_init(void);
extern NotifyDatabase *notify_database_entry(Oid dboid, bool create);
extern void notify_wake_worker(void);
extern void notify_wake_worker_at_commit(void);
extern void notify_wake_workers_except(int slot);
extern void notify_pass_wakeup_on(int slot);
extern void notify_database_changed_at_commit(void);
extern void notify_request_worker(NotifyDatabase *db);
extern void notify_set_worker_state(const char *state);
extern void notify_set_worker_message(int64 message_id, const char *channel);
extern void notify_count_sent(int n);
extern bool notify_worker_stop_requested(void);
extern void notify_sent_add(NotifySentRing *ring, int n, TimestampTz now);
extern uint64 notify_sent_last_minute(const NotifySentRing *ring, TimestampTz now);
extern bool notify_rate_admit(const char *channel, int rate_per_minute, TimestampTz now,
							  TimestampTz *until);
extern bool notify_database_listed(const char *dbname);

/*
 * worker.c: which shared slot this worker has (-1 in a backend), and its
 * number in its database, which its claims carry (notify.message.claimed_by)
 */
extern int	notify_worker_slot;
extern int32 notify_worker_id;

/* worker.c */
extern PGDLLEXPORT void notify_worker_main(Datum main_arg);

/* capture.c */
extern void notify_capture_init(void);

/* launcher.c */
extern PGDLLEXPORT void notify_launcher_main(Datum main_arg);
extern void notify_register_launcher(void);

/* ddl.c: the utility hook that makes our workers leave a database a DDL needs alone */
extern void notify_install_utility_hook(void);

/* identity.c: this database's identity (see notify.adopt_copy) */
extern const char *notify_database_token(void);
extern void notify_set_database_token(const char *token);

/* rowjson.c: a watched row as to_jsonb(row) gives it, and its table's name */
extern Datum notify_row_to_jsonb(Relation rel, HeapTuple tuple);
extern const char *notify_relation_name(Relation rel);
extern void notify_push_jsonb(JsonbParseState **state, JsonbIteratorToken token, Jsonb *j);

/* fanout.c */
extern int	fanout_pending_events(int batch_size);
extern int	fanout_queued;

/*
 * sender.c.  A worker claims this many messages at a time, so that a burst
 * is shared between the workers rather than taken by the first to wake;
 * their outcomes are committed together.
 */
#define SEND_CLAIM_SIZE 16
extern int	send_due_messages(int batch_size, long *next_due_ms);
/* the texts of a message the fan-out claimed for its worker to send (sender_add_direct) */
typedef enum DirectTextColumn
{
	DIRECT_ADDRESS, DIRECT_DISPLAY_NAME, DIRECT_SUBJECT, DIRECT_TEXT_BODY, DIRECT_HTML_BODY,
	DIRECT_CHANNEL, DIRECT_NTEXTS
} DirectTextColumn;
typedef struct DirectText
{
	Datum		value;			/* text */
	bool		isnull;
} DirectText;
extern void sender_direct_begin(MemoryContext cxt);
extern void sender_add_direct(int64 id, const DirectText *texts, int64 event_id, int64 rule_id,
							  bool has_attachments);
extern void sender_direct_ready(void);
extern int	sender_direct_pending(void);
extern void sender_shutdown(void);
extern void sender_abandon_transfers(void);

/* health.c: channel health */
extern List *health_take_probes(void);
extern void health_nothing_to_probe(const char *channel);
extern void health_channel_failed(const char *channel, const char *reason, bool probe);
extern bool health_channel_works(const char *channel);
extern void health_log_transitions(bool discard);

/* bounce.c: the envelope sender that names a message, the bounce mailbox, suppressions */
extern const char *notify_verp_tag(void);
extern char *bounce_envelope_sender(const char *base, long long message_id, bool test);
extern int	bounce_poll_if_due(long *next_ms);
extern bool bounce_suppressions_exist(void);
extern char *bounce_suppression_reason(const char *address);

/* schedule.c */
extern bool notify_cron_next(const char *text, TimestampTz after, TimestampTz *next);
extern int	notify_run_due_schedules(long *next_due_ms);

/* render.c */
typedef struct RenderedMessage
{
	char	   *subject;
	char	   *text_body;
	char	   *html_body;		/* NULL when the template has no HTML body */
} RenderedMessage;

struct TmplValue;
extern void render_init_allocators(void);
extern void render_cache_begin(void);
extern void render_cache_end(void);
extern struct TmplValue *jsonb_to_tmpl_value(Jsonb *jb);
extern RenderedMessage *render_template_value(const char *name, const char *locale,
											  const struct TmplValue *ctx);
extern RenderedMessage *render_template_named(const char *name, const char *locale,
											  Jsonb *context);
extern char *render_body_template(const char *channel, const char *source, bool json,
								  const char *locale, const struct TmplValue *ctx);

#endif							/* NOTIFY_EXT_H */

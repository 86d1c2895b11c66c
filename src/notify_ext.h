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
extern int	notify_smtp_timeout;
extern int	notify_smtp_data_timeout;
extern char *notify_tls_ca_file;
extern char *notify_timezone;
extern int	notify_webhook_timeout;
extern int	notify_max_age;
extern int	notify_bounce_poll_interval;

/* The most workers notify.workers may ask for. */
#define NOTIFY_MAX_WORKERS 32
/* Rate-limited channels whose next slot is shared between the workers. */
#define NOTIFY_MAX_RATED_CHANNELS 32

/* One worker's public face: backends wake it, worker_status() shows it. */
typedef struct NotifyWorkerSlot
{
	pid_t		pid;			/* 0: not running */
	Latch	   *latch;
	char		state[32];		/* what the worker is doing, for humans */
	char		last_error[256];
} NotifyWorkerSlot;

/* A rate-limited channel's next free slot, the same for every worker. */
typedef struct NotifyRateSlot
{
	char		channel[64];	/* empty: unused */
	TimestampTz next_slot;		/* the next message may go from then on */
	TimestampTz defer_tail;		/* where the next held-back message is put */
} NotifyRateSlot;

/*
 * Shared state between the ERP's backends and the workers. Backends only
 * need the workers' latches, to wake them when they commit events.
 */
typedef struct NotifyShared
{
	slock_t		mutex;
	pg_atomic_uint32 wake_pending;	/* 1: a worker was woken for events and has not looked yet */
	NotifyWorkerSlot workers[NOTIFY_MAX_WORKERS];
	NotifyRateSlot rates[NOTIFY_MAX_RATED_CHANNELS];
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
extern uint64 notify_run_plan(struct _SPI_plan *plan, Datum *values, const char *nulls,
							  bool read_only, long tcount, int expected, const char *what);
extern void notify_refresh_snapshot(void);
extern void notify_lock_extension(void);
extern Datum notify_array(Datum *values, bool *nulls, int n, Oid elemtype);
extern char *notify_try_subxact(void (*fn) (void *arg), void *arg, MemoryContext outer,
								MemoryContext work_cxt);

/* notify_ext.c */
extern void notify_wake_worker(void);
extern void notify_wake_worker_at_commit(void);
extern void notify_wake_workers_except(int slot);
extern void notify_set_worker_state(const char *state);
extern bool notify_rate_admit(const char *channel, int rate_per_minute, TimestampTz now,
							  TimestampTz *until);

/* worker.c: which worker this process is (0 .. notify.workers - 1), -1 in a backend */
extern int	notify_worker_slot;

/* worker.c */
extern PGDLLEXPORT void notify_worker_main(Datum main_arg);

/* rowjson.c: a watched row as to_jsonb(row) gives it, and its table's name */
extern Datum notify_row_to_jsonb(Relation rel, HeapTuple tuple);
extern const char *notify_relation_name(Relation rel);
extern void notify_push_jsonb(JsonbParseState **state, JsonbIteratorToken token, Jsonb *j);

/* fanout.c */
extern int	fanout_pending_events(int batch_size);

/*
 * sender.c.  A worker claims this many messages at a time, so that a burst
 * is shared between the workers rather than taken by the first to wake;
 * their outcomes are committed together.
 */
#define SEND_CLAIM_SIZE 16
extern int	send_due_messages(int batch_size, long *next_due_ms);
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

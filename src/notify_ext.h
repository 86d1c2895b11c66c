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

#include "storage/latch.h"
#include "storage/spin.h"
#include "utils/jsonb.h"

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

/*
 * Shared state between the ERP's backends and the worker. Backends only
 * need the worker's latch, to wake it when they commit events.
 */
typedef struct NotifyShared
{
	slock_t		mutex;
	pid_t		worker_pid;
	Latch	   *worker_latch;
	char		state[32];		/* what the worker is doing, for humans */
	char		last_error[256];
} NotifyShared;

extern NotifyShared *notify_shared;

/* spi_util.c */
extern struct _SPI_plan *notify_keep_plan(const char *sql, int nargs, Oid *argtypes);
extern uint64 notify_run_plan(struct _SPI_plan *plan, Datum *values, const char *nulls,
							  bool read_only, long tcount, int expected, const char *what);

/* notify_ext.c */
extern void notify_wake_worker(void);
extern void notify_wake_worker_at_commit(void);
extern void notify_set_worker_state(const char *state);

/* worker.c */
extern PGDLLEXPORT void notify_worker_main(Datum main_arg);

/* fanout.c */
extern int	fanout_pending_events(int batch_size);

/* sender.c */
extern int	send_due_messages(int batch_size, long *next_due_ms);
extern void sender_shutdown(void);

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

#endif							/* NOTIFY_EXT_H */

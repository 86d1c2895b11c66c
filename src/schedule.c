/*-------------------------------------------------------------------------
 *
 * schedule.c
 *	  The worker's cron: schedules whose time has come run their query as
 *	  their owner and turn the result into events; notify.next_run and
 *	  notify.run_schedule from SQL.
 *
 * A run and the events it emits commit together, and a fire time is
 * recorded once (UNIQUE (schedule_id, fire_time)): a schedule never runs
 * twice for the same time, whatever crashes or however many workers.  A
 * fire time missed while the server was down runs once when it is back;
 * the next one is computed from the present, so there is no burst.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "pgtime.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"

#include "cron.h"
#include "fmgr.h"
#include "notify_ext.h"

/* Schedules run per call of notify_run_due_schedules, so sending is never starved. */
#define SCHEDULES_PER_ROUND 16

/* seconds between the Unix epoch and PostgreSQL's (2000-01-01) */
#define UNIX_TO_PG_SECS ((int64) (POSTGRES_EPOCH_JDATE - UNIX_EPOCH_JDATE) * SECS_PER_DAY)

/* A schedule as the worker reads it. */
typedef struct ScheduleRow
{
	int64		id;
	char	   *name;
	char	   *cron;
	char	   *query;
	char	   *event_type;
	bool		per_row;
	char	   *dedupe_key;		/* NULL: none */
	Oid			owner;
	TimestampTz next_run;
} ScheduleRow;

static SPIPlanPtr due_plan = NULL;
static SPIPlanPtr by_name_plan = NULL;
static SPIPlanPtr run_insert_plan = NULL;
static SPIPlanPtr run_finish_plan = NULL;
static SPIPlanPtr advance_plan = NULL;
static SPIPlanPtr emit_rows_plan = NULL;
static SPIPlanPtr emit_all_plan = NULL;
static SPIPlanPtr next_due_plan = NULL;
static SPIPlanPtr digests_plan = NULL;

#define SCHEDULE_COLUMNS "s.id, s.name, s.cron, s.query, s.event_type, s.per_row, s.dedupe_key, " \
	"s.owner::oid, s.next_run"

/* prepare_plans: the scheduler's statements. */
static void
prepare_plans(void)
{
	if (digests_plan != NULL)
		return;
	due_plan = notify_keep_plan("SELECT " SCHEDULE_COLUMNS " FROM notify.schedule s"
								" WHERE s.next_run <= pg_catalog.now()"
								" ORDER BY s.next_run, s.id LIMIT 1 FOR UPDATE SKIP LOCKED",
								0, NULL);
	{
		Oid			t[1] = {TEXTOID};

		by_name_plan = notify_keep_plan("SELECT " SCHEDULE_COLUMNS " FROM notify.schedule s"
										" WHERE s.name = $1 FOR UPDATE", 1, t);
	}
	{
		Oid			t[2] = {INT8OID, TIMESTAMPTZOID};

		/* a fire time already recorded returns nothing: it ran */
		run_insert_plan = notify_keep_plan("INSERT INTO notify.schedule_run (schedule_id, fire_time, started_at, status)"
										   " VALUES ($1, $2, pg_catalog.clock_timestamp(), 'ok')"
										   " ON CONFLICT (schedule_id, fire_time) DO NOTHING RETURNING id",
										   2, t);
	}
	{
		Oid			t[5] = {INT8OID, TEXTOID, INT4OID, INT4OID, TEXTOID};

		run_finish_plan = notify_keep_plan("UPDATE notify.schedule_run SET finished_at = pg_catalog.clock_timestamp(),"
										   " status = $2, events = $3, skipped = $4, error = $5 WHERE id = $1",
										   5, t);
	}
	{
		Oid			t[2] = {INT8OID, TIMESTAMPTZOID};

		advance_plan = notify_keep_plan("UPDATE notify.schedule SET next_run = $2 WHERE id = $1", 2, t);
	}
	{
		Oid			t[5] = {TEXTOID, TEXTOID, JSONOID, TEXTOID, INT8OID};

		/*
		 * Each row an event, unless its dedupe key was emitted before (or
		 * earlier in the same result).  Returns events emitted.
		 */
		emit_rows_plan = notify_keep_plan(
										  "WITH src AS ("
										  "  SELECT t.r, t.n, CASE WHEN $4 IS NULL THEN NULL"
										  "         ELSE notify._expand_pattern($4, pg_catalog.jsonb_build_object('row', t.r)) END AS k"
										  "    FROM pg_catalog.jsonb_array_elements($3::jsonb) WITH ORDINALITY AS t(r, n)),"
										  " firsts AS ("
										  "  SELECT s.r, s.n, s.k FROM src s"
										  "   WHERE s.k IS NULL OR s.n = (SELECT pg_catalog.min(x.n) FROM src x WHERE x.k = s.k)),"
										  " fresh AS ("
										  "  INSERT INTO notify.dedupe (key, schedule_id) SELECT f.k, $5 FROM firsts f"
										  "   WHERE f.k IS NOT NULL ON CONFLICT DO NOTHING RETURNING key),"
										  " ins AS ("
										  "  INSERT INTO notify.event (event_type, op, row, schedule)"
										  "  SELECT $1, 'SCHEDULE', f.r, $2 FROM firsts f"
										  "   WHERE f.k IS NULL OR f.k IN (SELECT fr.key FROM fresh fr) ORDER BY f.n RETURNING 1)"
										  "SELECT pg_catalog.count(*)::integer FROM ins",
										  5, t);
		/* one event with every row, unless there are none or its key was emitted before */
		emit_all_plan = notify_keep_plan(
										 "WITH k AS ("
										 "  SELECT CASE WHEN $4 IS NULL THEN NULL ELSE notify._expand_pattern($4,"
										 "         pg_catalog.jsonb_build_object('rows', $3::jsonb, 'row_count', pg_catalog.json_array_length($3))) END AS k),"
										 " fresh AS ("
										 "  INSERT INTO notify.dedupe (key, schedule_id) SELECT k.k, $5 FROM k"
										 "   WHERE k.k IS NOT NULL AND pg_catalog.json_array_length($3) > 0"
										 "   ON CONFLICT DO NOTHING RETURNING key),"
										 " ins AS ("
										 "  INSERT INTO notify.event (event_type, op, rows, columns, schedule)"
										 "  SELECT $1, 'SCHEDULE', $3::jsonb,"
										 "         (SELECT pg_catalog.array_agg(c.k ORDER BY c.i)"
										 "            FROM pg_catalog.json_object_keys($3 -> 0) WITH ORDINALITY AS c(k, i)), $2 FROM k"
										 "   WHERE pg_catalog.json_array_length($3) > 0"
										 "     AND (k.k IS NULL OR EXISTS (SELECT 1 FROM fresh)) RETURNING 1)"
										 "SELECT pg_catalog.count(*)::integer FROM ins",
										 5, t);
	}
	next_due_plan = notify_keep_plan("SELECT pg_catalog.date_part('epoch', LEAST("
									 "   (SELECT pg_catalog.min(s.next_run) FROM notify.schedule s),"
									 "   (SELECT pg_catalog.min(m.next_attempt_at) FROM notify.message m"
									 "     WHERE m.status = 'digest')) - pg_catalog.now())",
									 0, NULL);
	/* the last one prepared: a failure half-way prepares again next time */
	digests_plan = notify_keep_plan("SELECT notify._send_digests(false)", 0, NULL);
}

/* notify_timezone_tz: the zone schedules are computed in. */
static pg_tz *
notify_timezone_tz(void)
{
	const char *name = (notify_timezone != NULL && notify_timezone[0] != '\0')
		? notify_timezone : GetConfigOptionResetString("timezone");
	pg_tz	   *tz = pg_tzset(name);

	if (tz == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("notify.timezone \"%s\" is not a known time zone", name),
				 errhint("Use a name from pg_timezone_names, e.g. 'Europe/Madrid'.")));
	return tz;
}

/* to_local: cron.c's view of a zone, through PostgreSQL's own tz code. */
static bool
to_local(int64_t utc, CronCivil *out, void *arg)
{
	pg_time_t	t = (pg_time_t) utc;
	struct pg_tm *tm = pg_localtime(&t, (pg_tz *) arg);

	if (tm == NULL)
		return false;
	out->year = tm->tm_year + 1900;
	out->month = tm->tm_mon + 1;
	out->mday = tm->tm_mday;
	out->hour = tm->tm_hour;
	out->minute = tm->tm_min;
	out->second = tm->tm_sec;
	out->wday = tm->tm_wday;
	out->utc_offset = (int32_t) tm->tm_gmtoff;
	return true;
}

/* parse_cron: a cron expression, or an error naming the wrong field. */
static void
parse_cron(const char *source, CronExpr *expr)
{
	char		errbuf[CRON_ERRBUF_SIZE];

	if (!cron_parse(source, expr, errbuf, sizeof(errbuf)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s", errbuf)));
}

/*
 * notify_cron_next: the first fire time of a cron expression strictly
 * after `after`, in notify.timezone; false when it never fires.
 */
bool
notify_cron_next(const char *source, TimestampTz after, TimestampTz *next)
{
	CronExpr	expr;
	int64_t		next_utc;
	int64_t		after_utc = (int64_t) (after / USECS_PER_SEC) + UNIX_TO_PG_SECS;

	parse_cron(source, &expr);
	if (after < 0 && after % USECS_PER_SEC != 0)
		after_utc--;			/* floor, not truncation */
	if (!cron_next(&expr, after_utc, to_local, notify_timezone_tz(), &next_utc))
		return false;
	*next = (TimestampTz) (next_utc - UNIX_TO_PG_SECS) * USECS_PER_SEC;
	return true;
}

PG_FUNCTION_INFO_V1(notify_cron_check);

/* notify_cron_check: notify._cron_check(cron): raises unless it parses and fires. */
Datum
notify_cron_check(PG_FUNCTION_ARGS)
{
	char	   *expr = text_to_cstring(PG_GETARG_TEXT_PP(0));
	TimestampTz next;

	if (!notify_cron_next(expr, GetCurrentTransactionStartTimestamp(), &next))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("it never fires (no such date in the next years)")));
	PG_RETURN_VOID();
}

PG_FUNCTION_INFO_V1(notify_next_run);

/* notify_next_run: notify.next_run(cron, after): NULL when it never fires. */
Datum
notify_next_run(PG_FUNCTION_ARGS)
{
	char	   *expr;
	TimestampTz after;
	TimestampTz next;

	if (PG_ARGISNULL(0))
		PG_RETURN_NULL();
	expr = text_to_cstring(PG_GETARG_TEXT_PP(0));
	after = PG_ARGISNULL(1) ? GetCurrentTransactionStartTimestamp() : PG_GETARG_TIMESTAMPTZ(1);
	if (!notify_cron_next(expr, after, &next))
		PG_RETURN_NULL();
	PG_RETURN_TIMESTAMPTZ(next);
}

/* read_schedule: the current SPI row as a ScheduleRow, in the caller's context. */
static ScheduleRow *
read_schedule(HeapTuple tup, TupleDesc desc)
{
	ScheduleRow *s = palloc0(sizeof(ScheduleRow));
	bool		isnull;

	s->id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	s->name = SPI_getvalue(tup, desc, 2);
	s->cron = SPI_getvalue(tup, desc, 3);
	s->query = SPI_getvalue(tup, desc, 4);
	s->event_type = SPI_getvalue(tup, desc, 5);
	s->per_row = DatumGetBool(SPI_getbinval(tup, desc, 6, &isnull));
	s->dedupe_key = SPI_getvalue(tup, desc, 7);
	s->owner = DatumGetObjectId(SPI_getbinval(tup, desc, 8, &isnull));
	s->next_run = DatumGetTimestampTz(SPI_getbinval(tup, desc, 9, &isnull));
	return s;
}

/*
 * query_as_owner: the schedule's result as one jsonb array, computed as
 * its owner (see notify_execute_as_owner: their rights, their session's
 * search_path, and nothing the query sets survives it).
 */
static Datum
query_as_owner(ScheduleRow *s)
{
	MemoryContext caller = CurrentMemoryContext;
	int			ret;
	bool		isnull;
	Datum		result;
	char	   *sql;

	/* json, not jsonb: it keeps the columns in the query's order (a CSV's header) */
	sql = psprintf("SELECT COALESCE(pg_catalog.json_agg(q), '[]'::json)"
				   " FROM (%s\n) AS q", s->query);
	ret = notify_execute_as_owner(s->owner, psprintf("schedule \"%s\"", s->name), sql, 0, NULL, NULL,
								  false, 0);
	MemoryContextSwitchTo(caller);
	if (ret != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "query of schedule \"%s\" failed: %s", s->name, SPI_result_code_string(ret));
	result = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);
	return PointerGetDatum(PG_DETOAST_DATUM_COPY(result));
}

/*
 * emit_events: the schedule's result as events; returns how many were
 * emitted, *skipped those whose dedupe key was emitted before.
 */
static int
emit_events(ScheduleRow *s, int *skipped)
{
	Datum		rows = query_as_owner(s);
	Datum		args[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};
	int			total = DatumGetInt32(DirectFunctionCall1(json_array_length, rows));
	int			emitted;
	bool		isnull;

	args[0] = CStringGetTextDatum(s->event_type);
	args[1] = CStringGetTextDatum(s->name);
	args[2] = rows;
	if (s->dedupe_key != NULL)
		args[3] = CStringGetTextDatum(s->dedupe_key);
	else
		nulls[3] = 'n';
	args[4] = Int64GetDatum(s->id);
	notify_run_plan(s->per_row ? emit_rows_plan : emit_all_plan, args, nulls, false, 1,
					SPI_OK_SELECT, "emitting a schedule's events");
	emitted = DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	*skipped = s->per_row ? total - emitted : (total > 0 && emitted == 0 ? 1 : 0);
	if (emitted > 0)
		notify_wake_worker_at_commit();
	return emitted;
}

/* finish_run: what became of a run. */
static void
finish_run(int64 run_id, const char *error, int events, int skipped)
{
	Datum		args[5];
	char		nulls[5] = {' ', ' ', ' ', ' ', ' '};

	args[0] = Int64GetDatum(run_id);
	args[1] = CStringGetTextDatum(error ? "failed" : "ok");
	args[2] = Int32GetDatum(events);
	args[3] = Int32GetDatum(skipped);
	if (error)
		args[4] = CStringGetTextDatum(error);
	else
		nulls[4] = 'n';
	if (error)
		nulls[2] = nulls[3] = 'n';
	notify_run_plan(run_finish_plan, args, nulls, false, 0, SPI_OK_UPDATE, "recording a schedule's run");
}

/* start_run: record a run; -1 when this fire time was already run. */
static int64
start_run(ScheduleRow *s, TimestampTz fire_time)
{
	Datum		args[2] = {Int64GetDatum(s->id), TimestampTzGetDatum(fire_time)};
	char		nulls[2] = {' ', fire_time == 0 ? 'n' : ' '};
	bool		isnull;

	if (notify_run_plan(run_insert_plan, args, nulls, false, 0, SPI_OK_INSERT_RETURNING,
						"recording a schedule's run") == 0)
		return -1;
	return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/* advance: the schedule's next fire time after now (no burst of missed runs). */
static void
advance(ScheduleRow *s)
{
	TimestampTz next;
	Datum		args[2];
	char		nulls[2] = {' ', ' '};

	args[0] = Int64GetDatum(s->id);
	if (notify_cron_next(s->cron, Max(GetCurrentTimestamp(), s->next_run), &next))
		args[1] = TimestampTzGetDatum(next);
	else
	{
		/* it cannot fire any more: park it far away rather than fail every round */
		args[1] = TimestampTzGetDatum(DT_NOEND);
	}
	notify_run_plan(advance_plan, args, nulls, false, 0, SPI_OK_UPDATE, "advancing a schedule");
}

/* What run_one_due's subtransaction works on. */
typedef struct ScheduleWork
{
	ScheduleRow *schedule;
	int			events;
	int			skipped;
} ScheduleWork;

/* emit_work: run_one_due's work, in its subtransaction. */
static void
emit_work(void *arg)
{
	ScheduleWork *w = (ScheduleWork *) arg;

	w->events = emit_events(w->schedule, &w->skipped);
}

/*
 * run_one_due: run the most overdue schedule, if any, in the caller's
 * transaction; a failing query is rolled back alone and recorded.
 * Returns false when nothing was due.
 */
static bool
run_one_due(void)
{
	MemoryContext outer = CurrentMemoryContext;
	ScheduleWork w = {0};
	int64		run_id;

	if (notify_run_plan(due_plan, NULL, NULL, false, 1, SPI_OK_SELECT, "finding due schedules") == 0)
		return false;
	w.schedule = read_schedule(SPI_tuptable->vals[0], SPI_tuptable->tupdesc);
	run_id = start_run(w.schedule, w.schedule->next_run);
	if (run_id >= 0)
	{
		char	   *error = notify_try_subxact(emit_work, &w, outer, outer);

		if (error != NULL)
		{
			w.events = 0;
			ereport(LOG,
					(errmsg("notify_ext: schedule \"%s\" failed: %s", w.schedule->name, error)));
		}
		finish_run(run_id, error, w.events, w.skipped);
	}
	advance(w.schedule);
	return true;
}

/*
 * notify_run_due_schedules: run what is due, each schedule in a
 * transaction of its own, then send the digests whose period ended;
 * *next_due_ms is set to when the next schedule or digest falls due (-1
 * when there is none).  Returns schedules run plus digests queued.
 * Called by the worker outside any transaction.
 */
int
notify_run_due_schedules(long *next_due_ms)
{
	MemoryContext caller = CurrentMemoryContext;
	int			ran = 0;
	bool		isnull;

	*next_due_ms = -1;
	for (;;)
	{
		bool		more;

		CHECK_FOR_INTERRUPTS();
		SetCurrentStatementStartTimestamp();
		StartTransactionCommand();
		notify_lock_extension();
		SPI_connect();
		PushActiveSnapshot(GetTransactionSnapshot());
		pgstat_report_activity(STATE_RUNNING, "notify_ext: running schedules");
		MemoryContextSwitchTo(caller);
		prepare_plans();
		more = ran < SCHEDULES_PER_ROUND && run_one_due();
		if (more)
			ran++;
		else
		{
			/* digests whose period ended: one mail per rule, recipient and period */
			if (notify_run_plan(digests_plan, NULL, NULL, false, 1, SPI_OK_SELECT, "sending digests") == 1)
				ran += DatumGetInt32(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
		}
		if (!more && notify_run_plan(next_due_plan, NULL, NULL, true, 1, SPI_OK_SELECT,
								 "finding the next schedule") == 1)
		{
			Datum		due = SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull);

			if (!isnull)
			{
				double		secs = DatumGetFloat8(due);

				*next_due_ms = secs <= 0 ? 0 : (long) Min(secs * 1000.0 + 1, (double) LONG_MAX);
			}
		}
		SPI_finish();
		PopActiveSnapshot();
		CommitTransactionCommand();
		pgstat_report_activity(STATE_IDLE, NULL);
		MemoryContextSwitchTo(caller);
		if (!more)
			break;
	}
	return ran;
}

PG_FUNCTION_INFO_V1(notify_run_schedule);

/*
 * notify_run_schedule: notify.run_schedule(name): run it now, as its
 * owner, whoever calls; errors raise.  The run is recorded without a fire
 * time, and the schedule's own timetable is left as it is.
 */
Datum
notify_run_schedule(PG_FUNCTION_ARGS)
{
	MemoryContext fcxt = CurrentMemoryContext;
	char	   *name;
	ScheduleRow *s;
	int64		run_id;
	int			events;
	int			skipped = 0;

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("notify.run_schedule: the schedule name must not be null")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	SPI_connect();
	MemoryContextSwitchTo(fcxt);
	prepare_plans();
	{
		Datum		arg = CStringGetTextDatum(name);

		if (notify_run_plan(by_name_plan, &arg, NULL, false, 1, SPI_OK_SELECT, "finding the schedule") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("schedule \"%s\" does not exist", name),
					 errhint("SELECT name FROM notify.schedules lists them.")));
	}
	s = read_schedule(SPI_tuptable->vals[0], SPI_tuptable->tupdesc);
	run_id = start_run(s, 0);
	events = emit_events(s, &skipped);
	finish_run(run_id, NULL, events, skipped);
	SPI_finish();
	PG_RETURN_INT32(events);
}

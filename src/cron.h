/*-------------------------------------------------------------------------
 *
 * cron.h
 *	  Cron expressions for notify_ext schedules: parsing, and the next time
 *	  an expression fires in a named time zone.
 *
 * This module is plain C: it includes no PostgreSQL headers, allocates
 * nothing and uses only libc, so it can be unit-tested standalone.  It never
 * reads the process time zone (TZ, localtime): every conversion from an
 * instant to local civil time goes through a callback supplied by the caller
 * (the extension implements it with pg_localtime for notify.timezone).
 *
 * Syntax: five fields, "minute hour day-of-month month day-of-week":
 *
 *	  minute 0-59, hour 0-23, day-of-month 1-31, month 1-12 or jan-dec,
 *	  day-of-week 0-7 or sun-sat (0 and 7 are both Sunday)
 *
 * Each field is a comma-separated list of items; an item is "*", a value
 * or a range "a-b", optionally followed by "/step": "*" followed by "/15"
 * is every 15th value, "10-50/10" is 10,20,...,50, and "5/10" is
 * "5-max/10".  Names are three letters ("jan", "mon") and may be used in
 * ranges ("mon-fri").  In the day-of-week field the open end of "*" and of
 * "5/2" is Saturday (6); 7 is accepted only as another way to write Sunday.
 * A range must not go backwards ("fri-mon" is an error); a step must be
 * between 1 and the field's maximum.  The macros @yearly and @annually
 * (0 0 1 1 *), @monthly (0 0 1 * *), @weekly (0 0 * * 0), @daily and
 * @midnight (0 0 * * *) and @hourly (0 * * * *) stand for the expressions
 * shown.  Names and macros are case-insensitive.
 *
 * Day matching follows Vixie cron: when both the day-of-month and the
 * day-of-week fields are restricted, a day matches if EITHER matches
 * ("0 0 1 * mon" is the 1st of each month and every Monday).  As in Vixie
 * cron, a day field whose text starts with "*" (a plain "*" or "*" with a
 * step) counts as unrestricted, and then both fields must match.
 *
 * Daylight saving time.  Fire times are whole minutes of local time.  A job
 * is one of two kinds, decided by its hour field as in Vixie cron:
 *
 *	- Fixed-hour jobs (hour field not starting with "*": "30 2 * * *",
 *	  "* 8-23 * * *", @daily) follow the wall clock, and every matching
 *	  local time fires exactly once.  A local time skipped by a
 *	  spring-forward gap fires at the first instant after the gap (02:30 on
 *	  a day whose clocks jump 02:00 -> 03:00 fires at 03:00), and all the
 *	  times of one gap share that single fire: "0,15,30,45 2 * * *" fires
 *	  once, at 03:00, that day.  A local time that occurs twice at a
 *	  fall-back fires at its first occurrence only.
 *	- Hour-wildcard jobs (hour field "*" or "*" with a step: "0 * * * *",
 *	  @hourly, every-15-minutes) follow real elapsed time: they fire at
 *	  every instant whose local time matches.  A repeated hour runs twice
 *	  (01:30 EDT and 01:30 EST are both real instants) and a skipped hour
 *	  does not run, so "every 30 minutes" stays 30 real minutes apart across
 *	  both transitions.
 *
 * src/cron.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_CRON_H
#define NOTIFY_CRON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Recommended size for the caller's error buffer */
#define CRON_ERRBUF_SIZE	256

/*
 * How far cron_next looks ahead, in days of local time: a little over nine
 * years, enough for "0 0 29 2 *" across a skipped leap year (2096 -> 2104).
 */
#define CRON_SEARCH_DAYS	3400

/*
 * A parsed expression: one bit per allowed value.  Bit n of minutes is
 * minute n, and so on; months use bits 1-12, days bits 1-31, weekdays bits
 * 0-6 (Sunday = 0, a 7 in the text sets bit 0).
 */
typedef struct CronExpr
{
	uint64_t	minutes;		/* bits 0-59 */
	uint32_t	hours;			/* bits 0-23 */
	uint32_t	days;			/* bits 1-31 */
	uint16_t	months;			/* bits 1-12 */
	uint8_t		weekdays;		/* bits 0-6 */
	bool		dom_star;		/* day-of-month field starts with '*' */
	bool		dow_star;		/* day-of-week field starts with '*' */
	bool		hour_star;		/* hour field starts with '*': see DST above */
} CronExpr;

/*
 * Local civil time of an instant, as the to-local callback reports it.
 * Every member must be filled; cron_next checks that they agree with
 * utc + utc_offset and gives up (returns false) when they do not.
 */
typedef struct CronCivil
{
	int			year;			/* e.g. 2026 */
	int			month;			/* 1-12 */
	int			mday;			/* 1-31 */
	int			hour;			/* 0-23 */
	int			minute;			/* 0-59 */
	int			second;			/* 0-59 */
	int			wday;			/* 0-6, Sunday = 0 */
	int32_t		utc_offset;		/* seconds east of UTC (local - UTC) */
} CronCivil;

/*
 * Convert utc (seconds since 1970-01-01 00:00:00 UTC, no leap seconds) to
 * local civil time in the caller's time zone.  Returns false on failure,
 * which makes cron_next return false.  arg is passed through unchanged.
 */
typedef bool (*cron_to_local_fn) (int64_t utc, CronCivil *out, void *arg);

/*
 * Parse a five-field expression or macro into *out.  On error returns
 * false, zeroes *out and writes a message naming the field and the problem
 * ("minute field: 61 is out of range 0-59") into errbuf (at most errlen
 * bytes, always NUL-terminated; errbuf may be NULL).  Leading and trailing
 * white space is ignored; fields are separated by white space.
 */
extern bool cron_parse(const char *text, CronExpr *out,
					   char *errbuf, size_t errlen);

/*
 * First fire instant strictly after after_utc, with local time given by
 * to_local (see the DST rules above).  Returns false, leaving *next_utc
 * alone, when the expression does not fire within CRON_SEARCH_DAYS (e.g.
 * "0 0 30 2 *"), when the callback fails or reports inconsistent data, or
 * when after_utc is beyond +/- 2^40 seconds.
 */
extern bool cron_next(const CronExpr *e, int64_t after_utc,
					  cron_to_local_fn to_local, void *arg,
					  int64_t *next_utc);

#endif							/* NOTIFY_CRON_H */

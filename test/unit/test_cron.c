/*-------------------------------------------------------------------------
 *
 * test_cron.c
 *	  Standalone unit tests for src/cron.c (no PostgreSQL).
 *
 * Local time comes from the C library (setenv("TZ") + tzset + localtime_r)
 * through the same kind of callback the extension builds on pg_localtime;
 * the zones used (UTC, Europe/Madrid, America/New_York, Australia/Lord_Howe,
 * Pacific/Apia) must be in the system tz database.
 *
 * Prints every failure, then "N passed, M failed"; exits non-zero when
 * anything failed.
 *
 * test/unit/test_cron.c
 *
 *-------------------------------------------------------------------------
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L	/* setenv, tzset, localtime_r under -std=c11 */
#endif

#include "cron.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int	n_passed = 0;
static int	n_failed = 0;

#define CHECK(cond, ...) \
	do { \
		if (cond) \
			n_passed++; \
		else \
		{ \
			n_failed++; \
			printf("FAIL %s:%d: ", __FILE__, __LINE__); \
			printf(__VA_ARGS__); \
			printf("\n"); \
		} \
	} while (0)

/* callback calls, so that tests can bound the work cron_next does */
static long n_calls = 0;

/* is_leap - Gregorian leap year */
static int
is_leap(int y)
{
	return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
}

/* days_since_epoch - day number of a date, written independently of cron.c */
static int64_t
days_since_epoch(int y, int m, int d)
{
	static const int before_month[12] = {
		0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334
	};
	int64_t		py = y - 1;		/* whole years before y, from 0001 */

	return py * 365 + py / 4 - py / 100 + py / 400 + before_month[m - 1] +
		(m > 2 && is_leap(y)) + (d - 1) - 719162;
}

/* use_zone - make the C library's local time be that of zone */
static void
use_zone(const char *zone)
{
	static char current[64] = "";

	if (strcmp(current, zone) == 0)
		return;
	snprintf(current, sizeof(current), "%s", zone);
	setenv("TZ", zone, 1);
	tzset();
}

/* zone_to_local - the test's cron_to_local_fn: arg is a tz database name */
static bool
zone_to_local(int64_t utc, CronCivil *out, void *arg)
{
	time_t		t = (time_t) utc;
	struct tm	tm;
	int64_t		local;

	n_calls++;
	use_zone((const char *) arg);
	if (localtime_r(&t, &tm) == NULL)
		return false;
	out->year = tm.tm_year + 1900;
	out->month = tm.tm_mon + 1;
	out->mday = tm.tm_mday;
	out->hour = tm.tm_hour;
	out->minute = tm.tm_min;
	out->second = tm.tm_sec;
	out->wday = tm.tm_wday;
	local = days_since_epoch(out->year, out->month, out->mday) * 86400 +
		out->hour * 3600 + out->minute * 60 + out->second;
	out->utc_offset = (int32_t) (local - utc);
	return true;
}

/* fixed_to_local - a zone at UTC+05:30 by arithmetic alone, ignoring TZ */
static bool
fixed_to_local(int64_t utc, CronCivil *out, void *arg)
{
	int64_t		local = utc + 19800;
	int64_t		day = local >= 0 ? local / 86400 : (local - 86399) / 86400;
	int64_t		sod = local - day * 86400;
	int			y = 1970;
	int			m = 1;

	(void) arg;
	n_calls++;
	while (days_since_epoch(y + 1, 1, 1) <= day)
		y++;
	while (m < 12 && days_since_epoch(y, m + 1, 1) <= day)
		m++;
	out->year = y;
	out->month = m;
	out->mday = (int) (day - days_since_epoch(y, m, 1)) + 1;
	out->hour = (int) (sod / 3600);
	out->minute = (int) (sod / 60 % 60);
	out->second = (int) (sod % 60);
	out->wday = (int) ((day % 7 + 11) % 7);	/* 1970-01-01 was a Thursday */
	out->utc_offset = 19800;
	return true;
}

/* failing_to_local - a callback that always fails */
static bool
failing_to_local(int64_t utc, CronCivil *out, void *arg)
{
	(void) utc;
	(void) out;
	(void) arg;
	return false;
}

/* lying_to_local - UTC, but with a wrong weekday */
static bool
lying_to_local(int64_t utc, CronCivil *out, void *arg)
{
	if (!zone_to_local(utc, out, arg))
		return false;
	out->wday = (out->wday + 1) % 7;
	return true;
}

/* parse_time - "YYYY-MM-DD HH:MM[:SS] +HHMM" to seconds since the epoch */
static int64_t
parse_time(const char *s)
{
	int			y,
				mo,
				d,
				h,
				mi,
				sec = 0,
				oh,
				om;
	char		sign;
	int			n;

	if (sscanf(s, "%d-%d-%d %d:%d:%d %c%2d%2d", &y, &mo, &d, &h, &mi, &sec,
			   &sign, &oh, &om) != 9)
	{
		sec = 0;
		n = sscanf(s, "%d-%d-%d %d:%d %c%2d%2d", &y, &mo, &d, &h, &mi, &sign,
				   &oh, &om);
		if (n != 8)
		{
			printf("bad time literal in test: %s\n", s);
			exit(2);
		}
	}
	return days_since_epoch(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec -
		(sign == '-' ? -1 : 1) * (oh * 3600 + om * 60);
}

/* format_time - an instant as local time in zone, in parse_time's format */
static const char *
format_time(int64_t t, const char *zone)
{
	static char buf[8][48];
	static int	which = 0;
	char	   *out = buf[which++ % 8];
	CronCivil	c;
	int			off;
	char		seconds[8] = "";

	if (!zone_to_local(t, &c, (void *) zone))
		return "(callback failed)";
	off = c.utc_offset < 0 ? -c.utc_offset : c.utc_offset;
	if (c.second != 0)
		snprintf(seconds, sizeof(seconds), ":%02d", c.second);
	snprintf(out, sizeof(buf[0]), "%04d-%02d-%02d %02d:%02d%s %c%02d%02d",
			 c.year, c.month, c.mday, c.hour, c.minute, seconds,
			 c.utc_offset < 0 ? '-' : '+', off / 3600, off / 60 % 60);
	return out;
}

/* mask_text - bits lo..hi of a mask as "1-5,7,9" */
static void
mask_text(uint64_t bits, int lo, int hi, char *out, size_t outlen)
{
	size_t		o = 0;
	int			v = lo;

	out[0] = '\0';
	while (v <= hi && o + 12 < outlen)
	{
		int			end = v;

		if (!((bits >> v) & 1))
		{
			v++;
			continue;
		}
		while (end + 1 <= hi && ((bits >> (end + 1)) & 1))
			end++;
		if (end == v)
			o += (size_t) snprintf(out + o, outlen - o, "%s%d", o ? "," : "", v);
		else
			o += (size_t) snprintf(out + o, outlen - o, "%s%d-%d", o ? "," : "", v, end);
		v = end + 1;
	}
}

/*
 * expr_text - a parsed expression as its five value lists, a '*' after the
 * hour, day-of-month and day-of-week lists when that field counts as "*"
 */
static const char *
expr_text(const CronExpr *e)
{
	static char out[1100];
	char		f[5][200];

	mask_text(e->minutes, 0, 59, f[0], sizeof(f[0]));
	mask_text(e->hours, 0, 23, f[1], sizeof(f[1]));
	mask_text(e->days, 1, 31, f[2], sizeof(f[2]));
	mask_text(e->months, 1, 12, f[3], sizeof(f[3]));
	mask_text(e->weekdays, 0, 6, f[4], sizeof(f[4]));
	snprintf(out, sizeof(out), "%s %s%s %s%s %s %s%s",
			 f[0], f[1], e->hour_star ? "*" : "", f[2], e->dom_star ? "*" : "",
			 f[3], f[4], e->dow_star ? "*" : "");
	return out;
}

/* expect_parse - text parses, and to the expected value lists */
static void
expect_parse(const char *text, const char *want)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE] = "";
	bool		ok = cron_parse(text, &e, err, sizeof(err));

	CHECK(ok && strcmp(expr_text(&e), want) == 0,
		  "parse [%s]: got %s [%s], want [%s]", text, ok ? "ok" : "error",
		  ok ? expr_text(&e) : err, want);
}

/* expect_error - text is rejected with a message containing want */
static void
expect_error(const char *text, const char *want)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE] = "";
	bool		ok;

	memset(&e, 0xAB, sizeof(e));
	ok = cron_parse(text, &e, err, sizeof(err));
	CHECK(!ok && strstr(err, want) != NULL && e.minutes == 0 && e.months == 0,
		  "parse [%s]: got %s [%s], want an error containing [%s]",
		  text ? text : "(null)", ok ? "ok" : "error", ok ? expr_text(&e) : err, want);
}

/* expect_next - the next fire after "after" (in zone), or "never" */
static void
expect_next(const char *zone, const char *text, const char *after, const char *want)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE] = "";
	int64_t		next = 0;
	const char *got;

	if (!cron_parse(text, &e, err, sizeof(err)))
	{
		CHECK(false, "next [%s]: parse failed: %s", text, err);
		return;
	}
	if (cron_next(&e, parse_time(after), zone_to_local, (void *) zone, &next))
		got = format_time(next, zone);
	else
		got = "never";
	CHECK(strcmp(got, want) == 0, "next [%s] after %s in %s: got %s, want %s",
		  text, after, zone, got, want);
}

/* expect_series - successive fires after "after", joined with ", " */
static void
expect_series(const char *zone, const char *text, const char *after, const char *want)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE] = "";
	char		got[1024] = "";
	size_t		o = 0;
	int64_t		t = parse_time(after);
	int			count = 1;
	const char *p;

	for (p = want; *p != '\0'; p++)
		count += *p == ',';
	if (!cron_parse(text, &e, err, sizeof(err)))
	{
		CHECK(false, "series [%s]: parse failed: %s", text, err);
		return;
	}
	while (count-- > 0)
	{
		if (!cron_next(&e, t, zone_to_local, (void *) zone, &t))
		{
			o += (size_t) snprintf(got + o, sizeof(got) - o, "%snever", o ? ", " : "");
			break;
		}
		o += (size_t) snprintf(got + o, sizeof(got) - o, "%s%s", o ? ", " : "",
							   format_time(t, zone));
	}
	CHECK(strcmp(got, want) == 0, "series [%s] after %s in %s:\n  got  %s\n  want %s",
		  text, after, zone, got, want);
}

/* count_fires - fires in (from, to] */
static int
count_fires(const char *zone, const char *text, const char *from, const char *to)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE];
	int64_t		t = parse_time(from);
	int64_t		end = parse_time(to);
	int			n = 0;

	if (!cron_parse(text, &e, err, sizeof(err)))
		return -1;
	while (cron_next(&e, t, zone_to_local, (void *) zone, &t) && t <= end)
		n++;
	return n;
}

/* test_parse_valid - the syntax that must be accepted, and what it means */
static void
test_parse_valid(void)
{
	expect_parse("* * * * *", "0-59 0-23* 1-31* 1-12 0-6*");
	expect_parse("0 7 * * *", "0 7 1-31* 1-12 0-6*");
	expect_parse("* 8-23 * * *", "0-59 8-23 1-31* 1-12 0-6*");
	expect_parse("*/15 * * * *", "0,15,30,45 0-23* 1-31* 1-12 0-6*");
	expect_parse("10-50/10 * * * *", "10,20,30,40,50 0-23* 1-31* 1-12 0-6*");
	expect_parse("5/10 * * * *", "5,15,25,35,45,55 0-23* 1-31* 1-12 0-6*");
	expect_parse("1,5 * * * *", "1,5 0-23* 1-31* 1-12 0-6*");
	expect_parse("1-5,30,58-59 * * * *", "1-5,30,58-59 0-23* 1-31* 1-12 0-6*");
	expect_parse("0 */6 * * *", "0 0,6,12,18* 1-31* 1-12 0-6*");
	expect_parse("0 0 1-31/10 * *", "0 0 1,11,21,31 1-12 0-6*");
	expect_parse("0 0 */2 * 1", "0 0 1,3,5,7,9,11,13,15,17,19,21,23,25,27,29,31* 1-12 1");
	expect_parse("0 9 * jan-mar mon-fri", "0 9 1-31* 1-3 1-5");
	expect_parse("0 9 * JAN,Jun,dEc SUN,sat", "0 9 1-31* 1,6,12 0,6");
	expect_parse("0 0 * * 7", "0 0 1-31* 1-12 0");
	expect_parse("0 0 * * 0,7", "0 0 1-31* 1-12 0");
	expect_parse("0 0 * * 5-7", "0 0 1-31* 1-12 0,5-6");
	expect_parse("0 0 * * 0-7", "0 0 1-31* 1-12 0-6");
	expect_parse("0 0 * * */2", "0 0 1-31* 1-12 0,2,4,6*");
	expect_parse("0 0 * * mon/2", "0 0 1-31* 1-12 1,3,5");
	expect_parse("0 0 * feb/3 *", "0 0 1-31* 2,5,8,11 0-6*");
	expect_parse("0 0 13 * fri", "0 0 13 1-12 5");
	expect_parse("59 23 31 12 6", "59 23 31 12 6");
	expect_parse("0 0 30 2 *", "0 0 30 2 0-6*");
	expect_parse("  0\t7  *  *  *  ", "0 7 1-31* 1-12 0-6*");
	expect_parse("0 7 * * *\r\n", "0 7 1-31* 1-12 0-6*");
	expect_parse("*/59 */23 */31 */12 */7", "0,59 0,23* 1* 1 0*");
	expect_parse("00 07 01 01 00", "0 7 1 1 0");
	expect_parse("@hourly", "0 0-23* 1-31* 1-12 0-6*");
	expect_parse("@daily", "0 0 1-31* 1-12 0-6*");
	expect_parse("@midnight", "0 0 1-31* 1-12 0-6*");
	expect_parse("@weekly", "0 0 1-31* 1-12 0");
	expect_parse("@monthly", "0 0 1 1-12 0-6*");
	expect_parse("@yearly", "0 0 1 1 0-6*");
	expect_parse("@annually", "0 0 1 1 0-6*");
	expect_parse(" @Daily ", "0 0 1-31* 1-12 0-6*");
}

/* test_parse_errors - every rejection names its field and its reason */
static void
test_parse_errors(void)
{
	expect_error("", "expected 5 fields, got 0");
	expect_error("   ", "expected 5 fields, got 0");
	expect_error(NULL, "expected 5 fields");
	expect_error("* * * *", "expected 5 fields, got 4");
	expect_error("* * * * * *", "expected 5 fields, got 6");
	expect_error("61 * * * *", "minute field: 61 is out of range 0-59");
	expect_error("60 * * * *", "minute field: 60 is out of range 0-59");
	expect_error("0 24 * * *", "hour field: 24 is out of range 0-23");
	expect_error("0 0 0 * *", "day-of-month field: 0 is out of range 1-31");
	expect_error("0 0 32 * *", "day-of-month field: 32 is out of range 1-31");
	expect_error("0 0 * 0 *", "month field: 0 is out of range 1-12");
	expect_error("0 0 * 13 *", "month field: 13 is out of range 1-12");
	expect_error("0 0 * * 8", "day-of-week field: 8 is out of range 0-7");
	expect_error("99999999999999999999999 * * * *",
				 "minute field: 99999999999999999999... is out of range 0-59");
	expect_error("0 0 * * fry", "day-of-week field: unknown name \"fry\"");
	expect_error("0 0 * * monday", "day-of-week field: unknown name \"monday\"");
	expect_error("0 0 * janu *", "month field: unknown name \"janu\"");
	expect_error("0 0 * * mon-fry", "day-of-week field: unknown name \"fry\"");
	expect_error("0 0 * mon *", "month field: unknown name \"mon\"");
	expect_error("0 0 * * jan", "day-of-week field: unknown name \"jan\"");
	expect_error("x * * * *", "minute field: \"x\" is not a number");
	expect_error("0 noon * * *", "hour field: \"noon\" is not a number");
	expect_error("0 0 L * *", "day-of-month field: \"L\" is not a number");
	expect_error("5-1 * * * *", "minute field: range \"5-1\" goes backwards");
	expect_error("0 0 * * fri-mon", "day-of-week field: range \"fri-mon\" goes backwards");
	expect_error("*/0 * * * *", "minute field: step 0 is out of range 1-59");
	expect_error("*/60 * * * *", "minute field: step 60 is out of range 1-59");
	expect_error("0 */24 * * *", "hour field: step 24 is out of range 1-23");
	expect_error("0 0 * */13 *", "month field: step 13 is out of range 1-12");
	expect_error("*/ * * * *", "minute field: \"/\" must be followed by a step number");
	expect_error("*/x * * * *", "minute field: \"/\" must be followed by a step number");
	expect_error("1- * * * *", "minute field: range \"1-\" has no end");
	expect_error("1,,2 * * * *", "minute field: empty element in list");
	expect_error("1, * * * *", "minute field: empty element in list");
	expect_error(",1 * * * *", "minute field: empty element in list");
	expect_error("*-5 * * * *", "minute field: unexpected character '-'");
	expect_error("0 0 ? * *", "day-of-month field: unexpected character '?'");
	expect_error("0 0 * * 1#2", "day-of-week field: unexpected character '#'");
	expect_error("1/2/3 * * * *", "minute field: unexpected character '/'");
	expect_error("-1 * * * *", "minute field: unexpected character '-'");
	expect_error("0 0 * * \xc3\xa9", "day-of-week field: unexpected byte 0xC3 in \"??\"");
	expect_error("@fortnightly", "unknown macro \"@fortnightly\"");
	expect_error("@reboot", "@reboot is not supported");
	expect_error("@daily 0", "unexpected text after @daily");

	/* errbuf may be NULL or tiny; the message is cut, never overrun */
	{
		CronExpr	e;
		char		tiny[8];

		CHECK(!cron_parse("61 * * * *", &e, NULL, 0), "NULL errbuf");
		memset(tiny, 'z', sizeof(tiny));
		CHECK(!cron_parse("61 * * * *", &e, tiny, 5) &&
			  strcmp(tiny, "minu") == 0 && tiny[5] == 'z', "tiny errbuf: [%s]", tiny);
		CHECK(!cron_parse("* * * * *", NULL, tiny, sizeof(tiny)), "NULL out");
	}
}

/* test_next_basic - next fire in UTC: the examples, names, steps */
static void
test_next_basic(void)
{
	const char *z = "UTC";

	/* S16: "every day at 07:00" */
	expect_next(z, "0 7 * * *", "2026-03-10 06:59 +0000", "2026-03-10 07:00 +0000");
	expect_next(z, "0 7 * * *", "2026-03-10 07:00 +0000", "2026-03-11 07:00 +0000");
	expect_next(z, "0 7 * * *", "2026-12-31 07:00:01 +0000", "2027-01-01 07:00 +0000");
	/* S16: "every minute from 08:00 to the end of the day" */
	expect_next(z, "* 8-23 * * *", "2026-03-10 07:59:30 +0000", "2026-03-10 08:00 +0000");
	expect_next(z, "* 8-23 * * *", "2026-03-10 12:00 +0000", "2026-03-10 12:01 +0000");
	expect_next(z, "* 8-23 * * *", "2026-03-10 23:59 +0000", "2026-03-11 08:00 +0000");
	expect_next(z, "* 8-23 * * *", "2026-03-10 03:00 +0000", "2026-03-10 08:00 +0000");
	/* strictly after; seconds are ignored, fires are on whole minutes */
	expect_next(z, "* * * * *", "2026-03-10 10:00 +0000", "2026-03-10 10:01 +0000");
	expect_next(z, "* * * * *", "2026-03-10 10:00:59 +0000", "2026-03-10 10:01 +0000");
	/* steps */
	expect_series(z, "*/15 * * * *", "2026-03-10 10:07 +0000",
				  "2026-03-10 10:15 +0000, 2026-03-10 10:30 +0000, "
				  "2026-03-10 10:45 +0000, 2026-03-10 11:00 +0000");
	expect_series(z, "10-50/10 * * * *", "2026-03-10 10:45 +0000",
				  "2026-03-10 10:50 +0000, 2026-03-10 11:10 +0000");
	expect_series(z, "5/10 * * * *", "2026-03-10 10:50 +0000",
				  "2026-03-10 10:55 +0000, 2026-03-10 11:05 +0000");
	expect_next(z, "0 */6 * * *", "2026-03-10 18:00 +0000", "2026-03-11 00:00 +0000");
	/* names; 2026-01-01 is a Thursday */
	expect_next(z, "0 9 * * mon-fri", "2026-01-02 09:00 +0000", "2026-01-05 09:00 +0000");
	expect_next(z, "0 0 * * SUN", "2026-01-01 00:00 +0000", "2026-01-04 00:00 +0000");
	expect_next(z, "0 0 * * 7", "2026-01-01 00:00 +0000", "2026-01-04 00:00 +0000");
	expect_next(z, "0 0 * * 6", "2026-01-01 00:00 +0000", "2026-01-03 00:00 +0000");
	expect_next(z, "0 12 1 jan-mar *", "2026-03-01 12:00 +0000", "2027-01-01 12:00 +0000");
	expect_next(z, "30 6 * dec *", "2026-01-15 00:00 +0000", "2026-12-01 06:30 +0000");
	/* day of month: months without a 31st are skipped */
	expect_next(z, "0 0 31 * *", "2026-01-31 00:00 +0000", "2026-03-31 00:00 +0000");
	expect_next(z, "59 23 31 12 *", "2026-12-31 23:59 +0000", "2027-12-31 23:59 +0000");
	/* either day field matches when both are restricted (Vixie) */
	expect_series(z, "0 0 13 * fri", "2026-01-01 00:00 +0000",
				  "2026-01-02 00:00 +0000, 2026-01-09 00:00 +0000, "
				  "2026-01-13 00:00 +0000, 2026-01-16 00:00 +0000");
	expect_series(z, "0 0 1 * mon", "2026-01-27 00:00 +0000",
				  "2026-02-01 00:00 +0000, 2026-02-02 00:00 +0000");
	/* ... but both must match when one starts with '*' (Vixie) */
	expect_series(z, "0 0 */2 * 1", "2026-01-01 00:00 +0000",
				  "2026-01-05 00:00 +0000, 2026-01-19 00:00 +0000");
	/* Feb 29 */
	expect_next(z, "0 0 29 2 *", "2027-01-01 00:00 +0000", "2028-02-29 00:00 +0000");
	expect_next(z, "0 0 29 2 *", "2028-02-29 00:00 +0000", "2032-02-29 00:00 +0000");
	expect_next(z, "0 0 29 2 *", "2096-03-01 00:00 +0000", "2104-02-29 00:00 +0000");
	/* never */
	expect_next(z, "0 0 30 2 *", "2026-01-01 00:00 +0000", "never");
	expect_next(z, "0 0 31 4,6,9,11 *", "2026-01-01 00:00 +0000", "never");
	/* ... unless the weekday rescues it */
	expect_next(z, "0 0 30 2 mon", "2026-01-01 00:00 +0000", "2026-02-02 00:00 +0000");
	/* macros */
	expect_next(z, "@hourly", "2026-03-10 10:30 +0000", "2026-03-10 11:00 +0000");
	expect_next(z, "@daily", "2026-03-10 10:30 +0000", "2026-03-11 00:00 +0000");
	expect_next(z, "@weekly", "2026-01-01 00:00 +0000", "2026-01-04 00:00 +0000");
	expect_next(z, "@monthly", "2026-01-15 00:00 +0000", "2026-02-01 00:00 +0000");
	expect_next(z, "@yearly", "2026-01-01 00:00 +0000", "2027-01-01 00:00 +0000");
	/* before 1970 */
	expect_next(z, "0 0 1 1 *", "1969-06-01 00:00 +0000", "1970-01-01 00:00 +0000");
	expect_next(z, "0 12 * * thu", "1969-12-25 12:00 +0000", "1970-01-01 12:00 +0000");
}

/* test_dst_madrid - Europe/Madrid 2026: 03-29 02:00 -> 03:00, 10-25 03:00 -> 02:00 */
static void
test_dst_madrid(void)
{
	const char *z = "Europe/Madrid";

	/* spring forward: a job in the gap runs once, when the gap ends */
	expect_series(z, "30 2 * * *", "2026-03-28 02:30 +0100",
				  "2026-03-29 03:00 +0200, 2026-03-30 02:30 +0200");
	expect_series(z, "*/15 2 * * *", "2026-03-29 00:00 +0100",
				  "2026-03-29 03:00 +0200, 2026-03-30 02:00 +0200");
	expect_series(z, "0,30 2,3 * * *", "2026-03-29 00:00 +0100",
				  "2026-03-29 03:00 +0200, 2026-03-29 03:30 +0200");
	expect_next(z, "30 2 * * *", "2026-03-29 01:59:59 +0100", "2026-03-29 03:00 +0200");
	expect_next(z, "30 2 * * *", "2026-03-29 03:00 +0200", "2026-03-30 02:30 +0200");
	expect_next(z, "0 7 * * *", "2026-03-28 07:00 +0100", "2026-03-29 07:00 +0200");
	/* hour wildcards follow real time: the missing hour is not run */
	expect_series(z, "*/30 * * * *", "2026-03-29 00:45 +0100",
				  "2026-03-29 01:00 +0100, 2026-03-29 01:30 +0100, "
				  "2026-03-29 03:00 +0200, 2026-03-29 03:30 +0200");
	expect_series(z, "0 * * * *", "2026-03-29 00:30 +0100",
				  "2026-03-29 01:00 +0100, 2026-03-29 03:00 +0200, 2026-03-29 04:00 +0200");

	/* fall back: a fixed time runs once, at its first occurrence */
	expect_series(z, "30 2 * * *", "2026-10-24 02:30 +0200",
				  "2026-10-25 02:30 +0200, 2026-10-26 02:30 +0100");
	expect_next(z, "15 2 * * *", "2026-10-25 02:20 +0200", "2026-10-26 02:15 +0100");
	expect_series(z, "* 2 * * *", "2026-10-25 02:58 +0200",
				  "2026-10-25 02:59 +0200, 2026-10-26 02:00 +0100");
	/* hour wildcards run in both occurrences of the repeated hour */
	expect_series(z, "*/30 * * * *", "2026-10-25 01:45 +0200",
				  "2026-10-25 02:00 +0200, 2026-10-25 02:30 +0200, "
				  "2026-10-25 02:00 +0100, 2026-10-25 02:30 +0100, "
				  "2026-10-25 03:00 +0100");
	expect_next(z, "*/30 * * * *", "2026-10-25 02:40 +0200", "2026-10-25 02:00 +0100");
	expect_next(z, "*/30 * * * *", "2026-10-25 02:10 +0100", "2026-10-25 02:30 +0100");
	expect_next(z, "0 */2 * * *", "2026-10-25 02:00 +0200", "2026-10-25 02:00 +0100");
}

/* test_dst_new_york - America/New_York 2026: 03-08 02:00 -> 03:00, 11-01 02:00 -> 01:00 */
static void
test_dst_new_york(void)
{
	const char *z = "America/New_York";

	expect_series(z, "30 2 * * *", "2026-03-07 02:30 -0500",
				  "2026-03-08 03:00 -0400, 2026-03-09 02:30 -0400");
	expect_series(z, "*/30 * * * *", "2026-03-08 00:45 -0500",
				  "2026-03-08 01:00 -0500, 2026-03-08 01:30 -0500, "
				  "2026-03-08 03:00 -0400, 2026-03-08 03:30 -0400");
	expect_series(z, "30 1 * * *", "2026-10-31 01:30 -0400",
				  "2026-11-01 01:30 -0400, 2026-11-02 01:30 -0500");
	expect_series(z, "30 2 * * *", "2026-10-31 02:30 -0400",
				  "2026-11-01 02:30 -0500, 2026-11-02 02:30 -0500");
	expect_series(z, "*/30 * * * *", "2026-11-01 00:45 -0400",
				  "2026-11-01 01:00 -0400, 2026-11-01 01:30 -0400, "
				  "2026-11-01 01:00 -0500, 2026-11-01 01:30 -0500, "
				  "2026-11-01 02:00 -0500");
	expect_next(z, "0 7 * * *", "2026-11-01 06:59 -0500", "2026-11-01 07:00 -0500");

	/*
	 * Whole days: an hour wildcard runs by real time (23 or 25 hours), a
	 * fixed-hour job once per wall-clock time (the gap's hour merging into
	 * 03:00).
	 */
	CHECK(count_fires(z, "* * * * *", "2026-03-08 00:00 -0500", "2026-03-09 00:00 -0400") == 23 * 60,
		  "every minute, spring day");
	CHECK(count_fires(z, "* * * * *", "2026-11-01 00:00 -0400", "2026-11-02 00:00 -0500") == 25 * 60,
		  "every minute, fall day");
	CHECK(count_fires(z, "* 0-23 * * *", "2026-03-08 00:00 -0500", "2026-03-09 00:00 -0400") == 23 * 60,
		  "every minute of fixed hours, spring day");
	CHECK(count_fires(z, "* 0-23 * * *", "2026-11-01 00:00 -0400", "2026-11-02 00:00 -0500") == 24 * 60,
		  "every minute of fixed hours, fall day");
	CHECK(count_fires(z, "0 * * * *", "2026-11-01 00:00 -0400", "2026-11-02 00:00 -0500") == 25,
		  "@hourly, fall day");
	CHECK(count_fires(z, "0 0-23 * * *", "2026-11-01 00:00 -0400", "2026-11-02 00:00 -0500") == 24,
		  "fixed hourly, fall day");
	CHECK(count_fires(z, "0 0-23 * * *", "2026-03-08 00:00 -0500", "2026-03-09 00:00 -0400") == 23,
		  "fixed hourly, spring day");
	CHECK(count_fires(z, "30 2 * * *", "2026-01-01 00:00 -0500", "2027-01-01 00:00 -0500") == 365,
		  "a daily job in the gap runs every day of the year");
}

/* test_dst_odd_zones - a 30-minute shift, and a whole day skipped */
static void
test_dst_odd_zones(void)
{
	/* Lord Howe: 2026-04-05 02:00 -> 01:30, 2026-10-04 02:00 -> 02:30 */
	expect_series("Australia/Lord_Howe", "45 1 * * *", "2026-04-04 01:45 +1100",
				  "2026-04-05 01:45 +1100, 2026-04-06 01:45 +1030");
	expect_series("Australia/Lord_Howe", "*/15 * * * *", "2026-04-05 01:40 +1100",
				  "2026-04-05 01:45 +1100, 2026-04-05 01:30 +1030, "
				  "2026-04-05 01:45 +1030, 2026-04-05 02:00 +1030");
	expect_series("Australia/Lord_Howe", "0 2 * * *", "2026-10-03 02:00 +1030",
				  "2026-10-04 02:30 +1100, 2026-10-05 02:00 +1100");
	expect_series("Australia/Lord_Howe", "0 * * * *", "2026-10-04 00:30 +1030",
				  "2026-10-04 01:00 +1030, 2026-10-04 03:00 +1100");

	/* Samoa skipped 2011-12-30 (23:59:59 -10 was followed by 00:00 +14) */
	expect_series("Pacific/Apia", "0 12 * * *", "2011-12-29 12:00 -1000",
				  "2011-12-31 00:00 +1400, 2011-12-31 12:00 +1400");
	expect_series("Pacific/Apia", "0 */12 * * *", "2011-12-29 11:00 -1000",
				  "2011-12-29 12:00 -1000, 2011-12-31 00:00 +1400, 2011-12-31 12:00 +1400");
	expect_next("Pacific/Apia", "0 0 30 12 *", "2011-12-01 00:00 -1000", "2011-12-31 00:00 +1400");
}

/* test_callbacks - no reliance on TZ, bounded work, failures propagate */
static void
test_callbacks(void)
{
	CronExpr	e;
	char		err[CRON_ERRBUF_SIZE];
	int64_t		next = 42;
	int64_t		after = parse_time("2026-01-01 07:00 +0530");

	/* the process zone says New York; the callback says +05:30 */
	use_zone("America/New_York");
	CHECK(cron_parse("0 7 * * *", &e, err, sizeof(err)), "parse: %s", err);
	CHECK(cron_next(&e, after, fixed_to_local, NULL, &next) &&
		  next == parse_time("2026-01-02 07:00 +0530"),
		  "fixed +05:30 zone: got %s", format_time(next, "Asia/Kolkata"));

	/* few callback calls: a daily job, and an expression that never fires */
	n_calls = 0;
	CHECK(cron_next(&e, after, zone_to_local, (void *) "Europe/Madrid", &next),
		  "daily in Madrid");
	CHECK(n_calls <= 8, "daily job took %ld callback calls", n_calls);
	CHECK(cron_parse("0 0 30 2 *", &e, err, sizeof(err)), "parse: %s", err);
	n_calls = 0;
	next = 42;
	CHECK(!cron_next(&e, after, zone_to_local, (void *) "Europe/Madrid", &next) && next == 42,
		  "never fires, next left alone");
	CHECK(n_calls <= 2, "never-firing job took %ld callback calls", n_calls);

	/* a failing or inconsistent callback makes cron_next fail */
	CHECK(cron_parse("* * * * *", &e, err, sizeof(err)), "parse: %s", err);
	CHECK(!cron_next(&e, after, failing_to_local, NULL, &next), "failing callback");
	CHECK(!cron_next(&e, after, lying_to_local, (void *) "UTC", &next), "wrong weekday");
	CHECK(!cron_next(&e, INT64_MAX, zone_to_local, (void *) "UTC", &next), "INT64_MAX");
	CHECK(!cron_next(&e, INT64_MIN, zone_to_local, (void *) "UTC", &next), "INT64_MIN");
	CHECK(!cron_next(NULL, after, zone_to_local, (void *) "UTC", &next), "NULL expression");
	CHECK(!cron_next(&e, after, NULL, NULL, &next), "NULL callback");
	memset(&e, 0, sizeof(e));
	CHECK(!cron_next(&e, after, zone_to_local, (void *) "UTC", &next), "empty expression");
}

/* main - run all groups and print the summary line */
int
main(void)
{
	test_parse_valid();
	test_parse_errors();
	test_next_basic();
	test_dst_madrid();
	test_dst_new_york();
	test_dst_odd_zones();
	test_callbacks();

	printf("%d passed, %d failed\n", n_passed, n_failed);
	return n_failed == 0 ? 0 : 1;
}

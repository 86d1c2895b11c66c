/*-------------------------------------------------------------------------
 *
 * cron.c
 *	  Cron expression parser and next-fire computation for notify_ext
 *	  schedules.
 *
 * The parser turns the text into bitmasks, one per field.  cron_next walks
 * local calendar days forward with plain integer date arithmetic, tries only
 * the minutes the masks allow, and maps each candidate local time to UTC by
 * guessing with nearby UTC offsets and verifying the guess through the
 * caller's to-local callback: that is how gaps and overlaps are seen without
 * the module ever knowing the time zone rules.  Plain C and libc only; see
 * cron.h for the syntax and the DST contract.
 *
 * src/cron.c
 *
 *-------------------------------------------------------------------------
 */
#include "cron.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if defined(__GNUC__)
#define CRON_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define CRON_PRINTF(f, a)
#endif

#define SECS_PER_MINUTE		INT64_C(60)
#define SECS_PER_HOUR		INT64_C(3600)
#define SECS_PER_DAY		INT64_C(86400)

/* cron_next refuses instants beyond this (about 34,800 years either way) */
#define CRON_UTC_LIMIT		(INT64_C(1) << 40)

#define CRON_NFIELDS		5
#define CRON_SHOWN_CHARS	40	/* field text quoted in error messages */
#define CRON_SHOWN_TOKEN	20	/* number or name quoted in error messages */
#define CRON_MAX_OFFSETS	4	/* distinct UTC offsets tried per local time */

/* What one field accepts */
typedef struct CronField
{
	const char *label;			/* as shown in error messages */
	int			min;
	int			max;			/* largest value that may be written */
	int			open_max;		/* end of "*" and of "5/10" */
	const char *const *names;	/* three-letter names, or NULL */
	int			first_name;		/* value of names[0] */
} CronField;

/* A local time mapped to UTC: the instants that show it, or the gap's end */
typedef struct LocalInstants
{
	int			count;			/* 0 (in a gap or unresolvable), 1 or 2+ */
	int64_t		utc[CRON_MAX_OFFSETS];	/* ascending */
	bool		in_gap;			/* count == 0 and gap_end is valid */
	int64_t		gap_end;		/* first instant after the gap */
} LocalInstants;

/* What cron_next does after looking at one candidate local time */
typedef enum CandidateResult
{
	CANDIDATE_CONTINUE,
	CANDIDATE_STOP,
	CANDIDATE_ERROR
} CandidateResult;

static const char *const month_names[] = {
	"jan", "feb", "mar", "apr", "may", "jun",
	"jul", "aug", "sep", "oct", "nov", "dec", NULL
};

static const char *const weekday_names[] = {
	"sun", "mon", "tue", "wed", "thu", "fri", "sat", NULL
};

static const CronField cron_fields[CRON_NFIELDS] = {
	{"minute", 0, 59, 59, NULL, 0},
	{"hour", 0, 23, 23, NULL, 0},
	{"day-of-month", 1, 31, 31, NULL, 0},
	{"month", 1, 12, 12, month_names, 1},
	{"day-of-week", 0, 7, 6, weekday_names, 0},
};

/* Macros and the five-field expressions they stand for */
static const struct
{
	const char *name;
	const char *expansion;
}			cron_macros[] = {
	{"@yearly", "0 0 1 1 *"},
	{"@annually", "0 0 1 1 *"},
	{"@monthly", "0 0 1 * *"},
	{"@weekly", "0 0 * * 0"},
	{"@daily", "0 0 * * *"},
	{"@midnight", "0 0 * * *"},
	{"@hourly", "0 * * * *"},
};

static void set_error(char *errbuf, size_t errlen, const char *fmt,...) CRON_PRINTF(3, 4);


/* set_error - fill the caller's error buffer, tolerating a NULL/empty one */
static void
set_error(char *errbuf, size_t errlen, const char *fmt,...)
{
	va_list		ap;

	if (errbuf == NULL || errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(errbuf, errlen, fmt, ap);
	va_end(ap);
}

/* is_blank - field separator: ASCII white space (a pasted newline too) */
static bool
is_blank(char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\r' ||
		c == '\v' || c == '\f';
}

/* is_digit / is_alpha - ASCII classes, independent of the C locale */
static bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

static bool
is_alpha(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* lower_ascii - case folding for names and macros */
static char
lower_ascii(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char) (c - 'A' + 'a') : c;
}

/* same_word_ci - whether text[0..len) equals word, ignoring ASCII case */
static bool
same_word_ci(const char *text, size_t len, const char *word)
{
	size_t		i;

	if (strlen(word) != len)
		return false;
	for (i = 0; i < len; i++)
	{
		if (lower_ascii(text[i]) != word[i])
			return false;
	}
	return true;
}

/*
 * show_text - copy user text for an error message, at most CRON_SHOWN_CHARS
 * characters, with anything but printable ASCII (and the double quote)
 * replaced by '?': the message goes into a PostgreSQL error and must stay
 * valid in any server encoding.
 */
static const char *
show_text(const char *text, size_t len, char *buf, size_t buflen)
{
	size_t		i;
	size_t		o = 0;

	for (i = 0; i < len && o + 4 < buflen; i++)
	{
		unsigned char c = (unsigned char) text[i];

		if (i == CRON_SHOWN_CHARS)
		{
			memcpy(buf + o, "...", 3);
			o += 3;
			break;
		}
		buf[o++] = (c >= 0x20 && c < 0x7f && c != '"') ? (char) c : '?';
	}
	buf[o] = '\0';
	return buf;
}

/* describe_char - a character for "unexpected ..." messages */
static const char *
describe_char(char ch, char *buf, size_t buflen)
{
	unsigned char c = (unsigned char) ch;

	if (c >= 0x20 && c < 0x7f)
		snprintf(buf, buflen, "character '%c'", ch);
	else
		snprintf(buf, buflen, "byte 0x%02X", (unsigned) c);
	return buf;
}

/*
 * parse_value - one number or name of field f at text[*pos]; the caller has
 * checked that a digit or letter is there.  Returns false with a message on
 * an unknown name, a name in a numeric field or an out-of-range number.
 */
static bool
parse_value(const CronField *f, const char *text, size_t len, size_t *pos,
			int *value, char *errbuf, size_t errlen)
{
	size_t		start = *pos;
	size_t		p = start;
	int			n_names;

	if (is_digit(text[p]))
	{
		long		v = 0;

		while (p < len && is_digit(text[p]))
		{
			if (v <= 100000)
				v = v * 10 + (text[p] - '0');
			p++;
		}
		if (v < f->min || v > f->max)
		{
			set_error(errbuf, errlen, "%s field: %.*s%s is out of range %d-%d",
					  f->label,
					  (int) (p - start > CRON_SHOWN_TOKEN ? CRON_SHOWN_TOKEN : p - start),
					  text + start,
					  p - start > CRON_SHOWN_TOKEN ? "..." : "",
					  f->min, f->max);
			return false;
		}
		*value = (int) v;
		*pos = p;
		return true;
	}

	while (p < len && is_alpha(text[p]))
		p++;
	if (f->names == NULL)
	{
		set_error(errbuf, errlen,
				  "%s field: \"%.*s%s\" is not a number (names are allowed only in the month and day-of-week fields)",
				  f->label,
				  (int) (p - start > CRON_SHOWN_TOKEN ? CRON_SHOWN_TOKEN : p - start),
				  text + start,
				  p - start > CRON_SHOWN_TOKEN ? "..." : "");
		return false;
	}
	for (n_names = 0; f->names[n_names] != NULL; n_names++)
	{
		if (same_word_ci(text + start, p - start, f->names[n_names]))
		{
			*value = f->first_name + n_names;
			*pos = p;
			return true;
		}
	}
	set_error(errbuf, errlen, "%s field: unknown name \"%.*s%s\" (expected %s to %s)",
			  f->label,
			  (int) (p - start > CRON_SHOWN_TOKEN ? CRON_SHOWN_TOKEN : p - start),
			  text + start,
			  p - start > CRON_SHOWN_TOKEN ? "..." : "",
			  f->names[0], f->names[n_names - 1]);
	return false;
}

/*
 * parse_field - turn one field's text into a bitmask.  Grammar:
 * item {"," item}, item = ("*" | value ["-" value]) ["/" step].
 */
static bool
parse_field(const CronField *f, const char *text, size_t len, uint64_t *bits,
			char *errbuf, size_t errlen)
{
	size_t		pos = 0;
	char		shown[CRON_SHOWN_CHARS + 8];
	char		chbuf[32];

	*bits = 0;
	for (;;)
	{
		size_t		item_start = pos;
		int			lo;
		int			hi;
		int			step = 1;
		bool		single = false;
		int			v;

		if (pos == len || text[pos] == ',')
		{
			set_error(errbuf, errlen, "%s field: empty element in list \"%s\"",
					  f->label, show_text(text, len, shown, sizeof(shown)));
			return false;
		}
		if (text[pos] == '*')
		{
			lo = f->min;
			hi = f->open_max;
			pos++;
		}
		else if (is_digit(text[pos]) || is_alpha(text[pos]))
		{
			if (!parse_value(f, text, len, &pos, &lo, errbuf, errlen))
				return false;
			hi = lo;
			single = true;
			if (pos < len && text[pos] == '-')
			{
				pos++;
				if (pos == len || !(is_digit(text[pos]) || is_alpha(text[pos])))
				{
					set_error(errbuf, errlen, "%s field: range \"%s\" has no end after \"-\"",
							  f->label,
							  show_text(text + item_start, pos - item_start, shown, sizeof(shown)));
					return false;
				}
				if (!parse_value(f, text, len, &pos, &hi, errbuf, errlen))
					return false;
				single = false;
				if (hi < lo)
				{
					set_error(errbuf, errlen,
							  "%s field: range \"%s\" goes backwards (the start must not be after the end)",
							  f->label,
							  show_text(text + item_start, pos - item_start, shown, sizeof(shown)));
					return false;
				}
			}
		}
		else
		{
			set_error(errbuf, errlen, "%s field: unexpected %s in \"%s\"",
					  f->label, describe_char(text[pos], chbuf, sizeof(chbuf)),
					  show_text(text, len, shown, sizeof(shown)));
			return false;
		}

		if (pos < len && text[pos] == '/')
		{
			size_t		step_start = ++pos;
			long		sv = 0;

			if (pos == len || !is_digit(text[pos]))
			{
				set_error(errbuf, errlen, "%s field: \"/\" must be followed by a step number in \"%s\"",
						  f->label, show_text(text, len, shown, sizeof(shown)));
				return false;
			}
			while (pos < len && is_digit(text[pos]))
			{
				if (sv <= 100000)
					sv = sv * 10 + (text[pos] - '0');
				pos++;
			}
			if (sv < 1 || sv > f->max)
			{
				set_error(errbuf, errlen, "%s field: step %.*s%s is out of range 1-%d",
						  f->label,
						  (int) (pos - step_start > CRON_SHOWN_TOKEN ? CRON_SHOWN_TOKEN : pos - step_start),
						  text + step_start,
						  pos - step_start > CRON_SHOWN_TOKEN ? "..." : "",
						  f->max);
				return false;
			}
			step = (int) sv;
			if (single)
				hi = f->open_max > lo ? f->open_max : f->max;
		}

		/* 7 in the day-of-week field is Sunday again */
		for (v = lo; v <= hi; v += step)
			*bits |= UINT64_C(1) << (f->names == weekday_names && v == 7 ? 0 : v);

		if (pos == len)
			return true;
		if (text[pos] != ',')
		{
			set_error(errbuf, errlen, "%s field: unexpected %s in \"%s\"",
					  f->label, describe_char(text[pos], chbuf, sizeof(chbuf)),
					  show_text(text, len, shown, sizeof(shown)));
			return false;
		}
		pos++;
	}
}

/* parse_fields - split five-field text on blanks and parse each field */
static bool
parse_fields(const char *text, CronExpr *out, char *errbuf, size_t errlen)
{
	const char *start[CRON_NFIELDS];
	size_t		len[CRON_NFIELDS];
	int			n = 0;
	const char *p = text;
	uint64_t	bits[CRON_NFIELDS];
	int			i;

	for (;;)
	{
		const char *f;

		while (is_blank(*p))
			p++;
		if (*p == '\0')
			break;
		f = p;
		while (*p != '\0' && !is_blank(*p))
			p++;
		if (n < CRON_NFIELDS)
		{
			start[n] = f;
			len[n] = (size_t) (p - f);
		}
		n++;
	}
	if (n != CRON_NFIELDS)
	{
		set_error(errbuf, errlen, "expected 5 fields, got %d", n);
		return false;
	}

	for (i = 0; i < CRON_NFIELDS; i++)
	{
		if (!parse_field(&cron_fields[i], start[i], len[i], &bits[i],
						 errbuf, errlen))
			return false;
	}
	out->minutes = bits[0];
	out->hours = (uint32_t) bits[1];
	out->days = (uint32_t) bits[2];
	out->months = (uint16_t) bits[3];
	out->weekdays = (uint8_t) bits[4];
	out->hour_star = start[1][0] == '*';
	out->dom_star = start[2][0] == '*';
	out->dow_star = start[4][0] == '*';
	return true;
}

/* cron_parse - validate a schedule's text and turn it into bitmasks */
bool
cron_parse(const char *text, CronExpr *out, char *errbuf, size_t errlen)
{
	const char *p;
	const char *name;
	size_t		name_len;
	size_t		i;
	char		shown[CRON_SHOWN_CHARS + 8];

	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';
	if (out == NULL)
	{
		set_error(errbuf, errlen, "no place to store the parsed expression");
		return false;
	}
	memset(out, 0, sizeof(*out));
	if (text == NULL)
	{
		set_error(errbuf, errlen, "expected 5 fields, got none (NULL)");
		return false;
	}

	p = text;
	while (is_blank(*p))
		p++;
	if (*p != '@')
	{
		if (parse_fields(p, out, errbuf, errlen))
			return true;
		memset(out, 0, sizeof(*out));
		return false;
	}

	name = p;
	while (*p != '\0' && !is_blank(*p))
		p++;
	name_len = (size_t) (p - name);
	while (is_blank(*p))
		p++;
	if (*p != '\0')
	{
		set_error(errbuf, errlen, "unexpected text after %s: a macro stands for the whole expression",
				  show_text(name, name_len, shown, sizeof(shown)));
		return false;
	}
	for (i = 0; i < sizeof(cron_macros) / sizeof(cron_macros[0]); i++)
	{
		if (same_word_ci(name, name_len, cron_macros[i].name))
			return parse_fields(cron_macros[i].expansion, out, errbuf, errlen);
	}
	if (same_word_ci(name, name_len, "@reboot"))
		set_error(errbuf, errlen, "@reboot is not supported: schedules run by the clock");
	else
		set_error(errbuf, errlen,
				  "unknown macro \"%s\" (expected @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly)",
				  show_text(name, name_len, shown, sizeof(shown)));
	return false;
}

/* floor_div - integer division rounding toward minus infinity */
static int64_t
floor_div(int64_t a, int64_t b)
{
	int64_t		q = a / b;

	if ((a % b != 0) && ((a < 0) != (b < 0)))
		q--;
	return q;
}

/*
 * civil_from_days - proleptic Gregorian date of a day number (0 is
 * 1970-01-01); Howard Hinnant's algorithm, exact for any int64 day in range.
 */
static void
civil_from_days(int64_t z, int *year, int *month, int *mday)
{
	int64_t		era;
	int64_t		doe;
	int64_t		yoe;
	int64_t		doy;
	int64_t		mp;
	int			m;

	z += 719468;
	era = floor_div(z, 146097);
	doe = z - era * 146097;
	yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
	doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
	mp = (5 * doy + 2) / 153;
	m = (int) (mp < 10 ? mp + 3 : mp - 9);
	*mday = (int) (doy - (153 * mp + 2) / 5 + 1);
	*month = m;
	*year = (int) (yoe + era * 400 + (m <= 2 ? 1 : 0));
}

/* weekday_of_day - 0 (Sunday) to 6 for a day number; 1970-01-01 was a Thursday */
static int
weekday_of_day(int64_t day)
{
	return (int) (day - floor_div(day + 4, 7) * 7 + 4);
}

/*
 * utc_offset_at - the UTC offset in force at instant t, from the caller's
 * callback.  The civil fields must agree with t + offset: a callback that
 * gets them wrong would otherwise schedule silently at wrong times.
 */
static bool
utc_offset_at(int64_t t, cron_to_local_fn to_local, void *arg, int64_t *offset)
{
	CronCivil	c;
	int64_t		local;
	int64_t		day;
	int64_t		sod;
	int			year;
	int			month;
	int			mday;

	memset(&c, 0, sizeof(c));
	if (!to_local(t, &c, arg))
		return false;
	if (c.utc_offset <= -SECS_PER_DAY || c.utc_offset >= SECS_PER_DAY)
		return false;
	local = t + c.utc_offset;
	day = floor_div(local, SECS_PER_DAY);
	sod = local - day * SECS_PER_DAY;
	civil_from_days(day, &year, &month, &mday);
	if (c.year != year || c.month != month || c.mday != mday ||
		c.hour != (int) (sod / SECS_PER_HOUR) ||
		c.minute != (int) (sod / SECS_PER_MINUTE % 60) ||
		c.second != (int) (sod % SECS_PER_MINUTE) ||
		c.wday != weekday_of_day(day))
		return false;
	*offset = c.utc_offset;
	return true;
}

/*
 * resolve_local - the UTC instants whose local time is "local" (seconds of
 * local wall-clock time since 1970-01-01 00:00, as if it were UTC).
 *
 * No offset reaches a day, so every such instant lies within a day of
 * "local" read as UTC; the offsets in force a day before and a day after
 * are the candidates, assuming (as holds for every real zone) that the
 * offset changes at most once in that window.  Each candidate is verified
 * by converting back, and an offset seen while verifying is tried too.
 * Two verified offsets mean a fall-back overlap.  None means a
 * spring-forward gap; when want_gap_end is set the gap's end (the
 * transition instant) is then found by bisection.
 */
static bool
resolve_local(int64_t local, bool want_gap_end, cron_to_local_fn to_local,
			  void *arg, LocalInstants *r)
{
	int64_t		offsets[CRON_MAX_OFFSETS];
	int			n_offsets = 0;
	int64_t		before;
	int64_t		after;
	int64_t		lo;
	int64_t		hi;
	int64_t		o;
	int			i;
	int			k;

	r->count = 0;
	r->in_gap = false;
	r->gap_end = 0;
	if (!utc_offset_at(local - SECS_PER_DAY, to_local, arg, &before) ||
		!utc_offset_at(local + SECS_PER_DAY, to_local, arg, &after))
		return false;
	offsets[n_offsets++] = before;
	if (after != before)
		offsets[n_offsets++] = after;

	for (i = 0; i < n_offsets; i++)
	{
		bool		known = false;

		if (!utc_offset_at(local - offsets[i], to_local, arg, &o))
			return false;
		if (o == offsets[i])
		{
			/* insertion keeps utc[] ascending */
			k = r->count++;
			while (k > 0 && r->utc[k - 1] > local - o)
			{
				r->utc[k] = r->utc[k - 1];
				k--;
			}
			r->utc[k] = local - o;
			continue;
		}
		for (k = 0; k < n_offsets; k++)
			known = known || offsets[k] == o;
		if (!known && n_offsets < CRON_MAX_OFFSETS)
			offsets[n_offsets++] = o;
	}
	if (r->count > 0 || !want_gap_end || after <= before)
		return true;

	/*
	 * In a gap: local - after is still before the transition (its local time
	 * falls short of "local") and local - before is already past it.  Find
	 * the first instant whose local time is beyond "local".
	 */
	lo = local - after;
	hi = local - before;
	if (!utc_offset_at(lo, to_local, arg, &o))
		return false;
	if (lo + o >= local)
		return true;
	if (!utc_offset_at(hi, to_local, arg, &o))
		return false;
	if (hi + o <= local)
		return true;
	while (hi - lo > 1)
	{
		int64_t		mid = lo + (hi - lo) / 2;

		if (!utc_offset_at(mid, to_local, arg, &o))
			return false;
		if (mid + o > local)
			hi = mid;
		else
			lo = mid;
	}
	r->in_gap = true;
	r->gap_end = hi;
	return true;
}

/*
 * consider_candidate - map one matching local time to its fire instants
 * and keep the earliest one after after_utc in *best.
 *
 * Candidates come in increasing local time, and the earliest instant of a
 * local time never decreases as local time increases, so once a candidate's
 * earliest instant is past after_utc nothing later can beat *best: stop.
 * Only hour-wildcard jobs fire at a second occurrence, which is why they
 * may find their best instant before the stop.
 */
static CandidateResult
consider_candidate(const CronExpr *e, int64_t local, int64_t after_utc,
				   cron_to_local_fn to_local, void *arg,
				   int64_t *best, bool *have_best)
{
	LocalInstants r;
	int64_t		earliest;
	int			i;

	if (!resolve_local(local, !e->hour_star, to_local, arg, &r))
		return CANDIDATE_ERROR;

	if (!e->hour_star)
	{
		/* fixed hour: first occurrence, or the end of the gap */
		if (r.count > 0)
			earliest = r.utc[0];
		else if (r.in_gap)
			earliest = r.gap_end;
		else
			return CANDIDATE_CONTINUE;
		if (earliest <= after_utc)
			return CANDIDATE_CONTINUE;
		if (!*have_best || earliest < *best)
			*best = earliest;
		*have_best = true;
		return CANDIDATE_STOP;
	}

	/* hour wildcard: every real instant showing this local time */
	for (i = 0; i < r.count; i++)
	{
		if (r.utc[i] > after_utc && (!*have_best || r.utc[i] < *best))
		{
			*best = r.utc[i];
			*have_best = true;
		}
	}
	if (r.count > 0 && r.utc[0] > after_utc)
		return CANDIDATE_STOP;
	return CANDIDATE_CONTINUE;
}

/* day_matches - the day fields, with Vixie's either-or rule when both are restricted */
static bool
day_matches(const CronExpr *e, int mday, int wday)
{
	bool		dom = (e->days >> mday) & 1u;
	bool		dow = (e->weekdays >> wday) & 1u;

	if (e->dom_star || e->dow_star)
		return dom && dow;
	return dom || dow;
}

/*
 * cron_next - the first fire instant strictly after after_utc.
 *
 * Walks local days from the local date of after_utc.  Hour-wildcard jobs
 * start earlier by the size of any fall-back within the next day, because
 * the second occurrence of an earlier local time can still be in the
 * future.
 */
bool
cron_next(const CronExpr *e, int64_t after_utc, cron_to_local_fn to_local,
		  void *arg, int64_t *next_utc)
{
	int64_t		offset;
	int64_t		later_offset;
	int64_t		start;
	int64_t		first_day;
	int			first_hour;
	int			first_minute;
	int64_t		day;
	int64_t		best = 0;
	bool		have_best = false;

	if (e == NULL || to_local == NULL || next_utc == NULL)
		return false;
	if (after_utc < -CRON_UTC_LIMIT || after_utc > CRON_UTC_LIMIT)
		return false;
	if (e->minutes == 0 || e->hours == 0 || e->months == 0 ||
		(e->days == 0 && e->weekdays == 0))
		return false;

	if (!utc_offset_at(after_utc, to_local, arg, &offset))
		return false;
	start = after_utc + offset;
	if (e->hour_star)
	{
		if (!utc_offset_at(after_utc + SECS_PER_DAY, to_local, arg, &later_offset))
			return false;
		if (later_offset < offset)
			start -= offset - later_offset;
	}
	start = floor_div(start, SECS_PER_MINUTE) * SECS_PER_MINUTE;
	first_day = floor_div(start, SECS_PER_DAY);
	first_hour = (int) ((start - first_day * SECS_PER_DAY) / SECS_PER_HOUR);
	first_minute = (int) ((start - first_day * SECS_PER_DAY) / SECS_PER_MINUTE % 60);

	for (day = first_day; day <= first_day + CRON_SEARCH_DAYS; day++)
	{
		int			year;
		int			month;
		int			mday;
		int			hour = day == first_day ? first_hour : 0;

		civil_from_days(day, &year, &month, &mday);
		if (!((e->months >> month) & 1u) ||
			!day_matches(e, mday, weekday_of_day(day)))
			continue;

		for (; hour < 24; hour++)
		{
			int			minute;

			if (!((e->hours >> hour) & 1u))
				continue;
			minute = (day == first_day && hour == first_hour) ? first_minute : 0;
			for (; minute < 60; minute++)
			{
				int64_t		local;

				if (!((e->minutes >> minute) & 1u))
					continue;
				local = day * SECS_PER_DAY + hour * SECS_PER_HOUR +
					minute * SECS_PER_MINUTE;
				switch (consider_candidate(e, local, after_utc, to_local, arg,
										   &best, &have_best))
				{
					case CANDIDATE_CONTINUE:
						break;
					case CANDIDATE_STOP:
						*next_utc = best;
						return true;
					case CANDIDATE_ERROR:
						return false;
				}
			}
		}
	}
	if (have_best)
		*next_utc = best;
	return have_best;
}

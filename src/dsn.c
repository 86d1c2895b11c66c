/*-------------------------------------------------------------------------
 *
 * dsn.c
 *	  Bounce and complaint report parsing for notify_ext.
 *
 * A mail of the bounce mailbox is read in three steps.  The outer headers
 * give the addresses the report was delivered to (the VERP address of the
 * message it is about, when the relay kept it).  A walk over the MIME tree
 * notes the first part of each interesting type: the delivery-status or
 * feedback-report part, the returned message, the first text/plain part;
 * it never descends into a returned message, so a bounce quoted inside a
 * mail is not taken for a bounce.  Then the report is read from the part
 * its type calls for, or, for a mail that is no multipart/report, from the
 * text of the plain-text bounce formats we know (qmail, older Exim).
 *
 * Everything works on slices of the caller's buffer; only parts with a
 * transfer encoding are decoded into a copy, at most DSN_MAX_DECODED bytes
 * of each, and one such copy is alive at a time.  Nesting, the number of
 * parts and the number of recipients are capped, and every loop moves
 * forward over the input, so any input costs linear time and bounded
 * memory.
 *
 * src/dsn.c
 *
 *-------------------------------------------------------------------------
 */
#include "dsn.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DSN_MAX_DEPTH		8		/* multipart nesting followed */
#define DSN_MAX_PARTS		256		/* MIME parts looked at per mail */
#define DSN_MAX_DECODED		(256 * 1024)	/* bytes of one part decoded or read */
#define DSN_MAX_BOUNDARY	200		/* RFC 2046 allows 70 */
#define DSN_MAX_FIELD_NAME	76
#define DSN_MAX_PER_SOURCE	2		/* addresses kept from one header */
#define DSN_MAX_ADDRESS_LEN 320
#define DSN_SIGNATURE_WINDOW 4096	/* a plain-text bounce says what it is early */

/* A piece of the input (or of a decoded copy): never NUL-terminated */
typedef struct Slice
{
	const char *data;
	size_t		len;
} Slice;

typedef enum Encoding
{
	ENC_IDENTITY,
	ENC_BASE64,
	ENC_QUOTED_PRINTABLE
} Encoding;

/* A MIME entity: its headers, its (still encoded) body and what they say */
typedef struct Part
{
	Slice		headers;
	Slice		body;
	char		type[64];		/* "type/subtype" in lower case, "" when absent */
	char		boundary[DSN_MAX_BOUNDARY + 1];
	char		report_type[32];	/* lower case */
	Encoding	encoding;
} Part;

typedef struct ParseCtx
{
	DsnReport  *out;
	bool		oom;
	int			parts_seen;
	int			capacity;		/* of out->recipients */
	bool		have_report;
	char		report_type[32];	/* of the first multipart/report */
	bool		have_status;
	Part		status;
	bool		have_feedback;
	Part		feedback;
	bool		have_returned;
	Part		returned;
	bool		have_text;
	Part		text;
	char	   *returned_to;	/* first To address of the returned message */
} ParseCtx;

/* Bits of DsnRecipient fields already seen in the current field group */
#define SEEN_FINAL		0x01
#define SEEN_ORIGINAL	0x02
#define SEEN_ACTION		0x04
#define SEEN_STATUS		0x08
#define SEEN_DIAGNOSTIC 0x10
#define SEEN_REMOTE_MTA 0x20

#ifdef DSN_TESTING
/* Test hook: the n+1st allocation from now fails (n < 0: none fails) */
extern void dsn_testing_fail_allocation(long n);
static long dsn_alloc_budget = -1;

/* dsn_testing_fail_allocation - let the unit test check every out-of-memory path */
void
dsn_testing_fail_allocation(long n)
{
	dsn_alloc_budget = n;
}
#endif

/* dsn_realloc - realloc that marks the parse out of memory instead of returning to each caller */
static void *
dsn_realloc(ParseCtx *ctx, void *ptr, size_t size)
{
	void	   *p;

	if (ctx->oom)
		return NULL;
#ifdef DSN_TESTING
	if (dsn_alloc_budget == 0)
	{
		ctx->oom = true;
		return NULL;
	}
	if (dsn_alloc_budget > 0)
		dsn_alloc_budget--;
#endif
	p = realloc(ptr, size);
	if (p == NULL)
		ctx->oom = true;
	return p;
}

/* dsn_alloc - malloc through dsn_realloc's out-of-memory bookkeeping */
static void *
dsn_alloc(ParseCtx *ctx, size_t size)
{
	return dsn_realloc(ctx, NULL, size);
}

/* ascii_lower - tolower for ASCII only, whatever the locale */
static char
ascii_lower(char c)
{
	return (c >= 'A' && c <= 'Z') ? (char) (c - 'A' + 'a') : c;
}

/* is_wsp - space or tab, the white space of header folding */
static bool
is_wsp(char c)
{
	return c == ' ' || c == '\t';
}

/* is_space - white space including line-end characters */
static bool
is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\r' || c == '\n';
}

/* is_digit - ASCII digit */
static bool
is_digit(char c)
{
	return c >= '0' && c <= '9';
}

/* is_alnum - ASCII letter or digit */
static bool
is_alnum(char c)
{
	return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* slice_from - the slice [start, start + len) of s, clamped to s */
static Slice
slice_from(Slice s, size_t start, size_t len)
{
	Slice		r;

	if (start > s.len)
		start = s.len;
	if (len > s.len - start)
		len = s.len - start;
	r.data = s.data + start;
	r.len = len;
	return r;
}

/* trim - s without white space (line ends included) at either end */
static Slice
trim(Slice s)
{
	while (s.len > 0 && is_space(s.data[0]))
	{
		s.data++;
		s.len--;
	}
	while (s.len > 0 && is_space(s.data[s.len - 1]))
		s.len--;
	return s;
}

/* slice_eq_ci - s equals the ASCII literal lit, case-insensitively */
static bool
slice_eq_ci(Slice s, const char *lit)
{
	size_t		n = strlen(lit);
	size_t		i;

	if (s.len != n)
		return false;
	for (i = 0; i < n; i++)
		if (ascii_lower(s.data[i]) != ascii_lower(lit[i]))
			return false;
	return true;
}

/* starts_with_ci - s begins with the ASCII literal lit, case-insensitively */
static bool
starts_with_ci(Slice s, const char *lit)
{
	size_t		n = strlen(lit);

	return s.len >= n && slice_eq_ci(slice_from(s, 0, n), lit);
}

/* find_ci - offset of the first occurrence of lit in s, case-insensitively, or -1 */
static long
find_ci(Slice s, const char *lit)
{
	size_t		n = strlen(lit);
	size_t		i;

	if (n == 0 || s.len < n)
		return -1;
	for (i = 0; i + n <= s.len; i++)
	{
		if (ascii_lower(s.data[i]) == ascii_lower(lit[0]) &&
			slice_eq_ci(slice_from(s, i, n), lit))
			return (long) i;
	}
	return -1;
}

/* str_eq_ci - two NUL-terminated strings are equal, ASCII case-insensitively */
static bool
str_eq_ci(const char *a, const char *b)
{
	while (*a != '\0' && ascii_lower(*a) == ascii_lower(*b))
	{
		a++;
		b++;
	}
	return ascii_lower(*a) == ascii_lower(*b);
}

/*
 * utf8_char_len - length of the well-formed UTF-8 character at s (no
 * overlongs, no surrogates, nothing above U+10FFFF) and its code point in
 * *cp, or 0 when the bytes there are not one
 */
static size_t
utf8_char_len(const unsigned char *s, size_t len, uint32_t *cp)
{
	size_t		n;
	size_t		i;
	uint32_t	c;
	uint32_t	min;

	if (s[0] < 0x80)
	{
		*cp = s[0];
		return 1;
	}
	if (s[0] >= 0xC2 && s[0] <= 0xDF)
	{
		n = 2;
		c = s[0] & 0x1F;
		min = 0x80;
	}
	else if (s[0] >= 0xE0 && s[0] <= 0xEF)
	{
		n = 3;
		c = s[0] & 0x0F;
		min = 0x800;
	}
	else if (s[0] >= 0xF0 && s[0] <= 0xF4)
	{
		n = 4;
		c = s[0] & 0x07;
		min = 0x10000;
	}
	else
		return 0;
	if (len < n)
		return 0;
	for (i = 1; i < n; i++)
	{
		if ((s[i] & 0xC0) != 0x80)
			return 0;
		c = (c << 6) | (s[i] & 0x3F);
	}
	if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
		return 0;
	*cp = c;
	return n;
}

/*
 * make_text - the caller-safe copy of v: valid UTF-8 (U+FFFD for bad
 * bytes), control characters and line breaks as spaces, white space runs
 * collapsed, trimmed, at most DSN_MAX_TEXT bytes cut at a character
 * boundary.  This is also what unfolds folded header fields.
 */
static char *
make_text(ParseCtx *ctx, Slice v)
{
	size_t		cap = v.len < DSN_MAX_TEXT / 3 ? v.len * 3 : DSN_MAX_TEXT;
	char	   *out = dsn_alloc(ctx, cap + 1);
	size_t		o = 0;
	size_t		i = 0;
	bool		space = false;

	if (out == NULL)
		return NULL;
	while (i < v.len)
	{
		const unsigned char *s = (const unsigned char *) v.data + i;
		uint32_t	cp = 0;
		size_t		n = utf8_char_len(s, v.len - i, &cp);
		const char *bytes = (const char *) s;
		size_t		nbytes = n;

		if (n == 0)
		{
			bytes = "\xEF\xBF\xBD";
			nbytes = 3;
			n = 1;
		}
		else if (cp <= 0x20 || cp == 0x7F || (cp >= 0x80 && cp < 0xA0) ||
				 cp == 0x2028 || cp == 0x2029)
		{
			space = true;
			i += n;
			continue;
		}
		if (o + (space && o > 0 ? 1 : 0) + nbytes > cap)
			break;
		if (space && o > 0)
			out[o++] = ' ';
		space = false;
		memcpy(out + o, bytes, nbytes);
		o += nbytes;
		i += n;
	}
	out[o] = '\0';
	return out;
}

/* make_field - make_text, but NULL for text that comes out empty */
static char *
make_field(ParseCtx *ctx, Slice v)
{
	char	   *s = make_text(ctx, v);

	if (s != NULL && s[0] == '\0')
	{
		free(s);
		return NULL;
	}
	return s;
}

/* next_line - the line of s at *pos, without its LF and a CR before it; false at the end */
static bool
next_line(Slice s, size_t *pos, Slice *line)
{
	const char *start;
	const char *nl;
	size_t		n;

	if (*pos >= s.len)
		return false;
	start = s.data + *pos;
	nl = memchr(start, '\n', s.len - *pos);
	if (nl == NULL)
	{
		n = s.len - *pos;
		*pos = s.len;
	}
	else
	{
		n = (size_t) (nl - start);
		*pos += n + 1;
	}
	if (n > 0 && start[n - 1] == '\r')
		n--;
	line->data = start;
	line->len = n;
	return true;
}

/* line_is_blank - nothing but white space: ends a header block or a field group */
static bool
line_is_blank(Slice line)
{
	size_t		i;

	for (i = 0; i < line.len; i++)
		if (!is_space(line.data[i]))
			return false;
	return true;
}

/* field_colon - offset of the colon when line starts a field ("Name:", "Name :"), else 0 */
static size_t
field_colon(Slice line)
{
	size_t		i = 0;

	while (i < line.len && i < DSN_MAX_FIELD_NAME &&
		   (unsigned char) line.data[i] > 32 && (unsigned char) line.data[i] < 127 &&
		   line.data[i] != ':')
		i++;
	if (i == 0)
		return 0;
	while (i < line.len && is_wsp(line.data[i]))
		i++;
	return (i < line.len && line.data[i] == ':') ? i : 0;
}

/*
 * next_field - the next header field of s from *pos: returns 1 with its
 * name and value (continuation lines included, line ends in it), 0 for a
 * blank line (end of a header block, or of a field group in a report
 * part), -1 at the end.  Lines that are neither are skipped.
 */
static int
next_field(Slice s, size_t *pos, Slice *name, Slice *value)
{
	Slice		line;

	while (next_line(s, pos, &line))
	{
		size_t		colon;

		if (line_is_blank(line))
			return 0;
		colon = field_colon(line);
		if (colon == 0)
			continue;
		*name = trim(slice_from(line, 0, colon));
		value->data = line.data + colon + 1;
		value->len = line.len - colon - 1;
		for (;;)
		{
			size_t		save = *pos;
			Slice		next;

			if (!next_line(s, pos, &next))
				break;
			if (next.len == 0 || !is_wsp(next.data[0]) || line_is_blank(next))
			{
				*pos = save;
				break;
			}
			value->len = (size_t) (next.data + next.len - value->data);
		}
		return 1;
	}
	return -1;
}

/* get_header - value of the first field called name in a header block */
static bool
get_header(Slice headers, const char *name, Slice *value)
{
	size_t		pos = 0;
	Slice		n;
	int			r;

	while ((r = next_field(headers, &pos, &n, value)) >= 0)
	{
		if (r == 1 && slice_eq_ci(n, name))
			return true;
	}
	return false;
}

/*
 * split_message - header block and body of a message or MIME part.  The
 * headers end at the first blank line, or before the first line that is
 * neither a field nor a continuation (a body without its blank line); an
 * mbox "From " line at the very start is let through.
 */
static void
split_message(Slice whole, Slice *headers, Slice *body)
{
	size_t		pos = 0;
	Slice		line;
	bool		first = true;

	for (;;)
	{
		size_t		start = pos;

		if (!next_line(whole, &pos, &line))
		{
			*headers = whole;
			*body = slice_from(whole, whole.len, 0);
			return;
		}
		if (line_is_blank(line))
		{
			*headers = slice_from(whole, 0, start);
			*body = slice_from(whole, pos, whole.len);
			return;
		}
		if (field_colon(line) == 0 && !is_wsp(line.data[0]) &&
			!(first && starts_with_ci(line, "From ")))
		{
			*headers = slice_from(whole, 0, start);
			*body = slice_from(whole, start, whole.len);
			return;
		}
		first = false;
	}
}

/* skip_blank_lines - s from its first line that is not blank */
static Slice
skip_blank_lines(Slice s)
{
	size_t		pos = 0;
	size_t		start = 0;
	Slice		line;

	while (next_line(s, &pos, &line) && line_is_blank(line))
		start = pos;
	return slice_from(s, start, s.len);
}

/* skip_cfws - index of the first byte from i that is no white space and outside comments */
static size_t
skip_cfws(Slice v, size_t i)
{
	size_t		depth = 0;

	while (i < v.len)
	{
		char		c = v.data[i];

		if (depth > 0)
		{
			if (c == '\\')
				i++;
			else if (c == '(')
				depth++;
			else if (c == ')')
				depth--;
		}
		else if (c == '(')
			depth = 1;
		else if (!is_space(c))
			break;
		i++;
	}
	return i < v.len ? i : v.len;
}

/*
 * parse_content_type - type/subtype, boundary and report-type of a
 * Content-Type value; quoted parameter values and comments are understood,
 * RFC 2231 continuations are not (no report generator uses them)
 */
static void
parse_content_type(Slice v, Part *p)
{
	size_t		i = skip_cfws(v, 0);
	size_t		o = 0;

	while (i < v.len && !is_space(v.data[i]) && v.data[i] != ';' && v.data[i] != '(')
	{
		if (o + 1 < sizeof(p->type))
			p->type[o++] = ascii_lower(v.data[i]);
		i++;
	}
	p->type[o] = '\0';

	while (i < v.len)
	{
		char		attr[16];
		size_t		alen = 0;
		bool		attr_long = false;
		char		val[DSN_MAX_BOUNDARY + 1];
		size_t		vlen = 0;
		bool		val_long = false;

		/* on to the next ';', stepping over quoted strings */
		while (i < v.len && v.data[i] != ';')
		{
			if (v.data[i] == '"')
			{
				for (i++; i < v.len && v.data[i] != '"'; i++)
					if (v.data[i] == '\\')
						i++;
			}
			i++;
		}
		if (i >= v.len)
			break;
		i = skip_cfws(v, i + 1);
		while (i < v.len && v.data[i] != '=' && v.data[i] != ';' && !is_space(v.data[i]))
		{
			if (alen + 1 < sizeof(attr))
				attr[alen++] = ascii_lower(v.data[i]);
			else
				attr_long = true;
			i++;
		}
		attr[alen] = '\0';
		i = skip_cfws(v, i);
		if (i >= v.len || v.data[i] != '=')
			continue;
		i = skip_cfws(v, i + 1);
		if (i < v.len && v.data[i] == '"')
		{
			for (i++; i < v.len && v.data[i] != '"'; i++)
			{
				if (v.data[i] == '\\' && i + 1 < v.len)
					i++;
				if (v.data[i] == '\r' || v.data[i] == '\n')
					continue;
				if (vlen + 1 < sizeof(val))
					val[vlen++] = v.data[i];
				else
					val_long = true;
			}
			if (i < v.len)
				i++;
		}
		else
		{
			while (i < v.len && v.data[i] != ';' && !is_space(v.data[i]) && v.data[i] != '(')
			{
				if (vlen + 1 < sizeof(val))
					val[vlen++] = v.data[i];
				else
					val_long = true;
				i++;
			}
		}
		val[vlen] = '\0';
		if (attr_long || val_long || vlen == 0)
			continue;
		if (strcmp(attr, "boundary") == 0 && p->boundary[0] == '\0')
			memcpy(p->boundary, val, vlen + 1);
		else if (strcmp(attr, "report-type") == 0 && p->report_type[0] == '\0' &&
				 vlen < sizeof(p->report_type))
		{
			size_t		k;

			for (k = 0; k <= vlen; k++)
				p->report_type[k] = ascii_lower(val[k]);
		}
	}
}

/* parse_part - split a MIME entity and read its Content-Type and Content-Transfer-Encoding */
static void
parse_part(Slice whole, Part *p)
{
	Slice		v;

	memset(p, 0, sizeof(*p));
	split_message(whole, &p->headers, &p->body);
	if (get_header(p->headers, "Content-Type", &v))
		parse_content_type(v, p);
	p->encoding = ENC_IDENTITY;
	if (get_header(p->headers, "Content-Transfer-Encoding", &v))
	{
		v = trim(v);
		if (starts_with_ci(v, "base64"))
			p->encoding = ENC_BASE64;
		else if (starts_with_ci(v, "quoted-printable"))
			p->encoding = ENC_QUOTED_PRINTABLE;
	}
}

/* base64_value - the 6 bits of a base64 character, or -1 */
static int
base64_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (is_digit(c))
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* hex_value - value of a hexadecimal digit, or -1 */
static int
hex_value(char c)
{
	if (is_digit(c))
		return c - '0';
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	return -1;
}

/* decode_base64 - lenient: characters outside the alphabet are skipped, '=' ends the data */
static size_t
decode_base64(Slice in, char *out, size_t cap)
{
	uint32_t	acc = 0;
	int			bits = 0;
	size_t		o = 0;
	size_t		i;

	for (i = 0; i < in.len && o < cap; i++)
	{
		int			v = base64_value(in.data[i]);

		if (in.data[i] == '=')
			break;
		if (v < 0)
			continue;
		acc = ((acc << 6) | (uint32_t) v) & 0xFFFFFF;
		bits += 6;
		if (bits >= 8)
		{
			bits -= 8;
			out[o++] = (char) ((acc >> bits) & 0xFF);
		}
	}
	return o;
}

/* decode_qp - quoted-printable; a '=' that starts no escape is kept as it is */
static size_t
decode_qp(Slice in, char *out, size_t cap)
{
	size_t		o = 0;
	size_t		i = 0;

	while (i < in.len && o < cap)
	{
		char		c = in.data[i];

		if (c == '=' && i + 2 < in.len && hex_value(in.data[i + 1]) >= 0 &&
			hex_value(in.data[i + 2]) >= 0)
		{
			out[o++] = (char) (hex_value(in.data[i + 1]) * 16 + hex_value(in.data[i + 2]));
			i += 3;
			continue;
		}
		if (c == '=')
		{
			size_t		j = i + 1;

			while (j < in.len && is_wsp(in.data[j]))
				j++;
			if (j < in.len && in.data[j] == '\r')
				j++;
			if (j < in.len && in.data[j] == '\n')
			{
				i = j + 1;
				continue;
			}
			if (j >= in.len)
				break;
		}
		out[o++] = c;
		i++;
	}
	return o;
}

/*
 * decode_body - the part's body with its transfer encoding undone, at most
 * DSN_MAX_DECODED bytes; *owned is the copy to free, NULL when the result
 * points into the input
 */
static Slice
decode_body(ParseCtx *ctx, const Part *p, char **owned)
{
	Slice		r = p->body;
	size_t		cap;
	char	   *buf;

	*owned = NULL;
	if (p->encoding == ENC_IDENTITY)
	{
		if (r.len > DSN_MAX_DECODED)
			r.len = DSN_MAX_DECODED;
		return r;
	}
	cap = r.len < DSN_MAX_DECODED ? r.len : DSN_MAX_DECODED;
	buf = dsn_alloc(ctx, cap + 1);
	if (buf == NULL)
		return slice_from(r, 0, 0);
	if (p->encoding == ENC_BASE64)
		r.len = decode_base64(p->body, buf, cap);
	else
		r.len = decode_qp(p->body, buf, cap);
	r.data = buf;
	*owned = buf;
	return r;
}

/* Iterator over the body parts of a multipart body */
typedef struct MultipartIter
{
	Slice		body;
	size_t		pos;
	const char *boundary;
	size_t		blen;
	bool		started;		/* a delimiter was seen: a part is open */
	bool		done;
	size_t		part_start;
} MultipartIter;

/* is_delimiter - line is "--boundary" or, *closing set, "--boundary--" (white space may trail) */
static bool
is_delimiter(Slice line, const char *boundary, size_t blen, bool *closing)
{
	size_t		i;

	if (line.len < 2 + blen || line.data[0] != '-' || line.data[1] != '-' ||
		memcmp(line.data + 2, boundary, blen) != 0)
		return false;
	i = 2 + blen;
	*closing = false;
	if (i + 1 < line.len && line.data[i] == '-' && line.data[i + 1] == '-')
	{
		*closing = true;
		i += 2;
	}
	for (; i < line.len; i++)
		if (!is_space(line.data[i]))
			return false;
	return true;
}

/*
 * next_part - the next body part between delimiters (the line end before
 * a delimiter belongs to it); a multipart cut short ends with what is
 * left of its last part
 */
static bool
next_part(MultipartIter *it, Slice *part)
{
	Slice		line;

	while (!it->done)
	{
		size_t		line_start = it->pos;
		bool		closing;

		if (!next_line(it->body, &it->pos, &line))
		{
			it->done = true;
			if (!it->started || it->part_start >= it->body.len)
				return false;
			*part = slice_from(it->body, it->part_start, it->body.len);
			return true;
		}
		if (!is_delimiter(line, it->boundary, it->blen, &closing))
			continue;
		if (closing)
			it->done = true;
		if (it->started)
		{
			size_t		end = line_start;

			if (end > it->part_start && it->body.data[end - 1] == '\n')
				end--;
			if (end > it->part_start && it->body.data[end - 1] == '\r')
				end--;
			*part = slice_from(it->body, it->part_start, end - it->part_start);
			it->part_start = it->pos;
			return true;
		}
		it->started = true;
		it->part_start = it->pos;
	}
	return false;
}

/* type_is_one_of - the part's type is in the NULL-terminated list */
static bool
type_is_one_of(const char *type, const char *const *list)
{
	for (; *list != NULL; list++)
		if (strcmp(type, *list) == 0)
			return true;
	return false;
}

static const char *const status_types[] = {
	"message/delivery-status", "message/global-delivery-status", NULL
};
static const char *const returned_types[] = {
	"message/rfc822", "message/global", "text/rfc822-headers",
	"message/global-headers", "message/rfc822-headers", NULL
};

/*
 * walk_part - note the first part of each type the report is read from.
 * A returned message is not descended into: a bounce quoted in a mail (or
 * the original of a double bounce) must not be read as the report.
 */
static void
walk_part(ParseCtx *ctx, Slice whole, int depth)
{
	Part		p;

	if (ctx->parts_seen >= DSN_MAX_PARTS)
		return;
	ctx->parts_seen++;
	parse_part(whole, &p);

	if (strncmp(p.type, "multipart/", 10) == 0)
	{
		MultipartIter it;
		Slice		child;

		if (strcmp(p.type, "multipart/report") == 0 && !ctx->have_report)
		{
			ctx->have_report = true;
			memcpy(ctx->report_type, p.report_type, sizeof(ctx->report_type));
		}
		if (p.boundary[0] == '\0' || depth >= DSN_MAX_DEPTH)
			return;
		memset(&it, 0, sizeof(it));
		it.body = p.body;
		it.boundary = p.boundary;
		it.blen = strlen(p.boundary);
		while (ctx->parts_seen < DSN_MAX_PARTS && next_part(&it, &child))
			walk_part(ctx, child, depth + 1);
		return;
	}
	if (type_is_one_of(p.type, status_types))
	{
		if (!ctx->have_status)
		{
			ctx->status = p;
			ctx->have_status = true;
		}
	}
	else if (strcmp(p.type, "message/feedback-report") == 0)
	{
		if (!ctx->have_feedback)
		{
			ctx->feedback = p;
			ctx->have_feedback = true;
		}
	}
	else if (type_is_one_of(p.type, returned_types))
	{
		if (!ctx->have_returned)
		{
			ctx->returned = p;
			ctx->have_returned = true;
		}
	}
	else if (p.type[0] == '\0' || strcmp(p.type, "text/plain") == 0)
	{
		if (!ctx->have_text)
		{
			ctx->text = p;
			ctx->have_text = true;
		}
	}
}

/*
 * strip_type - the value of a typed field ("rfc822; a@b", "smtp; 550 ...",
 * "dns; mx.example.net") without its type
 */
static Slice
strip_type(Slice v)
{
	Slice		t = trim(v);
	size_t		i = 0;

	while (i < t.len && i <= 32 &&
		   (is_alnum(t.data[i]) || t.data[i] == '-' || t.data[i] == '_' || t.data[i] == '.'))
		i++;
	if (i == 0 || i > 32)
		return t;
	while (i < t.len && is_space(t.data[i]))
		i++;
	if (i < t.len && t.data[i] == ';')
		return trim(slice_from(t, i + 1, t.len));
	return t;
}

/* unbracket - "<a@b>" as "a@b"; anything else trimmed */
static Slice
unbracket(Slice v)
{
	Slice		t = trim(v);
	const char *close;

	if (t.len > 0 && t.data[0] == '<')
	{
		close = memchr(t.data, '>', t.len);
		if (close != NULL)
			return trim(slice_from(t, 1, (size_t) (close - t.data) - 1));
	}
	return t;
}

/* address_field - an address-typed field value ("rfc822;<a@b>") as a string, or NULL */
static char *
address_field(ParseCtx *ctx, Slice v)
{
	return make_field(ctx, unbracket(strip_type(v)));
}

/* set_once - store the field in *dst unless it already has a value */
static void
set_once(ParseCtx *ctx, char **dst, char *(*make) (ParseCtx *, Slice), Slice v)
{
	if (*dst == NULL)
		*dst = make(ctx, v);
}

/* typed_field - a field value with its type stripped */
static char *
typed_field(ParseCtx *ctx, Slice v)
{
	return make_field(ctx, strip_type(v));
}

/* add_address - one envelope address candidate, unless a duplicate or its source has enough */
static void
add_address(ParseCtx *ctx, Slice a, DsnAddressSource source)
{
	DsnReport  *out = ctx->out;
	int			same_source = 0;
	int			i;
	char	   *s;

	for (i = 0; i < out->naddresses; i++)
		if (out->addresses[i].source == source)
			same_source++;
	if (out->naddresses >= DSN_MAX_ADDRESSES || same_source >= DSN_MAX_PER_SOURCE)
		return;
	s = make_field(ctx, a);
	if (s == NULL)
		return;
	for (i = 0; i < out->naddresses; i++)
	{
		if (str_eq_ci(out->addresses[i].address, s))
		{
			if (source < out->addresses[i].source)
				out->addresses[i].source = source;
			free(s);
			return;
		}
	}
	out->addresses[out->naddresses].source = source;
	out->addresses[out->naddresses].address = s;
	out->naddresses++;
}

/*
 * list_item_address - the bare address of one item of an address list
 * ("Name <a@b>", "a@b (comment)", "group: a@b"): false when it is no
 * plausible address
 */
static bool
list_item_address(Slice item, Slice *addr)
{
	size_t		i;
	bool		quoted = false;
	Slice		a = item;

	for (i = 0; i < item.len; i++)
	{
		char		c = item.data[i];

		if (c == '"')
			quoted = !quoted;
		else if (c == '\\')
			i++;
		else if (c == '<' && !quoted)
		{
			const char *close = memchr(item.data + i, '>', item.len - i);

			if (close == NULL)
				return false;
			a = slice_from(item, i + 1, (size_t) (close - item.data) - i - 1);
			break;
		}
	}
	if (a.data == item.data)
	{
		const char *colon = memchr(a.data, ':', a.len);
		const char *paren;

		if (colon != NULL)
			a = slice_from(a, (size_t) (colon - a.data) + 1, a.len);
		paren = memchr(a.data, '(', a.len);
		if (paren != NULL)
			a.len = (size_t) (paren - a.data);
	}
	a = trim(a);
	if (a.len == 0 || a.len > DSN_MAX_ADDRESS_LEN || memchr(a.data, '@', a.len) == NULL)
		return false;
	for (i = 0; i < a.len; i++)
		if ((unsigned char) a.data[i] <= 32 || a.data[i] == 127 ||
			a.data[i] == '<' || a.data[i] == '>' || a.data[i] == ',')
			return false;
	*addr = a;
	return true;
}

/* for_each_list_address - call fn for every plausible address of an address list, at most max */
static void
for_each_list_address(ParseCtx *ctx, Slice v, int max,
					  void (*fn) (ParseCtx *, Slice, int), int arg)
{
	size_t		i;
	size_t		start = 0;
	bool		quoted = false;
	int			angle = 0;
	int			paren = 0;
	int			found = 0;

	for (i = 0; i <= v.len && found < max; i++)
	{
		char		c = i < v.len ? v.data[i] : ',';
		Slice		a;

		if (i < v.len)
		{
			if (c == '\\')
			{
				i++;
				continue;
			}
			if (c == '"' && paren == 0)
				quoted = !quoted;
			if (quoted)
				continue;
			if (c == '(')
				paren++;
			else if (c == ')' && paren > 0)
				paren--;
			else if (c == '<' && paren == 0)
				angle = 1;
			else if (c == '>' && paren == 0)
				angle = 0;
			if (paren > 0 || angle > 0 || (c != ',' && c != ';'))
				continue;
		}
		if (list_item_address(slice_from(v, start, i - start), &a))
		{
			fn(ctx, a, arg);
			found++;
		}
		start = i + 1;
		quoted = false;
		angle = 0;
		paren = 0;
	}
}

/* add_address_cb - for_each_list_address callback adding candidates of source arg */
static void
add_address_cb(ParseCtx *ctx, Slice a, int source)
{
	add_address(ctx, a, (DsnAddressSource) source);
}

/* add_header_addresses - the candidates of every field called name in a header block */
static void
add_header_addresses(ParseCtx *ctx, Slice headers, const char *name, DsnAddressSource source)
{
	size_t		pos = 0;
	Slice		n;
	Slice		v;
	int			r;

	while ((r = next_field(headers, &pos, &n, &v)) >= 0)
	{
		if (r == 1 && slice_eq_ci(n, name))
			for_each_list_address(ctx, v, DSN_MAX_PER_SOURCE, add_address_cb, (int) source);
	}
}

/* first_address_cb - for_each_list_address callback keeping the first address */
static void
first_address_cb(ParseCtx *ctx, Slice a, int unused)
{
	(void) unused;
	if (ctx->returned_to == NULL)
		ctx->returned_to = make_field(ctx, a);
}

/* make_message_id - a Message-ID value as "<id>" (brackets added when missing), or NULL */
static char *
make_message_id(ParseCtx *ctx, Slice v)
{
	Slice		t = trim(v);
	const char *open = memchr(t.data, '<', t.len);
	size_t		i;
	Slice		id;
	Slice		bracketed;
	char	   *buf;
	char	   *r;

	if (open != NULL)
	{
		const char *close;

		id = slice_from(t, (size_t) (open - t.data) + 1, t.len);
		close = memchr(id.data, '>', id.len);
		if (close != NULL)
			id.len = (size_t) (close - id.data);
	}
	else
	{
		i = 0;
		while (i < t.len && !is_space(t.data[i]))
			i++;
		id = slice_from(t, 0, i);
	}
	id = trim(id);
	if (id.len == 0)
		return NULL;
	for (i = 0; i < id.len; i++)
		if ((unsigned char) id.data[i] <= 32 || id.data[i] == 127)
			return NULL;		/* no white space or control in an id */
	if (id.len > DSN_MAX_TEXT)
		id.len = DSN_MAX_TEXT;
	buf = dsn_alloc(ctx, id.len + 2);
	if (buf == NULL)
		return NULL;
	buf[0] = '<';
	memcpy(buf + 1, id.data, id.len);
	buf[id.len + 1] = '>';
	bracketed.data = buf;
	bracketed.len = id.len + 2;
	r = make_text(ctx, bracketed);
	free(buf);
	return r;
}

/* read_returned_message - Message-ID, Return-Path and To of a returned message or its headers */
static void
read_returned_message(ParseCtx *ctx, Slice msg)
{
	Slice		headers;
	Slice		body;
	Slice		v;

	split_message(skip_blank_lines(msg), &headers, &body);
	if (get_header(headers, "Message-ID", &v))
		set_once(ctx, &ctx->out->returned_message_id, make_message_id, v);
	add_header_addresses(ctx, headers, "Return-Path", DSN_ADDR_RETURNED_RETURN_PATH);
	if (get_header(headers, "To", &v))
		for_each_list_address(ctx, v, 1, first_address_cb, 0);
}

/* read_returned_part - read_returned_message on the returned MIME part, if there is one */
static void
read_returned_part(ParseCtx *ctx)
{
	char	   *owned;
	Slice		msg;

	if (!ctx->have_returned)
		return;
	msg = decode_body(ctx, &ctx->returned, &owned);
	read_returned_message(ctx, msg);
	free(owned);
}

/* new_recipient - index of a fresh recipient, or -1 at DSN_MAX_RECIPIENTS or out of memory */
static int
new_recipient(ParseCtx *ctx)
{
	DsnReport  *out = ctx->out;

	if (out->nrecipients >= DSN_MAX_RECIPIENTS)
	{
		out->recipients_truncated = true;
		return -1;
	}
	if (out->nrecipients == ctx->capacity)
	{
		int			cap = ctx->capacity == 0 ? 4 : ctx->capacity * 2;
		DsnRecipient *r;

		if (cap > DSN_MAX_RECIPIENTS)
			cap = DSN_MAX_RECIPIENTS;
		r = dsn_realloc(ctx, out->recipients, (size_t) cap * sizeof(DsnRecipient));
		if (r == NULL)
			return -1;
		out->recipients = r;
		ctx->capacity = cap;
	}
	memset(&out->recipients[out->nrecipients], 0, sizeof(DsnRecipient));
	return out->nrecipients++;
}

/* match_enhanced - length of an enhanced status code ("5.1.10") at s[i], or 0 */
static size_t
match_enhanced(const char *s, size_t len, size_t i)
{
	size_t		j = i;
	int			part;

	if (j >= len || (s[j] != '2' && s[j] != '4' && s[j] != '5'))
		return 0;
	j++;
	for (part = 0; part < 2; part++)
	{
		size_t		digits = 0;

		if (j >= len || s[j] != '.')
			return 0;
		j++;
		while (j < len && is_digit(s[j]) && digits < 4)
		{
			j++;
			digits++;
		}
		if (digits == 0 || digits > 3)
			return 0;
	}
	return j - i;
}

/* set_status - copy an enhanced status code of n bytes */
static void
set_status(char *status, const char *code, size_t n)
{
	if (n >= DSN_STATUS_SIZE)
		n = DSN_STATUS_SIZE - 1;
	memcpy(status, code, n);
	status[n] = '\0';
}

/* parse_status_field - the code of a Status field ("5.1.1 (comment)" allowed), or "" */
static void
parse_status_field(Slice v, char *status)
{
	Slice		t = trim(v);
	size_t		n = match_enhanced(t.data, t.len, 0);

	status[0] = '\0';
	if (n > 0)
		set_status(status, t.data, n);
}

/* smtp_code_at - s[i] starts a 4xx/5xx (or 2xx) SMTP reply code standing on its own */
static bool
smtp_code_at(const char *s, size_t len, size_t i, bool allow_2xx)
{
	if (i + 3 > len)
		return false;
	if (!(s[i] == '4' || s[i] == '5' || (allow_2xx && s[i] == '2')) ||
		!is_digit(s[i + 1]) || !is_digit(s[i + 2]))
		return false;
	if (i > 0 && (is_alnum(s[i - 1]) || s[i - 1] == '.' || s[i - 1] == '-' || s[i - 1] == '#'))
		return false;
	return i + 3 == len || s[i + 3] == ' ' || s[i + 3] == '-';
}

/*
 * status_from_text - an enhanced status code in a diagnostic text: qmail's
 * "(#5.1.1)", else the one after an SMTP reply code ("550-5.1.1", "550
 * 5.1.10"), else the reply code's class ("550" -> "5.0.0"); "" if none.
 * Bare dotted numbers are not taken: they are IP addresses and versions.
 */
static void
status_from_text(const char *s, char *status)
{
	size_t		len = strlen(s);
	size_t		i;
	size_t		n;

	status[0] = '\0';
	for (i = 0; i + 2 < len; i++)
	{
		if (s[i] == '(' && s[i + 1] == '#' &&
			(n = match_enhanced(s, len, i + 2)) > 0 && i + 2 + n < len && s[i + 2 + n] == ')')
		{
			set_status(status, s + i + 2, n);
			return;
		}
	}
	for (i = 0; i < len; i++)
	{
		size_t		j;

		if (!smtp_code_at(s, len, i, true))
			continue;
		j = i + 3;
		while (j < len && (s[j] == ' ' || s[j] == '-' || s[j] == '#'))
			j++;
		n = match_enhanced(s, len, j);
		if (n > 0 && s[j] == s[i] && (j + n == len || !is_digit(s[j + n])))
		{
			set_status(status, s + j, n);
			return;
		}
	}
	for (i = 0; i < len; i++)
	{
		if (smtp_code_at(s, len, i, false))
		{
			status[0] = s[i];
			memcpy(status + 1, ".0.0", 5);
			return;
		}
	}
}

/*
 * collapse_reply_prefixes - a multi-line SMTP reply unfolded into one line
 * repeats its prefix on every line ("550-5.1.1 The email account ...
 * 550-5.1.1 double-checking ... 550 5.1.1 https://..."): keep the first
 * prefix only.  Works in place; the text only gets shorter.
 */
static void
collapse_reply_prefixes(char *s)
{
	size_t		len = strlen(s);
	size_t		i;
	size_t		plen;
	size_t		enh;
	size_t		r;
	size_t		w;

	for (i = 0; i + 4 <= len; i++)
		if (smtp_code_at(s, len, i, true) && s[i + 3] == '-')
			break;
	if (i + 4 > len)
		return;
	enh = match_enhanced(s, len, i + 4);
	if (enh == 0 || s[i + 4] != s[i])
		return;					/* without "5.x.x", "550 " may be text */
	plen = 4 + enh;				/* "550-5.1.1" */
	r = w = i + plen;
	while (r < len)
	{
		if (s[r] == ' ' && r + 1 + plen <= len &&
			memcmp(s + r + 1, s + i, 3) == 0 &&
			(s[r + 4] == '-' || s[r + 4] == ' ') &&
			memcmp(s + r + 5, s + i + 4, enh) == 0 &&
			(r + 1 + plen == len || s[r + 1 + plen] == ' '))
		{
			r += 1 + plen;
			continue;
		}
		s[w++] = s[r++];
	}
	s[w] = '\0';
}

/* action_from_status - the Action a status class implies, for reports that leave it out */
static DsnAction
action_from_status(const char *status)
{
	switch (status[0])
	{
		case '5':
			return DSN_ACTION_FAILED;
		case '4':
			return DSN_ACTION_DELAYED;
		case '2':
			return DSN_ACTION_DELIVERED;
		default:
			return DSN_ACTION_NONE;
	}
}

/* parse_action - the Action field's first word */
static DsnAction
parse_action(Slice v)
{
	Slice		t = trim(v);
	size_t		i = 0;

	while (i < t.len && !is_space(t.data[i]) && t.data[i] != '(' && t.data[i] != ';')
		i++;
	t.len = i;
	if (slice_eq_ci(t, "failed"))
		return DSN_ACTION_FAILED;
	if (slice_eq_ci(t, "delayed"))
		return DSN_ACTION_DELAYED;
	if (slice_eq_ci(t, "delivered"))
		return DSN_ACTION_DELIVERED;
	if (slice_eq_ci(t, "relayed"))
		return DSN_ACTION_RELAYED;
	if (slice_eq_ci(t, "expanded"))
		return DSN_ACTION_EXPANDED;
	return DSN_ACTION_NONE;
}

/* recipient_field_bit - the SEEN_ bit of a per-recipient field name, 0 for others */
static unsigned
recipient_field_bit(Slice name)
{
	if (slice_eq_ci(name, "Final-Recipient"))
		return SEEN_FINAL;
	if (slice_eq_ci(name, "Original-Recipient"))
		return SEEN_ORIGINAL;
	if (slice_eq_ci(name, "Action"))
		return SEEN_ACTION;
	if (slice_eq_ci(name, "Status"))
		return SEEN_STATUS;
	if (slice_eq_ci(name, "Diagnostic-Code"))
		return SEEN_DIAGNOSTIC;
	if (slice_eq_ci(name, "Remote-MTA"))
		return SEEN_REMOTE_MTA;
	return 0;
}

/* complete_recipients - Status from the diagnostic, Action from the Status, where left out */
static void
complete_recipients(ParseCtx *ctx)
{
	int			i;

	for (i = 0; i < ctx->out->nrecipients; i++)
	{
		DsnRecipient *r = &ctx->out->recipients[i];

		if (r->diagnostic != NULL)
			collapse_reply_prefixes(r->diagnostic);
		if (r->status[0] == '\0' && r->diagnostic != NULL)
			status_from_text(r->diagnostic, r->status);
		if (r->action == DSN_ACTION_NONE)
			r->action = action_from_status(r->status);
	}
}

/*
 * read_status_fields - the fields of a delivery-status part.  A blank line
 * ends a recipient's group; so does a per-recipient field the group
 * already has (reports that leave out the blank lines).  Per-message
 * fields are taken from wherever they are.
 */
static void
read_status_fields(ParseCtx *ctx, Slice body)
{
	DsnReport  *out = ctx->out;
	size_t		pos = 0;
	Slice		name;
	Slice		v;
	int			r;
	int			cur = -1;
	unsigned	seen = 0;

	while (!ctx->oom && (r = next_field(body, &pos, &name, &v)) >= 0)
	{
		unsigned	bit;
		DsnRecipient *rcpt;

		if (r == 0)
		{
			cur = -1;
			continue;
		}
		if (slice_eq_ci(name, "Reporting-MTA"))
		{
			set_once(ctx, &out->reporting_mta, typed_field, v);
			continue;
		}
		if (slice_eq_ci(name, "Original-Envelope-Id"))
		{
			set_once(ctx, &out->original_envelope_id, make_field, v);
			continue;
		}
		if (slice_eq_ci(name, "X-Postfix-Sender"))
		{
			for_each_list_address(ctx, strip_type(v), DSN_MAX_PER_SOURCE, add_address_cb,
								  (int) DSN_ADDR_REPORTED_SENDER);
			continue;
		}
		if (slice_eq_ci(name, "X-Original-Message-ID"))
		{
			/* Gmail's: the fallback when no returned message says it */
			set_once(ctx, &out->returned_message_id, make_message_id, v);
			continue;
		}
		bit = recipient_field_bit(name);
		if (bit == 0)
			continue;
		if (cur >= 0 && (seen & bit) != 0)
			cur = -1;
		if (cur < 0)
		{
			cur = new_recipient(ctx);
			seen = 0;
			if (cur < 0)
				continue;
		}
		seen |= bit;
		rcpt = &out->recipients[cur];
		switch (bit)
		{
			case SEEN_FINAL:
				rcpt->final_recipient = address_field(ctx, v);
				break;
			case SEEN_ORIGINAL:
				rcpt->original_recipient = address_field(ctx, v);
				break;
			case SEEN_ACTION:
				rcpt->action = parse_action(v);
				break;
			case SEEN_STATUS:
				parse_status_field(v, rcpt->status);
				break;
			case SEEN_DIAGNOSTIC:
				rcpt->diagnostic = typed_field(ctx, v);
				break;
			case SEEN_REMOTE_MTA:
				rcpt->remote_mta = typed_field(ctx, v);
				break;
		}
	}
	complete_recipients(ctx);
}

/* read_delivery_status - an RFC 3464 report */
static void
read_delivery_status(ParseCtx *ctx)
{
	DsnReport  *out = ctx->out;
	char	   *owned;
	Slice		body;

	out->format = DSN_FORMAT_RFC3464;
	read_returned_part(ctx);
	if (!ctx->have_status)
	{
		out->kind = DSN_KIND_MALFORMED;
		out->error = "delivery report without a message/delivery-status part";
		return;
	}
	body = decode_body(ctx, &ctx->status, &owned);
	read_status_fields(ctx, body);
	free(owned);
	if (out->nrecipients == 0)
	{
		out->kind = DSN_KIND_MALFORMED;
		out->error = "delivery-status part names no recipient";
		return;
	}
	out->kind = DSN_KIND_DELIVERY_STATUS;
}

/* add_complained_cb - for_each_list_address callback: one complained-of address */
static void
add_complained_cb(ParseCtx *ctx, Slice a, int unused)
{
	int			i = new_recipient(ctx);

	(void) unused;
	if (i >= 0)
		ctx->out->recipients[i].final_recipient = make_field(ctx, a);
}

/*
 * read_feedback - an RFC 5965 report.  abuse, fraud, virus and other are
 * complaints; not-spam and auth-failure (a DMARC failure report) are not,
 * and neither is a type this code does not know.  The complained-of
 * address is Original-Rcpt-To, else Removal-Recipient, else the returned
 * message's To; providers often redact all three, the VERP address says
 * it anyway.
 */
static void
read_feedback(ParseCtx *ctx)
{
	static const char *const complaint_types[] = {"abuse", "fraud", "virus", "other", NULL};
	DsnReport  *out = ctx->out;
	char	   *owned;
	Slice		body;
	Slice		name;
	Slice		v;
	Slice		removal = {NULL, 0};
	size_t		pos = 0;
	int			r;

	out->format = DSN_FORMAT_RFC5965;
	read_returned_part(ctx);
	if (!ctx->have_feedback)
	{
		out->kind = DSN_KIND_MALFORMED;
		out->error = "feedback report without a message/feedback-report part";
		return;
	}
	body = decode_body(ctx, &ctx->feedback, &owned);
	while (!ctx->oom && (r = next_field(body, &pos, &name, &v)) >= 0)
	{
		if (r == 0)
			continue;
		if (slice_eq_ci(name, "Feedback-Type"))
			set_once(ctx, &out->feedback_type, make_field, v);
		else if (slice_eq_ci(name, "Reporting-MTA"))
			set_once(ctx, &out->reporting_mta, typed_field, v);
		else if (slice_eq_ci(name, "Original-Envelope-Id"))
			set_once(ctx, &out->original_envelope_id, make_field, v);
		else if (slice_eq_ci(name, "Original-Mail-From"))
			for_each_list_address(ctx, v, DSN_MAX_PER_SOURCE, add_address_cb,
								  (int) DSN_ADDR_ORIGINAL_MAIL_FROM);
		else if (slice_eq_ci(name, "Original-Rcpt-To"))
			for_each_list_address(ctx, v, 1, add_complained_cb, 0);
		else if (slice_eq_ci(name, "Removal-Recipient") && removal.data == NULL)
			removal = v;
	}
	if (out->nrecipients == 0 && removal.data != NULL)
		for_each_list_address(ctx, removal, 1, add_complained_cb, 0);
	free(owned);
	if (out->nrecipients == 0 && ctx->returned_to != NULL)
	{
		int			i = new_recipient(ctx);

		if (i >= 0)
		{
			out->recipients[i].final_recipient = ctx->returned_to;
			ctx->returned_to = NULL;
		}
	}
	if (out->feedback_type == NULL)
	{
		out->kind = DSN_KIND_MALFORMED;
		out->error = "feedback report without Feedback-Type";
		return;
	}
	/* the type is one token: "abuse", never "abuse (by user)" */
	{
		char	   *t = out->feedback_type;
		size_t		k;

		for (k = 0; t[k] != '\0' && t[k] != ' ' && t[k] != ';' && t[k] != '('; k++)
			t[k] = ascii_lower(t[k]);
		t[k] = '\0';
		if (k == 0)
		{
			free(t);
			out->feedback_type = NULL;
			out->kind = DSN_KIND_MALFORMED;
			out->error = "feedback report without Feedback-Type";
			return;
		}
	}
	out->kind = type_is_one_of(out->feedback_type, complaint_types) ?
		DSN_KIND_COMPLAINT : DSN_KIND_OTHER;
}

/*
 * line_at_start - s has, within its first DSN_SIGNATURE_WINDOW bytes, a
 * line that begins with lit (case-insensitively)
 */
static bool
line_at_start(Slice s, const char *lit)
{
	Slice		w = slice_from(s, 0, DSN_SIGNATURE_WINDOW);
	size_t		pos = 0;
	Slice		line;

	while (next_line(w, &pos, &line))
		if (starts_with_ci(trim(line), lit))
			return true;
	return false;
}

/*
 * from_bounce_sender - the outer headers could be a bounce's: null or
 * daemon Return-Path, or a daemon in From.  Plain-text formats are
 * recognised only then, so a person quoting a bounce is left alone.
 */
static bool
from_bounce_sender(Slice headers)
{
	Slice		v;

	if (!get_header(headers, "Return-Path", &v))
		return true;
	v = trim(v);
	if (slice_eq_ci(v, "<>") || v.len == 0 || find_ci(v, "mailer-daemon") >= 0)
		return true;
	if (get_header(headers, "From", &v) &&
		(find_ci(v, "mailer-daemon") >= 0 || find_ci(v, "postmaster") >= 0))
		return true;
	return false;
}

/* finish_plain_recipient - Diagnostic, Status and Action of a recipient read from text */
static void
finish_plain_recipient(ParseCtx *ctx, int cur, const char *diag_start, const char *diag_end,
					   const char *default_status)
{
	DsnRecipient *r;

	if (cur < 0)
		return;
	r = &ctx->out->recipients[cur];
	if (diag_start != NULL)
	{
		Slice		d = {diag_start, (size_t) (diag_end - diag_start)};

		r->diagnostic = make_field(ctx, d);
	}
	if (r->diagnostic != NULL)
		status_from_text(r->diagnostic, r->status);
	if (r->status[0] == '\0')
		set_status(r->status, default_status, strlen(default_status));
}

/* plain_recipient - a recipient read from text, address given; -1 if none was made */
static int
plain_recipient(ParseCtx *ctx, Slice address)
{
	int			cur;

	address = trim(address);
	if (address.len == 0 || memchr(address.data, '@', address.len) == NULL)
		return -1;
	cur = new_recipient(ctx);
	if (cur >= 0)
		ctx->out->recipients[cur].final_recipient = make_field(ctx, address);
	return cur;
}

/*
 * read_qmail - qmail-send's bounce: paragraphs "<addr>:" followed by the
 * remote's answer, then "--- Below this line is a copy of the message."
 * qmail gives up only on permanent errors, hence 5.0.0 when no code says
 * more.
 */
static void
read_qmail(ParseCtx *ctx, Slice text)
{
	size_t		pos = 0;
	Slice		line;
	int			cur = -1;
	const char *diag_start = NULL;
	const char *diag_end = NULL;

	ctx->out->format = DSN_FORMAT_QMAIL;
	while (!ctx->oom && next_line(text, &pos, &line))
	{
		Slice		t = trim(line);
		long		at;

		if (ctx->out->reporting_mta == NULL && (at = find_ci(t, "qmail-send program at ")) >= 0)
		{
			Slice		host = slice_from(t, (size_t) at + strlen("qmail-send program at "), t.len);

			while (host.len > 0 && host.data[host.len - 1] == '.')
				host.len--;
			ctx->out->reporting_mta = make_field(ctx, host);
			continue;
		}

		if (starts_with_ci(t, "--- Below this line is") ||
			starts_with_ci(t, "--- Enclosed are the original headers"))
		{
			read_returned_message(ctx, slice_from(text, pos, text.len));
			break;
		}
		if (t.len >= 3 && t.data[0] == '<' && t.data[t.len - 2] == '>' && t.data[t.len - 1] == ':')
		{
			finish_plain_recipient(ctx, cur, diag_start, diag_end, "5.0.0");
			cur = plain_recipient(ctx, slice_from(t, 1, t.len - 3));
			diag_start = diag_end = NULL;
		}
		else if (t.len == 0)
		{
			finish_plain_recipient(ctx, cur, diag_start, diag_end, "5.0.0");
			cur = -1;
		}
		else if (cur >= 0)
		{
			if (diag_start == NULL)
				diag_start = t.data;
			diag_end = t.data + t.len;
		}
	}
	finish_plain_recipient(ctx, cur, diag_start, diag_end, "5.0.0");
	complete_recipients(ctx);
}

/*
 * read_exim_text - Exim's plain-text failure ("The following address(es)
 * failed:") or delay warning ("...has not yet been delivered is:"):
 * addresses indented by two spaces, each followed by its reason indented
 * by four, then "------ This is a copy of the message...".
 */
static void
read_exim_text(ParseCtx *ctx, Slice text)
{
	size_t		pos = 0;
	Slice		line;
	int			cur = -1;
	const char *diag_start = NULL;
	const char *diag_end = NULL;
	const char *deflt = NULL;

	ctx->out->format = DSN_FORMAT_EXIM_TEXT;
	while (next_line(text, &pos, &line))
	{
		if (find_ci(line, "failed:") >= 0 && find_ci(line, "address") >= 0)
		{
			deflt = "5.0.0";
			break;
		}
		if (find_ci(line, "not yet been delivered") >= 0 &&
			(find_ci(line, " is:") >= 0 || find_ci(line, " are:") >= 0))
		{
			deflt = "4.0.0";
			break;
		}
	}
	if (deflt == NULL)
		return;
	while (!ctx->oom && next_line(text, &pos, &line))
	{
		size_t		indent = 0;

		while (indent < line.len && is_wsp(line.data[indent]))
			indent += 1;
		if (line_is_blank(line))
		{
			finish_plain_recipient(ctx, cur, diag_start, diag_end, deflt);
			cur = -1;
			continue;
		}
		if (indent == 0)
			break;
		if (indent < 4)
		{
			Slice		t = trim(line);
			size_t		k = 0;

			finish_plain_recipient(ctx, cur, diag_start, diag_end, deflt);
			while (k < t.len && !is_space(t.data[k]))
				k++;
			cur = plain_recipient(ctx, unbracket(slice_from(t, 0, k)));
			diag_start = diag_end = NULL;
		}
		else if (cur >= 0)
		{
			Slice		t = trim(line);

			if (diag_start == NULL && starts_with_ci(t, "Delay reason:"))
				t = trim(slice_from(t, strlen("Delay reason:"), t.len));
			if (diag_start == NULL)
				diag_start = t.data;
			diag_end = t.data + t.len;
		}
	}
	finish_plain_recipient(ctx, cur, diag_start, diag_end, deflt);
	complete_recipients(ctx);

	/* the warning's recipients are delayed whatever code their reason shows */
	if (deflt[0] == '4')
	{
		int			i;

		for (i = 0; i < ctx->out->nrecipients; i++)
			ctx->out->recipients[i].action = DSN_ACTION_DELAYED;
	}
	pos = 0;
	while (next_line(text, &pos, &line))
	{
		if (starts_with_ci(line, "------ This is a copy of the message"))
		{
			read_returned_message(ctx, slice_from(text, pos, text.len));
			break;
		}
	}
}

/* read_plain_text - a mail that is no report: a known plain-text bounce, or OTHER */
static void
read_plain_text(ParseCtx *ctx, Slice headers)
{
	DsnReport  *out = ctx->out;
	char	   *owned;
	Slice		text;

	out->kind = DSN_KIND_OTHER;
	if (!ctx->have_text || !from_bounce_sender(headers))
		return;
	text = decode_body(ctx, &ctx->text, &owned);
	if (find_ci(slice_from(text, 0, DSN_SIGNATURE_WINDOW), "This is the qmail-send program") >= 0)
		read_qmail(ctx, text);
	else if (line_at_start(text, "This message was created automatically by mail delivery software"))
		read_exim_text(ctx, text);
	if (out->format != DSN_FORMAT_NONE)
	{
		if (out->nrecipients > 0)
			out->kind = DSN_KIND_DELIVERY_STATUS;
		else
		{
			out->kind = DSN_KIND_MALFORMED;
			out->error = "plain-text bounce names no recipient";
		}
	}
	free(owned);
}

/*
 * message_id_from_thread_headers - when the report returned nothing to
 * read it from, the Message-ID it answers: its In-Reply-To, else the last
 * id of its References (Exchange, Gmail and Exim set both)
 */
static void
message_id_from_thread_headers(ParseCtx *ctx, Slice headers)
{
	Slice		v;

	if (ctx->out->returned_message_id == NULL && get_header(headers, "In-Reply-To", &v))
		ctx->out->returned_message_id = make_message_id(ctx, v);
	if (ctx->out->returned_message_id == NULL && get_header(headers, "References", &v))
	{
		size_t		i = v.len;

		while (i > 0 && v.data[i - 1] != '<')
			i--;
		if (i > 0)
			ctx->out->returned_message_id = make_message_id(ctx, slice_from(v, i - 1, v.len));
	}
}

/* sort_addresses - best source first (stable: the order within a source is kept) */
static void
sort_addresses(DsnReport *out)
{
	int			i;

	for (i = 1; i < out->naddresses; i++)
	{
		DsnAddress	a = out->addresses[i];
		int			j = i;

		while (j > 0 && out->addresses[j - 1].source > a.source)
		{
			out->addresses[j] = out->addresses[j - 1];
			j--;
		}
		out->addresses[j] = a;
	}
}

/* dsn_parse - classify a raw mail and read the report in it (see dsn.h) */
bool
dsn_parse(const char *raw, size_t len, DsnReport *out)
{
	ParseCtx	ctx;
	Slice		whole;
	Slice		headers;
	Slice		body;

	memset(out, 0, sizeof(*out));
	memset(&ctx, 0, sizeof(ctx));
	ctx.out = out;
	whole.data = raw != NULL ? raw : "";
	whole.len = raw != NULL ? len : 0;

	split_message(whole, &headers, &body);
	add_header_addresses(&ctx, headers, "X-Original-To", DSN_ADDR_X_ORIGINAL_TO);
	add_header_addresses(&ctx, headers, "Delivered-To", DSN_ADDR_DELIVERED_TO);
	add_header_addresses(&ctx, headers, "Envelope-To", DSN_ADDR_ENVELOPE_TO);
	add_header_addresses(&ctx, headers, "To", DSN_ADDR_TO);
	add_header_addresses(&ctx, headers, "Return-Path", DSN_ADDR_RETURN_PATH);

	walk_part(&ctx, whole, 0);

	if (strcmp(ctx.report_type, "delivery-status") == 0 ||
		(ctx.report_type[0] == '\0' && ctx.have_status))
		read_delivery_status(&ctx);
	else if (strcmp(ctx.report_type, "feedback-report") == 0 ||
			 (ctx.report_type[0] == '\0' && ctx.have_feedback))
		read_feedback(&ctx);
	else if (ctx.have_report && ctx.report_type[0] != '\0')
		out->kind = DSN_KIND_OTHER; /* read receipts and other reports */
	else
		read_plain_text(&ctx, headers);

	if (out->kind != DSN_KIND_OTHER)
		message_id_from_thread_headers(&ctx, headers);
	sort_addresses(out);
	free(ctx.returned_to);
	if (ctx.oom)
	{
		dsn_report_free(out);
		return false;
	}
	return true;
}

/* dsn_report_free - release a report's strings and zero it */
void
dsn_report_free(DsnReport *report)
{
	int			i;

	if (report == NULL)
		return;
	for (i = 0; i < report->nrecipients; i++)
	{
		free(report->recipients[i].final_recipient);
		free(report->recipients[i].original_recipient);
		free(report->recipients[i].diagnostic);
		free(report->recipients[i].remote_mta);
	}
	free(report->recipients);
	for (i = 0; i < report->naddresses; i++)
		free(report->addresses[i].address);
	free(report->reporting_mta);
	free(report->original_envelope_id);
	free(report->feedback_type);
	free(report->returned_message_id);
	memset(report, 0, sizeof(*report));
}

/* dsn_recipient_is_permanent_failure - what makes a message bounced and its address suppressed */
bool
dsn_recipient_is_permanent_failure(const DsnRecipient *r)
{
	return r != NULL && r->action == DSN_ACTION_FAILED && r->status[0] == '5';
}

/* is_token_char - a byte allowed in a VERP token */
static bool
is_token_char(char c)
{
	return is_alnum(c) || c == '.' || c == '_' || c == '=' || c == '-';
}

/* dsn_verp_token - the token of "prefix+TOKEN@domain" (see dsn.h) */
bool
dsn_verp_token(const char *address, const char *local_prefix, const char *domain,
			   char *token, size_t tokensize)
{
	const char *at;
	const char *plus;
	size_t		toklen;
	size_t		i;

	if (address == NULL || token == NULL || tokensize == 0)
		return false;
	at = strrchr(address, '@');
	if (at == NULL)
		return false;
	if (domain != NULL && !str_eq_ci(at + 1, domain))
		return false;
	plus = memchr(address, '+', (size_t) (at - address));
	if (plus == NULL)
		return false;
	if (local_prefix != NULL)
	{
		Slice		local = {address, (size_t) (plus - address)};

		if (!slice_eq_ci(local, local_prefix))
			return false;
	}
	toklen = (size_t) (at - plus - 1);
	if (toklen == 0 || toklen >= tokensize)
		return false;
	for (i = 0; i < toklen; i++)
		if (!is_token_char(plus[1 + i]))
			return false;
	memcpy(token, plus + 1, toklen);
	token[toklen] = '\0';
	return true;
}

/* dsn_report_verp_token - the first VERP token among the report's addresses (see dsn.h) */
int
dsn_report_verp_token(const DsnReport *report, const char *local_prefix,
					  const char *domain, char *token, size_t tokensize)
{
	int			i;

	if (report == NULL)
		return -1;
	for (i = 0; i < report->naddresses; i++)
		if (dsn_verp_token(report->addresses[i].address, local_prefix, domain,
						   token, tokensize))
			return i;
	return -1;
}

/* dsn_verp_message - split "m<id>.<tag>" (see dsn.h) */
bool
dsn_verp_message(const char *token, long long *message_id, char *tag, size_t tagsize)
{
	long long	id = 0;
	size_t		digits = 0;
	size_t		taglen;
	const char *p;

	if (token == NULL || (token[0] != 'm' && token[0] != 'M'))
		return false;
	for (p = token + 1; is_digit(*p); p++)
	{
		if (++digits > 18)
			return false;
		id = id * 10 + (*p - '0');
	}
	if (digits == 0 || *p != '.')
		return false;
	p++;
	for (taglen = 0; p[taglen] != '\0'; taglen++)
		if (!is_alnum(p[taglen]) && p[taglen] != '_' && p[taglen] != '-')
			return false;
	if (taglen == 0 || tag == NULL || taglen >= tagsize)
		return false;
	memcpy(tag, p, taglen + 1);
	if (message_id != NULL)
		*message_id = id;
	return true;
}

/* dsn_kind_name - for log lines */
const char *
dsn_kind_name(DsnKind kind)
{
	switch (kind)
	{
		case DSN_KIND_OTHER:
			return "other";
		case DSN_KIND_DELIVERY_STATUS:
			return "delivery-status";
		case DSN_KIND_COMPLAINT:
			return "complaint";
		case DSN_KIND_MALFORMED:
			return "malformed";
	}
	return "unknown";
}

/* dsn_format_name - for log lines */
const char *
dsn_format_name(DsnFormat format)
{
	switch (format)
	{
		case DSN_FORMAT_NONE:
			return "none";
		case DSN_FORMAT_RFC3464:
			return "rfc3464";
		case DSN_FORMAT_RFC5965:
			return "rfc5965";
		case DSN_FORMAT_QMAIL:
			return "qmail";
		case DSN_FORMAT_EXIM_TEXT:
			return "exim-text";
	}
	return "unknown";
}

/* dsn_action_name - for log lines; "" for none */
const char *
dsn_action_name(DsnAction action)
{
	switch (action)
	{
		case DSN_ACTION_NONE:
			return "";
		case DSN_ACTION_FAILED:
			return "failed";
		case DSN_ACTION_DELAYED:
			return "delayed";
		case DSN_ACTION_DELIVERED:
			return "delivered";
		case DSN_ACTION_RELAYED:
			return "relayed";
		case DSN_ACTION_EXPANDED:
			return "expanded";
	}
	return "unknown";
}

/* dsn_address_source_name - the header an address candidate came from, for log lines */
const char *
dsn_address_source_name(DsnAddressSource source)
{
	switch (source)
	{
		case DSN_ADDR_X_ORIGINAL_TO:
			return "X-Original-To";
		case DSN_ADDR_DELIVERED_TO:
			return "Delivered-To";
		case DSN_ADDR_ENVELOPE_TO:
			return "Envelope-to";
		case DSN_ADDR_TO:
			return "To";
		case DSN_ADDR_REPORTED_SENDER:
			return "X-Postfix-Sender";
		case DSN_ADDR_ORIGINAL_MAIL_FROM:
			return "Original-Mail-From";
		case DSN_ADDR_RETURNED_RETURN_PATH:
			return "returned Return-Path";
		case DSN_ADDR_RETURN_PATH:
			return "Return-Path";
	}
	return "unknown";
}

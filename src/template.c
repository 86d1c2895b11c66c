/*-------------------------------------------------------------------------
 *
 * template.c
 *	  Mustache renderer and strict JSON parser in plain C (libc only).
 *
 * Templates are compiled once into a flat array of nodes: a section node
 * records where its children end, so rendering is a walk over index ranges
 * driven by an explicit frame stack.  Neither compiling nor rendering
 * recurses on template structure, so no input can exhaust the C stack; the
 * only recursion is over JSON nesting, which the parser caps.
 *
 * Everything the module allocates goes through the allocation hooks, and
 * every allocation failure is reported as an error rather than a crash, so
 * the same code serves malloc-based test programs and palloc inside the
 * server (where a failing palloc simply never returns).
 *
 *-------------------------------------------------------------------------
 */
#include "template.h"

#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __GNUC__
#define TMPL_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define TMPL_PRINTF(f, a)
#endif

#define NOT_FOUND SIZE_MAX
#define IS_SPACE(ch) ((ch) == ' ' || (ch) == '\t' || (ch) == '\r' || (ch) == '\n')

static TmplAllocator allocator = {malloc, realloc, free};
static unsigned long max_steps = TMPL_DEFAULT_MAX_STEPS;
static void (*interrupt_hook) (void) = NULL;


/* ----------------------------------------------------------------------
 * Memory
 * ----------------------------------------------------------------------
 */

/* tmpl_set_allocator - let the extension route allocations to palloc */
void
tmpl_set_allocator(const TmplAllocator *a)
{
	if (a == NULL)
	{
		allocator.alloc = malloc;
		allocator.realloc = realloc;
		allocator.free = free;
	}
	else
		allocator = *a;
}

/* tmpl_mem_alloc - the one way to get memory; never asks for zero bytes */
void *
tmpl_mem_alloc(size_t size)
{
	return allocator.alloc(size ? size : 1);
}

/*
 * tmpl_mem_realloc - grow memory through the hooks
 *
 * repalloc cannot take NULL, so a NULL pointer turns into an allocation.
 */
void *
tmpl_mem_realloc(void *ptr, size_t size)
{
	if (ptr == NULL)
		return tmpl_mem_alloc(size);
	return allocator.realloc(ptr, size ? size : 1);
}

/* tmpl_mem_free - release memory; pfree cannot take NULL, so skip it */
void
tmpl_mem_free(void *ptr)
{
	if (ptr != NULL)
		allocator.free(ptr);
}

/* tmpl_set_step_limit - cap the work one render may do */
void
tmpl_set_step_limit(unsigned long limit)
{
	max_steps = limit;
}

/* tmpl_set_interrupt_hook - let long renders be cancelled by the server */
void
tmpl_set_interrupt_hook(void (*hook) (void))
{
	interrupt_hook = hook;
}

/*
 * grow_array - make room for at least `need` elements
 *
 * Capacity doubles so appending stays amortised O(1).  Returns the array
 * (moved or not), or NULL when the size overflows or memory runs out, in
 * which case the old array and *cap are left untouched for the caller to
 * clean up.
 */
static void *
grow_array(void *arr, size_t *cap, size_t need, size_t elsize)
{
	size_t		newcap;
	void	   *p;

	if (need <= *cap && arr != NULL)
		return arr;
	newcap = *cap ? *cap : 8;
	while (newcap < need)
	{
		if (newcap > SIZE_MAX / 2)
			return NULL;
		newcap *= 2;
	}
	if (newcap > SIZE_MAX / elsize)
		return NULL;
	p = tmpl_mem_realloc(arr, newcap * elsize);
	if (p == NULL)
		return NULL;
	*cap = newcap;
	return p;
}

/* copy_string - NUL-terminated copy of a byte range, via the hooks */
static char *
copy_string(const char *s, size_t len)
{
	char	   *p;

	if (len == SIZE_MAX)
		return NULL;
	p = tmpl_mem_alloc(len + 1);
	if (p == NULL)
		return NULL;
	if (len > 0)
		memcpy(p, s, len);
	p[len] = '\0';
	return p;
}


/* ----------------------------------------------------------------------
 * Positions and small helpers shared by the parser and the compiler
 * ----------------------------------------------------------------------
 */

/*
 * line_column - turn a byte offset into the 1-based line and column users see
 *
 * Columns count characters, not bytes, so an error after "é" points where an
 * editor would.  This is only done when reporting an error, so a scan from
 * the start is cheap enough and saves tracking positions on the hot path.
 */
static void
line_column(const char *s, size_t pos, int *line, int *column)
{
	size_t		l = 1;
	size_t		c = 1;
	size_t		i;

	for (i = 0; i < pos; i++)
	{
		if (s[i] == '\n')
		{
			l++;
			c = 1;
		}
		else if (((unsigned char) s[i] & 0xC0) != 0x80)
			c++;
	}
	*line = l > INT_MAX ? INT_MAX : (int) l;
	*column = c > INT_MAX ? INT_MAX : (int) c;
}

/*
 * find_bytes - memmem() is not C11; find needle in s[from..len)
 *
 * memchr does the bulk of the scanning, which keeps long text runs fast.
 */
static size_t
find_bytes(const char *s, size_t len, size_t from, const char *needle,
		   size_t nlen)
{
	const char *p;

	while (from < len && len - from >= nlen)
	{
		p = memchr(s + from, needle[0], len - from - nlen + 1);
		if (p == NULL)
			return NOT_FOUND;
		if (memcmp(p, needle, nlen) == 0)
			return (size_t) (p - s);
		from = (size_t) (p - s) + 1;
	}
	return NOT_FOUND;
}

/* find_suffixed - find ch immediately followed by needle, e.g. "}" + "}}" */
static size_t
find_suffixed(const char *s, size_t len, size_t from, char ch,
			  const char *needle, size_t nlen)
{
	const char *p;

	while (from < len && len - from > nlen)
	{
		p = memchr(s + from, ch, len - from - nlen);
		if (p == NULL)
			return NOT_FOUND;
		if (memcmp(p + 1, needle, nlen) == 0)
			return (size_t) (p - s);
		from = (size_t) (p - s) + 1;
	}
	return NOT_FOUND;
}

/*
 * printable_name - a name fit for an error message
 *
 * Names can be long or hold control characters (they are rejected for that
 * very reason), so messages get a truncated, sanitised copy.
 */
static void
printable_name(char *buf, size_t bufsize, const char *s, size_t len)
{
	size_t		max = bufsize - 4;	/* room for "..." and the NUL */
	size_t		i;

	for (i = 0; i < len && i < max; i++)
	{
		unsigned char c = (unsigned char) s[i];

		buf[i] = (c < 0x20 || c == 0x7F) ? '?' : (char) c;
	}
	if (i < len)
	{
		memcpy(buf + i, "...", 3);
		i += 3;
	}
	buf[i] = '\0';
}

/*
 * utf8_sequence - length of the valid UTF-8 sequence at s, or 0
 *
 * Follows RFC 3629 exactly: no overlong forms, no encoded surrogates,
 * nothing above U+10FFFF.  Text that passes can be handed to PostgreSQL as
 * is, which would otherwise reject it much later with a worse message.
 */
static size_t
utf8_sequence(const unsigned char *s, size_t n)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80;
	unsigned char hi = 0xBF;

	if (c < 0x80)
		return 1;
	if (c >= 0xC2 && c <= 0xDF)
		return (n >= 2 && (s[1] & 0xC0) == 0x80) ? 2 : 0;
	if (c >= 0xE0 && c <= 0xEF)
	{
		if (c == 0xE0)
			lo = 0xA0;
		else if (c == 0xED)
			hi = 0x9F;
		if (n < 3 || s[1] < lo || s[1] > hi || (s[2] & 0xC0) != 0x80)
			return 0;
		return 3;
	}
	if (c >= 0xF0 && c <= 0xF4)
	{
		if (c == 0xF0)
			lo = 0x90;
		else if (c == 0xF4)
			hi = 0x8F;
		if (n < 4 || s[1] < lo || s[1] > hi ||
			(s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80)
			return 0;
		return 4;
	}
	return 0;
}


/* ----------------------------------------------------------------------
 * JSON parser
 * ----------------------------------------------------------------------
 */

typedef struct JsonParser
{
	const char *s;
	size_t		len;
	size_t		pos;
	char	   *errbuf;
	size_t		errlen;
} JsonParser;

static TmplValue *json_value(JsonParser *p, int depth);

/* json_error - report the first error with its position; later ones are moot */
TMPL_PRINTF(3, 4)
static void
json_error(JsonParser *p, size_t at, const char *fmt,...)
{
	va_list		ap;
	char		msg[200];
	int			line;
	int			column;

	if (p->errbuf == NULL || p->errlen == 0)
		return;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	line_column(p->s, at, &line, &column);
	snprintf(p->errbuf, p->errlen, "line %d, column %d: %s", line, column, msg);
}

/* json_unexpected - say which character is wrong, readable or in hex */
static void
json_unexpected(JsonParser *p, const char *what)
{
	unsigned char c;

	if (p->pos >= p->len)
	{
		json_error(p, p->pos, "unexpected end of input%s%s",
				   what ? ", expected " : "", what ? what : "");
		return;
	}
	c = (unsigned char) p->s[p->pos];
	if (c > 0x20 && c < 0x7F)
		json_error(p, p->pos, "unexpected character '%c'%s%s", c,
				   what ? ", expected " : "", what ? what : "");
	else
		json_error(p, p->pos, "unexpected byte 0x%02X%s%s", c,
				   what ? ", expected " : "", what ? what : "");
}

/* json_skip_ws - RFC 8259 whitespace is exactly these four characters */
static void
json_skip_ws(JsonParser *p)
{
	while (p->pos < p->len)
	{
		char		c = p->s[p->pos];

		if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
			break;
		p->pos++;
	}
}

/* new_value - a zeroed value node, so freeing a half-built one is safe */
static TmplValue *
new_value(TmplValueKind kind)
{
	TmplValue  *v = tmpl_mem_alloc(sizeof(TmplValue));

	if (v != NULL)
	{
		memset(v, 0, sizeof(TmplValue));
		v->kind = kind;
	}
	return v;
}

/* hex4 - value of four hex digits at s, or -1 */
static long
hex4(const char *s)
{
	long		v = 0;
	int			i;

	for (i = 0; i < 4; i++)
	{
		char		c = s[i];

		v <<= 4;
		if (c >= '0' && c <= '9')
			v |= c - '0';
		else if (c >= 'a' && c <= 'f')
			v |= c - 'a' + 10;
		else if (c >= 'A' && c <= 'F')
			v |= c - 'A' + 10;
		else
			return -1;
	}
	return v;
}

/*
 * json_string - parse a string literal into a fresh NUL-terminated buffer
 *
 * The closing quote is found first: decoding never makes text longer than
 * its escaped form, so one allocation of the raw length is always enough
 * and the bytes are validated and copied in a single pass.
 */
static char *
json_string(JsonParser *p, size_t *outlen)
{
	const char *s = p->s;
	size_t		open = p->pos;
	size_t		start = open + 1;
	size_t		end = start;
	size_t		q;
	size_t		o = 0;
	char	   *buf;

	while (end < p->len && s[end] != '"')
		end += (s[end] == '\\') ? 2 : 1;
	if (end >= p->len)
	{
		json_error(p, open, "unterminated string");
		return NULL;
	}
	buf = tmpl_mem_alloc(end - start + 1);
	if (buf == NULL)
	{
		json_error(p, open, "out of memory");
		return NULL;
	}

	q = start;
	while (q < end)
	{
		unsigned char c = (unsigned char) s[q];

		if (c == '\\')
		{
			/* the scan above guarantees a character after the backslash */
			char		e = s[q + 1];
			long		cp;

			switch (e)
			{
				case '"':
				case '\\':
				case '/':
					buf[o++] = e;
					break;
				case 'b':
					buf[o++] = '\b';
					break;
				case 'f':
					buf[o++] = '\f';
					break;
				case 'n':
					buf[o++] = '\n';
					break;
				case 'r':
					buf[o++] = '\r';
					break;
				case 't':
					buf[o++] = '\t';
					break;
				case 'u':
					if (end - q < 6 || (cp = hex4(s + q + 2)) < 0)
					{
						json_error(p, q, "invalid \\u escape (expected four hex digits)");
						goto fail;
					}
					if (cp >= 0xDC00 && cp <= 0xDFFF)
					{
						json_error(p, q, "lone low surrogate \\u%04lX", cp);
						goto fail;
					}
					if (cp >= 0xD800 && cp <= 0xDBFF)
					{
						long		lo = -1;

						if (end - q >= 12 && s[q + 6] == '\\' && s[q + 7] == 'u')
							lo = hex4(s + q + 8);
						if (lo < 0xDC00 || lo > 0xDFFF)
						{
							json_error(p, q, "lone high surrogate \\u%04lX (a low surrogate must follow)", cp);
							goto fail;
						}
						cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
						q += 6;
					}
					if (cp == 0)
					{
						json_error(p, q, "\\u0000 is not allowed in strings");
						goto fail;
					}
					if (cp < 0x80)
						buf[o++] = (char) cp;
					else if (cp < 0x800)
					{
						buf[o++] = (char) (0xC0 | (cp >> 6));
						buf[o++] = (char) (0x80 | (cp & 0x3F));
					}
					else if (cp < 0x10000)
					{
						buf[o++] = (char) (0xE0 | (cp >> 12));
						buf[o++] = (char) (0x80 | ((cp >> 6) & 0x3F));
						buf[o++] = (char) (0x80 | (cp & 0x3F));
					}
					else
					{
						buf[o++] = (char) (0xF0 | (cp >> 18));
						buf[o++] = (char) (0x80 | ((cp >> 12) & 0x3F));
						buf[o++] = (char) (0x80 | ((cp >> 6) & 0x3F));
						buf[o++] = (char) (0x80 | (cp & 0x3F));
					}
					q += 4;
					break;
				default:
					json_error(p, q, "invalid escape sequence");
					goto fail;
			}
			q += 2;
		}
		else if (c < 0x20)
		{
			json_error(p, q, "control character 0x%02X in string (must be escaped)", c);
			goto fail;
		}
		else if (c < 0x80)
			buf[o++] = s[q++];
		else
		{
			size_t		n = utf8_sequence((const unsigned char *) s + q, end - q);

			if (n == 0)
			{
				json_error(p, q, "invalid UTF-8 in string");
				goto fail;
			}
			memcpy(buf + o, s + q, n);
			o += n;
			q += n;
		}
	}
	buf[o] = '\0';
	*outlen = o;
	p->pos = end + 1;
	return buf;

fail:
	tmpl_mem_free(buf);
	return NULL;
}

/* json_number - validate the RFC 8259 number grammar, keeping the lexeme */
static TmplValue *
json_number(JsonParser *p)
{
	const char *s = p->s;
	size_t		start = p->pos;
	size_t		i = start;
	TmplValue  *v;

#define IS_DIGIT(k) ((k) < p->len && s[k] >= '0' && s[k] <= '9')
	if (s[i] == '-')
		i++;
	if (!IS_DIGIT(i))
	{
		p->pos = i;
		json_unexpected(p, "a digit");
		return NULL;
	}
	if (s[i] == '0')
	{
		i++;
		if (IS_DIGIT(i))
		{
			json_error(p, start, "invalid number: leading zeros are not allowed");
			return NULL;
		}
	}
	else
		while (IS_DIGIT(i))
			i++;
	if (i < p->len && s[i] == '.')
	{
		i++;
		if (!IS_DIGIT(i))
		{
			p->pos = i;
			json_unexpected(p, "a digit after the decimal point");
			return NULL;
		}
		while (IS_DIGIT(i))
			i++;
	}
	if (i < p->len && (s[i] == 'e' || s[i] == 'E'))
	{
		i++;
		if (i < p->len && (s[i] == '+' || s[i] == '-'))
			i++;
		if (!IS_DIGIT(i))
		{
			p->pos = i;
			json_unexpected(p, "a digit in the exponent");
			return NULL;
		}
		while (IS_DIGIT(i))
			i++;
	}
#undef IS_DIGIT

	v = new_value(TV_NUMBER);
	if (v == NULL || (v->str = copy_string(s + start, i - start)) == NULL)
	{
		tmpl_mem_free(v);
		json_error(p, start, "out of memory");
		return NULL;
	}
	v->len = i - start;
	p->pos = i;
	return v;
}

/* json_literal - true, false and null */
static TmplValue *
json_literal(JsonParser *p)
{
	static const struct
	{
		const char *word;
		size_t		len;
		TmplValueKind kind;
		bool		b;
	}			words[] =
	{
		{"true", 4, TV_BOOL, true},
		{"false", 5, TV_BOOL, false},
		{"null", 4, TV_NULL, false},
	};
	size_t		i;

	for (i = 0; i < sizeof(words) / sizeof(words[0]); i++)
	{
		if (p->len - p->pos >= words[i].len &&
			memcmp(p->s + p->pos, words[i].word, words[i].len) == 0)
		{
			TmplValue  *v = new_value(words[i].kind);

			if (v == NULL)
			{
				json_error(p, p->pos, "out of memory");
				return NULL;
			}
			v->boolean = words[i].b;
			p->pos += words[i].len;
			return v;
		}
	}
	json_error(p, p->pos, "invalid literal (expected true, false or null)");
	return NULL;
}

/*
 * json_array - parse [ value, ... ]
 *
 * Elements are attached as soon as they are parsed, so on any error freeing
 * the array frees everything built so far.
 */
static TmplValue *
json_array(JsonParser *p, int depth)
{
	TmplValue  *v;
	size_t		cap = 0;

	if (depth > TMPL_JSON_MAX_DEPTH)
	{
		json_error(p, p->pos, "nesting depth exceeds %d", TMPL_JSON_MAX_DEPTH);
		return NULL;
	}
	if ((v = new_value(TV_ARRAY)) == NULL)
	{
		json_error(p, p->pos, "out of memory");
		return NULL;
	}
	p->pos++;
	json_skip_ws(p);
	if (p->pos < p->len && p->s[p->pos] == ']')
	{
		p->pos++;
		return v;
	}
	for (;;)
	{
		TmplValue  *item;
		TmplValue **items;

		if ((item = json_value(p, depth)) == NULL)
			goto fail;
		items = grow_array(v->items, &cap, v->count + 1, sizeof(TmplValue *));
		if (items == NULL)
		{
			tmpl_value_free(item);
			json_error(p, p->pos, "out of memory");
			goto fail;
		}
		v->items = items;
		v->items[v->count++] = item;

		json_skip_ws(p);
		if (p->pos < p->len && p->s[p->pos] == ',')
			p->pos++;
		else if (p->pos < p->len && p->s[p->pos] == ']')
		{
			p->pos++;
			return v;
		}
		else
		{
			json_unexpected(p, "',' or ']'");
			goto fail;
		}
	}

fail:
	tmpl_value_free(v);
	return NULL;
}

/* json_object - parse { "key": value, ... }, keeping member order */
static TmplValue *
json_object(JsonParser *p, int depth)
{
	TmplValue  *v;
	size_t		capk = 0;
	size_t		capl = 0;
	size_t		capi = 0;

	if (depth > TMPL_JSON_MAX_DEPTH)
	{
		json_error(p, p->pos, "nesting depth exceeds %d", TMPL_JSON_MAX_DEPTH);
		return NULL;
	}
	if ((v = new_value(TV_OBJECT)) == NULL)
	{
		json_error(p, p->pos, "out of memory");
		return NULL;
	}
	p->pos++;
	json_skip_ws(p);
	if (p->pos < p->len && p->s[p->pos] == '}')
	{
		p->pos++;
		return v;
	}
	for (;;)
	{
		char	   *key;
		size_t		keylen;
		TmplValue  *item;
		void	   *arr;

		json_skip_ws(p);
		if (p->pos >= p->len || p->s[p->pos] != '"')
		{
			json_unexpected(p, "a string (member name)");
			goto fail;
		}
		if ((key = json_string(p, &keylen)) == NULL)
			goto fail;
		json_skip_ws(p);
		if (p->pos >= p->len || p->s[p->pos] != ':')
		{
			tmpl_mem_free(key);
			json_unexpected(p, "':'");
			goto fail;
		}
		p->pos++;
		if ((item = json_value(p, depth)) == NULL)
		{
			tmpl_mem_free(key);
			goto fail;
		}

		/* each array grows on its own; count only moves once all three fit */
		if ((arr = grow_array(v->keys, &capk, v->count + 1, sizeof(char *))) != NULL)
		{
			v->keys = arr;
			if ((arr = grow_array(v->keylens, &capl, v->count + 1, sizeof(size_t))) != NULL)
			{
				v->keylens = arr;
				if ((arr = grow_array(v->items, &capi, v->count + 1, sizeof(TmplValue *))) != NULL)
					v->items = arr;
			}
		}
		if (arr == NULL)
		{
			tmpl_mem_free(key);
			tmpl_value_free(item);
			json_error(p, p->pos, "out of memory");
			goto fail;
		}
		v->keys[v->count] = key;
		v->keylens[v->count] = keylen;
		v->items[v->count] = item;
		v->count++;

		json_skip_ws(p);
		if (p->pos < p->len && p->s[p->pos] == ',')
			p->pos++;
		else if (p->pos < p->len && p->s[p->pos] == '}')
		{
			p->pos++;
			return v;
		}
		else
		{
			json_unexpected(p, "',' or '}'");
			goto fail;
		}
	}

fail:
	tmpl_value_free(v);
	return NULL;
}

/*
 * json_value - parse any value
 *
 * Recursion follows JSON nesting only, and json_array/json_object refuse to
 * go deeper than TMPL_JSON_MAX_DEPTH, which bounds the stack used.
 */
static TmplValue *
json_value(JsonParser *p, int depth)
{
	TmplValue  *v;
	char	   *str;
	size_t		len;

	json_skip_ws(p);
	if (p->pos >= p->len)
	{
		json_unexpected(p, "a value");
		return NULL;
	}
	switch (p->s[p->pos])
	{
		case '{':
			return json_object(p, depth + 1);
		case '[':
			return json_array(p, depth + 1);
		case '"':
			if ((str = json_string(p, &len)) == NULL)
				return NULL;
			if ((v = new_value(TV_STRING)) == NULL)
			{
				tmpl_mem_free(str);
				json_error(p, p->pos, "out of memory");
				return NULL;
			}
			v->str = str;
			v->len = len;
			return v;
		case 't':
		case 'f':
		case 'n':
			return json_literal(p);
		case '-':
		case '0':
		case '1':
		case '2':
		case '3':
		case '4':
		case '5':
		case '6':
		case '7':
		case '8':
		case '9':
			return json_number(p);
		default:
			json_unexpected(p, "a value");
			return NULL;
	}
}

/* tmpl_json_parse - turn context JSON into a value tree, strictly */
TmplValue *
tmpl_json_parse(const char *text, size_t len, char *errbuf, size_t errlen)
{
	JsonParser	p;
	TmplValue  *v;

	p.s = text ? text : "";
	p.len = text ? len : 0;
	p.pos = 0;
	p.errbuf = errbuf;
	p.errlen = errlen;
	if (errbuf != NULL && errlen > 0)
		errbuf[0] = '\0';

	if ((v = json_value(&p, 0)) == NULL)
		return NULL;
	json_skip_ws(&p);
	if (p.pos < p.len)
	{
		json_unexpected(&p, "end of input after the JSON value");
		tmpl_value_free(v);
		return NULL;
	}
	return v;
}

/* tmpl_value_free - release a value tree; depth is bounded by the parser */
void
tmpl_value_free(TmplValue *v)
{
	size_t		i;

	if (v == NULL)
		return;
	for (i = 0; i < v->count; i++)
	{
		if (v->items != NULL)
			tmpl_value_free(v->items[i]);
		if (v->keys != NULL)
			tmpl_mem_free(v->keys[i]);
	}
	tmpl_mem_free(v->items);
	tmpl_mem_free(v->keys);
	tmpl_mem_free(v->keylens);
	tmpl_mem_free(v->str);
	tmpl_mem_free(v);
}

/*
 * find_member - object member by (pointer, length) name
 *
 * Scans from the end so that a repeated key resolves to its last value, as
 * jsonb and JavaScript would.  Objects in mail contexts are small, so a
 * linear scan beats the cost of building an index per object.
 */
static const TmplValue *
find_member(const TmplValue *obj, const char *name, size_t len)
{
	size_t		i;

	for (i = obj->count; i-- > 0;)
	{
		if (obj->keylens[i] == len && memcmp(obj->keys[i], name, len) == 0)
			return obj->items[i];
	}
	return NULL;
}

/* tmpl_value_get - object member by C string, for callers */
const TmplValue *
tmpl_value_get(const TmplValue *obj, const char *key)
{
	if (obj == NULL || obj->kind != TV_OBJECT || key == NULL)
		return NULL;
	return find_member(obj, key, strlen(key));
}


/* ----------------------------------------------------------------------
 * Template compiler
 * ----------------------------------------------------------------------
 */

typedef enum NodeKind
{
	N_TEXT,
	N_VAR,						/* {{name}}: escaped */
	N_RAW,						/* {{{name}}} and {{&name}} */
	N_SECTION,
	N_INVERTED,
	N_PARTIAL
} NodeKind;

typedef struct NamePart
{
	size_t		off;			/* in the template's source copy */
	size_t		len;
} NamePart;

typedef struct Node
{
	NodeKind	kind;
	bool		bol;			/* begins a line: partial indentation goes
								 * before it */
	bool		standalone;		/* PARTIAL alone on its line */
	size_t		pos;			/* offset of the text or of the opening tag */
	size_t		off;			/* TEXT: the text; tags: the name */
	size_t		len;
	size_t		part;			/* first NamePart; PARTIAL: offset in names */
	size_t		nparts;			/* 0 means the implicit iterator "." */
	size_t		next;			/* SECTION/INVERTED: node after the children */
	size_t		indent_off;		/* standalone PARTIAL: its indentation */
	size_t		indent_len;
} Node;

struct TmplTemplate
{
	char	   *src;			/* private, NUL-terminated copy of the source */
	size_t		srclen;
	Node	   *nodes;
	size_t		nnodes;
	NamePart   *parts;
	size_t		nparts;
	char	   *names;			/* partial names, each NUL-terminated */
	size_t		nameslen;
};

typedef struct Compiler
{
	TmplTemplate *t;
	TmplError  *err;
	size_t		nodecap;
	size_t		partcap;
	size_t		namecap;
	const char *otag;			/* current delimiters (point into src) */
	size_t		olen;
	const char *ctag;
	size_t		clen;
} Compiler;

typedef struct OpenSection
{
	size_t		node;
	size_t		tag_pos;
} OpenSection;

/* set_error - fill a TmplError with the position of offset pos in src */
TMPL_PRINTF(4, 5)
static void
set_error(TmplError *err, const char *src, size_t pos, const char *fmt,...)
{
	va_list		ap;

	if (src != NULL)
		line_column(src, pos, &err->line, &err->column);
	else
		err->line = err->column = 0;
	va_start(ap, fmt);
	vsnprintf(err->message, sizeof(err->message), fmt, ap);
	va_end(ap);
}

/* tmpl_free - release a compiled template */
void
tmpl_free(TmplTemplate *t)
{
	if (t == NULL)
		return;
	tmpl_mem_free(t->src);
	tmpl_mem_free(t->nodes);
	tmpl_mem_free(t->parts);
	tmpl_mem_free(t->names);
	tmpl_mem_free(t);
}

/* add_node - append a zeroed node; NULL (error set) when out of memory */
static Node *
add_node(Compiler *c, NodeKind kind, size_t pos)
{
	TmplTemplate *t = c->t;
	Node	   *nodes;
	Node	   *n;

	nodes = grow_array(t->nodes, &c->nodecap, t->nnodes + 1, sizeof(Node));
	if (nodes == NULL)
	{
		set_error(c->err, NULL, 0, "out of memory");
		return NULL;
	}
	t->nodes = nodes;
	n = &t->nodes[t->nnodes++];
	memset(n, 0, sizeof(Node));
	n->kind = kind;
	n->pos = pos;
	n->bol = (pos == 0 || t->src[pos - 1] == '\n');
	return n;
}

/*
 * check_name - reject tag contents that cannot be a name
 *
 * Most broken tags are a missing closing delimiter, which makes the tag
 * swallow text up to the next tag's close; seeing an opening delimiter in
 * the name is reported as exactly that, at the tag that lacks its close.
 * Names must not contain whitespace or control characters (the spec says
 * "non-whitespace"), and dotted names must not have empty parts.
 */
static bool
check_name(Compiler *c, size_t tag_pos, size_t off, size_t len, bool dotted)
{
	const char *s = c->t->src;
	char		shown[48];
	size_t		i;

	if (len == 0)
	{
		set_error(c->err, s, tag_pos, "empty tag name");
		return false;
	}
	if (find_bytes(s, off + len, off, c->otag, c->olen) != NOT_FOUND)
	{
		set_error(c->err, s, tag_pos, "unclosed tag (no \"%.*s\" before the next tag)",
				  (int) (c->clen > 16 ? 16 : c->clen), c->ctag);
		return false;
	}
	for (i = 0; i < len; i++)
	{
		unsigned char ch = (unsigned char) s[off + i];

		if (ch <= 0x20 || ch == 0x7F ||
			(dotted && ch == '.' && len > 1 &&
			 (i == 0 || i == len - 1 || s[off + i + 1] == '.')))
		{
			printable_name(shown, sizeof(shown), s + off, len);
			set_error(c->err, s, tag_pos, "invalid tag name \"%s\"", shown);
			return false;
		}
	}
	return true;
}

/* set_name - record a (validated) dotted name on a node as NameParts */
static bool
set_name(Compiler *c, Node *n, size_t off, size_t len)
{
	TmplTemplate *t = c->t;
	size_t		i;
	size_t		start = off;

	n->off = off;
	n->len = len;
	n->part = t->nparts;
	n->nparts = 0;
	if (len == 1 && t->src[off] == '.')
		return true;
	for (i = off; i <= off + len; i++)
	{
		if (i == off + len || t->src[i] == '.')
		{
			NamePart   *parts;

			parts = grow_array(t->parts, &c->partcap, t->nparts + 1, sizeof(NamePart));
			if (parts == NULL)
			{
				set_error(c->err, NULL, 0, "out of memory");
				return false;
			}
			t->parts = parts;
			t->parts[t->nparts].off = start;
			t->parts[t->nparts].len = i - start;
			t->nparts++;
			n->nparts++;
			start = i + 1;
		}
	}
	return true;
}

/*
 * set_delimiters - apply {{=<% %>=}}
 *
 * The content must be exactly two tokens; tokens hold no whitespace by
 * construction and "=" is refused, as the spec asks.  The delimiters point
 * into the source copy, which lives as long as the template.
 */
static bool
set_delimiters(Compiler *c, size_t tag_pos, size_t from, size_t to)
{
	const char *s = c->t->src;
	size_t		a;
	size_t		b;
	size_t		i = from;

	while (i < to && IS_SPACE(s[i]))
		i++;
	a = i;
	while (i < to && !IS_SPACE(s[i]) && s[i] != '=')
		i++;
	if (i == a || i == to || s[i] == '=')
		goto bad;
	c->olen = i - a;
	while (i < to && IS_SPACE(s[i]))
		i++;
	b = i;
	while (i < to && !IS_SPACE(s[i]) && s[i] != '=')
		i++;
	if (i == b)
		goto bad;
	c->clen = i - b;
	while (i < to && IS_SPACE(s[i]))
		i++;
	if (i != to)
		goto bad;
	c->otag = s + a;
	c->ctag = s + b;
	return true;

bad:
	set_error(c->err, s, tag_pos,
			  "invalid set-delimiter tag (expected two delimiters without "
			  "whitespace or \"=\", as in {{=<%% %%>=}})");
	return false;
}

/*
 * tmpl_compile - parse a template once into the node array rendering walks
 *
 * Each tag is found by searching for the current delimiters.  Tags other
 * than interpolations are "standalone" when they are alone on their line
 * apart from spaces and tabs; the spec then drops the whole line (leading
 * whitespace and line ending included), which is decided here so rendering
 * never has to look at whitespace.
 */
TmplTemplate *
tmpl_compile(const char *src, size_t len, TmplError *err)
{
	TmplError	dummy;
	Compiler	c;
	TmplTemplate *t;
	OpenSection open[TMPL_MAX_SECTION_DEPTH];
	int			nopen = 0;
	size_t		pos = 0;
	size_t		text_start = 0;
	const char *s;

	if (err == NULL)
		err = &dummy;
	memset(err, 0, sizeof(TmplError));
	if (src == NULL)
		len = 0;

	memset(&c, 0, sizeof(c));
	c.err = err;
	c.otag = "{{";
	c.olen = 2;
	c.ctag = "}}";
	c.clen = 2;
	if ((t = tmpl_mem_alloc(sizeof(TmplTemplate))) == NULL)
	{
		set_error(err, NULL, 0, "out of memory");
		return NULL;
	}
	memset(t, 0, sizeof(TmplTemplate));
	c.t = t;
	if ((t->src = copy_string(src, len)) == NULL)
	{
		set_error(err, NULL, 0, "out of memory");
		goto fail;
	}
	t->srclen = len;
	s = t->src;

	for (;;)
	{
		size_t		tag_start;
		size_t		p;
		size_t		close;
		size_t		tag_end;
		size_t		name_off;
		size_t		name_len;
		size_t		ws_start;
		size_t		after;
		size_t		nl = 0;
		bool		standalone = false;
		char		sigil;
		Node	   *n;

		tag_start = find_bytes(s, len, pos, c.otag, c.olen);
		if (tag_start == NOT_FOUND)
			break;
		p = tag_start + c.olen;
		sigil = p < len ? s[p] : '\0';
		if (sigil != '\0' && strchr("#^/!>&{=", sigil) != NULL)
			p++;
		else
			sigil = '\0';

		/* find where the tag ends */
		if (sigil == '{' || sigil == '=')
		{
			close = find_suffixed(s, len, p, sigil == '{' ? '}' : '=', c.ctag, c.clen);
			tag_end = close + 1 + c.clen;
		}
		else
		{
			close = find_bytes(s, len, p, c.ctag, c.clen);
			tag_end = close + c.clen;
		}
		if (close == NOT_FOUND)
		{
			if (sigil == '=' && find_bytes(s, len, p, c.ctag, c.clen) != NOT_FOUND)
				set_delimiters(&c, tag_start, p, p);	/* reports the error */
			else
				set_error(err, s, tag_start, "unclosed tag (missing \"%s%.*s\")",
						  sigil == '{' ? "}" : (sigil == '=' ? "=" : ""),
						  (int) (c.clen > 16 ? 16 : c.clen), c.ctag);
			goto fail;
		}

		/* the name, without surrounding whitespace */
		name_off = p;
		name_len = close - p;
		while (name_len > 0 && IS_SPACE(s[name_off]))
		{
			name_off++;
			name_len--;
		}
		while (name_len > 0 && IS_SPACE(s[name_off + name_len - 1]))
			name_len--;

		/*
		 * Standalone: only spaces/tabs between the line start and the tag,
		 * which must all lie in the text since the previous tag (else another
		 * tag shares the line), and only spaces/tabs up to the line end.
		 */
		ws_start = tag_start;
		after = tag_end;
		if (sigil != '\0' && sigil != '&' && sigil != '{')
		{
			while (ws_start > text_start && (s[ws_start - 1] == ' ' || s[ws_start - 1] == '\t'))
				ws_start--;
			if (ws_start == 0 || s[ws_start - 1] == '\n')
			{
				while (after < len && (s[after] == ' ' || s[after] == '\t'))
					after++;
				if (after < len && s[after] == '\n')
					nl = 1;
				else if (after + 1 < len && s[after] == '\r' && s[after + 1] == '\n')
					nl = 2;
				standalone = (after == len || nl > 0);
			}
		}
		if (!standalone)
		{
			ws_start = tag_start;
			after = tag_end;
		}

		/* the text before the tag (minus a standalone line's indentation) */
		if (ws_start > text_start)
		{
			if ((n = add_node(&c, N_TEXT, text_start)) == NULL)
				goto fail;
			n->off = text_start;
			n->len = ws_start - text_start;
		}
		pos = text_start = after + nl;

		switch (sigil)
		{
			case '!':
				break;

			case '=':
				if (!set_delimiters(&c, tag_start, p, close))
					goto fail;
				break;

			case '#':
			case '^':
				if (!check_name(&c, tag_start, name_off, name_len, true))
					goto fail;
				if (nopen >= TMPL_MAX_SECTION_DEPTH)
				{
					set_error(err, s, tag_start, "sections nested more than %d deep",
							  TMPL_MAX_SECTION_DEPTH);
					goto fail;
				}
				if ((n = add_node(&c, sigil == '#' ? N_SECTION : N_INVERTED, tag_start)) == NULL ||
					!set_name(&c, n, name_off, name_len))
					goto fail;
				if (standalone)
					n->bol = false; /* its line vanishes: nothing to indent */
				open[nopen].node = t->nnodes - 1;
				open[nopen].tag_pos = tag_start;
				nopen++;
				break;

			case '/':
				{
					Node	   *o;
					char		shown[48];
					char		oshown[48];
					int			oline;
					int			ocol;

					if (!check_name(&c, tag_start, name_off, name_len, true))
						goto fail;
					printable_name(shown, sizeof(shown), s + name_off, name_len);
					if (nopen == 0)
					{
						set_error(err, s, tag_start,
								  "closing tag \"%s\" has no open section", shown);
						goto fail;
					}
					o = &t->nodes[open[nopen - 1].node];
					if (o->len != name_len || memcmp(s + o->off, s + name_off, name_len) != 0)
					{
						printable_name(oshown, sizeof(oshown), s + o->off, o->len);
						line_column(s, open[nopen - 1].tag_pos, &oline, &ocol);
						set_error(err, s, tag_start,
								  "closing tag \"%s\" does not match open section \"%s\" opened at line %d, column %d",
								  shown, oshown, oline, ocol);
						goto fail;
					}
					o->next = t->nnodes;
					nopen--;
				}
				break;

			case '>':
				{
					char	   *names;

					if (!check_name(&c, tag_start, name_off, name_len, false))
						goto fail;
					if ((n = add_node(&c, N_PARTIAL, tag_start)) == NULL)
						goto fail;
					n->off = name_off;
					n->len = name_len;
					n->standalone = standalone;
					n->indent_off = ws_start;
					n->indent_len = standalone ? tag_start - ws_start : 0;
					names = grow_array(t->names, &c.namecap,
									   t->nameslen + name_len + 1, 1);
					if (names == NULL)
					{
						set_error(err, NULL, 0, "out of memory");
						goto fail;
					}
					t->names = names;
					n->part = t->nameslen;
					memcpy(t->names + t->nameslen, s + name_off, name_len);
					t->names[t->nameslen + name_len] = '\0';
					t->nameslen += name_len + 1;
				}
				break;

			default:
				if (!check_name(&c, tag_start, name_off, name_len, true))
					goto fail;
				if ((n = add_node(&c, sigil == '\0' ? N_VAR : N_RAW, tag_start)) == NULL ||
					!set_name(&c, n, name_off, name_len))
					goto fail;
				break;
		}
	}

	if (text_start < len)
	{
		Node	   *n = add_node(&c, N_TEXT, text_start);

		if (n == NULL)
			goto fail;
		n->off = text_start;
		n->len = len - text_start;
	}
	if (nopen > 0)
	{
		const Node *o = &t->nodes[open[nopen - 1].node];
		char		shown[48];
		int			oline;
		int			ocol;

		printable_name(shown, sizeof(shown), s + o->off, o->len);
		line_column(s, open[nopen - 1].tag_pos, &oline, &ocol);
		set_error(err, s, open[nopen - 1].tag_pos,
				  "unclosed section \"%s\" opened at line %d, column %d",
				  shown, oline, ocol);
		goto fail;
	}
	return t;

fail:
	tmpl_free(t);
	return NULL;
}


/* ----------------------------------------------------------------------
 * Renderer
 * ----------------------------------------------------------------------
 */

/*
 * A frame is a range of nodes being walked: the whole template, a section's
 * children (once per array element), or a partial's body.  Indentation of
 * standalone partials lives in one shared buffer; each frame sees a slice,
 * and popping a partial frame truncates the buffer back.
 */
typedef struct Frame
{
	const TmplTemplate *t;
	size_t		pos;			/* next node to visit */
	size_t		begin;			/* first node, to restart for the next item */
	size_t		end;			/* node after the range */
	const TmplValue *list;		/* array iterated by this frame, or NULL */
	size_t		item;			/* index of the current element of list */
	bool		pushed;			/* pushed a context entry */
	bool		partial;		/* body of a partial */
	size_t		istart;			/* indentation: ibuf[istart, istart+ilen) */
	size_t		ilen;
	size_t		iused;			/* ibuf length to restore when popped */
} Frame;

typedef struct PartialEntry
{
	const char *name;			/* points into a template alive all render */
	TmplTemplate *t;			/* NULL: the callback found nothing */
} PartialEntry;

typedef struct Renderer
{
	TmplBuf    *out;
	size_t		base;			/* out->len when the render started */
	size_t		max_output;
	TmplEscape	esc;
	TmplPartialFn pfn;
	void	   *parg;
	TmplError  *err;
	Frame	   *frames;
	size_t		nframes;
	size_t		framecap;
	const TmplValue **ctx;		/* context stack; ctx[0] is the root */
	size_t		nctx;
	size_t		ctxcap;
	char	   *ibuf;
	size_t		iused;
	size_t		icap;
	PartialEntry *cache;		/* hash table of partials met so far */
	size_t		ncache;
	size_t		cachecap;		/* 0 or a power of two */
	int			depth;			/* partial frames on the stack */
	unsigned long steps;
	const TmplTemplate *cur_t;	/* where errors are reported */
	size_t		cur_pos;
} Renderer;

/* render_error - report a render-time error at the node being rendered */
TMPL_PRINTF(2, 3)
static void
render_error(Renderer *r, const char *fmt,...)
{
	va_list		ap;

	if (r->cur_t != NULL)
		line_column(r->cur_t->src, r->cur_pos, &r->err->line, &r->err->column);
	else
		r->err->line = r->err->column = 0;
	va_start(ap, fmt);
	vsnprintf(r->err->message, sizeof(r->err->message), fmt, ap);
	va_end(ap);
}

/*
 * out_reserve - make room for n more bytes plus the NUL
 *
 * The max_output check lives here, before anything is copied, so a
 * runaway template stops as soon as it crosses the limit instead of after
 * it has filled memory.
 */
static bool
out_reserve(Renderer *r, size_t n)
{
	TmplBuf    *b = r->out;
	size_t		need;
	size_t		newcap;
	char	   *p;

	if (r->max_output > 0 && n > r->max_output - (b->len - r->base))
	{
		render_error(r, "output exceeds max_output of %zu bytes", r->max_output);
		return false;
	}
	if (n > SIZE_MAX - 1 - b->len)
	{
		render_error(r, "out of memory");
		return false;
	}
	need = b->len + n + 1;
	if (need <= b->cap && b->data != NULL)
		return true;
	newcap = b->cap ? b->cap : 256;
	while (newcap < need)
		newcap = newcap > SIZE_MAX / 2 ? need : newcap * 2;
	p = tmpl_mem_realloc(b->data, newcap);
	if (p == NULL)
	{
		render_error(r, "out of memory");
		return false;
	}
	if (b->data == NULL)
		p[0] = '\0';
	b->data = p;
	b->cap = newcap;
	return true;
}

/* emit - append bytes verbatim */
static bool
emit(Renderer *r, const char *s, size_t n)
{
	if (n == 0)
		return true;
	if (!out_reserve(r, n))
		return false;
	memcpy(r->out->data + r->out->len, s, n);
	r->out->len += n;
	r->out->data[r->out->len] = '\0';
	return true;
}

static bool emit_escaped(Renderer *r, const char *s, size_t n, TmplEscape esc);

/*
 * emit_json_escaped - JSON string content, then passed through `outer`
 *
 * Used for TMPL_ESCAPE_JSON (outer = none) and for strings inside arrays
 * and objects printed as JSON text, which an HTML tag must escape again.
 * Unescaped runs are copied in one go.
 */
static bool
emit_json_escaped(Renderer *r, const char *s, size_t n, TmplEscape outer)
{
	size_t		run = 0;
	size_t		i;

	for (i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) s[i];
		const char *rep;
		char		hex[8];

		if (c >= 0x20 && c != '"' && c != '\\')
			continue;
		switch (c)
		{
			case '"':
				rep = "\\\"";
				break;
			case '\\':
				rep = "\\\\";
				break;
			case '\n':
				rep = "\\n";
				break;
			case '\r':
				rep = "\\r";
				break;
			case '\t':
				rep = "\\t";
				break;
			case '\b':
				rep = "\\b";
				break;
			case '\f':
				rep = "\\f";
				break;
			default:
				snprintf(hex, sizeof(hex), "\\u%04X", c);
				rep = hex;
				break;
		}
		if (!emit_escaped(r, s + run, i - run, outer) ||
			!emit_escaped(r, rep, strlen(rep), outer))
			return false;
		run = i + 1;
	}
	return emit_escaped(r, s + run, n - run, outer);
}

/* emit_escaped - append a value's text with the requested escaping */
static bool
emit_escaped(Renderer *r, const char *s, size_t n, TmplEscape esc)
{
	size_t		run = 0;
	size_t		i;

	if (esc == TMPL_ESCAPE_JSON)
		return emit_json_escaped(r, s, n, TMPL_ESCAPE_NONE);
	if (esc != TMPL_ESCAPE_HTML)
		return emit(r, s, n);
	for (i = 0; i < n; i++)
	{
		const char *rep;

		switch (s[i])
		{
			case '&':
				rep = "&amp;";
				break;
			case '"':
				rep = "&quot;";
				break;
			case '<':
				rep = "&lt;";
				break;
			case '>':
				rep = "&gt;";
				break;
			case '\'':
				rep = "&#39;";
				break;
			default:
				continue;
		}
		if (!emit(r, s + run, i - run) || !emit(r, rep, strlen(rep)))
			return false;
		run = i + 1;
	}
	return emit(r, s + run, n - run);
}

/*
 * emit_json_value - print an array or object as compact JSON text
 *
 * This is what {{row}} shows.  Recursion follows the value's nesting, which
 * the parser limits; trees built by hand get the same limit here.
 */
static bool
emit_json_value(Renderer *r, const TmplValue *v, TmplEscape esc, int depth)
{
	size_t		i;

	if (depth > TMPL_JSON_MAX_DEPTH)
	{
		render_error(r, "value nested deeper than %d levels", TMPL_JSON_MAX_DEPTH);
		return false;
	}
	if (v == NULL)
		return emit_escaped(r, "null", 4, esc);
	switch (v->kind)
	{
		case TV_NULL:
			return emit_escaped(r, "null", 4, esc);
		case TV_BOOL:
			return v->boolean ? emit_escaped(r, "true", 4, esc) :
				emit_escaped(r, "false", 5, esc);
		case TV_NUMBER:
			return emit_escaped(r, v->str, v->len, esc);
		case TV_STRING:
			return emit_escaped(r, "\"", 1, esc) &&
				emit_json_escaped(r, v->str, v->len, esc) &&
				emit_escaped(r, "\"", 1, esc);
		case TV_ARRAY:
		case TV_OBJECT:
			if (!emit_escaped(r, v->kind == TV_ARRAY ? "[" : "{", 1, esc))
				return false;
			for (i = 0; i < v->count; i++)
			{
				if (i > 0 && !emit_escaped(r, ",", 1, esc))
					return false;
				if (v->kind == TV_OBJECT &&
					!(emit_escaped(r, "\"", 1, esc) &&
					  emit_json_escaped(r, v->keys[i], v->keylens[i], esc) &&
					  emit_escaped(r, "\":", 2, esc)))
					return false;
				if (!emit_json_value(r, v->items[i], esc, depth + 1))
					return false;
			}
			return emit_escaped(r, v->kind == TV_ARRAY ? "]" : "}", 1, esc);
	}
	return true;
}

/* emit_value - print a looked-up value the way {{name}} shows it */
static bool
emit_value(Renderer *r, const TmplValue *v, TmplEscape esc)
{
	if (v == NULL)
		return true;
	switch (v->kind)
	{
		case TV_NULL:
			return true;
		case TV_BOOL:
			return v->boolean ? emit_escaped(r, "true", 4, esc) :
				emit_escaped(r, "false", 5, esc);
		case TV_NUMBER:
		case TV_STRING:
			return emit_escaped(r, v->str, v->len, esc);
		case TV_ARRAY:
		case TV_OBJECT:
			return emit_json_value(r, v, esc, 0);
	}
	return true;
}

/* emit_indent - a standalone partial's indentation, at a line start */
static bool
emit_indent(Renderer *r, const Frame *f)
{
	return emit(r, r->ibuf + f->istart, f->ilen);
}

/* line_is_empty - whether the line starting at s[i] has no content */
static bool
line_is_empty(const char *s, size_t i, size_t len)
{
	return i >= len || s[i] == '\n' ||
		(s[i] == '\r' && i + 1 < len && s[i + 1] == '\n');
}

/*
 * emit_text - literal template text, indented inside standalone partials
 *
 * The spec prepends a standalone partial's indentation to each line of the
 * partial's source (not to lines coming from interpolated data), so the
 * indentation goes after newlines of literal text and before nodes that
 * begin a line.  Empty lines are left without trailing whitespace.
 */
static bool
emit_text(Renderer *r, const Frame *f, const Node *n)
{
	const char *s = f->t->src + n->off;
	size_t		len = n->len;
	size_t		start = 0;
	size_t		i;

	if (f->ilen == 0)
		return emit(r, s, len);
	if (n->bol && !line_is_empty(s, 0, len) && !emit_indent(r, f))
		return false;
	for (i = 0; i < len; i++)
	{
		if (s[i] == '\n' && !line_is_empty(s, i + 1, len))
		{
			if (!emit(r, s + start, i + 1 - start) || !emit_indent(r, f))
				return false;
			start = i + 1;
		}
	}
	return emit(r, s + start, len - start);
}

/* child - one step of a dotted name: object member or array index */
static const TmplValue *
child(const TmplValue *v, const char *name, size_t len)
{
	size_t		idx = 0;
	size_t		i;

	if (v->kind == TV_OBJECT)
		return find_member(v, name, len);
	if (v->kind != TV_ARRAY || len == 0 || (len > 1 && name[0] == '0'))
		return NULL;
	for (i = 0; i < len; i++)
	{
		if (name[i] < '0' || name[i] > '9' || idx > (SIZE_MAX - 9) / 10)
			return NULL;
		idx = idx * 10 + (size_t) (name[i] - '0');
	}
	return idx < v->count ? v->items[idx] : NULL;
}

/*
 * resolve - look a name up the way the spec says
 *
 * "." is the top of the context stack.  The first part of a dotted name is
 * searched from the top of the stack down, stopping at the first object
 * that has the key (even if its value is null); the remaining parts are
 * then followed strictly from there, so a broken chain yields nothing
 * rather than falling back to outer contexts.
 */
static const TmplValue *
resolve(const Renderer *r, const TmplTemplate *t, const Node *n)
{
	const NamePart *part;
	const TmplValue *v = NULL;
	size_t		i;

	if (n->nparts == 0)
		return r->ctx[r->nctx - 1];
	part = &t->parts[n->part];
	for (i = r->nctx; i-- > 0;)
	{
		const TmplValue *c = r->ctx[i];

		if (c != NULL && c->kind == TV_OBJECT &&
			(v = find_member(c, t->src + part[0].off, part[0].len)) != NULL)
			break;
	}
	for (i = 1; i < n->nparts && v != NULL; i++)
		v = child(v, t->src + part[i].off, part[i].len);
	return v;
}

/* is_truthy - falsy: missing, null, false, empty array, empty string */
static bool
is_truthy(const TmplValue *v)
{
	if (v == NULL)
		return false;
	switch (v->kind)
	{
		case TV_NULL:
			return false;
		case TV_BOOL:
			return v->boolean;
		case TV_STRING:
			return v->len > 0;
		case TV_ARRAY:
			return v->count > 0;
		case TV_NUMBER:
		case TV_OBJECT:
			return true;
	}
	return false;
}

/* push_ctx - push a value on the context stack */
static bool
push_ctx(Renderer *r, const TmplValue *v)
{
	const TmplValue **ctx;

	ctx = grow_array((void *) r->ctx, &r->ctxcap, r->nctx + 1, sizeof(TmplValue *));
	if (ctx == NULL)
	{
		render_error(r, "out of memory");
		return false;
	}
	r->ctx = ctx;
	r->ctx[r->nctx++] = v;
	return true;
}

/*
 * push_frame - start walking nodes [begin, end) of t
 *
 * This may move the frame array, so callers must not hold Frame pointers
 * across it.
 */
static bool
push_frame(Renderer *r, const TmplTemplate *t, size_t begin, size_t end,
		   const TmplValue *list, bool pushed, bool partial,
		   size_t istart, size_t ilen, size_t iused)
{
	Frame	   *frames;
	Frame	   *f;

	frames = grow_array(r->frames, &r->framecap, r->nframes + 1, sizeof(Frame));
	if (frames == NULL)
	{
		render_error(r, "out of memory");
		return false;
	}
	r->frames = frames;
	f = &r->frames[r->nframes++];
	f->t = t;
	f->pos = f->begin = begin;
	f->end = end;
	f->list = list;
	f->item = 0;
	f->pushed = pushed;
	f->partial = partial;
	f->istart = istart;
	f->ilen = ilen;
	f->iused = iused;
	if (partial)
		r->depth++;
	return true;
}

/* pop_frame - finish a frame, undoing what pushing it did */
static void
pop_frame(Renderer *r)
{
	Frame	   *f = &r->frames[--r->nframes];

	if (f->pushed)
		r->nctx--;
	if (f->partial)
		r->depth--;
	r->iused = f->iused;
}

/* count_step - enforce the step limit and give the server a chance to cancel */
static bool
count_step(Renderer *r)
{
	r->steps++;
	if (max_steps > 0 && r->steps > max_steps)
	{
		render_error(r, "render took more than %lu steps (loops over too much data?)",
					 max_steps);
		return false;
	}
	if (interrupt_hook != NULL && (r->steps & 0xFFFF) == 0)
		interrupt_hook();
	return true;
}

/* hash_name - FNV-1a, for the partial cache */
static size_t
hash_name(const char *s)
{
	uint32_t	h = 2166136261u;

	while (*s != '\0')
	{
		h ^= (unsigned char) *s++;
		h *= 16777619u;
	}
	return h;
}

/*
 * cache_insert - add an entry to the open-addressing partial cache
 *
 * The table is kept at most half full so probes stay short; growing
 * rehashes into a fresh table, leaving the old one intact on failure.
 */
static bool
cache_insert(Renderer *r, const char *name, TmplTemplate *t)
{
	size_t		mask;
	size_t		i;

	if ((r->ncache + 1) * 2 > r->cachecap)
	{
		size_t		newcap = r->cachecap ? r->cachecap * 2 : 16;
		PartialEntry *table;

		if (newcap > SIZE_MAX / sizeof(PartialEntry) ||
			(table = tmpl_mem_alloc(newcap * sizeof(PartialEntry))) == NULL)
			return false;
		memset(table, 0, newcap * sizeof(PartialEntry));
		for (i = 0; i < r->cachecap; i++)
		{
			size_t		j;

			if (r->cache[i].name == NULL)
				continue;
			for (j = hash_name(r->cache[i].name) & (newcap - 1);
				 table[j].name != NULL; j = (j + 1) & (newcap - 1))
				;
			table[j] = r->cache[i];
		}
		tmpl_mem_free(r->cache);
		r->cache = table;
		r->cachecap = newcap;
	}
	mask = r->cachecap - 1;
	for (i = hash_name(name) & mask; r->cache[i].name != NULL; i = (i + 1) & mask)
		;
	r->cache[i].name = name;
	r->cache[i].t = t;
	r->ncache++;
	return true;
}

/*
 * get_partial - compiled partial by name, calling the lookup at most once
 *
 * A partial used in a loop would otherwise be looked up and compiled once
 * per element; caching per render keeps that linear, and the cache dies
 * with the render, so partial edits are seen by the next one.
 */
static bool
get_partial(Renderer *r, const char *name, TmplTemplate **out)
{
	const char *src = NULL;
	size_t		len = 0;
	TmplTemplate *t = NULL;
	size_t		i;

	if (r->cachecap > 0)
	{
		size_t		mask = r->cachecap - 1;

		for (i = hash_name(name) & mask; r->cache[i].name != NULL; i = (i + 1) & mask)
		{
			if (strcmp(r->cache[i].name, name) == 0)
			{
				*out = r->cache[i].t;
				return true;
			}
		}
	}
	if (r->pfn != NULL)
		src = r->pfn(r->parg, name, &len);
	if (src != NULL)
	{
		TmplError	perr;

		if ((t = tmpl_compile(src, len, &perr)) == NULL)
		{
			char		shown[48];

			printable_name(shown, sizeof(shown), name, strlen(name));
			r->err->line = perr.line;
			r->err->column = perr.column;
			if (snprintf(r->err->message, sizeof(r->err->message),
						 "in partial \"%s\": %s", shown, perr.message) < 0)
				r->err->message[0] = '\0';
			return false;
		}
	}
	if (!cache_insert(r, name, t))
	{
		tmpl_free(t);
		render_error(r, "out of memory");
		return false;
	}
	*out = t;
	return true;
}

/* render_partial - enter a partial's body, with its indentation if standalone */
static bool
render_partial(Renderer *r, const Frame *f, const Node *n)
{
	TmplTemplate *pt;
	size_t		iused = r->iused;
	size_t		istart = 0;
	size_t		ilen = 0;

	if (!n->standalone && n->bol && f->ilen > 0 && !emit_indent(r, f))
		return false;
	if (!get_partial(r, f->t->names + n->part, &pt))
		return false;
	if (pt == NULL)
		return true;
	if (r->depth >= TMPL_MAX_PARTIAL_DEPTH)
	{
		char		shown[48];

		printable_name(shown, sizeof(shown), f->t->names + n->part, n->len);
		render_error(r, "partial recursion deeper than %d levels (partial \"%s\")",
					 TMPL_MAX_PARTIAL_DEPTH, shown);
		return false;
	}

	/* a nested standalone partial is indented by its parents' indentation too */
	if (n->standalone && f->ilen + n->indent_len > 0)
	{
		char	   *ibuf;

		ilen = f->ilen + n->indent_len;
		ibuf = grow_array(r->ibuf, &r->icap, r->iused + ilen, 1);
		if (ibuf == NULL)
		{
			render_error(r, "out of memory");
			return false;
		}
		r->ibuf = ibuf;
		istart = r->iused;
		memcpy(r->ibuf + istart, r->ibuf + f->istart, f->ilen);
		memcpy(r->ibuf + istart + f->ilen, f->t->src + n->indent_off, n->indent_len);
		r->iused += ilen;
	}
	return push_frame(r, pt, 0, pt->nnodes, NULL, false, true, istart, ilen, iused);
}

/*
 * render_run - the walk over the frame stack
 *
 * A frame that runs off its end either restarts for the next array element
 * or is popped.  A section node makes its own frame skip the children and
 * pushes a frame for them, so each node is handled in one place.
 */
static bool
render_run(Renderer *r, const TmplTemplate *top, const TmplValue *root)
{
	if (!out_reserve(r, 0) || !push_ctx(r, root) ||
		!push_frame(r, top, 0, top->nnodes, NULL, false, false, 0, 0, 0))
		return false;

	while (r->nframes > 0)
	{
		Frame	   *f = &r->frames[r->nframes - 1];
		const Node *n;
		const TmplValue *v;
		size_t		idx;

		if (f->pos >= f->end)
		{
			if (f->list != NULL && f->item + 1 < f->list->count)
			{
				f->item++;
				r->ctx[r->nctx - 1] = f->list->items[f->item];
				f->pos = f->begin;
				if (!count_step(r))
					return false;
			}
			else
				pop_frame(r);
			continue;
		}

		idx = f->pos;
		n = &f->t->nodes[idx];
		r->cur_t = f->t;
		r->cur_pos = n->pos;
		if (!count_step(r))
			return false;

		switch (n->kind)
		{
			case N_TEXT:
				f->pos++;
				if (!emit_text(r, f, n))
					return false;
				break;

			case N_VAR:
			case N_RAW:
				f->pos++;
				if (n->bol && f->ilen > 0 && !emit_indent(r, f))
					return false;
				if (!emit_value(r, resolve(r, f->t, n),
								n->kind == N_RAW ? TMPL_ESCAPE_NONE : r->esc))
					return false;
				break;

			case N_SECTION:
			case N_INVERTED:
				f->pos = n->next;
				if (n->bol && f->ilen > 0 && !emit_indent(r, f))
					return false;
				v = resolve(r, f->t, n);
				if (n->kind == N_INVERTED)
				{
					if (!is_truthy(v) &&
						!push_frame(r, f->t, idx + 1, n->next, NULL, false, false,
									f->istart, f->ilen, r->iused))
						return false;
				}
				else if (is_truthy(v))
				{
					const TmplValue *list = v->kind == TV_ARRAY ? v : NULL;

					if (!push_ctx(r, list ? list->items[0] : v) ||
						!push_frame(r, f->t, idx + 1, n->next, list, true, false,
									f->istart, f->ilen, r->iused))
						return false;
				}
				break;

			case N_PARTIAL:
				f->pos++;
				if (!render_partial(r, f, n))
					return false;
				break;
		}
	}
	return true;
}

/* tmpl_render - render a compiled template against a context */
int
tmpl_render(const TmplTemplate *t, const TmplValue *ctx, TmplEscape esc,
			TmplPartialFn partial, void *partial_arg, size_t max_output,
			TmplBuf *out, TmplError *err)
{
	TmplError	dummy;
	Renderer	r;
	bool		ok;
	size_t		i;

	if (err == NULL)
		err = &dummy;
	memset(err, 0, sizeof(TmplError));
	if (t == NULL || out == NULL)
	{
		set_error(err, NULL, 0, "invalid arguments to tmpl_render");
		return -1;
	}

	memset(&r, 0, sizeof(r));
	r.out = out;
	r.base = out->len;
	r.max_output = max_output;
	r.esc = esc;
	r.pfn = partial;
	r.parg = partial_arg;
	r.err = err;

	ok = render_run(&r, t, ctx);

	for (i = 0; i < r.cachecap; i++)
		tmpl_free(r.cache[i].t);
	tmpl_mem_free(r.cache);
	tmpl_mem_free(r.frames);
	tmpl_mem_free((void *) r.ctx);
	tmpl_mem_free(r.ibuf);
	return ok ? 0 : -1;
}

/* tmpl_buf_free - release an output buffer and leave it reusable */
void
tmpl_buf_free(TmplBuf *b)
{
	if (b == NULL)
		return;
	tmpl_mem_free(b->data);
	b->data = NULL;
	b->len = 0;
	b->cap = 0;
}

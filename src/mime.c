/*-------------------------------------------------------------------------
 *
 * mime.c
 *	  RFC 5322 / RFC 2047 / RFC 2231 helpers for the notify_ext mailer.
 *
 * Everything that ends up in a message header passes through one of these
 * functions, which is what keeps CR/LF (and so header or SMTP command
 * injection) out of the generated message.  Plain C and libc only; see
 * mime.h for the contract.
 *
 * src/mime.c
 *
 *-------------------------------------------------------------------------
 */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L	/* gmtime_r under -std=c11 */
#endif

#include "mime.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__)
#define MIME_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define MIME_PRINTF(f, a)
#endif

#define MIME_MAX_ADDRESS	254	/* RFC 5321 path limit minus brackets */
#define MIME_MAX_LOCAL		64
#define MIME_MAX_LABEL		63
#define MIME_MAX_WORD		75	/* RFC 2047 encoded-word limit */
#define MIME_WORD_OVERHEAD	12	/* strlen("=?UTF-8?B?") + strlen("?=") */
#define MIME_MAILBOX_COL	10	/* strlen("Reply-To: "), longest usual name */
#define MIME_MAX_FILENAME	255
#define MIME_MAX_EXTENSION	16
#define MIME_SHOWN_BYTES	80	/* address bytes quoted in error messages */
#define MIME_QP_LINE		76	/* RFC 2045: encoded lines at most 76 bytes */

typedef struct StrBuf
{
	char	   *data;
	size_t		len;
	size_t		cap;
	bool		failed;
} StrBuf;

static MimeAllocator mime_hooks = {malloc, realloc, free};

static const char b64_alphabet[] =
"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static const char *const day_names[7] = {
	"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"
};

static const char *const month_names[12] = {
	"Jan", "Feb", "Mar", "Apr", "May", "Jun",
	"Jul", "Aug", "Sep", "Oct", "Nov", "Dec"
};

static void set_error(char *errbuf, size_t errlen, const char *fmt,...) MIME_PRINTF(3, 4);


/* mime_set_allocator - let the extension route every allocation to palloc */
void
mime_set_allocator(const MimeAllocator *a)
{
	if (a == NULL || a->alloc == NULL || a->realloc == NULL || a->free == NULL)
	{
		mime_hooks.alloc = malloc;
		mime_hooks.realloc = realloc;
		mime_hooks.free = free;
		return;
	}
	mime_hooks = *a;
}

/* mime_free - release a result through the same hooks that allocated it */
void
mime_free(void *p)
{
	if (p != NULL)
		mime_hooks.free(p);
}

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

/* sb_init - start a growable result string with an initial capacity */
static bool
sb_init(StrBuf *sb, size_t cap)
{
	if (cap < 16)
		cap = 16;
	sb->len = 0;
	sb->cap = cap;
	sb->failed = false;
	sb->data = mime_hooks.alloc(cap);
	if (sb->data == NULL)
	{
		sb->failed = true;
		sb->cap = 0;
		return false;
	}
	sb->data[0] = '\0';
	return true;
}

/* sb_reserve - make room for extra bytes plus NUL, never realloc'ing NULL */
static bool
sb_reserve(StrBuf *sb, size_t extra)
{
	size_t		need;
	size_t		newcap;
	char	   *p;

	if (sb->failed)
		return false;
	if (extra > SIZE_MAX / 4 - sb->len)
	{
		sb->failed = true;
		return false;
	}
	need = sb->len + extra + 1;
	if (need <= sb->cap)
		return true;
	newcap = sb->cap * 2;
	if (newcap < need)
		newcap = need;
	p = mime_hooks.realloc(sb->data, newcap);
	if (p == NULL)
	{
		sb->failed = true;
		return false;
	}
	sb->data = p;
	sb->cap = newcap;
	return true;
}

/* sb_putn - append n bytes, remembering failure instead of reporting it */
static void
sb_putn(StrBuf *sb, const char *s, size_t n)
{
	if (!sb_reserve(sb, n))
		return;
	memcpy(sb->data + sb->len, s, n);
	sb->len += n;
	sb->data[sb->len] = '\0';
}

/* sb_puts - append a NUL-terminated string */
static void
sb_puts(StrBuf *sb, const char *s)
{
	sb_putn(sb, s, strlen(s));
}

/* sb_putc - append one byte */
static void
sb_putc(StrBuf *sb, char c)
{
	sb_putn(sb, &c, 1);
}

/* sb_finish - hand the string to the caller, or free it and report OOM */
static char *
sb_finish(StrBuf *sb, char *errbuf, size_t errlen)
{
	if (sb->failed)
	{
		if (sb->data != NULL)
			mime_hooks.free(sb->data);
		sb->data = NULL;
		set_error(errbuf, errlen, "out of memory while building mail header");
		return NULL;
	}
	return sb->data;
}

/* mime_strdup_n - copy bytes into a hook-allocated NUL-terminated string */
static char *
mime_strdup_n(const char *s, size_t n, char *errbuf, size_t errlen)
{
	char	   *p;

	if (n == SIZE_MAX)
	{
		set_error(errbuf, errlen, "out of memory while building mail header");
		return NULL;
	}
	p = mime_hooks.alloc(n + 1);
	if (p == NULL)
	{
		set_error(errbuf, errlen, "out of memory while building mail header");
		return NULL;
	}
	if (n > 0)
		memcpy(p, s, n);
	p[n] = '\0';
	return p;
}

/* utf8_decode - length of the strict UTF-8 sequence at s, or 0 if invalid */
static size_t
utf8_decode(const unsigned char *s, size_t len, uint32_t *cp)
{
	unsigned char c = s[0];
	unsigned char lo = 0x80;
	unsigned char hi = 0xBF;

	if (c < 0x80)
	{
		*cp = c;
		return 1;
	}
	if (c >= 0xC2 && c <= 0xDF)
	{
		if (len < 2 || s[1] < 0x80 || s[1] > 0xBF)
			return 0;
		*cp = ((uint32_t) (c & 0x1F) << 6) | (s[1] & 0x3F);
		return 2;
	}
	if (c >= 0xE0 && c <= 0xEF)
	{
		if (c == 0xE0)
			lo = 0xA0;			/* overlong */
		if (c == 0xED)
			hi = 0x9F;			/* UTF-16 surrogates */
		if (len < 3 || s[1] < lo || s[1] > hi || s[2] < 0x80 || s[2] > 0xBF)
			return 0;
		*cp = ((uint32_t) (c & 0x0F) << 12) | ((uint32_t) (s[1] & 0x3F) << 6) |
			(s[2] & 0x3F);
		return 3;
	}
	if (c >= 0xF0 && c <= 0xF4)
	{
		if (c == 0xF0)
			lo = 0x90;			/* overlong */
		if (c == 0xF4)
			hi = 0x8F;			/* above U+10FFFF */
		if (len < 4 || s[1] < lo || s[1] > hi ||
			s[2] < 0x80 || s[2] > 0xBF || s[3] < 0x80 || s[3] > 0xBF)
			return 0;
		*cp = ((uint32_t) (c & 0x07) << 18) | ((uint32_t) (s[1] & 0x3F) << 12) |
			((uint32_t) (s[2] & 0x3F) << 6) | (s[3] & 0x3F);
		return 4;
	}
	return 0;
}

/* utf8_invalid_offset - offset of the first bad UTF-8 byte, or len if none */
static size_t
utf8_invalid_offset(const char *s, size_t len)
{
	const unsigned char *u = (const unsigned char *) s;
	size_t		i = 0;
	uint32_t	cp;

	while (i < len)
	{
		size_t		n = utf8_decode(u + i, len - i, &cp);

		if (n == 0)
			return i;
		i += n;
	}
	return len;
}

/* mime_valid_utf8 - gate for every text that goes into an encoded-word */
bool
mime_valid_utf8(const char *s, size_t len)
{
	if (s == NULL)
		return len == 0;
	return utf8_invalid_offset(s, len) == len;
}

/* utf8_seq_len - sequence length from a lead byte of already-valid UTF-8 */
static size_t
utf8_seq_len(unsigned char c)
{
	if (c < 0x80)
		return 1;
	if (c < 0xE0)
		return 2;
	if (c < 0xF0)
		return 3;
	return 4;
}

/* sanitize_text - controls become spaces, outer spaces trimmed: one line only */
static char *
sanitize_text(const char *s, size_t len, size_t *outlen, char *errbuf, size_t errlen)
{
	const unsigned char *u = (const unsigned char *) s;
	char	   *out;
	size_t		i = 0;
	size_t		n = 0;
	size_t		start = 0;

	out = len < SIZE_MAX ? mime_hooks.alloc(len + 1) : NULL;
	if (out == NULL)
	{
		set_error(errbuf, errlen, "out of memory while building mail header");
		return NULL;
	}
	while (i < len)
	{
		if (u[i] < 0x20 || u[i] == 0x7F)
		{
			out[n++] = ' ';
			i++;
		}
		else if (u[i] == 0xC2 && i + 1 < len && u[i + 1] >= 0x80 && u[i + 1] <= 0x9F)
		{
			out[n++] = ' ';		/* C1 control, e.g. U+0085 NEL */
			i += 2;
		}
		else
			out[n++] = s[i++];
	}
	while (n > 0 && out[n - 1] == ' ')
		n--;
	while (start < n && out[start] == ' ')
		start++;
	if (start > 0)
		memmove(out, out + start, n - start);
	n -= start;
	out[n] = '\0';
	*outlen = n;
	return out;
}

/* show_address - render an address for an error message, escaping controls */
static void
show_address(const char *addr, char *out, size_t outsize)
{
	const unsigned char *u = (const unsigned char *) addr;
	size_t		len = strlen(addr);
	bool		utf8_ok = mime_valid_utf8(addr, len);
	size_t		o = 0;
	size_t		i;

	for (i = 0; i < len; i++)
	{
		char		tmp[8];
		unsigned char c = u[i];

		if (i >= MIME_SHOWN_BYTES && (c & 0xC0) != 0x80)
		{
			snprintf(tmp, sizeof(tmp), "...");
			if (o + strlen(tmp) + 1 > outsize)
				break;
			memcpy(out + o, tmp, strlen(tmp));
			o += strlen(tmp);
			break;
		}
		if (c == '\r')
			snprintf(tmp, sizeof(tmp), "\\r");
		else if (c == '\n')
			snprintf(tmp, sizeof(tmp), "\\n");
		else if (c == '\t')
			snprintf(tmp, sizeof(tmp), "\\t");
		else if (c < 0x20 || c == 0x7F || (c >= 0x80 && !utf8_ok))
			snprintf(tmp, sizeof(tmp), "\\x%02X", c);
		else
		{
			tmp[0] = (char) c;
			tmp[1] = '\0';
		}
		if (o + strlen(tmp) + 1 > outsize)
			break;
		memcpy(out + o, tmp, strlen(tmp));
		o += strlen(tmp);
	}
	out[o] = '\0';
}

/* address_error - report "invalid email address "x": reason" */
static bool
address_error(char *errbuf, size_t errlen, const char *addr, const char *reason)
{
	char		shown[MIME_SHOWN_BYTES * 4 + 8];

	show_address(addr, shown, sizeof(shown));
	set_error(errbuf, errlen, "invalid email address \"%s\": %s", shown, reason);
	return false;
}

/* is_atext - RFC 5322 atext, the characters allowed in a dot-atom */
static bool
is_atext(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

/* is_ldh - letter, digit or hyphen, the only characters of a host label */
static bool
is_ldh(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		(c >= '0' && c <= '9') || c == '-';
}

/* special_reason - name characters that are never valid outside quotes */
static const char *
special_reason(unsigned char c)
{
	switch (c)
	{
		case ' ':
			return "contains a space";
		case '<':
			return "contains the character '<'";
		case '>':
			return "contains the character '>'";
		case ',':
			return "contains a comma; give one address per entry";
		case ';':
			return "contains a semicolon; give one address per entry";
		default:
			return NULL;
	}
}

/* parse_ipv4 - dotted quad with no leading zeros, for address literals */
static bool
parse_ipv4(const char *s, size_t len)
{
	size_t		i = 0;
	int			part;

	for (part = 0; part < 4; part++)
	{
		size_t		digits = 0;
		int			value = 0;

		if (part > 0)
		{
			if (i >= len || s[i] != '.')
				return false;
			i++;
		}
		while (i < len && s[i] >= '0' && s[i] <= '9' && digits < 4)
		{
			value = value * 10 + (s[i] - '0');
			digits++;
			i++;
		}
		if (digits == 0 || digits > 3 || value > 255 ||
			(digits > 1 && s[i - digits] == '0'))
			return false;
	}
	return i == len;
}

/* parse_ipv6 - RFC 4291 text form (with optional IPv4 tail) for literals */
static bool
parse_ipv6(const char *s, size_t len)
{
	size_t		i = 0;
	int			groups = 0;
	bool		compressed = false;

	if (len >= 2 && s[0] == ':' && s[1] == ':')
	{
		compressed = true;
		i = 2;
		if (i == len)
			return true;
	}
	else if (len == 0 || s[0] == ':')
		return false;

	for (;;)
	{
		size_t		j = i;
		size_t		digits = 0;

		/* an IPv4 tail is recognised by a dot before the next colon */
		while (j < len && s[j] != ':' && s[j] != '.')
			j++;
		if (j < len && s[j] == '.')
		{
			if (!parse_ipv4(s + i, len - i))
				return false;
			groups += 2;
			break;
		}
		while (i < len && digits < 5 &&
			   ((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f') ||
				(s[i] >= 'A' && s[i] <= 'F')))
		{
			digits++;
			i++;
		}
		if (digits == 0 || digits > 4)
			return false;
		groups++;
		if (i == len)
			break;
		if (s[i] != ':')
			return false;
		i++;
		if (i < len && s[i] == ':')
		{
			if (compressed)
				return false;
			compressed = true;
			i++;
			if (i == len)
				break;
		}
		else if (i == len)
			return false;
	}
	if (groups > 8)
		return false;
	return compressed ? groups <= 7 : groups == 8;
}

/* check_domain - LDH labels or an address literal, for the part after '@' */
static bool
check_domain(const char *addr, const char *domain, char *errbuf, size_t errlen)
{
	size_t		len = strlen(domain);
	size_t		pos = 0;
	char		reason[160];

	if (len == 0)
		return address_error(errbuf, errlen, addr, "the domain (after @) is empty");

	if (domain[0] == '[')
	{
		if (domain[len - 1] != ']')
			return address_error(errbuf, errlen, addr,
								 "the address literal is not closed with ']'");
		if (len > 6 && strncmp(domain + 1, "IPv6:", 5) == 0)
		{
			if (!parse_ipv6(domain + 6, len - 7))
				return address_error(errbuf, errlen, addr,
									 "the address literal is not a valid IPv6 address");
			return true;
		}
		if (!parse_ipv4(domain + 1, len - 2))
			return address_error(errbuf, errlen, addr,
								 "the address literal must be an IPv4 address like [192.0.2.1] or [IPv6:2001:db8::1]");
		return true;
	}

	for (;;)
	{
		size_t		n = 0;

		while (domain[pos + n] != '\0' && domain[pos + n] != '.')
		{
			unsigned char c = (unsigned char) domain[pos + n];

			if (!is_ldh(c))
			{
				snprintf(reason, sizeof(reason),
						 "the domain contains the character '%c'; only letters, digits, hyphens and dots are allowed",
						 c);
				return address_error(errbuf, errlen, addr, reason);
			}
			n++;
		}
		if (n == 0)
			return address_error(errbuf, errlen, addr,
								 "the domain has an empty label (leading, trailing or doubled dot)");
		if (n > MIME_MAX_LABEL)
		{
			snprintf(reason, sizeof(reason),
					 "a domain label is %zu characters long; the maximum is %d",
					 n, MIME_MAX_LABEL);
			return address_error(errbuf, errlen, addr, reason);
		}
		if (domain[pos] == '-')
			return address_error(errbuf, errlen, addr,
								 "a domain label starts with a hyphen");
		if (domain[pos + n - 1] == '-')
			return address_error(errbuf, errlen, addr,
								 "a domain label ends with a hyphen");
		pos += n;
		if (domain[pos] == '\0')
			break;
		pos++;					/* skip the dot */
	}
	return true;
}

/* mime_check_address - reject anything but a plain ASCII local@domain */
bool
mime_check_address(const char *addr, char *errbuf, size_t errlen)
{
	const unsigned char *u = (const unsigned char *) addr;
	size_t		len;
	size_t		at;
	size_t		i;
	const char *last_at;
	char		reason[160];

	if (addr == NULL || addr[0] == '\0')
		return address_error(errbuf, errlen, "", "the address is empty");
	len = strlen(addr);

	/* control characters are fatal anywhere, even inside quotes */
	for (i = 0; i < len; i++)
	{
		if (u[i] == '\r' || u[i] == '\n')
			return address_error(errbuf, errlen, addr,
								 "contains a line break (CR or LF)");
		if (u[i] == '\t')
			return address_error(errbuf, errlen, addr, "contains a tab character");
		if (u[i] < 0x20 || u[i] == 0x7F)
		{
			snprintf(reason, sizeof(reason),
					 "contains the control character 0x%02X", u[i]);
			return address_error(errbuf, errlen, addr, reason);
		}
	}

	last_at = strrchr(addr, '@');
	for (i = 0; i < len; i++)
	{
		if (u[i] >= 0x80)
		{
			if (last_at != NULL && addr + i > last_at)
				return address_error(errbuf, errlen, addr,
									 "non-ASCII addresses are not supported; use the punycode form of the domain (xn--...)");
			return address_error(errbuf, errlen, addr,
								 "non-ASCII addresses are not supported; the local part (before @) must be ASCII");
		}
	}

	if (len > MIME_MAX_ADDRESS)
	{
		snprintf(reason, sizeof(reason),
				 "is %zu bytes long; the maximum is %d", len, MIME_MAX_ADDRESS);
		return address_error(errbuf, errlen, addr, reason);
	}

	if (addr[0] == '"')
	{
		/* quoted-string local part: any printable ASCII, \-escapes allowed */
		i = 1;
		for (;;)
		{
			if (addr[i] == '\0')
				return address_error(errbuf, errlen, addr,
									 "the quoted local part has no closing quote");
			if (addr[i] == '\\')
			{
				if (addr[i + 1] == '\0')
					return address_error(errbuf, errlen, addr,
										 "the quoted local part has no closing quote");
				i += 2;
				continue;
			}
			if (addr[i] == '"')
				break;
			i++;
		}
		at = i + 1;
		if (at == 2)
			return address_error(errbuf, errlen, addr, "the quoted local part is empty");
		if (addr[at] == '\0')
			return address_error(errbuf, errlen, addr,
								 "has no @ (expected local-part@domain)");
		if (addr[at] != '@')
			return address_error(errbuf, errlen, addr,
								 "unexpected text between the quoted local part and the @");
		for (i = at + 1; i < len; i++)
		{
			const char *r = special_reason(u[i]);

			if (r != NULL)
				return address_error(errbuf, errlen, addr, r);
			if (u[i] == '@')
				return address_error(errbuf, errlen, addr, "contains more than one @");
		}
	}
	else
	{
		const char *first_at;

		for (i = 0; i < len; i++)
		{
			const char *r = special_reason(u[i]);

			if (r != NULL)
				return address_error(errbuf, errlen, addr, r);
		}
		first_at = strchr(addr, '@');
		if (first_at == NULL)
			return address_error(errbuf, errlen, addr,
								 "has no @ (expected local-part@domain)");
		if (first_at != last_at)
			return address_error(errbuf, errlen, addr, "contains more than one @");
		at = (size_t) (first_at - addr);
		if (at == 0)
			return address_error(errbuf, errlen, addr,
								 "the local part (before @) is empty");
		if (addr[0] == '.')
			return address_error(errbuf, errlen, addr,
								 "the local part starts with a dot");
		if (addr[at - 1] == '.')
			return address_error(errbuf, errlen, addr,
								 "the local part ends with a dot");
		for (i = 0; i < at; i++)
		{
			if (addr[i] == '.')
			{
				if (addr[i + 1] == '.')
					return address_error(errbuf, errlen, addr,
										 "the local part contains two consecutive dots");
				continue;
			}
			if (!is_atext(u[i]))
			{
				snprintf(reason, sizeof(reason),
						 "the local part contains the character '%c', which is only allowed in a quoted local part",
						 addr[i]);
				return address_error(errbuf, errlen, addr, reason);
			}
		}
	}

	if (at > MIME_MAX_LOCAL)
	{
		snprintf(reason, sizeof(reason),
				 "the local part is %zu bytes long; the maximum is %d",
				 at, MIME_MAX_LOCAL);
		return address_error(errbuf, errlen, addr, reason);
	}

	return check_domain(addr, addr + at + 1, errbuf, errlen);
}

/* b64_len - encoded length of n bytes, for line-length budgeting */
static size_t
b64_len(size_t n)
{
	return (n + 2) / 3 * 4;
}

/* append_base64 - RFC 2045 base64 with padding, no line breaks */
static void
append_base64(StrBuf *sb, const unsigned char *s, size_t n)
{
	size_t		i;
	char		q[4];

	for (i = 0; i + 2 < n; i += 3)
	{
		q[0] = b64_alphabet[s[i] >> 2];
		q[1] = b64_alphabet[((s[i] & 0x03) << 4) | (s[i + 1] >> 4)];
		q[2] = b64_alphabet[((s[i + 1] & 0x0F) << 2) | (s[i + 2] >> 6)];
		q[3] = b64_alphabet[s[i + 2] & 0x3F];
		sb_putn(sb, q, 4);
	}
	if (n - i == 1)
	{
		q[0] = b64_alphabet[s[i] >> 2];
		q[1] = b64_alphabet[(s[i] & 0x03) << 4];
		q[2] = '=';
		q[3] = '=';
		sb_putn(sb, q, 4);
	}
	else if (n - i == 2)
	{
		q[0] = b64_alphabet[s[i] >> 2];
		q[1] = b64_alphabet[((s[i] & 0x03) << 4) | (s[i + 1] >> 4)];
		q[2] = b64_alphabet[(s[i + 1] & 0x0F) << 2];
		q[3] = '=';
		sb_putn(sb, q, 4);
	}
}

/* word_chunk - bytes (whole UTF-8 chars) for the next word at column col */
static size_t
word_chunk(const char *s, size_t len, size_t col)
{
	size_t		avail = col < MIME_LINE_LIMIT ? MIME_LINE_LIMIT - col : 0;
	size_t		maxraw;
	size_t		n = 0;

	if (avail > MIME_MAX_WORD)
		avail = MIME_MAX_WORD;
	if (avail < MIME_WORD_OVERHEAD + 4)
		return 0;
	maxraw = (avail - MIME_WORD_OVERHEAD) / 4 * 3;
	while (n < len)
	{
		size_t		c = utf8_seq_len((unsigned char) s[n]);

		if (n + c > maxraw)
			break;
		n += c;
	}

	/*
	 * If more text follows, end the word just after a space when one is in
	 * its second half: decoders that wrongly insert a space between words
	 * (e.g. Python's address parser) then do not split a word in two.
	 */
	if (n < len)
	{
		size_t		k;

		for (k = n; k > n / 2; k--)
		{
			if (s[k - 1] == ' ')
				return k;
		}
	}
	return n;
}

/* append_encoded_words - RFC 2047 B words (<= 75) folded to 78; returns end column */
static size_t
append_encoded_words(StrBuf *sb, const char *s, size_t len, size_t col)
{
	size_t		pos = 0;
	bool		first = true;

	while (pos < len)
	{
		size_t		n;

		if (!first)
		{
			sb_puts(sb, "\r\n ");
			col = 1;
		}
		n = word_chunk(s + pos, len - pos, col);
		if (n == 0)
		{
			/* no room after the header name: start on a continuation line */
			sb_puts(sb, "\r\n ");
			col = 1;
			n = word_chunk(s + pos, len - pos, col);
		}
		first = false;
		sb_puts(sb, "=?UTF-8?B?");
		append_base64(sb, (const unsigned char *) s + pos, n);
		sb_puts(sb, "?=");
		col += MIME_WORD_OVERHEAD + b64_len(n);
		pos += n;
	}
	return col;
}

/* looks_encoded - "=?" in plain text would be decoded by MUAs, so encode it */
static bool
looks_encoded(const char *s, size_t len)
{
	size_t		i;

	for (i = 0; i + 1 < len; i++)
		if (s[i] == '=' && s[i + 1] == '?')
			return true;
	return false;
}

/* fold_plain - fold ASCII before spaces at 78 columns; false if a word cannot fit */
static bool
fold_plain(StrBuf *sb, const char *s, size_t len, size_t col)
{
	size_t		pos = 0;

	while (pos < len)
	{
		size_t		seg = pos;
		size_t		seglen;

		/* a segment is a run of spaces followed by a word */
		while (seg < len && s[seg] == ' ')
			seg++;
		while (seg < len && s[seg] != ' ')
			seg++;
		seglen = seg - pos;
		if (col + seglen > MIME_LINE_LIMIT)
		{
			if (s[pos] != ' ' || seglen > MIME_LINE_LIMIT)
				return false;
			sb_puts(sb, "\r\n");
			col = 0;
		}
		sb_putn(sb, s + pos, seglen);
		col += seglen;
		pos = seg;
	}
	return true;
}

/* is_plain_ascii - printable ASCII only, i.e. usable without encoding */
static bool
is_plain_ascii(const char *s, size_t len)
{
	size_t		i;

	for (i = 0; i < len; i++)
		if ((unsigned char) s[i] < 0x20 || (unsigned char) s[i] > 0x7E)
			return false;
	return !looks_encoded(s, len);
}

/* mime_encode_header_text - one-line, injection-proof unstructured header value */
char *
mime_encode_header_text(const char *utf8, size_t len, size_t first_line_used,
						char *errbuf, size_t errlen)
{
	char	   *clean;
	size_t		clen;
	size_t		bad;
	StrBuf		sb;

	if (utf8 == NULL)
	{
		if (len > 0)
		{
			set_error(errbuf, errlen, "header text is NULL");
			return NULL;
		}
		utf8 = "";
	}
	if (first_line_used > MIME_LINE_LIMIT)
		first_line_used = MIME_LINE_LIMIT;
	bad = utf8_invalid_offset(utf8, len);
	if (bad != len)
	{
		set_error(errbuf, errlen,
				  "header text is not valid UTF-8 (invalid byte sequence at byte offset %zu)",
				  bad);
		return NULL;
	}
	clean = sanitize_text(utf8, len, &clen, errbuf, errlen);
	if (clean == NULL)
		return NULL;
	if (!sb_init(&sb, clen + 16))
	{
		mime_hooks.free(clean);
		return sb_finish(&sb, errbuf, errlen);
	}
	if (!is_plain_ascii(clean, clen) ||
		!fold_plain(&sb, clean, clen, first_line_used))
	{
		sb.len = 0;
		if (!sb.failed)
			sb.data[0] = '\0';
		append_encoded_words(&sb, clean, clen, first_line_used);
	}
	mime_hooks.free(clean);
	return sb_finish(&sb, errbuf, errlen);
}

/* mime_format_mailbox - "Name <addr>" with the name made safe for a header */
char *
mime_format_mailbox(const char *display_name, const char *address,
					char *errbuf, size_t errlen)
{
	char	   *clean;
	size_t		clen;
	size_t		i;
	size_t		bad;
	size_t		col;
	size_t		quoted_len;
	bool		ascii = true;
	bool		atoms = true;
	StrBuf		sb;

	if (!mime_check_address(address, errbuf, errlen))
		return NULL;
	if (display_name == NULL || display_name[0] == '\0')
		return mime_strdup_n(address, strlen(address), errbuf, errlen);

	bad = utf8_invalid_offset(display_name, strlen(display_name));
	if (bad != strlen(display_name))
	{
		set_error(errbuf, errlen,
				  "display name for \"%s\" is not valid UTF-8 (invalid byte sequence at byte offset %zu)",
				  address, bad);
		return NULL;
	}
	clean = sanitize_text(display_name, strlen(display_name), &clen, errbuf, errlen);
	if (clean == NULL)
		return NULL;
	if (clen == 0)
	{
		mime_hooks.free(clean);
		return mime_strdup_n(address, strlen(address), errbuf, errlen);
	}

	quoted_len = 2;
	for (i = 0; i < clen; i++)
	{
		unsigned char c = (unsigned char) clean[i];

		if (c >= 0x80)
			ascii = false;
		else if (c != ' ' && !is_atext(c))
			atoms = false;
		quoted_len += (c == '"' || c == '\\') ? 2 : 1;
	}
	if (looks_encoded(clean, clen))
		atoms = false;

	if (!sb_init(&sb, clen * 2 + strlen(address) + 16))
	{
		mime_hooks.free(clean);
		return sb_finish(&sb, errbuf, errlen);
	}
	col = MIME_MAILBOX_COL;
	if (ascii && atoms && col + clen <= MIME_LINE_LIMIT)
	{
		sb_putn(&sb, clean, clen);
		col += clen;
	}
	else if (ascii && col + quoted_len <= MIME_LINE_LIMIT)
	{
		sb_putc(&sb, '"');
		for (i = 0; i < clen; i++)
		{
			if (clean[i] == '"' || clean[i] == '\\')
				sb_putc(&sb, '\\');
			sb_putc(&sb, clean[i]);
		}
		sb_putc(&sb, '"');
		col += quoted_len;
	}
	else
		col = append_encoded_words(&sb, clean, clen, col);
	mime_hooks.free(clean);

	if (col + 3 + strlen(address) > MIME_LINE_LIMIT)
		sb_puts(&sb, "\r\n <");
	else
		sb_puts(&sb, " <");
	sb_puts(&sb, address);
	sb_putc(&sb, '>');
	return sb_finish(&sb, errbuf, errlen);
}

/* mime_normalize_crlf - CRLF-only line ends so SMTP dot-stuffing works */
char *
mime_normalize_crlf(const char *s, size_t len, size_t *outlen)
{
	char	   *out;
	size_t		i = 0;
	size_t		n = 0;

	if (outlen != NULL)
		*outlen = 0;
	if (s == NULL)
		len = 0;
	if (len > (SIZE_MAX - 3) / 2)
		return NULL;
	out = mime_hooks.alloc(len * 2 + 3);
	if (out == NULL)
		return NULL;
	while (i < len)
	{
		if (s[i] == '\r')
		{
			out[n++] = '\r';
			out[n++] = '\n';
			i += (i + 1 < len && s[i + 1] == '\n') ? 2 : 1;
		}
		else if (s[i] == '\n')
		{
			out[n++] = '\r';
			out[n++] = '\n';
			i++;
		}
		else
			out[n++] = s[i++];
	}
	if (n > 0 && out[n - 1] != '\n')
	{
		out[n++] = '\r';
		out[n++] = '\n';
	}
	out[n] = '\0';
	if (outlen != NULL)
		*outlen = n;
	return out;
}

/* mime_format_date - locale-independent RFC 5322 Date header value */
char *
mime_format_date(time_t t, char *buf, size_t buflen)
{
	struct tm	tm;
	long long	year;
	int			n;

	if (buf == NULL || buflen == 0)
		return NULL;
	buf[0] = '\0';
	if (gmtime_r(&t, &tm) == NULL)
		return NULL;
	year = (long long) tm.tm_year + 1900;
	if (year < 1900 || year > 9999 || tm.tm_wday < 0 || tm.tm_wday > 6 ||
		tm.tm_mon < 0 || tm.tm_mon > 11)
		return NULL;
	n = snprintf(buf, buflen, "%s, %02d %s %04lld %02d:%02d:%02d +0000",
				 day_names[tm.tm_wday], tm.tm_mday, month_names[tm.tm_mon],
				 year, tm.tm_hour, tm.tm_min, tm.tm_sec);
	if (n < 0 || (size_t) n >= buflen)
	{
		buf[0] = '\0';
		return NULL;
	}
	return buf;
}

/* sanitize_dotted - keep allowed chars, drop leading/trailing/doubled dots */
static void
sanitize_dotted(const char *in, bool allow_underscore, char *out, size_t outsize)
{
	size_t		o = 0;
	const unsigned char *p;

	if (in != NULL)
	{
		for (p = (const unsigned char *) in; *p != '\0' && o + 1 < outsize; p++)
		{
			if (*p == '.')
			{
				if (o > 0 && out[o - 1] != '.')
					out[o++] = '.';
			}
			else if (is_ldh(*p) || (allow_underscore && *p == '_'))
				out[o++] = (char) *p;
		}
	}
	while (o > 0 && out[o - 1] == '.')
		o--;
	out[o] = '\0';
}

/* mime_message_id - deterministic Message-ID so a resend keeps its identity */
char *
mime_message_id(const char *kind, long long id, const char *domain,
				char *buf, size_t buflen)
{
	char		k[MIME_MAX_LOCAL + 1];
	char		d[MIME_MAX_ADDRESS];
	int			n;

	if (buf == NULL || buflen == 0)
		return NULL;
	sanitize_dotted(kind, true, k, sizeof(k));
	sanitize_dotted(domain, false, d, sizeof(d));
	n = snprintf(buf, buflen, "<%s.%lld@%s>", k[0] ? k : "msg", id,
				 d[0] ? d : "localhost");
	if (n < 0 || (size_t) n >= buflen)
	{
		buf[0] = '\0';
		return NULL;
	}
	return buf;
}

/* is_attr_char - RFC 2231/5987 attr-char, left unescaped in filename* */
static bool
is_attr_char(unsigned char c)
{
	if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'))
		return true;
	return c != '\0' && strchr("!#$&+-.^_`|~", c) != NULL;
}

/* mime_encode_filename - safe Content-Disposition filename parameter */
char *
mime_encode_filename(const char *utf8_name, char *errbuf, size_t errlen)
{
	static const char hex[] = "0123456789ABCDEF";
	const unsigned char *u;
	char	   *name;
	size_t		len;
	size_t		n = 0;
	size_t		i;
	size_t		start = 0;
	bool		ascii = true;
	StrBuf		sb;

	if (utf8_name == NULL)
		utf8_name = "";
	len = strlen(utf8_name);
	i = utf8_invalid_offset(utf8_name, len);
	if (i != len)
	{
		set_error(errbuf, errlen,
				  "attachment file name is not valid UTF-8 (invalid byte sequence at byte offset %zu)",
				  i);
		return NULL;
	}
	name = mime_strdup_n(utf8_name, len, errbuf, errlen);
	if (name == NULL)
		return NULL;

	/* drop C0/C1 controls and DEL, and keep only the last path component */
	u = (const unsigned char *) utf8_name;
	for (i = 0; i < len; i++)
	{
		if (u[i] < 0x20 || u[i] == 0x7F)
			continue;
		if (u[i] == 0xC2 && i + 1 < len && u[i + 1] >= 0x80 && u[i + 1] <= 0x9F)
		{
			i++;
			continue;
		}
		if (u[i] == '/' || u[i] == '\\')
		{
			n = 0;
			continue;
		}
		name[n++] = utf8_name[i];
	}
	while (n > 0 && name[n - 1] == ' ')
		n--;
	while (start < n && name[start] == ' ')
		start++;
	memmove(name, name + start, n - start);
	n -= start;
	if ((n == 1 && name[0] == '.') || (n == 2 && name[0] == '.' && name[1] == '.'))
		n = 0;

	/* cap the length, keeping a short extension and whole characters */
	if (n > MIME_MAX_FILENAME)
	{
		size_t		extlen = 0;
		size_t		cut;

		for (i = n; i > 0; i--)
		{
			if (name[i - 1] == '.')
			{
				extlen = n - (i - 1);
				break;
			}
		}
		if (extlen > MIME_MAX_EXTENSION)
			extlen = 0;
		cut = MIME_MAX_FILENAME - extlen;
		while (cut > 0 && ((unsigned char) name[cut] & 0xC0) == 0x80)
			cut--;
		memmove(name + cut, name + n - extlen, extlen);
		n = cut + extlen;
	}
	name[n] = '\0';

	for (i = 0; i < n; i++)
		if ((unsigned char) name[i] >= 0x80)
			ascii = false;

	if (!sb_init(&sb, n * 3 + 32))
	{
		mime_hooks.free(name);
		return sb_finish(&sb, errbuf, errlen);
	}
	if (n == 0)
		sb_puts(&sb, "filename=\"attachment\"");
	else if (ascii)
	{
		sb_puts(&sb, "filename=\"");
		for (i = 0; i < n; i++)
		{
			if (name[i] == '"' || name[i] == '\\')
				sb_putc(&sb, '\\');
			sb_putc(&sb, name[i]);
		}
		sb_putc(&sb, '"');
	}
	else
	{
		sb_puts(&sb, "filename*=UTF-8''");
		for (i = 0; i < n; i++)
		{
			unsigned char c = (unsigned char) name[i];

			if (is_attr_char(c))
				sb_putc(&sb, (char) c);
			else
			{
				char		pct[3];

				pct[0] = '%';
				pct[1] = hex[c >> 4];
				pct[2] = hex[c & 0x0F];
				sb_putn(&sb, pct, 3);
			}
		}
	}
	mime_hooks.free(name);
	return sb_finish(&sb, errbuf, errlen);
}

/* mime_header_value_safe - vet header values that are passed through as-is */
bool
mime_header_value_safe(const char *s, size_t len)
{
	size_t		i;

	if (s == NULL)
		return len == 0;
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c < 0x20 && c != '\t')
			return false;
	}
	return true;
}

/* mime_domain_of - domain part of an address, e.g. for the Message-ID */
char *
mime_domain_of(const char *address)
{
	const char *at;

	if (address == NULL)
		return NULL;
	at = strrchr(address, '@');
	return at != NULL ? (char *) (at + 1) : NULL;
}

/*
 * append_qp - quoted-printable of CRLF text (see mime_encode_qp).  The
 * worst case (every byte encoded, plus soft breaks) is reserved first, so
 * the loop writes straight into the buffer.
 */
static void
append_qp(StrBuf *sb, const char *s, size_t len)
{
	static const char hex[] = "0123456789ABCDEF";
	size_t		col = 0;
	char	   *out;

	if (len > SIZE_MAX / 8 || !sb_reserve(sb, len * 3 + (len / 24 + 1) * 3))
	{
		sb->failed = true;
		return;
	}
	out = sb->data + sb->len;
	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];
		bool		at_eol;
		size_t		width;

		if (c == '\r' && i + 1 < len && s[i + 1] == '\n')
		{
			*out++ = '\r';
			*out++ = '\n';
			col = 0;
			i++;
			continue;
		}
		at_eol = i + 1 == len || (s[i + 1] == '\r' && i + 2 < len && s[i + 2] == '\n');
		width = ((c >= 33 && c <= 126 && c != '=') || ((c == ' ' || c == '\t') && !at_eol)) ? 1 : 3;
		/* a soft break keeps every line at most 76 bytes, its "=" included */
		if (col + width > MIME_QP_LINE - 1)
		{
			*out++ = '=';
			*out++ = '\r';
			*out++ = '\n';
			col = 0;
		}
		if (width == 1)
			*out++ = (char) c;
		else
		{
			*out++ = '=';
			*out++ = hex[c >> 4];
			*out++ = hex[c & 0x0F];
		}
		col += width;
	}
	sb->len = out - sb->data;
	sb->data[sb->len] = '\0';
}

char *
mime_encode_qp(const char *s, size_t len, size_t *outlen)
{
	StrBuf		sb;
	char	   *out;

	if (outlen != NULL)
		*outlen = 0;
	if (!sb_init(&sb, len + len / 8 + 16))
		return NULL;
	append_qp(&sb, s, len);
	out = sb_finish(&sb, NULL, 0);
	if (out != NULL && outlen != NULL)
		*outlen = sb.len;
	return out;
}

/* append_base64_lines - base64 in CRLF-terminated lines of 76 characters */
static void
append_base64_lines(StrBuf *sb, const unsigned char *data, size_t len)
{
	for (size_t i = 0; i < len; i += 57)	/* 57 bytes: 76 characters */
	{
		append_base64(sb, data + i, len - i < 57 ? len - i : 57);
		sb_putn(sb, "\r\n", 2);
	}
}

char *
mime_encode_base64(const void *data, size_t len, size_t *outlen)
{
	StrBuf		sb;
	char	   *out;

	if (outlen != NULL)
		*outlen = 0;
	if (!sb_init(&sb, b64_len(len) + len / 28 + 16))
		return NULL;
	append_base64_lines(&sb, data, len);
	out = sb_finish(&sb, NULL, 0);
	if (out != NULL && outlen != NULL)
		*outlen = sb.len;
	return out;
}

/*
 * append_text_part - the headers and quoted-printable body of one text
 * part.  In a multipart, a CRLF follows: the one before the next
 * delimiter belongs to the delimiter (RFC 2046), so the text's own last
 * line end is kept.
 */
static void
append_text_part(StrBuf *sb, const char *body, const char *subtype, bool in_multipart)
{
	size_t		len;
	char	   *norm = mime_normalize_crlf(body, strlen(body), &len);

	if (norm == NULL)
	{
		sb->failed = true;
		return;
	}
	sb_puts(sb, "Content-Type: text/");
	sb_puts(sb, subtype);
	sb_puts(sb, "; charset=UTF-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n");
	append_qp(sb, norm, len);
	mime_hooks.free(norm);
	if (in_multipart)
		sb_putn(sb, "\r\n", 2);
}

/* append_boundary - "--boundary" CRLF, or the closing "--boundary--" CRLF */
static void
append_boundary(StrBuf *sb, const char *kind, const char *token, bool last)
{
	sb_puts(sb, "--=_notify_");
	sb_puts(sb, kind);
	sb_putc(sb, '_');
	sb_puts(sb, token);
	sb_puts(sb, last ? "--\r\n" : "\r\n");
}

/* append_content_type_multipart - a multipart Content-Type with its boundary */
static void
append_multipart_type(StrBuf *sb, const char *subtype, const char *kind, const char *token)
{
	sb_puts(sb, "Content-Type: multipart/");
	sb_puts(sb, subtype);
	sb_puts(sb, "; boundary=\"=_notify_");
	sb_puts(sb, kind);
	sb_putc(sb, '_');
	sb_puts(sb, token);
	sb_puts(sb, "\"\r\n");
}

/* append_body - text, or text and html as multipart/alternative */
static void
append_body(StrBuf *sb, const char *text, const char *html, const char *token, bool in_multipart)
{
	if (html == NULL)
	{
		append_text_part(sb, text, "plain", in_multipart);
		return;
	}
	append_multipart_type(sb, "alternative", "alt", token);
	sb_puts(sb, "\r\n");
	append_boundary(sb, "alt", token, false);
	append_text_part(sb, text, "plain", true);
	append_boundary(sb, "alt", token, false);
	append_text_part(sb, html, "html", true);
	append_boundary(sb, "alt", token, true);
}

char *
mime_build_message(const char *headers, const char *text, const char *html,
				   const MimeAttachment *attachments, int nattachments,
				   const char *token, size_t *outlen, char *errbuf, size_t errlen)
{
	StrBuf		sb;
	size_t		size = strlen(headers) + strlen(text) * 2 + 512;
	char	   *out;

	if (outlen != NULL)
		*outlen = 0;
	if (token == NULL || token[0] == '\0' || strlen(token) > 40 ||
		strspn(token, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789") != strlen(token))
	{
		set_error(errbuf, errlen, "invalid MIME boundary token");
		return NULL;
	}
	if (html != NULL)
		size += strlen(html) * 2;
	for (int i = 0; i < nattachments; i++)
		size += b64_len(attachments[i].len) + attachments[i].len / 28 + 256;
	if (!sb_init(&sb, size))
	{
		set_error(errbuf, errlen, "out of memory while building the message");
		return NULL;
	}
	sb_puts(&sb, headers);
	sb_puts(&sb, "MIME-Version: 1.0\r\n");
	if (nattachments == 0)
		append_body(&sb, text, html, token, false);
	else
	{
		append_multipart_type(&sb, "mixed", "mix", token);
		sb_puts(&sb, "\r\n");
		append_boundary(&sb, "mix", token, false);
		append_body(&sb, text, html, token, true);
		for (int i = 0; i < nattachments; i++)
		{
			const MimeAttachment *a = &attachments[i];

			append_boundary(&sb, "mix", token, false);
			sb_puts(&sb, "Content-Type: ");
			sb_puts(&sb, a->content_type);
			sb_puts(&sb, "\r\nContent-Transfer-Encoding: base64\r\nContent-Disposition: attachment; ");
			sb_puts(&sb, a->filename_param);
			sb_puts(&sb, "\r\n\r\n");
			append_base64_lines(&sb, a->data, a->len);
		}
		append_boundary(&sb, "mix", token, true);
	}
	out = sb_finish(&sb, errbuf, errlen);
	if (out != NULL && outlen != NULL)
		*outlen = sb.len;
	return out;
}

char *
mime_smtp_data(const char *message, size_t len, size_t *outlen)
{
	size_t		dots = 0;
	size_t		n;
	char	   *out;
	char	   *w;
	bool		ends_crlf = len >= 2 && message[len - 2] == '\r' && message[len - 1] == '\n';

	/* a line starts at the message's start and after each LF */
	for (size_t i = 0; i < len; i++)
		if (message[i] == '.' && (i == 0 || message[i - 1] == '\n'))
			dots++;
	n = len + dots + (ends_crlf || len == 0 ? 0 : 2) + 3;
	out = mime_hooks.alloc(n + 1);
	if (out == NULL)
		return NULL;
	w = out;
	for (size_t i = 0; i < len; i++)
	{
		if (message[i] == '.' && (i == 0 || message[i - 1] == '\n'))
			*w++ = '.';
		*w++ = message[i];
	}
	if (!ends_crlf && len > 0)
	{
		*w++ = '\r';
		*w++ = '\n';
	}
	memcpy(w, ".\r\n", 3);
	w += 3;
	*w = '\0';
	if (outlen != NULL)
		*outlen = (size_t) (w - out);
	return out;
}

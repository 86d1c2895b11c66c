/*-------------------------------------------------------------------------
 *
 * test_mime.c
 *	  Standalone unit tests for src/mime.c (no PostgreSQL, no libcurl).
 *
 * Prints every failure, then "N passed, M failed"; exits non-zero when
 * anything failed.
 *
 * test/unit/test_mime.c
 *
 *-------------------------------------------------------------------------
 */
#include "mime.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

/* show - printable rendering of a string for failure messages */
static const char *
show(const char *s)
{
	static char buf[4][2048];
	static int	which = 0;
	char	   *out = buf[which++ % 4];
	size_t		o = 0;

	if (s == NULL)
		return "(null)";
	for (; *s != '\0' && o + 5 < sizeof(buf[0]); s++)
	{
		if (*s == '\r')
			o += (size_t) sprintf(out + o, "\\r");
		else if (*s == '\n')
			o += (size_t) sprintf(out + o, "\\n");
		else
			out[o++] = *s;
	}
	out[o] = '\0';
	return out;
}

/* expect_str - compare a result with the expected string, then free it */
static void
expect_str(const char *label, char *got, const char *want)
{
	CHECK(got != NULL && strcmp(got, want) == 0,
		  "%s: got [%s], want [%s]", label, show(got), show(want));
	mime_free(got);
}

/* b64_value - value of one base64 character for the test decoder */
static int
b64_value(char c)
{
	if (c >= 'A' && c <= 'Z')
		return c - 'A';
	if (c >= 'a' && c <= 'z')
		return c - 'a' + 26;
	if (c >= '0' && c <= '9')
		return c - '0' + 52;
	if (c == '+')
		return 62;
	if (c == '/')
		return 63;
	return -1;
}

/* b64_decode - independent decoder so encoded-words are checked end to end */
static bool
b64_decode(const char *s, size_t len, char *out, size_t *outlen)
{
	size_t		i;
	size_t		o = 0;

	if (len % 4 != 0)
		return false;
	for (i = 0; i < len; i += 4)
	{
		int			v[4];
		int			k;

		for (k = 0; k < 4; k++)
		{
			v[k] = s[i + k] == '=' ? 0 : b64_value(s[i + k]);
			if (v[k] < 0)
				return false;
		}
		out[o++] = (char) ((v[0] << 2) | (v[1] >> 4));
		if (s[i + 2] != '=')
			out[o++] = (char) (((v[1] & 0x0F) << 4) | (v[2] >> 2));
		if (s[i + 3] != '=')
			out[o++] = (char) (((v[2] & 0x03) << 6) | v[3]);
	}
	*outlen = o;
	return true;
}

/* rfc2047_decode - unfold and decode B words; fails on bare CR/LF, long or split words */
static bool
rfc2047_decode(const char *hdr, char *out, size_t outsize)
{
	char		unfolded[8192];
	size_t		u = 0;
	size_t		i = 0;
	size_t		o = 0;
	bool		prev_encoded = false;

	for (i = 0; hdr[i] != '\0'; i++)
	{
		if (hdr[i] == '\r' && hdr[i + 1] == '\n' && hdr[i + 2] == ' ')
		{
			i++;
			continue;
		}
		if (hdr[i] == '\r' || hdr[i] == '\n' || u + 1 >= sizeof(unfolded))
			return false;
		unfolded[u++] = hdr[i];
	}
	unfolded[u] = '\0';

	/* like a header parser, ignore whitespace right after the colon */
	i = 0;
	while (i < u && unfolded[i] == ' ')
		i++;
	while (i < u)
	{
		size_t		ws = i;
		size_t		tok;
		size_t		toklen;

		while (i < u && unfolded[i] == ' ')
			i++;
		tok = i;
		while (i < u && unfolded[i] != ' ')
			i++;
		toklen = i - tok;
		if (toklen >= 12 && strncmp(unfolded + tok, "=?UTF-8?B?", 10) == 0 &&
			strncmp(unfolded + i - 2, "?=", 2) == 0)
		{
			char		dec[128];
			size_t		declen;

			if (toklen > 75 || !b64_decode(unfolded + tok + 10, toklen - 12, dec, &declen))
				return false;
			if (!mime_valid_utf8(dec, declen))
				return false;
			if (!prev_encoded)
			{
				if (o + (tok - ws) >= outsize)
					return false;
				memcpy(out + o, unfolded + ws, tok - ws);
				o += tok - ws;
			}
			if (o + declen >= outsize)
				return false;
			memcpy(out + o, dec, declen);
			o += declen;
			prev_encoded = true;
		}
		else
		{
			if (o + (i - ws) >= outsize)
				return false;
			memcpy(out + o, unfolded + ws, i - ws);
			o += i - ws;
			prev_encoded = false;
		}
	}
	out[o] = '\0';
	return true;
}

/* lines_ok - every CR starts CRLF SPACE folding and no line exceeds 78 */
static bool
lines_ok(const char *hdr, size_t first_used, char *why, size_t whylen)
{
	size_t		col = first_used;
	size_t		i;

	for (i = 0; hdr[i] != '\0'; i++)
	{
		if (hdr[i] == '\n')
		{
			snprintf(why, whylen, "bare LF at %zu", i);
			return false;
		}
		if (hdr[i] == '\r')
		{
			if (hdr[i + 1] != '\n' || (hdr[i + 2] != ' ' && hdr[i + 2] != '\t'))
			{
				snprintf(why, whylen, "CR not followed by LF SP at %zu", i);
				return false;
			}
			i++;
			col = 0;
			continue;
		}
		col++;
		if (col > 78)
		{
			snprintf(why, whylen, "line longer than 78 at %zu", i);
			return false;
		}
	}
	return true;
}

/* subject_roundtrip - encode, check folding, decode, compare with input */
static void
subject_roundtrip(const char *label, const char *in, const char *expect_decoded,
				  size_t first_used)
{
	char		err[MIME_ERRBUF_SIZE] = "";
	char		why[128] = "";
	char		dec[8192];
	char	   *enc = mime_encode_header_text(in, strlen(in), first_used, err, sizeof(err));

	CHECK(enc != NULL, "%s: encode failed: %s", label, err);
	if (enc == NULL)
		return;
	CHECK(lines_ok(enc, first_used, why, sizeof(why)), "%s: %s in [%s]", label, why, show(enc));
	CHECK(rfc2047_decode(enc, dec, sizeof(dec)), "%s: cannot decode [%s]", label, show(enc));
	CHECK(strcmp(dec, expect_decoded) == 0, "%s: decoded [%s], want [%s]",
		  label, show(dec), show(expect_decoded));
	mime_free(enc);
}

typedef struct AddrCase
{
	const char *addr;
	bool		valid;
	const char *errpart;		/* substring expected in the error */
} AddrCase;

/* repeat - build a string of n copies of c into a static buffer slot */
static const char *
repeat(char c, size_t n, const char *prefix, const char *suffix)
{
	static char buf[8][600];
	static int	which = 0;
	char	   *out = buf[which++ % 8];
	size_t		o = strlen(prefix);

	memcpy(out, prefix, o);
	memset(out + o, c, n);
	strcpy(out + o + n, suffix);
	return out;
}

/* test_utf8 - strict decoder edge cases */
static void
test_utf8(void)
{
	CHECK(mime_valid_utf8("", 0), "empty is valid");
	CHECK(mime_valid_utf8("abc", 3), "ascii");
	CHECK(mime_valid_utf8("\xC3\xA9", 2), "U+00E9");
	CHECK(mime_valid_utf8("\xE2\x82\xAC", 3), "U+20AC");
	CHECK(mime_valid_utf8("\xF0\x9F\x98\x80", 4), "U+1F600");
	CHECK(mime_valid_utf8("\xF4\x8F\xBF\xBF", 4), "U+10FFFF");
	CHECK(mime_valid_utf8("\xEF\xBF\xBF", 3), "U+FFFF");
	CHECK(!mime_valid_utf8("\xC0\xAF", 2), "overlong 2-byte");
	CHECK(!mime_valid_utf8("\xC1\xBF", 2), "overlong C1");
	CHECK(!mime_valid_utf8("\xE0\x80\xAF", 3), "overlong 3-byte");
	CHECK(!mime_valid_utf8("\xF0\x80\x80\xAF", 4), "overlong 4-byte");
	CHECK(!mime_valid_utf8("\xED\xA0\x80", 3), "surrogate D800");
	CHECK(!mime_valid_utf8("\xED\xBF\xBF", 3), "surrogate DFFF");
	CHECK(!mime_valid_utf8("\xF4\x90\x80\x80", 4), "above U+10FFFF");
	CHECK(!mime_valid_utf8("\xF5\x80\x80\x80", 4), "F5 lead");
	CHECK(!mime_valid_utf8("\xC3", 1), "truncated");
	CHECK(!mime_valid_utf8("\xE2\x82", 2), "truncated 3-byte");
	CHECK(!mime_valid_utf8("\x80", 1), "lone continuation");
	CHECK(!mime_valid_utf8("a\xFF", 2), "FF byte");
	CHECK(!mime_valid_utf8("\xC3\xA9", 1), "length respected");
}

/* test_addresses - the envelope/header address gate */
static void
test_addresses(void)
{
	static const AddrCase cases[] = {
		{"user@example.com", true, NULL},
		{"first.last+tag@sub.example.co.uk", true, NULL},
		{"x@localhost", true, NULL},
		{"\"quoted local\"@x.com", true, NULL},
		{"\"a\\\"b@c\"@x.com", true, NULL},
		{"user@[127.0.0.1]", true, NULL},
		{"user@[IPv6:2001:db8::1]", true, NULL},
		{"user@[IPv6:::1]", true, NULL},
		{"user@[IPv6:::ffff:192.0.2.1]", true, NULL},
		{"user@[IPv6:1:2:3:4:5:6:7:8]", true, NULL},
		{"!#$%&'*+-/=?^_`{|}~@example.org", true, NULL},
		{"a@x-y.example", true, NULL},
		{"a@123.example", true, NULL},
		{"", false, "the address is empty"},
		{"a@b.c\r\nRCPT TO:<x@y>", false, "contains a line break (CR or LF)"},
		{"a@b.c\n", false, "line break"},
		{"\"quo\r\nted\"@x.com", false, "line break"},
		{"a@b.c>", false, "contains the character '>'"},
		{"<a@b.c>", false, "contains the character '<'"},
		{"a b@c", false, "contains a space"},
		{"a@b.c,d@e.f", false, "comma"},
		{"a@b.c;d@e.f", false, "semicolon"},
		{"a\t@b.c", false, "tab"},
		{"a\x7f@b.c", false, "control character 0x7F"},
		{"a\x01@b.c", false, "control character 0x01"},
		{"no-at-sign", false, "has no @"},
		{"a@b@c.com", false, "more than one @"},
		{"\"x\"@b@c.com", false, "more than one @"},
		{"@example.com", false, "local part (before @) is empty"},
		{"a@", false, "domain (after @) is empty"},
		{".a@b.c", false, "starts with a dot"},
		{"a.@b.c", false, "ends with a dot"},
		{"a..b@c.d", false, "consecutive dots"},
		{"a(b)@x.com", false, "character '('"},
		{"a@b..c", false, "empty label"},
		{"a@.b", false, "empty label"},
		{"a@b.", false, "empty label"},
		{"a@-x.com", false, "starts with a hyphen"},
		{"a@x-.com", false, "ends with a hyphen"},
		{"a@x_y.com", false, "character '_'"},
		{"jos\xC3\xA9@example.com", false, "non-ASCII addresses are not supported"},
		{"user@b\xC3\xBC" "cher.de", false,
		"non-ASCII addresses are not supported; use the punycode form of the domain"},
		{"\"unterminated@x.com", false, "no closing quote"},
		{"\"a\"b@x.com", false, "between the quoted local part"},
		{"\"\"@x.com", false, "quoted local part is empty"},
		{"user@[127.0.0.256]", false, "IPv4"},
		{"user@[1.2.3]", false, "IPv4"},
		{"user@[01.2.3.4]", false, "IPv4"},
		{"user@[foo]", false, "IPv4"},
		{"user@[127.0.0.1", false, "not closed"},
		{"user@[IPv6:2001:db8:::1]", false, "IPv6"},
		{"user@[IPv6:1:2:3:4:5:6:7:8:9]", false, "IPv6"},
		{"user@[IPv6:1::2::3]", false, "IPv6"},
		{"user@[IPv6:12345::1]", false, "IPv6"},
	};
	char		err[MIME_ERRBUF_SIZE];
	size_t		i;
	const char *a;

	for (i = 0; i < sizeof(cases) / sizeof(cases[0]); i++)
	{
		bool		ok;

		err[0] = '\0';
		ok = mime_check_address(cases[i].addr, err, sizeof(err));
		CHECK(ok == cases[i].valid, "address [%s]: got %s (%s)", show(cases[i].addr),
			  ok ? "valid" : "invalid", err);
		if (!cases[i].valid)
		{
			CHECK(strstr(err, cases[i].errpart) != NULL,
				  "address [%s]: error [%s] lacks [%s]", show(cases[i].addr),
				  show(err), cases[i].errpart);
			CHECK(strchr(err, '\r') == NULL && strchr(err, '\n') == NULL,
				  "address [%s]: raw CR/LF in error message", show(cases[i].addr));
		}
	}

	/* exact message format */
	mime_check_address("a b@c", err, sizeof(err));
	CHECK(strcmp(err, "invalid email address \"a b@c\": contains a space") == 0,
		  "exact message: [%s]", err);
	mime_check_address("a@b.c\r\nRCPT TO:<x@y>", err, sizeof(err));
	CHECK(strstr(err, "\"a@b.c\\r\\nRCPT TO:<x@y>\"") != NULL,
		  "CR/LF shown escaped: [%s]", show(err));
	CHECK(!mime_check_address(NULL, err, sizeof(err)), "NULL address");
	CHECK(!mime_check_address("", NULL, 0), "NULL errbuf tolerated");

	/* length limits */
	a = repeat('a', 64, "", "@example.com");
	CHECK(mime_check_address(a, err, sizeof(err)), "64-char local part: %s", err);
	a = repeat('a', 65, "", "@example.com");
	CHECK(!mime_check_address(a, err, sizeof(err)) &&
		  strstr(err, "local part is 65 bytes long; the maximum is 64") != NULL,
		  "65-char local part: %s", err);
	a = repeat('q', 63, "\"", "\"@x.com");	/* 65 with the quotes */
	CHECK(!mime_check_address(a, err, sizeof(err)) &&
		  strstr(err, "local part is 65 bytes") != NULL, "65-byte quoted local part: %s", err);
	a = repeat('b', 63, "a@", ".com");
	CHECK(mime_check_address(a, err, sizeof(err)), "63-char label: %s", err);
	a = repeat('b', 64, "a@", ".com");
	CHECK(!mime_check_address(a, err, sizeof(err)) &&
		  strstr(err, "label is 64 characters long; the maximum is 63") != NULL,
		  "64-char label: %s", err);
	/* 254 bytes: a@ + 63.63.63.60 labels */
	{
		char		big[300];

		snprintf(big, sizeof(big), "a@%s.%s.%s.%s",
				 repeat('b', 63, "", ""), repeat('c', 63, "", ""),
				 repeat('d', 63, "", ""), repeat('e', 60, "", ""));
		CHECK(strlen(big) == 254, "built %zu bytes", strlen(big));
		CHECK(mime_check_address(big, err, sizeof(err)), "254-byte address: %s", err);
		snprintf(big, sizeof(big), "a@%s.%s.%s.%s",
				 repeat('b', 63, "", ""), repeat('c', 63, "", ""),
				 repeat('d', 63, "", ""), repeat('e', 61, "", ""));
		CHECK(strlen(big) == 255, "built %zu bytes", strlen(big));
		CHECK(!mime_check_address(big, err, sizeof(err)) &&
			  strstr(err, "is 255 bytes long; the maximum is 254") != NULL,
			  "255-byte address: %s", err);
		CHECK(strlen(err) < sizeof(err) - 1, "long address message not truncated");
	}
}

/* test_subjects - RFC 2047 encoding, folding and injection resistance */
static void
test_subjects(void)
{
	char		err[MIME_ERRBUF_SIZE];
	char		why[128];
	char		big[4096];
	char	   *r;
	size_t		i;
	const char *pieces[] = {"\xC5\xBB\xC3\xB3\xC5\x82\xC4\x87 ", "g\xC4\x99\xC5\x9B", "l\xC4\x85 ", "\xE2\x82\xAC", "\xF0\x9F\x98\x80", " ja\xC5\xBA\xC5\x84 "};
	size_t		chars = 0;

	expect_str("plain subject", mime_encode_header_text("Hello world", 11, 9, err, sizeof(err)),
			   "Hello world");
	expect_str("empty subject", mime_encode_header_text("", 0, 9, err, sizeof(err)), "");
	expect_str("NULL subject", mime_encode_header_text(NULL, 0, 9, err, sizeof(err)), "");
	expect_str("Jose exact", mime_encode_header_text("Jos\xC3\xA9 N\xC3\xBA\xC3\xB1" "ez", 13, 9, err, sizeof(err)),
			   "=?UTF-8?B?Sm9zw6kgTsO6w7Fleg==?=");
	subject_roundtrip("Jose", "Jos\xC3\xA9 N\xC3\xBA\xC3\xB1" "ez", "Jos\xC3\xA9 N\xC3\xBA\xC3\xB1" "ez", 9);
	subject_roundtrip("Lukasz", "\xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87",
					  "\xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87", 9);
	subject_roundtrip("tab and NEL", "a\tb\xC2\x85" "c", "a b c", 9);

	/* 300-character non-ASCII subject */
	big[0] = '\0';
	while (chars < 300)
	{
		const char *p = pieces[chars % 6];
		const unsigned char *q;

		strcat(big, p);
		for (q = (const unsigned char *) p; *q; q++)
			if ((*q & 0xC0) != 0x80)
				chars++;
	}
	/* trim trailing spaces so the decoded text equals the input */
	for (i = strlen(big); i > 0 && big[i - 1] == ' '; i--)
		big[i - 1] = '\0';
	subject_roundtrip("300-char non-ASCII", big, big, 9);
	r = mime_encode_header_text(big, strlen(big), 9, err, sizeof(err));
	CHECK(r != NULL && strstr(r, "\r\n =?UTF-8?B?") != NULL, "300-char subject is folded");
	mime_free(r);
	subject_roundtrip("non-ASCII at column 70", big, big, 70);
	r = mime_encode_header_text(big, strlen(big), 70, err, sizeof(err));
	CHECK(r != NULL && strncmp(r, "\r\n =?", 5) == 0, "no room on first line: leading fold [%.20s]",
		  show(r));
	mime_free(r);
	subject_roundtrip("absurd first_line_used", "Jos\xC3\xA9 word", "Jos\xC3\xA9 word", (size_t) -1 / 2);
	r = mime_encode_header_text("plain words", 11, (size_t) -1, err, sizeof(err));
	CHECK(r != NULL && strncmp(r, "\r\n =?", 5) == 0, "huge first_line_used: [%s]", show(r));
	mime_free(r);

	/* long ASCII: folded at whitespace, not encoded */
	big[0] = '\0';
	for (i = 0; i < 30; i++)
		strcat(big, i ? " word" : "Word");
	r = mime_encode_header_text(big, strlen(big), 9, err, sizeof(err));
	CHECK(r != NULL && strstr(r, "=?") == NULL && strstr(r, "\r\n word") != NULL,
		  "long ASCII folded plainly: [%s]", show(r));
	CHECK(r != NULL && lines_ok(r, 9, why, sizeof(why)), "long ASCII lines: %s", why);
	mime_free(r);
	subject_roundtrip("long ASCII", big, big, 9);

	/* a word too long for a line forces encoding */
	r = mime_encode_header_text(repeat('x', 100, "see ", ""), 104, 9, err, sizeof(err));
	CHECK(r != NULL && strncmp(r, "=?UTF-8?B?", 10) == 0, "long word encoded: [%s]", show(r));
	mime_free(r);
	subject_roundtrip("long word", repeat('x', 100, "see ", ""), repeat('x', 100, "see ", ""), 9);

	/* text that looks like an encoded-word is encoded, not passed through */
	r = mime_encode_header_text("Hi =?UTF-8?B?Zm9v?= there", 25, 9, err, sizeof(err));
	CHECK(r != NULL && strncmp(r, "=?UTF-8?B?SGk", 13) == 0, "literal =? encoded: [%s]", show(r));
	mime_free(r);
	subject_roundtrip("literal =?", "Hi =?UTF-8?B?Zm9v?= there", "Hi =?UTF-8?B?Zm9v?= there", 9);

	/* header injection */
	expect_str("injection", mime_encode_header_text("Hello\r\nBcc: evil@x.com", 22, 9, err, sizeof(err)),
			   "Hello  Bcc: evil@x.com");
	expect_str("outer controls trimmed", mime_encode_header_text("\r\nHi\n", 5, 9, err, sizeof(err)), "Hi");
	snprintf(big, sizeof(big), "%s\r\nBcc: evil@x.com\r\n\r\n.\r\nMAIL FROM:<x@y>\nDATA\r",
			 repeat('z', 90, "Invoice ", " \xC3\xA9t\xC3\xA9"));
	r = mime_encode_header_text(big, strlen(big), 9, err, sizeof(err));
	CHECK(r != NULL && lines_ok(r, 9, why, sizeof(why)), "long injection: %s [%s]", why, show(r));
	mime_free(r);
	r = mime_encode_header_text("Hello\r\nBcc: evil@x.com and a rather long tail that needs folding to fit", 72, 9, err, sizeof(err));
	CHECK(r != NULL && lines_ok(r, 9, why, sizeof(why)) && strstr(r, "\r\nBcc") == NULL,
		  "folded injection stays one header: [%s]", show(r));
	mime_free(r);

	/* invalid input */
	err[0] = '\0';
	r = mime_encode_header_text("bad \xC0\xAF", 6, 9, err, sizeof(err));
	CHECK(r == NULL && strstr(err, "not valid UTF-8") != NULL && strstr(err, "offset 4") != NULL,
		  "overlong rejected: %s", err);
	r = mime_encode_header_text("\xED\xA0\x80", 3, 9, err, sizeof(err));
	CHECK(r == NULL, "surrogate rejected");
	r = mime_encode_header_text(NULL, 3, 9, err, sizeof(err));
	CHECK(r == NULL, "NULL with length rejected");
	/* embedded NUL is a control: becomes a space */
	expect_str("embedded NUL", mime_encode_header_text("a\0b", 3, 9, err, sizeof(err)), "a b");
}

/* test_mailboxes - display-name quoting and encoding */
static void
test_mailboxes(void)
{
	char		err[MIME_ERRBUF_SIZE];
	char		why[128];
	char		dec[4096];
	char		name[1024];
	char	   *r;

	expect_str("no name", mime_format_mailbox(NULL, "a@b.com", err, sizeof(err)), "a@b.com");
	expect_str("empty name", mime_format_mailbox("", "a@b.com", err, sizeof(err)), "a@b.com");
	expect_str("blank name", mime_format_mailbox(" \r\n ", "a@b.com", err, sizeof(err)), "a@b.com");
	expect_str("atoms", mime_format_mailbox("John Smith", "john@example.com", err, sizeof(err)),
			   "John Smith <john@example.com>");
	expect_str("comma", mime_format_mailbox("Smith, John", "john@example.com", err, sizeof(err)),
			   "\"Smith, John\" <john@example.com>");
	expect_str("escapes", mime_format_mailbox("O\"Brien \\ Co.", "a@b.com", err, sizeof(err)),
			   "\"O\\\"Brien \\\\ Co.\" <a@b.com>");
	expect_str("dot", mime_format_mailbox("J. Smith", "a@b.com", err, sizeof(err)),
			   "\"J. Smith\" <a@b.com>");
	expect_str("address as name", mime_format_mailbox("ceo@bank.com", "a@b.com", err, sizeof(err)),
			   "\"ceo@bank.com\" <a@b.com>");
	expect_str("encoded-looking name", mime_format_mailbox("=?UTF-8?B?Zm9v?=", "a@b.com", err, sizeof(err)),
			   "\"=?UTF-8?B?Zm9v?=\" <a@b.com>");
	expect_str("Jose", mime_format_mailbox("Jos\xC3\xA9 N\xC3\xBA\xC3\xB1" "ez", "jose@example.com", err, sizeof(err)),
			   "=?UTF-8?B?Sm9zw6kgTsO6w7Fleg==?= <jose@example.com>");
	expect_str("injection name", mime_format_mailbox("Evil\r\nBcc: x@y.com", "a@b.com", err, sizeof(err)),
			   "\"Evil  Bcc: x@y.com\" <a@b.com>");
	expect_str("quoted local", mime_format_mailbox("Q", "\"a b\"@x.com", err, sizeof(err)),
			   "Q <\"a b\"@x.com>");

	err[0] = '\0';
	r = mime_format_mailbox("Name", "a@b.c>\r\nRCPT TO:<x@y>", err, sizeof(err));
	CHECK(r == NULL && strstr(err, "invalid email address") != NULL, "bad address rejected: %s", err);
	r = mime_format_mailbox("bad \xFF", "a@b.com", err, sizeof(err));
	CHECK(r == NULL && strstr(err, "display name") != NULL, "invalid UTF-8 name: %s", err);

	/* long non-ASCII name folds; decode the phrase back */
	name[0] = '\0';
	while (strlen(name) < 300)
		strcat(name, "\xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87 ");
	name[strlen(name) - 1] = '\0';
	r = mime_format_mailbox(name, "lukasz@example.pl", err, sizeof(err));
	CHECK(r != NULL && lines_ok(r, 10, why, sizeof(why)), "long name lines: %s [%s]", why, show(r));
	if (r != NULL)
	{
		char	   *lt = strstr(r, " <lukasz@example.pl>");

		CHECK(lt != NULL, "address at end of [%s]", show(r));
		if (lt != NULL)
		{
			*lt = '\0';
			if (lt > r + 2 && lt[-2] == '\r')
				lt[-2] = '\0';
			CHECK(rfc2047_decode(r, dec, sizeof(dec)) && strcmp(dec, name) == 0,
				  "long name round trip: [%s]", show(dec));
		}
	}
	if (r != NULL)
	{
		char		first[128];
		size_t		flen;
		char	   *q = strstr(r, "?=");

		/* words end after a space, so no word is split between two of them */
		CHECK(q != NULL && b64_decode(r + 10, (size_t) (q - r - 10), first, &flen) &&
			  flen > 0 && first[flen - 1] == ' ', "first word ends at a word boundary");
	}
	mime_free(r);

	/* a long ASCII name is encoded rather than overflowing the line */
	r = mime_format_mailbox(repeat('n', 90, "Mr ", ""), "a@b.com", err, sizeof(err));
	CHECK(r != NULL && lines_ok(r, 10, why, sizeof(why)), "long ASCII name: %s [%s]", why, show(r));
	mime_free(r);
}

/* test_crlf - body line-ending normalisation */
static void
test_crlf(void)
{
	size_t		n = 99;
	char	   *r;

	r = mime_normalize_crlf("a\nb\rc\r\nd", 8, &n);
	CHECK(r != NULL && n == 12 && memcmp(r, "a\r\nb\r\nc\r\nd\r\n", 13) == 0,
		  "mixed endings: [%s] %zu", show(r), n);
	mime_free(r);
	r = mime_normalize_crlf("x\n.\ny", 5, &n);
	CHECK(r != NULL && n == 9 && strcmp(r, "x\r\n.\r\ny\r\n") == 0, "dot line: [%s]", show(r));
	mime_free(r);
	r = mime_normalize_crlf("", 0, &n);
	CHECK(r != NULL && n == 0 && r[0] == '\0', "empty body");
	mime_free(r);
	r = mime_normalize_crlf(NULL, 0, &n);
	CHECK(r != NULL && n == 0, "NULL body");
	mime_free(r);
	r = mime_normalize_crlf("abc\r\n", 5, &n);
	CHECK(r != NULL && n == 5 && strcmp(r, "abc\r\n") == 0, "already CRLF");
	mime_free(r);
	r = mime_normalize_crlf("\r\r\n\n\r", 5, &n);
	CHECK(r != NULL && n == 8 && strcmp(r, "\r\n\r\n\r\n\r\n") == 0, "CR CRLF LF CR: [%s]", show(r));
	mime_free(r);
	r = mime_normalize_crlf("a\0b\n", 4, &n);
	CHECK(r != NULL && n == 5 && memcmp(r, "a\0b\r\n", 6) == 0, "embedded NUL kept");
	mime_free(r);
	r = mime_normalize_crlf("end\r", 4, NULL);
	CHECK(r != NULL && strcmp(r, "end\r\n") == 0, "NULL outlen, trailing CR");
	mime_free(r);
}

/* test_dates - RFC 5322 dates in UTC */
static void
test_dates(void)
{
	char		buf[MIME_DATE_BUFLEN];
	char		tiny[10];

	CHECK(mime_format_date(0, buf, sizeof(buf)) == buf &&
		  strcmp(buf, "Thu, 01 Jan 1970 00:00:00 +0000") == 0, "epoch: %s", buf);
	CHECK(mime_format_date((time_t) 1795426348, buf, sizeof(buf)) != NULL &&
		  strcmp(buf, "Mon, 23 Nov 2026 09:32:28 +0000") == 0, "2026: %s", buf);
	CHECK(mime_format_date((time_t) 951782400, buf, sizeof(buf)) != NULL &&
		  strcmp(buf, "Tue, 29 Feb 2000 00:00:00 +0000") == 0, "leap day: %s", buf);
	CHECK(mime_format_date((time_t) 4102444799LL, buf, sizeof(buf)) != NULL &&
		  strcmp(buf, "Thu, 31 Dec 2099 23:59:59 +0000") == 0, "2099: %s", buf);
	CHECK(mime_format_date(0, tiny, sizeof(tiny)) == NULL && tiny[0] == '\0', "small buffer");
}

/* test_message_ids - stable, sanitised Message-IDs */
static void
test_message_ids(void)
{
	char		a[MIME_MSGID_BUFLEN];
	char		b[MIME_MSGID_BUFLEN];
	char		tiny[12];

	CHECK(mime_message_id("notify.message", 123, "example.com", a, sizeof(a)) == a &&
		  strcmp(a, "<notify.message.123@example.com>") == 0, "basic: %s", a);
	mime_message_id("notify.message", 123, "example.com", b, sizeof(b));
	CHECK(strcmp(a, b) == 0, "stable");
	mime_message_id("notify.message", 124, "example.com", b, sizeof(b));
	CHECK(strcmp(a, b) != 0, "distinct ids differ");
	CHECK(mime_message_id("k", 1, "Ex ample.com>\r\nBcc: x", a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@Example.comBccx>") == 0,
		  "domain sanitised: %s", show(a));
	CHECK(mime_message_id("k", 1, NULL, a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@localhost>") == 0, "NULL domain: %s", a);
	CHECK(mime_message_id("k", 1, "<>", a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@localhost>") == 0, "empty after sanitising: %s", a);
	CHECK(mime_message_id("k", 1, "[127.0.0.1]", a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@127.0.0.1>") == 0, "literal: %s", a);
	CHECK(mime_message_id("k", 1, "..a..b..", a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@a.b>") == 0, "dots: %s", a);
	CHECK(mime_message_id("bad kind<>", -5, "x.org", a, sizeof(a)) != NULL &&
		  strcmp(a, "<badkind.-5@x.org>") == 0, "kind sanitised: %s", a);
	CHECK(mime_message_id(NULL, 7, "x.org", a, sizeof(a)) != NULL &&
		  strcmp(a, "<msg.7@x.org>") == 0, "NULL kind: %s", a);
	CHECK(mime_message_id("notify.message", 123, "example.com", tiny, sizeof(tiny)) == NULL &&
		  tiny[0] == '\0', "small buffer");
	CHECK(mime_message_id("k", 1, mime_domain_of("x@mail.example.com"), a, sizeof(a)) != NULL &&
		  strcmp(a, "<k.1@mail.example.com>") == 0, "with mime_domain_of: %s", a);
}

/* test_filenames - RFC 2231 Content-Disposition filename */
static void
test_filenames(void)
{
	char		err[MIME_ERRBUF_SIZE];
	char	   *r;
	char		longname[400];

	expect_str("ascii", mime_encode_filename("report.pdf", err, sizeof(err)), "filename=\"report.pdf\"");
	expect_str("quotes", mime_encode_filename("my \"best\" file.txt", err, sizeof(err)),
			   "filename=\"my \\\"best\\\" file.txt\"");
	expect_str("traversal", mime_encode_filename("../../etc/passwd", err, sizeof(err)),
			   "filename=\"passwd\"");
	expect_str("windows traversal", mime_encode_filename("..\\..\\windows\\win.ini", err, sizeof(err)),
			   "filename=\"win.ini\"");
	expect_str("non-ASCII", mime_encode_filename("Factura N\xC2\xBA 7.pdf", err, sizeof(err)),
			   "filename*=UTF-8''Factura%20N%C2%BA%207.pdf");
	expect_str("ete", mime_encode_filename("\xC3\xA9t\xC3\xA9.pdf", err, sizeof(err)),
			   "filename*=UTF-8''%C3%A9t%C3%A9.pdf");
	expect_str("non-ASCII specials", mime_encode_filename("a'b\"%*\xC3\xA9", err, sizeof(err)),
			   "filename*=UTF-8''a%27b%22%25%2A%C3%A9");
	expect_str("CRLF stripped", mime_encode_filename("a\r\nb.txt", err, sizeof(err)), "filename=\"ab.txt\"");
	expect_str("injection", mime_encode_filename("x.pdf\"\r\nContent-Type: evil", err, sizeof(err)),
			   "filename=\"x.pdf\\\"Content-Type: evil\"");
	expect_str("empty", mime_encode_filename("", err, sizeof(err)), "filename=\"attachment\"");
	expect_str("NULL", mime_encode_filename(NULL, err, sizeof(err)), "filename=\"attachment\"");
	expect_str("dir only", mime_encode_filename("../", err, sizeof(err)), "filename=\"attachment\"");
	expect_str("dotdot", mime_encode_filename("..", err, sizeof(err)), "filename=\"attachment\"");
	expect_str("controls only", mime_encode_filename("\r\n\t", err, sizeof(err)), "filename=\"attachment\"");

	err[0] = '\0';
	r = mime_encode_filename("bad\xC3(", err, sizeof(err));
	CHECK(r == NULL && strstr(err, "not valid UTF-8") != NULL, "invalid UTF-8 file name: %s", err);

	snprintf(longname, sizeof(longname), "%s.pdf", repeat('x', 300, "", ""));
	r = mime_encode_filename(longname, err, sizeof(err));
	CHECK(r != NULL && strlen(r) == strlen("filename=\"\"") + 255 &&
		  strcmp(r + strlen(r) - 5, ".pdf\"") == 0, "long name capped: %zu", r ? strlen(r) : 0);
	mime_free(r);
	longname[0] = '\0';
	while (strlen(longname) < 300)
		strcat(longname, "\xC3\xA9");
	strcat(longname, ".txt");
	r = mime_encode_filename(longname, err, sizeof(err));
	CHECK(r != NULL && strcmp(r + strlen(r) - 4, ".txt") == 0 &&
		  strstr(r, "%C3.") == NULL, "long non-ASCII name capped on a character boundary");
	mime_free(r);
}

/* test_misc - header_value_safe and domain_of */
static void
test_misc(void)
{
	const char *addr = "\"x@y\"@z.org";

	CHECK(mime_header_value_safe("Bearer abc", 10), "plain value");
	CHECK(mime_header_value_safe("a\tb", 3), "tab allowed");
	CHECK(mime_header_value_safe("", 0), "empty");
	CHECK(!mime_header_value_safe("a\r\nb", 4), "CRLF");
	CHECK(!mime_header_value_safe("a\nb", 3), "LF");
	CHECK(!mime_header_value_safe("a\rb", 3), "CR");
	CHECK(!mime_header_value_safe("a\0b", 3), "NUL");
	CHECK(!mime_header_value_safe("a\x1b" "b", 3), "ESC");
	CHECK(!mime_header_value_safe(NULL, 1), "NULL with length");

	CHECK(mime_domain_of("a@b.com") != NULL && strcmp(mime_domain_of("a@b.com"), "b.com") == 0, "domain_of");
	CHECK(mime_domain_of(addr) == addr + 6, "domain_of quoted local");
	CHECK(mime_domain_of("nodomain") == NULL, "domain_of without @");
	CHECK(mime_domain_of(NULL) == NULL, "domain_of NULL");
}

static long alloc_count;
static long free_count;
static long misuse_count;
static long fail_countdown = -1;	/* fail the Nth allocation; -1 never */

/* counting_alloc - test hook: count allocations, optionally fail one */
static void *
counting_alloc(size_t n)
{
	void	   *p;

	if (n == 0)
		misuse_count++;
	if (fail_countdown >= 0 && fail_countdown-- == 0)
		return NULL;
	p = malloc(n);
	if (p != NULL)
		alloc_count++;
	return p;
}

/* counting_realloc - test hook: repalloc(NULL) would crash, so flag it */
static void *
counting_realloc(void *p, size_t n)
{
	if (p == NULL || n == 0)
		misuse_count++;
	if (fail_countdown >= 0 && fail_countdown-- == 0)
		return NULL;
	return realloc(p, n);
}

/* counting_free - test hook: pfree(NULL) would crash, so flag it */
static void
counting_free(void *p)
{
	if (p == NULL)
		misuse_count++;
	else
		free_count++;
	free(p);
}

/* exercise_all - call every allocating function once and free the results */
static int
exercise_all(void)
{
	char		err[MIME_ERRBUF_SIZE];
	char	   *r[12];
	int			nulls = 0;
	int			i;
	size_t		n;
	const char *long_subject =
	"\xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87 \xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87 "
	"\xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87 \xC5\x81ukasz \xC5\xBB\xC3\xB3\xC5\x82\xC4\x87";

	r[0] = mime_encode_header_text("Hello world", 11, 9, err, sizeof(err));
	r[1] = mime_encode_header_text(long_subject, strlen(long_subject), 9, err, sizeof(err));
	r[2] = mime_encode_header_text("Word word word word word word word word word word word word word word word word", 79, 9, err, sizeof(err));
	r[3] = mime_format_mailbox("Jos\xC3\xA9", "j@x.com", err, sizeof(err));
	r[4] = mime_format_mailbox("A, B", "j@x.com", err, sizeof(err));
	r[5] = mime_format_mailbox(NULL, "j@x.com", err, sizeof(err));
	r[6] = mime_format_mailbox(long_subject, "j@x.com", err, sizeof(err));
	r[7] = mime_normalize_crlf("a\nb", 3, &n);
	r[8] = mime_encode_filename("../a.pdf", err, sizeof(err));
	r[9] = mime_encode_filename("\xC3\xA9t\xC3\xA9.pdf", err, sizeof(err));
	r[10] = mime_encode_filename(NULL, err, sizeof(err));
	r[11] = mime_format_mailbox("x", "bad address", err, sizeof(err));	/* NULL */
	for (i = 0; i < 12; i++)
	{
		if (r[i] == NULL)
			nulls++;
		mime_free(r[i]);
	}
	return nulls;
}

/* test_allocator - every allocation freed, hooks used correctly, OOM safe */
static void
test_allocator(void)
{
	MimeAllocator hooks = {counting_alloc, counting_realloc, counting_free};
	int			k;
	int			nulls;

	mime_set_allocator(&hooks);
	nulls = exercise_all();
	CHECK(nulls == 1, "only the invalid address fails (%d NULLs)", nulls);
	CHECK(alloc_count > 0 && alloc_count == free_count,
		  "allocation balance: %ld allocs, %ld frees", alloc_count, free_count);
	CHECK(misuse_count == 0, "hooks misused %ld times (NULL realloc/free or 0 bytes)", misuse_count);

	/* fail each allocation in turn: no crash, no leak */
	for (k = 0; k < 40; k++)
	{
		alloc_count = free_count = 0;
		fail_countdown = k;
		exercise_all();
		CHECK(alloc_count == free_count, "OOM at call %d: %ld allocs, %ld frees",
			  k, alloc_count, free_count);
	}
	fail_countdown = -1;
	{
		char		err[MIME_ERRBUF_SIZE] = "";
		char	   *r;

		fail_countdown = 0;
		r = mime_encode_header_text("x", 1, 9, err, sizeof(err));
		fail_countdown = -1;
		CHECK(r == NULL && strstr(err, "out of memory") != NULL, "OOM message: [%s]", err);
	}
	CHECK(misuse_count == 0, "hooks misused under OOM %ld times", misuse_count);

	mime_set_allocator(NULL);
	alloc_count = free_count = 0;
	mime_free(mime_encode_filename("a", NULL, 0));
	CHECK(alloc_count == 0 && free_count == 0, "default allocator restored");
}

/* main - run all groups and print the summary line */

/* lcg - a small deterministic pseudo-random sequence (rand_r is not C11) */
static int
lcg(unsigned int *state)
{
	*state = *state * 1103515245u + 12345u;
	return (int) ((*state >> 16) & 0x7FFF);
}

/* qp_decode - RFC 2045 quoted-printable decoder, to check the encoder by round trip */
static size_t
qp_decode(const char *s, size_t len, char *out)
{
	size_t		o = 0;

	for (size_t i = 0; i < len; i++)
	{
		if (s[i] == '=' && i + 2 < len && s[i + 1] == '\r' && s[i + 2] == '\n')
			i += 2;				/* soft line break */
		else if (s[i] == '=' && i + 2 < len)
		{
			unsigned int v;

			sscanf(s + i + 1, "%2X", &v);
			out[o++] = (char) v;
			i += 2;
		}
		else
			out[o++] = s[i];
	}
	return o;
}

/* qp_lines_ok - every line at most 76 bytes, printable ASCII, no space before a line end */
static int
qp_lines_ok(const char *s, size_t len)
{
	size_t		col = 0;

	for (size_t i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '\r')
		{
			if (i + 1 >= len || s[i + 1] != '\n')
				return 0;
			if (i > 0 && (s[i - 1] == ' ' || s[i - 1] == '\t'))
				return 0;
			col = 0;
			i++;
			continue;
		}
		if (c == '\n' || (c < 32 && c != '\t') || c > 126)
			return 0;
		if (c == '=' && i + 1 < len && s[i + 1] == '_')
			return 0;
		if (++col > 76)
			return 0;
	}
	return 1;
}

static void
test_quoted_printable(void)
{
	size_t		n;
	char	   *r;
	char		line[200];
	unsigned int seed = 12345;

	r = mime_encode_qp("a=b caf\xC3\xA9\r\n", 11, &n);
	CHECK(r && strcmp(r, "a=3Db caf=C3=A9\r\n") == 0, "qp basic: %s", show(r));
	mime_free(r);
	r = mime_encode_qp("ab \r\ncd\t\r\nend ", 14, &n);
	CHECK(r && strcmp(r, "ab=20\r\ncd=09\r\nend=20") == 0, "qp trailing blanks: %s", show(r));
	mime_free(r);
	r = mime_encode_qp("=_x", 3, &n);
	CHECK(r && strcmp(r, "=3D_x") == 0, "qp never writes =_: %s", show(r));
	mime_free(r);
	memset(line, 'x', 100);
	r = mime_encode_qp(line, 100, &n);
	CHECK(r && n == 103 && memcmp(r + 75, "=\r\n", 3) == 0, "qp soft break after 75: %s", show(r));
	mime_free(r);
	memset(line, 'x', 75);
	r = mime_encode_qp(line, 75, &n);
	CHECK(r && n == 75 && strchr(r, '=') == NULL, "qp 75 bytes fit one line: %s", show(r));
	mime_free(r);
	/* an encoded triple is never split by a soft break */
	memset(line, 'x', 74);
	memcpy(line + 74, "\xC3\xA9", 2);
	r = mime_encode_qp(line, 76, &n);
	CHECK(r && memcmp(r + 74, "=\r\n=C3=A9", 9) == 0, "qp triple kept whole: %s", show(r));
	mime_free(r);
	r = mime_encode_qp("", 0, &n);
	CHECK(r && n == 0 && r[0] == '\0', "qp empty");
	mime_free(r);

	/* random text (CRLF-normalised, every byte value) survives the round trip */
	for (int round = 0; round < 300; round++)
	{
		char		in[600];
		char	   *norm;
		size_t		inlen = (size_t) (lcg(&seed) % 500);
		size_t		normlen;
		char	   *dec;
		size_t		declen;

		for (size_t i = 0; i < inlen; i++)
		{
			int			k = lcg(&seed) % 10;

			in[i] = k < 4 ? 'a' + lcg(&seed) % 26 : k < 6 ? ' ' : k < 7 ? '\n' :
				k < 8 ? '=' : (char) (lcg(&seed) % 256);
		}
		norm = mime_normalize_crlf(in, inlen, &normlen);
		r = mime_encode_qp(norm, normlen, &n);
		dec = malloc(n + 1);
		declen = qp_decode(r, n, dec);
		CHECK(declen == normlen && memcmp(dec, norm, normlen) == 0, "qp round trip %d", round);
		CHECK(qp_lines_ok(r, n), "qp lines round %d: %s", round, show(r));
		free(dec);
		mime_free(r);
		mime_free(norm);
	}
}

static void
test_base64_lines(void)
{
	size_t		n;
	char	   *r;
	unsigned char data[200];

	for (int i = 0; i < 200; i++)
		data[i] = (unsigned char) (i * 7);
	r = mime_encode_base64(data, 57, &n);
	CHECK(r && n == 78 && memcmp(r + 76, "\r\n", 2) == 0 && strchr(r, '=') == NULL,
		  "base64 57 bytes: one full line: %s", show(r));
	mime_free(r);
	r = mime_encode_base64(data, 58, &n);
	CHECK(r && n == 78 + 6 && strcmp(r + 78, "0Q==\r\n") != 0 && memcmp(r + 78 + 2, "==\r\n", 4) == 0,
		  "base64 58 bytes: a second, padded line: %s", show(r));
	mime_free(r);
	r = mime_encode_base64("Man", 3, &n);
	CHECK(r && strcmp(r, "TWFu\r\n") == 0, "base64 Man: %s", show(r));
	mime_free(r);
	r = mime_encode_base64("", 0, &n);
	CHECK(r && n == 0, "base64 empty");
	mime_free(r);
}

static void
test_smtp_data(void)
{
	size_t		n;
	char	   *r;

	r = mime_smtp_data("a\r\n.b\r\n..\r\n.\r\nc.\r\n", 18, &n);
	CHECK(r && strcmp(r, "a\r\n..b\r\n...\r\n..\r\nc.\r\n.\r\n") == 0 && n == strlen(r),
		  "dot-stuffing: %s", show(r));
	mime_free(r);
	r = mime_smtp_data(".first\r\nlast", 12, &n);
	CHECK(r && strcmp(r, "..first\r\nlast\r\n.\r\n") == 0 && n == strlen(r),
		  "a first line's dot, no final CRLF: %s", show(r));
	mime_free(r);
	r = mime_smtp_data("", 0, &n);
	CHECK(r && strcmp(r, ".\r\n") == 0 && n == 3, "empty: %s", show(r));
	mime_free(r);
	r = mime_smtp_data("x\r\n\r\n.\r\nMAIL FROM:<e@vil>\r\n", 27, &n);
	CHECK(r && strstr(r, "\r\n.\r\nMAIL") == NULL && strstr(r, "\r\n..\r\nMAIL") != NULL,
		  "a lone dot cannot end the data early: %s", show(r));
	mime_free(r);
}

/* count - occurrences of needle in haystack */
static int
count(const char *haystack, const char *needle)
{
	int			c = 0;

	for (const char *p = strstr(haystack, needle); p != NULL; p = strstr(p + 1, needle))
		c++;
	return c;
}

static void
test_build_message(void)
{
	const char *hdr = "From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n";
	char		err[MIME_ERRBUF_SIZE];
	size_t		n;
	char	   *r;
	MimeAttachment att[2] = {
		{"application/pdf", "filename=\"f.pdf\"", "%PDF-1.4 \x00\x01\xff", 12},
		{"text/csv; charset=utf-8", "filename*=UTF-8''a%C3%A9.csv", "a,b\r\n1,2\r\n", 10},
	};

	r = mime_build_message(hdr, "Hello\nwörld", NULL, NULL, 0, "T0k", &n, err, sizeof(err));
	CHECK(r && strcmp(r, "From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n"
					  "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=UTF-8\r\n"
					  "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
					  "Hello\r\nw=C3=B6rld\r\n") == 0 && n == strlen(r),
		  "text only: %s", show(r));
	mime_free(r);

	r = mime_build_message(hdr, "plain", "<p>html</p>", NULL, 0, "T0k", &n, err, sizeof(err));
	CHECK(r && strstr(r, "MIME-Version: 1.0\r\nContent-Type: multipart/alternative; "
					  "boundary=\"=_notify_alt_T0k\"\r\n\r\n--=_notify_alt_T0k\r\n"
					  "Content-Type: text/plain; charset=UTF-8\r\n") != NULL &&
		  strstr(r, "\r\n\r\nplain\r\n\r\n--=_notify_alt_T0k\r\nContent-Type: text/html; charset=UTF-8\r\n") != NULL &&
		  strstr(r, "<p>html</p>\r\n\r\n--=_notify_alt_T0k--\r\n") != NULL &&
		  r[n - 1] == '\n' && count(r, "--=_notify_alt_T0k") == 3,
		  "text and html: %s", show(r));
	mime_free(r);

	r = mime_build_message(hdr, "plain", "<p>html</p>", att, 2, "T0k", &n, err, sizeof(err));
	CHECK(r && strstr(r, "Content-Type: multipart/mixed; boundary=\"=_notify_mix_T0k\"\r\n\r\n"
					  "--=_notify_mix_T0k\r\nContent-Type: multipart/alternative;") != NULL &&
		  strstr(r, "--=_notify_alt_T0k--\r\n--=_notify_mix_T0k\r\nContent-Type: application/pdf\r\n"
				 "Content-Transfer-Encoding: base64\r\nContent-Disposition: attachment; filename=\"f.pdf\""
				 "\r\n\r\nJVBERi0xLjQgAAH/\r\n--=_notify_mix_T0k\r\n") != NULL &&
		  strstr(r, "filename*=UTF-8''a%C3%A9.csv\r\n\r\nYSxiDQoxLDINCg==\r\n--=_notify_mix_T0k--\r\n") != NULL &&
		  count(r, "--=_notify_mix_T0k") == 4,
		  "attachments: %s", show(r));
	/* CRLF everywhere: no bare CR or LF */
	{
		int			bare = 0;

		for (size_t i = 0; r && i < n; i++)
			if ((r[i] == '\n' && (i == 0 || r[i - 1] != '\r')) || (r[i] == '\r' && (i + 1 == n || r[i + 1] != '\n')))
				bare++;
		CHECK(r && bare == 0, "no bare CR or LF");
	}
	mime_free(r);

	r = mime_build_message(hdr, "", NULL, NULL, 0, "T0k", &n, err, sizeof(err));
	CHECK(r && n > 20 && strcmp(r + n - 20, "quoted-printable\r\n\r\n") == 0, "empty text: %s", show(r));
	mime_free(r);

	r = mime_build_message(hdr, "x", NULL, NULL, 0, "bad\"token", &n, err, sizeof(err));
	CHECK(r == NULL && strstr(err, "boundary") != NULL, "a token that could break the header is refused");
	r = mime_build_message(hdr, "x", NULL, NULL, 0, "", &n, err, sizeof(err));
	CHECK(r == NULL, "an empty token is refused");
}

int
main(void)
{
	test_utf8();
	test_addresses();
	test_subjects();
	test_mailboxes();
	test_crlf();
	test_dates();
	test_message_ids();
	test_filenames();
	test_misc();
	test_allocator();
	test_quoted_printable();
	test_base64_lines();
	test_smtp_data();
	test_build_message();

	printf("%d passed, %d failed\n", n_passed, n_failed);
	return n_failed == 0 ? 0 : 1;
}

/*-------------------------------------------------------------------------
 *
 * mime.h
 *	  RFC 5322 / RFC 2047 / RFC 2231 helpers used by the notify_ext mailer
 *	  to build header lines that cannot be used for header or SMTP command
 *	  injection.
 *
 * This module is plain C: it includes no PostgreSQL or libcurl headers and
 * uses only libc, so it can be unit-tested standalone.  Every string it
 * returns is allocated through the hooks installed with mime_set_allocator()
 * (malloc/realloc/free by default) and must be released with mime_free() or
 * the matching free hook.
 *
 * Functions that can reject their input return NULL and write a message
 * suitable for a DBA into errbuf (at most errlen bytes, always
 * NUL-terminated; errbuf may be NULL).  NULL is also returned, with an
 * "out of memory" message, if an allocation hook returns NULL.
 *
 * src/mime.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_MIME_H
#define NOTIFY_MIME_H

#include <stdbool.h>
#include <stddef.h>
#include <time.h>

/* Recommended sizes for caller-provided buffers */
#define MIME_ERRBUF_SIZE	256
#define MIME_DATE_BUFLEN	40	/* "Mon, 23 Nov 2026 09:32:28 +0000" + NUL */
#define MIME_MSGID_BUFLEN	352	/* "<" kind(64) "." id(20) "@" domain(253) ">" */

/* Longest line we produce when folding (RFC 5322 section 2.1.1) */
#define MIME_LINE_LIMIT		78

/*
 * Allocation hooks.  All three members must be non-NULL.  The module never
 * calls realloc or free with a NULL pointer and never requests 0 bytes, so
 * palloc/repalloc/pfree can be plugged in directly.
 */
typedef struct MimeAllocator
{
	void	   *(*alloc) (size_t size);
	void	   *(*realloc) (void *ptr, size_t size);
	void		(*free) (void *ptr);
} MimeAllocator;

/* Install allocation hooks; NULL (or a struct with a NULL member) restores malloc/realloc/free */
extern void mime_set_allocator(const MimeAllocator *a);

/* Release a string returned by this module (NULL is ignored) */
extern void mime_free(void *p);

/* Strict UTF-8 check: no overlongs, no surrogates, nothing above U+10FFFF */
extern bool mime_valid_utf8(const char *s, size_t len);

/* Validate a "local@domain" address before it is queued */
extern bool mime_check_address(const char *addr, char *errbuf, size_t errlen);

/*
 * Encode an unstructured header value (e.g. Subject).  first_line_used is
 * the number of columns already used on the first line, e.g. 9 for
 * "Subject: ".  Control characters become spaces, leading/trailing spaces
 * are trimmed; the result is plain folded ASCII or RFC 2047 B encoded-words.
 * The result contains CR only as part of CRLF SPACE folding.
 */
extern char *mime_encode_header_text(const char *utf8, size_t len,
									 size_t first_line_used,
									 char *errbuf, size_t errlen);

/*
 * Build "Display Name <local@domain>" (display name as atoms, quoted-string
 * or encoded-words), or the bare address when display_name is NULL/empty.
 * Folding assumes a header name of at most 10 columns ("Reply-To: ").
 */
extern char *mime_format_mailbox(const char *display_name, const char *address,
								 char *errbuf, size_t errlen);

/*
 * Turn every CRLF, bare CR and bare LF into CRLF and make a non-empty body
 * end with CRLF.  *outlen (if not NULL) receives the result length; the
 * result is also NUL-terminated.  Returns NULL only when out of memory.
 */
extern char *mime_normalize_crlf(const char *s, size_t len, size_t *outlen);

/* RFC 5322 date in UTC, e.g. "Mon, 23 Nov 2026 09:32:28 +0000"; NULL if buf too small */
extern char *mime_format_date(time_t t, char *buf, size_t buflen);

/* Stable Message-ID "<kind.id@domain>"; NULL if buf too small */
extern char *mime_message_id(const char *kind, long long id, const char *domain,
							 char *buf, size_t buflen);

/* RFC 2231 filename parameter for Content-Disposition ("filename=..." or "filename*=...") */
extern char *mime_encode_filename(const char *utf8_name, char *errbuf, size_t errlen);

/* True when s has no C0 control character other than TAB (no CR, LF, NUL) */
extern bool mime_header_value_safe(const char *s, size_t len);

/* Pointer just past the last '@' of address (no allocation), or NULL */
extern char *mime_domain_of(const char *address);

#endif							/* NOTIFY_MIME_H */

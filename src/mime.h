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

/*
 * Quoted-printable (RFC 2045 section 6.7) of CRLF text: CRLF stays a hard
 * line break, lines are at most 76 bytes (soft breaks "=" CRLF), '=', bytes
 * outside printable ASCII and spaces or tabs before a line end are
 * encoded.  The output never contains "=_".  NULL when out of memory.
 */
extern char *mime_encode_qp(const char *s, size_t len, size_t *outlen);

/* Base64 in CRLF-terminated lines of 76 characters; NULL when out of memory */
extern char *mime_encode_base64(const void *data, size_t len, size_t *outlen);

/* One file of a message, as mime_build_message takes it */
typedef struct MimeAttachment
{
	const char *content_type;	/* checked by the caller: mime_header_value_safe */
	const char *filename_param; /* from mime_encode_filename */
	const void *data;
	size_t		len;
} MimeAttachment;

/*
 * The whole message as it goes after DATA: `headers` (complete header
 * lines, each ending in CRLF: Date, From, To, Subject, ...), then
 * MIME-Version and the body:
 *   text only                 text/plain, quoted-printable
 *   text and html             multipart/alternative of both
 *   with attachments          multipart/mixed of the above and the files
 *                             (base64, Content-Disposition: attachment)
 * text and html are UTF-8 with any line ends (CRLF on the wire); html may
 * be NULL.  `token` ([A-Za-z0-9], at most 40) makes the boundaries
 * "=_notify_alt_<token>" and "=_notify_mix_<token>", which neither
 * quoted-printable nor base64 can contain.  Every line ends in CRLF.
 * NULL (and errbuf set) when out of memory or token is not acceptable.
 */
extern char *mime_build_message(const char *headers, const char *text, const char *html,
								const MimeAttachment *attachments, int nattachments,
								const char *token, size_t *outlen,
								char *errbuf, size_t errlen);

/*
 * What goes on the wire after DATA's 354 (RFC 5321 4.5.2): the message with
 * every line that starts with a dot given a second one, then the final
 * ".\r\n" (after a CRLF of its own when the message does not end in one).
 * NULL when out of memory.
 */
extern char *mime_smtp_data(const char *message, size_t len, size_t *outlen);

#endif							/* NOTIFY_MIME_H */

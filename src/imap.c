/*-------------------------------------------------------------------------
 *
 * imap.c
 *	  libcurl IMAP client for the bounce mailbox: UID SEARCH UNSEEN, the
 *	  raw message by BODY.PEEK[], UID STORE +FLAGS (\Seen).
 *
 * libcurl does the connection: TCP, TLS (imaps:// or STARTTLS, checked as
 * the tls mode says), the greeting, CAPABILITY and the login (SASL or
 * LOGIN), with CURLOPT_CONNECT_ONLY, so that curl_easy_perform() returns
 * with the session logged in.  The commands after that are ours, sent and
 * read with curl_easy_send() and curl_easy_recv(), which go through
 * libcurl's TLS layer.
 *
 * Why not libcurl's own IMAP commands: its FETCH asks for BODY[], which
 * sets \Seen, so a message the worker failed to process would never be
 * seen again; and its custom requests (CURLOPT_CUSTOMREQUEST) read the
 * reply line by line without following literals, so a message body with
 * a line that starts with the command's tag ends the reply early, and the
 * rest of the message is read as the server's next replies.  A bounce
 * mailbox receives mail from anyone: its contents must never be able to
 * steer the client.  Here a literal is always read by its byte count.
 *
 * Every wait is bounded by the command's deadline and polls the caller's
 * abort callback at least every IMAP_POLL_SLICE_MS.  A command that fails
 * in the middle of a reply leaves the connection in an unknown state: the
 * session is then marked broken, refuses further commands, and its socket
 * is shut down before libcurl closes it.
 *
 * src/imap.c
 *
 *-------------------------------------------------------------------------
 */
#define _DEFAULT_SOURCE			/* explicit_bzero, strncasecmp under -std=c11 */

#include "imap.h"

#include <curl/curl.h>
#include <errno.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#if defined(__GNUC__)
#define IMAP_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define IMAP_PRINTF(f, a)
#endif

#define IMAP_MAX_RESPONSE	(8 * 1024 * 1024)	/* text of one reply, literals apart */
#define IMAP_MAX_LITERALS	1024	/* literals in one reply */
#define IMAP_RECV_CHUNK		65536
#define IMAP_POLL_SLICE_MS	100
#define IMAP_LOGOUT_TIMEOUT_MS 2000L
#define IMAP_MAX_MAILBOX	1000
#define IMAP_MAX_HOST		255
#define IMAP_SERVER_TEXT	300		/* bytes of a server's reply quoted in an error */
#define IMAP_ERROR_TEXT		2048

/* An imap:// or imaps:// URL, taken apart */
typedef struct ImapUrl
{
	bool		implicit_tls;	/* imaps:// */
	char		host[IMAP_MAX_HOST + 3];	/* as written, IPv6 with its brackets */
	long		port;
	char		mailbox[IMAP_MAX_MAILBOX + 1];	/* percent-decoded */
} ImapUrl;

/* What libcurl's login dialogue had reached, for naming the failed step */
typedef enum LoginPhase
{
	PHASE_CONNECT,
	PHASE_TLS,					/* imaps:// handshake begun */
	PHASE_STARTTLS,				/* STARTTLS sent */
	PHASE_LOGIN					/* AUTHENTICATE or LOGIN sent */
} LoginPhase;

/* A literal of a reply: its place in the reply's text, and its bytes if kept */
typedef struct Literal
{
	size_t		pos;			/* offset in Response.text just after "{n}" */
	size_t		len;
	char	   *data;			/* malloc'd, NUL-terminated; NULL if skipped */
} Literal;

/*
 * One server reply: its lines joined (CRLFs dropped), and the literals that
 * came between them, by position.
 */
typedef struct Response
{
	char	   *text;
	size_t		len;
	size_t		cap;
	Literal    *lits;
	int			nlits;
	int			litcap;
} Response;

struct ImapSession
{
	CURLM	   *multi;			/* drives the login, so that abort_cb is polled often */
	CURL	   *curl;
	curl_socket_t sock;
	char	   *password;		/* a copy, to hide it in error texts; zeroed on close */
	char		mailbox[IMAP_MAX_MAILBOX + 1];
	bool		implicit_tls;
	long		connect_timeout_ms;
	long		timeout_ms;
	size_t		max_message;
	int			(*abort_cb) (void *arg);
	void	   *abort_arg;

	bool		broken;			/* the connection's state is unknown: no more commands */
	bool		logging_out;	/* BYE is expected */
	unsigned	tagno;
	char		tag[16];
	long long	deadline;		/* of the current command, monotonic ms */
	uint32_t	uidvalidity;
	char		tagged[1024];	/* the current command's tagged reply, tag dropped */

	/* received, not yet consumed: rbuf[rstart, rend); no '\n' in [rstart, rscan) */
	char	   *rbuf;
	size_t		rcap;
	size_t		rstart;
	size_t		rend;
	size_t		rscan;
	bool		want_body;		/* keep the BODY[] literal of FETCH replies */

	/* libcurl's login dialogue (imap_open only) */
	LoginPhase	phase;
	bool		got_reply;
	char		last_reply[1024];
	char		curl_err[CURL_ERROR_SIZE];
};

/* What a FETCH reply says, of the items we use */
typedef struct FetchInfo
{
	bool		has_uid;
	uint32_t	uid;
	bool		has_size;
	unsigned long long size;
	bool		has_flags;
	bool		seen;
	bool		has_body;
	bool		body_nil;
	Literal    *body_lit;		/* the body as a literal */
	const char *body_quoted;	/* or as a quoted string, escapes still in */
	size_t		body_quoted_len;
} FetchInfo;

typedef ImapStatus (*UntaggedFn) (ImapSession *s, Response *r, void *ctx,
								  const char *step, char *err, size_t errsize);

/* -- text ------------------------------------------------------------------ */

/*
 * clean_text: src as valid UTF-8 on one line: controls become spaces,
 * bytes that are no UTF-8 become '?'; cut at a character boundary to fit
 * dst.  Returns the length written.
 */
static size_t
clean_text(const char *src, size_t len, char *dst, size_t dstsize)
{
	size_t		i = 0;
	size_t		o = 0;

	if (dstsize == 0)
		return 0;
	while (i < len)
	{
		unsigned char c = (unsigned char) src[i];
		size_t		n = 1;

		if (c >= 0xc2 && c <= 0xf4)
		{
			size_t		need = c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2;
			bool		ok = i + need <= len;

			for (size_t k = 1; ok && k < need; k++)
				ok = ((unsigned char) src[i + k] & 0xc0) == 0x80;
			/* no overlong forms, surrogates or code points over U+10FFFF */
			if (ok && c == 0xe0 && (unsigned char) src[i + 1] < 0xa0)
				ok = false;
			if (ok && c == 0xed && (unsigned char) src[i + 1] >= 0xa0)
				ok = false;
			if (ok && c == 0xf0 && (unsigned char) src[i + 1] < 0x90)
				ok = false;
			if (ok && c == 0xf4 && (unsigned char) src[i + 1] >= 0x90)
				ok = false;
			if (ok)
				n = need;
		}
		if (o + n >= dstsize)
			break;
		if (n > 1)
			memcpy(dst + o, src + i, n);
		else if (c < 0x20 || c == 0x7f)
			dst[o] = ' ';
		else if (c >= 0x80)
			dst[o] = '?';
		else
			dst[o] = (char) c;
		o += n;
		i += n;
	}
	dst[o] = '\0';
	return o;
}

/*
 * hide_password: src with every occurrence of password replaced by "***",
 * into dst (cut to fit).  A server may quote what it was sent.
 */
static void
hide_password(const char *src, size_t len, const char *password, char *dst, size_t dstsize)
{
	size_t		plen = password ? strlen(password) : 0;
	size_t		o = 0;
	size_t		i = 0;

	if (dstsize == 0)
		return;
	while (i < len && o + 1 < dstsize)
	{
		if (plen > 0 && len - i >= plen && memcmp(src + i, password, plen) == 0)
		{
			size_t		n = dstsize - 1 - o < 3 ? dstsize - 1 - o : 3;

			memcpy(dst + o, "***", n);
			o += n;
			i += plen;
		}
		else
			dst[o++] = src[i++];
	}
	dst[o] = '\0';
}

/*
 * server_text: a server's reply line as an error may quote it: password
 * hidden first (so that clipping cannot leave part of it), then cleaned and
 * clipped to IMAP_SERVER_TEXT bytes.
 */
static void
server_text(const char *password, const char *line, size_t len, char *out, size_t outsize)
{
	char		hidden[IMAP_ERROR_TEXT];
	char		clean[IMAP_ERROR_TEXT];
	size_t		n;

	hide_password(line, len, password, hidden, sizeof(hidden));
	n = clean_text(hidden, strlen(hidden), clean, sizeof(clean));
	while (n > 0 && clean[n - 1] == ' ')
		clean[--n] = '\0';
	clean_text(clean, n, out, outsize < IMAP_SERVER_TEXT + 1 ? outsize : IMAP_SERVER_TEXT + 1);
}

/* set_error: "step: what happened" into err, the password hidden, cleaned. */
static void IMAP_PRINTF(5, 6)
set_error(char *err, size_t errsize, const char *password, const char *step, const char *fmt,...)
{
	char		raw[IMAP_ERROR_TEXT];
	char		hidden[IMAP_ERROR_TEXT];
	int			off;
	va_list		ap;

	if (err == NULL || errsize == 0)
		return;
	off = snprintf(raw, sizeof(raw), "%s: ", step);
	if (off < 0 || (size_t) off >= sizeof(raw))
		off = 0;
	va_start(ap, fmt);
	vsnprintf(raw + off, sizeof(raw) - off, fmt, ap);
	va_end(ap);
	hide_password(raw, strlen(raw), password, hidden, sizeof(hidden));
	clean_text(hidden, strlen(hidden), err, errsize);
}

/* now_ms: a monotonic clock in milliseconds. */
static long long
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* -- URL ------------------------------------------------------------------- */

/* hex_value: a hex digit's value, -1 if it is none. */
static int
hex_value(char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/*
 * parse_url: takes an imap:// or imaps:// URL apart, strictly.  Anything
 * imap_open would not act on is refused rather than ignored: a user name
 * in the URL (credentials are given apart, and would show wherever the
 * URL does), RFC 5092 ;parameters, a query or a fragment.  The mailbox is
 * percent-decoded and must be printable ASCII: an IMAP mailbox name is
 * 7-bit (modified UTF-7 for other characters, RFC 3501 5.1.3).
 */
static bool
parse_url(const char *url, ImapUrl *out, char *err, size_t errsize)
{
	const char *p;
	const char *host;
	size_t		hostlen;
	size_t		n = 0;

	memset(out, 0, sizeof(*out));
	if (url == NULL || url[0] == '\0')
	{
		set_error(err, errsize, NULL, "url", "no URL given");
		return false;
	}
	if (strlen(url) > IMAP_MAX_URL_LEN)
	{
		set_error(err, errsize, NULL, "url", "URL longer than %d bytes", IMAP_MAX_URL_LEN);
		return false;
	}
	if (strncasecmp(url, "imaps://", 8) == 0)
	{
		out->implicit_tls = true;
		p = url + 8;
	}
	else if (strncasecmp(url, "imap://", 7) == 0)
		p = url + 7;
	else
	{
		set_error(err, errsize, NULL, "url", "only imap:// and imaps:// URLs are accepted");
		return false;
	}
	for (const char *q = p; *q && *q != '/'; q++)
		if (*q == '@')
		{
			set_error(err, errsize, NULL, "url",
					  "the URL must not hold a user name or password: give them apart");
			return false;
		}
	if (strpbrk(url, "?#;") != NULL)
	{
		set_error(err, errsize, NULL, "url",
				  "the URL must not have a query, a fragment or ;parameters");
		return false;
	}

	/* host: a name, an IPv4 address, or an IPv6 address in brackets */
	host = p;
	if (*p == '[')
	{
		p++;
		while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f') || (*p >= 'A' && *p <= 'F') ||
			   *p == ':' || *p == '.')
			p++;
		if (*p != ']' || p == host + 1)
		{
			set_error(err, errsize, NULL, "url", "malformed IPv6 address in brackets");
			return false;
		}
		p++;
	}
	else
	{
		while ((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
			   *p == '-' || *p == '.' || *p == '_')
			p++;
		if (p == host)
		{
			set_error(err, errsize, NULL, "url", "the URL has no host");
			return false;
		}
		if (host[0] == '-' || host[0] == '.')
		{
			set_error(err, errsize, NULL, "url", "malformed host name");
			return false;
		}
	}
	hostlen = (size_t) (p - host);
	if (hostlen > IMAP_MAX_HOST)
	{
		set_error(err, errsize, NULL, "url", "host name longer than %d bytes", IMAP_MAX_HOST);
		return false;
	}
	memcpy(out->host, host, hostlen);
	out->host[hostlen] = '\0';

	out->port = out->implicit_tls ? 993 : 143;
	if (*p == ':')
	{
		long		port = 0;
		int			digits = 0;

		p++;
		while (*p >= '0' && *p <= '9' && digits < 6)
		{
			port = port * 10 + (*p++ - '0');
			digits++;
		}
		if (digits == 0 || digits > 5 || port < 1 || port > 65535)
		{
			set_error(err, errsize, NULL, "url", "the port must be a number from 1 to 65535");
			return false;
		}
		out->port = port;
	}
	if (*p != '\0' && *p != '/')
	{
		set_error(err, errsize, NULL, "url", "unexpected character after the host: '%c'", *p);
		return false;
	}

	/* the mailbox: everything after the first '/', percent-decoded */
	if (*p == '/')
		p++;
	for (; *p; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (c == '%')
		{
			int			hi = hex_value(p[1]);
			int			lo = hi < 0 ? -1 : hex_value(p[2]);

			if (lo < 0)
			{
				set_error(err, errsize, NULL, "url", "malformed percent-encoding in the mailbox");
				return false;
			}
			c = (unsigned char) (hi * 16 + lo);
			p += 2;
		}
		else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
				   strchr("-._~!$&'()*+,=:@/", c) != NULL))
		{
			set_error(err, errsize, NULL, "url",
					  "the mailbox holds a character that must be percent-encoded");
			return false;
		}
		if (c < 0x20 || c > 0x7e)
		{
			set_error(err, errsize, NULL, "url",
					  "the mailbox name must be printable ASCII (modified UTF-7 for other characters)");
			return false;
		}
		if (n >= IMAP_MAX_MAILBOX)
		{
			set_error(err, errsize, NULL, "url", "mailbox name longer than %d bytes", IMAP_MAX_MAILBOX);
			return false;
		}
		out->mailbox[n++] = (char) c;
	}
	if (n == 0)
		strcpy(out->mailbox, "INBOX");
	else
		out->mailbox[n] = '\0';
	return true;
}

bool
imap_url_valid(const char *url, char *err, size_t errsize)
{
	ImapUrl		parsed;

	if (err != NULL && errsize > 0)
		err[0] = '\0';
	return parse_url(url, &parsed, err, errsize);
}

/* -- the connection ---------------------------------------------------------- */

/* aborted: whether the caller wants us to stop. */
static bool
aborted(const ImapSession *s)
{
	return s->abort_cb != NULL && s->abort_cb(s->abort_arg) != 0;
}

/*
 * fail_session: the connection's state is unknown after this; the session
 * takes no more commands.  Returns IMAP_FAILED for the caller to pass on.
 */
static ImapStatus
fail_session(ImapSession *s)
{
	s->broken = true;
	return IMAP_FAILED;
}

/*
 * wait_socket: waits until the socket is ready for events, a poll slice
 * has passed (so that the abort callback is polled), or the deadline; false
 * with err filled at the deadline.
 */
static bool
wait_socket(ImapSession *s, short events, const char *step, char *err, size_t errsize)
{
	long long	left = s->deadline - now_ms();
	struct pollfd pfd;

	if (left <= 0)
	{
		set_error(err, errsize, s->password, step, "timed out after %ld ms waiting for the server",
				  s->timeout_ms);
		return false;
	}
	pfd.fd = s->sock;
	pfd.events = events;
	pfd.revents = 0;
	if (poll(&pfd, 1, (int) (left < IMAP_POLL_SLICE_MS ? left : IMAP_POLL_SLICE_MS)) < 0 &&
		errno != EINTR)
	{
		set_error(err, errsize, s->password, step, "poll failed: %s", strerror(errno));
		return false;
	}
	return true;
}

/* send_all: sends len bytes through libcurl (and its TLS layer). */
static bool
send_all(ImapSession *s, const char *data, size_t len, const char *step, char *err, size_t errsize)
{
	while (len > 0)
	{
		size_t		n = 0;
		CURLcode	rc;

		if (aborted(s))
		{
			set_error(err, errsize, s->password, step, "aborted");
			return false;
		}
		rc = curl_easy_send(s->curl, data, len, &n);
		if (rc == CURLE_OK)
		{
			data += n;
			len -= n;
		}
		else if (rc != CURLE_AGAIN)
		{
			set_error(err, errsize, s->password, step, "send failed: %s", curl_easy_strerror(rc));
			return false;
		}
		else if (!wait_socket(s, POLLOUT, step, err, errsize))
			return false;
	}
	return true;
}

/*
 * recv_some: appends what the server sent next to the receive buffer;
 * false at the deadline, on abort, on error or when the server closes.
 * libcurl's TLS layer may hold decrypted bytes the socket no longer shows,
 * so it is asked first and the socket waited on only when it has nothing.
 */
static bool
recv_some(ImapSession *s, const char *step, char *err, size_t errsize)
{
	if (s->rstart > 0)
	{
		memmove(s->rbuf, s->rbuf + s->rstart, s->rend - s->rstart);
		s->rend -= s->rstart;
		s->rscan = s->rscan > s->rstart ? s->rscan - s->rstart : 0;
		s->rstart = 0;
	}
	if (s->rcap - s->rend < IMAP_RECV_CHUNK)
	{
		size_t		cap = s->rend + IMAP_RECV_CHUNK;
		char	   *buf = realloc(s->rbuf, cap);

		if (buf == NULL)
		{
			set_error(err, errsize, s->password, step, "out of memory");
			return false;
		}
		s->rbuf = buf;
		s->rcap = cap;
	}
	for (;;)
	{
		size_t		n = 0;
		CURLcode	rc;

		if (aborted(s))
		{
			set_error(err, errsize, s->password, step, "aborted");
			return false;
		}
		rc = curl_easy_recv(s->curl, s->rbuf + s->rend, s->rcap - s->rend, &n);
		if (rc == CURLE_OK)
		{
			if (n == 0)
			{
				set_error(err, errsize, s->password, step, "the server closed the connection");
				return false;
			}
			s->rend += n;
			return true;
		}
		if (rc != CURLE_AGAIN)
		{
			set_error(err, errsize, s->password, step, "receive failed: %s", curl_easy_strerror(rc));
			return false;
		}
		if (!wait_socket(s, POLLIN, step, err, errsize))
			return false;
	}
}

/* -- replies ----------------------------------------------------------------- */

/* response_reset: empties r for the next reply, keeping its buffers. */
static void
response_reset(Response *r)
{
	for (int i = 0; i < r->nlits; i++)
		free(r->lits[i].data);
	r->nlits = 0;
	r->len = 0;
	if (r->text)
		r->text[0] = '\0';
}

/* response_free: frees what r holds. */
static void
response_free(Response *r)
{
	response_reset(r);
	free(r->text);
	free(r->lits);
	memset(r, 0, sizeof(*r));
}

/* append_text: adds a line's text to the reply. */
static bool
append_text(Response *r, const char *data, size_t len)
{
	if (r->len + len + 1 > r->cap)
	{
		size_t		cap = r->cap ? r->cap : 256;
		char	   *text;

		while (cap < r->len + len + 1)
			cap *= 2;
		text = realloc(r->text, cap);
		if (text == NULL)
			return false;
		r->text = text;
		r->cap = cap;
	}
	memcpy(r->text + r->len, data, len);
	r->len += len;
	r->text[r->len] = '\0';
	return true;
}

/*
 * read_line: the next line of the reply, CRLF (or a bare LF) dropped,
 * appended to r->text.
 */
static bool
read_line(ImapSession *s, Response *r, const char *step, char *err, size_t errsize)
{
	for (;;)
	{
		char	   *nl = NULL;

		if (s->rscan < s->rend)
			nl = memchr(s->rbuf + s->rscan, '\n', s->rend - s->rscan);

		if (nl != NULL)
		{
			size_t		linelen = (size_t) (nl - (s->rbuf + s->rstart));
			size_t		textlen = linelen;

			if (textlen > 0 && s->rbuf[s->rstart + textlen - 1] == '\r')
				textlen--;
			if (r->len + textlen > IMAP_MAX_RESPONSE)
				break;
			if (!append_text(r, s->rbuf + s->rstart, textlen))
			{
				set_error(err, errsize, s->password, step, "out of memory");
				return false;
			}
			s->rstart += linelen + 1;
			s->rscan = s->rstart;
			return true;
		}
		s->rscan = s->rend;
		if (r->len + (s->rend - s->rstart) > IMAP_MAX_RESPONSE)
			break;
		if (!recv_some(s, step, err, errsize))
			return false;
	}
	set_error(err, errsize, s->password, step, "the server sent a reply over %d bytes",
			  IMAP_MAX_RESPONSE);
	return false;
}

/*
 * literal_at_end: whether the reply's text, from line_start on, ends with a
 * literal's announcement "{n}" (RFC 3501 literal; "{n+}" accepted too); its
 * size in *n and the position of its '{' in *brace.
 */
static bool
literal_at_end(const Response *r, size_t line_start, size_t *n, size_t *brace)
{
	size_t		end = r->len;
	size_t		i;
	unsigned long long v = 0;

	if (end <= line_start || r->text[end - 1] != '}')
		return false;
	i = end - 1;
	if (i > line_start && r->text[i - 1] == '+')
		i--;
	while (i > line_start && r->text[i - 1] >= '0' && r->text[i - 1] <= '9')
		i--;
	if (i == line_start || r->text[i - 1] != '{' || r->text[i] == '}' || r->text[i] == '+')
		return false;
	for (size_t k = i; r->text[k] >= '0' && r->text[k] <= '9'; k++)
	{
		v = v * 10 + (unsigned long long) (r->text[k] - '0');
		if (v > (unsigned long long) SIZE_MAX / 2)
			return false;
	}
	*n = (size_t) v;
	*brace = i - 1;
	return true;
}

/*
 * is_body_literal: whether the literal announced at brace is the value of
 * BODY[] (or BODY[]<origin>) in a FETCH reply: the only literal fetch keeps.
 */
static bool
is_body_literal(const Response *r, size_t brace)
{
	const char *t = r->text;
	size_t		i = 2;
	size_t		end;

	if (r->len < 4 || t[0] != '*' || t[1] != ' ')
		return false;
	while (i < r->len && t[i] >= '0' && t[i] <= '9')
		i++;
	if (i == 2 || i + 7 > r->len || strncasecmp(t + i, " FETCH ", 7) != 0)
		return false;
	if (brace < 1 || t[brace - 1] != ' ')
		return false;
	end = brace - 1;
	if (end > 0 && t[end - 1] == '>')
	{
		end--;
		while (end > 0 && t[end - 1] >= '0' && t[end - 1] <= '9')
			end--;
		if (end == 0 || t[end - 1] != '<')
			return false;
		end--;
	}
	return end >= 7 && strncasecmp(t + end - 6, "BODY[]", 6) == 0 &&
		(t[end - 7] == ' ' || t[end - 7] == '(');
}

/*
 * read_literal: the n bytes of a literal, kept (malloc'd) or skipped.  The
 * size is the server's word: past max_message + 1 (more than any fetch
 * asks for) the session gives up rather than read without end.
 */
static bool
read_literal(ImapSession *s, Response *r, size_t n, bool keep, const char *step,
			 char *err, size_t errsize)
{
	Literal    *lit;
	size_t		left = n;

	if (n > s->max_message + 1)
	{
		set_error(err, errsize, s->password, step,
				  "the server announced a %zu-byte literal, over the limit of %zu", n,
				  s->max_message + 1);
		return false;
	}
	if (r->nlits >= IMAP_MAX_LITERALS)
	{
		set_error(err, errsize, s->password, step, "a reply with more than %d literals",
				  IMAP_MAX_LITERALS);
		return false;
	}
	if (r->nlits == r->litcap)
	{
		int			cap = r->litcap ? r->litcap * 2 : 4;
		Literal    *lits = realloc(r->lits, sizeof(Literal) * cap);

		if (lits == NULL)
		{
			set_error(err, errsize, s->password, step, "out of memory");
			return false;
		}
		r->lits = lits;
		r->litcap = cap;
	}
	lit = &r->lits[r->nlits];
	lit->pos = r->len;
	lit->len = n;
	lit->data = NULL;
	if (keep && (lit->data = malloc(n + 1)) == NULL)
	{
		set_error(err, errsize, s->password, step, "out of memory for a %zu-byte message", n);
		return false;
	}
	r->nlits++;
	while (left > 0)
	{
		size_t		avail = s->rend - s->rstart;
		size_t		take;

		if (avail == 0)
		{
			if (!recv_some(s, step, err, errsize))
				return false;
			continue;
		}
		take = avail < left ? avail : left;
		if (keep)
			memcpy(lit->data + (n - left), s->rbuf + s->rstart, take);
		s->rstart += take;
		if (s->rscan < s->rstart)
			s->rscan = s->rstart;
		left -= take;
	}
	if (keep)
		lit->data[n] = '\0';
	return true;
}

/* read_response: one whole reply, its literals read by their byte counts. */
static bool
read_response(ImapSession *s, Response *r, const char *step, char *err, size_t errsize)
{
	response_reset(r);
	for (;;)
	{
		size_t		line_start = r->len;
		size_t		n;
		size_t		brace;

		if (!read_line(s, r, step, err, errsize))
			return false;
		if (!literal_at_end(r, line_start, &n, &brace))
			return true;
		if (!read_literal(s, r, n, s->want_body && is_body_literal(r, brace), step, err, errsize))
			return false;
	}
}

/* -- tokens of a reply -------------------------------------------------------- */

typedef enum TokenKind
{
	TOK_END,
	TOK_ATOM,					/* atoms, numbers, NIL, flags, BODY[...]<n> */
	TOK_QUOTED,					/* s, len: the inside, escapes still in */
	TOK_LITERAL,
	TOK_LPAREN,
	TOK_RPAREN,
	TOK_BAD
} TokenKind;

typedef struct Token
{
	TokenKind	kind;
	const char *s;
	size_t		len;
	Literal    *lit;
} Token;

typedef struct Cursor
{
	Response   *r;
	size_t		pos;
} Cursor;

/* next_token: the next token of the reply at c. */
static Token
next_token(Cursor *c)
{
	const char *t = c->r->text;
	size_t		len = c->r->len;
	Token		tok = {TOK_END, NULL, 0, NULL};

	while (c->pos < len && t[c->pos] == ' ')
		c->pos++;
	if (c->pos >= len)
		return tok;
	tok.s = t + c->pos;
	switch (t[c->pos])
	{
		case '(':
			tok.kind = TOK_LPAREN;
			c->pos++;
			return tok;
		case ')':
			tok.kind = TOK_RPAREN;
			c->pos++;
			return tok;
		case '"':
			{
				size_t		i = c->pos + 1;

				while (i < len && t[i] != '"')
					i += (t[i] == '\\' && i + 1 < len) ? 2 : 1;
				if (i >= len)
				{
					tok.kind = TOK_BAD;
					return tok;
				}
				tok.kind = TOK_QUOTED;
				tok.s = t + c->pos + 1;
				tok.len = i - c->pos - 1;
				c->pos = i + 1;
				return tok;
			}
		case '{':
			{
				size_t		i = c->pos + 1;

				while (i < len && t[i] != '}')
					i++;
				if (i < len)
					for (int k = 0; k < c->r->nlits; k++)
						if (c->r->lits[k].pos == i + 1)
						{
							tok.kind = TOK_LITERAL;
							tok.lit = &c->r->lits[k];
							c->pos = i + 1;
							return tok;
						}
				tok.kind = TOK_BAD;
				return tok;
			}
		default:
			{
				size_t		i = c->pos;
				int			depth = 0;

				/* section specs hold spaces and parentheses: BODY[HEADER.FIELDS (TO)] */
				while (i < len && (depth > 0 || !strchr(" ()\"{", t[i])))
				{
					if (t[i] == '[')
						depth++;
					else if (t[i] == ']' && depth > 0)
						depth--;
					i++;
				}
				tok.kind = TOK_ATOM;
				tok.len = i - c->pos;
				c->pos = i;
				return tok;
			}
	}
}

/* token_is: whether tok is the atom word, case-insensitively. */
static bool
token_is(const Token *tok, const char *word)
{
	size_t		n = strlen(word);

	return tok->kind == TOK_ATOM && tok->len == n && strncasecmp(tok->s, word, n) == 0;
}

/* token_number: an atom that is a decimal number up to max. */
static bool
token_number(const Token *tok, unsigned long long max, unsigned long long *value)
{
	unsigned long long v = 0;

	if (tok->kind != TOK_ATOM || tok->len == 0 || tok->len > 20)
		return false;
	for (size_t i = 0; i < tok->len; i++)
	{
		if (tok->s[i] < '0' || tok->s[i] > '9')
			return false;
		if (v > (max - (unsigned long long) (tok->s[i] - '0')) / 10)
			return false;
		v = v * 10 + (unsigned long long) (tok->s[i] - '0');
	}
	*value = v;
	return true;
}

/* skip_value: passes over a value whose first token is tok. */
static bool
skip_value(Cursor *c, Token tok)
{
	int			depth = 0;

	for (;;)
	{
		if (tok.kind == TOK_END || tok.kind == TOK_BAD)
			return false;
		if (tok.kind == TOK_LPAREN)
			depth++;
		else if (tok.kind == TOK_RPAREN)
		{
			if (--depth < 0)
				return false;
		}
		if (depth == 0)
			return true;
		tok = next_token(c);
	}
}

/* is_body_item: BODY[] or BODY[]<origin>, the whole message. */
static bool
is_body_item(const Token *tok)
{
	if (tok->kind != TOK_ATOM || tok->len < 6 || strncasecmp(tok->s, "BODY[]", 6) != 0)
		return false;
	if (tok->len == 6)
		return true;
	if (tok->s[6] != '<' || tok->s[tok->len - 1] != '>' || tok->len < 9)
		return false;
	for (size_t i = 7; i < tok->len - 1; i++)
		if (tok->s[i] < '0' || tok->s[i] > '9')
			return false;
	return true;
}

/*
 * parse_fetch: the items of an untagged FETCH reply that we use.  false if
 * the reply is no FETCH (*is_fetch false) or is malformed.
 */
static bool
parse_fetch(Response *r, FetchInfo *info, bool *is_fetch)
{
	Cursor		c = {r, 2};
	Token		tok;
	unsigned long long v;

	memset(info, 0, sizeof(*info));
	*is_fetch = false;
	tok = next_token(&c);
	if (!token_number(&tok, UINT32_MAX, &v))
		return false;
	tok = next_token(&c);
	if (!token_is(&tok, "FETCH"))
		return false;
	*is_fetch = true;
	if (next_token(&c).kind != TOK_LPAREN)
		return false;
	for (;;)
	{
		Token		name = next_token(&c);
		Token		value;

		if (name.kind == TOK_RPAREN)
			return true;
		if (name.kind != TOK_ATOM)
			return false;
		value = next_token(&c);
		if (token_is(&name, "UID"))
		{
			if (!token_number(&value, UINT32_MAX, &v) || v == 0)
				return false;
			info->has_uid = true;
			info->uid = (uint32_t) v;
		}
		else if (token_is(&name, "RFC822.SIZE"))
		{
			if (!token_number(&value, ULLONG_MAX, &info->size))
				return false;
			info->has_size = true;
		}
		else if (token_is(&name, "FLAGS"))
		{
			if (value.kind != TOK_LPAREN)
				return false;
			info->has_flags = true;
			for (;;)
			{
				Token		flag = next_token(&c);

				if (flag.kind == TOK_RPAREN)
					break;
				if (flag.kind != TOK_ATOM)
					return false;
				if (token_is(&flag, "\\Seen"))
					info->seen = true;
			}
		}
		else if (is_body_item(&name))
		{
			info->has_body = true;
			if (value.kind == TOK_LITERAL)
				info->body_lit = value.lit;
			else if (value.kind == TOK_QUOTED)
			{
				info->body_quoted = value.s;
				info->body_quoted_len = value.len;
			}
			else if (token_is(&value, "NIL"))
				info->body_nil = true;
			else
				return false;
		}
		else if (!skip_value(&c, value))
			return false;
	}
}

/* -- commands ------------------------------------------------------------------ */

/*
 * run_command: sends one command and reads the replies until its tagged
 * one; untagged replies go to fn.  OK is IMAP_OK, NO and BAD are
 * IMAP_REFUSED (err quotes the server); anything that leaves the
 * connection's state unknown is IMAP_FAILED and breaks the session.
 */
static ImapStatus
run_command(ImapSession *s, const char *step, const char *command, UntaggedFn fn, void *ctx,
			char *err, size_t errsize)
{
	Response	r = {0};
	char	   *line;
	size_t		taglen;
	size_t		cmdlen = strlen(command);
	ImapStatus	status = IMAP_FAILED;

	s->tagged[0] = '\0';
	if (s->broken)
	{
		set_error(err, errsize, s->password, step,
				  "the session failed earlier: close it and open a new one");
		return IMAP_FAILED;
	}
	s->deadline = now_ms() + s->timeout_ms;
	snprintf(s->tag, sizeof(s->tag), "nx%u", ++s->tagno);
	taglen = strlen(s->tag);
	line = malloc(taglen + 1 + cmdlen + 3);
	if (line == NULL)
	{
		set_error(err, errsize, s->password, step, "out of memory");
		return IMAP_FAILED;
	}
	memcpy(line, s->tag, taglen);
	line[taglen] = ' ';
	memcpy(line + taglen + 1, command, cmdlen);
	memcpy(line + taglen + 1 + cmdlen, "\r\n", 3);
	if (!send_all(s, line, taglen + cmdlen + 3, step, err, errsize))
	{
		free(line);
		return fail_session(s);
	}
	free(line);

	for (;;)
	{
		char		quoted[IMAP_SERVER_TEXT + 1];
		bool		untagged;

		if (!read_response(s, &r, step, err, errsize))
			break;
		if (r.len > taglen && memcmp(r.text, s->tag, taglen) == 0 && r.text[taglen] == ' ')
		{
			const char *rest = r.text + taglen + 1;

			server_text(s->password, rest, r.len - taglen - 1, s->tagged, sizeof(s->tagged));
			if (strncasecmp(rest, "OK", 2) == 0 && (rest[2] == ' ' || rest[2] == '\0'))
				status = IMAP_OK;
			else if ((strncasecmp(rest, "NO", 2) == 0 && (rest[2] == ' ' || rest[2] == '\0')) ||
					 (strncasecmp(rest, "BAD", 3) == 0 && (rest[3] == ' ' || rest[3] == '\0')))
			{
				set_error(err, errsize, s->password, step, "server said: %s", s->tagged);
				status = IMAP_REFUSED;
			}
			else
			{
				set_error(err, errsize, s->password, step, "malformed reply: %s", s->tagged);
				break;
			}
			response_free(&r);
			return status;
		}
		untagged = r.len >= 2 && r.text[0] == '*' && r.text[1] == ' ';
		if (untagged && !(strncasecmp(r.text + 2, "BYE", 3) == 0 && !s->logging_out))
		{
			if (fn != NULL && fn(s, &r, ctx, step, err, errsize) != IMAP_OK)
				break;
			continue;
		}
		server_text(s->password, r.text, r.len, quoted, sizeof(quoted));
		if (untagged)
			set_error(err, errsize, s->password, step, "the server ended the session: %s",
					  quoted + 2);
		else if (r.len >= 1 && r.text[0] == '+')
			set_error(err, errsize, s->password, step, "unexpected continuation request: %s", quoted);
		else
			set_error(err, errsize, s->password, step, "unexpected reply: %s", quoted);
		break;
	}
	response_free(&r);
	return fail_session(s);
}

/*
 * quote_mailbox: the mailbox name as an IMAP quoted string (parse_url let
 * through printable ASCII only).
 */
static void
quote_mailbox(const char *mailbox, char *out, size_t outsize)
{
	size_t		o = 0;

	out[o++] = '"';
	for (const char *p = mailbox; *p && o + 3 < outsize; p++)
	{
		if (*p == '"' || *p == '\\')
			out[o++] = '\\';
		out[o++] = *p;
	}
	out[o++] = '"';
	out[o] = '\0';
}

/* select_untagged: notes UIDVALIDITY from SELECT's "* OK [UIDVALIDITY n]". */
static ImapStatus
select_untagged(ImapSession *s, Response *r, void *ctx, const char *step, char *err, size_t errsize)
{
	const char *key = "* OK [UIDVALIDITY ";
	size_t		klen = strlen(key);

	(void) ctx;
	(void) step;
	(void) err;
	(void) errsize;
	if (r->len > klen && strncasecmp(r->text, key, klen) == 0)
	{
		unsigned long long v = 0;
		size_t		i = klen;

		while (i < r->len && r->text[i] >= '0' && r->text[i] <= '9' && v <= UINT32_MAX)
			v = v * 10 + (unsigned long long) (r->text[i++] - '0');
		if (v <= UINT32_MAX)
			s->uidvalidity = (uint32_t) v;
	}
	return IMAP_OK;
}

/* select_mailbox: SELECT, read-write; the session is useless otherwise. */
static bool
select_mailbox(ImapSession *s, char *err, size_t errsize)
{
	char		quoted[2 * IMAP_MAX_MAILBOX + 3];
	char		command[2 * IMAP_MAX_MAILBOX + 16];

	quote_mailbox(s->mailbox, quoted, sizeof(quoted));
	snprintf(command, sizeof(command), "SELECT %s", quoted);
	if (run_command(s, "select", command, select_untagged, NULL, err, errsize) != IMAP_OK)
		return false;
	if (strncasecmp(s->tagged, "OK [READ-ONLY]", 14) == 0)
	{
		set_error(err, errsize, s->password, "select",
				  "the server opened %s read-only; marking bounces \\Seen needs write access",
				  quoted);
		return false;
	}
	return true;
}

/* The UIDs a search collects */
typedef struct UidList
{
	uint32_t   *uids;
	size_t		n;
	size_t		cap;
} UidList;

/* search_untagged: the numbers of "* SEARCH n n n". */
static ImapStatus
search_untagged(ImapSession *s, Response *r, void *ctx, const char *step, char *err, size_t errsize)
{
	UidList    *list = ctx;
	Cursor		c = {r, 2};
	Token		tok = next_token(&c);

	if (!token_is(&tok, "SEARCH"))
		return IMAP_OK;
	for (;;)
	{
		unsigned long long v;

		tok = next_token(&c);
		if (tok.kind == TOK_END)
			return IMAP_OK;
		if (!token_number(&tok, UINT32_MAX, &v) || v == 0)
		{
			set_error(err, errsize, s->password, step, "malformed SEARCH reply");
			return IMAP_FAILED;
		}
		if (list->n == list->cap)
		{
			size_t		cap = list->cap ? list->cap * 2 : 64;
			uint32_t   *uids = realloc(list->uids, cap * sizeof(uint32_t));

			if (uids == NULL)
			{
				set_error(err, errsize, s->password, step, "out of memory");
				return IMAP_FAILED;
			}
			list->uids = uids;
			list->cap = cap;
		}
		list->uids[list->n++] = (uint32_t) v;
	}
}

/* compare_uids: qsort order for UIDs. */
static int
compare_uids(const void *a, const void *b)
{
	uint32_t	x = *(const uint32_t *) a;
	uint32_t	y = *(const uint32_t *) b;

	return x < y ? -1 : x > y;
}

ImapStatus
imap_search_unseen(ImapSession *session, uint32_t **uids, size_t *n, char *err, size_t errsize)
{
	UidList		list = {NULL, 0, 0};
	ImapStatus	status;
	size_t		kept = 0;

	*uids = NULL;
	*n = 0;
	if (err != NULL && errsize > 0)
		err[0] = '\0';
	status = run_command(session, "search", "UID SEARCH UNSEEN", search_untagged, &list,
						 err, errsize);
	if (status != IMAP_OK)
	{
		free(list.uids);
		return status;
	}
	qsort(list.uids, list.n, sizeof(uint32_t), compare_uids);
	for (size_t i = 0; i < list.n; i++)
		if (kept == 0 || list.uids[kept - 1] != list.uids[i])
			list.uids[kept++] = list.uids[i];
	if (kept == 0)
	{
		free(list.uids);
		list.uids = NULL;
	}
	*uids = list.uids;
	*n = kept;
	return IMAP_OK;
}

/* What fetch collects: the message of one UID */
typedef struct FetchResult
{
	uint32_t	uid;
	bool		found;
	bool		nil;
	bool		has_size;
	unsigned long long size;
	char	   *data;
	size_t		len;
} FetchResult;

/* unquote: a quoted string's inside, its escapes undone, malloc'd. */
static char *
unquote(const char *s, size_t len, size_t *outlen)
{
	char	   *out = malloc(len + 1);
	size_t		o = 0;

	if (out == NULL)
		return NULL;
	for (size_t i = 0; i < len; i++)
	{
		if (s[i] == '\\' && i + 1 < len)
			i++;
		out[o++] = s[i];
	}
	out[o] = '\0';
	*outlen = o;
	return out;
}

/*
 * fetch_untagged: the FETCH reply of the UID asked for; other messages'
 * FETCH replies (a flag another client changed) are passed over.
 */
static ImapStatus
fetch_untagged(ImapSession *s, Response *r, void *ctx, const char *step, char *err, size_t errsize)
{
	FetchResult *res = ctx;
	FetchInfo	info;
	bool		is_fetch;

	if (!parse_fetch(r, &info, &is_fetch))
	{
		if (!is_fetch)
			return IMAP_OK;
		set_error(err, errsize, s->password, step, "malformed FETCH reply");
		return IMAP_FAILED;
	}
	if (!info.has_uid || info.uid != res->uid || !info.has_body)
		return IMAP_OK;
	free(res->data);
	res->data = NULL;
	res->found = true;
	res->nil = info.body_nil;
	res->has_size = info.has_size;
	res->size = info.size;
	if (info.body_lit != NULL)
	{
		/* the literal's buffer becomes the result */
		res->data = info.body_lit->data;
		res->len = info.body_lit->len;
		info.body_lit->data = NULL;
	}
	else if (info.body_quoted != NULL)
	{
		res->data = unquote(info.body_quoted, info.body_quoted_len, &res->len);
		if (res->data == NULL)
		{
			set_error(err, errsize, s->password, step, "out of memory");
			return IMAP_FAILED;
		}
	}
	return IMAP_OK;
}

ImapStatus
imap_fetch(ImapSession *session, uint32_t uid, char **data, size_t *len, char *err, size_t errsize)
{
	FetchResult res = {0};
	char		command[128];
	ImapStatus	status;

	*data = NULL;
	*len = 0;
	if (err != NULL && errsize > 0)
		err[0] = '\0';
	res.uid = uid;

	/*
	 * BODY.PEEK leaves \Seen alone.  The partial fetch caps the transfer: a
	 * message over the limit costs max_message + 1 bytes, not its size, and
	 * the session stays in step.  RFC822.SIZE says how large it really is.
	 */
	snprintf(command, sizeof(command), "UID FETCH %u (UID RFC822.SIZE BODY.PEEK[]<0.%zu>)",
			 (unsigned) uid, session->max_message + 1);
	session->want_body = true;
	status = run_command(session, "fetch", command, fetch_untagged, &res, err, errsize);
	session->want_body = false;
	if (status != IMAP_OK)
	{
		free(res.data);
		return status;
	}
	if (!res.found)
	{
		set_error(err, errsize, session->password, "fetch",
				  "no message with UID %u (expunged, or never there)", (unsigned) uid);
		return IMAP_REFUSED;
	}
	if (res.nil || res.data == NULL)
	{
		free(res.data);
		set_error(err, errsize, session->password, "fetch",
				  "the server sent no content for UID %u", (unsigned) uid);
		return IMAP_REFUSED;
	}
	if (res.len > session->max_message ||
		(res.has_size && res.size > (unsigned long long) session->max_message))
	{
		free(res.data);
		if (res.has_size)
			set_error(err, errsize, session->password, "fetch",
					  "message UID %u is %llu bytes, over the limit of %zu", (unsigned) uid,
					  res.size, session->max_message);
		else
			set_error(err, errsize, session->password, "fetch",
					  "message UID %u is over the limit of %zu bytes", (unsigned) uid,
					  session->max_message);
		return IMAP_REFUSED;
	}
	*data = res.data;
	*len = res.len;
	return IMAP_OK;
}

/* What a store learns of the message it flagged */
typedef struct StoreResult
{
	uint32_t	uid;
	bool		found;
	bool		seen;
} StoreResult;

/* store_untagged: the FETCH reply that tells the message's new flags. */
static ImapStatus
store_untagged(ImapSession *s, Response *r, void *ctx, const char *step, char *err, size_t errsize)
{
	StoreResult *res = ctx;
	FetchInfo	info;
	bool		is_fetch;

	if (!parse_fetch(r, &info, &is_fetch))
	{
		if (!is_fetch)
			return IMAP_OK;
		set_error(err, errsize, s->password, step, "malformed FETCH reply");
		return IMAP_FAILED;
	}
	if (info.has_uid && info.uid == res->uid && info.has_flags)
	{
		res->found = true;
		res->seen = info.seen;
	}
	return IMAP_OK;
}

ImapStatus
imap_mark_seen(ImapSession *session, uint32_t uid, char *err, size_t errsize)
{
	StoreResult res = {uid, false, false};
	char		command[64];
	ImapStatus	status;

	if (err != NULL && errsize > 0)
		err[0] = '\0';

	/*
	 * Not .SILENT: the server answers with the message's flags (RFC 3501
	 * 6.4.6), which tells a UID that no longer exists (UID STORE of one is
	 * no error) from a message now \Seen.  A server may say nothing when
	 * the flag was set already (Dovecot does): then the flags are asked for.
	 */
	snprintf(command, sizeof(command), "UID STORE %u +FLAGS (\\Seen)", (unsigned) uid);
	status = run_command(session, "store", command, store_untagged, &res, err, errsize);
	if (status == IMAP_OK && !res.found)
	{
		snprintf(command, sizeof(command), "UID FETCH %u (UID FLAGS)", (unsigned) uid);
		status = run_command(session, "store", command, store_untagged, &res, err, errsize);
	}
	if (status != IMAP_OK)
		return status;
	if (!res.found)
	{
		set_error(err, errsize, session->password, "store",
				  "no message with UID %u (expunged, or never there)", (unsigned) uid);
		return IMAP_REFUSED;
	}
	if (!res.seen)
	{
		set_error(err, errsize, session->password, "store",
				  "the server did not set \\Seen on UID %u", (unsigned) uid);
		return IMAP_REFUSED;
	}
	return IMAP_OK;
}

uint32_t
imap_uidvalidity(const ImapSession *session)
{
	return session->uidvalidity;
}

/* -- opening and closing ------------------------------------------------------ */

/*
 * debug_cb: follows libcurl's login dialogue: keeps the server's last line,
 * and notes when the TLS handshake began and when STARTTLS or the login
 * was sent, to name the step that failed.  What the client sends is
 * looked at for its command name only and never kept: the login carries
 * the password.
 */
static int
debug_cb(CURL *handle, curl_infotype type, char *data, size_t size, void *userp)
{
	ImapSession *s = userp;

	(void) handle;
	if (type == CURLINFO_HEADER_IN)
	{
		size_t		n = size < sizeof(s->last_reply) - 1 ? size : sizeof(s->last_reply) - 1;

		while (n > 0 && (data[n - 1] == '\r' || data[n - 1] == '\n'))
			n--;
		memcpy(s->last_reply, data, n);
		s->last_reply[n] = '\0';
		s->got_reply = true;
	}
	else if ((type == CURLINFO_SSL_DATA_OUT || type == CURLINFO_SSL_DATA_IN) &&
			 s->phase == PHASE_CONNECT)
		s->phase = PHASE_TLS;
	else if (type == CURLINFO_HEADER_OUT)
	{
		const char *sp = memchr(data, ' ', size);
		size_t		rest = sp ? size - (size_t) (sp + 1 - data) : 0;

		if (rest >= 8 && strncasecmp(sp + 1, "STARTTLS", 8) == 0)
			s->phase = PHASE_STARTTLS;
		else if ((rest >= 12 && strncasecmp(sp + 1, "AUTHENTICATE", 12) == 0) ||
				 (rest >= 5 && strncasecmp(sp + 1, "LOGIN", 5) == 0))
			s->phase = PHASE_LOGIN;
	}
	return 0;
}

/* is_tls_error: libcurl's codes for a TLS failure. */
static bool
is_tls_error(CURLcode rc)
{
	switch (rc)
	{
		case CURLE_USE_SSL_FAILED:
		case CURLE_SSL_CONNECT_ERROR:
		case CURLE_PEER_FAILED_VERIFICATION:
		case CURLE_SSL_CERTPROBLEM:
		case CURLE_SSL_CIPHER:
		case CURLE_SSL_CACERT_BADFILE:
		case CURLE_SSL_ISSUER_ERROR:
		case CURLE_SSL_PINNEDPUBKEYNOTMATCH:
		case CURLE_SSL_INVALIDCERTSTATUS:
		case CURLE_SSL_CRL_BADFILE:
		case CURLE_SSL_ENGINE_NOTFOUND:
		case CURLE_SSL_ENGINE_SETFAILED:
		case CURLE_SSL_ENGINE_INITFAILED:
		case CURLE_SSL_SHUTDOWN_FAILED:
		case CURLE_SSL_CLIENTCERT:
			return true;
		default:
			return false;
	}
}

/*
 * login_error: what failed in libcurl's part (connect to login), as
 * "step: what; server said: ...".
 */
static void
login_error(ImapSession *s, CURLcode rc, char *err, size_t errsize)
{
	const char *step;
	const char *what = s->curl_err[0] ? s->curl_err : curl_easy_strerror(rc);
	char		timed_out[64];
	curl_off_t	tls_done = 0;
	bool		quote_server = false;
	char		said[IMAP_SERVER_TEXT + 1] = "";

	/* libcurl's connect time includes the handshake: the phase tells */
	curl_easy_getinfo(s->curl, CURLINFO_APPCONNECT_TIME_T, &tls_done);
	if (rc == CURLE_LOGIN_DENIED)
		step = "login";
	else if (rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_CONNECT)
		step = "connect";
	else if (is_tls_error(rc))
		step = "TLS";
	else if (s->phase == PHASE_LOGIN)
		step = "login";
	else if ((s->phase == PHASE_TLS || s->phase == PHASE_STARTTLS) && tls_done == 0)
		step = "TLS";
	else if (s->phase == PHASE_CONNECT && !s->got_reply)
	{
		curl_off_t	connected = 0;

		curl_easy_getinfo(s->curl, CURLINFO_CONNECT_TIME_T, &connected);
		step = connected == 0 ? "connect" : "greeting";
	}
	else
		step = "greeting";

	if (rc == CURLE_ABORTED_BY_CALLBACK)
		what = "aborted";
	else if (rc == CURLE_OPERATION_TIMEDOUT)
	{
		snprintf(timed_out, sizeof(timed_out), "timed out after %ld ms (the connect timeout)",
				 s->connect_timeout_ms);
		what = timed_out;
	}
	else if (rc == CURLE_USE_SSL_FAILED && s->phase != PHASE_STARTTLS)
		what = "the server does not offer STARTTLS, and this tls mode does not log in "
			"without TLS: nothing was sent after CAPABILITY";
	if (strcmp(step, "login") == 0 || strcmp(step, "greeting") == 0 ||
		(rc == CURLE_USE_SSL_FAILED && s->phase == PHASE_STARTTLS))
		quote_server = s->last_reply[0] != '\0';
	if (quote_server)
	{
		const char *line = s->last_reply;

		/* drop libcurl's tag ("A002 NO ...") or the untagged mark */
		if (strncmp(line, "* ", 2) == 0)
			line += 2;
		else if (line[0] >= 'A' && line[0] <= 'Z' && strspn(line + 1, "0123456789") == 3 &&
				 line[4] == ' ')
			line += 5;
		server_text(s->password, line, strlen(line), said, sizeof(said));
		set_error(err, errsize, s->password, step, "%s; server said: %s", what, said);
	}
	else
		set_error(err, errsize, s->password, step, "%s", what);
}

/*
 * configure_tls: the tls mode as libcurl options.  'verify' and 'require'
 * fail closed: CURLUSESSL_ALL gives up when STARTTLS is not offered or
 * refused, before the login is sent in clear text.
 */
static bool
configure_tls(ImapSession *s, const char *tls, const char *ca_file, char *err, size_t errsize)
{
	CURL	   *curl = s->curl;

	if (strcmp(tls, "verify") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
		if (ca_file != NULL && ca_file[0] != '\0')
			curl_easy_setopt(curl, CURLOPT_CAINFO, ca_file);
	}
	else if (strcmp(tls, "require") == 0 || strcmp(tls, "try") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL,
						 (long) (tls[0] == 'r' ? CURLUSESSL_ALL : CURLUSESSL_TRY));
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	else if (strcmp(tls, "off") == 0)
	{
		/* imaps:// is TLS whatever the mode: 'off' would be a lie */
		if (s->implicit_tls)
		{
			set_error(err, errsize, NULL, "tls setting",
					  "tls 'off' cannot be used with an imaps:// URL (use 'verify' or 'require')");
			return false;
		}
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_NONE);
	}
	else
	{
		set_error(err, errsize, NULL, "tls setting",
				  "unknown tls mode (use 'verify', 'require', 'try' or 'off')");
		return false;
	}
	return true;
}

/*
 * run_login: libcurl's part, connect to login, through a multi handle
 * polled every IMAP_POLL_SLICE_MS so that abort_cb is heard at once
 * (curl_easy_perform would check it about once a second).  The handle
 * stays in the multi afterwards: removing it would mark the connection for
 * closing.
 */
static CURLcode
run_login(ImapSession *s)
{
	s->multi = curl_multi_init();
	if (s->multi == NULL || curl_multi_add_handle(s->multi, s->curl) != CURLM_OK)
		return CURLE_OUT_OF_MEMORY;
	for (;;)
	{
		int			running;
		int			queued;
		CURLMsg    *msg;

		if (curl_multi_perform(s->multi, &running) != CURLM_OK)
			return CURLE_FAILED_INIT;
		while ((msg = curl_multi_info_read(s->multi, &queued)) != NULL)
			if (msg->msg == CURLMSG_DONE && msg->easy_handle == s->curl)
				return msg->data.result;
		if (aborted(s))
			return CURLE_ABORTED_BY_CALLBACK;
		if (curl_multi_poll(s->multi, NULL, 0, IMAP_POLL_SLICE_MS, NULL) != CURLM_OK)
			return CURLE_FAILED_INIT;
	}
}

ImapSession *
imap_open(const ImapConfig *cfg, char *err, size_t errsize)
{
	ImapUrl		url;
	ImapSession *s;
	char		curl_url[IMAP_MAX_HOST + 32];
	CURLcode	rc;

	if (err != NULL && errsize > 0)
		err[0] = '\0';
	if (!parse_url(cfg->url, &url, err, errsize))
		return NULL;
	s = calloc(1, sizeof(ImapSession));
	if (s == NULL)
	{
		set_error(err, errsize, NULL, "connect", "out of memory");
		return NULL;
	}
	s->sock = CURL_SOCKET_BAD;
	s->implicit_tls = url.implicit_tls;
	strcpy(s->mailbox, url.mailbox);
	s->timeout_ms = cfg->timeout_ms > 0 ? cfg->timeout_ms : IMAP_DEFAULT_TIMEOUT_MS;
	s->max_message = cfg->max_message_bytes > 0 ? cfg->max_message_bytes
		: IMAP_DEFAULT_MAX_MESSAGE_BYTES;
	if (s->max_message > SIZE_MAX / 4)
		s->max_message = SIZE_MAX / 4;
	s->abort_cb = cfg->abort_cb;
	s->abort_arg = cfg->abort_arg;
	s->connect_timeout_ms = cfg->connect_timeout_ms > 0 ? cfg->connect_timeout_ms
		: IMAP_DEFAULT_CONNECT_TIMEOUT_MS;
	if (cfg->password != NULL && (s->password = strdup(cfg->password)) == NULL)
	{
		set_error(err, errsize, NULL, "connect", "out of memory");
		imap_close(s);
		return NULL;
	}
	s->curl = curl_easy_init();
	if (s->curl == NULL)
	{
		set_error(err, errsize, NULL, "connect", "could not create a libcurl handle");
		imap_close(s);
		return NULL;
	}
	if (!configure_tls(s, cfg->tls ? cfg->tls : "verify", cfg->ca_file, err, errsize))
	{
		imap_close(s);
		return NULL;
	}

	/* libcurl gets no mailbox: it only logs in, the rest is ours */
	snprintf(curl_url, sizeof(curl_url), "%s://%s:%ld/", url.implicit_tls ? "imaps" : "imap",
			 url.host, url.port);
	curl_easy_setopt(s->curl, CURLOPT_URL, curl_url);
	/* nothing but IMAP may ever be spoken, whatever the URL says */
	curl_easy_setopt(s->curl, CURLOPT_PROTOCOLS_STR, "imap,imaps");
	curl_easy_setopt(s->curl, CURLOPT_REDIR_PROTOCOLS_STR, "imap,imaps");
	curl_easy_setopt(s->curl, CURLOPT_CONNECT_ONLY, 1L);
	curl_easy_setopt(s->curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(s->curl, CURLOPT_TCP_KEEPALIVE, 1L);
	curl_easy_setopt(s->curl, CURLOPT_CONNECTTIMEOUT_MS, s->connect_timeout_ms);
	curl_easy_setopt(s->curl, CURLOPT_TIMEOUT_MS, s->connect_timeout_ms);
	curl_easy_setopt(s->curl, CURLOPT_ERRORBUFFER, s->curl_err);
	/* the debug callback sees the dialogue; it keeps the server's lines only */
	curl_easy_setopt(s->curl, CURLOPT_VERBOSE, 1L);
	curl_easy_setopt(s->curl, CURLOPT_DEBUGFUNCTION, debug_cb);
	curl_easy_setopt(s->curl, CURLOPT_DEBUGDATA, s);
	if (cfg->username != NULL)
	{
		curl_easy_setopt(s->curl, CURLOPT_USERNAME, cfg->username);
		curl_easy_setopt(s->curl, CURLOPT_PASSWORD, cfg->password ? cfg->password : "");
	}

	rc = run_login(s);
	curl_easy_setopt(s->curl, CURLOPT_VERBOSE, 0L);
	if (rc != CURLE_OK)
	{
		login_error(s, rc, err, errsize);
		s->broken = true;
		imap_close(s);
		return NULL;
	}
	if (curl_easy_getinfo(s->curl, CURLINFO_ACTIVESOCKET, &s->sock) != CURLE_OK ||
		s->sock == CURL_SOCKET_BAD)
	{
		set_error(err, errsize, s->password, "connect", "libcurl kept no connection");
		s->broken = true;
		imap_close(s);
		return NULL;
	}
	if (!select_mailbox(s, err, errsize))
	{
		imap_close(s);
		return NULL;
	}
	return s;
}

void
imap_close(ImapSession *session)
{
	if (session == NULL)
		return;
	if (session->curl != NULL && session->sock != CURL_SOCKET_BAD)
	{
		if (!session->broken)
		{
			char		ignored[256];

			session->logging_out = true;
			if (session->timeout_ms > IMAP_LOGOUT_TIMEOUT_MS)
				session->timeout_ms = IMAP_LOGOUT_TIMEOUT_MS;
			run_command(session, "logout", "LOGOUT", NULL, NULL, ignored, sizeof(ignored));
		}

		/*
		 * Whatever libcurl would still say or wait for on this connection,
		 * it finds it shut down and gives up at once.
		 */
		shutdown(session->sock, SHUT_RDWR);
	}
	if (session->multi != NULL)
	{
		if (session->curl != NULL)
			curl_multi_remove_handle(session->multi, session->curl);
		curl_multi_cleanup(session->multi);
	}
	if (session->curl != NULL)
		curl_easy_cleanup(session->curl);
	if (session->password != NULL)
	{
		explicit_bzero(session->password, strlen(session->password));
		free(session->password);
	}
	free(session->rbuf);
	free(session);
}

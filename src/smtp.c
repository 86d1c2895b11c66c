/*-------------------------------------------------------------------------
 *
 * smtp.c
 *	  The SMTP transport: sends each message, built whole by mime.c (text,
 *	  plus HTML as multipart/alternative, plus files), over a connection
 *	  that is kept open between messages, and classifies the outcome.
 *
 * libcurl sets each connection up (connect, greeting, EHLO, STARTTLS with
 * the channel's checks, AUTH: CURLOPT_CONNECT_ONLY) and carries the bytes
 * (curl_easy_send/recv, through TLS when there is TLS).  The mail
 * transaction itself (MAIL FROM, RCPT TO, DATA, the data, the final dot)
 * is spoken here, with PIPELINING (RFC 2920) when the server offers it:
 * the three envelope commands go in one write and their replies come back
 * in one read, and the data in a second write.  libcurl's own SMTP upload
 * sends each command apart and waits for each reply: 18 system calls per
 * message against 5 to 7 here, and system calls are most of what sending
 * costs (test/bench/delivery.py).
 *
 * Header values never reach libcurl unchecked: addresses are validated
 * (libcurl would pass CR/LF in MAIL FROM/RCPT TO straight to the server),
 * subjects and display names are RFC 2047-encoded by mime.c, and bodies
 * are normalised to CRLF so that business data cannot end the DATA phase.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <ctype.h>
#include <curl/curl.h>
#include <sys/socket.h>
#include <poll.h>
#include <unistd.h>
#include <time.h>

#include "common/hashfn.h"
#include "common/pg_prng.h"
#include "miscadmin.h"
#include "lib/stringinfo.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "notify_ext.h"

#include "mime.h"
#include "smtp.h"

/* test_smtp's bound on the whole dialogue: it must never hang a session. */
#define SMTP_TEST_TOTAL_TIMEOUT_MS 120000L
#define SMTP_CONNECT_TIMEOUT_MS 10000L
/* transfers a pool may drive at once (the worker uses one) */
#define SMTP_POOL_MAX 8
/* open connections a pool keeps while idle: one per channel, for a few channels */
#define SMTP_POOL_IDLE_CONNECTIONS 4
#define SMTP_CLIENT_SOCKETS 8
/* an idle connection older than this is closed rather than reused */
#define SMTP_IDLE_MAX_MS 60000
/* an idle connection is checked for a server's goodbye before reuse after this */
#define SMTP_IDLE_CHECK_MS 200

/* where a pooled connection is */
typedef enum SessionState
{
	SESSION_CLOSED,
	SESSION_CONNECTING,			/* libcurl sets it up (connect-only transfer) */
	SESSION_OPEN				/* set up: mail transactions are ours */
} SessionState;

/* where a pooled transfer is */
typedef enum TransferPhase
{
	PHASE_CONNECT,				/* waiting for the connection's set-up */
	PHASE_ENVELOPE,				/* MAIL FROM, RCPT TO, DATA sent: their replies */
	PHASE_DATA,					/* the data and the final dot sent: the last reply */
	PHASE_RSET					/* the envelope refused: RSET's reply, then done */
} TransferPhase;

/*
 * One libcurl handle and what one transfer on it needs.  The worker keeps
 * a pool of these; test_smtp makes one for its dialogue.
 */
struct SmtpClient
{
	SmtpConfig	cfg;			/* the channel of the current transfer */
	bool		owns_cfg;		/* cfg's strings are this client's copies */
	CURL	   *curl;
	char		last_reply[512];	/* the server's last reply line */
	int			last_code;		/* its code, 0 before any reply of this transfer */
	bool		envelope_phase; /* the session is set up: MAIL FROM comes next */
	bool		quitting;		/* QUIT sent: its 221 is not the answer we log */
	StringInfo	transcript;		/* test_smtp: the dialogue, credentials hidden */
	bool		in_auth;		/* between AUTH and its final reply */

	/*
	 * The transfer in progress.  Everything it writes or reads lives here
	 * or in the client's own contexts, never in the caller's memory: a
	 * transfer abandoned when the worker's round failed must not write into
	 * a context the next round reuses.
	 */
	bool		busy;
	int64		tag;			/* the caller's name for the transfer (a message id) */
	SendResult	result;
	MemoryContext cfg_cxt;		/* the channel's settings, copied; reset per transfer */
	MemoryContext message_cxt;	/* the message being sent; reset per transfer */
	char	   *message;		/* headers and body, CRLF lines, as after DATA */
	size_t		message_len;
	size_t		message_pos;	/* how much of it libcurl has read */
	struct curl_slist *rcpt;
	char		curl_err[CURL_ERROR_SIZE];
	bool		body_done;		/* the server said 354: the data, then the final dot */
	bool		reply_after_body;	/* the server answered the final dot */
	curl_off_t	last_ul;
	/* the sockets libcurl opened through this handle and has not closed */
	curl_socket_t sockets[SMTP_CLIENT_SOCKETS];
	int			nsockets;
	TimestampTz last_activity;
	TimestampTz body_done_at;

	/*
	 * A pooled client's connection, its own: opened with the settings of
	 * session_key (scheme, host, port, TLS mode, login, CA file), never used
	 * for a transfer with other settings.
	 */
	CURLM	   *multi;			/* drives the set-up */
	SessionState state;
	char		session_key[1024];
	bool		pipelining;		/* EHLO offered PIPELINING */
	bool		size_ext;		/* EHLO offered SIZE */
	bool		tls;			/* bytes may wait in the TLS layer: read before polling */
	curl_socket_t fd;
	TimestampTz idle_since;
	bool		reused;			/* the transfer's connection was open before it */

	/* the transfer's mail transaction */
	TransferPhase phase;
	char	   *mail_from;		/* "<...>", in message_cxt */
	char	   *data;			/* dot-stuffed, with the final dot (message_cxt) */
	size_t		data_len;
	char	   *out;			/* what is to be written (message_cxt) */
	size_t		out_len;
	size_t		out_pos;
	char		in[4096];		/* what was read and not yet taken as replies */
	size_t		in_len;
	bool		readable;		/* poll said so; a plain socket is read only then */
	int			step;			/* the envelope reply expected next: MAIL, RCPT, DATA */
	int			expect;			/* replies expected for what was written */
	int			replies;		/* replies read in this transfer */
	int			fail_code;		/* the first refusal of this transaction */
	char		fail_line[512];
	const char *fail_what;
	short		want;			/* POLLIN or POLLOUT: what the transfer waits for */

	/*
	 * The next transfer, pipelined behind this one on the same connection
	 * (RFC 2920: the data may begin a group): its envelope goes in the same
	 * write as this one's data, so that a message costs one round trip.
	 * Built in next_cxt with its own copy of the channel's settings; it
	 * becomes the transfer when this one ends (transfer_advance).
	 */
	bool		has_next;
	bool		next_sent;		/* its envelope is written (or queued) */
	int64		next_tag;
	SmtpConfig	next_cfg;
	MemoryContext next_cxt;
	MemoryContext next_cfg_cxt;
	char	   *next_data;
	size_t		next_data_len;
	char	   *next_mail_from;
	struct curl_slist *next_rcpt;
};

typedef struct SmtpClient SmtpClient;

struct SmtpPool
{
	int			nclients;
	SmtpClient *clients[SMTP_POOL_MAX];
	int			active;
	int			ndone;
	/* finished transfers not yet collected: their tags and results */
	int64		done_tag[2 * SMTP_POOL_MAX];
	SendResult	done_result[2 * SMTP_POOL_MAX];
};

static void record_transcript(SmtpClient *client, curl_infotype type, const char *data, size_t size);
static void release_transfer(SmtpClient *client);

/* smtp_global_init: libcurl's process-wide setup, once, in the worker. */
void
smtp_global_init(void)
{
	static bool done = false;

	if (done)
		return;
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("notify_ext: could not initialise libcurl")));
	done = true;
}

/* dup_or_null: a TopMemoryContext copy. */
static char *
dup_or_null(const char *s)
{
	return s ? MemoryContextStrdup(TopMemoryContext, s) : NULL;
}

/*
 * note_reply: a reply line from the server.  Keeps the last one, which is
 * what the log shows as smtp_response ("250 2.0.0 Ok: queued as 4XyZ"),
 * and follows the DATA phase: after 354, the next reply answers the final
 * dot.
 */
static void
note_reply(SmtpClient *client, const char *data, size_t size)
{
	size_t		n;

	if (size == 0 || client->quitting)
		return;
	if (client->body_done)
		client->reply_after_body = true;
	else if (size >= 4 && strncmp(data, "354", 3) == 0)
	{
		/* the server takes the data: from now on, a silence leaves the outcome unknown */
		client->body_done = true;
		client->body_done_at = client->last_activity;
	}
	if (size >= 3 && isdigit((unsigned char) data[0]) && isdigit((unsigned char) data[1]) &&
		isdigit((unsigned char) data[2]))
		client->last_code = (data[0] - '0') * 100 + (data[1] - '0') * 10 + (data[2] - '0');
	/* a multi-line reply arrives line by line; keep the last one */
	n = Min(size, sizeof(client->last_reply) - 1);
	memcpy(client->last_reply, data, n);
	client->last_reply[n] = '\0';
	while (n > 0 && (client->last_reply[n - 1] == '\r' || client->last_reply[n - 1] == '\n'))
		client->last_reply[--n] = '\0';
}

/*
 * note_capability: what the (last) EHLO reply offers that the mail
 * transaction uses.  A greeting, or STARTTLS's 220, comes before an EHLO
 * whose reply replaces what was known.
 */
static void
note_capability(SmtpClient *client, const char *data, size_t size)
{
	if (size >= 3 && strncmp(data, "220", 3) == 0)
	{
		client->pipelining = false;
		client->size_ext = false;
	}
	else if (size >= 14 && strncmp(data, "250", 3) == 0 && (data[3] == '-' || data[3] == ' '))
	{
		const char *kw = data + 4;
		size_t		left = size - 4;

		if (left >= 10 && pg_strncasecmp(kw, "PIPELINING", 10) == 0 &&
			(left == 10 || kw[10] == '\r' || kw[10] == '\n' || kw[10] == ' '))
			client->pipelining = true;
	}
	if (size >= 8 && strncmp(data, "250", 3) == 0 && (data[3] == '-' || data[3] == ' ') &&
		pg_strncasecmp(data + 4, "SIZE", 4) == 0 &&
		(size == 8 || data[8] == '\r' || data[8] == '\n' || data[8] == ' '))
		client->size_ext = true;
}

/*
 * header_cb: the server's reply lines, as libcurl hands them to a header
 * callback.  The worker's transfers use this, not VERBOSE: libcurl
 * formats its informational messages only for a debug callback (about 14
 * us per message in test/bench/curl_ceiling.c).
 */
static size_t
header_cb(char *data, size_t size, size_t nitems, void *userp)
{
	SmtpClient *client = (SmtpClient *) userp;
	size_t		n = size * nitems;

	client->last_activity = GetCurrentTimestamp();
	/* 221 only ever answers QUIT, which is not the reply we log */
	if (n >= 3 && strncmp(data, "221", 3) == 0)
		client->quitting = true;
	note_capability(client, data, n);
	note_reply(client, data, n);
	return n;
}

/*
 * debug_cb: test_smtp's view of the dialogue (VERBOSE): the transcript,
 * and the reply lines as header_cb takes them.
 */
static int
debug_cb(CURL *handle, curl_infotype type, char *data, size_t size, void *userp)
{
	SmtpClient *client = (SmtpClient *) userp;

	client->last_activity = GetCurrentTimestamp();
	if (type == CURLINFO_HEADER_OUT && size >= 4 && pg_strncasecmp(data, "QUIT", 4) == 0)
		client->quitting = true;
	if (client->transcript != NULL)
		record_transcript(client, type, data, size);
	if (type == CURLINFO_HEADER_IN)
		note_reply(client, data, size);
	return 0;
}

/*
 * record_transcript: test_smtp's step-by-step report.  What we send during
 * AUTH (user name and password, however encoded) is never written: only
 * that credentials were sent.
 */
static void
record_transcript(SmtpClient *client, curl_infotype type, const char *data, size_t size)
{
	StringInfo	t = client->transcript;
	size_t		n = size;

	while (n > 0 && (data[n - 1] == '\r' || data[n - 1] == '\n'))
		n--;
	if (n == 0)
		return;
	/* what the server says goes into a text value: valid, one line */
	data = notify_clean_text(data, n, 1000);
	n = strlen(data);
	switch (type)
	{
		case CURLINFO_TEXT:
			appendStringInfo(t, "* %.*s\n", (int) n, data);
			break;
		case CURLINFO_HEADER_IN:
			appendStringInfo(t, "< %.*s\n", (int) n, data);
			/* the server's answer to AUTH ends the credentials exchange */
			if (client->in_auth && n >= 4 && data[3] == ' ' && data[0] != '3')
				client->in_auth = false;
			break;
		case CURLINFO_HEADER_OUT:
			if (n >= 4 && pg_strncasecmp(data, "AUTH", 4) == 0)
			{
				const char *sp = memchr(data + 5, ' ', n > 5 ? n - 5 : 0);

				client->in_auth = true;
				appendStringInfo(t, "> %.*s (credentials hidden)\n",
								 (int) (sp ? sp - data : (long) n), data);
			}
			else if (client->in_auth)
				appendStringInfoString(t, "> (credentials hidden)\n");
			else
				appendStringInfo(t, "> %.*s\n", (int) n, data);
			break;
		default:
			break;
	}
}

/*
 * progress_cb: notes upload progress as activity, and aborts a transfer
 * when the worker is told to stop or test_smtp's query is cancelled.
 */
static int
progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	SmtpClient *client = (SmtpClient *) clientp;

	if (ulnow > client->last_ul)
	{
		client->last_ul = ulnow;
		client->last_activity = GetCurrentTimestamp();
	}
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/*
 * open_socket_cb, close_socket_cb: libcurl opens and closes its sockets
 * through these, so that the client knows them.  A transfer given up before
 * it ends (a deadline, the worker's round failing) has its connection shut
 * down first: libcurl then sees it dead at once, where it would otherwise
 * say QUIT and wait for the reply (up to notify.smtp_data_timeout) from a
 * server that may never answer.
 */
static curl_socket_t
open_socket_cb(void *clientp, curlsocktype purpose, struct curl_sockaddr *address)
{
	SmtpClient *client = (SmtpClient *) clientp;
	curl_socket_t fd = socket(address->family, address->socktype, address->protocol);

	if (fd != CURL_SOCKET_BAD && client->nsockets < SMTP_CLIENT_SOCKETS)
		client->sockets[client->nsockets++] = fd;
	return fd;
}

static int
close_socket_cb(void *clientp, curl_socket_t fd)
{
	SmtpClient *client = (SmtpClient *) clientp;

	for (int i = 0; i < client->nsockets; i++)
		if (client->sockets[i] == fd)
		{
			client->sockets[i] = client->sockets[--client->nsockets];
			break;
		}
	return close(fd);
}

/*
 * prereq_cb: libcurl is about to send the request proper (for SMTP, MAIL
 * FROM) on a connection that is set up (greeted, EHLO, TLS, AUTH) or
 * reused: from now on a refusal is about the message.
 */
static int
prereq_cb(void *clientp, char *conn_primary_ip, char *conn_local_ip, int conn_primary_port,
		  int conn_local_port)
{
	((SmtpClient *) clientp)->envelope_phase = true;
	return CURL_PREREQFUNC_OK;
}

/* client_new_handle: a fresh libcurl handle for the client, its sockets known to it. */
static void
client_new_handle(SmtpClient *client)
{
	client->curl = curl_easy_init();
	if (client->curl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("notify_ext: could not create a libcurl handle")));
	curl_easy_setopt(client->curl, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
	curl_easy_setopt(client->curl, CURLOPT_OPENSOCKETDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
	curl_easy_setopt(client->curl, CURLOPT_CLOSESOCKETDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_PREREQFUNCTION, prereq_cb);
	curl_easy_setopt(client->curl, CURLOPT_PREREQDATA, client);
}

/* client_create: a client; it connects on its first transfer. */
static SmtpClient *
client_create(void)
{
	SmtpClient *client = MemoryContextAllocZero(TopMemoryContext, sizeof(SmtpClient));

	client->fd = CURL_SOCKET_BAD;
	client->message_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP message",
												ALLOCSET_DEFAULT_SIZES);
	client->cfg_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP channel",
											ALLOCSET_SMALL_SIZES);
	client->next_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP message",
											 ALLOCSET_DEFAULT_SIZES);
	client->next_cfg_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP channel",
												 ALLOCSET_SMALL_SIZES);
	client_new_handle(client);
	return client;
}

/* client_destroy: close the handle and forget any copied secret. */
static void
client_destroy(SmtpClient *client)
{
	if (client == NULL)
		return;
	if (client->curl && client->multi)
		curl_multi_remove_handle(client->multi, client->curl);
	if (client->curl)
		curl_easy_cleanup(client->curl);
	if (client->multi)
		curl_multi_cleanup(client->multi);
	if (client->owns_cfg && client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	if (client->message_cxt)
		MemoryContextDelete(client->message_cxt);
	if (client->next_cxt)
		MemoryContextDelete(client->next_cxt);
	if (client->next_cfg_cxt)
	{
		if (client->next_cfg.password)
			explicit_bzero(client->next_cfg.password, strlen(client->next_cfg.password));
		MemoryContextDelete(client->next_cfg_cxt);
	}
	if (client->cfg_cxt)
	{
		if (!client->owns_cfg && client->cfg.password)
			explicit_bzero(client->cfg.password, strlen(client->cfg.password));
		MemoryContextDelete(client->cfg_cxt);
	}
	pfree(client);
}

/*
 * set_common_options: protocol restriction, TLS mode, credentials,
 * timeouts.  A pooled transfer is bounded by the pool's own per-step
 * deadlines (see pool_check_deadlines); test_smtp's by a total timeout.
 */
static void
set_common_options(SmtpClient *client, bool pooled)
{
	CURL	   *curl = client->curl;
	const char *tls = client->cfg.tls ? client->cfg.tls : "verify";

	curl_easy_setopt(curl, CURLOPT_URL, client->cfg.url);
	/* nothing but SMTP may ever be spoken, whatever the URL says */
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, SMTP_CONNECT_TIMEOUT_MS);
	if (pooled)
	{
		curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, 0L);

		/*
		 * libcurl reads the reply to the final dot in a blocking call where
		 * the pool's deadlines cannot act (curl issue 8555): this bounds it.
		 * Every other step is bounded by pool_check_deadlines.
		 */
		curl_easy_setopt(curl, CURLOPT_SERVER_RESPONSE_TIMEOUT, (long) notify_smtp_data_timeout);
	}
	else
	{
		curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, SMTP_TEST_TOTAL_TIMEOUT_MS);
		curl_easy_setopt(curl, CURLOPT_SERVER_RESPONSE_TIMEOUT, (long) notify_smtp_timeout);
	}
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, progress_cb);
	curl_easy_setopt(curl, CURLOPT_XFERINFODATA, client);
	if (client->transcript != NULL)
	{
		/* one or the other: both would see every reply line twice */
		curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, NULL);
		curl_easy_setopt(curl, CURLOPT_HEADERDATA, NULL);
		curl_easy_setopt(curl, CURLOPT_VERBOSE, 1L);
		curl_easy_setopt(curl, CURLOPT_DEBUGFUNCTION, debug_cb);
		curl_easy_setopt(curl, CURLOPT_DEBUGDATA, client);
	}
	else
	{
		curl_easy_setopt(curl, CURLOPT_VERBOSE, 0L);
		curl_easy_setopt(curl, CURLOPT_HEADERFUNCTION, header_cb);
		curl_easy_setopt(curl, CURLOPT_HEADERDATA, client);
	}

	/*
	 * 'verify' and 'require' fail closed: CURLUSESSL_ALL makes libcurl give
	 * up when STARTTLS is not offered or is refused, before any AUTH or
	 * envelope command is sent in clear text.
	 */
	if (strcmp(tls, "verify") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
		curl_easy_setopt(curl, CURLOPT_CAINFO,
						 (notify_tls_ca_file && notify_tls_ca_file[0]) ? notify_tls_ca_file : NULL);
	}
	else if (strcmp(tls, "require") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	else if (strcmp(tls, "try") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_TRY);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 0L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 0L);
	}
	else
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_NONE);

	if (client->cfg.username != NULL)
	{
		curl_easy_setopt(curl, CURLOPT_USERNAME, client->cfg.username);
		curl_easy_setopt(curl, CURLOPT_PASSWORD, client->cfg.password ? client->cfg.password : "");
	}
	else
	{
		curl_easy_setopt(curl, CURLOPT_USERNAME, NULL);
		curl_easy_setopt(curl, CURLOPT_PASSWORD, NULL);
	}
}

/* read_cb: libcurl reads the message being sent from here. */
static size_t
read_cb(char *buffer, size_t size, size_t nitems, void *userp)
{
	SmtpClient *client = (SmtpClient *) userp;
	size_t		n = Min(size * nitems, client->message_len - client->message_pos);

	memcpy(buffer, client->message + client->message_pos, n);
	client->message_pos += n;
	return n;
}

/*
 * boundary_token: a token for this message's MIME boundaries.  mime.c's
 * boundaries cannot occur in its encoded parts; the token only keeps them
 * apart from anything a reader might paste, and from other messages'.
 */
static void
boundary_token(char *buf, size_t size, int64 message_id)
{
	snprintf(buf, size, "%llx%08x", (long long) message_id, (unsigned) pg_prng_uint32(&pg_global_prng_state));
}

/*
 * clean_result_text: a result's text as a text column can hold it (valid
 * in the database's encoding, one line): a server's reply may be cut in
 * the middle of a character, or not be UTF-8 at all.
 */
static void
clean_result_text(char *buf, size_t size)
{
	char	   *clean = notify_clean_text(buf, strlen(buf), size - 1);

	strlcpy(buf, clean, size);
	pfree(clean);
}

/* fail_result: fill a result for a message that cannot be sent as it is. */
static void
fail_result(SendResult *result, SendOutcome outcome, const char *fmt, const char *detail)
{
	result->outcome = outcome;
	snprintf(result->error, sizeof(result->error), fmt, detail);
	clean_result_text(result->error, sizeof(result->error));
}

/*
 * reset_transfer: a client's state for a new transfer (its message is
 * built by build_message).
 */
static void
reset_transfer(SmtpClient *client)
{
	memset(&client->result, 0, sizeof(client->result));
	client->last_reply[0] = '\0';
	client->last_code = 0;
	client->envelope_phase = false;
	client->quitting = false;
	client->curl_err[0] = '\0';
	client->body_done = false;
	client->reply_after_body = false;
	client->last_ul = 0;
	client->last_activity = GetCurrentTimestamp();
	client->rcpt = NULL;
	client->message = NULL;
	client->mail_from = NULL;
}

/*
 * build_message: one message to send over a channel (cfg): its bytes
 * (*message, *message_len) and its envelope sender (*mail_from), in cxt
 * (which is reset first).  Everything that could smuggle a header or a
 * command is checked first; returns false, with *result filled, when the
 * message can never be sent as it is.
 */
static bool
build_message(const SmtpConfig *cfg, const OutMessage *msg, MemoryContext cxt, SendResult *result,
			  char **message, size_t *message_len, char **mail_from)
{
	char		errbuf[256];
	char		datebuf[64];
	char		idbuf[320];
	char	   *to_header;
	char	   *subject;
	char	   *from_header;
	char		token[48];
	StringInfo	headers;
	MimeAttachment *attachments;
	MemoryContext old;

	memset(result, 0, sizeof(*result));
	*message = NULL;
	*mail_from = NULL;
	if (!mime_check_address(msg->address, errbuf, sizeof(errbuf)))
	{
		fail_result(result, SEND_FAILED, "%s", errbuf);
		return false;
	}
	to_header = mime_format_mailbox(msg->display_name, msg->address, errbuf, sizeof(errbuf));
	if (to_header == NULL)
	{
		fail_result(result, SEND_FAILED, "To header: %s", errbuf);
		return false;
	}
	from_header = mime_format_mailbox(NULL, cfg->from_address, errbuf, sizeof(errbuf));
	if (from_header == NULL)
	{
		fail_result(result, SEND_CHANNEL, "channel's from_address: %s", errbuf);
		return false;
	}
	subject = mime_encode_header_text(msg->subject ? msg->subject : "",
									  msg->subject ? strlen(msg->subject) : 0,
									  strlen("Subject: "), errbuf, sizeof(errbuf));
	if (subject == NULL)
	{
		fail_result(result, SEND_FAILED, "Subject: %s", errbuf);
		return false;
	}

	/* every line of the message is built here; libcurl only dot-stuffs it */
	headers = makeStringInfo();
	appendStringInfo(headers, "Date: %s\r\n", mime_format_date(time(NULL), datebuf, sizeof(datebuf)));
	appendStringInfo(headers, "From: %s\r\n", from_header);
	appendStringInfo(headers, "To: %s\r\n", to_header);
	appendStringInfo(headers, "Subject: %s\r\n", subject);
	/* the database's token makes it unique across databases and clusters (identity.c) */
	appendStringInfo(headers, "Message-ID: %s\r\n",
					 mime_message_id(notify_database_token()[0]
									 ? psprintf("%s.%s", msg->id_kind ? msg->id_kind : "notify.message", notify_database_token())
									 : (msg->id_kind ? msg->id_kind : "notify.message"),
									 msg->id, mime_domain_of(cfg->from_address),
									 idbuf, sizeof(idbuf)));
	/* RFC 3834: tells auto-responders not to answer a machine */
	appendStringInfoString(headers, "Auto-Submitted: auto-generated\r\n");

	attachments = palloc0(sizeof(MimeAttachment) * Max(msg->nattachments, 1));
	for (int i = 0; i < msg->nattachments; i++)
	{
		const OutAttachment *att = &msg->attachments[i];
		char	   *param = mime_encode_filename(att->filename, errbuf, sizeof(errbuf));

		if (param == NULL || !mime_header_value_safe(att->content_type, strlen(att->content_type)))
		{
			fail_result(result, SEND_FAILED, "attachment: %s",
						param == NULL ? errbuf : "content type contains control characters");
			return false;
		}
		/* RFC 2231 file name: non-ASCII names survive, quotes and paths cannot break out */
		attachments[i].filename_param = param;
		attachments[i].content_type = att->content_type;
		attachments[i].data = att->data;
		attachments[i].len = att->len;
	}

	boundary_token(token, sizeof(token), msg->id);
	MemoryContextReset(cxt);
	old = MemoryContextSwitchTo(cxt);
	*message = mime_build_message(headers->data, msg->text_body ? msg->text_body : "",
										 msg->html_body, attachments, msg->nattachments, token,
										 message_len, errbuf, sizeof(errbuf));
	MemoryContextSwitchTo(old);
	if (*message == NULL)
	{
		fail_result(result, SEND_RETRY, "could not build the message: %s", errbuf);
		return false;
	}

	/*
	 * The envelope sender names the message (VERP, see bounce.c), so that
	 * its bounce can be matched whatever a relay does to the headers; the
	 * From: header above stays the channel's from_address.
	 */
	*mail_from = MemoryContextStrdup(cxt,
											psprintf("<%s>", bounce_envelope_sender(cfg->bounce_address ? cfg->bounce_address
																					: cfg->from_address,
																					msg->id, msg->id_kind != NULL)));
	return true;
}

/*
 * prepare_transfer: test_smtp's message, as a libcurl SMTP upload on the
 * client's handle; false (result filled) when it cannot be sent as it is.
 */
static bool
prepare_transfer(SmtpClient *client, const OutMessage *msg, bool pooled)
{
	reset_transfer(client);
	client->message_pos = 0;
	if (!build_message(&client->cfg, msg, client->message_cxt, &client->result,
					   &client->message, &client->message_len, &client->mail_from))
		return false;
	client->rcpt = curl_slist_append(client->rcpt, psprintf("<%s>", msg->address));

	set_common_options(client, pooled);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, client->curl_err);
	curl_easy_setopt(client->curl, CURLOPT_MAIL_FROM, client->mail_from);
	curl_easy_setopt(client->curl, CURLOPT_MAIL_RCPT, client->rcpt);
	curl_easy_setopt(client->curl, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(client->curl, CURLOPT_READFUNCTION, read_cb);
	curl_easy_setopt(client->curl, CURLOPT_READDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t) client->message_len);
	return true;
}

/* release_next: forget the transfer chained behind (the worker's round failed). */
static void
release_next(SmtpClient *client)
{
	curl_slist_free_all(client->next_rcpt);
	client->next_rcpt = NULL;
	client->next_data = NULL;
	client->next_mail_from = NULL;
	client->has_next = false;
	client->next_sent = false;
	MemoryContextReset(client->next_cxt);
}

/* release_transfer: the handle must not keep pointers to what is freed here. */
static void
release_transfer(SmtpClient *client)
{
	curl_easy_setopt(client->curl, CURLOPT_UPLOAD, 0L);
	curl_easy_setopt(client->curl, CURLOPT_READDATA, NULL);
	curl_easy_setopt(client->curl, CURLOPT_MAIL_RCPT, NULL);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, NULL);
	curl_slist_free_all(client->rcpt);
	client->rcpt = NULL;
	client->message = NULL;
	client->message_len = client->message_pos = 0;
	client->data = NULL;
	client->mail_from = NULL;
	client->out = NULL;
	client->out_len = client->out_pos = 0;
	MemoryContextReset(client->message_cxt);
}

/*
 * finish_transfer: classify what became of a transfer.  Never raises for
 * what the server or the network did: sent; permanently failed (5xx);
 * unknown (no answer to the final dot: the server may have the message);
 * or to be retried (4xx, no connection, timeout, a refused login).
 * `why`, when given, overrides libcurl's own error text.
 */
static void
classify_transfer(SmtpClient *client, CURLcode res, const char *why)
{
	SendResult *result = &client->result;
	const char *line = client->last_reply;
	int			code = client->last_code;
	char		err[CURL_ERROR_SIZE + 64];

	strlcpy(err, why ? why : (client->curl_err[0] ? client->curl_err : curl_easy_strerror(res)),
			sizeof(err));
	/* libcurl ends some messages with a period: the text goes on after it */
	if (strlen(err) > 0 && err[strlen(err) - 1] == '.')
		err[strlen(err) - 1] = '\0';
	release_transfer(client);

	/* the worker stops (or test_smtp's query was cancelled): no word on the message or the channel */
	result->aborted = (res == CURLE_ABORTED_BY_CALLBACK);
	if (res == CURLE_OK)
	{
		result->outcome = SEND_SENT;
		result->code = code;
		strlcpy(result->response, line, sizeof(result->response));
		return;
	}
	if (client->body_done && !client->reply_after_body)
	{
		/* the relay went silent after the data: the channel's trouble, and maybe a duplicate */
		result->outcome = SEND_UNKNOWN;
		snprintf(result->error, sizeof(result->error),
				 "unknown outcome: the message's data was sent but no reply to its end came (%s); "
				 "the server may have accepted it, so the retry may deliver it twice with the same Message-ID",
				 err);
		return;
	}

	/*
	 * A reply to MAIL, RCPT, DATA or the final dot (the envelope phase:
	 * libcurl calls prereq_cb once the session is set up, reused or new) is
	 * the server's word on this message: 5xx fails it, 4xx retries it, and
	 * either spends an attempt.  Anything else is the channel's: no
	 * connection, a bad greeting, EHLO, STARTTLS, TLS, a refused login, the
	 * connection lost, a silence, 421 ("service not available", at any
	 * step), or 530 ("authentication required", RFC 4954: the channel's
	 * settings are wrong).  Its messages wait without spending attempts.
	 * Only a reply that refused is quoted: after a TLS failure, the last
	 * reply was the 250 of EHLO, which is not what happened.
	 */
	if (client->envelope_phase && code >= 400 && code < 600 && code != 421 && code != 530)
	{
		result->outcome = code >= 500 ? SEND_FAILED : SEND_RETRY;
		result->code = code;
		strlcpy(result->response, line, sizeof(result->response));
		snprintf(result->error, sizeof(result->error), "%s; server said: %s", err, line);
		return;
	}
	result->outcome = SEND_CHANNEL;
	if (code >= 400)
	{
		result->code = code;
		strlcpy(result->response, line, sizeof(result->response));
	}
	if (code == 530)
		snprintf(result->error, sizeof(result->error),
				 "the server requires authentication%s; server said: %s",
				 client->cfg.username ? " and did not offer AUTH on this connection (check the channel's url and tls mode)"
				 : ": set a username and password on the channel",
				 line);
	else if (res == CURLE_USE_SSL_FAILED)
		snprintf(result->error, sizeof(result->error),
				 "%s%s: the channel's tls is '%s', so nothing is sent in clear text (use tls => 'off' only for a trusted relay)",
				 err, code >= 400 ? psprintf("; server said: %s", line) : "",
				 client->cfg.tls ? client->cfg.tls : "verify");
	else
		snprintf(result->error, sizeof(result->error), "%s%s%s",
				 err, code >= 400 ? "; server said: " : "", code >= 400 ? line : "");
}

/* finish_transfer: classify_transfer, then make the texts storable. */
static void
finish_transfer(SmtpClient *client, CURLcode res, const char *why)
{
	classify_transfer(client, res, why);
	clean_result_text(client->result.response, sizeof(client->result.response));
	clean_result_text(client->result.error, sizeof(client->result.error));
}

/* smtp_send_blocking: one message, start to end (test_smtp). */
static void
smtp_send_blocking(SmtpClient *client, const OutMessage *msg, SendResult *result)
{
	CURLcode	res;

	if (prepare_transfer(client, msg, false))
	{
		res = curl_easy_perform(client->curl);
		finish_transfer(client, res, NULL);
	}
	*result = client->result;
}

/* smtp_pool_create: the worker's pool, in TopMemoryContext. */
SmtpPool *
smtp_pool_create(void)
{
	return MemoryContextAllocZero(TopMemoryContext, sizeof(SmtpPool));
}

/*
 * session_key: what a connection was opened with and may be reused for:
 * libcurl's own cache reuses an smtp:// connection for the same host, port
 * and login without comparing TLS settings, so a 'verify' channel could
 * have sent over a connection a 'require' channel to the same relay opened
 * without checking the certificate, or one opened before
 * notify.tls_ca_file changed.  A pooled connection serves exactly one set
 * of settings.
 */
static void
session_key(const SmtpConfig *cfg, char *buf, size_t size)
{
	uint32		pw = cfg->password ? hash_bytes((const unsigned char *) cfg->password, strlen(cfg->password)) : 0;

	snprintf(buf, size, "%s\n%s\n%s\n%08x\n%s", cfg->url, cfg->tls ? cfg->tls : "",
			 cfg->username ? cfg->username : "", pw,
			 (notify_tls_ca_file && notify_tls_ca_file[0]) ? notify_tls_ca_file : "");
}

/* shutdown_connection: the client's connections, shut down (their state is unknown). */
static void
shutdown_connection(SmtpClient *client)
{
	for (int i = 0; i < client->nsockets; i++)
		shutdown(client->sockets[i], SHUT_RDWR);
}

/*
 * session_close: close a client's connection.  An idle one in good order
 * says QUIT first (not waiting for the reply); any other is shut down,
 * its state unknown.  The client gets a fresh handle for its next one.
 */
static void
session_close(SmtpClient *client, bool polite)
{
	if (client->state == SESSION_CLOSED)
		return;
	if (polite && client->state == SESSION_OPEN)
	{
		size_t		n = 0;

		(void) curl_easy_send(client->curl, "QUIT\r\n", 6, &n);
	}
	shutdown_connection(client);
	if (client->multi)
	{
		curl_multi_remove_handle(client->multi, client->curl);
		curl_multi_cleanup(client->multi);
		client->multi = NULL;
	}
	curl_easy_cleanup(client->curl);
	client->curl = NULL;
	client->state = SESSION_CLOSED;
	client->fd = CURL_SOCKET_BAD;
	client->session_key[0] = '\0';
	client_new_handle(client);
}

/* session_connect: have libcurl set a connection up for the client's channel. */
static bool
session_connect(SmtpClient *client)
{
	CURLMcode	mc;

	client->multi = curl_multi_init();
	if (client->multi == NULL)
	{
		fail_result(&client->result, SEND_RETRY, "libcurl: %s", "could not create a multi handle");
		return false;
	}
	set_common_options(client, true);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, client->curl_err);
	curl_easy_setopt(client->curl, CURLOPT_CONNECT_ONLY, 1L);
	client->pipelining = client->size_ext = false;
	session_key(&client->cfg, client->session_key, sizeof(client->session_key));
	mc = curl_multi_add_handle(client->multi, client->curl);
	if (mc != CURLM_OK)
	{
		fail_result(&client->result, SEND_RETRY, "libcurl: %s", curl_multi_strerror(mc));
		curl_multi_cleanup(client->multi);
		client->multi = NULL;
		return false;
	}
	client->state = SESSION_CONNECTING;
	client->phase = PHASE_CONNECT;
	client->reused = false;
	/* what the set-up's replies say is the channel's, not the message's */
	client->envelope_phase = false;
	client->last_code = 0;
	client->last_reply[0] = '\0';
	client->last_activity = GetCurrentTimestamp();
	return true;
}

/* queue_output: what the transfer writes next (appended to what is unwritten). */
static void
queue_output(SmtpClient *client, const char *data, size_t len, int replies)
{
	if (client->out_pos == client->out_len)
	{
		client->out = (char *) data;
		client->out_len = len;
		client->out_pos = 0;
	}
	else
	{
		size_t		left = client->out_len - client->out_pos;
		char	   *buf = MemoryContextAlloc(client->message_cxt, left + len);

		memcpy(buf, client->out + client->out_pos, left);
		memcpy(buf + left, data, len);
		client->out = buf;
		client->out_len = left + len;
		client->out_pos = 0;
	}
	client->expect += replies;
}

/*
 * envelope_command: MAIL FROM, RCPT TO or DATA (step 0, 1, 2) of a message
 * (its envelope sender, recipient and size on the wire), in cxt.
 */
static char *
envelope_command(SmtpClient *client, int step, const char *mail_from, struct curl_slist *rcpt,
				 size_t data_len, MemoryContext cxt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *cmd;

	if (step == 0)
		cmd = client->size_ext ? psprintf("MAIL FROM:%s SIZE=%zu\r\n", mail_from, data_len)
			: psprintf("MAIL FROM:%s\r\n", mail_from);
	else if (step == 1)
		cmd = psprintf("RCPT TO:%s\r\n", rcpt->data);
	else
		cmd = pstrdup("DATA\r\n");
	MemoryContextSwitchTo(old);
	return cmd;
}

/* envelope_group: the three envelope commands of a message, as one pipelined group, in cxt. */
static char *
envelope_group(SmtpClient *client, const char *mail_from, struct curl_slist *rcpt, size_t data_len,
			   MemoryContext cxt)
{
	char	   *mail = envelope_command(client, 0, mail_from, rcpt, data_len, cxt);
	char	   *to = envelope_command(client, 1, mail_from, rcpt, data_len, cxt);
	MemoryContext old = MemoryContextSwitchTo(cxt);
	char	   *group = psprintf("%s%sDATA\r\n", mail, to);

	MemoryContextSwitchTo(old);
	return group;
}

/* envelope_state: a mail transaction whose envelope replies come next (expect of them written). */
static void
envelope_state(SmtpClient *client, int expect)
{
	client->phase = PHASE_ENVELOPE;
	client->envelope_phase = true;
	client->step = 0;
	client->expect = expect;
	client->replies = 0;
	client->fail_code = 0;
	client->fail_line[0] = '\0';
	client->fail_what = NULL;
}

/*
 * session_begin: the connection is set up: start the mail transaction.
 * With PIPELINING the three envelope commands go at once (RFC 2920: DATA
 * ends the group); without it, one at a time.
 */
static void
session_begin(SmtpClient *client)
{
	envelope_state(client, 0);
	client->out = NULL;
	client->out_len = client->out_pos = 0;
	client->in_len = 0;
	client->last_code = 0;
	client->last_reply[0] = '\0';
	client->body_done = false;
	client->reply_after_body = false;
	client->last_activity = GetCurrentTimestamp();
	if (client->pipelining)
	{
		char	   *all = envelope_group(client, client->mail_from, client->rcpt, client->data_len,
										 client->message_cxt);

		queue_output(client, all, strlen(all), 3);
	}
	else
	{
		char	   *cmd = envelope_command(client, 0, client->mail_from, client->rcpt, client->data_len,
									   client->message_cxt);

		queue_output(client, cmd, strlen(cmd), 1);
	}
}

/*
 * session_reply: one complete reply (its last line, CRLF stripped).
 * Returns false when the transfer is over: client->done_res and done_why
 * then say how, and done_keep whether the connection stays usable.
 */
typedef struct TransferEnd
{
	bool		over;
	CURLcode	res;
	const char *why;
	bool		keep;			/* the connection is in good order */
} TransferEnd;

static void
end_transfer(TransferEnd *end, CURLcode res, const char *why, bool keep)
{
	end->over = true;
	end->res = res;
	end->why = why;
	end->keep = keep;
}

static void
session_reply(SmtpClient *client, int code, const char *line, TransferEnd *end)
{
	static const char *const what[3] = {"MAIL FROM", "RCPT TO", "DATA"};

	client->expect--;
	client->replies++;
	if (client->phase != PHASE_RSET)
		note_reply(client, line, strlen(line));
	if (code == 421)
	{
		/* the server closes the connection: the channel's trouble, whatever the step */
		end_transfer(end, CURLE_WEIRD_SERVER_REPLY, "the server is closing the connection", false);
		return;
	}
	switch (client->phase)
	{
		case PHASE_ENVELOPE:
			{
				int			step = client->step++;
				bool		ok = step < 2 ? (code >= 200 && code < 300) : code == 354;

				if (!ok && client->fail_code == 0)
				{
					client->fail_code = code;
					strlcpy(client->fail_line, line, sizeof(client->fail_line));
					client->fail_what = what[step];
				}
				if (!client->pipelining && ok && step < 2)
				{
					char	   *cmd = envelope_command(client, step + 1, client->mail_from, client->rcpt,
												   client->data_len, client->message_cxt);

					queue_output(client, cmd, strlen(cmd), 1);
					return;
				}
				if (client->expect > 0)
					return;		/* the rest of the pipelined group's replies */
				if (client->fail_code == 0)
				{
					/* 354: the data, dot-stuffed, and the final dot */
					client->phase = PHASE_DATA;
					queue_output(client, client->data, client->data_len, 1);
					/* and, in the same write, the envelope of the message chained behind */
					if (client->has_next && !client->next_sent && client->pipelining)
					{
						char	   *group = envelope_group(client, client->next_mail_from, client->next_rcpt,
														   client->next_data_len, client->next_cxt);

						queue_output(client, group, strlen(group), 0);
						client->next_sent = true;
					}
					return;
				}
				if (code == 354)
				{
					/* DATA taken after a refusal (RFC 2920 says it must not be): give up the connection */
					end_transfer(end, CURLE_SEND_ERROR, psprintf("the server refused %s", client->fail_what), false);
					return;
				}
				/* refused: the transaction is reset, the connection kept */
				client->phase = PHASE_RSET;
				queue_output(client, "RSET\r\n", 6, 1);
				return;
			}
		case PHASE_DATA:
			if (code >= 200 && code < 300)
				end_transfer(end, CURLE_OK, NULL, true);
			else
			{
				client->fail_code = code;
				strlcpy(client->fail_line, line, sizeof(client->fail_line));
				client->fail_what = "the message";
				end_transfer(end, CURLE_SEND_ERROR, "the server refused the message after its data", true);
			}
			return;
		case PHASE_RSET:
			end_transfer(end, CURLE_SEND_ERROR, psprintf("the server refused %s", client->fail_what),
						 code >= 200 && code < 300);
			return;
		case PHASE_CONNECT:
			break;
	}
	end_transfer(end, CURLE_WEIRD_SERVER_REPLY, "a reply nobody asked for", false);
}

/*
 * take_replies: the complete replies in the input buffer, one by one, until
 * the transfer ends or writes again.  A reply is complete at its last line
 * ("250 ..." after any "250-..." lines).
 */
static void
take_replies(SmtpClient *client, TransferEnd *end)
{
	for (;;)
	{
		char	   *nl;
		size_t		len;
		char		line[512];
		int			code;

		if (client->expect <= 0 || client->out_pos < client->out_len)
			return;
		nl = memchr(client->in, '\n', client->in_len);
		if (nl == NULL)
		{
			if (client->in_len == sizeof(client->in))
				end_transfer(end, CURLE_WEIRD_SERVER_REPLY, "a reply line longer than 4 kB", false);
			return;
		}
		len = nl - client->in + 1;
		strlcpy(line, client->in, Min(len, sizeof(line)));
		for (size_t n = strlen(line); n > 0 && (line[n - 1] == '\r' || line[n - 1] == '\n');)
			line[--n] = '\0';
		memmove(client->in, client->in + len, client->in_len - len);
		client->in_len -= len;
		if (strlen(line) < 3 || !isdigit((unsigned char) line[0]) || !isdigit((unsigned char) line[1]) ||
			!isdigit((unsigned char) line[2]))
		{
			end_transfer(end, CURLE_WEIRD_SERVER_REPLY, "the server's reply is not SMTP", false);
			return;
		}
		if (line[3] == '-')
			continue;			/* a multi-line reply goes on */
		code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
		session_reply(client, code, line, end);
		if (end->over)
			return;
	}
}

/*
 * session_io: write what is to be written, read what has come, take the
 * complete replies; until the transfer would wait (client->want says for
 * what) or is over.
 */
static void
session_io(SmtpClient *client, TransferEnd *end)
{
	for (;;)
	{
		CURLcode	rc;
		size_t		n = 0;

		while (client->out_pos < client->out_len)
		{
			rc = curl_easy_send(client->curl, client->out + client->out_pos,
								client->out_len - client->out_pos, &n);
			if (rc == CURLE_AGAIN)
			{
				client->want = POLLOUT;
				return;
			}
			if (rc != CURLE_OK)
			{
				end_transfer(end, rc, psprintf("could not write to the server: %s", curl_easy_strerror(rc)), false);
				return;
			}
			client->out_pos += n;
			client->last_activity = GetCurrentTimestamp();
			/* what was read before this write is not the answer to it */
			client->readable = false;
		}
		take_replies(client, end);
		if (end->over)
			return;
		if (client->out_pos < client->out_len)
			continue;
		if (client->expect <= 0)
		{
			end_transfer(end, CURLE_WEIRD_SERVER_REPLY, "the transfer stalled", false);
			return;
		}
		/* a plain socket is read when poll says so; TLS may hold decrypted bytes already */
		if (!client->tls && !client->readable)
		{
			client->want = POLLIN;
			return;
		}
		rc = curl_easy_recv(client->curl, client->in + client->in_len, sizeof(client->in) - client->in_len, &n);
		if (rc == CURLE_AGAIN)
		{
			client->readable = false;
			client->want = POLLIN;
			return;
		}
		if (rc != CURLE_OK || n == 0)
		{
			end_transfer(end, rc != CURLE_OK ? rc : CURLE_RECV_ERROR,
						 rc != CURLE_OK ? psprintf("could not read from the server: %s", curl_easy_strerror(rc))
						 : "the server closed the connection", false);
			return;
		}
		client->in_len += n;
		client->last_activity = GetCurrentTimestamp();
		if (client->in_len < sizeof(client->in))
			client->readable = false;	/* a short read took what there was */
	}
}

/* session_opened: libcurl has set the connection up; note how it reads. */
static void
session_opened(SmtpClient *client)
{
	struct curl_tlssessioninfo *info = NULL;

	client->state = SESSION_OPEN;
	if (curl_easy_getinfo(client->curl, CURLINFO_ACTIVESOCKET, &client->fd) != CURLE_OK)
		client->fd = CURL_SOCKET_BAD;
	client->tls = !(curl_easy_getinfo(client->curl, CURLINFO_TLS_SSL_PTR, &info) == CURLE_OK &&
					info != NULL && (info->backend == CURLSSLBACKEND_NONE || info->internals == NULL));
	client->readable = false;
}

/*
 * session_alive: may an idle connection be used?  After a while idle, one
 * the server has closed, or said goodbye on (a 421 for its idle timeout),
 * is readable: it is closed instead.
 */
static bool
session_alive(SmtpClient *client, TimestampTz now)
{
	struct pollfd pfd;

	if (client->state != SESSION_OPEN || client->fd == CURL_SOCKET_BAD)
		return false;
	if (TimestampDifferenceExceeds(client->idle_since, now, SMTP_IDLE_MAX_MS))
		return false;
	if (!TimestampDifferenceExceeds(client->idle_since, now, SMTP_IDLE_CHECK_MS))
		return true;
	pfd.fd = client->fd;
	pfd.events = POLLIN;
	pfd.revents = 0;
	return poll(&pfd, 1, 0) == 0;
}

/* smtp_pool_destroy: abandon transfers, close every connection. */
void
smtp_pool_destroy(SmtpPool *pool)
{
	if (pool == NULL)
		return;
	smtp_pool_abandon(pool);
	for (int i = 0; i < pool->nclients; i++)
	{
		session_close(pool->clients[i], true);
		client_destroy(pool->clients[i]);
	}
	pfree(pool);
}

/*
 * smtp_pool_active: transfers in flight, and finished ones whose results
 * smtp_pool_next_done has not handed out yet (a failed connection ends a
 * transfer and the one chained behind it at once: both must be collected).
 */
int
smtp_pool_active(const SmtpPool *pool)
{
	return pool->active + pool->ndone;
}

/* copy_config: the channel's settings, copied into cxt for one transfer. */
static void
copy_config(SmtpConfig *dst, const SmtpConfig *src, MemoryContext cxt)
{
#define COPY_STR(f) (dst->f = src->f ? MemoryContextStrdup(cxt, src->f) : NULL)
	COPY_STR(name);
	COPY_STR(url);
	COPY_STR(from_address);
	COPY_STR(username);
	COPY_STR(password);
	COPY_STR(tls);
	COPY_STR(bounce_address);
#undef COPY_STR
	dst->rate_per_minute = src->rate_per_minute;
}

/*
 * pool_client: the idle client for a transfer with these settings: one
 * whose connection was opened with them, or one to connect.  Idle
 * connections beyond SMTP_POOL_IDLE_CONNECTIONS, the oldest first, and
 * those too old to reuse are closed.
 */
static SmtpClient *
pool_client(SmtpPool *pool, const SmtpConfig *cfg)
{
	char		key[sizeof(((SmtpClient *) NULL)->session_key)];
	SmtpClient *closed = NULL;
	SmtpClient *oldest = NULL;
	int			open = 0;
	TimestampTz now = GetCurrentTimestamp();

	session_key(cfg, key, sizeof(key));
	for (int i = 0; i < pool->nclients; i++)
	{
		SmtpClient *c = pool->clients[i];

		if (c->busy)
			continue;
		if (c->state == SESSION_OPEN && strcmp(c->session_key, key) == 0)
		{
			if (session_alive(c, now))
				return c;
			session_close(c, false);
		}
		if (c->state == SESSION_OPEN &&
			TimestampDifferenceExceeds(c->idle_since, now, SMTP_IDLE_MAX_MS))
			session_close(c, true);
		if (c->state == SESSION_CLOSED)
		{
			if (closed == NULL)
				closed = c;
			continue;
		}
		open++;
		if (oldest == NULL || c->idle_since < oldest->idle_since)
			oldest = c;
	}
	if (closed != NULL && open < SMTP_POOL_IDLE_CONNECTIONS)
		return closed;
	if (closed == NULL && pool->nclients < SMTP_POOL_MAX && open < SMTP_POOL_IDLE_CONNECTIONS)
	{
		closed = client_create();
		pool->clients[pool->nclients++] = closed;
		return closed;
	}
	if (oldest == NULL)
	{
		if (closed != NULL)
			return closed;
		elog(ERROR, "notify_ext: more than %d transfers in flight", SMTP_POOL_MAX);
	}
	session_close(oldest, true);
	return oldest;
}

/*
 * wire_message: a message's bytes as they go after 354 (dot-stuffed, the
 * final dot) and its recipient, in cxt; false when out of memory.
 */
static bool
wire_message(const char *message, size_t len, const char *address, MemoryContext cxt,
			 char **data, size_t *data_len, struct curl_slist **rcpt)
{
	MemoryContext old = MemoryContextSwitchTo(cxt);

	*data = mime_smtp_data(message, len, data_len);
	*rcpt = curl_slist_append(NULL, psprintf("<%s>", address));
	MemoryContextSwitchTo(old);
	if (*data == NULL || *rcpt == NULL)
	{
		curl_slist_free_all(*rcpt);
		*rcpt = NULL;
		return false;
	}
	return true;
}

/*
 * chain_client: the busy client a transfer with these settings can follow
 * on the same connection (pipelined), or NULL.
 */
static SmtpClient *
chain_client(SmtpPool *pool, const SmtpConfig *cfg)
{
	char		key[sizeof(((SmtpClient *) NULL)->session_key)];

	session_key(cfg, key, sizeof(key));
	for (int i = 0; i < pool->nclients; i++)
	{
		SmtpClient *c = pool->clients[i];

		if (c->busy && !c->has_next && c->state == SESSION_OPEN && c->pipelining &&
			(c->phase == PHASE_ENVELOPE || c->phase == PHASE_DATA) &&
			strcmp(c->session_key, key) == 0)
			return c;
	}
	return NULL;
}

/*
 * smtp_pool_can_chain: may a message for this channel be started now,
 * behind one in flight on the same connection?  (Its envelope then goes
 * with the data of the one before: a round trip per message.)
 */
bool
smtp_pool_can_chain(SmtpPool *pool, const SmtpConfig *cfg)
{
	return pool != NULL && cfg != NULL && chain_client(pool, cfg) != NULL;
}

/*
 * chain_message: msg follows the client's transfer on its connection.
 * Returns false (result filled) when it cannot be sent as it is.
 */
static bool
chain_message(SmtpClient *client, const SmtpConfig *cfg, const OutMessage *msg, SendResult *result,
			  int64 tag)
{
	char	   *message;
	size_t		len;

	if (client->next_cfg.password)
		explicit_bzero(client->next_cfg.password, strlen(client->next_cfg.password));
	MemoryContextReset(client->next_cfg_cxt);
	copy_config(&client->next_cfg, cfg, client->next_cfg_cxt);
	if (!build_message(&client->next_cfg, msg, client->next_cxt, result, &message, &len,
					   &client->next_mail_from))
		return false;
	if (!wire_message(message, len, msg->address, client->next_cxt, &client->next_data,
					  &client->next_data_len, &client->next_rcpt))
	{
		fail_result(result, SEND_RETRY, "could not build the message: %s", "out of memory");
		return false;
	}
	client->next_tag = tag;
	client->has_next = true;
	client->next_sent = false;
	/* the data before it is on its way: its envelope goes now, in the same group */
	if (client->phase == PHASE_DATA)
	{
		char	   *group = envelope_group(client, client->next_mail_from, client->next_rcpt,
										   client->next_data_len, client->next_cxt);

		queue_output(client, group, strlen(group), 0);
		client->next_sent = true;
	}
	return true;
}

/*
 * smtp_pool_start: put a message in flight, known to the caller as `tag`:
 * behind a transfer on a connection with the same settings when the server
 * pipelines, else on a connection of its own.  Nothing of cfg or msg is
 * kept: they are copied.  Returns false when the message failed before any
 * network exchange (*result filled).
 */
bool
smtp_pool_start(SmtpPool *pool, const SmtpConfig *cfg, const OutMessage *msg,
				SendResult *result, int64 tag)
{
	SmtpClient *client = chain_client(pool, cfg);

	if (client != NULL)
	{
		if (!chain_message(client, cfg, msg, result, tag))
			return false;
		pool->active++;
		return true;
	}
	client = pool_client(pool, cfg);
	/* the channel's settings, copied for this transfer (the last copy's secret wiped) */
	if (client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	MemoryContextReset(client->cfg_cxt);
	copy_config(&client->cfg, cfg, client->cfg_cxt);
	client->owns_cfg = false;
	client->tag = tag;
	reset_transfer(client);
	if (!build_message(&client->cfg, msg, client->message_cxt, &client->result,
					   &client->message, &client->message_len, &client->mail_from))
	{
		*result = client->result;
		return false;
	}
	/* the data as it goes on the wire, and the recipient, in the transfer's own memory */
	if (!wire_message(client->message, client->message_len, msg->address, client->message_cxt,
					  &client->data, &client->data_len, &client->rcpt))
	{
		release_transfer(client);
		fail_result(&client->result, SEND_RETRY, "could not build the message: %s", "out of memory");
		*result = client->result;
		return false;
	}
	client->curl_err[0] = '\0';
	if (client->state == SESSION_OPEN)
	{
		client->reused = true;
		session_begin(client);
	}
	else if (!session_connect(client))
	{
		release_transfer(client);
		*result = client->result;
		return false;
	}
	client->busy = true;
	pool->active++;
	return true;
}

/*
 * transfer_advance: the transfer is over and another was chained behind
 * it: that one becomes the transfer (its envelope's replies come next, or
 * its envelope goes now).
 */
static void
transfer_advance(SmtpClient *client)
{
	MemoryContext swap;

	/* the finished transfer's memory (already released) is the next one's to reuse */
	swap = client->message_cxt;
	client->message_cxt = client->next_cxt;
	client->next_cxt = swap;
	swap = client->cfg_cxt;
	if (client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	client->cfg_cxt = client->next_cfg_cxt;
	client->next_cfg_cxt = swap;
	client->cfg = client->next_cfg;
	memset(&client->next_cfg, 0, sizeof(client->next_cfg));
	client->tag = client->next_tag;

	reset_transfer(client);
	client->data = client->next_data;
	client->data_len = client->next_data_len;
	client->mail_from = client->next_mail_from;
	client->rcpt = client->next_rcpt;
	client->next_data = NULL;
	client->next_mail_from = NULL;
	client->next_rcpt = NULL;
	client->has_next = false;
	client->reused = true;
	if (client->next_sent)
	{
		/* its group is written: MAIL FROM, RCPT TO and DATA's replies are on their way */
		envelope_state(client, 3);
	}
	else
	{
		/* what was read belongs to no transfer any more: the next reads its own */
		size_t		in_len = client->in_len;

		session_begin(client);
		client->in_len = in_len;
	}
}

/*
 * pool_complete: a transfer is over; classify it and queue its result for
 * smtp_pool_next_done.  A connection not in good order (a failure of the
 * connection, a silence, a reply out of step) is closed: a late reply must
 * never answer the next message's MAIL FROM.  A transfer chained behind
 * then becomes the client's; on a closed connection it ends too, as the
 * channel's failure (its envelope got no answer), or aborted.
 */
static void
pool_complete(SmtpPool *pool, SmtpClient *client, CURLcode res, const char *why, bool keep)
{
	if (res == CURLE_OK || keep)
		client->idle_since = GetCurrentTimestamp();
	if (client->fail_code != 0)
	{
		/* the refusal is the reply to classify and to log, not RSET's */
		client->last_code = client->fail_code;
		strlcpy(client->last_reply, client->fail_line, sizeof(client->last_reply));
	}
	finish_transfer(client, res, why);
	pool->done_tag[pool->ndone] = client->tag;
	pool->done_result[pool->ndone] = client->result;
	pool->ndone++;
	pool->active--;
	if (!(res == CURLE_OK || keep) || client->state != SESSION_OPEN)
		session_close(client, false);
	if (!client->has_next)
	{
		client->busy = false;
		return;
	}
	transfer_advance(client);
	if (client->state != SESSION_OPEN)
		pool_complete(pool, client, res == CURLE_ABORTED_BY_CALLBACK ? res : CURLE_SEND_ERROR,
					  res == CURLE_ABORTED_BY_CALLBACK ? NULL
					  : "the connection failed before the server answered this message's envelope",
					  false);
}

/*
 * pool_step: move one transfer on as far as it goes without waiting; true
 * when it is over (queued for smtp_pool_next_done).
 */
static bool
pool_step(SmtpPool *pool, SmtpClient *client)
{
	TransferEnd end = {false, CURLE_OK, NULL, false};

	if (ProcDiePending || QueryCancelPending)
	{
		/* the worker stops: no word on the message or the channel */
		pool_complete(pool, client, CURLE_ABORTED_BY_CALLBACK, NULL, false);
		return true;
	}
	if (client->phase == PHASE_CONNECT)
	{
		int			running;
		int			left;
		CURLMsg    *msg;
		CURLcode	res = CURLE_OK;
		bool		done = false;

		curl_multi_perform(client->multi, &running);
		while ((msg = curl_multi_info_read(client->multi, &left)) != NULL)
			if (msg->msg == CURLMSG_DONE)
			{
				done = true;
				res = msg->data.result;
			}
		if (!done)
			return false;
		if (res != CURLE_OK)
		{
			pool_complete(pool, client, res, NULL, false);
			return true;
		}
		session_opened(client);
		session_begin(client);
	}
	session_io(client, &end);
	if (!end.over)
		return false;

	/*
	 * A connection kept from an earlier message that turns out closed
	 * before answering anything (the server's idle timeout crossed our
	 * reuse): this transfer tries once more on a new one.
	 */
	if (end.res != CURLE_OK && !end.keep && client->reused && client->replies == 0 &&
		client->phase == PHASE_ENVELOPE)
	{
		char	   *mail_from = client->mail_from;

		session_close(client, false);
		client->mail_from = mail_from;
		if (session_connect(client))
			return pool_step(pool, client);
		pool_complete(pool, client, CURLE_COULDNT_CONNECT, client->result.error, false);
		return true;
	}
	pool_complete(pool, client, end.res, end.why, end.keep);
	return true;
}

/*
 * pool_check_deadlines: each step of a transfer has its own bound.  A
 * server silent for notify.smtp_timeout in any step is given up on; the
 * reply to the final dot gets notify.smtp_data_timeout, because giving up
 * there leaves the outcome unknown.
 */
static void
pool_check_deadlines(SmtpPool *pool)
{
	TimestampTz now = GetCurrentTimestamp();

	for (int i = 0; i < pool->nclients; i++)
	{
		SmtpClient *client = pool->clients[i];
		char		why[128];

		if (!client->busy)
			continue;
		if (client->body_done && !client->reply_after_body)
		{
			if (!TimestampDifferenceExceeds(client->body_done_at, now, notify_smtp_data_timeout * 1000))
				continue;
			snprintf(why, sizeof(why), "no reply within notify.smtp_data_timeout (%d s)",
					 notify_smtp_data_timeout);
		}
		else
		{
			if (!TimestampDifferenceExceeds(client->last_activity, now, notify_smtp_timeout * 1000))
				continue;
			snprintf(why, sizeof(why), "the server was silent for notify.smtp_timeout (%d s)",
					 notify_smtp_timeout);
		}
		pool_complete(pool, client, CURLE_OPERATION_TIMEDOUT, why, false);
	}
}

/*
 * smtp_pool_abandon: give up every transfer in flight, and forget the
 * finished ones not yet collected: the worker's round failed, its claims
 * go back to the queue, and nothing of this pool may refer to them again.
 * The connections are shut down (their state is unknown).
 */
void
smtp_pool_abandon(SmtpPool *pool)
{
	if (pool == NULL)
		return;
	for (int i = 0; i < pool->nclients; i++)
	{
		SmtpClient *client = pool->clients[i];

		if (!client->busy)
			continue;
		session_close(client, false);
		release_transfer(client);
		release_next(client);
		client->busy = false;
	}
	pool->active = 0;
	pool->ndone = 0;
}

/*
 * pool_wait: wait, at most timeout_ms, for what the transfers wait for:
 * a connection being set up (libcurl's), or a socket of ours.  Waits are
 * short: a SIGTERM interrupts poll, and the next step sees it.
 */
static void
pool_wait(SmtpPool *pool, long timeout_ms)
{
	struct pollfd fds[SMTP_POOL_MAX];
	struct curl_waitfd extra[SMTP_POOL_MAX];
	int			n = 0;
	SmtpClient *connecting = NULL;

	for (int i = 0; i < pool->nclients; i++)
	{
		SmtpClient *c = pool->clients[i];

		if (!c->busy)
			continue;
		if (c->phase == PHASE_CONNECT)
		{
			if (connecting == NULL)
				connecting = c;
			continue;
		}
		fds[n].fd = c->fd;
		fds[n].events = c->want;
		fds[n].revents = 0;
		extra[n].fd = c->fd;
		extra[n].events = c->want == POLLOUT ? CURL_WAIT_POLLOUT : CURL_WAIT_POLLIN;
		extra[n].revents = 0;
		n++;
	}
	if (connecting != NULL)
	{
		/* another transfer also connecting gets its turn at the next step */
		curl_multi_poll(connecting->multi, extra, n, (int) timeout_ms, NULL);
		for (int i = 0, k = 0; i < pool->nclients; i++)
			if (pool->clients[i]->busy && pool->clients[i]->phase != PHASE_CONNECT)
				pool->clients[i]->readable = (extra[k++].revents & CURL_WAIT_POLLIN) != 0 || pool->clients[i]->readable;
		return;
	}
	if (n == 0)
		return;
	if (poll(fds, n, (int) timeout_ms) > 0)
		for (int i = 0, k = 0; i < pool->nclients; i++)
			if (pool->clients[i]->busy)
			{
				if (fds[k].revents & (POLLIN | POLLHUP | POLLERR))
					pool->clients[i]->readable = true;
				k++;
			}
}

/*
 * smtp_pool_next_done: drive the transfers for at most timeout_ms; true
 * with the tag and result of one finished transfer, false when none
 * finished in time or none is in flight.
 */
bool
smtp_pool_next_done(SmtpPool *pool, long timeout_ms, int64 *tag, SendResult *result)
{
	TimestampTz start = GetCurrentTimestamp();

	for (;;)
	{
		long		elapsed;

		if (pool->ndone > 0)
		{
			pool->ndone--;
			*tag = pool->done_tag[pool->ndone];
			*result = pool->done_result[pool->ndone];
			return true;
		}
		if (pool->active == 0)
			return false;

		for (int i = 0; i < pool->nclients; i++)
			if (pool->clients[i]->busy)
				(void) pool_step(pool, pool->clients[i]);
		pool_check_deadlines(pool);
		if (pool->ndone > 0)
			continue;

		elapsed = (long) ((GetCurrentTimestamp() - start) / 1000);
		if (elapsed >= timeout_ms)
			return false;
		pool_wait(pool, Min(timeout_ms - elapsed, 100L));
	}
}

/*
 * say_quit: end test_smtp's connect-only session with QUIT, as a polite
 * client does (libcurl closes a connect-only connection without it, and
 * Postfix logs "lost connection after EHLO").  The reply is awaited a few
 * seconds at most.
 */
static void
say_quit(SmtpClient *client, StringInfo t)
{
	curl_socket_t fd = CURL_SOCKET_BAD;
	size_t		sent = 0;
	char		buf[512];
	size_t		got = 0;
	TimestampTz deadline = GetCurrentTimestamp() + 5 * USECS_PER_SEC;

	if (curl_easy_getinfo(client->curl, CURLINFO_ACTIVESOCKET, &fd) != CURLE_OK || fd == CURL_SOCKET_BAD ||
		curl_easy_send(client->curl, "QUIT\r\n", 6, &sent) != CURLE_OK || sent != 6)
		return;
	appendStringInfoString(t, "> QUIT\n");
	/* libcurl's own chatter about the raw reads is not the dialogue */
	curl_easy_setopt(client->curl, CURLOPT_VERBOSE, 0L);
	while (got < sizeof(buf) - 1 && GetCurrentTimestamp() < deadline)
	{
		size_t		n = 0;
		CURLcode	rc = curl_easy_recv(client->curl, buf + got, sizeof(buf) - 1 - got, &n);
		struct pollfd pfd = {fd, POLLIN, 0};

		if (rc == CURLE_AGAIN)
		{
			CHECK_FOR_INTERRUPTS();
			(void) poll(&pfd, 1, 100);
			continue;
		}
		if (rc != CURLE_OK || n == 0)
			break;
		got += n;
		if (memchr(buf, '\n', got) != NULL)
			break;
	}
	if (got > 0)
	{
		char	   *line = notify_clean_text(buf, got, 200);
		size_t		n = strlen(line);

		while (n > 0 && line[n - 1] == ' ')
			line[--n] = '\0';
		appendStringInfo(t, "< %s\n", line);
	}
}

/*
 * smtp_test_connection: notify.test_smtp's work.  Connects, greets,
 * negotiates TLS and authenticates (libcurl's connect phase for SMTP), or,
 * with send_to, sends a short test message; returns the dialogue and the
 * outcome, never the password.  Bounded by the transport's timeouts.
 */
char *
smtp_test_connection(const SmtpConfig *cfg, const char *send_to)
{
	SmtpClient *client = client_create();
	StringInfoData t;
	SendResult	result;

	client->cfg.name = dup_or_null(cfg->name);
	client->cfg.url = dup_or_null(cfg->url);
	client->cfg.from_address = dup_or_null(cfg->from_address);
	client->cfg.username = dup_or_null(cfg->username);
	client->cfg.password = dup_or_null(cfg->password);
	client->cfg.tls = dup_or_null(cfg->tls);
	client->cfg.bounce_address = dup_or_null(cfg->bounce_address);
	client->owns_cfg = true;
	initStringInfo(&t);
	client->transcript = &t;
	appendStringInfo(&t, "channel \"%s\": %s, tls %s, %s\n", cfg->name, cfg->url,
					 cfg->tls ? cfg->tls : "verify",
					 cfg->username ? psprintf("user %s, password %s", cfg->username,
											 cfg->password ? "set" : "not set") : "no authentication");
	PG_TRY();
	{
		if (send_to != NULL)
		{
			OutMessage	msg;

			memset(&msg, 0, sizeof(msg));
			/* a Message-ID of its own: a receiver that drops duplicates must not drop the next test */
			msg.id_kind = psprintf("notify.test.%d", MyProcPid);
			msg.id = (long long) GetCurrentTimestamp();
			msg.address = send_to;
			msg.subject = "notify_ext test message";
			msg.text_body = psprintf("This is a test message sent by notify.test_smtp() through channel \"%s\".\n",
									 cfg->name);
			smtp_send_blocking(client, &msg, &result);
		}
		else
		{
			char		curl_err[CURL_ERROR_SIZE];
			CURLcode	res;
			long		code = 0;

			memset(&result, 0, sizeof(result));
			curl_err[0] = '\0';
			set_common_options(client, false);
			curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, curl_err);
			curl_easy_setopt(client->curl, CURLOPT_CONNECT_ONLY, 1L);
			res = curl_easy_perform(client->curl);
			curl_easy_getinfo(client->curl, CURLINFO_RESPONSE_CODE, &code);
			curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, NULL);
			result.code = (int) code;
			if (res == CURLE_OK)
			{
				result.outcome = SEND_SENT;
				say_quit(client, &t);
			}
			else
			{
				result.outcome = SEND_RETRY;
				snprintf(result.error, sizeof(result.error), "%s",
						 curl_err[0] ? curl_err : curl_easy_strerror(res));
			}
		}
	}
	PG_FINALLY();
	{
		client->transcript = NULL;
		client_destroy(client);
	}
	PG_END_TRY();

	if (result.outcome == SEND_SENT)
		appendStringInfo(&t, "OK: %s\n", send_to ? psprintf("test message accepted for %s", send_to)
						 : cfg->username ? "connected, greeted and authenticated" : "connected and greeted");
	else
		appendStringInfo(&t, "FAILED: %s\n", result.error);
	return t.data;
}

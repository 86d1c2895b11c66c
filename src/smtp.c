/*-------------------------------------------------------------------------
 *
 * smtp.c
 *	  libcurl SMTP transport: uploads each message, built whole by mime.c
 *	  (text, plus HTML as multipart/alternative, plus files), over a
 *	  connection that is kept open between messages, and classifies the
 *	  outcome.
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
#define SMTP_POOL_IDLE_CONNECTIONS 4L
#define SMTP_CLIENT_SOCKETS 8

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
};

typedef struct SmtpClient SmtpClient;

/* host:port a pool keeps connections to, with the settings that opened them */
#define SMTP_POOL_OWNERS 16

struct SmtpPool
{
	CURLM	   *multi;
	int			nowners;
	char	   *owner_host[SMTP_POOL_OWNERS];	/* "host:port", in TopMemoryContext */
	char	   *owner_key[SMTP_POOL_OWNERS];	/* the TLS settings its connections were opened with */
	int			nclients;
	SmtpClient *clients[SMTP_POOL_MAX];
	int			active;
	int			ndone;
	SmtpClient *done[SMTP_POOL_MAX];
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

/* client_create: a handle; it connects on its first transfer. */
static SmtpClient *
client_create(void)
{
	SmtpClient *client = MemoryContextAllocZero(TopMemoryContext, sizeof(SmtpClient));

	client->curl = curl_easy_init();
	if (client->curl == NULL)
	{
		pfree(client);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("notify_ext: could not create a libcurl handle")));
	}
	client->message_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP message",
												ALLOCSET_DEFAULT_SIZES);
	client->cfg_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext SMTP channel",
											ALLOCSET_SMALL_SIZES);
	curl_easy_setopt(client->curl, CURLOPT_OPENSOCKETFUNCTION, open_socket_cb);
	curl_easy_setopt(client->curl, CURLOPT_OPENSOCKETDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_CLOSESOCKETFUNCTION, close_socket_cb);
	curl_easy_setopt(client->curl, CURLOPT_CLOSESOCKETDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_PREREQFUNCTION, prereq_cb);
	curl_easy_setopt(client->curl, CURLOPT_PREREQDATA, client);
	return client;
}

/* client_destroy: close the handle and forget any copied secret. */
static void
client_destroy(SmtpClient *client)
{
	if (client == NULL)
		return;
	if (client->curl)
		curl_easy_cleanup(client->curl);
	if (client->owns_cfg && client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	if (client->message_cxt)
		MemoryContextDelete(client->message_cxt);
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
 * prepare_transfer: build one message on a client's handle.  Everything
 * that could smuggle a header or a command is checked first; returns
 * false, with *result filled, when the message can never be sent as it is.
 */
static bool
prepare_transfer(SmtpClient *client, const OutMessage *msg, bool pooled)
{
	SendResult *result = &client->result;
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
	from_header = mime_format_mailbox(NULL, client->cfg.from_address, errbuf, sizeof(errbuf));
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
									 msg->id, mime_domain_of(client->cfg.from_address),
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
	MemoryContextReset(client->message_cxt);
	old = MemoryContextSwitchTo(client->message_cxt);
	client->message = mime_build_message(headers->data, msg->text_body ? msg->text_body : "",
										 msg->html_body, attachments, msg->nattachments, token,
										 &client->message_len, errbuf, sizeof(errbuf));
	MemoryContextSwitchTo(old);
	client->message_pos = 0;
	if (client->message == NULL)
	{
		fail_result(result, SEND_RETRY, "could not build the message: %s", errbuf);
		return false;
	}
	client->rcpt = curl_slist_append(client->rcpt, psprintf("<%s>", msg->address));

	set_common_options(client, pooled);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, client->curl_err);
	/*
	 * The envelope sender names the message (VERP, see bounce.c), so that
	 * its bounce can be matched whatever a relay does to the headers; the
	 * From: header above stays the channel's from_address.
	 */
	curl_easy_setopt(client->curl, CURLOPT_MAIL_FROM,
					 psprintf("<%s>", bounce_envelope_sender(client->cfg.bounce_address ? client->cfg.bounce_address
															 : client->cfg.from_address,
															 msg->id, msg->id_kind != NULL)));
	curl_easy_setopt(client->curl, CURLOPT_MAIL_RCPT, client->rcpt);
	curl_easy_setopt(client->curl, CURLOPT_UPLOAD, 1L);
	curl_easy_setopt(client->curl, CURLOPT_READFUNCTION, read_cb);
	curl_easy_setopt(client->curl, CURLOPT_READDATA, client);
	curl_easy_setopt(client->curl, CURLOPT_INFILESIZE_LARGE, (curl_off_t) client->message_len);
	return true;
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
	SmtpPool   *pool = MemoryContextAllocZero(TopMemoryContext, sizeof(SmtpPool));

	pool->multi = curl_multi_init();
	if (pool->multi == NULL)
	{
		pfree(pool);
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("notify_ext: could not create a libcurl multi handle")));
	}
	return pool;
}

/*
 * connection_host: "host:port" of an smtp:// or smtps:// URL, the port
 * made explicit (libcurl keeps one bundle of connections per host and port).
 */
static char *
connection_host(const char *url)
{
	const char *p = strstr(url, "://");
	bool		smtps = pg_strncasecmp(url, "smtps", 5) == 0;
	size_t		len;
	char	   *host;

	p = p ? p + 3 : url;
	len = strcspn(p, "/?#");
	host = pnstrdup(p, len);
	for (char *c = host; *c; c++)
		*c = pg_tolower((unsigned char) *c);
	/* no port ("host", "[::1]"): the scheme's */
	if (strrchr(host, ':') == NULL || (host[0] == '[' && host[len - 1] == ']'))
		host = psprintf("%s:%d", host, smtps ? 465 : 25);
	return host;
}

/*
 * pool_may_reuse: may this transfer use (and leave) a connection the pool
 * keeps?  libcurl reuses a cached connection to the same host and port with
 * the same login, but for smtp:// with STARTTLS it does not compare the TLS
 * settings: a channel with tls 'verify' could send over a connection another
 * channel to the same relay opened with 'require' (no certificate check), or
 * one opened before notify.tls_ca_file changed.  So each host:port belongs to
 * the settings that first used it: a transfer with other settings gets a
 * connection of its own, closed after it; or, when nothing is in flight,
 * the pool's cached connections are closed and the host:port is its.
 */
static bool
pool_may_reuse(SmtpPool *pool, const SmtpConfig *cfg)
{
	char	   *host = connection_host(cfg->url);
	char	   *key = psprintf("%s\n%s\n%s\n%s", pg_strncasecmp(cfg->url, "smtps", 5) == 0 ? "smtps" : "smtp",
							   cfg->tls ? cfg->tls : "", cfg->username ? cfg->username : "",
							   (notify_tls_ca_file && notify_tls_ca_file[0]) ? notify_tls_ca_file : "");
	int			i;

	for (i = 0; i < pool->nowners; i++)
		if (strcmp(pool->owner_host[i], host) == 0)
			break;
	if (i < pool->nowners && strcmp(pool->owner_key[i], key) == 0)
		return true;
	if (i < pool->nowners)
	{
		if (pool->active > 0)
			return false;
		/* nothing in flight: close what is cached, and start afresh */
		curl_multi_cleanup(pool->multi);
		pool->multi = curl_multi_init();
		if (pool->multi == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_OUT_OF_MEMORY),
					 errmsg("notify_ext: could not create a libcurl multi handle")));
		for (int j = 0; j < pool->nowners; j++)
		{
			pfree(pool->owner_host[j]);
			pfree(pool->owner_key[j]);
		}
		pool->nowners = 0;
	}
	if (pool->nowners == SMTP_POOL_OWNERS)
		return false;
	pool->owner_host[pool->nowners] = MemoryContextStrdup(TopMemoryContext, host);
	pool->owner_key[pool->nowners] = MemoryContextStrdup(TopMemoryContext, key);
	pool->nowners++;
	return true;
}

/* smtp_pool_destroy: abandon transfers, close every connection. */
void
smtp_pool_destroy(SmtpPool *pool)
{
	if (pool == NULL)
		return;
	smtp_pool_abandon(pool);
	/* first: closing the cached connections calls back into their clients */
	curl_multi_cleanup(pool->multi);
	for (int i = 0; i < pool->nclients; i++)
		client_destroy(pool->clients[i]);
	for (int i = 0; i < pool->nowners; i++)
	{
		pfree(pool->owner_host[i]);
		pfree(pool->owner_key[i]);
	}
	pfree(pool);
}

/* smtp_pool_active: transfers in flight. */
int
smtp_pool_active(const SmtpPool *pool)
{
	return pool->active;
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
 * smtp_pool_start: put a message in flight, known to the caller as `tag`.
 * Nothing of cfg or msg is kept: they are copied.  Returns false when the
 * message failed before any network exchange (*result filled).
 */
bool
smtp_pool_start(SmtpPool *pool, const SmtpConfig *cfg, const OutMessage *msg,
				SendResult *result, int64 tag)
{
	SmtpClient *client = NULL;
	CURLMcode	mc;
	bool		reuse;

	for (int i = 0; i < pool->nclients; i++)
		if (!pool->clients[i]->busy)
		{
			client = pool->clients[i];
			break;
		}
	if (client == NULL)
	{
		if (pool->nclients >= SMTP_POOL_MAX)
			elog(ERROR, "notify_ext: more than %d transfers in flight", SMTP_POOL_MAX);
		client = client_create();
		pool->clients[pool->nclients++] = client;
	}
	/* the channel's settings, copied for this transfer (the last copy's secret wiped) */
	if (client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	MemoryContextReset(client->cfg_cxt);
	copy_config(&client->cfg, cfg, client->cfg_cxt);
	client->owns_cfg = false;
	client->tag = tag;
	if (!prepare_transfer(client, msg, true))
	{
		*result = client->result;
		return false;
	}
	/* a connection opened with other TLS settings is never this transfer's (see pool_may_reuse) */
	reuse = pool_may_reuse(pool, &client->cfg);
	curl_easy_setopt(client->curl, CURLOPT_FRESH_CONNECT, reuse ? 0L : 1L);
	curl_easy_setopt(client->curl, CURLOPT_FORBID_REUSE, reuse ? 0L : 1L);
	/* idle connections kept open: one per channel, for a few channels */
	curl_multi_setopt(pool->multi, CURLMOPT_MAXCONNECTS, (long) SMTP_POOL_IDLE_CONNECTIONS);
	mc = curl_multi_add_handle(pool->multi, client->curl);
	if (mc != CURLM_OK)
	{
		release_transfer(client);
		fail_result(&client->result, SEND_RETRY, "libcurl: %s", curl_multi_strerror(mc));
		*result = client->result;
		return false;
	}
	client->busy = true;
	pool->active++;
	return true;
}

/*
 * pool_complete: a transfer is over; queue it for smtp_pool_next_done.
 *
 * A failed transfer's connection is shut down here, while it is still
 * the handle's: libcurl keeps a connection whose reply to the final dot
 * timed out ("left intact"), and the late reply would then answer the
 * next message's MAIL FROM.  A connection in an unknown state is never
 * reused; libcurl sees it dead and opens a new one.
 */
/* shutdown_connection: the client's connections, shut down (their state is unknown). */
static void
shutdown_connection(SmtpClient *client)
{
	for (int i = 0; i < client->nsockets; i++)
		shutdown(client->sockets[i], SHUT_RDWR);
}

static void
pool_complete(SmtpPool *pool, SmtpClient *client, CURLcode res, const char *why)
{
	if (res != CURLE_OK)
		shutdown_connection(client);
	curl_multi_remove_handle(pool->multi, client->curl);
	finish_transfer(client, res, why);
	client->busy = false;
	pool->active--;
	pool->done[pool->ndone++] = client;
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
		pool_complete(pool, client, CURLE_OPERATION_TIMEDOUT, why);
	}
}

/*
 * smtp_pool_abandon: give up every transfer in flight, and forget the
 * finished ones not yet collected: the worker's round failed, its claims
 * go back to the queue, and nothing of this pool may refer to them again.
 * The connections are shut down (their state is unknown); libcurl opens
 * new ones for the next messages.
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
		shutdown_connection(client);
		curl_multi_remove_handle(pool->multi, client->curl);
		release_transfer(client);
		client->busy = false;
	}
	pool->active = 0;
	pool->ndone = 0;
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
		int			running;
		int			left;
		CURLMsg    *msg;
		long		elapsed;

		if (pool->ndone > 0)
		{
			SmtpClient *done = pool->done[--pool->ndone];

			*tag = done->tag;
			*result = done->result;
			return true;
		}
		if (pool->active == 0)
			return false;

		curl_multi_perform(pool->multi, &running);
		while ((msg = curl_multi_info_read(pool->multi, &left)) != NULL)
		{
			if (msg->msg != CURLMSG_DONE)
				continue;
			for (int i = 0; i < pool->nclients; i++)
				if (pool->clients[i]->busy && pool->clients[i]->curl == msg->easy_handle)
				{
					pool_complete(pool, pool->clients[i], msg->data.result, NULL);
					break;
				}
		}
		pool_check_deadlines(pool);
		if (pool->ndone > 0)
			continue;

		elapsed = (long) ((GetCurrentTimestamp() - start) / 1000);
		if (elapsed >= timeout_ms)
			return false;
		/* short waits: a SIGTERM is noticed by progress_cb at the next perform */
		curl_multi_poll(pool->multi, NULL, 0, (int) Min(timeout_ms - elapsed, 100L), NULL);
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

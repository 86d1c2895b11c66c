/*-------------------------------------------------------------------------
 *
 * smtp.c
 *	  libcurl SMTP transport: builds each message with curl_mime (text,
 *	  plus HTML as multipart/alternative), sends it over a connection that
 *	  is kept open between messages, and classifies the outcome.
 *
 * Header values never reach libcurl unchecked: addresses are validated
 * (libcurl would pass CR/LF in MAIL FROM/RCPT TO straight to the server),
 * subjects and display names are RFC 2047-encoded by mime.c, and bodies
 * are normalised to CRLF so that business data cannot end the DATA phase.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>
#include <time.h>

#include "miscadmin.h"
#include "lib/stringinfo.h"
#include "utils/memutils.h"

#include "mime.h"
#include "smtp.h"

/* Generous bounds: a stuck server must never hang the worker. */
#define SMTP_CONNECT_TIMEOUT_MS 10000L
#define SMTP_TOTAL_TIMEOUT_MS 120000L

struct SmtpClient
{
	SmtpConfig	cfg;			/* copies, in TopMemoryContext */
	CURL	   *curl;
	char		last_reply[512];	/* the server's last reply line */
	bool		quitting;		/* QUIT sent: its 221 is not the answer we log */
	StringInfo	transcript;		/* test_smtp: the dialogue, credentials hidden */
	bool		in_auth;		/* between AUTH and its final reply */
};

static void record_transcript(SmtpClient *client, curl_infotype type, const char *data, size_t size);

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

/* same_str: equality where NULL equals NULL. */
static bool
same_str(const char *a, const char *b)
{
	if (a == NULL || b == NULL)
		return a == b;
	return strcmp(a, b) == 0;
}

/* smtp_client_matches: whether a client was made from these settings. */
bool
smtp_client_matches(const SmtpClient *client, const SmtpConfig *cfg)
{
	return same_str(client->cfg.url, cfg->url) &&
		same_str(client->cfg.from_address, cfg->from_address) &&
		same_str(client->cfg.username, cfg->username) &&
		same_str(client->cfg.password, cfg->password) &&
		same_str(client->cfg.tls, cfg->tls);
}

/*
 * debug_cb: keeps the server's last reply line, which is what the log
 * shows as smtp_response ("250 2.0.0 Ok: queued as 4XyZ").
 */
static int
debug_cb(CURL *handle, curl_infotype type, char *data, size_t size, void *userp)
{
	SmtpClient *client = (SmtpClient *) userp;
	size_t		n;

	if (type == CURLINFO_HEADER_OUT && size >= 4 && pg_strncasecmp(data, "QUIT", 4) == 0)
		client->quitting = true;
	if (client->transcript != NULL)
		record_transcript(client, type, data, size);
	if (type != CURLINFO_HEADER_IN || size == 0 || client->quitting)
		return 0;
	/* a multi-line reply arrives line by line; keep the last one */
	n = Min(size, sizeof(client->last_reply) - 1);
	memcpy(client->last_reply, data, n);
	client->last_reply[n] = '\0';
	while (n > 0 && (client->last_reply[n - 1] == '\r' || client->last_reply[n - 1] == '\n'))
		client->last_reply[--n] = '\0';
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

/* progress_cb: abort a transfer when the worker is told to stop. */
static int
progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/* smtp_client_create: a handle for one channel; connects lazily on first send. */
SmtpClient *
smtp_client_create(const SmtpConfig *cfg)
{
	SmtpClient *client = MemoryContextAllocZero(TopMemoryContext, sizeof(SmtpClient));
	CURL	   *curl;

	client->cfg.name = dup_or_null(cfg->name);
	client->cfg.url = dup_or_null(cfg->url);
	client->cfg.from_address = dup_or_null(cfg->from_address);
	client->cfg.username = dup_or_null(cfg->username);
	client->cfg.password = dup_or_null(cfg->password);
	client->cfg.tls = dup_or_null(cfg->tls);

	curl = curl_easy_init();
	if (curl == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OUT_OF_MEMORY),
				 errmsg("notify_ext: could not create a libcurl handle for channel \"%s\"", cfg->name)));
	client->curl = curl;
	return client;
}

/* smtp_client_destroy: close the connection and free the client. */
void
smtp_client_destroy(SmtpClient *client)
{
	if (client == NULL)
		return;
	if (client->curl)
		curl_easy_cleanup(client->curl);
	if (client->cfg.password)
		explicit_bzero(client->cfg.password, strlen(client->cfg.password));
	pfree(client);
}

/* set_common_options: protocol restriction, TLS mode, credentials, timeouts. */
static void
set_common_options(SmtpClient *client)
{
	CURL	   *curl = client->curl;
	const char *tls = client->cfg.tls ? client->cfg.tls : "verify";

	curl_easy_setopt(curl, CURLOPT_URL, client->cfg.url);
	/* nothing but SMTP may ever be spoken, whatever the URL says */
	curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
	curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(curl, CURLOPT_CONNECTTIMEOUT_MS, SMTP_CONNECT_TIMEOUT_MS);
	curl_easy_setopt(curl, CURLOPT_TIMEOUT_MS, SMTP_TOTAL_TIMEOUT_MS);
	curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, progress_cb);
	curl_easy_setopt(curl, CURLOPT_VERBOSE, 1L);
	curl_easy_setopt(curl, CURLOPT_DEBUGFUNCTION, debug_cb);
	curl_easy_setopt(curl, CURLOPT_DEBUGDATA, client);

	if (strcmp(tls, "verify") == 0)
	{
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_ALL);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYPEER, 1L);
		curl_easy_setopt(curl, CURLOPT_SSL_VERIFYHOST, 2L);
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
}

/* add_text_part: one text part, UTF-8, CRLF lines, quoted-printable. */
static void
add_text_part(curl_mime *mime, const char *body, const char *type)
{
	curl_mimepart *part = curl_mime_addpart(mime);
	size_t		len;
	char	   *norm = mime_normalize_crlf(body, strlen(body), &len);

	curl_mime_data(part, norm, len);
	mime_free(norm);
	curl_mime_type(part, type);
	/* quoted-printable keeps lines under 76 bytes and any byte safe on the wire */
	curl_mime_encoder(part, "quoted-printable");
}

/* fail_result: fill a result for a message that cannot be sent as it is. */
static void
fail_result(SendResult *result, SendOutcome outcome, const char *fmt, const char *detail)
{
	result->outcome = outcome;
	snprintf(result->error, sizeof(result->error), fmt, detail);
}

/*
 * smtp_send: deliver one message.  Never raises for what the server or
 * the network does: every outcome lands in *result, classified as sent,
 * permanently failed (5xx) or to be retried (4xx, no connection, timeout).
 */
void
smtp_send(SmtpClient *client, const OutMessage *msg, SendResult *result)
{
	char		errbuf[256];
	char		datebuf[64];
	char		idbuf[320];
	char	   *to_header;
	char	   *subject;
	char	   *from_header;
	struct curl_slist *headers = NULL;
	struct curl_slist *rcpt = NULL;
	curl_mime  *mime = NULL;
	char		curl_err[CURL_ERROR_SIZE];
	CURLcode	res;
	long		code = 0;
	char	   *line;

	memset(result, 0, sizeof(*result));
	client->last_reply[0] = '\0';
	client->quitting = false;
	curl_err[0] = '\0';

	/* everything that could smuggle a header or a command is checked first */
	if (!mime_check_address(msg->address, errbuf, sizeof(errbuf)))
		{
		fail_result(result, SEND_FAILED, "%s", errbuf);
		return;
	}
	to_header = mime_format_mailbox(msg->display_name, msg->address, errbuf, sizeof(errbuf));
	if (to_header == NULL)
		{
		fail_result(result, SEND_FAILED, "To header: %s", errbuf);
		return;
	}
	from_header = mime_format_mailbox(NULL, client->cfg.from_address, errbuf, sizeof(errbuf));
	if (from_header == NULL)
		{
		fail_result(result, SEND_RETRY, "channel's from_address: %s", errbuf);
		return;
	}
	subject = mime_encode_header_text(msg->subject ? msg->subject : "",
									  msg->subject ? strlen(msg->subject) : 0,
									  strlen("Subject: "), errbuf, sizeof(errbuf));
	if (subject == NULL)
		{
		fail_result(result, SEND_FAILED, "Subject: %s", errbuf);
		return;
	}

	headers = curl_slist_append(headers, psprintf("Date: %s", mime_format_date(time(NULL), datebuf, sizeof(datebuf))));
	headers = curl_slist_append(headers, psprintf("From: %s", from_header));
	headers = curl_slist_append(headers, psprintf("To: %s", to_header));
	headers = curl_slist_append(headers, psprintf("Subject: %s", subject));
	headers = curl_slist_append(headers, psprintf("Message-ID: %s",
												  mime_message_id("notify.message", msg->id,
																  mime_domain_of(client->cfg.from_address),
																  idbuf, sizeof(idbuf))));
	/* RFC 3834: tells auto-responders not to answer a machine */
	headers = curl_slist_append(headers, "Auto-Submitted: auto-generated");
	rcpt = curl_slist_append(rcpt, psprintf("<%s>", msg->address));

	mime = curl_mime_init(client->curl);
	if (msg->html_body != NULL)
	{
		curl_mime  *alt = curl_mime_init(client->curl);
		curl_mimepart *part;

		add_text_part(alt, msg->text_body ? msg->text_body : "", "text/plain; charset=UTF-8");
		add_text_part(alt, msg->html_body, "text/html; charset=UTF-8");
		part = curl_mime_addpart(mime);
		curl_mime_subparts(part, alt);
		curl_mime_type(part, "multipart/alternative");
	}
	else
		add_text_part(mime, msg->text_body ? msg->text_body : "", "text/plain; charset=UTF-8");

	for (int i = 0; i < msg->nattachments; i++)
	{
		const OutAttachment *att = &msg->attachments[i];
		curl_mimepart *part = curl_mime_addpart(mime);
		struct curl_slist *disp = NULL;
		char	   *param = mime_encode_filename(att->filename, errbuf, sizeof(errbuf));

		if (param == NULL || !mime_header_value_safe(att->content_type, strlen(att->content_type)))
		{
			curl_mime_free(mime);
			curl_slist_free_all(headers);
			curl_slist_free_all(rcpt);
			fail_result(result, SEND_FAILED, "attachment: %s",
						param == NULL ? errbuf : "content type contains control characters");
			return;
		}
		curl_mime_data(part, att->data, att->len);
		curl_mime_type(part, att->content_type);
		curl_mime_encoder(part, "base64");
		/* RFC 2231 file name: non-ASCII names survive, quotes and paths cannot break out */
		disp = curl_slist_append(disp, psprintf("Content-Disposition: attachment; %s", param));
		curl_mime_headers(part, disp, 1);
		mime_free(param);
	}

	set_common_options(client);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, curl_err);
	curl_easy_setopt(client->curl, CURLOPT_MAIL_FROM, psprintf("<%s>", client->cfg.from_address));
	curl_easy_setopt(client->curl, CURLOPT_MAIL_RCPT, rcpt);
	curl_easy_setopt(client->curl, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(client->curl, CURLOPT_MIMEPOST, mime);

	res = curl_easy_perform(client->curl);
	curl_easy_getinfo(client->curl, CURLINFO_RESPONSE_CODE, &code);

	/* the handle must not keep pointers to what we free now */
	curl_easy_setopt(client->curl, CURLOPT_MIMEPOST, NULL);
	curl_easy_setopt(client->curl, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(client->curl, CURLOPT_MAIL_RCPT, NULL);
	curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, NULL);
	curl_mime_free(mime);
	curl_slist_free_all(headers);
	curl_slist_free_all(rcpt);

	result->code = (int) code;
	line = client->last_reply;
	strlcpy(result->response, line, sizeof(result->response));

	if (res == CURLE_OK)
	{
		result->outcome = SEND_SENT;
		return;
	}
	snprintf(result->error, sizeof(result->error), "%s%s%s",
			 curl_err[0] ? curl_err : curl_easy_strerror(res),
			 line[0] ? "; server said: " : "", line);
	/*
	 * A 5xx reply to the envelope or the data is the server's final word on
	 * this message.  A refused login is not: it is the channel's settings
	 * that are wrong, and the message must wait for them to be fixed.
	 */
	if (code >= 500 && code < 600 && res != CURLE_LOGIN_DENIED)
		result->outcome = SEND_FAILED;
	else
		result->outcome = SEND_RETRY;
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
	SmtpClient *client = smtp_client_create(cfg);
	StringInfoData t;
	SendResult	result;

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
			msg.id = 0;
			msg.address = send_to;
			msg.subject = "notify_ext test message";
			msg.text_body = psprintf("This is a test message sent by notify.test_smtp() through channel \"%s\".\n",
									 cfg->name);
			smtp_send(client, &msg, &result);
		}
		else
		{
			char		curl_err[CURL_ERROR_SIZE];
			CURLcode	res;
			long		code = 0;

			memset(&result, 0, sizeof(result));
			curl_err[0] = '\0';
			set_common_options(client);
			curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, curl_err);
			curl_easy_setopt(client->curl, CURLOPT_CONNECT_ONLY, 1L);
			res = curl_easy_perform(client->curl);
			curl_easy_getinfo(client->curl, CURLINFO_RESPONSE_CODE, &code);
			curl_easy_setopt(client->curl, CURLOPT_ERRORBUFFER, NULL);
			result.code = (int) code;
			if (res == CURLE_OK)
				result.outcome = SEND_SENT;
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
		smtp_client_destroy(client);
	}
	PG_END_TRY();

	if (result.outcome == SEND_SENT)
		appendStringInfo(&t, "OK: %s\n", send_to ? psprintf("test message accepted for %s", send_to)
						 : cfg->username ? "connected, greeted and authenticated" : "connected and greeted");
	else
		appendStringInfo(&t, "FAILED: %s\n", result.error);
	return t.data;
}

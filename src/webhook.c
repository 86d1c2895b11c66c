/*-------------------------------------------------------------------------
 *
 * webhook.c
 *	  libcurl HTTP transport of webhook channels (SMS gateways, chat):
 *	  POSTs a message's body, already rendered at fan-out, and classifies
 *	  the server's answer.
 *
 * A worker sends one message at a time anyway (see notify.workers), so a
 * blocking curl_easy_perform is enough; the worker keeps one easy handle,
 * whose connection cache keeps the gateway's connection open from one
 * message to the next.  Every transfer is bounded (connect 10 s, the
 * whole request notify.webhook_timeout), speaks only HTTP or HTTPS, never
 * follows a redirect, and checks an https server's certificate (against
 * notify.tls_ca_file when set).
 *
 * Outcomes: 2xx is sent; 408, 429, 5xx, timeouts and connection trouble
 * are retried; any other 4xx is the server's final word on the message.
 * A redirect is retried: it is the channel's URL that is wrong, and the
 * message waits for it to be fixed (as a refused SMTP login does).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include <curl/curl.h>

#include "mb/pg_wchar.h"
#include "miscadmin.h"

#include "notify_ext.h"
#include "webhook.h"

#define WEBHOOK_CONNECT_TIMEOUT_MS 10000L
/* how much of a response body the log keeps */
#define WEBHOOK_RESPONSE_KEEP 200

/* What one request heard back: the status line and the start of the body. */
typedef struct WebhookResponse
{
	char		status[128];	/* "404 Not Found" (HTTP/2: "404") */
	char		body[WEBHOOK_RESPONSE_KEEP + 1];
	size_t		body_len;
} WebhookResponse;

static CURL *handle = NULL;

/* write_cb: keeps the first bytes of the response body, reads (and drops) the rest. */
static size_t
write_cb(char *ptr, size_t size, size_t nmemb, void *userdata)
{
	WebhookResponse *resp = (WebhookResponse *) userdata;
	size_t		n = size * nmemb;
	size_t		keep = Min(n, WEBHOOK_RESPONSE_KEEP - resp->body_len);

	memcpy(resp->body + resp->body_len, ptr, keep);
	resp->body_len += keep;
	resp->body[resp->body_len] = '\0';
	return n;
}

/* header_cb: keeps the last status line ("HTTP/1.1 404 Not Found" -> "404 Not Found"). */
static size_t
header_cb(char *buffer, size_t size, size_t nitems, void *userdata)
{
	WebhookResponse *resp = (WebhookResponse *) userdata;
	size_t		n = size * nitems;
	const char *sp;
	size_t		len;

	if (n < 5 || strncmp(buffer, "HTTP/", 5) != 0)
		return n;
	sp = memchr(buffer, ' ', n);
	if (sp == NULL)
		return n;
	sp++;
	len = n - (sp - buffer);
	while (len > 0 && (sp[len - 1] == '\r' || sp[len - 1] == '\n' || sp[len - 1] == ' '))
		len--;
	len = Min(len, sizeof(resp->status) - 1);
	memcpy(resp->status, sp, len);
	resp->status[len] = '\0';
	return n;
}

/* progress_cb: a worker told to stop abandons the request (it is retried). */
static int
progress_cb(void *clientp, curl_off_t dltotal, curl_off_t dlnow, curl_off_t ultotal, curl_off_t ulnow)
{
	return (ProcDiePending || QueryCancelPending) ? 1 : 0;
}

/*
 * printable_excerpt: the first line of what the server said, as text the
 * log can hold: control characters become spaces, and it stops before
 * the first byte that is not valid in the database's encoding.
 */
static void
printable_excerpt(const char *src, size_t len, char *dst, size_t dstlen)
{
	size_t		n = 0;

	while (n < len && src[n] != '\r' && src[n] != '\n')
		n++;
	n = Min(n, dstlen - 1);
	n = pg_encoding_verifymbstr(GetDatabaseEncoding(), src, (int) n);
	for (size_t i = 0; i < n; i++)
	{
		unsigned char c = (unsigned char) src[i];

		dst[i] = (c < 0x20 || c == 0x7f) ? ' ' : (char) c;
	}
	dst[n] = '\0';
}

/*
 * header_is_safe: a name that is a token and a value without control
 * characters.  set_webhook refuses anything else; this is the last line
 * before the bytes go out, whatever wrote notify.channel_secret.
 */
static bool
header_is_safe(const char *name, const char *value)
{
	static const char token_extra[] = "!#$%&'*+.^_`|~-";

	if (name[0] == '\0')
		return false;
	for (const char *p = name; *p; p++)
		if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9')) &&
			strchr(token_extra, *p) == NULL)
			return false;
	for (const unsigned char *p = (const unsigned char *) value; *p; p++)
		if (*p < 0x20 || *p == 0x7f)
			return false;
	return true;
}

/* fail: fill a result for a request that never went out. */
static void
fail(SendResult *result, SendOutcome outcome, const char *message)
{
	result->outcome = outcome;
	strlcpy(result->error, message, sizeof(result->error));
}

/*
 * classify: what became of a request.  Never raises for what the server
 * or the network did.
 */
static void
classify(CURLcode res, long code, const WebhookResponse *resp, const char *curl_err,
		 bool request_sent, SendResult *result)
{
	char		excerpt[WEBHOOK_RESPONSE_KEEP + 1];

	printable_excerpt(resp->body, resp->body_len, excerpt, sizeof(excerpt));
	result->code = (int) code;
	if (code > 0)
		snprintf(result->response, sizeof(result->response), "%s%s%s",
				 resp->status[0] ? resp->status : psprintf("%ld", code),
				 excerpt[0] ? ": " : "", excerpt);

	result->aborted = (res == CURLE_ABORTED_BY_CALLBACK);
	if (res != CURLE_OK)
	{
		const char *why = curl_err[0] ? curl_err : curl_easy_strerror(res);

		if (res == CURLE_OPERATION_TIMEDOUT && request_sent && code == 0)
		{
			/* the gateway has the request and may act on it: say so, and retry */
			result->outcome = SEND_UNKNOWN;
			snprintf(result->error, sizeof(result->error),
					 "unknown outcome: the request was sent but no response came within "
					 "notify.webhook_timeout (%d s): %s; the retry carries the same X-Notify-Message-Id",
					 notify_webhook_timeout, why);
		}
		else
		{
			/* no connection, TLS, a timeout before the request was out: the gateway's trouble */
			result->outcome = SEND_CHANNEL;
			snprintf(result->error, sizeof(result->error), "%s%s", why,
					 res == CURLE_OPERATION_TIMEDOUT
					 ? psprintf(" (notify.webhook_timeout is %d s)", notify_webhook_timeout) : "");
		}
		return;
	}
	if (code >= 200 && code < 300)
	{
		result->outcome = SEND_SENT;
		return;
	}
	if (code >= 300 && code < 400)
	{
		char	   *location = NULL;

		curl_easy_getinfo(handle, CURLINFO_REDIRECT_URL, &location);
		result->outcome = SEND_CHANNEL;
		snprintf(result->error, sizeof(result->error),
				 "the server answered %s; redirects are not followed%s%s: fix the channel's url",
				 result->response, location ? " (to " : "", location ? psprintf("%s)", location) : "");
		return;
	}
	snprintf(result->error, sizeof(result->error), "the server answered %s", result->response);

	/*
	 * A 4xx is the gateway's word on this message (a bad number, a refused
	 * body): it fails.  408, 429 and every 5xx are about the gateway as a
	 * whole (overloaded, down, rate limiting us): the channel fails, and
	 * its messages wait without spending attempts.
	 */
	if (code >= 400 && code < 500 && code != 408 && code != 429)
		result->outcome = SEND_FAILED;
	else
		result->outcome = SEND_CHANNEL;
}

/*
 * webhook_send: POST one message's body to its channel.  Blocks for at
 * most notify.webhook_timeout (a SIGTERM ends it sooner); fills *result.
 */
void
webhook_send(const WebhookConfig *cfg, const OutMessage *msg, SendResult *result)
{
	struct curl_slist *headers = NULL;
	WebhookResponse resp;
	char		curl_err[CURL_ERROR_SIZE];
	const char *body = msg->text_body ? msg->text_body : "";
	CURLcode	res;
	long		code = 0;
	long		request_size = 0;
	curl_off_t	uploaded = 0;

	memset(result, 0, sizeof(*result));
	memset(&resp, 0, sizeof(resp));
	curl_err[0] = '\0';

	if (handle == NULL)
	{
		smtp_global_init();
		handle = curl_easy_init();
		if (handle == NULL)
		{
			fail(result, SEND_CHANNEL, "libcurl: could not create a handle");
			return;
		}
	}

	headers = curl_slist_append(headers, psprintf("Content-Type: %s", cfg->content_type));
	for (int i = 0; i < cfg->nheaders; i++)
	{
		if (!header_is_safe(cfg->header_names[i], cfg->header_values[i]))
		{
			curl_slist_free_all(headers);
			/* the channel's settings are wrong, not the message: it waits for a fix */
			fail(result, SEND_CHANNEL,
				 psprintf("header \"%s\" of channel \"%s\" is not a valid HTTP header (set it again with notify.set_webhook)",
						  cfg->header_names[i], cfg->name));
			return;
		}
		/* "Name;" is libcurl's way of sending a header with an empty value */
		headers = curl_slist_append(headers, cfg->header_values[i][0]
									? psprintf("%s: %s", cfg->header_names[i], cfg->header_values[i])
									: psprintf("%s;", cfg->header_names[i]));
	}
	/* a stable id per message, as Message-ID for mail: a resent request is recognisable */
	headers = curl_slist_append(headers, psprintf("X-Notify-Message-Id: notify.message.%lld", msg->id));
	/* no 100-continue round trip before the body */
	headers = curl_slist_append(headers, "Expect:");

	/* fresh options for each request; the connection cache survives a reset */
	curl_easy_reset(handle);
	curl_easy_setopt(handle, CURLOPT_URL, cfg->url);
	/* nothing but HTTP may ever be spoken, whatever the URL says */
	curl_easy_setopt(handle, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(handle, CURLOPT_FOLLOWLOCATION, 0L);
	curl_easy_setopt(handle, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(handle, CURLOPT_CONNECTTIMEOUT_MS, WEBHOOK_CONNECT_TIMEOUT_MS);
	curl_easy_setopt(handle, CURLOPT_TIMEOUT_MS, (long) notify_webhook_timeout * 1000L);
	curl_easy_setopt(handle, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(handle, CURLOPT_SSL_VERIFYHOST, 2L);
	if (notify_tls_ca_file && notify_tls_ca_file[0])
		curl_easy_setopt(handle, CURLOPT_CAINFO, notify_tls_ca_file);
	curl_easy_setopt(handle, CURLOPT_USERAGENT, "notify_ext");
	curl_easy_setopt(handle, CURLOPT_POST, 1L);
	curl_easy_setopt(handle, CURLOPT_POSTFIELDS, body);
	curl_easy_setopt(handle, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t) strlen(body));
	curl_easy_setopt(handle, CURLOPT_HTTPHEADER, headers);
	curl_easy_setopt(handle, CURLOPT_WRITEFUNCTION, write_cb);
	curl_easy_setopt(handle, CURLOPT_WRITEDATA, &resp);
	curl_easy_setopt(handle, CURLOPT_HEADERFUNCTION, header_cb);
	curl_easy_setopt(handle, CURLOPT_HEADERDATA, &resp);
	curl_easy_setopt(handle, CURLOPT_NOPROGRESS, 0L);
	curl_easy_setopt(handle, CURLOPT_XFERINFOFUNCTION, progress_cb);
	curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, curl_err);

	res = curl_easy_perform(handle);

	curl_easy_getinfo(handle, CURLINFO_RESPONSE_CODE, &code);
	curl_easy_getinfo(handle, CURLINFO_REQUEST_SIZE, &request_size);
	curl_easy_getinfo(handle, CURLINFO_SIZE_UPLOAD_T, &uploaded);
	/* the handle must not keep pointers to what is freed here */
	curl_easy_setopt(handle, CURLOPT_HTTPHEADER, NULL);
	curl_easy_setopt(handle, CURLOPT_ERRORBUFFER, NULL);
	curl_easy_setopt(handle, CURLOPT_POSTFIELDS, NULL);
	curl_easy_setopt(handle, CURLOPT_WRITEDATA, NULL);
	curl_easy_setopt(handle, CURLOPT_HEADERDATA, NULL);
	curl_slist_free_all(headers);

	classify(res, code, &resp, curl_err,
			 request_size > 0 && uploaded == (curl_off_t) strlen(body), result);
}

/* webhook_shutdown: close the handle and its connections (worker exit, extension dropped). */
void
webhook_shutdown(void)
{
	if (handle != NULL)
		curl_easy_cleanup(handle);
	handle = NULL;
}

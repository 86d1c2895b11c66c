/*
 * curl_ceiling: how fast libcurl alone sends, set up as the worker's
 * transport does it (src/smtp.c): a multi handle driven by
 * curl_multi_perform/curl_multi_poll, one transfer at a time per process,
 * the connection reused, MIME with one quoted-printable text part, the
 * same headers, VERBOSE with a debug callback.  No database: the
 * difference to test/bench/delivery.py's figure is what the worker's
 * database work (fan-out, claim, record) costs.  Diagnostic only, not run
 * by test/bench/run:
 *
 *   cc -O2 -o /tmp/curl_ceiling test/bench/curl_ceiling.c -lcurl
 *   /tmp/curl_ceiling smtp://127.0.0.1:PORT 20000 4 [quiet] [raw]   (against smtp-sink)
 *
 * quiet: no VERBOSE/debug callback; raw: the message uploaded ready-made
 * with a read callback instead of libcurl's MIME and quoted-printable
 * encoder.  "quiet raw" is how the worker sends since 0.2 (src/smtp.c);
 * like the worker, every process keeps freed memory (no brk per message).
 * Prints messages/s and CPU per message (all processes).
 */
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <malloc.h>

static int
debug_cb(CURL *h, curl_infotype type, char *data, size_t size, void *userp)
{
	static char last[512];

	(void) h;
	(void) userp;
	if (type == CURLINFO_HEADER_IN && size > 0)
	{
		size_t		n = size < sizeof(last) - 1 ? size : sizeof(last) - 1;

		memcpy(last, data, n);
		last[n] = '\0';
	}
	return 0;
}

static int	quiet = 0;
static int	raw = 0;

typedef struct Upload
{
	const char *data;
	size_t		len;
	size_t		pos;
} Upload;

static size_t
read_cb(char *buf, size_t size, size_t nitems, void *userp)
{
	Upload	   *u = (Upload *) userp;
	size_t		n = size * nitems;

	if (n > u->len - u->pos)
		n = u->len - u->pos;
	memcpy(buf, u->data + u->pos, n);
	u->pos += n;
	return n;
}

static int
progress_cb(void *p, curl_off_t a, curl_off_t b, curl_off_t c, curl_off_t d)
{
	(void) p;
	(void) a;
	(void) b;
	(void) c;
	(void) d;
	return 0;
}

static int
send_all(const char *url, int n, int id)
{
	CURLM	   *multi = curl_multi_init();
	CURL	   *curl = curl_easy_init();
	char		body[4096];
	size_t		len = 0;

	len += snprintf(body + len, sizeof(body) - len, "Hello,\r\n\r\nyour order 12345 for 12445.50 EUR was registered.\r\n\r\n");
	for (int i = 0; i < 24; i++)
		len += snprintf(body + len, sizeof(body) - len,
						"Line %02d: the quick brown fox jumps over the lazy dog, 0123456789 abcdefgh.\r\n", i);
	curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, 4L);
	for (int i = 0; i < n; i++)
	{
		struct curl_slist *headers = NULL;
		struct curl_slist *rcpt = NULL;
		curl_mime  *mime = curl_mime_init(curl);
		curl_mimepart *part = curl_mime_addpart(mime);
		char		buf[256];
		int			running;
		CURLMsg    *msg;
		int			left;
		int			done = 0;

		curl_mime_data(part, body, len);
		curl_mime_type(part, "text/plain; charset=UTF-8");
		curl_mime_encoder(part, "quoted-printable");
		headers = curl_slist_append(headers, "Date: Mon, 23 Nov 2026 14:00:00 +0000");
		headers = curl_slist_append(headers, "From: erp@example.com");
		snprintf(buf, sizeof(buf), "To: customer%d@example.com", i);
		headers = curl_slist_append(headers, buf);
		snprintf(buf, sizeof(buf), "Subject: Order %d registered", i);
		headers = curl_slist_append(headers, buf);
		snprintf(buf, sizeof(buf), "Message-ID: <notify.message.%d.%d@example.com>", id, i);
		headers = curl_slist_append(headers, buf);
		headers = curl_slist_append(headers, "Auto-Submitted: auto-generated");
		snprintf(buf, sizeof(buf), "<customer%d@example.com>", i);
		rcpt = curl_slist_append(rcpt, buf);

		curl_easy_setopt(curl, CURLOPT_URL, url);
		curl_easy_setopt(curl, CURLOPT_PROTOCOLS_STR, "smtp,smtps");
		curl_easy_setopt(curl, CURLOPT_NOSIGNAL, 1L);
		curl_easy_setopt(curl, CURLOPT_VERBOSE, quiet ? 0L : 1L);
		curl_easy_setopt(curl, CURLOPT_DEBUGFUNCTION, debug_cb);
		curl_easy_setopt(curl, CURLOPT_NOPROGRESS, 0L);
		curl_easy_setopt(curl, CURLOPT_XFERINFOFUNCTION, progress_cb);
		curl_easy_setopt(curl, CURLOPT_USE_SSL, (long) CURLUSESSL_NONE);
		curl_easy_setopt(curl, CURLOPT_MAIL_FROM, "<erp@example.com>");
		curl_easy_setopt(curl, CURLOPT_MAIL_RCPT, rcpt);
		if (raw)
		{
			static char message[8192];
			static Upload up;

			up.len = snprintf(message, sizeof(message),
							  "Date: Mon, 23 Nov 2026 14:00:00 +0000\r\nFrom: erp@example.com\r\n"
							  "To: customer%d@example.com\r\nSubject: Order %d registered\r\n"
							  "Message-ID: <notify.message.%d.%d@example.com>\r\n"
							  "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
							  "Content-Type: text/plain; charset=UTF-8\r\n"
							  "Content-Transfer-Encoding: quoted-printable\r\n\r\n%s",
							  i, i, id, i, body);
			up.data = message;
			up.pos = 0;
			curl_easy_setopt(curl, CURLOPT_READFUNCTION, read_cb);
			curl_easy_setopt(curl, CURLOPT_READDATA, &up);
			curl_easy_setopt(curl, CURLOPT_UPLOAD, 1L);
		}
		else
		{
			curl_easy_setopt(curl, CURLOPT_HTTPHEADER, headers);
			curl_easy_setopt(curl, CURLOPT_MIMEPOST, mime);
		}
		curl_multi_add_handle(multi, curl);
		while (!done)
		{
			curl_multi_perform(multi, &running);
			while ((msg = curl_multi_info_read(multi, &left)) != NULL)
				if (msg->msg == CURLMSG_DONE)
				{
					if (msg->data.result != CURLE_OK)
					{
						fprintf(stderr, "transfer %d: %s\n", i, curl_easy_strerror(msg->data.result));
						return 1;
					}
					done = 1;
				}
			if (!done)
				curl_multi_poll(multi, NULL, 0, 100, NULL);
		}
		curl_multi_remove_handle(multi, curl);
		curl_easy_setopt(curl, CURLOPT_MIMEPOST, NULL);
		curl_mime_free(mime);
		curl_slist_free_all(headers);
		curl_slist_free_all(rcpt);
	}
	curl_easy_cleanup(curl);
	curl_multi_cleanup(multi);
	return 0;
}

int
main(int argc, char **argv)
{
	/* as the worker does (src/worker.c, keep_freed_memory) */
	mallopt(M_TRIM_THRESHOLD, 32 * 1024 * 1024);
	mallopt(M_TOP_PAD, 1024 * 1024);

	const char *url;
	int			n;
	int			procs;
	struct timespec t0, t1;
	struct rusage ru;
	int			failed = 0;
	double		secs, cpu;

	if (argc < 4)
	{
		fprintf(stderr, "usage: %s smtp://host:port messages processes [quiet] [raw]\n", argv[0]);
		return 2;
	}
	for (int i = 4; i < argc; i++)
	{
		quiet |= strcmp(argv[i], "quiet") == 0;
		raw |= strcmp(argv[i], "raw") == 0;
	}
	url = argv[1];
	n = atoi(argv[2]);
	procs = atoi(argv[3]);
	curl_global_init(CURL_GLOBAL_DEFAULT);
	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (int p = 0; p < procs; p++)
		if (fork() == 0)
			_exit(send_all(url, n / procs + (p < n % procs), p));
	for (int p = 0; p < procs; p++)
	{
		int			st;

		wait(&st);
		failed |= !WIFEXITED(st) || WEXITSTATUS(st) != 0;
	}
	clock_gettime(CLOCK_MONOTONIC, &t1);
	getrusage(RUSAGE_CHILDREN, &ru);
	secs = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
	cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	printf("libcurl alone%s%s: %d messages, %d processes: %.2f s = %.0f msgs/s, CPU %.0f us/msg\n",
		   quiet ? ", quiet" : "", raw ? ", raw" : "", n, procs, secs, n / secs, 1e6 * cpu / n);
	return failed;
}

/*-------------------------------------------------------------------------
 *
 * imap_driver.c
 *	  Drives src/imap.c from the command line for test/e2e/test_imap.py.
 *
 *	  imap_driver urlcheck URL...
 *		  one line per URL: "url ok" or "url refused: <why>"
 *	  imap_driver COMMAND...
 *		  one session: open, the commands in order, close.  Commands:
 *		  search, fetch UID, seen UID, fetchall (search, then fetch each),
 *		  sleep MS (the session idle).
 *
 * The session's settings come from the environment, the password too (an
 * argument would show in ps): IMAP_URL, IMAP_USER, IMAP_PASSWORD, IMAP_TLS,
 * IMAP_CA_FILE, IMAP_CONNECT_TIMEOUT_MS, IMAP_TIMEOUT_MS,
 * IMAP_MAX_MESSAGE_BYTES; IMAP_ABORT_AFTER_MS makes the abort callback
 * answer 1 from that many ms after the driver started; IMAP_OUT_DIR is
 * where fetched messages are written, as <uid>.eml.
 *
 * One line per step on stdout, for Python to parse:
 *	  <step> ok|refused|failed ms=<elapsed> [key=value]...[: <error text>]
 * The close line's total= is the time since the driver started.
 * After a failed step (the session is unusable) the driver closes it and
 * stops.  The exit status is 0 unless the command line is wrong (2).
 *
 * test/imap_driver.c
 *
 *-------------------------------------------------------------------------
 */
#define _POSIX_C_SOURCE 200809L

#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "imap.h"

static long long start_ms;
static long abort_after_ms = -1;

/* now_ms: a monotonic clock in milliseconds. */
static long long
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* abort_after: the abort callback: 1 once IMAP_ABORT_AFTER_MS have passed. */
static int
abort_after(void *arg)
{
	(void) arg;
	return abort_after_ms >= 0 && now_ms() - start_ms >= abort_after_ms;
}

/* env_long: a number from the environment, or def. */
static long
env_long(const char *name, long def)
{
	const char *v = getenv(name);

	return v && *v ? strtol(v, NULL, 10) : def;
}

/* status_word: how a step ended, as the output says it. */
static const char *
status_word(ImapStatus status)
{
	return status == IMAP_OK ? "ok" : status == IMAP_REFUSED ? "refused" : "failed";
}

/* write_message: a fetched message into IMAP_OUT_DIR/<uid>.eml. */
static void
write_message(uint32_t uid, const char *data, size_t len)
{
	const char *dir = getenv("IMAP_OUT_DIR");
	char		path[4096];
	FILE	   *f;

	if (dir == NULL || *dir == '\0')
		return;
	snprintf(path, sizeof(path), "%s/%u.eml", dir, (unsigned) uid);
	f = fopen(path, "wb");
	if (f == NULL || fwrite(data, 1, len, f) != len || fclose(f) != 0)
	{
		fprintf(stderr, "imap_driver: cannot write %s\n", path);
		exit(3);
	}
}

/* do_fetch: one fetch step; returns its status. */
static ImapStatus
do_fetch(ImapSession *s, uint32_t uid)
{
	char		err[1024];
	char	   *data;
	size_t		len;
	long long	t = now_ms();
	ImapStatus	status = imap_fetch(s, uid, &data, &len, err, sizeof(err));

	if (status == IMAP_OK)
	{
		printf("fetch ok ms=%lld uid=%u len=%zu\n", now_ms() - t, (unsigned) uid, len);
		write_message(uid, data, len);
		free(data);
	}
	else
		printf("fetch %s ms=%lld uid=%u: %s\n", status_word(status), now_ms() - t,
			   (unsigned) uid, err);
	fflush(stdout);
	return status;
}

/* do_search: one search step; the UIDs in *uids (caller frees). */
static ImapStatus
do_search(ImapSession *s, uint32_t **uids, size_t *n)
{
	char		err[1024];
	long long	t = now_ms();
	ImapStatus	status = imap_search_unseen(s, uids, n, err, sizeof(err));

	if (status == IMAP_OK)
	{
		printf("search ok ms=%lld uids=", now_ms() - t);
		for (size_t i = 0; i < *n; i++)
			printf("%s%u", i ? "," : "", (unsigned) (*uids)[i]);
		printf("\n");
	}
	else
		printf("search %s ms=%lld: %s\n", status_word(status), now_ms() - t, err);
	fflush(stdout);
	return status;
}

/* parse_uid: a UID argument, or exit 2. */
static uint32_t
parse_uid(const char *arg)
{
	char	   *end;
	unsigned long v = arg ? strtoul(arg, &end, 10) : 0;

	if (arg == NULL || *end != '\0' || v == 0 || v > UINT32_MAX)
	{
		fprintf(stderr, "imap_driver: bad UID '%s'\n", arg ? arg : "");
		exit(2);
	}
	return (uint32_t) v;
}

/* run_session: open, the commands, close. */
static void
run_session(int argc, char **argv)
{
	ImapConfig	cfg = {0};
	ImapSession *s;
	char		err[1024];
	long long	t;

	cfg.url = getenv("IMAP_URL");
	cfg.username = getenv("IMAP_USER");
	cfg.password = getenv("IMAP_PASSWORD");
	cfg.tls = getenv("IMAP_TLS");
	cfg.ca_file = getenv("IMAP_CA_FILE");
	cfg.connect_timeout_ms = env_long("IMAP_CONNECT_TIMEOUT_MS", 0);
	cfg.timeout_ms = env_long("IMAP_TIMEOUT_MS", 0);
	cfg.max_message_bytes = (size_t) env_long("IMAP_MAX_MESSAGE_BYTES", 0);
	cfg.abort_cb = abort_after;
	cfg.abort_arg = NULL;

	t = now_ms();
	s = imap_open(&cfg, err, sizeof(err));
	if (s == NULL)
	{
		printf("open failed ms=%lld: %s\n", now_ms() - t, err);
		return;
	}
	printf("open ok ms=%lld uidvalidity=%u\n", now_ms() - t, (unsigned) imap_uidvalidity(s));
	fflush(stdout);

	for (int i = 0; i < argc; i++)
	{
		ImapStatus	status;

		if (strcmp(argv[i], "search") == 0 || strcmp(argv[i], "fetchall") == 0)
		{
			uint32_t   *uids = NULL;
			size_t		n = 0;

			status = do_search(s, &uids, &n);
			if (strcmp(argv[i], "fetchall") == 0)
				for (size_t k = 0; k < n && status != IMAP_FAILED; k++)
					status = do_fetch(s, uids[k]);
			free(uids);
		}
		else if (strcmp(argv[i], "fetch") == 0)
			status = do_fetch(s, parse_uid(argv[++i]));
		else if (strcmp(argv[i], "sleep") == 0 && i + 1 < argc)
		{
			long		ms = strtol(argv[++i], NULL, 10);
			struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};

			nanosleep(&ts, NULL);
			status = IMAP_OK;
		}
		else if (strcmp(argv[i], "seen") == 0)
		{
			uint32_t	uid = parse_uid(argv[++i]);

			t = now_ms();
			status = imap_mark_seen(s, uid, err, sizeof(err));
			if (status == IMAP_OK)
				printf("seen ok ms=%lld uid=%u\n", now_ms() - t, (unsigned) uid);
			else
				printf("seen %s ms=%lld uid=%u: %s\n", status_word(status), now_ms() - t,
					   (unsigned) uid, err);
		}
		else
		{
			fprintf(stderr, "imap_driver: unknown command '%s'\n", argv[i]);
			exit(2);
		}
		fflush(stdout);
		if (status == IMAP_FAILED)
			break;
	}
	t = now_ms();
	imap_close(s);
	printf("close ok ms=%lld total=%lld\n", now_ms() - t, now_ms() - start_ms);
}

int
main(int argc, char **argv)
{
	start_ms = now_ms();
	abort_after_ms = env_long("IMAP_ABORT_AFTER_MS", -1);
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
	{
		fprintf(stderr, "imap_driver: curl_global_init failed\n");
		return 1;
	}
	if (argc >= 2 && strcmp(argv[1], "urlcheck") == 0)
	{
		for (int i = 2; i < argc; i++)
		{
			char		err[512];

			if (imap_url_valid(argv[i], err, sizeof(err)))
				printf("url ok\n");
			else
				printf("url refused: %s\n", err);
		}
	}
	else
		run_session(argc - 1, argv + 1);
	fflush(stdout);
	curl_global_cleanup();
	return 0;
}

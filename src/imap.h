/*-------------------------------------------------------------------------
 *
 * imap.h
 *	  The IMAP transport of the bounce mailbox: log in with libcurl, list
 *	  the unseen messages, fetch each one whole without marking it read,
 *	  and flag it \Seen once it has been processed.
 *
 * This module is plain C: libcurl and libc, no PostgreSQL headers, memory
 * from malloc, so that it can be driven and tested on its own
 * (test/imap_driver.c).  The caller runs curl_global_init() first (the
 * worker's smtp_global_init does).
 *
 * One ImapSession is one logged-in connection with the mailbox selected
 * read-write; every command of the session goes over it.  A session is
 * used by one thread at a time.
 *
 * Every function that can fail writes what went wrong into the caller's
 * err buffer (always NUL-terminated, cut at a character boundary): the
 * step that failed ("url", "tls setting", "connect", "TLS", "greeting",
 * "login", "select", "search", "fetch", "store"), a colon, and what went
 * wrong, quoting the server ("server said: NO ...") when it answered.
 * The text is valid UTF-8 without control characters, safe to store in a
 * text column as it is, and never contains the password: any occurrence
 * of it in a server's reply is replaced by "***".
 *
 * UIDs are used within the session that listed them and are never kept
 * by this module; the \Seen flag, which lives on the server, is what
 * records that a message was processed.  So a mailbox that is recreated
 * between two sessions (a new UIDVALIDITY) needs no handling here;
 * imap_uidvalidity() is there for a caller that stores UIDs.
 *
 * src/imap.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_IMAP_H
#define NOTIFY_IMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define IMAP_DEFAULT_CONNECT_TIMEOUT_MS 10000L
#define IMAP_DEFAULT_TIMEOUT_MS 30000L
#define IMAP_DEFAULT_MAX_MESSAGE_BYTES ((size_t) 10 * 1024 * 1024)
#define IMAP_MAX_URL_LEN 2048

/*
 * Where the bounce mailbox is and how to reach it.  The strings are the
 * caller's and are only read during imap_open().
 */
typedef struct ImapConfig
{
	/*
	 * imap://host[:port][/MAILBOX] (STARTTLS as tls says) or
	 * imaps://host[:port][/MAILBOX] (TLS from the first byte); the mailbox
	 * is percent-encoded, INBOX when absent.  See imap_url_valid().
	 */
	const char *url;
	const char *username;
	const char *password;

	/*
	 * "verify" (NULL means this): TLS required, the certificate checked
	 * against ca_file and the host name; over imap:// the server must
	 * offer STARTTLS, or nothing is sent after CAPABILITY.  "require": TLS
	 * required, certificate not checked.  "try": STARTTLS when offered,
	 * else clear text.  "off": clear text, not allowed with imaps://.
	 */
	const char *tls;
	const char *ca_file;		/* PEM bundle for "verify"; NULL or "": the system's */

	/* TCP connect, TLS handshake, greeting and login together; 0: 10 s */
	long		connect_timeout_ms;
	/* each command after login, from sending it to its last reply; 0: 30 s */
	long		timeout_ms;
	/* the largest message imap_fetch returns; 0: 10 MB */
	size_t		max_message_bytes;

	/*
	 * Polled at least every 100 ms while the session waits for the
	 * server, the login included; nonzero gives up the command at once,
	 * and the session with it.  NULL: never.
	 */
	int			(*abort_cb) (void *arg);
	void	   *abort_arg;
} ImapConfig;

/* How a command ended */
typedef enum ImapStatus
{
	IMAP_OK = 0,

	/*
	 * This command, or this message, failed: the server refused it (NO or
	 * BAD), there is no message with that UID, or the message is over
	 * max_message_bytes.  The session is still usable.
	 */
	IMAP_REFUSED = 1,

	/*
	 * The connection failed, timed out, was aborted, or the server broke
	 * the protocol: the session is unusable; imap_close() it.
	 */
	IMAP_FAILED = -1
} ImapStatus;

typedef struct ImapSession ImapSession;

/*
 * imap_url_valid: whether url is an imap:// or imaps:// URL that imap_open
 * accepts: a host name or address, an optional port, an optional mailbox
 * of printable ASCII (percent-encoded as needed), and nothing else (no
 * user name or password, ;parameters, query or fragment).  On false, err
 * says why.
 */
extern bool imap_url_valid(const char *url, char *err, size_t errsize);

/*
 * imap_open: connect, log in and select the mailbox read-write.  NULL on
 * failure, with err filled.
 */
extern ImapSession *imap_open(const ImapConfig *cfg, char *err, size_t errsize);

/*
 * imap_search_unseen: the UIDs of the messages without \Seen (UID SEARCH
 * UNSEEN), ascending, in a malloc'd array the caller frees (NULL when
 * there are none).
 */
extern ImapStatus imap_search_unseen(ImapSession *session, uint32_t **uids, size_t *n,
									 char *err, size_t errsize);

/*
 * imap_fetch: the message whole, as the server stores it (RFC 5322, CRLF
 * lines), in a malloc'd buffer the caller frees; NUL-terminated for
 * convenience (len does not count it; the message itself may hold NULs).
 * Read with BODY.PEEK[], so its flags are left as they are.  A message
 * over max_message_bytes is IMAP_REFUSED, and no more than
 * max_message_bytes + 1 of it is transferred.
 */
extern ImapStatus imap_fetch(ImapSession *session, uint32_t uid, char **data, size_t *len,
							 char *err, size_t errsize);

/*
 * imap_mark_seen: flags the message \Seen (UID STORE +FLAGS) and checks
 * that the server reports it so.
 */
extern ImapStatus imap_mark_seen(ImapSession *session, uint32_t uid, char *err, size_t errsize);

/* imap_uidvalidity: the mailbox's UIDVALIDITY as SELECT reported it; 0 if none. */
extern uint32_t imap_uidvalidity(const ImapSession *session);

/*
 * imap_close: logs out (waiting at most 2 s for the server) when the
 * session is usable, else just closes the connection; frees everything.
 * NULL is allowed.
 */
extern void imap_close(ImapSession *session);

#endif							/* NOTIFY_IMAP_H */

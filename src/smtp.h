/*-------------------------------------------------------------------------
 *
 * smtp.h
 *	  The SMTP transport: parallel transfers over connections that are
 *	  reused across messages, and notify.test_smtp's step-by-step dialogue.
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_SMTP_H
#define NOTIFY_SMTP_H

/* What became of one delivery try. */
typedef enum SendOutcome
{
	SEND_SENT,					/* the server accepted the message (250 after DATA) */
	SEND_FAILED,				/* permanent: 5xx, or a message that can never be sent */
	SEND_RETRY,					/* temporary: 4xx, connection trouble, timeout */
	SEND_UNKNOWN,				/* no reply after the end of the data: the server
								 * may have the message; retried, same Message-ID */
	SEND_CHANNEL				/* the channel failed, not the message (no
								 * connection, TLS, login, 421, a gateway's 5xx):
								 * the message waits, no attempt is spent */
} SendOutcome;

typedef struct SendResult
{
	SendOutcome outcome;
	bool		aborted;		/* cut short because the worker is stopping: not an outcome */
	int			code;			/* last SMTP reply code, 0 if none */
	char		response[512];	/* the server's last reply line */
	char		error[512];		/* what went wrong, for the log */
} SendResult;

/* A channel's settings, as stored in notify.channel and notify.channel_secret. */
typedef struct SmtpConfig
{
	char	   *name;
	char	   *url;
	char	   *from_address;
	char	   *username;
	char	   *password;
	char	   *tls;
	int			rate_per_minute;	/* 0: no limit */
	char	   *bounce_address; /* the envelope's base when not from_address; NULL */
} SmtpConfig;

/* A file sent with a message. */
typedef struct OutAttachment
{
	const char *filename;
	const char *content_type;
	const char *data;
	size_t		len;
} OutAttachment;

/* One message, ready to go. */
typedef struct OutMessage
{
	long long	id;
	const char *id_kind;		/* Message-ID's kind: NULL for "notify.message" */
	const char *address;
	const char *display_name;
	const char *subject;
	const char *text_body;
	const char *html_body;		/* NULL: text only */
	int			nattachments;
	OutAttachment *attachments;
} OutMessage;

/*
 * A worker's transfers, driven by one libcurl multi handle whose
 * connection cache keeps connections open from one message (and one
 * batch) to the next, with a deadline for each step of the dialogue.
 */
typedef struct SmtpPool SmtpPool;

extern void smtp_global_init(void);
extern SmtpPool *smtp_pool_create(void);
extern void smtp_pool_destroy(SmtpPool *pool);
extern int	smtp_pool_active(const SmtpPool *pool);
extern bool smtp_pool_can_chain(SmtpPool *pool, const SmtpConfig *cfg);
extern bool smtp_pool_start(SmtpPool *pool, const SmtpConfig *cfg, const OutMessage *msg,
							SendResult *result, int64 tag);
extern bool smtp_pool_next_done(SmtpPool *pool, long timeout_ms, int64 *tag, SendResult *result);
extern void smtp_pool_abandon(SmtpPool *pool);
extern char *smtp_test_connection(const SmtpConfig *cfg, const char *send_to);

#endif							/* NOTIFY_SMTP_H */

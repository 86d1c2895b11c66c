/*-------------------------------------------------------------------------
 *
 * smtp.h
 *	  The SMTP transport: one libcurl handle per channel, reused across
 *	  messages so that a batch travels over one connection.
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
	SEND_RETRY					/* temporary: 4xx, connection trouble, timeout */
} SendOutcome;

typedef struct SendResult
{
	SendOutcome outcome;
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
	const char *address;
	const char *display_name;
	const char *subject;
	const char *text_body;
	const char *html_body;		/* NULL: text only */
	int			nattachments;
	OutAttachment *attachments;
} OutMessage;

typedef struct SmtpClient SmtpClient;

extern void smtp_global_init(void);
extern SmtpClient *smtp_client_create(const SmtpConfig *cfg);
extern bool smtp_client_matches(const SmtpClient *client, const SmtpConfig *cfg);
extern void smtp_client_destroy(SmtpClient *client);
extern void smtp_send(SmtpClient *client, const OutMessage *msg, SendResult *result);
extern char *smtp_test_connection(const SmtpConfig *cfg, const char *send_to);

#endif							/* NOTIFY_SMTP_H */

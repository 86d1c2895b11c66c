/*-------------------------------------------------------------------------
 *
 * webhook.h
 *	  The HTTP transport of webhook channels: one POST per message, over a
 *	  connection kept open between messages.
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_WEBHOOK_H
#define NOTIFY_WEBHOOK_H

#include "smtp.h"

/* A webhook channel's settings, as stored in notify.channel and notify.channel_secret. */
typedef struct WebhookConfig
{
	char	   *name;
	char	   *url;
	char	   *content_type;
	int			nheaders;
	char	  **header_names;
	char	  **header_values;	/* may hold secrets: never logged */
	int			rate_per_minute;	/* 0: no limit */
} WebhookConfig;

extern void webhook_send(const WebhookConfig *cfg, const OutMessage *msg, SendResult *result);
extern void webhook_shutdown(void);

#endif							/* NOTIFY_WEBHOOK_H */

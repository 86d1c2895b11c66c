/*-------------------------------------------------------------------------
 *
 * dsn.h
 *	  Reading bounce and complaint reports: RFC 3464 delivery status
 *	  notifications, RFC 5965 feedback (abuse) reports, and the plain-text
 *	  bounces of qmail and older Exim.
 *
 * The worker fetches each mail of the bounce mailbox as raw bytes and hands
 * them to dsn_parse(), which says what the mail is and pulls out what is
 * needed to find the message it is about (the VERP address it was sent to,
 * the returned Message-ID) and what happened to each recipient.
 *
 * This module is plain C: no PostgreSQL or libcurl headers, libc only, so it
 * can be unit-tested and fuzzed standalone.  The input is untrusted: any
 * byte sequence of any length is accepted (NUL bytes included, no
 * terminator needed); the parser never reads outside [raw, raw + len), its
 * work is linear in len and the memory it allocates is bounded (under
 * 1 MB, whatever len is).
 *
 * Every string in a DsnReport is malloc'd, NUL-terminated, valid UTF-8
 * without control characters (invalid bytes become U+FFFD, controls and
 * line breaks a space, runs of white space one space), trimmed, and at
 * most DSN_MAX_TEXT bytes (cut at a character boundary): safe to store in
 * a PostgreSQL text column as it is.  A field that is absent is NULL.
 *
 * src/dsn.h
 *
 *-------------------------------------------------------------------------
 */
#ifndef NOTIFY_DSN_H
#define NOTIFY_DSN_H

#include <stdbool.h>
#include <stddef.h>

#define DSN_MAX_RECIPIENTS	100		/* recipients kept per report */
#define DSN_MAX_ADDRESSES	16		/* envelope address candidates kept */
#define DSN_MAX_TEXT		1000	/* bytes of any string, NUL excluded */
#define DSN_STATUS_SIZE		12		/* "5.123.123" and NUL */
#define DSN_VERP_TOKEN_SIZE 128		/* longest token dsn_verp_token returns, NUL included */

/* What a mail is */
typedef enum DsnKind
{
	DSN_KIND_OTHER = 0,			/* not a report: auto-reply, spam, a person */
	DSN_KIND_DELIVERY_STATUS,	/* delivery status notification (a bounce) */
	DSN_KIND_COMPLAINT,			/* feedback report: abuse, fraud, virus, other */
	DSN_KIND_MALFORMED			/* a report that cannot be read */
} DsnKind;

/* Which format the report was read from */
typedef enum DsnFormat
{
	DSN_FORMAT_NONE = 0,
	DSN_FORMAT_RFC3464,			/* message/delivery-status part */
	DSN_FORMAT_RFC5965,			/* message/feedback-report part (ARF) */
	DSN_FORMAT_QMAIL,			/* qmail-send's plain-text bounce */
	DSN_FORMAT_EXIM_TEXT		/* Exim's plain-text failure or delay warning */
} DsnFormat;

/* The Action field of one recipient (RFC 3464 section 2.3.3) */
typedef enum DsnAction
{
	DSN_ACTION_NONE = 0,		/* absent or unknown; always so in complaints */
	DSN_ACTION_FAILED,
	DSN_ACTION_DELAYED,
	DSN_ACTION_DELIVERED,
	DSN_ACTION_RELAYED,
	DSN_ACTION_EXPANDED
} DsnAction;

/* Where an envelope address candidate was found */
typedef enum DsnAddressSource
{
	DSN_ADDR_X_ORIGINAL_TO,		/* the report's X-Original-To (Postfix local delivery) */
	DSN_ADDR_DELIVERED_TO,		/* the report's Delivered-To */
	DSN_ADDR_ENVELOPE_TO,		/* the report's Envelope-to (Exim local delivery) */
	DSN_ADDR_TO,				/* the report's To */
	DSN_ADDR_REPORTED_SENDER,	/* X-Postfix-Sender of the delivery-status part */
	DSN_ADDR_ORIGINAL_MAIL_FROM,	/* Original-Mail-From of a feedback report */
	DSN_ADDR_RETURNED_RETURN_PATH,	/* Return-Path of the returned message */
	DSN_ADDR_RETURN_PATH		/* the report's own Return-Path (usually <>) */
} DsnAddressSource;

/* One recipient of a delivery status notification, or one complained-of address */
typedef struct DsnRecipient
{
	char	   *final_recipient;	/* address, type ("rfc822;") and <> stripped */
	char	   *original_recipient; /* Original-Recipient, the same way */
	DsnAction	action;			/* when absent: from the Status class */
	char		status[DSN_STATUS_SIZE];	/* "5.1.1", or "" when absent */
	char	   *diagnostic;		/* Diagnostic-Code unfolded, type ("smtp;") stripped */
	char	   *remote_mta;		/* Remote-MTA, type ("dns;") stripped */
} DsnRecipient;

/* An address a report was sent to or names as the original sender */
typedef struct DsnAddress
{
	DsnAddressSource source;
	char	   *address;		/* bare "local@domain" */
} DsnAddress;

/*
 * What dsn_parse() read.  returned_message_id is the Message-ID of the
 * returned message or headers, else Gmail's X-Original-Message-ID, else
 * (reports only) the report's In-Reply-To or last References entry.
 * addresses are the VERP candidates, best first in the order of
 * DsnAddressSource, at most two per source, without duplicates (compared
 * case-insensitively).  Complaints list the complained-of address (from
 * Original-Rcpt-To, Removal-Recipient or the returned To) as a recipient
 * with no action, when the provider has not redacted it.
 */
typedef struct DsnReport
{
	DsnKind		kind;
	DsnFormat	format;
	const char *error;			/* static text: why the report is MALFORMED, else NULL */

	char	   *reporting_mta;	/* Reporting-MTA, type stripped */
	char	   *original_envelope_id;	/* Original-Envelope-Id as written */
	char	   *feedback_type;	/* complaints: "abuse", "fraud", ... lower case */
	char	   *returned_message_id;	/* "<id>" */

	int			nrecipients;
	bool		recipients_truncated;	/* more than DSN_MAX_RECIPIENTS */
	DsnRecipient *recipients;

	int			naddresses;
	DsnAddress	addresses[DSN_MAX_ADDRESSES];
} DsnReport;

/*
 * Read one raw RFC 5322 mail (LF or CRLF line ends) into *out, which is
 * overwritten: release it with dsn_report_free() after every call.
 * Returns false only when out of memory (then *out holds nothing to free
 * and the mail should be tried again later); whatever the bytes, the
 * answer is otherwise one of the DsnKind values.
 */
extern bool dsn_parse(const char *raw, size_t len, DsnReport *out);

/* Release every string of a report and reset it (NULL and a zeroed report are fine) */
extern void dsn_report_free(DsnReport *report);

/* A failure the sender should act on: Action failed with a 5.x.x status */
extern bool dsn_recipient_is_permanent_failure(const DsnRecipient *r);

/*
 * The VERP token of address "prefix+TOKEN@domain": copies TOKEN (1 to
 * tokensize - 1 bytes of [A-Za-z0-9._=-]) to token and returns true.
 * local_prefix (e.g. "erp") and domain are compared case-insensitively;
 * either may be NULL to accept any.  False, token untouched, otherwise.
 */
extern bool dsn_verp_token(const char *address, const char *local_prefix,
						   const char *domain, char *token, size_t tokensize);

/*
 * The first VERP token among report->addresses (best source first);
 * returns its index in addresses[], or -1 when none has one.
 */
extern int	dsn_report_verp_token(const DsnReport *report, const char *local_prefix,
								  const char *domain, char *token, size_t tokensize);

/*
 * Split a token "m<id>.<tag>" (the form notify_ext writes) into the
 * message id (1 to 18 digits) and tag ([A-Za-z0-9_-], 1 to tagsize - 1).
 * Some relays change the case of addresses: "M42.DB7F3A" is accepted, and
 * the tag should be compared case-insensitively.
 */
extern bool dsn_verp_message(const char *token, long long *message_id,
							 char *tag, size_t tagsize);

/* Names for log lines: "delivery-status", "rfc3464", "failed", ... */
extern const char *dsn_kind_name(DsnKind kind);
extern const char *dsn_format_name(DsnFormat format);
extern const char *dsn_action_name(DsnAction action);
extern const char *dsn_address_source_name(DsnAddressSource source);

#endif							/* NOTIFY_DSN_H */

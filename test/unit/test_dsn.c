/*-------------------------------------------------------------------------
 *
 * test_dsn.c
 *	  Standalone unit tests for src/dsn.c (no PostgreSQL, no libcurl).
 *
 * Usage: test_dsn SAMPLES_DIR
 *
 * Reads every sample bounce of SAMPLES_DIR (test/unit/dsn-samples) and
 * checks what the parser makes of it field by field, then synthetic edge
 * cases, the VERP helpers, every out-of-memory path, and finally a
 * deterministic mutation loop (DSN_MUTATIONS variants of each sample,
 * 20000 unless the environment says otherwise) that must neither crash
 * nor break the output's promises; it is meant to run under ASan/UBSan.
 * Prints every failure, then "N passed, M failed"; exits non-zero when
 * anything failed.
 *
 * Built with -DDSN_TESTING for dsn_testing_fail_allocation().
 *
 * test/unit/test_dsn.c
 *
 *-------------------------------------------------------------------------
 */
#include "dsn.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern void dsn_testing_fail_allocation(long n);

static int	n_passed = 0;
static int	n_failed = 0;
static const char *samples_dir = "dsn-samples";

#define CHECK(cond, ...) \
	do { \
		if (cond) \
			n_passed++; \
		else \
		{ \
			n_failed++; \
			printf("FAIL %s:%d: ", __FILE__, __LINE__); \
			printf(__VA_ARGS__); \
			printf("\n"); \
		} \
	} while (0)

/* Expected recipient of a sample; a NULL string must come out NULL */
typedef struct ExpectRcpt
{
	const char *final_recipient;
	const char *original_recipient;
	DsnAction	action;
	const char *status;
	const char *diagnostic_prefix;
	const char *remote_mta;
	bool		permanent;
} ExpectRcpt;

/* Expected reading of one sample file */
typedef struct ExpectSample
{
	const char *file;
	DsnKind		kind;
	DsnFormat	format;
	const char *reporting_mta;
	const char *message_id;
	const char *verp_token;		/* with the prefix and domain of verp_of() */
	DsnAddressSource verp_source;
	int			nrecipients;
	ExpectRcpt	r[2];
} ExpectSample;

/* The VERP address of a sample: local prefix, domain and tag */
typedef struct SampleVerp
{
	const char *file;
	const char *prefix;
	const char *domain;
	const char *tag;
} SampleVerp;

/* Samples whose VERP address is not erp+m<id>.db7f3a@example.com (the real Postfix ones) */
static const SampleVerp sample_verps[] = {
	{"postfix_real_generated.eml", "bounces", "bounce.test", "tok"},
	{"postfix_real_generated_4xx_expired.eml", "bounces", "bounce.test", "tmp"},
};

/* verp_of - a sample's VERP prefix, domain and tag */
static SampleVerp
verp_of(const char *file)
{
	SampleVerp	v = {file, "erp", "example.com", "db7f3a"};
	size_t		i;

	for (i = 0; i < sizeof(sample_verps) / sizeof(sample_verps[0]); i++)
		if (strcmp(sample_verps[i].file, file) == 0)
			v = sample_verps[i];
	return v;
}

static const ExpectSample samples[] = {
	{"postfix_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "mail.example.com",
		"<notify.message.42.db7f3a@example.com>", "m42.db7f3a", DSN_ADDR_X_ORIGINAL_TO, 1,
		{{"nobody@customer.example.net", "nobody@customer.example.net", DSN_ACTION_FAILED, "5.1.1",
			"550 5.1.1 <nobody@customer.example.net>: Recipient address rejected: User unknown in virtual mailbox table",
		"mx1.customer.example.net", true}}},
	{"postfix_delayed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "mail.example.com",
		"<notify.message.43.db7f3a@example.com>", "m43.db7f3a", DSN_ADDR_X_ORIGINAL_TO, 1,
		{{"slow@customer.example.org", "slow@customer.example.org", DSN_ACTION_DELAYED, "4.4.1",
			"connect to mx.customer.example.org[198.51.100.30]:25: Connection timed out",
		NULL, false}}},
	{"exim_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "mail.example.com",
		"<notify.message.44.db7f3a@example.com>", "m44.db7f3a", DSN_ADDR_ENVELOPE_TO, 1,
		{{"gone@customer.example.org", NULL, DSN_ACTION_FAILED, "5.0.0",
			"550 5.1.1 <gone@customer.example.org>: Recipient address rejected: User unknown",
		"mx.customer.example.org", true}}},
	{"exim_plain_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_EXIM_TEXT, NULL,
		"<notify.message.45.db7f3a@example.com>", "m45.db7f3a", DSN_ADDR_ENVELOPE_TO, 1,
		{{"old.customer@customer.example.org", NULL, DSN_ACTION_FAILED, "5.0.0",
			"SMTP error from remote mail server after RCPT TO:<old.customer@customer.example.org>: "
			"host mx.customer.example.org [198.51.100.7]: 550 No such user here",
		NULL, true}}},
	{"exim_plain_delayed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_EXIM_TEXT, NULL,
		"<notify.message.53.db7f3a@example.com>", "m53.db7f3a", DSN_ADDR_ENVELOPE_TO, 1,
		{{"busy@customer.example.org", NULL, DSN_ACTION_DELAYED, "4.7.1",
			"SMTP error from remote mail server after RCPT TO:<busy@customer.example.org>: "
			"host mx.customer.example.org [198.51.100.7]: 451 4.7.1 Greylisted, please try again later",
		NULL, false}}},
	{"exchange_o365_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464,
		"AM0PR01MB1234.eurprd01.prod.exchangelabs.com",
		"<notify.message.46.db7f3a@example.com>", "m46.db7f3a", DSN_ADDR_DELIVERED_TO, 1,
		{{"former.employee@contoso.example", NULL, DSN_ACTION_FAILED, "5.1.10",
			"550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP address lookup",
		NULL, true}}},
	{"gmail_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "googlemail.com",
		"<notify.message.47.db7f3a@example.com>", "m47.db7f3a", DSN_ADDR_DELIVERED_TO, 1,
		{{"no.such.user@gmail.example", NULL, DSN_ACTION_FAILED, "5.1.1",
			"550-5.1.1 The email account that you tried to reach does not exist. Please try "
			"double-checking the recipient's email address for typos or unnecessary spaces. "
			"For more information, go to https://support.google.com/mail/?p=NoSuchUser "
			"a1-20020a170902000100b001c9b3e6f1fbsi1234567plh.123 - gsmtp",
			"gmail-smtp-in.l.google.com. (2001:db8::1b, the server for the domain gmail.example.)",
		true}}},
	{"qmail_failed.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_QMAIL, "mx.customer.example.net",
		"<notify.message.48.db7f3a@example.com>", "m48.db7f3a", DSN_ADDR_DELIVERED_TO, 2,
		{{"nobody@customer.example.net", NULL, DSN_ACTION_FAILED, "5.1.1",
			"Sorry, no mailbox here by that name. (#5.1.1)", NULL, true},
		{"other@elsewhere.example.org", NULL, DSN_ACTION_FAILED, "5.7.1",
			"198.51.100.21 does not like recipient. Remote host said: 550 5.7.1 "
			"<other@elsewhere.example.org>: Relay access denied Giving up on 198.51.100.21.",
		NULL, true}}},
	{"postfix_two_recipients.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "relay.example.com",
		"<notify.message.52.db7f3a@example.com>", "m52.db7f3a", DSN_ADDR_X_ORIGINAL_TO, 2,
		{{"buyer@customer.example.net", "Buyer@Customer.example.net", DSN_ACTION_RELAYED, "2.0.0",
			"250 2.0.0 Ok: queued as 88F1A2", "legacy.customer.example.net", false},
		{"left.company@customer.example.net", NULL, DSN_ACTION_FAILED, "5.2.1",
			"550 5.2.1 <left.company@customer.example.net>: mailbox disabled, not accepting messages",
		"mx.customer.example.net", true}}},
	{"nonconforming_encoded.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "gw1.legacy.example.org",
		"<notify.message.54.db7f3a@example.com>", "m54.db7f3a", DSN_ADDR_DELIVERED_TO, 1,
		{{"nobody@legacy.example.org", NULL, DSN_ACTION_FAILED, "5.0.0",
			"User nobody (nobody@legacy.example.org) not listed in Domino Directory for the "
			"r\xEF\xBF\xBD" "ception domain", NULL, true}}},
	{"abuse_report_arf.eml", DSN_KIND_COMPLAINT, DSN_FORMAT_RFC5965, "fbl.isp.example.net",
		"<notify.message.49.db7f3a@example.com>", "m49.db7f3a", DSN_ADDR_ORIGINAL_MAIL_FROM, 1,
		{{"complainer@isp.example.net", NULL, DSN_ACTION_NONE, "", NULL, NULL, false}}},
	{"auto_reply.eml", DSN_KIND_OTHER, DSN_FORMAT_NONE, NULL,
		NULL, "m50.db7f3a", DSN_ADDR_X_ORIGINAL_TO, 0, {{0}}},
	{"spam.eml", DSN_KIND_OTHER, DSN_FORMAT_NONE, NULL, NULL, NULL, 0, 0, {{0}}},
	{"mdn_read_receipt.eml", DSN_KIND_OTHER, DSN_FORMAT_NONE, NULL,
		NULL, "m56.db7f3a", DSN_ADDR_DELIVERED_TO, 0, {{0}}},
	{"malformed_report.eml", DSN_KIND_MALFORMED, DSN_FORMAT_RFC3464, "gw.broken.example",
		"<notify.message.51.db7f3a@example.com>", "m51.db7f3a", DSN_ADDR_X_ORIGINAL_TO, 0, {{0}}},
	{"malformed_missing_status.eml", DSN_KIND_MALFORMED, DSN_FORMAT_RFC3464, NULL,
		"<notify.message.55.db7f3a@example.com>", "m55.db7f3a", DSN_ADDR_DELIVERED_TO, 0, {{0}}},

	/*
	 * Captured from the real Postfix of test/lib/mailstack.py: a 550 after
	 * Postfix had accepted the mail (delivered to Dovecot over LMTP, which
	 * adds Delivered-To), and a 450 that expired (maximal_queue_lifetime =
	 * 0): Action failed with a 4.x.x status, which is no permanent failure.
	 * Their VERP addresses are bounces+m42.tok@bounce.test, as the test sent.
	 */
	{"postfix_real_generated.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "mx.test",
		"<nb-1@erp.test>", "m42.tok", DSN_ADDR_DELIVERED_TO, 1,
		{{"nobody@dest.test", "nobody@dest.test", DSN_ACTION_FAILED, "5.1.1",
			"550 5.1.1 <nobody@dest.test>: Recipient address rejected: User unknown",
		"127.0.0.1", true}}},
	{"postfix_real_generated_4xx_expired.eml", DSN_KIND_DELIVERY_STATUS, DSN_FORMAT_RFC3464, "mx.test",
		"<lt-1@erp.test>", "m43.tmp", DSN_ADDR_DELIVERED_TO, 1,
		{{"later@dest.test", "later@dest.test", DSN_ACTION_FAILED, "4.2.1",
			"450 4.2.1 <later@dest.test>: Recipient address rejected: Mailbox busy, try again later",
		"127.0.0.1", false}}},
};

#define NSAMPLES ((int) (sizeof(samples) / sizeof(samples[0])))

/* show - a string or "(null)" for failure messages */
static const char *
show(const char *s)
{
	return s == NULL ? "(null)" : s;
}

/* same_str - both NULL, or equal */
static bool
same_str(const char *got, const char *want)
{
	if (got == NULL || want == NULL)
		return got == want;
	return strcmp(got, want) == 0;
}

/* read_sample - a whole sample file, malloc'd to its exact size (ASan sees any overread) */
static char *
read_sample(const char *name, size_t *len)
{
	char		path[1024];
	FILE	   *f;
	long		size;
	char	   *buf;

	snprintf(path, sizeof(path), "%s/%s", samples_dir, name);
	f = fopen(path, "rb");
	if (f == NULL)
		return NULL;
	if (fseek(f, 0, SEEK_END) != 0 || (size = ftell(f)) <= 0 || fseek(f, 0, SEEK_SET) != 0)
	{
		fclose(f);
		return NULL;
	}
	buf = malloc((size_t) size);
	if (buf != NULL && fread(buf, 1, (size_t) size, f) != (size_t) size)
	{
		free(buf);
		buf = NULL;
	}
	fclose(f);
	*len = (size_t) size;
	return buf;
}

/* utf8_ok - strict UTF-8 without control characters, as dsn.h promises */
static bool
utf8_ok(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;

	while (*p != '\0')
	{
		uint32_t	cp;
		int			n;
		int			k;

		if (*p < 0x80)
		{
			if (*p < 0x20 || *p == 0x7F)
				return false;
			p++;
			continue;
		}
		if (*p >= 0xC2 && *p <= 0xDF)
			n = 1, cp = *p & 0x1F;
		else if (*p >= 0xE0 && *p <= 0xEF)
			n = 2, cp = *p & 0x0F;
		else if (*p >= 0xF0 && *p <= 0xF4)
			n = 3, cp = *p & 0x07;
		else
			return false;
		for (k = 1; k <= n; k++)
		{
			if ((p[k] & 0xC0) != 0x80)
				return false;
			cp = (cp << 6) | (p[k] & 0x3F);
		}
		if ((n == 2 && cp < 0x800) || (n == 3 && cp < 0x10000) || cp > 0x10FFFF ||
			(cp >= 0xD800 && cp <= 0xDFFF) || (cp >= 0x80 && cp < 0xA0))
			return false;
		p += n + 1;
	}
	return true;
}

/* text_ok - a report string keeps every promise of dsn.h */
static bool
text_ok(const char *s, bool may_be_null)
{
	size_t		n;

	if (s == NULL)
		return may_be_null;
	n = strlen(s);
	return n > 0 && n <= DSN_MAX_TEXT && s[0] != ' ' && s[n - 1] != ' ' &&
		strstr(s, "  ") == NULL && utf8_ok(s);
}

/* status_ok - "" or class.subject.detail with class 2, 4 or 5 */
static bool
status_ok(const char *s)
{
	int			dots = 0;
	int			digits = 0;
	const char *p;

	if (s[0] == '\0')
		return true;
	if (s[0] != '2' && s[0] != '4' && s[0] != '5')
		return false;
	for (p = s + 1; *p != '\0'; p++)
	{
		if (*p == '.')
		{
			if (p != s + 1 && digits == 0)
				return false;
			dots++;
			digits = 0;
		}
		else if (*p >= '0' && *p <= '9' && ++digits <= 3)
			continue;
		else
			return false;
	}
	return dots == 2 && digits > 0;
}

/* report_ok - every invariant of a parsed report, whatever the input was */
static bool
report_ok(const DsnReport *r, char *why, size_t whylen)
{
	int			i;

	if (r->kind < DSN_KIND_OTHER || r->kind > DSN_KIND_MALFORMED)
		return snprintf(why, whylen, "kind %d", (int) r->kind), false;
	if ((r->kind == DSN_KIND_MALFORMED) != (r->error != NULL))
		return snprintf(why, whylen, "error iff malformed"), false;
	if (r->nrecipients < 0 || r->nrecipients > DSN_MAX_RECIPIENTS ||
		(r->nrecipients > 0 && r->recipients == NULL))
		return snprintf(why, whylen, "nrecipients %d", r->nrecipients), false;
	if (r->kind == DSN_KIND_DELIVERY_STATUS && r->nrecipients == 0)
		return snprintf(why, whylen, "delivery status without recipient"), false;
	if (!text_ok(r->reporting_mta, true) || !text_ok(r->original_envelope_id, true) ||
		!text_ok(r->feedback_type, true) || !text_ok(r->returned_message_id, true))
		return snprintf(why, whylen, "report string"), false;
	if (r->returned_message_id != NULL &&
		(r->returned_message_id[0] != '<' ||
		 r->returned_message_id[strlen(r->returned_message_id) - 1] != '>'))
		return snprintf(why, whylen, "message id %s", r->returned_message_id), false;
	for (i = 0; i < r->nrecipients; i++)
	{
		const DsnRecipient *rc = &r->recipients[i];

		if (!text_ok(rc->final_recipient, true) || !text_ok(rc->original_recipient, true) ||
			!text_ok(rc->diagnostic, true) || !text_ok(rc->remote_mta, true))
			return snprintf(why, whylen, "recipient %d string", i), false;
		if (!status_ok(rc->status))
			return snprintf(why, whylen, "recipient %d status [%s]", i, rc->status), false;
		if (rc->action < DSN_ACTION_NONE || rc->action > DSN_ACTION_EXPANDED)
			return snprintf(why, whylen, "recipient %d action", i), false;
	}
	if (r->naddresses < 0 || r->naddresses > DSN_MAX_ADDRESSES)
		return snprintf(why, whylen, "naddresses %d", r->naddresses), false;
	for (i = 0; i < r->naddresses; i++)
	{
		if (!text_ok(r->addresses[i].address, false) || strchr(r->addresses[i].address, '@') == NULL)
			return snprintf(why, whylen, "address %d", i), false;
		if (i > 0 && r->addresses[i - 1].source > r->addresses[i].source)
			return snprintf(why, whylen, "address order"), false;
	}
	return true;
}

/* check_recipient - one recipient of a sample against its expectation */
static void
check_recipient(const char *file, int i, const DsnRecipient *got, const ExpectRcpt *want)
{
	CHECK(same_str(got->final_recipient, want->final_recipient),
		  "%s rcpt %d final: got [%s], want [%s]", file, i,
		  show(got->final_recipient), show(want->final_recipient));
	CHECK(same_str(got->original_recipient, want->original_recipient),
		  "%s rcpt %d original: got [%s], want [%s]", file, i,
		  show(got->original_recipient), show(want->original_recipient));
	CHECK(got->action == want->action, "%s rcpt %d action: got %s, want %s", file, i,
		  dsn_action_name(got->action), dsn_action_name(want->action));
	CHECK(strcmp(got->status, want->status) == 0, "%s rcpt %d status: got [%s], want [%s]",
		  file, i, got->status, want->status);
	if (want->diagnostic_prefix == NULL)
		CHECK(got->diagnostic == NULL, "%s rcpt %d diagnostic: got [%s], want none",
			  file, i, got->diagnostic);
	else
		CHECK(got->diagnostic != NULL &&
			  strncmp(got->diagnostic, want->diagnostic_prefix, strlen(want->diagnostic_prefix)) == 0,
			  "%s rcpt %d diagnostic:\n  got  [%s]\n  want [%s...]", file, i,
			  show(got->diagnostic), want->diagnostic_prefix);
	CHECK(same_str(got->remote_mta, want->remote_mta), "%s rcpt %d remote MTA: got [%s], want [%s]",
		  file, i, show(got->remote_mta), show(want->remote_mta));
	CHECK(dsn_recipient_is_permanent_failure(got) == want->permanent,
		  "%s rcpt %d permanent failure: want %d", file, i, (int) want->permanent);
}

/* test_samples - every sample file read field by field */
static void
test_samples(void)
{
	int			s;

	for (s = 0; s < NSAMPLES; s++)
	{
		const ExpectSample *e = &samples[s];
		size_t		len = 0;
		char	   *raw = read_sample(e->file, &len);
		DsnReport	r;
		char		token[DSN_VERP_TOKEN_SIZE] = "";
		char		why[128] = "";
		SampleVerp	verp;
		int			k;
		int			i;

		CHECK(raw != NULL, "cannot read %s/%s", samples_dir, e->file);
		if (raw == NULL)
			continue;
		CHECK(dsn_parse(raw, len, &r), "%s: out of memory", e->file);
		CHECK(r.kind == e->kind, "%s kind: got %s, want %s (%s)", e->file, dsn_kind_name(r.kind),
			  dsn_kind_name(e->kind), show(r.error));
		CHECK(r.format == e->format, "%s format: got %s, want %s", e->file,
			  dsn_format_name(r.format), dsn_format_name(e->format));
		CHECK(same_str(r.reporting_mta, e->reporting_mta), "%s reporting MTA: got [%s], want [%s]",
			  e->file, show(r.reporting_mta), show(e->reporting_mta));
		CHECK(same_str(r.returned_message_id, e->message_id), "%s Message-ID: got [%s], want [%s]",
			  e->file, show(r.returned_message_id), show(e->message_id));
		verp = verp_of(e->file);
		k = dsn_report_verp_token(&r, verp.prefix, verp.domain, token, sizeof(token));
		if (e->verp_token == NULL)
			CHECK(k == -1, "%s: unexpected VERP token %s", e->file, token);
		else
		{
			long long	id = 0;
			char		tag[16] = "";

			CHECK(k >= 0 && strcmp(token, e->verp_token) == 0 &&
				  r.addresses[k].source == e->verp_source,
				  "%s VERP: got %d [%s] from %s, want [%s] from %s", e->file, k, token,
				  k >= 0 ? dsn_address_source_name(r.addresses[k].source) : "-",
				  e->verp_token, dsn_address_source_name(e->verp_source));
			CHECK(dsn_verp_message(token, &id, tag, sizeof(tag)) &&
				  id == atoll(e->verp_token + 1) && strcmp(tag, verp.tag) == 0,
				  "%s: token %s splits into %lld.%s", e->file, token, id, tag);
		}
		CHECK(r.nrecipients == e->nrecipients, "%s recipients: got %d, want %d", e->file,
			  r.nrecipients, e->nrecipients);
		for (i = 0; i < r.nrecipients && i < e->nrecipients && i < 2; i++)
			check_recipient(e->file, i, &r.recipients[i], &e->r[i]);
		CHECK(report_ok(&r, why, sizeof(why)), "%s: %s", e->file, why);
		dsn_report_free(&r);
		free(raw);
	}
}

/* load - a whole sample, for the sample-specific tests */
static bool
load(const char *file, DsnReport *r)
{
	size_t		len = 0;
	char	   *raw = read_sample(file, &len);
	bool		ok = raw != NULL && dsn_parse(raw, len, r);

	free(raw);
	if (!ok)
		memset(r, 0, sizeof(*r));
	return ok;
}

/* find_address - the candidate with this address, or NULL */
static const DsnAddress *
find_address(const DsnReport *r, const char *address)
{
	int			i;

	for (i = 0; i < r->naddresses; i++)
		if (strcmp(r->addresses[i].address, address) == 0)
			return &r->addresses[i];
	return NULL;
}

/* test_sample_details - what the table does not say: address lists, envelope ids, errors */
static void
test_sample_details(void)
{
	DsnReport	r;
	const DsnAddress *a;

	CHECK(load("postfix_failed.eml", &r), "postfix_failed");
	CHECK(r.naddresses == 1 && r.addresses[0].source == DSN_ADDR_X_ORIGINAL_TO,
		  "the same VERP address in five headers is one candidate, from the best: %d", r.naddresses);
	CHECK(r.original_envelope_id == NULL && r.feedback_type == NULL, "postfix_failed: no envid");
	dsn_report_free(&r);

	CHECK(load("postfix_two_recipients.eml", &r), "postfix_two_recipients");
	CHECK(same_str(r.original_envelope_id, "notify-52"), "envid: %s", show(r.original_envelope_id));
	dsn_report_free(&r);

	CHECK(load("abuse_report_arf.eml", &r), "abuse_report_arf");
	CHECK(same_str(r.feedback_type, "abuse"), "feedback type %s", show(r.feedback_type));
	a = find_address(&r, "postmaster@example.com");
	CHECK(a != NULL && a->source == DSN_ADDR_DELIVERED_TO, "ARF: the feedback address is a candidate");
	a = find_address(&r, "erp+m49.db7f3a@example.com");
	CHECK(a != NULL && a->source == DSN_ADDR_ORIGINAL_MAIL_FROM, "ARF: Original-Mail-From");
	a = find_address(&r, "fbl-bounces@isp.example.net");
	CHECK(a != NULL && a->source == DSN_ADDR_RETURN_PATH, "ARF: the report's Return-Path last");
	CHECK(r.naddresses == 3, "ARF candidates: %d", r.naddresses);
	dsn_report_free(&r);

	CHECK(load("malformed_report.eml", &r), "malformed_report");
	CHECK(r.error != NULL && strstr(r.error, "no recipient") != NULL, "error: %s", show(r.error));
	dsn_report_free(&r);
	CHECK(load("malformed_missing_status.eml", &r), "malformed_missing_status");
	CHECK(r.error != NULL && strstr(r.error, "delivery-status part") != NULL, "error: %s", show(r.error));
	dsn_report_free(&r);

	/*
	 * The real Postfix reports: the VERP address in Delivered-To, To,
	 * X-Postfix-Sender and the returned Return-Path is one candidate; the
	 * reporting MTA's own Message-Id is not the returned one.
	 */
	CHECK(load("postfix_real_generated.eml", &r), "postfix_real_generated");
	CHECK(r.naddresses == 1 && strcmp(r.addresses[0].address, "bounces+m42.tok@bounce.test") == 0,
		  "real Postfix: one VERP candidate, got %d", r.naddresses);
	CHECK(r.original_envelope_id == NULL && r.feedback_type == NULL && !r.recipients_truncated,
		  "real Postfix: no envid, no feedback type");
	dsn_report_free(&r);
	CHECK(load("postfix_real_generated_4xx_expired.eml", &r), "postfix_real_generated_4xx_expired");
	CHECK(r.nrecipients == 1 && r.recipients[0].action == DSN_ACTION_FAILED &&
		  !dsn_recipient_is_permanent_failure(&r.recipients[0]),
		  "real Postfix, expired 4.x.x: failed but not permanent");
	dsn_report_free(&r);

	CHECK(load("spam.eml", &r), "spam");
	CHECK(r.nrecipients == 0 && r.error == NULL,
		  "an imitation of a bounce from a person's Return-Path is not read");
	dsn_report_free(&r);
}

/* parse_str - dsn_parse of a C string (copied to an exact-size buffer) */
static bool
parse_str(const char *s, DsnReport *r)
{
	size_t		len = strlen(s);
	char	   *buf = malloc(len > 0 ? len : 1);
	bool		ok;

	memcpy(buf, s, len);
	ok = dsn_parse(buf, len, r);
	free(buf);
	return ok;
}

#define DSN_HEAD \
	"Return-Path: <>\n" \
	"To: erp+m7.tag@example.com\n" \
	"MIME-Version: 1.0\n"

/* test_mime_handling - folding, case, boundaries, nesting, encodings, line ends */
static void
test_mime_handling(void)
{
	DsnReport	r;
	char		why[128];

	/* folded, mixed-case Content-Type; unquoted boundary; CRLF; Action first; comment in type */
	CHECK(parse_str("return-path: <>\r\nTO: erp+m7.tag@example.com\r\n"
					"content-TYPE: Multipart/Report (a comment);\r\n\tREPORT-TYPE=delivery-status;\r\n"
					" boundary=simple\r\n\r\n"
					"--simple\r\nContent-Type: message/delivery-status\r\n\r\n"
					"reporting-mta: dns; a.example\r\n\r\n"
					"ACTION: Failed\r\nfinal-recipient: RFC822; <x@y.example>\r\nSTATUS: 5.1.1\r\n"
					"diagnostic-code: smtp;\r\n 550 no\r\n\tsuch user\r\n\r\n"
					"--simple--\r\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 1, "folded CRLF report: %s",
		  dsn_kind_name(r.kind));
	if (r.nrecipients == 1)
	{
		CHECK(same_str(r.recipients[0].final_recipient, "x@y.example"), "final %s",
			  show(r.recipients[0].final_recipient));
		CHECK(same_str(r.recipients[0].diagnostic, "550 no such user"), "unfolded diagnostic [%s]",
			  show(r.recipients[0].diagnostic));
		CHECK(r.recipients[0].action == DSN_ACTION_FAILED, "Action: Failed");
	}
	CHECK(same_str(r.reporting_mta, "a.example"), "reporting MTA %s", show(r.reporting_mta));
	dsn_report_free(&r);

	/* recipients without blank lines between them; Action and Status inferred */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\n\n"
					"--b\nContent-Type: message/delivery-status\n\n"
					"Reporting-MTA: dns; a.example\n"
					"Final-Recipient: rfc822; one@y.example\nAction: failed\nStatus: 5.1.1\n"
					"Final-Recipient: rfc822; two@y.example\nStatus: 4.2.2\n"
					"Final-Recipient: rfc822; three@y.example\nAction: failed\n"
					"Diagnostic-Code: smtp; 552-5.2.2 Mailbox full\n"
					"Final-Recipient: rfc822; four@y.example\nDiagnostic-Code: smtp; 550 gone\n"
					"--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 4, "no blank lines: %d recipients",
		  r.nrecipients);
	if (r.nrecipients == 4)
	{
		CHECK(r.recipients[1].action == DSN_ACTION_DELAYED && strcmp(r.recipients[1].status, "4.2.2") == 0,
			  "Action from Status: %s", dsn_action_name(r.recipients[1].action));
		CHECK(strcmp(r.recipients[2].status, "5.2.2") == 0, "Status from '552-5.2.2': %s",
			  r.recipients[2].status);
		CHECK(strcmp(r.recipients[3].status, "5.0.0") == 0 &&
			  r.recipients[3].action == DSN_ACTION_FAILED, "Status and Action from '550': %s",
			  r.recipients[3].status);
	}
	dsn_report_free(&r);

	/* base64 delivery-status, wrapped in multipart/mixed, report-type left out */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/mixed; boundary=outer\n\n"
					"--outer\nContent-Type: multipart/report; boundary=\"inner\"\n\n"
					"--inner\nContent-Type: text/plain\n\nhello\n"
					"--inner\nContent-Type: message/delivery-status\nContent-Transfer-Encoding: BASE64\n\n"
					/* "Final-Recipient: rfc822; b64@y.example\nAction: failed\nStatus: 5.4.1\n" */
					"RmluYWwtUmVjaXBpZW50OiByZmM4MjI7IGI2NEB5LmV4YW1wbGUKQWN0aW9uOiBm\n"
					"YWlsZWQKU3RhdHVzOiA1LjQuMQo=\n"
					"--inner--\n--outer--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 1 &&
		  same_str(r.recipients[0].final_recipient, "b64@y.example") &&
		  strcmp(r.recipients[0].status, "5.4.1") == 0,
		  "base64 status part inside multipart/mixed: %s", dsn_kind_name(r.kind));
	dsn_report_free(&r);

	/* a bounce forwarded inside a person's mail is not a bounce */
	CHECK(parse_str("Return-Path: <colleague@example.com>\nTo: erp@example.com\n"
					"Content-Type: multipart/mixed; boundary=fw\n\n"
					"--fw\nContent-Type: text/plain\n\nFYI, see below\n"
					"--fw\nContent-Type: message/rfc822\n\n"
					"From: MAILER-DAEMON@x.example\n"
					"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
					"--b\nContent-Type: message/delivery-status\n\n"
					"Final-Recipient: rfc822; a@b.example\nAction: failed\nStatus: 5.1.1\n"
					"--b--\n--fw--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_OTHER && r.nrecipients == 0, "forwarded bounce: %s", dsn_kind_name(r.kind));
	dsn_report_free(&r);

	/* a boundary that is the prefix of another line is no delimiter; transport padding is */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
					"--bb\nnot a part\n"
					"--b  \t\nContent-Type: message/delivery-status\n\n"
					"Final-Recipient: rfc822; pad@y.example\nAction: delayed\nStatus: 4.4.7\n"
					"--bx\n"
					"--b--   \n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 1 &&
		  r.recipients[0].action == DSN_ACTION_DELAYED && !dsn_recipient_is_permanent_failure(&r.recipients[0]),
		  "delimiters: %s %d", dsn_kind_name(r.kind), r.nrecipients);
	dsn_report_free(&r);

	/* quoted-printable returned headers with a soft break inside the Message-ID */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
					"--b\nContent-Type: message/delivery-status\n\n"
					"Final-Recipient: rfc822; qp@y.example\nAction: failed\nStatus: 5.1.1\n"
					"--b\nContent-Type: text/rfc822-headers\nContent-Transfer-Encoding: quoted-printable\n\n"
					"Message-ID: <notify.message.7.t=\nag@example.com>\nReturn-Path: <erp+m7.tag@exa=\nmple.com>\n"
					"--b--\n", &r), "oom");
	CHECK(same_str(r.returned_message_id, "<notify.message.7.tag@example.com>"),
		  "quoted-printable headers: %s", show(r.returned_message_id));
	dsn_report_free(&r);

	/* mbox "From " line; missing blank line before the body */
	CHECK(parse_str("From MAILER-DAEMON Sat Nov 18 09:00:00 2023\n" DSN_HEAD
					"Content-Type: multipart/report; report-type=delivery-status; boundary=b\n"
					"--b\nContent-Type: message/delivery-status\n\n"
					"Final-Recipient: rfc822; mbox@y.example\nAction: failed\nStatus: 5.1.1\n"
					"--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.naddresses == 1,
		  "mbox From line and no blank line: %s", dsn_kind_name(r.kind));
	dsn_report_free(&r);

	/* feedback types */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
					"--b\nContent-Type: message/feedback-report\n\n"
					"Feedback-Type: not-spam\nVersion: 1\n--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_OTHER && same_str(r.feedback_type, "not-spam"), "not-spam is no complaint");
	dsn_report_free(&r);
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
					"--b\nContent-Type: message/feedback-report\n\n"
					"Feedback-Type: FRAUD (phishing)\nRemoval-Recipient: gone@y.example\n--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_COMPLAINT && same_str(r.feedback_type, "fraud") && r.nrecipients == 1 &&
		  same_str(r.recipients[0].final_recipient, "gone@y.example"),
		  "fraud, Removal-Recipient: %s %s", dsn_kind_name(r.kind), show(r.feedback_type));
	dsn_report_free(&r);
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
					"--b\nContent-Type: message/feedback-report\n\nVersion: 1\n--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_MALFORMED, "no Feedback-Type: %s", dsn_kind_name(r.kind));
	dsn_report_free(&r);

	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=feedback-report; boundary=b\n\n"
					"--b\nContent-Type: message/feedback-report\n\nFeedback-Type: (none)\n--b--\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_MALFORMED && r.feedback_type == NULL, "Feedback-Type of a comment only: %s",
		  dsn_kind_name(r.kind));
	dsn_report_free(&r);

	/* Message-IDs: white space inside is refused; reply prefixes without 5.x.x are kept */
	CHECK(parse_str(DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
					"--b\nContent-Type: message/delivery-status\n\n"
					"Final-Recipient: rfc822; id@y.example\nAction: failed\nStatus: 5.1.1\n"
					"Diagnostic-Code: smtp; 550-Mailbox unknown\n 550-see 550 reasons\n 550 bye\n"
					"--b\nContent-Type: text/rfc822-headers\n\nMessage-ID: <a b@c>\n"
					"--b--\n", &r), "oom");
	CHECK(r.returned_message_id == NULL, "Message-ID with a space: %s", show(r.returned_message_id));
	CHECK(r.nrecipients == 1 &&
		  same_str(r.recipients[0].diagnostic, "550-Mailbox unknown 550-see 550 reasons 550 bye"),
		  "prefixes without enhanced code kept: [%s]",
		  r.nrecipients == 1 ? show(r.recipients[0].diagnostic) : "");
	dsn_report_free(&r);

	/* qmail without any code; Exim text with a version number that looks like a status */
	CHECK(parse_str("Return-Path: <>\nTo: erp+m7.tag@example.com\n\n"
					"Hi. This is the qmail-send program at q.example.\n\n"
					"<a@q.example>:\nThis address no longer accepts mail.\n\n"
					"<b@q.example>:\nRemote host said: 554 delivery error\n\n"
					"--- Below this line is a copy of the message.\n\n"
					"Message-ID: <notify.message.7.tag@example.com>\n\nbody\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 2 &&
		  strcmp(r.recipients[0].status, "5.0.0") == 0 && strcmp(r.recipients[1].status, "5.0.0") == 0 &&
		  same_str(r.returned_message_id, "<notify.message.7.tag@example.com>"),
		  "qmail defaults: %s %d", dsn_kind_name(r.kind), r.nrecipients);
	dsn_report_free(&r);
	CHECK(parse_str("Return-Path: <>\nFrom: Mail Delivery System <Mailer-Daemon@e.example>\n\n"
					"This message was created automatically by mail delivery software.\n\n"
					"A message that you sent could not be delivered to one or more of its\n"
					"recipients. This is a permanent error. The following address(es) failed:\n\n"
					"  <v@e.example>\n    retry timeout exceeded (Exim 4.94.2 at 192.0.2.5)\n\n"
					"  pipe to |/usr/bin/false\n    generated by alias@e.example\n\n"
					"------ This is a copy of the message's headers. ------\n\n"
					"Message-Id: notify.message.8.tag@example.com\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 1 &&
		  same_str(r.recipients[0].final_recipient, "v@e.example") &&
		  strcmp(r.recipients[0].status, "5.0.0") == 0 &&
		  same_str(r.returned_message_id, "<notify.message.8.tag@example.com>"),
		  "Exim text: %s %d %s", dsn_kind_name(r.kind), r.nrecipients,
		  r.nrecipients > 0 ? r.recipients[0].status : "");
	dsn_report_free(&r);

	/* a signature without any recipient is a report we cannot read */
	CHECK(parse_str("Return-Path: <>\n\nHi. This is the qmail-send program at q.example.\n"
					"Something went wrong.\n", &r), "oom");
	CHECK(r.kind == DSN_KIND_MALFORMED && r.format == DSN_FORMAT_QMAIL, "qmail, no recipient: %s",
		  dsn_kind_name(r.kind));
	dsn_report_free(&r);

	/* To lists, groups, comments, display names */
	CHECK(parse_str("To: \"Bounce, ERP\" <erp+m9.tag@example.com>, undisclosed-recipients:;\n"
					"Delivered-To: team: erp+m10.tag@example.com (a comment);\n"
					"X-Original-To: <>\n\nbody\n", &r), "oom");
	CHECK(r.naddresses == 2 && same_str(r.addresses[0].address, "erp+m10.tag@example.com") &&
		  r.addresses[0].source == DSN_ADDR_DELIVERED_TO &&
		  same_str(r.addresses[1].address, "erp+m9.tag@example.com"),
		  "address lists: %d [%s]", r.naddresses, r.naddresses > 0 ? r.addresses[0].address : "");
	CHECK(report_ok(&r, why, sizeof(why)), "address lists: %s", why);
	dsn_report_free(&r);
}

/* test_limits - caps, sanitizing, degenerate input */
static void
test_limits(void)
{
	DsnReport	r;
	char		why[128];
	char	   *big;
	size_t		n;
	size_t		i;
	int			k;

	/* more recipients than kept */
	big = malloc(200000);
	n = (size_t) sprintf(big, DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
						 "--b\nContent-Type: message/delivery-status\n\n");
	for (k = 0; k < 150; k++)
		n += (size_t) sprintf(big + n, "Final-Recipient: rfc822; r%d@y.example\nAction: failed\nStatus: 5.1.1\n\n", k);
	n += (size_t) sprintf(big + n, "--b--\n");
	CHECK(dsn_parse(big, n, &r), "oom");
	CHECK(r.nrecipients == DSN_MAX_RECIPIENTS && r.recipients_truncated &&
		  same_str(r.recipients[99].final_recipient, "r99@y.example"),
		  "recipients capped: %d", r.nrecipients);
	dsn_report_free(&r);

	/* a long diagnostic of 3-byte characters is cut at a character boundary */
	n = (size_t) sprintf(big, DSN_HEAD "Content-Type: multipart/report; report-type=delivery-status; boundary=b\n\n"
						 "--b\nContent-Type: message/delivery-status\n\n"
						 "Final-Recipient: rfc822; long@y.example\nAction: failed\nStatus: 5.1.1\n"
						 "Diagnostic-Code: smtp; 550 x");
	for (k = 0; k < 2000; k++)
		n += (size_t) sprintf(big + n, "\xE2\x82\xAC");	/* euro sign */
	n += (size_t) sprintf(big + n, "\n--b--\n");
	CHECK(dsn_parse(big, n, &r), "oom");
	CHECK(r.nrecipients == 1 && r.recipients[0].diagnostic != NULL &&
		  strlen(r.recipients[0].diagnostic) == 998 && utf8_ok(r.recipients[0].diagnostic),
		  "diagnostic capped at a character boundary: %zu",
		  r.nrecipients == 1 && r.recipients[0].diagnostic ? strlen(r.recipients[0].diagnostic) : 0);
	dsn_report_free(&r);

	/* NUL, controls, invalid and overlong UTF-8, surrogates, C1 controls */
	{
		static const char raw[] = DSN_HEAD "Content-Type: multipart/report; boundary=b\n\n"
			"--b\nContent-Type: message/delivery-status\n\n"
			"Final-Recipient: rfc822; bad\x01@y.example\nAction: failed\nStatus: 5.1.1\n"
			"Diagnostic-Code: smtp; a\0b\x1B[31mc\xC0\xAF" "d\xED\xA0\x80" "e\xC2\x85" "f\xFF\n"
			"--b--\n";

		CHECK(dsn_parse(raw, sizeof(raw) - 1, &r), "oom");
		CHECK(r.nrecipients == 1 &&
			  same_str(r.recipients[0].final_recipient, "bad @y.example") &&
			  same_str(r.recipients[0].diagnostic,
					   "a b [31mc\xEF\xBF\xBD\xEF\xBF\xBD" "d\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"
					   "e f\xEF\xBF\xBD"),
			  "sanitized: [%s]", r.nrecipients == 1 ? show(r.recipients[0].diagnostic) : "");
		CHECK(report_ok(&r, why, sizeof(why)), "sanitized: %s", why);
		dsn_report_free(&r);
	}

	/* degenerate input */
	CHECK(dsn_parse(NULL, 0, &r) && r.kind == DSN_KIND_OTHER, "NULL input");
	dsn_report_free(&r);
	CHECK(dsn_parse(NULL, 100, &r) && r.kind == DSN_KIND_OTHER, "NULL input with a length");
	dsn_report_free(&r);
	CHECK(dsn_parse("x", 0, &r) && r.kind == DSN_KIND_OTHER, "empty input");
	dsn_report_free(&r);
	CHECK(parse_str("Content-Type: multipart/report; report-type=delivery-status; boundary=", &r) &&
		  r.kind == DSN_KIND_MALFORMED, "multipart without boundary");
	dsn_report_free(&r);
	CHECK(parse_str("Content-Type: multipart/report; report-type=delivery-status; boundary=\"unterminated",
					&r) && r.kind == DSN_KIND_MALFORMED, "unterminated quoted boundary");
	dsn_report_free(&r);
	CHECK(parse_str("\n\n\n", &r) && r.kind == DSN_KIND_OTHER, "blank lines only");
	dsn_report_free(&r);

	/* nesting deeper than followed */
	n = (size_t) sprintf(big, "Return-Path: <>\n");
	for (k = 0; k < 40; k++)
		n += (size_t) sprintf(big + n, "Content-Type: multipart/mixed; boundary=n%d\n\n--n%d\n", k, k);
	n += (size_t) sprintf(big + n, "Content-Type: message/delivery-status\n\n"
						  "Final-Recipient: rfc822; deep@y.example\nAction: failed\n");
	CHECK(dsn_parse(big, n, &r) && r.kind == DSN_KIND_OTHER, "deep nesting: %s", dsn_kind_name(r.kind));
	dsn_report_free(&r);
	free(big);

	/* 8 MB of delimiters and fields: linear, bounded, no crash */
	n = 8 * 1024 * 1024;
	big = malloc(n);
	{
		static const char head[] = "Content-Type: multipart/report; boundary=z\n\n";
		static const char unit[] = "--z\nContent-Type: message/delivery-status\n\nFinal-Recipient: a@b\n";

		memcpy(big, head, sizeof(head) - 1);
		for (i = sizeof(head) - 1; i + sizeof(unit) - 1 <= n; i += sizeof(unit) - 1)
			memcpy(big + i, unit, sizeof(unit) - 1);
		for (; i < n; i++)
			big[i] = '\n';
	}
	CHECK(dsn_parse(big, n, &r) && r.kind == DSN_KIND_DELIVERY_STATUS && r.nrecipients == 1,
		  "8 MB of parts: %s %d", dsn_kind_name(r.kind), r.nrecipients);
	dsn_report_free(&r);
	memset(big, 'A', n);
	CHECK(dsn_parse(big, n, &r) && r.kind == DSN_KIND_OTHER, "8 MB without a line end");
	dsn_report_free(&r);
	free(big);

	dsn_report_free(NULL);
	memset(&r, 0, sizeof(r));
	dsn_report_free(&r);
	CHECK(true, "dsn_report_free of NULL and of a zeroed report");
}

/* test_verp - the token helpers */
static void
test_verp(void)
{
	char		tok[DSN_VERP_TOKEN_SIZE];
	char		tag[16];
	long long	id = 0;
	char		longaddr[300];

	CHECK(dsn_verp_token("erp+m42.db7f3a@example.com", "erp", "example.com", tok, sizeof(tok)) &&
		  strcmp(tok, "m42.db7f3a") == 0, "plain token");
	CHECK(dsn_verp_token("ERP+m42.db7f3a@Example.COM", "erp", "example.com", tok, sizeof(tok)) &&
		  strcmp(tok, "m42.db7f3a") == 0, "prefix and domain compared case-insensitively");
	CHECK(dsn_verp_token("anything+m1.x@other.example", NULL, NULL, tok, sizeof(tok)) &&
		  strcmp(tok, "m1.x") == 0, "any prefix and domain");
	CHECK(!dsn_verp_token("erp+m42.db7f3a@example.org", "erp", "example.com", tok, sizeof(tok)),
		  "other domain");
	CHECK(!dsn_verp_token("erpx+m42.db7f3a@example.com", "erp", NULL, tok, sizeof(tok)),
		  "other prefix");
	CHECK(!dsn_verp_token("xerp+m42@example.com", "erp", NULL, tok, sizeof(tok)), "prefix is whole");
	CHECK(!dsn_verp_token("erp@example.com", "erp", NULL, tok, sizeof(tok)), "no token");
	CHECK(!dsn_verp_token("erp+@example.com", "erp", NULL, tok, sizeof(tok)), "empty token");
	CHECK(!dsn_verp_token("erp+a b@example.com", "erp", NULL, tok, sizeof(tok)), "space in token");
	CHECK(!dsn_verp_token("erp+a'b@example.com", "erp", NULL, tok, sizeof(tok)), "quote in token");
	CHECK(!dsn_verp_token("erp+m1", "erp", NULL, tok, sizeof(tok)), "no domain");
	CHECK(dsn_verp_token("erp+m1.x+y@a@example.com", NULL, "example.com", tok, sizeof(tok)) == false,
		  "'@' inside the local part is refused");
	CHECK(!dsn_verp_token("erp+m42.db7f3a@example.com", "erp", NULL, tok, 10), "token too long for buffer");
	CHECK(dsn_verp_token("erp+m42.db7f3a@example.com", "erp", NULL, tok, 11) && strcmp(tok, "m42.db7f3a") == 0,
		  "token exactly fits");
	CHECK(!dsn_verp_token(NULL, NULL, NULL, tok, sizeof(tok)), "NULL address");
	memset(longaddr, 'a', sizeof(longaddr));
	memcpy(longaddr, "erp+", 4);
	memcpy(longaddr + 280, "@example.com", 13);
	CHECK(!dsn_verp_token(longaddr, "erp", NULL, tok, sizeof(tok)), "276-byte token");

	CHECK(dsn_verp_message("m42.db7f3a", &id, tag, sizeof(tag)) && id == 42 && strcmp(tag, "db7f3a") == 0,
		  "m42.db7f3a");
	CHECK(dsn_verp_message("M123456789012345678.a_b-C", &id, tag, sizeof(tag)) &&
		  id == 123456789012345678LL && strcmp(tag, "a_b-C") == 0, "18 digits");
	CHECK(!dsn_verp_message("m1234567890123456789.a", &id, tag, sizeof(tag)), "19 digits");
	CHECK(!dsn_verp_message("m.a", &id, tag, sizeof(tag)), "no digits");
	CHECK(!dsn_verp_message("m42", &id, tag, sizeof(tag)), "no tag");
	CHECK(!dsn_verp_message("m42.", &id, tag, sizeof(tag)), "empty tag");
	CHECK(!dsn_verp_message("x42.a", &id, tag, sizeof(tag)), "not m");
	CHECK(!dsn_verp_message("m42.a.b", &id, tag, sizeof(tag)), "dot in tag");
	CHECK(!dsn_verp_message("m42.abcdefghijklmnop", &id, tag, sizeof(tag)), "tag too long");
	CHECK(!dsn_verp_message(NULL, &id, tag, sizeof(tag)), "NULL token");
	CHECK(dsn_report_verp_token(NULL, NULL, NULL, tok, sizeof(tok)) == -1, "NULL report");
}

/* test_names - the log names */
static void
test_names(void)
{
	CHECK(strcmp(dsn_kind_name(DSN_KIND_COMPLAINT), "complaint") == 0, "kind name");
	CHECK(strcmp(dsn_kind_name((DsnKind) 99), "unknown") == 0, "unknown kind");
	CHECK(strcmp(dsn_format_name(DSN_FORMAT_QMAIL), "qmail") == 0, "format name");
	CHECK(strcmp(dsn_action_name(DSN_ACTION_DELAYED), "delayed") == 0, "action name");
	CHECK(strcmp(dsn_action_name(DSN_ACTION_NONE), "") == 0, "no action");
	CHECK(strcmp(dsn_address_source_name(DSN_ADDR_RETURNED_RETURN_PATH), "returned Return-Path") == 0,
		  "source name");
	CHECK(!dsn_recipient_is_permanent_failure(NULL), "NULL recipient");
}

/*
 * test_out_of_memory - make the nth allocation fail, for every n, on every
 * sample: dsn_parse says false and leaves nothing behind (ASan checks the
 * leaks), or succeeds once n is past its last allocation
 */
static void
test_out_of_memory(void)
{
	int			s;

	for (s = 0; s < NSAMPLES; s++)
	{
		size_t		len = 0;
		char	   *raw = read_sample(samples[s].file, &len);
		long		fail_at;
		bool		clean = true;
		long		allocations = -1;

		if (raw == NULL)
			continue;
		for (fail_at = 0; fail_at < 10000; fail_at++)
		{
			DsnReport	r;
			bool		ok;

			dsn_testing_fail_allocation(fail_at);
			ok = dsn_parse(raw, len, &r);
			if (!ok && (r.nrecipients != 0 || r.recipients != NULL || r.naddresses != 0 ||
						r.returned_message_id != NULL))
				clean = false;
			dsn_report_free(&r);
			if (ok)
			{
				allocations = fail_at;
				break;
			}
		}
		dsn_testing_fail_allocation(-1);
		CHECK(clean && allocations >= 0, "%s: out of memory leaves a clean report (%ld allocations)",
			  samples[s].file, allocations);
		free(raw);
	}
}

/* Deterministic pseudo-random numbers (xorshift64*) for the mutation loop */
static uint64_t rng_state = 0x9E3779B97F4A7C15ULL;

/* rnd - next pseudo-random number below n (n > 0) */
static size_t
rnd(size_t n)
{
	rng_state ^= rng_state >> 12;
	rng_state ^= rng_state << 25;
	rng_state ^= rng_state >> 27;
	return (size_t) ((rng_state * 0x2545F4914F6CDD1DULL) >> 11) % n;
}

/* line_start_near - the start of a line of s near offset at */
static size_t
line_start_near(const char *s, size_t len, size_t at)
{
	while (at > 0 && at <= len && s[at - 1] != '\n')
		at--;
	return at;
}

/*
 * mutate - one variant of src in dst (room for cap bytes): a few of byte
 * flips, random bytes, truncation, deleted or duplicated ranges, copied
 * delimiter lines, CRLF/LF swaps, line ends and folding inserted
 */
static size_t
mutate(const char *src, size_t len, char *dst, size_t cap)
{
	size_t		n = len < cap ? len : cap;
	int			rounds = 1 + (int) rnd(4);
	int			k;

	memcpy(dst, src, n);
	for (k = 0; k < rounds && n > 0; k++)
	{
		size_t		at = rnd(n);
		size_t		span = 1 + rnd(n - at < 400 ? n - at : 400);

		switch (rnd(10))
		{
			case 0:				/* bit flip */
				dst[at] = (char) (dst[at] ^ (1 << rnd(8)));
				break;
			case 1:				/* random byte, often one that means something */
				{
					static const char special[] = "\n\r\t :;<>\"=-@()\\+#.";

					dst[at] = rnd(2) ? special[rnd(sizeof(special) - 1)] : (char) rnd(256);
				}
				break;
			case 2:				/* truncate */
				n = at;
				break;
			case 3:				/* delete a range */
				memmove(dst + at, dst + at + span, n - at - span);
				n -= span;
				break;
			case 4:				/* duplicate a range */
				if (n + span <= cap)
				{
					memmove(dst + at + span, dst + at, n - at);
					n += span;
				}
				break;
			case 5:				/* copy a delimiter ("--...") line somewhere else */
				{
					size_t		from = 0;
					size_t		tries;
					size_t		end;
					size_t		to;

					for (tries = 0; tries < 20; tries++)
					{
						from = line_start_near(dst, n, rnd(n));
						if (from + 2 < n && dst[from] == '-' && dst[from + 1] == '-')
							break;
					}
					end = from;
					while (end < n && dst[end] != '\n')
						end++;
					if (end < n)
						end++;
					to = line_start_near(dst, n, rnd(n));
					if (end > from && n + (end - from) <= cap)
					{
						memmove(dst + to + (end - from), dst + to, n - to);
						if (from >= to)
							memmove(dst + to, dst + from + (end - from), end - from);
						else
							memmove(dst + to, dst + from, end - from);
						n += end - from;
					}
				}
				break;
			case 6:				/* LF <-> CRLF at one line end */
				{
					char	   *nl = memchr(dst + at, '\n', n - at);

					if (nl == NULL)
						break;
					if (nl > dst && nl[-1] == '\r')
					{
						memmove(nl - 1, nl, (size_t) (dst + n - nl));
						n--;
					}
					else if (n < cap)
					{
						memmove(nl + 1, nl, (size_t) (dst + n - nl));
						*nl = '\r';
						n++;
					}
				}
				break;
			case 7:				/* insert a line end or a fold */
				if (n + 2 <= cap)
				{
					memmove(dst + at + 2, dst + at, n - at);
					dst[at] = '\n';
					dst[at + 1] = rnd(2) ? ' ' : '\n';
					n += 2;
				}
				break;
			case 8:				/* overwrite with a copy of another range */
				{
					size_t		from = rnd(n);
					size_t		m = span;

					if (m > n - from)
						m = n - from;
					if (m > n - at)
						m = n - at;
					memmove(dst + at, dst + from, m);
				}
				break;
			default:			/* cut the tail of a line */
				{
					char	   *nl = memchr(dst + at, '\n', n - at);

					if (nl != NULL)
					{
						size_t		cut = (size_t) (nl - dst) - at;

						memmove(dst + at, nl, (size_t) (dst + n - nl));
						n -= cut;
					}
				}
				break;
		}
	}
	return n;
}

/* test_mutations - DSN_MUTATIONS variants of every sample: no crash, every invariant kept */
static void
test_mutations(void)
{
	const char *env = getenv("DSN_MUTATIONS");
	long		per_sample = env != NULL ? atol(env) : 20000;
	long		total = 0;
	long		kinds[4] = {0, 0, 0, 0};
	int			s;

	for (s = 0; s < NSAMPLES; s++)
	{
		size_t		len = 0;
		char	   *raw = read_sample(samples[s].file, &len);
		size_t		cap = len * 2 + 64;
		char	   *work = malloc(cap);
		long		i;
		long		bad = 0;
		char		first_why[160] = "";

		if (raw == NULL || work == NULL)
		{
			free(raw);
			free(work);
			continue;
		}
		for (i = 0; i < per_sample; i++)
		{
			size_t		n = mutate(raw, len, work, cap);
			char	   *exact = malloc(n > 0 ? n : 1);
			DsnReport	r;
			char		why[128];

			/* an exact-size copy: a read one byte past the end is an ASan error */
			memcpy(exact, work, n);
			if (dsn_parse(exact, n, &r))
			{
				if (r.kind >= DSN_KIND_OTHER && r.kind <= DSN_KIND_MALFORMED)
					kinds[r.kind]++;
				if (!report_ok(&r, why, sizeof(why)))
				{
					if (bad++ == 0)
						snprintf(first_why, sizeof(first_why), "variant %ld: %s", i, why);
				}
			}
			else
				bad++;
			dsn_report_free(&r);
			free(exact);
			total++;
		}
		CHECK(bad == 0, "%s: %ld of %ld variants broke an invariant (%s)", samples[s].file, bad,
			  per_sample, first_why);
		free(raw);
		free(work);
	}
	printf("mutations: %ld variants (other %ld, delivery-status %ld, complaint %ld, malformed %ld)\n",
		   total, kinds[0], kinds[1], kinds[2], kinds[3]);
}

int
main(int argc, char **argv)
{
	if (argc > 1)
		samples_dir = argv[1];

	test_samples();
	test_sample_details();
	test_mime_handling();
	test_limits();
	test_verp();
	test_names();
	test_out_of_memory();
	test_mutations();

	printf("%d passed, %d failed\n", n_passed, n_failed);
	return n_failed == 0 ? 0 : 1;
}

/*-------------------------------------------------------------------------
 *
 * fuzz_dsn.c
 *	  libFuzzer harness for src/dsn.c: any bytes are a mail from the bounce
 *	  mailbox.
 *
 * Besides the sanitizers' own findings, every report is checked against
 * the promises of dsn.h (strings valid UTF-8 without control characters,
 * at most DSN_MAX_TEXT bytes, statuses x.y.z, counts within their caps);
 * a broken promise aborts, so libFuzzer keeps the input as a crash.
 *
 * Build and run (see test/fuzz/README):
 *   make -C test/fuzz fuzz-dsn FUZZ_TIME=300
 *
 * test/fuzz/fuzz_dsn.c
 *
 *-------------------------------------------------------------------------
 */
#include "dsn.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern int	LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* text_ok - a report string keeps the promises of dsn.h */
static int
text_ok(const char *s)
{
	const unsigned char *p = (const unsigned char *) s;
	size_t		n;

	if (s == NULL)
		return 1;
	n = strlen(s);
	if (n == 0 || n > DSN_MAX_TEXT || s[0] == ' ' || s[n - 1] == ' ')
		return 0;
	while (*p != '\0')
	{
		int			len;
		int			k;
		uint32_t	cp;

		if (*p < 0x80)
		{
			if (*p < 0x20 || *p == 0x7F)
				return 0;
			p++;
			continue;
		}
		if (*p >= 0xC2 && *p <= 0xDF)
			len = 1, cp = *p & 0x1F;
		else if (*p >= 0xE0 && *p <= 0xEF)
			len = 2, cp = *p & 0x0F;
		else if (*p >= 0xF0 && *p <= 0xF4)
			len = 3, cp = *p & 0x07;
		else
			return 0;
		for (k = 1; k <= len; k++)
		{
			if ((p[k] & 0xC0) != 0x80)
				return 0;
			cp = (cp << 6) | (p[k] & 0x3F);
		}
		if ((len == 2 && cp < 0x800) || (len == 3 && cp < 0x10000) || cp > 0x10FFFF ||
			(cp >= 0xD800 && cp <= 0xDFFF) || (cp >= 0x80 && cp < 0xA0))
			return 0;
		p += len + 1;
	}
	return 1;
}

/* check - abort so that libFuzzer saves the input */
static void
check(int ok)
{
	if (!ok)
		abort();
}

/* LLVMFuzzerTestOneInput - parse, check every promise, use the helpers on the results, free */
int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	DsnReport	r;
	char		token[DSN_VERP_TOKEN_SIZE];
	char		tag[64];
	long long	id;
	int			i;

	if (!dsn_parse((const char *) data, size, &r))
		return 0;
	check(r.kind >= DSN_KIND_OTHER && r.kind <= DSN_KIND_MALFORMED);
	check((r.kind == DSN_KIND_MALFORMED) == (r.error != NULL));
	check(r.nrecipients >= 0 && r.nrecipients <= DSN_MAX_RECIPIENTS);
	check(r.kind != DSN_KIND_DELIVERY_STATUS || r.nrecipients > 0);
	check(r.naddresses >= 0 && r.naddresses <= DSN_MAX_ADDRESSES);
	check(text_ok(r.reporting_mta) && text_ok(r.original_envelope_id) &&
		  text_ok(r.feedback_type) && text_ok(r.returned_message_id));
	for (i = 0; i < r.nrecipients; i++)
	{
		const DsnRecipient *rc = &r.recipients[i];
		size_t		n = strlen(rc->status);

		check(text_ok(rc->final_recipient) && text_ok(rc->original_recipient) &&
			  text_ok(rc->diagnostic) && text_ok(rc->remote_mta));
		check(n == 0 || (n >= 5 && (rc->status[0] == '2' || rc->status[0] == '4' ||
									rc->status[0] == '5') && rc->status[1] == '.'));
		check(rc->action >= DSN_ACTION_NONE && rc->action <= DSN_ACTION_EXPANDED);
		(void) dsn_recipient_is_permanent_failure(rc);
	}
	for (i = 0; i < r.naddresses; i++)
	{
		check(text_ok(r.addresses[i].address) && r.addresses[i].address != NULL);
		check(i == 0 || r.addresses[i - 1].source <= r.addresses[i].source);
		if (dsn_verp_token(r.addresses[i].address, NULL, NULL, token, sizeof(token)))
			(void) dsn_verp_message(token, &id, tag, sizeof(tag));
	}
	(void) dsn_report_verp_token(&r, "erp", "example.com", token, sizeof(token));
	dsn_report_free(&r);
	return 0;
}

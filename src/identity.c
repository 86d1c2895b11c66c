/*-------------------------------------------------------------------------
 *
 * identity.c
 *	  This database's identity: what tells a copy from the original, so
 *	  that a copy keeps quiet, and what makes Message-IDs (and, later, VERP
 *	  addresses) unique across databases and clusters.
 *
 * Why two tables.  CREATE EXTENSION draws a random token and writes it,
 * with the database's OID and name, into
 *   - notify.identity, a configuration table that pg_dump dumps;
 *   - notify.identity_local, a member table that pg_dump does not dump.
 * Then each way of getting a database tells its story:
 *   - pg_dump + pg_restore (into another database, or another cluster):
 *     the restore runs CREATE EXTENSION, which draws a new token into both
 *     tables, then restores notify.identity's rows: the original's token
 *     is now there too, and differs from the local one: a copy.  The
 *     restore writes those rows only later, in transactions of their own,
 *     and the first CREATE EXTENSION's commit starts a worker: so a
 *     CREATE EXTENSION run by pg_restore (application_name) marks the
 *     database restored at once (which also covers a dump of a version
 *     without the identity), and a change of the identity makes running
 *     workers look again before their next round (see worker.c,
 *     database_changed).  A plain-format dump replayed by psql is told by
 *     the rows alone;
 *   - CREATE DATABASE ... TEMPLATE, or a copy of the files of a database:
 *     both tables come along, but the OID they recorded is not this
 *     database's: a copy (created from a template database, it adopts
 *     itself: templates are made to be copied, see worker.c);
 *   - ALTER DATABASE ... RENAME, a promoted standby, pg_upgrade (which
 *     keeps database OIDs since PostgreSQL 15 and copies the tables'
 *     files): nothing differs: the same database.
 * A physical copy of a whole cluster started elsewhere (a base backup
 * restored as a test server) cannot be told from a promoted standby, and
 * is not detected: docs/operations.md says to start such a copy with
 * notify.enabled = off.  The rule itself is one SQL function,
 * notify._identity(), used by the worker, worker_status() and
 * adopt_copy().
 *
 * A copy's workers send nothing, schedule nothing and fan nothing out
 * (events are still captured: the application must not fail), until
 * notify.adopt_copy() gives it an identity of its own.
 *
 * The token (12 hexadecimal digits, 48 random bits) goes into every
 * Message-ID, so that the same message number in two databases, or in a
 * copy and its original, is never the same Message-ID; a retry of a
 * message keeps its Message-ID (the token changes only at adoption).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/namespace.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"

#include "notify_ext.h"

#define TOKEN_BYTES 6
#define TOKEN_SIZE (TOKEN_BYTES * 2 + 1)

/* The worker's token, read when it checks the database's identity. */
static char worker_token[TOKEN_SIZE] = "";

PG_FUNCTION_INFO_V1(notify_new_token);

/* notify_new_token: notify._new_token(): 12 random hexadecimal digits. */
Datum
notify_new_token(PG_FUNCTION_ARGS)
{
	uint8		buf[TOKEN_BYTES];
	char		out[TOKEN_SIZE];

	if (!pg_strong_random(buf, sizeof(buf)))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("notify_ext: could not generate a random token")));
	for (int i = 0; i < TOKEN_BYTES; i++)
		snprintf(out + 2 * i, 3, "%02x", buf[i]);
	PG_RETURN_TEXT_P(cstring_to_text(out));
}

/* notify_set_database_token: the worker's copy of the token (worker.c reads it each wake-up). */
void
notify_set_database_token(const char *token)
{
	strlcpy(worker_token, token ? token : "", sizeof(worker_token));
}

/*
 * notify_database_token: this database's token, for Message-IDs.  A
 * worker has it from its last look at the identity (it sends outside any
 * transaction); a backend (test_smtp) reads it now.  Empty when there is
 * none (an extension older than 0.3).
 */
const char *
notify_database_token(void)
{
	static char backend_token[TOKEN_SIZE];
	Oid			nsp;

	if (notify_worker_slot >= 0 || !IsTransactionState())
		return worker_token;
	backend_token[0] = '\0';
	nsp = get_namespace_oid("notify", true);
	if (!OidIsValid(nsp) || !OidIsValid(get_relname_relid("identity_local", nsp)))
		return backend_token;
	SPI_connect();
	if (SPI_execute("SELECT token FROM notify.identity_local ORDER BY created_at DESC LIMIT 1",
					true, 1) == SPI_OK_SELECT && SPI_processed == 1)
	{
		char	   *t = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		strlcpy(backend_token, t ? t : "", sizeof(backend_token));
	}
	SPI_finish();
	return backend_token;
}

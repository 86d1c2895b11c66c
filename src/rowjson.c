/*-------------------------------------------------------------------------
 *
 * rowjson.c
 *	  A watched row as jsonb, equal to to_jsonb(row), at a fraction of its
 *	  cost; and the table's quoted name.  Both kept per relation.
 *
 * to_jsonb(row) looks up, for every column of every row, how to write the
 * column's type (several catalog lookups, one of them for a cast to json)
 * and the output function (fmgr_info at each call); then it prints every
 * number and parses the text back.  On the ERP's hot path that was the
 * largest part of capture.  Here the per-column part is found once per
 * relation and kept until the relation changes (relcache invalidation):
 *
 *	- bool, integers, numeric: a jsonb bool or number, as to_jsonb writes;
 *	- float4/float8: printed and read as numeric, as to_jsonb does (NaN and
 *	  Infinity become strings, as there);
 *	- date, timestamp, timestamptz: JsonEncodeDateTime, as to_jsonb;
 *	- text, varchar, char: the string itself; jsonb: embedded;
 *	- other built-in scalar types: their output function's text, the
 *	  FmgrInfo kept;
 *	- everything else (domains, arrays, composites, json, enums, types of
 *	  extensions, which may have a cast to json): to_jsonb of the column's
 *	  value, so the rules stay PostgreSQL's own.
 *
 * The result is the same jsonb value (the regression test capture.sql
 * compares it with to_jsonb over every kind of column).
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/transam.h"
#include "catalog/pg_type.h"
#include "fmgr.h"
#include "lib/stringinfo.h"
#include "nodes/makefuncs.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/numeric.h"
#include "utils/rel.h"
#include "utils/syscache.h"

#include "notify_ext.h"

typedef enum ColumnKind
{
	COL_DROPPED,
	COL_BOOL,
	COL_INT2,
	COL_INT4,
	COL_INT8,
	COL_NUMERIC,
	COL_FLOAT,					/* printed, read back as numeric */
	COL_DATETIME,				/* JsonEncodeDateTime */
	COL_TEXT,					/* text, varchar, bpchar: the bytes */
	COL_JSONB,
	COL_OUTPUT,					/* a built-in scalar: its output function */
	COL_TO_JSONB				/* anything else: to_jsonb of the value */
} ColumnKind;

typedef struct ColumnWriter
{
	ColumnKind	kind;
	Oid			type;
	char	   *name;
	int			namelen;
	FmgrInfo	out;			/* COL_FLOAT, COL_OUTPUT */
	FmgrInfo	to_jsonb;		/* COL_TO_JSONB: fn_expr tells it the type */
} ColumnWriter;

typedef struct RowWriter
{
	Oid			relid;
	bool		stale;			/* the relation changed: build again */
	MemoryContext cxt;			/* everything below */
	char	   *qualified_name; /* "schema"."table", quoted where needed */
	int			natts;
	ColumnWriter *cols;
	bool		scalars_only;	/* no column can hold a JSON container */
	int			npairs;			/* columns that are not dropped ... */
	int		   *key_order;		/* ... in jsonb's key order (length, then bytes) */
} RowWriter;

#define MAX_WRITERS 64
static RowWriter *writers[MAX_WRITERS];
static int	n_writers = 0;
static bool callbacks_registered = false;

/* writers_inval_rel: a relation changed (or all did): its writer is stale. */
static void
writers_inval_rel(Datum arg, Oid relid)
{
	for (int i = 0; i < n_writers; i++)
		if (relid == InvalidOid || writers[i]->relid == relid)
			writers[i]->stale = true;
}

/* writers_inval_all: a schema was renamed (the qualified names): all stale. */
static void
writers_inval_all(Datum arg, int cacheid, uint32 hashvalue)
{
	writers_inval_rel(arg, InvalidOid);
}

/* column_kind: how a column of this type is written. */
static ColumnKind
column_kind(Oid type)
{
	switch (type)
	{
		case BOOLOID:
			return COL_BOOL;
		case INT2OID:
			return COL_INT2;
		case INT4OID:
			return COL_INT4;
		case INT8OID:
			return COL_INT8;
		case NUMERICOID:
			return COL_NUMERIC;
		case FLOAT4OID:
		case FLOAT8OID:
			return COL_FLOAT;
		case DATEOID:
		case TIMESTAMPOID:
		case TIMESTAMPTZOID:
			return COL_DATETIME;
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
			return COL_TEXT;
		case JSONBOID:
			return COL_JSONB;
		case JSONOID:
			return COL_TO_JSONB;
		default:
			break;
	}

	/*
	 * A built-in base type that is neither an array nor a row: to_jsonb
	 * writes its output as a string (it looks for casts to json only for
	 * types created later, FirstNormalObjectId and above).
	 */
	if (type < FirstNormalObjectId && get_typtype(type) == TYPTYPE_BASE &&
		!OidIsValid(get_element_type(type)) && type != OIDOID)
		return COL_OUTPUT;
	return COL_TO_JSONB;
}

/* jsonb's order of object keys: shorter first, then bytewise */
static int
key_order_cmp(const void *a, const void *b, void *arg)
{
	ColumnWriter *cols = (ColumnWriter *) arg;
	ColumnWriter *x = &cols[*(const int *) a];
	ColumnWriter *y = &cols[*(const int *) b];

	if (x->namelen != y->namelen)
		return x->namelen < y->namelen ? -1 : 1;
	return memcmp(x->name, y->name, x->namelen);
}

/* build_writer: the per-column part of to_jsonb for this relation, once. */
static void
build_writer(RowWriter *w, Relation rel)
{
	TupleDesc	desc = RelationGetDescr(rel);
	MemoryContext old = MemoryContextSwitchTo(w->cxt);

	w->qualified_name = quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
												   RelationGetRelationName(rel));
	w->natts = desc->natts;
	w->cols = palloc0(sizeof(ColumnWriter) * desc->natts);
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		ColumnWriter *c = &w->cols[i];

		if (att->attisdropped)
		{
			c->kind = COL_DROPPED;
			continue;
		}
		c->type = att->atttypid;
		c->name = pstrdup(NameStr(att->attname));
		c->namelen = strlen(c->name);
		c->kind = column_kind(att->atttypid);
		if (c->kind == COL_FLOAT || c->kind == COL_OUTPUT)
		{
			Oid			outfunc;
			bool		varlena;

			getTypeOutputInfo(att->atttypid, &outfunc, &varlena);
			fmgr_info_cxt(outfunc, &c->out, w->cxt);
		}
		else if (c->kind == COL_TO_JSONB)
		{
			fmgr_info_cxt(F_TO_JSONB, &c->to_jsonb, w->cxt);
			c->to_jsonb.fn_expr = (Node *) makeFuncExpr(F_TO_JSONB, JSONBOID,
														list_make1(makeNullConst(att->atttypid, att->atttypmod, att->attcollation)),
														InvalidOid, InvalidOid, COERCE_EXPLICIT_CALL);
		}
	}
	w->scalars_only = true;
	w->npairs = 0;
	w->key_order = palloc(sizeof(int) * Max(desc->natts, 1));
	for (int i = 0; i < desc->natts; i++)
	{
		if (w->cols[i].kind == COL_DROPPED)
			continue;
		if (w->cols[i].kind == COL_JSONB || w->cols[i].kind == COL_TO_JSONB)
			w->scalars_only = false;
		w->key_order[w->npairs++] = i;
	}
	qsort_arg(w->key_order, w->npairs, sizeof(int), key_order_cmp, w->cols);
	MemoryContextSwitchTo(old);
	w->stale = false;
}

/* writer_for: the relation's writer, built or rebuilt when needed. */
static RowWriter *
writer_for(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);
	RowWriter  *w = NULL;

	if (!callbacks_registered)
	{
		CacheRegisterRelcacheCallback(writers_inval_rel, (Datum) 0);
		CacheRegisterSyscacheCallback(NAMESPACEOID, writers_inval_all, (Datum) 0);
		callbacks_registered = true;
	}
	for (int i = 0; i < n_writers; i++)
		if (writers[i]->relid == relid)
		{
			w = writers[i];
			break;
		}
	if (w == NULL)
	{
		if (n_writers == MAX_WRITERS)
		{
			/* a backend watching this many tables: forget the oldest */
			w = writers[0];
			memmove(&writers[0], &writers[1], sizeof(RowWriter *) * (MAX_WRITERS - 1));
			n_writers--;
			MemoryContextReset(w->cxt);
		}
		else
		{
			w = MemoryContextAllocZero(TopMemoryContext, sizeof(RowWriter));
			w->cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext row writer",
										   ALLOCSET_SMALL_SIZES);
		}
		w->relid = relid;
		w->stale = true;
		writers[n_writers++] = w;
	}
	if (w->stale)
	{
		/*
		 * Rebuilt here, never in the callback: an invalidation can arrive
		 * while a row is being written (an output function reading the
		 * catalog), and that row still uses the old columns.
		 */
		MemoryContextReset(w->cxt);
		w->cols = NULL;
		build_writer(w, rel);
	}
	return w;
}

/* notify_relation_name: "schema"."table" of a watched relation, kept. */
const char *
notify_relation_name(Relation rel)
{
	return writer_for(rel)->qualified_name;
}

/* check_string_len: the limit to_jsonb enforces on strings. */
static void
check_string_len(size_t len)
{
	if (len > JENTRY_OFFLENMASK)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("string too long to represent as jsonb string"),
				 errdetail("Due to an implementation restriction, jsonb strings cannot exceed %d bytes.",
						   JENTRY_OFFLENMASK)));
}

/* set_string: jv as a jsonb string of len bytes at s. */
static void
set_string(JsonbValue *jv, char *s, size_t len)
{
	check_string_len(len);
	jv->type = jbvString;
	jv->val.string.val = s;
	jv->val.string.len = len;
}

/*
 * notify_push_jsonb: a jsonb value as the next value (WJB_VALUE) or
 * element (WJB_ELEM) of the object or array being built.
 */
void
notify_push_jsonb(JsonbParseState **state, JsonbIteratorToken token, Jsonb *j)
{
	JsonbValue	jv;

	if (JB_ROOT_IS_SCALAR(j))
	{
		/* a scalar is stored as a one-element raw array: take the element */
		JsonbIterator *it = JsonbIteratorInit(&j->root);

		(void) JsonbIteratorNext(&it, &jv, true);
		(void) JsonbIteratorNext(&it, &jv, true);
	}
	else
	{
		/* a container: pushJsonbValue copies it in, element by element */
		jv.type = jbvBinary;
		jv.val.binary.data = &j->root;
		jv.val.binary.len = VARSIZE(j) - VARHDRSZ;
	}
	(void) pushJsonbValue(state, token, &jv);
}

/* scalar_value: a column of a scalar kind (not COL_JSONB, COL_TO_JSONB) as jsonb. */
static void
scalar_value(ColumnWriter *c, Datum value, JsonbValue *out)
{
	JsonbValue	jv;

	switch (c->kind)
	{
		case COL_BOOL:
			jv.type = jbvBool;
			jv.val.boolean = DatumGetBool(value);
			break;
		case COL_INT2:
			jv.type = jbvNumeric;
			jv.val.numeric = int64_to_numeric(DatumGetInt16(value));
			break;
		case COL_INT4:
			jv.type = jbvNumeric;
			jv.val.numeric = int64_to_numeric(DatumGetInt32(value));
			break;
		case COL_INT8:
			jv.type = jbvNumeric;
			jv.val.numeric = int64_to_numeric(DatumGetInt64(value));
			break;
		case COL_NUMERIC:
			{
				Numeric		n = DatumGetNumeric(value);

				if (numeric_is_nan(n) || numeric_is_inf(n))
				{
					char	   *s = DatumGetCString(DirectFunctionCall1(numeric_out, value));

					set_string(&jv, s, strlen(s));
				}
				else
				{
					jv.type = jbvNumeric;
					jv.val.numeric = n;
				}
			}
			break;
		case COL_FLOAT:
			{
				char	   *s = OutputFunctionCall(&c->out, value);

				if (strpbrk(s, "Nn") != NULL)	/* NaN, Infinity, -Infinity */
					set_string(&jv, s, strlen(s));
				else
				{
					jv.type = jbvNumeric;
					jv.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(s),
																		 ObjectIdGetDatum(InvalidOid),
																		 Int32GetDatum(-1)));
				}
			}
			break;
		case COL_DATETIME:
			{
				char	   *s = JsonEncodeDateTime(NULL, value, c->type, NULL);

				set_string(&jv, s, strlen(s));
			}
			break;
		case COL_TEXT:
			{
				text	   *t = DatumGetTextPP(value);

				set_string(&jv, VARDATA_ANY(t), VARSIZE_ANY_EXHDR(t));
			}
			break;
		case COL_OUTPUT:
			{
				char	   *s = OutputFunctionCall(&c->out, value);

				set_string(&jv, s, strlen(s));
			}
			break;
		default:
			elog(ERROR, "notify_ext: unexpected column kind %d", (int) c->kind);
	}
	*out = jv;
}

/* push_value: one column's value into the object being built. */
static void
push_value(JsonbParseState **state, ColumnWriter *c, Datum value)
{
	JsonbValue	jv;

	if (c->kind == COL_JSONB)
		notify_push_jsonb(state, WJB_VALUE, DatumGetJsonbP(value));
	else if (c->kind == COL_TO_JSONB)
		notify_push_jsonb(state, WJB_VALUE, DatumGetJsonbP(FunctionCall1(&c->to_jsonb, value)));
	else
	{
		scalar_value(c, value, &jv);
		(void) pushJsonbValue(state, WJB_VALUE, &jv);
	}
}

/*
 * notify_row_to_jsonb: the row as to_jsonb(row) would give it: an object
 * of every column (dropped ones aside), keys in jsonb's order.
 */
Datum
notify_row_to_jsonb(Relation rel, HeapTuple tuple)
{
	RowWriter  *w = writer_for(rel);
	TupleDesc	desc = RelationGetDescr(rel);
	JsonbParseState *state = NULL;
	JsonbValue *result;
	Datum	   *values = palloc(sizeof(Datum) * desc->natts);
	bool	   *nulls = palloc(sizeof(bool) * desc->natts);

	if (w->natts != desc->natts)
		elog(ERROR, "notify_ext: row writer of relation \"%s\" is out of date", w->qualified_name);
	heap_deform_tuple(tuple, desc, values, nulls);
	if (w->scalars_only)
	{
		/*
		 * Every value a scalar: the object is laid out directly, its pairs
		 * already in jsonb's key order, without pushJsonbValue's sorting
		 * and copying.
		 */
		JsonbValue	obj;

		obj.type = jbvObject;
		obj.val.object.nPairs = w->npairs;
		obj.val.object.pairs = palloc(sizeof(JsonbPair) * Max(w->npairs, 1));
		for (int k = 0; k < w->npairs; k++)
		{
			int			i = w->key_order[k];
			JsonbPair  *pair = &obj.val.object.pairs[k];

			pair->key.type = jbvString;
			pair->key.val.string.val = w->cols[i].name;
			pair->key.val.string.len = w->cols[i].namelen;
			pair->order = k;
			if (nulls[i])
				pair->value.type = jbvNull;
			else
				scalar_value(&w->cols[i], values[i], &pair->value);
		}
		pfree(values);
		pfree(nulls);
		return JsonbPGetDatum(JsonbValueToJsonb(&obj));
	}
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < w->natts; i++)
	{
		ColumnWriter *c = &w->cols[i];
		JsonbValue	key;

		if (c->kind == COL_DROPPED)
			continue;
		key.type = jbvString;
		key.val.string.val = c->name;
		key.val.string.len = c->namelen;
		(void) pushJsonbValue(&state, WJB_KEY, &key);
		if (nulls[i])
		{
			JsonbValue	null;

			null.type = jbvNull;
			(void) pushJsonbValue(&state, WJB_VALUE, &null);
		}
		else
			push_value(&state, c, values[i]);
	}
	result = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	pfree(values);
	pfree(nulls);
	return JsonbPGetDatum(JsonbValueToJsonb(result));
}

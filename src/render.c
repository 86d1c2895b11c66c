/*-------------------------------------------------------------------------
 *
 * render.c
 *	  The server side of templates: checking them when they are stored,
 *	  picking the variant for a locale, resolving partials from
 *	  notify.template, and rendering subject, text and HTML bodies.
 *
 * The Mustache engine itself (template.c) knows nothing of PostgreSQL;
 * its allocations go through palloc (see render_init_allocators), so an
 * error raised in the middle of a render frees everything with the
 * memory context.
 *
 *-------------------------------------------------------------------------
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"

#include "mime.h"
#include "notify_ext.h"
#include "template.h"

PG_FUNCTION_INFO_V1(notify_check_template);
PG_FUNCTION_INFO_V1(notify_check_body_template);
PG_FUNCTION_INFO_V1(notify_check_address);
PG_FUNCTION_INFO_V1(notify_render);

/* A rendered body may not exceed this: a runaway template must not eat the server's memory. */
#define MAX_BODY_BYTES (16 * 1024 * 1024)

/* Which column of notify.template a render reads, for partials too. */
typedef enum TemplatePart
{
	PART_SUBJECT = 1,
	PART_TEXT = 2,
	PART_HTML = 3
} TemplatePart;

static const char *const part_names[] = {NULL, "subject", "text_body", "html_body"};

/* State a render hands to the partial callback. */
typedef struct PartialLookup
{
	const char *locale;
	TemplatePart part;
} PartialLookup;

static void *
pg_tmpl_alloc(size_t size)
{
	return palloc_extended(size, MCXT_ALLOC_HUGE);
}

static void *
pg_tmpl_realloc(void *ptr, size_t size)
{
	if (ptr == NULL)
		return palloc_extended(size, MCXT_ALLOC_HUGE);
	return repalloc_huge(ptr, size);
}

static void
pg_tmpl_free(void *ptr)
{
	if (ptr != NULL)
		pfree(ptr);
}

static void
pg_check_interrupts(void)
{
	CHECK_FOR_INTERRUPTS();
}

/* render_init_allocators: route the pure-C modules' memory through palloc. */
void
render_init_allocators(void)
{
	static const TmplAllocator ta = {pg_tmpl_alloc, pg_tmpl_realloc, pg_tmpl_free};
	static const MimeAllocator ma = {pg_tmpl_alloc, pg_tmpl_realloc, pg_tmpl_free};

	tmpl_set_allocator(&ta);
	mime_set_allocator(&ma);
	tmpl_set_interrupt_hook(pg_check_interrupts);
}

/* compile_or_error: compile a template source, or raise a syntax error that names where. */
static TmplTemplate *
compile_or_error(const char *name, const char *part, const char *src, size_t len)
{
	TmplError	err;
	TmplTemplate *t;

	memset(&err, 0, sizeof(err));
	t = tmpl_compile(src, len, &err);
	if (t == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("syntax error in template \"%s\", %s, line %d, column %d: %s",
						name, part, err.line, err.column, err.message)));
	return t;
}

/* notify_check_template: notify._check_template(name, part, source), used by set_template. */
Datum
notify_check_template(PG_FUNCTION_ARGS)
{
	text	   *src;
	char	   *name;
	char	   *part;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	part = text_to_cstring(PG_GETARG_TEXT_PP(1));
	src = PG_GETARG_TEXT_PP(2);
	tmpl_free(compile_or_error(name, part, VARDATA_ANY(src), VARSIZE_ANY_EXHDR(src)));
	PG_RETURN_VOID();
}

/*
 * notify_check_body_template: notify._check_body_template(channel, source),
 * used by set_webhook: the body is compiled when the channel is stored.
 */
Datum
notify_check_body_template(PG_FUNCTION_ARGS)
{
	text	   *src;
	char	   *channel;
	TmplError	err;
	TmplTemplate *t;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		PG_RETURN_VOID();
	channel = text_to_cstring(PG_GETARG_TEXT_PP(0));
	src = PG_GETARG_TEXT_PP(1);
	memset(&err, 0, sizeof(err));
	t = tmpl_compile(VARDATA_ANY(src), VARSIZE_ANY_EXHDR(src), &err);
	if (t == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_SYNTAX_ERROR),
				 errmsg("syntax error in body_template of channel \"%s\", line %d, column %d: %s",
						channel, err.line, err.column, err.message)));
	tmpl_free(t);
	PG_RETURN_VOID();
}

/* notify_check_address: notify._check_address(address, what): refuse what the mailer would. */
Datum
notify_check_address(PG_FUNCTION_ARGS)
{
	char		errbuf[256];
	char	   *addr;
	char	   *what;

	what = PG_ARGISNULL(1) ? "address" : text_to_cstring(PG_GETARG_TEXT_PP(1));
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s: email address must not be null", what)));
	addr = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!mime_check_address(addr, errbuf, sizeof(errbuf)))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("%s: %s", what, errbuf)));
	PG_RETURN_VOID();
}

/*
 * fetch_template: the template variant that fits the locale (exact tag,
 * language, none), palloc'd in the current context.  Returns false when
 * the template does not exist.  Runs inside an SPI connection.
 */
static bool
fetch_template(const char *name, const char *locale, char **parts)
{
	static SPIPlanPtr plan = NULL;
	Datum		args[2];
	char		nulls[2] = {' ', ' '};
	int			ret;
	MemoryContext caller = CurrentMemoryContext;

	if (plan == NULL)
	{
		Oid			types[2] = {TEXTOID, TEXTOID};

		plan = SPI_prepare("SELECT t.subject, t.text_body, t.html_body "
						   "FROM notify._pick_template($1, $2) t WHERE t.name IS NOT NULL",
						   2, types);
		if (plan == NULL || SPI_keepplan(plan) != 0)
			elog(ERROR, "could not prepare the template lookup: %s", SPI_result_code_string(SPI_result));
	}
	args[0] = CStringGetTextDatum(name);
	if (locale != NULL)
		args[1] = CStringGetTextDatum(locale);
	else
		nulls[1] = 'n';
	ret = SPI_execute_plan(plan, args, nulls, true, 1);
	/* SPI returns in its own context: go on in the caller's */
	MemoryContextSwitchTo(caller);
	if (ret != SPI_OK_SELECT)
		elog(ERROR, "template lookup failed: %s", SPI_result_code_string(ret));
	if (SPI_processed == 0)
		return false;
	for (int i = PART_SUBJECT; i <= PART_HTML; i++)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, i);

		parts[i] = v ? MemoryContextStrdup(caller, v) : NULL;
	}
	SPI_freetuptable(SPI_tuptable);
	return true;
}

/*
 * lookup_partial: TmplPartialFn over notify.template, in the caller's
 * locale and of the caller's kind (an HTML partial without an HTML body
 * falls back to its text).
 */
static const char *
lookup_partial(void *arg, const char *name, size_t *len)
{
	PartialLookup *pl = (PartialLookup *) arg;
	char	   *parts[4] = {NULL, NULL, NULL, NULL};
	char	   *src;

	if (!fetch_template(name, pl->locale, parts))
		return NULL;
	src = parts[pl->part];
	if (src == NULL && pl->part == PART_HTML)
		src = parts[PART_TEXT];
	if (src == NULL)
		return NULL;
	*len = strlen(src);
	return src;
}

/* jsonb_to_tmpl_value: the jsonb context as the renderer's value tree. */
TmplValue *
jsonb_to_tmpl_value(Jsonb *jb)
{
	char	   *text;
	char		errbuf[256];
	TmplValue  *v;

	if (jb == NULL)
		return NULL;
	text = JsonbToCString(NULL, &jb->root, VARSIZE(jb));
	v = tmpl_json_parse(text, strlen(text), errbuf, sizeof(errbuf));
	if (v == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_TEXT_REPRESENTATION),
				 errmsg("could not read the rendering context: %s", errbuf)));
	pfree(text);
	return v;
}

/* render_part: one compiled part of a template, rendered against ctx. */
static char *
render_part(const char *name, const char *locale, TemplatePart part,
			const TmplTemplate *t, const TmplValue *ctx)
{
	TmplBuf		out = {0};
	TmplError	err;
	PartialLookup pl;

	pl.locale = locale;
	pl.part = part;
	memset(&err, 0, sizeof(err));
	if (tmpl_render(t, ctx, part == PART_HTML ? TMPL_ESCAPE_HTML : TMPL_ESCAPE_NONE,
					lookup_partial, &pl, MAX_BODY_BYTES, &out, &err) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("could not render template \"%s\", %s: %s%s",
						name, part_names[part], err.message,
						(err.line > 0 && strstr(err.message, "line ") == NULL)
						? psprintf(" (line %d, column %d)", err.line, err.column) : "")));
	if (out.data == NULL)
		return pstrdup("");
	return out.data;
}

/* A template variant, compiled: what fan-out renders for every recipient. */
typedef struct CompiledTemplate
{
	char	   *name;
	char	   *locale;			/* as asked for, "" for none */
	TmplTemplate *part[4];		/* indexed by TemplatePart; html may be NULL */
} CompiledTemplate;

/*
 * While a fan-out batch runs, compiled templates are kept: a group of 50
 * gets one lookup and one compile per template and locale, not 50.  The
 * cache lives for one batch only, so an edited template is used from the
 * next batch on.  Outside a batch (notify.render) nothing is cached.
 */
static MemoryContext cache_cxt = NULL;
static List *cache = NIL;
static List *body_cache = NIL;	/* of CompiledBody: webhook bodies */

/* render_cache_begin: start caching compiled templates (a fan-out batch). */
void
render_cache_begin(void)
{
	render_cache_end();
	cache_cxt = AllocSetContextCreate(TopMemoryContext, "notify_ext template cache",
									  ALLOCSET_DEFAULT_SIZES);
}

/* render_cache_end: forget them. */
void
render_cache_end(void)
{
	if (cache_cxt != NULL)
		MemoryContextDelete(cache_cxt);
	cache_cxt = NULL;
	cache = NIL;
	body_cache = NIL;
}

/* compiled_template: the compiled variant of a template for a locale (cached in a batch). */
static CompiledTemplate *
compiled_template(const char *name, const char *locale)
{
	const char *key = locale ? locale : "";
	char	   *src[4] = {NULL, NULL, NULL, NULL};
	CompiledTemplate *ct;
	ListCell   *lc;
	MemoryContext old;

	foreach(lc, cache)
	{
		ct = (CompiledTemplate *) lfirst(lc);
		if (strcmp(ct->name, name) == 0 && strcmp(ct->locale, key) == 0)
			return ct;
	}
	if (!fetch_template(name, locale, src))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("template \"%s\" does not exist", name),
				 errhint("Create it with notify.set_template.")));
	old = MemoryContextSwitchTo(cache_cxt ? cache_cxt : CurrentMemoryContext);
	ct = palloc0(sizeof(CompiledTemplate));
	ct->name = pstrdup(name);
	ct->locale = pstrdup(key);
	for (int i = PART_SUBJECT; i <= PART_HTML; i++)
		if (src[i] != NULL)
			ct->part[i] = compile_or_error(name, part_names[i], src[i], strlen(src[i]));
	if (cache_cxt != NULL)
		cache = lappend(cache, ct);
	MemoryContextSwitchTo(old);
	return ct;
}

/*
 * render_template_value: subject, text and HTML of a template for a
 * locale, against a context already in the renderer's form.  Must run
 * inside an SPI connection.
 */
RenderedMessage *
render_template_value(const char *name, const char *locale, const TmplValue *ctx)
{
	RenderedMessage *msg = palloc0(sizeof(RenderedMessage));
	CompiledTemplate *ct = compiled_template(name, locale);

	msg->subject = render_part(name, locale, PART_SUBJECT, ct->part[PART_SUBJECT], ctx);
	msg->text_body = render_part(name, locale, PART_TEXT, ct->part[PART_TEXT], ctx);
	if (ct->part[PART_HTML] != NULL)
		msg->html_body = render_part(name, locale, PART_HTML, ct->part[PART_HTML], ctx);
	return msg;
}

/* A webhook channel's body template, compiled, kept for a fan-out batch. */
typedef struct CompiledBody
{
	char	   *channel;
	char	   *source;
	TmplTemplate *t;
} CompiledBody;

/*
 * render_body_template: a webhook channel's body for one message.  With
 * json, {{path}} prints as JSON string content (quotes, backslashes and
 * control characters escaped), so business data cannot break the
 * document; {{{path}}} stays raw.  Partials are the text bodies of named
 * templates, in the recipient's locale.  Must run inside an SPI connection.
 */
char *
render_body_template(const char *channel, const char *source, bool json,
					 const char *locale, const TmplValue *ctx)
{
	CompiledBody *cb = NULL;
	ListCell   *lc;
	TmplBuf		out = {0};
	TmplError	err;
	PartialLookup pl;

	foreach(lc, body_cache)
	{
		CompiledBody *c = (CompiledBody *) lfirst(lc);

		if (strcmp(c->channel, channel) == 0 && strcmp(c->source, source) == 0)
		{
			cb = c;
			break;
		}
	}
	if (cb == NULL)
	{
		MemoryContext old = MemoryContextSwitchTo(cache_cxt ? cache_cxt : CurrentMemoryContext);

		memset(&err, 0, sizeof(err));
		cb = palloc0(sizeof(CompiledBody));
		cb->channel = pstrdup(channel);
		cb->source = pstrdup(source);
		cb->t = tmpl_compile(source, strlen(source), &err);
		if (cb->t == NULL)
			ereport(ERROR,
					(errcode(ERRCODE_SYNTAX_ERROR),
					 errmsg("syntax error in body_template of channel \"%s\", line %d, column %d: %s",
							channel, err.line, err.column, err.message)));
		if (cache_cxt != NULL)
			body_cache = lappend(body_cache, cb);
		MemoryContextSwitchTo(old);
	}

	pl.locale = locale;
	pl.part = PART_TEXT;
	memset(&err, 0, sizeof(err));
	if (tmpl_render(cb->t, ctx, json ? TMPL_ESCAPE_JSON : TMPL_ESCAPE_NONE,
					lookup_partial, &pl, MAX_BODY_BYTES, &out, &err) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("could not render the body_template of channel \"%s\": %s%s",
						channel, err.message,
						(err.line > 0 && strstr(err.message, "line ") == NULL)
						? psprintf(" (line %d, column %d)", err.line, err.column) : "")));
	if (out.data == NULL)
		return pstrdup("");
	return out.data;
}

/* render_template_named: as render_template_value, from a jsonb context. */
RenderedMessage *
render_template_named(const char *name, const char *locale, Jsonb *context)
{
	return render_template_value(name, locale, jsonb_to_tmpl_value(context));
}

/* notify_render: notify.render(template, context, locale): preview without sending. */
Datum
notify_render(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	char	   *name;
	char	   *locale = NULL;
	Jsonb	   *context = NULL;
	RenderedMessage *msg;
	Datum		values[3];
	bool		nulls[3] = {false, false, false};

	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("notify.render: template name must not be null")));
	name = text_to_cstring(PG_GETARG_TEXT_PP(0));
	if (!PG_ARGISNULL(1))
		context = PG_GETARG_JSONB_P(1);
	if (!PG_ARGISNULL(2))
		locale = text_to_cstring(PG_GETARG_TEXT_PP(2));

	InitMaterializedSRF(fcinfo, 0);

	SPI_connect();
	msg = render_template_named(name, locale, context);
	values[0] = CStringGetTextDatum(msg->subject);
	values[1] = CStringGetTextDatum(msg->text_body);
	if (msg->html_body != NULL)
		values[2] = CStringGetTextDatum(msg->html_body);
	else
		nulls[2] = true;
	/* the datums must outlive SPI's memory */
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	SPI_finish();

	return (Datum) 0;
}

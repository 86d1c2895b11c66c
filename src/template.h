/*-------------------------------------------------------------------------
 *
 * template.h
 *	  Mustache templates and the JSON values they are rendered against.
 *
 * This module is plain C11 on top of libc only, so that it can be linked
 * into the extension and into standalone test programs alike.  Every
 * allocation goes through the hooks set with tmpl_set_allocator(); inside
 * the server these are palloc/repalloc/pfree, so an ERROR raised from a
 * callback (partial lookup, interrupt hook) leaks nothing.
 *
 * Sources (templates, JSON text) are always (pointer, length) pairs; they
 * need not be NUL-terminated and may contain NUL bytes.
 *
 *-------------------------------------------------------------------------
 */
#ifndef TEMPLATE_H
#define TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>

/* Limits; exceeding one is an error, never a crash */
#define TMPL_JSON_MAX_DEPTH		1000	/* nesting of JSON arrays/objects */
#define TMPL_MAX_SECTION_DEPTH	100 /* nesting of sections in one template */
#define TMPL_MAX_PARTIAL_DEPTH	64	/* nesting of partials while rendering */
#define TMPL_DEFAULT_MAX_STEPS	100000000UL /* see tmpl_set_step_limit() */

/*
 * Allocation hooks.  Default malloc/realloc/free.  The module never calls
 * realloc with a NULL pointer nor free with NULL, and never asks for zero
 * bytes, so repalloc/pfree/palloc fit as they are.  A hook may return NULL
 * (reported as "out of memory") or not return at all (ereport).
 */
typedef struct TmplAllocator
{
	void	   *(*alloc) (size_t size);
	void	   *(*realloc) (void *ptr, size_t size);
	void		(*free) (void *ptr);
} TmplAllocator;

extern void tmpl_set_allocator(const TmplAllocator *a); /* NULL: defaults */

/* Allocate through the hooks, for callers that hand memory to the module */
extern void *tmpl_mem_alloc(size_t size);
extern void *tmpl_mem_realloc(void *ptr, size_t size);	/* ptr may be NULL */
extern void tmpl_mem_free(void *ptr);	/* ptr may be NULL */

/*
 * JSON value tree: the rendering context.  Numbers keep their lexeme and
 * are printed verbatim.  Objects keep their member order; when a key is
 * repeated, lookups see the last one (as jsonb would).
 */
typedef enum TmplValueKind
{
	TV_NULL,
	TV_BOOL,
	TV_NUMBER,
	TV_STRING,
	TV_ARRAY,
	TV_OBJECT
} TmplValueKind;

typedef struct TmplValue TmplValue;

struct TmplValue
{
	TmplValueKind kind;
	bool		boolean;		/* TV_BOOL */
	char	   *str;			/* TV_STRING: UTF-8 text, no NUL inside;
								 * TV_NUMBER: lexeme; NUL-terminated */
	size_t		len;			/* bytes in str, without the NUL */
	size_t		count;			/* TV_ARRAY: elements; TV_OBJECT: members */
	TmplValue **items;			/* TV_ARRAY: elements; TV_OBJECT: values */
	char	  **keys;			/* TV_OBJECT: member names, NUL-terminated */
	size_t	   *keylens;		/* TV_OBJECT: bytes in each member name */
};

/*
 * Strict RFC 8259 parser.  Returns NULL on error, with
 * "line L, column C: message" in errbuf (columns count characters).
 * Rejects invalid UTF-8, lone surrogates and \u0000.
 */
extern TmplValue *tmpl_json_parse(const char *text, size_t len,
								  char *errbuf, size_t errlen);
extern void tmpl_value_free(TmplValue *v);	/* v may be NULL */
extern const TmplValue *tmpl_value_get(const TmplValue *obj, const char *key);

/* Compiled template */
typedef struct TmplTemplate TmplTemplate;

/* line/column are 1-based (characters, lines split on \n); 0 if unknown */
typedef struct TmplError
{
	int			line;
	int			column;
	char		message[256];
} TmplError;

/* NULL on syntax error (or out of memory), err filled; err may be NULL */
extern TmplTemplate *tmpl_compile(const char *src, size_t len, TmplError *err);
extern void tmpl_free(TmplTemplate *t); /* t may be NULL */

typedef enum TmplEscape
{
	TMPL_ESCAPE_NONE,
	TMPL_ESCAPE_HTML,
	TMPL_ESCAPE_JSON
} TmplEscape;

/*
 * Partial lookup: return the partial's source (owned by the caller, valid
 * during the render) and its length, or NULL when not found (renders as
 * empty).  Called at most once per partial name per tmpl_render() call.
 */
typedef const char *(*TmplPartialFn) (void *arg, const char *name, size_t *len);

/* Growable output buffer; start from {0}; data is NUL-terminated */
typedef struct TmplBuf
{
	char	   *data;
	size_t		len;
	size_t		cap;
} TmplBuf;

/*
 * Render t against ctx (which may be NULL) and append the result to out.
 * Returns 0 on success, -1 on error with err filled: syntax error inside a
 * partial (position inside the partial, message names it), partials nested
 * deeper than TMPL_MAX_PARTIAL_DEPTH, more than max_output bytes appended
 * (when max_output > 0), step limit exceeded, out of memory.  On error out
 * holds a partial result; either way release it with tmpl_buf_free().
 */
extern int	tmpl_render(const TmplTemplate *t, const TmplValue *ctx,
						TmplEscape esc, TmplPartialFn partial,
						void *partial_arg, size_t max_output,
						TmplBuf *out, TmplError *err);
extern void tmpl_buf_free(TmplBuf *b);

/*
 * Guards against templates that loop for ages without printing anything
 * (nested sections over big arrays, partials calling themselves twice).
 * A render may take at most max_steps steps (tags visited plus section
 * iterations); 0 means no limit.  The interrupt hook, when set, is called
 * every 65536 steps: the extension points it at CHECK_FOR_INTERRUPTS.
 */
extern void tmpl_set_step_limit(unsigned long max_steps);
extern void tmpl_set_interrupt_hook(void (*hook) (void));

#endif							/* TEMPLATE_H */

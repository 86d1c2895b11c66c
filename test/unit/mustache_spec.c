/*-------------------------------------------------------------------------
 *
 * mustache_spec.c
 *	  Run the official Mustache spec files against the template module.
 *
 * Usage: mustache_spec FILE.json...
 *
 * The spec files are read with the module's own JSON parser, so this also
 * exercises the parser on real-world input.  Every test is rendered with
 * HTML escaping, as the spec expects.
 *
 *-------------------------------------------------------------------------
 */
#include "template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int	passed = 0;
static int	failed = 0;

/* read_file - whole file into memory; the runner owns this buffer */
static char *
read_file(const char *path, size_t *len)
{
	FILE	   *f = fopen(path, "rb");
	char	   *buf = NULL;
	size_t		cap = 0;
	size_t		n = 0;

	if (f == NULL)
		return NULL;
	for (;;)
	{
		size_t		got;

		if (cap - n < 4096)
		{
			char	   *nb = realloc(buf, cap + 65536);

			if (nb == NULL)
			{
				free(buf);
				fclose(f);
				return NULL;
			}
			buf = nb;
			cap += 65536;
		}
		got = fread(buf + n, 1, cap - n, f);
		n += got;
		if (got == 0)
			break;
	}
	fclose(f);
	*len = n;
	return buf;
}

/*
 * normalise_numbers - print spec numbers like the spec's host languages do
 *
 * The renderer prints number lexemes verbatim, but the spec's data come
 * from YAML/JSON with language-native numbers: 1.210 is expected to print
 * as 1.21 and 1.0 as 1.  Rewrite each lexeme as the shortest %g form that
 * reads back as the same double, and integers without a decimal point.
 */
static void
normalise_numbers(TmplValue *v)
{
	size_t		i;

	if (v == NULL)
		return;
	if (v->kind == TV_NUMBER)
	{
		double		d = strtod(v->str, NULL);
		char		buf[64];
		char	   *copy;
		size_t		len;

		if (d > -1e15 && d < 1e15 && d == (double) (long long) d)
			snprintf(buf, sizeof(buf), "%lld", (long long) d);
		else
		{
			int			prec;

			for (prec = 1; prec <= 17; prec++)
			{
				snprintf(buf, sizeof(buf), "%.*g", prec, d);
				if (strtod(buf, NULL) == d)
					break;
			}
		}
		len = strlen(buf);
		copy = tmpl_mem_alloc(len + 1);
		if (copy == NULL)
			return;
		memcpy(copy, buf, len + 1);
		tmpl_mem_free(v->str);
		v->str = copy;
		v->len = len;
	}
	for (i = 0; i < v->count; i++)
		normalise_numbers(v->items[i]);
}

/* spec_partial - partials come from the test's "partials" object */
static const char *
spec_partial(void *arg, const char *name, size_t *len)
{
	const TmplValue *p = tmpl_value_get((const TmplValue *) arg, name);

	if (p == NULL || p->kind != TV_STRING)
		return NULL;
	*len = p->len;
	return p->str;
}

/* show - print a string with its control characters visible */
static void
show(const char *label, const char *s, size_t len)
{
	size_t		i;

	printf("    %s: \"", label);
	for (i = 0; i < len; i++)
	{
		unsigned char c = (unsigned char) s[i];

		if (c == '\n')
			printf("\\n");
		else if (c == '\r')
			printf("\\r");
		else if (c == '\t')
			printf("\\t");
		else if (c == '"' || c == '\\')
			printf("\\%c", c);
		else if (c < 0x20)
			printf("\\x%02x", c);
		else
			putchar(c);
	}
	printf("\"\n");
}

/* string_member - a test's string field, or NULL if absent or mistyped */
static const TmplValue *
string_member(const TmplValue *obj, const char *key)
{
	const TmplValue *v = tmpl_value_get(obj, key);

	return (v != NULL && v->kind == TV_STRING) ? v : NULL;
}

/* run_test - render one spec test and compare with its expectation */
static void
run_test(const char *file, const TmplValue *test)
{
	const TmplValue *name = string_member(test, "name");
	const TmplValue *tmpl = string_member(test, "template");
	const TmplValue *expected = string_member(test, "expected");
	const TmplValue *data = tmpl_value_get(test, "data");
	const TmplValue *partials = tmpl_value_get(test, "partials");
	const char *tname = name ? name->str : "(unnamed)";
	TmplTemplate *t;
	TmplError	err;
	TmplBuf		out = {0};

	if (tmpl == NULL || expected == NULL)
	{
		printf("FAIL %s: %s: malformed test\n", file, tname);
		failed++;
		return;
	}
	normalise_numbers((TmplValue *) data);

	t = tmpl_compile(tmpl->str, tmpl->len, &err);
	if (t == NULL)
	{
		printf("FAIL %s: %s: compile error at line %d, column %d: %s\n",
			   file, tname, err.line, err.column, err.message);
		failed++;
		return;
	}
	if (tmpl_render(t, data, TMPL_ESCAPE_HTML, spec_partial, (void *) partials,
					0, &out, &err) != 0)
	{
		printf("FAIL %s: %s: render error at line %d, column %d: %s\n",
			   file, tname, err.line, err.column, err.message);
		failed++;
	}
	else if (out.len != expected->len ||
			 memcmp(out.data, expected->str, out.len) != 0)
	{
		printf("FAIL %s: %s\n", file, tname);
		show("template", tmpl->str, tmpl->len);
		show("expected", expected->str, expected->len);
		show("got     ", out.data, out.len);
		failed++;
	}
	else
		passed++;
	tmpl_buf_free(&out);
	tmpl_free(t);
}

/* main - run every test of every spec file named on the command line */
int
main(int argc, char **argv)
{
	int			i;

	if (argc < 2)
	{
		fprintf(stderr, "usage: %s SPEC.json...\n", argv[0]);
		return 2;
	}
	for (i = 1; i < argc; i++)
	{
		size_t		len = 0;
		char	   *text = read_file(argv[i], &len);
		char		errbuf[256];
		TmplValue  *root;
		const TmplValue *tests;
		size_t		j;

		if (text == NULL)
		{
			printf("FAIL %s: cannot read file\n", argv[i]);
			failed++;
			continue;
		}
		root = tmpl_json_parse(text, len, errbuf, sizeof(errbuf));
		free(text);
		if (root == NULL)
		{
			printf("FAIL %s: %s\n", argv[i], errbuf);
			failed++;
			continue;
		}
		tests = tmpl_value_get(root, "tests");
		if (tests == NULL || tests->kind != TV_ARRAY)
		{
			printf("FAIL %s: no \"tests\" array\n", argv[i]);
			failed++;
		}
		else
		{
			for (j = 0; j < tests->count; j++)
				run_test(argv[i], tests->items[j]);
		}
		tmpl_value_free(root);
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}

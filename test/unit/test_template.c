/*-------------------------------------------------------------------------
 *
 * test_template.c
 *	  Unit tests for the template module: rendering, escaping, errors and
 *	  their positions, the JSON parser, limits and the allocation hooks.
 *
 * Templates and JSON are always handed to the module in exact-size heap
 * copies without a trailing NUL, so that under AddressSanitizer any read
 * past the end of the input is caught.
 *
 *-------------------------------------------------------------------------
 */
#include "template.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int	passed = 0;
static int	failed = 0;

/* check - count one assertion, printing it when it fails */
static bool
check(bool ok, int line, const char *what)
{
	if (ok)
		passed++;
	else
	{
		failed++;
		printf("FAIL line %d: %s\n", line, what);
	}
	return ok;
}

#define CHECK(c) check((c), __LINE__, #c)

/* exact_copy - the input without a NUL after it, to catch over-reads */
static char *
exact_copy(const char *s, size_t len)
{
	char	   *p = malloc(len ? len : 1);

	if (p == NULL)
	{
		perror("malloc");
		exit(2);
	}
	if (len > 0)
		memcpy(p, s, len);
	return p;
}

/* A partial table for the lookup callback, counting its calls */
typedef struct Partials
{
	const char *const *pairs;	/* name, source, name, source, ..., NULL */
	int			calls;
} Partials;

/* table_partial - TmplPartialFn over a Partials table */
static const char *
table_partial(void *arg, const char *name, size_t *len)
{
	Partials   *p = arg;
	int			i;

	p->calls++;
	for (i = 0; p->pairs != NULL && p->pairs[i] != NULL; i += 2)
	{
		if (strcmp(p->pairs[i], name) == 0)
		{
			*len = strlen(p->pairs[i + 1]);
			return p->pairs[i + 1];
		}
	}
	return NULL;
}

/* parse - JSON from a C string; aborts the test run if it does not parse */
static TmplValue *
parse(const char *json)
{
	char		errbuf[256];
	char	   *copy = exact_copy(json, strlen(json));
	TmplValue  *v = tmpl_json_parse(copy, strlen(json), errbuf, sizeof(errbuf));

	free(copy);
	if (v == NULL)
	{
		printf("bad test JSON %s: %s\n", json, errbuf);
		exit(2);
	}
	return v;
}

/*
 * run - compile and render tmpl (tlen bytes) against json
 *
 * Returns the render's result code, or -2 for a compile error; *out gets
 * the output (caller frees with tmpl_buf_free), *err the error.
 */
static int
run(const char *tmpl, size_t tlen, const char *json, TmplEscape esc,
	Partials *partials, size_t max_output, TmplBuf *out, TmplError *err)
{
	char	   *copy = exact_copy(tmpl, tlen);
	TmplTemplate *t = tmpl_compile(copy, tlen, err);
	TmplValue  *ctx = json ? parse(json) : NULL;
	int			rc = -2;

	free(copy);					/* the template must keep its own copy */
	if (t != NULL)
		rc = tmpl_render(t, ctx, esc, partials ? table_partial : NULL,
						 partials, max_output, out, err);
	tmpl_free(t);
	tmpl_value_free(ctx);
	return rc;
}

/* expect_render_at - a render must succeed with exactly this output */
static void
expect_render_at(int line, const char *tmpl, const char *json, TmplEscape esc,
				 const char *const *pairs, const char *expected)
{
	TmplBuf		out = {0};
	TmplError	err;
	Partials	p = {pairs, 0};
	int			rc = run(tmpl, strlen(tmpl), json, esc, &p, 0, &out, &err);

	if (rc != 0)
	{
		failed++;
		printf("FAIL line %d: render of \"%s\" failed: line %d, column %d: %s\n",
			   line, tmpl, err.line, err.column, err.message);
	}
	else if (out.len != strlen(expected) || strcmp(out.data, expected) != 0)
	{
		failed++;
		printf("FAIL line %d: render of \"%s\"\n  expected \"%s\"\n  got      \"%s\"\n",
			   line, tmpl, expected, out.data);
	}
	else
		passed++;
	tmpl_buf_free(&out);
}

#define expect_render(t, j, e, p, x) expect_render_at(__LINE__, t, j, e, p, x)
#define expect_html(t, j, x) expect_render_at(__LINE__, t, j, TMPL_ESCAPE_HTML, NULL, x)

/* expect_error_at - compile or render must fail at line/column with msg */
static void
expect_error_at(int line, const char *tmpl, const char *json,
				const char *const *pairs, size_t max_output,
				int eline, int ecol, const char *msg)
{
	TmplBuf		out = {0};
	TmplError	err;
	Partials	p = {pairs, 0};
	int			rc = run(tmpl, strlen(tmpl), json, TMPL_ESCAPE_HTML, &p,
						 max_output, &out, &err);

	if (rc == 0)
	{
		failed++;
		printf("FAIL line %d: \"%s\" should fail with \"%s\" but rendered \"%s\"\n",
			   line, tmpl, msg, out.data);
	}
	else if (err.line != eline || err.column != ecol ||
			 strstr(err.message, msg) == NULL)
	{
		failed++;
		printf("FAIL line %d: \"%s\"\n  expected line %d, column %d: ...%s...\n"
			   "  got      line %d, column %d: %s\n",
			   line, tmpl, eline, ecol, msg, err.line, err.column, err.message);
	}
	else
		passed++;
	tmpl_buf_free(&out);
}

#define expect_error(t, l, c, m) expect_error_at(__LINE__, t, "{}", NULL, 0, l, c, m)

/* expect_json_error_at - the parser must fail with this text in errbuf */
static void
expect_json_error_at(int line, const char *json, size_t len, const char *msg)
{
	char		errbuf[256];
	char	   *copy = exact_copy(json, len);
	TmplValue  *v = tmpl_json_parse(copy, len, errbuf, sizeof(errbuf));

	free(copy);
	if (v != NULL)
	{
		failed++;
		printf("FAIL line %d: JSON \"%s\" should fail with \"%s\"\n", line, json, msg);
		tmpl_value_free(v);
	}
	else if (strstr(errbuf, msg) == NULL)
	{
		failed++;
		printf("FAIL line %d: JSON \"%s\"\n  expected ...%s...\n  got      %s\n",
			   line, json, msg, errbuf);
	}
	else
		passed++;
}

#define expect_json_error(j, m) expect_json_error_at(__LINE__, j, strlen(j), m)

/* test_escaping - the three escape modes, and raw tags never escaping */
static void
test_escaping(void)
{
	const char *data = "{\"s\": \"<a href=\\\"x\\\">Tom & Jerry's</a>\","
		"\"j\": \"l1\\nq\\\"b\\\\ \\t\\u0001\\b\\f\\r \\u00e9/\"}";

	expect_html("{{s}}", data,
				"&lt;a href=&quot;x&quot;&gt;Tom &amp; Jerry&#39;s&lt;/a&gt;");
	expect_render("{{s}}", data, TMPL_ESCAPE_NONE, NULL,
				  "<a href=\"x\">Tom & Jerry's</a>");
	expect_render("{{s}}", data, TMPL_ESCAPE_JSON, NULL,
				  "<a href=\\\"x\\\">Tom & Jerry's</a>");
	expect_render("{{j}}", data, TMPL_ESCAPE_JSON, NULL,
				  "l1\\nq\\\"b\\\\ \\t\\u0001\\b\\f\\r \xC3\xA9/");
	expect_html("{{{s}}}|{{&s}}", data,
				"<a href=\"x\">Tom & Jerry's</a>|<a href=\"x\">Tom & Jerry's</a>");
	expect_render("{{{j}}}", data, TMPL_ESCAPE_JSON, NULL,
				  "l1\nq\"b\\ \t\x01\b\f\r \xC3\xA9/");
	/* template text itself is never escaped */
	expect_html("<b>&'\"</b>", "{}", "<b>&'\"</b>");
}

/*
 * test_json_body - a webhook's JSON body: whatever the business data holds
 * (quotes, backslashes, line breaks, control characters, non-ASCII, a
 * closing brace), the rendered document parses and every string member
 * reads back exactly as the data had it.  Raw tags stay raw.
 */
static void
test_json_body(void)
{
	const char *tmpl = "{\"to\": \"{{phone}}\", \"text\": \"{{note}}\", \"n\": {{n}}, \"ok\": {{ok}},\n"
		" \"items\": \"{{#items}}{{.}};{{/items}}\", \"none\": \"{{^items}}x{{/items}}{{missing}}\","
		" \"row\": \"{{row}}\"}";
	const char *data = "{\"phone\": \"+34 600\", \"note\": \"He said \\\"hi\\\"\\n\\r\\t\\\\ \\u0001\\u001f"
		"\\u007f \\u00e9\\u2028 }\\\"}, {\", \"n\": 1000.50, \"ok\": true,"
		" \"items\": [\"a\\\"\", \"b\\n\"], \"row\": {\"k\": \"v\\\"\"}}";
	TmplBuf		out = {0};
	TmplError	err;
	char		errbuf[256];
	TmplValue  *doc = NULL;
	const TmplValue *v;

	CHECK(run(tmpl, strlen(tmpl), data, TMPL_ESCAPE_JSON, NULL, 0, &out, &err) == 0);
	if (out.data != NULL)
		doc = tmpl_json_parse(out.data, out.len, errbuf, sizeof(errbuf));
	CHECK(doc != NULL);
	if (doc == NULL)
		printf("  rendered: %s\n  %s\n", out.data ? out.data : "(nothing)", errbuf);
	else
	{
		v = tmpl_value_get(doc, "to");
		CHECK(v != NULL && v->kind == TV_STRING && strcmp(v->str, "+34 600") == 0);
		v = tmpl_value_get(doc, "text");
		CHECK(v != NULL && v->kind == TV_STRING &&
			  strcmp(v->str, "He said \"hi\"\n\r\t\\ \x01\x1f\x7f \xC3\xA9\xE2\x80\xA8 }\"}, {") == 0);
		v = tmpl_value_get(doc, "n");
		CHECK(v != NULL && v->kind == TV_NUMBER && strcmp(v->str, "1000.50") == 0);
		v = tmpl_value_get(doc, "ok");
		CHECK(v != NULL && v->kind == TV_BOOL && v->boolean);
		v = tmpl_value_get(doc, "items");
		CHECK(v != NULL && v->kind == TV_STRING && strcmp(v->str, "a\";b\n;") == 0);
		v = tmpl_value_get(doc, "none");
		CHECK(v != NULL && v->kind == TV_STRING && v->len == 0);
		/* an object prints as its JSON text, which is itself escaped as string content */
		v = tmpl_value_get(doc, "row");
		CHECK(v != NULL && v->kind == TV_STRING && strcmp(v->str, "{\"k\":\"v\\\"\"}") == 0);
	}
	tmpl_value_free(doc);
	tmpl_buf_free(&out);

	/* control characters use the short escapes where JSON has them, \uXXXX otherwise */
	expect_render("{{s}}", "{\"s\": \"a\\u0002\\u001b\\u007f\"}", TMPL_ESCAPE_JSON, NULL,
				  "a\\u0002\\u001B\x7f");
	/* raw tags are left alone: the template's author asked for it */
	expect_render("{{& s}}|{{{s}}}", "{\"s\": \"\\\"}\"}", TMPL_ESCAPE_JSON, NULL, "\"}|\"}");
	/* template text is never escaped, only values */
	expect_render("{\"a\": \"\\n{{s}}\"}", "{\"s\": \"\\n\"}", TMPL_ESCAPE_JSON, NULL,
				  "{\"a\": \"\\n\\n\"}");
	/* a partial's values are escaped the same way */
	{
		static const char *const pairs[] = {"sig", "{{s}}", NULL};

		expect_render("\"{{> sig}}\"", "{\"s\": \"q\\\"\"}", TMPL_ESCAPE_JSON, pairs, "\"q\\\"\"");
	}
}

/* test_values - how each kind of value prints */
static void
test_values(void)
{
	const char *data = "{\"a\": 1000.50, \"b\": 1e3, \"c\": -0, \"d\": 12345678901234567890,"
		"\"t\": true, \"f\": false, \"n\": null, \"e\": \"\","
		"\"row\": {\"id\": 1, \"tags\": [\"x\", \"y\\\"z\"], \"n\": null, \"ok\": true, \"o\": {}}}";

	expect_html("{{a}} {{b}} {{c}} {{d}}", data, "1000.50 1e3 -0 12345678901234567890");
	expect_html("{{t}}/{{f}}", data, "true/false");
	expect_html("[{{n}}][{{missing}}][{{e}}][{{{n}}}]", data, "[][][][]");
	expect_render("{{row}}", data, TMPL_ESCAPE_NONE, NULL,
				  "{\"id\":1,\"tags\":[\"x\",\"y\\\"z\"],\"n\":null,\"ok\":true,\"o\":{}}");
	expect_html("{{row.tags}}", data, "[&quot;x&quot;,&quot;y\\&quot;z&quot;]");
	expect_render("{{row.tags}}", data, TMPL_ESCAPE_JSON, NULL,
				  "[\\\"x\\\",\\\"y\\\\\\\"z\\\"]");
	expect_html("{{{row.tags}}}", data, "[\"x\",\"y\\\"z\"]");
	/* a NULL context renders like an empty one */
	expect_html("a{{x}}{{.}}{{#x}}no{{/x}}{{^x}}b{{/x}}", NULL, "ab");
	/* a scalar root is the implicit iterator */
	expect_html("{{.}}!", "\"hi\"", "hi!");
}

/* test_names - dotted names and the context stack */
static void
test_names(void)
{
	const char *data = "{\"row\": {\"customer\": {\"name\": \"Ann\"}, \"id\": 7},"
		"\"items\": [{\"name\": \"pen\"}, {\"name\": \"ink\"}], \"name\": \"top\","
		"\"a.b\": \"flat\"}";

	expect_html("{{row.customer.name}}", data, "Ann");
	expect_html("[{{row.customer.missing}}][{{row.id.x}}][{{nope.x}}]", data, "[][][]");
	expect_html("{{items.1.name}}|{{items.01.name}}|{{items.2.name}}", data, "ink||");
	expect_html("{{a.b}}", data, "");
	expect_html("{{#row}}{{id}} {{name}} {{customer.name}}{{/row}}", data, "7 top Ann");
	expect_html("{{#row.customer}}{{name}}/{{row.id}}{{/row.customer}}", data, "Ann/7");
	/* the first part found stops the search, even if the rest fails */
	expect_html("{{#row}}{{customer.id}}{{/row}}", "{\"row\": {\"customer\": {}}, \"customer\": {\"id\": 1}}", "");
	expect_html("{{#a}}{{x}}{{/a}}", "{\"a\": {\"x\": null}, \"x\": \"outer\"}", "");
}

/* test_sections - iteration, truthiness, nesting, inverted sections */
static void
test_sections(void)
{
	const char *data = "{\"items\": [{\"name\": \"pen\", \"tags\": [\"a\", \"b\"]},"
		"{\"name\": \"ink\", \"tags\": []}], \"words\": [\"x\", 2, true, null],"
		"\"zero\": 0, \"szero\": \"0\", \"empty\": \"\", \"obj\": {}, \"none\": [],"
		"\"nested\": [[1, 2], [3]], \"who\": \"me\"}";

	expect_html("{{#items}}{{name}}:{{#tags}}{{.}}{{/tags}}{{^tags}}-{{/tags}};{{/items}}",
				data, "pen:ab;ink:-;");
	expect_html("{{#words}}({{.}}){{/words}}", data, "(x)(2)(true)()");
	expect_html("{{#zero}}z{{.}}{{/zero}}{{#szero}}s{{.}}{{/szero}}{{#obj}}o{{/obj}}",
				data, "z0s0o");
	expect_html("{{#empty}}e{{/empty}}{{#none}}n{{/none}}{{#missing}}m{{/missing}}",
				data, "");
	expect_html("{{^empty}}E{{/empty}}{{^none}}N{{/none}}{{^zero}}Z{{/zero}}", data, "EN");
	expect_html("{{#nested}}[{{#.}}{{.}}{{/.}}]{{/nested}}", data, "[12][3]");
	expect_html("{{#items}}{{#tags}}{{who}}{{name}}{{.}} {{/tags}}{{/items}}", data,
				"mepena mepenb ");
	expect_html("{{#items}}\n  - {{name}}\n{{/items}}\n", data, "  - pen\n  - ink\n");
	expect_html("{{=<% %>=}}<%#words%><%.%><%/words%>{{x}}<%={{ }}=%>{{who}}",
				data, "x2true{{x}}me");
	/* 100 nested sections is the limit, and still renders */
	{
		char		buf[1400];
		size_t		i;

		buf[0] = '\0';
		for (i = 0; i < 100; i++)
			strcat(buf, "{{#a}}");
		strcat(buf, "x");
		for (i = 0; i < 100; i++)
			strcat(buf, "{{/a}}");
		expect_html(buf, "{\"a\": true}", "x");
	}
}

/* test_nul_bytes - templates are (pointer, length) and may contain NULs */
static void
test_nul_bytes(void)
{
	static const char tmpl[] = "a\0b{{x}}\0";
	TmplBuf		out = {0};
	TmplError	err;
	int			rc = run(tmpl, sizeof(tmpl) - 1, "{\"x\": \"X\"}", TMPL_ESCAPE_HTML,
						 NULL, 0, &out, &err);

	CHECK(rc == 0 && out.len == 5 && memcmp(out.data, "a\0bX\0", 5) == 0);
	CHECK(out.data[out.len] == '\0');
	tmpl_buf_free(&out);

	/* a tag name holding a NUL is invalid, not truncated */
	rc = run("{{a\0b}}", 7, "{}", TMPL_ESCAPE_HTML, NULL, 0, &out, &err);
	CHECK(rc == -2 && strstr(err.message, "invalid tag name") != NULL);
	tmpl_buf_free(&out);
}

/* test_syntax_errors - every compile error, with the opening tag's position */
static void
test_syntax_errors(void)
{
	char		deep[800];
	size_t		i;

	expect_error("Hello\n\n    {{#items}}\n  {{name}}\n", 3, 5,
				 "unclosed section \"items\" opened at line 3, column 5");
	expect_error("{{#a}}{{#b}}\n{{/b}}", 1, 1, "unclosed section \"a\"");
	/* columns count characters: é, ö and € are one each */
	expect_error("h\xC3\xA9llo w\xC3\xB6rld {{#x}}", 1, 13, "unclosed section \"x\"");
	expect_error("\xC3\xBC\n\xE2\x82\xAC\xE2\x82\xAC {{/y}}", 2, 4,
				 "closing tag \"y\" has no open section");
	expect_error("{{#a}}\n  x {{/b}}", 2, 5,
				 "closing tag \"b\" does not match open section \"a\" opened at line 1, column 1");
	expect_error("abc {{/x}}", 1, 5, "closing tag \"x\" has no open section");
	expect_error("line1\nab {{name", 2, 4, "unclosed tag (missing \"}}\")");
	expect_error("{{{name}}", 1, 1, "unclosed tag (missing \"}}}\")");
	expect_error("x {{a\n{{b}}", 1, 3, "unclosed tag");
	expect_error("{{=<% %>=}}\n<%a", 2, 1, "unclosed tag (missing \"%>\")");
	expect_error("x\n{{ }}", 2, 1, "empty tag name");
	expect_error("{{#}}{{/}}", 1, 1, "empty tag name");
	expect_error("ab{{{ }}}", 1, 3, "empty tag name");
	expect_error("{{&}}", 1, 1, "empty tag name");
	expect_error("{{> }}", 1, 1, "empty tag name");
	expect_error("a {{=<% =}}", 1, 3, "invalid set-delimiter tag");
	expect_error("{{=a=b c=}}", 1, 1, "invalid set-delimiter tag");
	expect_error("{{= =}}", 1, 1, "invalid set-delimiter tag");
	expect_error("{{=<% %> x=}}", 1, 1, "invalid set-delimiter tag");
	expect_error("\n {{=<% %>}}", 2, 2, "invalid set-delimiter tag");
	expect_error("{{a..b}}", 1, 1, "invalid tag name \"a..b\"");
	expect_error("{{.a}}", 1, 1, "invalid tag name");
	expect_error("{{#a.}}{{/a.}}", 1, 1, "invalid tag name");
	expect_error("{{first name}}", 1, 1, "invalid tag name \"first name\"");

	deep[0] = '\0';
	for (i = 0; i < 101; i++)
		strcat(deep, "{{#a}}");
	expect_error(deep, 1, 601, "sections nested more than 100 deep");
}

static int	echo_calls = 0;

/* echo_partial - every partial exists, and its source is its own name */
static const char *
echo_partial(void *arg, const char *name, size_t *len)
{
	(void) arg;
	echo_calls++;
	*len = strlen(name);
	return name;
}

/* test_many_partials - many distinct names: each looked up exactly once */
static void
test_many_partials(void)
{
	char		tmpl[2048];
	char		want[2048];
	char		name[16];
	TmplTemplate *t;
	TmplValue  *ctx = parse("{\"a\": [1, 2, 3]}");
	TmplBuf		out = {0};
	TmplError	err;
	int			i;
	int			rc;

	strcpy(tmpl, "{{#a}}");
	want[0] = '\0';
	for (i = 0; i < 100; i++)
	{
		snprintf(name, sizeof(name), "p%d", i);
		strcat(tmpl, "{{>");
		strcat(tmpl, name);
		strcat(tmpl, "}}");
		strcat(want, name);
	}
	strcat(tmpl, "{{/a}}");
	t = tmpl_compile(tmpl, strlen(tmpl), &err);
	CHECK(t != NULL);
	rc = tmpl_render(t, ctx, TMPL_ESCAPE_HTML, echo_partial, NULL, 0, &out, &err);
	CHECK(rc == 0 && echo_calls == 100);
	CHECK(rc == 0 && out.len == 3 * strlen(want) && strncmp(out.data, want, strlen(want)) == 0);
	tmpl_buf_free(&out);
	tmpl_free(t);
	tmpl_value_free(ctx);
}

/* test_partials - lookup, context, indentation, caching, errors */
static void
test_partials(void)
{
	static const char *const pairs[] = {
		"item", "* {{name}}\n",
		"list", "{{#items}}\n{{>item}}\n{{/items}}",
		"box", "[\n  {{>list}}\n]\n",
		"self", "x{{>self}}",
		"bad", "ok\n  {{#a}}",
		"tree", "{{n}}{{#kids}}({{>tree}}){{/kids}}",
		NULL
	};
	const char *data = "{\"items\": [{\"name\": \"a\"}, {\"name\": \"b\"}],"
		"\"n\": 1, \"kids\": [{\"n\": 2, \"kids\": [{\"n\": 3, \"kids\": []}]}]}";
	Partials	p = {pairs, 0};
	TmplBuf		out = {0};
	TmplError	err;
	int			rc;

	expect_render("<{{>item}}>", "{\"name\": \"z\"}", TMPL_ESCAPE_HTML, pairs, "<* z\n>");
	expect_render("<{{>nothing}}>", data, TMPL_ESCAPE_HTML, pairs, "<>");
	expect_render("{{>tree}}", data, TMPL_ESCAPE_HTML, pairs, "1(2(3))");
	/* nested standalone partials add up their indentation */
	expect_render("  {{>box}}\n.", data, TMPL_ESCAPE_HTML, pairs,
				  "  [\n    * a\n    * b\n  ]\n.");

	/* the lookup runs once per name per render, however often it is used */
	rc = run("{{#items}}{{>item}}{{>gone}}{{/items}}", 38, data, TMPL_ESCAPE_HTML,
			 &p, 0, &out, &err);
	CHECK(rc == 0 && strcmp(out.data, "* a\n* b\n") == 0);
	CHECK(p.calls == 2);
	tmpl_buf_free(&out);

	expect_error_at(__LINE__, "a\n{{>self}}", "{}", pairs, 0, 1, 2,
					"partial recursion deeper than 64 levels (partial \"self\")");
	expect_error_at(__LINE__, "{{>bad}}", "{}", pairs, 0, 2, 3,
					"in partial \"bad\": unclosed section \"a\" opened at line 2, column 3");
	/* a data-driven recursion that stays within the limit is fine */
	{
		char		json[4096];
		char		want[512];
		size_t		i;

		/* 65 levels are one too many */
		json[0] = '\0';
		for (i = 0; i < 64; i++)
			strcat(json, "{\"n\": 0, \"kids\": [");
		strcat(json, "{\"n\": 0, \"kids\": []}");
		for (i = 0; i < 64; i++)
			strcat(json, "]}");
		expect_error_at(__LINE__, "{{>tree}}", json, pairs, 0, 1, 16,
						"partial recursion deeper than 64 levels (partial \"tree\")");

		json[0] = want[0] = '\0';
		for (i = 0; i < 63; i++)
			strcat(json, "{\"n\": 0, \"kids\": [");
		strcat(json, "{\"n\": 0, \"kids\": []}");
		for (i = 0; i < 63; i++)
			strcat(json, "]}");
		for (i = 0; i < 63; i++)
			strcat(want, "0(");
		strcat(want, "0");
		for (i = 0; i < 63; i++)
			strcat(want, ")");
		expect_render("{{>tree}}", json, TMPL_ESCAPE_HTML, pairs, want);
	}
}

/* test_output - max_output, appending, NUL termination */
static void
test_output(void)
{
	const char *data = "{\"list\": [\"abc\", \"de&\"]}";
	TmplBuf		out = {0};
	TmplError	err;
	int			rc;

	rc = run("{{#list}}{{.}}{{/list}}", 23, data, TMPL_ESCAPE_HTML, NULL, 10,
			 &out, &err);
	CHECK(rc == 0 && out.len == 10 && strcmp(out.data, "abcde&amp;") == 0);

	/* rendering appends, and the limit counts only this render's bytes */
	rc = run("{{#list}}{{.}}{{/list}}", 23, data, TMPL_ESCAPE_HTML, NULL, 10,
			 &out, &err);
	CHECK(rc == 0 && out.len == 20 && strcmp(out.data, "abcde&amp;abcde&amp;") == 0);
	tmpl_buf_free(&out);
	CHECK(out.data == NULL && out.len == 0 && out.cap == 0);

	expect_error_at(__LINE__, "{{#list}}\n{{.}}{{/list}}", data, NULL, 9, 2, 1,
					"output exceeds max_output of 9 bytes");

	/* an empty output is still a valid C string */
	rc = run("", 0, NULL, TMPL_ESCAPE_HTML, NULL, 0, &out, &err);
	CHECK(rc == 0 && out.data != NULL && out.len == 0 && out.data[0] == '\0');
	tmpl_buf_free(&out);
}

static int	interrupts = 0;

/* count_interrupts - interrupt hook that just counts */
static void
count_interrupts(void)
{
	interrupts++;
}

/* test_step_limit - templates that loop without end are stopped */
static void
test_step_limit(void)
{
	char		json[512];
	size_t		i;

	strcpy(json, "{\"a\": [");
	for (i = 0; i < 100; i++)
		strcat(json, i ? ",1" : "1");
	strcat(json, "]}");

	tmpl_set_step_limit(1000);
	expect_error_at(__LINE__, "{{#a}}{{#a}}{{#a}}{{/a}}{{/a}}{{/a}}", json, NULL, 0,
					1, 13, "render took more than 1000 steps");
	tmpl_set_step_limit(TMPL_DEFAULT_MAX_STEPS);

	tmpl_set_interrupt_hook(count_interrupts);
	expect_html("{{#a}}{{#a}}{{#a}}{{/a}}{{/a}}{{/a}}", json, "");
	tmpl_set_interrupt_hook(NULL);
	CHECK(interrupts >= 15);	/* about a million steps, one call per 65536 */
}

/* test_json - parser acceptance, values, errors with positions */
static void
test_json(void)
{
	TmplValue  *v;
	const TmplValue *m;
	char		deep[2100];
	size_t		i;

	v = parse(" {\"s\": \"\\ud83d\\ude00 \\u00e9\\u20AC \\/\", \"n\": -0.5e+10,"
			  " \"a\": [1, \"x\", null, true, false, {}], \"k\": 1, \"k\": 2} ");
	m = tmpl_value_get(v, "s");
	CHECK(m != NULL && m->kind == TV_STRING &&
		  strcmp(m->str, "\xF0\x9F\x98\x80 \xC3\xA9\xE2\x82\xAC /") == 0 && m->len == 12);
	m = tmpl_value_get(v, "n");
	CHECK(m != NULL && m->kind == TV_NUMBER && strcmp(m->str, "-0.5e+10") == 0);
	m = tmpl_value_get(v, "a");
	CHECK(m != NULL && m->kind == TV_ARRAY && m->count == 6 &&
		  m->items[2]->kind == TV_NULL && m->items[3]->boolean &&
		  !m->items[4]->boolean && m->items[5]->kind == TV_OBJECT);
	m = tmpl_value_get(v, "k");
	CHECK(m != NULL && strcmp(m->str, "2") == 0);	/* last duplicate wins */
	CHECK(v->count == 5 && strcmp(v->keys[0], "s") == 0 && strcmp(v->keys[4], "k") == 0);
	CHECK(tmpl_value_get(v, "zz") == NULL && tmpl_value_get(m, "k") == NULL);
	tmpl_value_free(v);

	v = parse("42");
	CHECK(v->kind == TV_NUMBER && strcmp(v->str, "42") == 0);
	tmpl_value_free(v);
	v = parse("\"\xF4\x8F\xBF\xBF\"");	/* U+10FFFF is the last valid one */
	CHECK(v->kind == TV_STRING && v->len == 4);
	tmpl_value_free(v);

	expect_json_error("", "line 1, column 1: unexpected end of input");
	expect_json_error("  \n ", "line 2, column 2: unexpected end of input");
	expect_json_error("{\n  \"a\": tru }", "line 2, column 8: invalid literal");
	expect_json_error("[\"\xC3\xA9\", x]", "line 1, column 7: unexpected character 'x'");
	expect_json_error("[1,]", "line 1, column 4: unexpected character ']'");
	expect_json_error("{\"a\":1,}", "line 1, column 8: unexpected character '}', expected a string");
	expect_json_error("{\"a\" 1}", "line 1, column 6: unexpected character '1', expected ':'");
	expect_json_error("[1 2]", "line 1, column 4: unexpected character '2', expected ',' or ']'");
	expect_json_error("{} x", "line 1, column 4: unexpected character 'x'");
	expect_json_error("{'a': 1}", "line 1, column 2: unexpected character '''");
	expect_json_error("01", "line 1, column 1: invalid number: leading zeros");
	expect_json_error("[1.]", "line 1, column 4: unexpected character ']', expected a digit");
	expect_json_error("-", "line 1, column 2: unexpected end of input, expected a digit");
	expect_json_error("1e+", "line 1, column 4: unexpected end of input");
	expect_json_error(".5", "line 1, column 1: unexpected character '.'");
	expect_json_error("+1", "line 1, column 1: unexpected character '+'");
	expect_json_error("\"abc", "line 1, column 1: unterminated string");
	expect_json_error("\"ab\\\"", "line 1, column 1: unterminated string");
	expect_json_error("\"a\tb\"", "line 1, column 3: control character 0x09");
	expect_json_error("\"\\x\"", "line 1, column 2: invalid escape sequence");
	expect_json_error("\"\\u12G4\"", "line 1, column 2: invalid \\u escape");
	expect_json_error("\"\\u12\"", "line 1, column 2: invalid \\u escape");
	expect_json_error("\"ab\\ud83d\"", "line 1, column 4: lone high surrogate \\uD83D");
	expect_json_error("\"\\ud83d\\u0041\"", "line 1, column 2: lone high surrogate");
	expect_json_error("\"\\ude00\"", "line 1, column 2: lone low surrogate \\uDE00");
	expect_json_error("\"\\u0000\"", "line 1, column 2: \\u0000 is not allowed");
	expect_json_error("\"\xC0\x80\"", "line 1, column 2: invalid UTF-8");	/* overlong */
	expect_json_error("\"\xED\xA0\x80\"", "invalid UTF-8");	/* surrogate */
	expect_json_error("\"a\xE2\x82\"", "line 1, column 3: invalid UTF-8");	/* truncated */
	expect_json_error("\"\xF4\x90\x80\x80\"", "invalid UTF-8");	/* > U+10FFFF */
	expect_json_error("\"\xF5\x80\x80\x80\"", "invalid UTF-8");
	expect_json_error("\"\x80\"", "invalid UTF-8");
	expect_json_error("\xEF\xBB\xBF{}", "line 1, column 1: unexpected byte 0xEF");
	expect_json_error_at(__LINE__, "[1,\0]", 5, "line 1, column 4: unexpected byte 0x00");
	expect_json_error_at(__LINE__, "\"a\0\"", 4, "line 1, column 3: control character 0x00");

	/* nesting: 1000 levels parse, 1001 do not */
	for (i = 0; i < 1000; i++)
		deep[i] = '[';
	for (i = 0; i < 1000; i++)
		deep[1000 + i] = ']';
	deep[2000] = '\0';
	v = parse(deep);
	CHECK(v != NULL && v->kind == TV_ARRAY);
	tmpl_value_free(v);
	memmove(deep + 1, deep, 2001);
	deep[0] = '[';
	strcat(deep, "]");
	expect_json_error(deep, "line 1, column 1001: nesting depth exceeds 1000");

	/* a NULL errbuf is allowed */
	CHECK(tmpl_json_parse("[", 1, NULL, 0) == NULL);
}

/* Counting allocation hooks, optionally failing after a number of calls */
static long live_allocs = 0;
static long total_allocs = 0;
static long hook_calls = 0;
static long fail_after = -1;

/* counting_alloc - malloc that counts and can be told to fail */
static void *
counting_alloc(size_t size)
{
	void	   *p;

	if (fail_after >= 0 && hook_calls++ >= fail_after)
		return NULL;
	if (size == 0)
		abort();				/* the module promises never to ask for 0 */
	p = malloc(size);
	if (p != NULL)
	{
		live_allocs++;
		total_allocs++;
	}
	return p;
}

/* counting_realloc - realloc that can fail; NULL must never reach it */
static void *
counting_realloc(void *ptr, size_t size)
{
	if (ptr == NULL || size == 0)
		abort();
	if (fail_after >= 0 && hook_calls++ >= fail_after)
		return NULL;
	return realloc(ptr, size);
}

/* counting_free - free that counts; NULL must never reach it */
static void
counting_free(void *ptr)
{
	if (ptr == NULL)
		abort();
	live_allocs--;
	free(ptr);
}

/*
 * workload - parse, compile and render with partials, then free it all
 *
 * Returns 0 when everything worked, -1 when some step failed (as it must
 * when allocations are made to fail); either way nothing may stay live.
 */
static int
workload(char *message, size_t msglen)
{
	static const char *const pairs[] = {
		"row", "  - {{name}} {{{tags}}}\n{{#sub}}\n  {{>row}}\n{{/sub}}",
		NULL
	};
	static const char json[] = "{\"rows\": [{\"name\": \"a&b\", \"tags\": [1, \"x\"],"
		"\"sub\": [{\"name\": \"c\", \"tags\": {\"k\": null}, \"sub\": false}]}, {\"name\": \"\\u00e9\"}]}";
	static const char tmpl[] = "Hi {{rows.0.name}}\n{{#rows}}\n  {{>row}}\n{{/rows}}\n";
	Partials	p = {pairs, 0};
	TmplValue  *ctx;
	TmplTemplate *t;
	TmplBuf		out = {0};
	TmplError	err;
	int			rc = -1;

	message[0] = '\0';
	ctx = tmpl_json_parse(json, sizeof(json) - 1, message, msglen);
	if (ctx == NULL)
		return -1;
	t = tmpl_compile(tmpl, sizeof(tmpl) - 1, &err);
	if (t != NULL)
	{
		rc = tmpl_render(t, ctx, TMPL_ESCAPE_HTML, table_partial, &p, 0, &out, &err);
		if (rc == 0 && strcmp(out.data, "Hi a&amp;b\n    - a&amp;b [1,\"x\"]\n"
							  "      - c {\"k\":null}\n    - \xC3\xA9 \n") != 0)
		{
			printf("workload rendered unexpected output: %s\n", out.data);
			rc = -3;
		}
	}
	snprintf(message, msglen, "%s", err.message);
	tmpl_buf_free(&out);
	tmpl_free(t);
	tmpl_value_free(ctx);
	return rc;
}

/* test_allocator - the hooks are the only allocation path, also on failure */
static void
test_allocator(void)
{
	TmplAllocator hooks = {counting_alloc, counting_realloc, counting_free};
	char		message[256];
	long		n;
	bool		saw_oom = false;

	tmpl_set_allocator(&hooks);
	CHECK(workload(message, sizeof(message)) == 0);
	CHECK(total_allocs > 10);
	CHECK(live_allocs == 0);

	/* make the n-th hook call fail, for every n until the workload succeeds */
	for (n = 0;; n++)
	{
		int			rc;

		hook_calls = 0;
		fail_after = n;
		rc = workload(message, sizeof(message));
		fail_after = -1;
		if (live_allocs != 0)
		{
			CHECK(live_allocs == 0);
			printf("  leak when failing hook call %ld\n", n);
			break;
		}
		if (rc == 0)
			break;
		if (rc != -1 || strstr(message, "out of memory") == NULL)
		{
			CHECK(rc == -1 && strstr(message, "out of memory") != NULL);
			printf("  hook call %ld failed: rc %d, \"%s\"\n", n, rc, message);
			break;
		}
		saw_oom = true;
	}
	CHECK(saw_oom && n > 10);
	tmpl_set_allocator(NULL);
}

/*
 * test_fuzz_smoke - random templates and JSON must never crash
 *
 * Not a substitute for a real fuzzer, but under the sanitizers it walks
 * many error paths and odd tag combinations cheaply and deterministically.
 */
static void
test_fuzz_smoke(void)
{
	static const char *const pieces[] = {
		"{{", "}}", "{{{", "}}}", "{{#a}}", "{{/a}}", "{{^b}}", "{{/b}}", "{{#.}}",
		"{{/.}}", "{{.}}", "{{a.b}}", "{{>p}}", "{{>q}}", "{{=<% %>=}}", "<%", "%>",
		"{{!x}}", "{{&a}}", "\n", "  ", "\r\n", "x", "\xC3\xA9", "=", "{", "}", "#",
		"/", ".", "\0"
	};
	static const char *const pairs[] = {
		"p", "[{{#a}}{{>p}}{{/a}}]\n", "q", "  {{>p}}\n{{b}}{{", NULL
	};
	static const char *const jpieces[] = {
		"{", "}", "[", "]", "\"a\"", ":", ",", "1", "-0.5e3", "true", "null",
		"\"\\u00e9\"", "\"\\ud800\"", " ", "\"", "\\", "\xC3", "x"
	};
	unsigned long seed = 12345;
	TmplValue  *ctx = parse("{\"a\": [{\"a\": [1, 2], \"b\": \"<&>\"}, {\"b\": false}], \"b\": {\"a\": null}}");
	int			iter;
	int			compiled = 0;

	tmpl_set_step_limit(200000);
	for (iter = 0; iter < 20000; iter++)
	{
		char		src[256];
		size_t		len = 0;
		int			k;
		int			pieces_n;
		TmplTemplate *t;
		TmplError	err;
		TmplValue  *v;
		char	   *copy;

		seed = seed * 6364136223846793005UL + 1442695040888963407UL;
		pieces_n = (int) ((seed >> 33) % 16);
		for (k = 0; k < pieces_n; k++)
		{
			const char *piece;
			size_t		plen;

			seed = seed * 6364136223846793005UL + 1442695040888963407UL;
			piece = pieces[(seed >> 33) % (sizeof(pieces) / sizeof(pieces[0]))];
			plen = piece[0] ? strlen(piece) : 1;
			memcpy(src + len, piece, plen);
			len += plen;
		}
		copy = exact_copy(src, len);
		t = tmpl_compile(copy, len, &err);
		if (t != NULL)
		{
			Partials	p = {pairs, 0};
			TmplBuf		out = {0};

			compiled++;
			(void) tmpl_render(t, ctx, (TmplEscape) (iter % 3), table_partial, &p,
							   4096, &out, &err);
			tmpl_buf_free(&out);
			tmpl_free(t);
		}
		else if (err.line < 1 || err.column < 1 || err.message[0] == '\0')
		{
			CHECK(err.line >= 1 && err.column >= 1 && err.message[0] != '\0');
			break;
		}
		free(copy);

		/* the same bytes as JSON, then JSON made of JSON-ish pieces */
		len = 0;
		for (k = 0; k < pieces_n; k++)
		{
			const char *piece;

			seed = seed * 6364136223846793005UL + 1442695040888963407UL;
			piece = jpieces[(seed >> 33) % (sizeof(jpieces) / sizeof(jpieces[0]))];
			memcpy(src + len, piece, strlen(piece));
			len += strlen(piece);
		}
		copy = exact_copy(src, len);
		v = tmpl_json_parse(copy, len, src, 64);
		tmpl_value_free(v);
		free(copy);
	}
	tmpl_set_step_limit(TMPL_DEFAULT_MAX_STEPS);
	CHECK(compiled > 1000);
	tmpl_value_free(ctx);
}

/* main - run every group and summarise */
int
main(void)
{
	test_escaping();
	test_json_body();
	test_values();
	test_names();
	test_sections();
	test_nul_bytes();
	test_syntax_errors();
	test_partials();
	test_many_partials();
	test_output();
	test_step_limit();
	test_json();
	test_allocator();
	test_fuzz_smoke();

	printf("%d passed, %d failed\n", passed, failed);
	return failed == 0 ? 0 : 1;
}

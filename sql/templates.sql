--
-- templates: notify.set_template checks the syntax when the template is
-- stored; notify.render previews what a recipient would get.
--

-- errors show their message, DETAIL and HINT; not the PL/pgSQL CONTEXT,
-- whose line numbers change with every edit of a function
\set SHOW_CONTEXT never

-- a template with all three parts
SELECT notify.set_template('order.created',
    'Order {{row.id}} for {{row.customer.name}}',
    E'Hello {{recipient.display_name}},\n\nOrder {{row.id}}: {{row.total}} EUR.\n',
    '<p>Order <b>{{row.id}}</b> for {{row.customer.name}}</p>');
-- without an HTML body
SELECT notify.set_template('plain', 'Subject {{x}}', 'Text {{x}}');
SELECT name, locale, subject, text_body, html_body FROM notify.template ORDER BY name, locale;

-- set_template replaces (upsert by name and locale)
SELECT notify.set_template('plain', 'Subject: {{x}}', 'Text: {{x}}', '<i>{{x}}</i>');
SELECT name, locale, subject, text_body, html_body FROM notify.template WHERE name = 'plain';

--
-- syntax errors: the message names the template, the part, the line and column
--
-- unclosed section opened at line 3, column 5
SELECT notify.set_template('bad', 'ok', E'Hello\nitems:\n    {{#items}}\n  - {{name}}\n');
-- the same in the subject and in the HTML body
SELECT notify.set_template('bad', 'Order {{#row}}{{id}}', 'ok');
SELECT notify.set_template('bad', 'ok', 'ok', E'<ul>\n  {{#items}}<li>{{.}}</li>\n</ul>');
-- a closing tag that does not match the open section
SELECT notify.set_template('bad', 'ok', E'{{#a}}\n  {{#b}}x{{/a}}\n{{/b}}');
-- a closing tag without a section
SELECT notify.set_template('bad', 'ok', E'text\n{{/a}}');
-- an unclosed tag
SELECT notify.set_template('bad', 'ok', E'line one\nDear {{recipient.display_name,\n');
SELECT notify.set_template('bad', 'Order {{row.id', 'ok');
SELECT notify.set_template('bad', 'ok', 'ok', '<p>{{{row.note}}</p>');
-- an empty tag
SELECT notify.set_template('bad', 'ok', 'a {{}} b');
-- the columns count characters, not bytes
SELECT notify.set_template('bad', 'ok', E'¡Olé! {{#x}}');
-- none of those were stored
SELECT count(*) AS bad_templates FROM notify.template WHERE name = 'bad';

-- other errors
SELECT notify.set_template('', 's', 't');
SELECT notify.set_template(NULL, 's', 't');
SELECT notify.set_template('t', NULL, 't');
SELECT notify.set_template('t', 's', NULL);
SELECT notify.set_template('t', 's', 't', NULL, 'not a locale');

--
-- render
--
-- HTML escaping happens only in the HTML body; {{{ }}} and {{& }} are raw
SELECT notify.set_template('escape',
    'Re: {{row.title}} / {{{row.title}}}',
    E'{{row.title}}\n{{{row.title}}}\n{{& row.title}}',
    E'{{row.title}}\n{{{row.title}}}\n{{& row.title}}');
SELECT * FROM notify.render('escape', $${"row": {"title": "<b>Tom & \"Jerry\"</b> 'x'"}}$$);

-- sections iterate arrays, render once for a truthy value, not at all for
-- false/empty/null/missing; inverted sections are the opposite
SELECT notify.set_template('sections', 'Lines: {{row.count}}',
$$Lines:
{{#row.lines}}
- {{sku}} x {{qty}} at {{price}}{{#last}} (last){{/last}}
{{/row.lines}}
{{^row.lines}}
(no lines)
{{/row.lines}}
{{#row.customer}}Customer: {{name}} ({{id}}){{/row.customer}}
{{#row.flag}}flag is on{{/row.flag}}{{^row.flag}}flag is off{{/row.flag}}
tags: {{#row.tags}}[{{.}}]{{/row.tags}}
$$);
SELECT text_body FROM notify.render('sections', $${"row": {"count": 2,
    "lines": [{"sku": "A-1", "qty": 2, "price": 10.50},
              {"sku": "B<2>", "qty": 1, "price": 1000.50, "last": true}],
    "customer": {"id": 17, "name": "ACME"},
    "flag": true,
    "tags": ["x", "y", 3]}}$$);
SELECT text_body FROM notify.render('sections', $${"row": {"lines": [], "flag": false, "tags": []}}$$);
SELECT text_body FROM notify.render('sections', $${"row": {"lines": null, "customer": null}}$$);
SELECT text_body FROM notify.render('sections', '{}');
SELECT text_body FROM notify.render('sections', NULL);

-- values print as jsonb prints them; null and missing print nothing
SELECT notify.set_template('values', 'v',
    E'n={{n}} big={{big}} neg={{neg}} exp={{e}} t={{t}} f={{f}} null=[{{z}}] missing=[{{nope}}]\n'
    'date={{d}} ts={{ts}} obj={{obj.a.b}} deep.missing=[{{obj.x.y}}] through.scalar=[{{n.x}}]\n'
    'text={{s}} empty=[{{empty}}] zero={{zero}}');
SELECT text_body FROM notify.render('values', jsonb_build_object(
    'n', 1000.50::numeric, 'big', 12345678901234567890.000, 'neg', -0.5, 'e', '1e3'::jsonb,
    't', true, 'f', false, 'z', NULL, 'd', '2024-02-29'::date,
    'ts', '2024-02-29 13:45:00+00'::timestamptz AT TIME ZONE 'UTC',
    'obj', '{"a": {"b": "deep"}}'::jsonb, 's', 'línea ñ €', 'empty', '', 'zero', 0));
-- in sections, false, null, an empty list, an empty string and a missing key are falsy; 0 is not
SELECT notify.set_template('truthy', 't',
    '{{#f}}F{{/f}}{{#z}}Z{{/z}}{{#l}}L{{/l}}{{#m}}M{{/m}}{{#zero}}0{{/zero}}{{#empty}}E{{/empty}}{{#s}}S={{.}}{{/s}}');
SELECT text_body FROM notify.render('truthy', '{"f": false, "z": null, "l": [], "zero": 0, "empty": "", "s": "str"}');

-- dotted paths, the current item, and lookups up the context stack
SELECT notify.set_template('paths', 'p',
    '{{#row.items}}{{name}}@{{row.customer.name}}/{{recipient.key}};{{/row.items}} {{row.customer.address.city}}');
SELECT text_body FROM notify.render('paths', $${"recipient": {"key": "user:1"},
    "row": {"items": [{"name": "a"}, {"name": "b"}],
            "customer": {"name": "ACME", "address": {"city": "Sevilla"}}}}$$);

-- comments and set delimiters
SELECT notify.set_template('misc', 's', E'a{{! a comment }}b {{=<% %>=}}<% x %> {{x}} <%={{ }}=%>{{x}}');
SELECT text_body FROM notify.render('misc', '{"x": 1}');

-- partials: another template by name, of the same body kind
SELECT notify.set_template('footer', 'unused', E'-- \n{{company}}', '<footer>{{company}}</footer>');
SELECT notify.set_template('letter', 'Hi {{name}}', E'Dear {{name}},\n{{> footer}}', '<p>Dear {{name}}</p>{{> footer}}');
SELECT * FROM notify.render('letter', '{"name": "Ana & Luis", "company": "P&G"}');
-- a partial that does not exist renders as nothing
SELECT notify.set_template('nopartial', 's', 'a{{> no_such_template}}b');
SELECT text_body FROM notify.render('nopartial', '{}');
-- an HTML partial without an HTML body falls back to its text
SELECT notify.set_template('textonly', 's', 'T<{{x}}>');
SELECT notify.set_template('usetextonly', 's', '{{> textonly}}', '<div>{{> textonly}}</div>');
SELECT text_body, html_body FROM notify.render('usetextonly', '{"x": "&"}');

-- locales: es-ES, then es, then the template without locale
SELECT notify.set_template('greeting', 'Hello', 'Hello {{name}}');
SELECT notify.set_template('greeting', 'Hola', 'Hola {{name}}', NULL, 'es');
SELECT notify.set_template('greeting', 'Buenas', 'Buenas {{name}}', NULL, 'es_ES');
SELECT name, locale, subject FROM notify.template WHERE name = 'greeting' ORDER BY locale;
SELECT l AS locale, r.subject, r.text_body
  FROM unnest(ARRAY['es-ES', 'es_ES', 'es-MX', 'es', 'fr-FR', 'en', NULL]) WITH ORDINALITY AS u(l, n),
       LATERAL notify.render('greeting', '{"name": "Ana"}', l) r
 ORDER BY n;
-- the partial is taken in the same locale
SELECT notify.set_template('sig', 's', 'Regards');
SELECT notify.set_template('sig', 's', 'Saludos', NULL, 'es');
SELECT notify.set_template('signed', 's', 'Bye. {{> sig}}');
SELECT l AS locale, r.text_body
  FROM unnest(ARRAY['es-AR', 'de']) WITH ORDINALITY AS u(l, n),
       LATERAL notify.render('signed', '{}', l) r
 ORDER BY n;

-- render errors
SELECT * FROM notify.render('no_such_template', '{}');
SELECT * FROM notify.render(NULL, '{}');
-- a partial with a syntax error is reported when rendering
SELECT notify.set_template('broken_partial_user', 's', 'x {{> broken}}');
INSERT INTO notify.template (name, subject, text_body) VALUES ('broken', 's', E'ok\n {{#a}}');
SELECT * FROM notify.render('broken_partial_user', '{}');
DELETE FROM notify.template WHERE name = 'broken';

-- drop_template: the variant without locale, or one locale
SELECT notify.drop_template('greeting', 'es_ES');
SELECT subject FROM notify.render('greeting', '{}', 'es-ES');
SELECT notify.drop_template('greeting', 'es-ES');
SELECT notify.drop_template('greeting');
SELECT locale FROM notify.template WHERE name = 'greeting';
SELECT notify.drop_template('greeting', 'es');
SELECT * FROM notify.render('greeting', '{}', 'es');
SELECT notify.drop_template('no_such_template');
SELECT notify.drop_template('greeting', 'fr');

-- clean up (rules.sql creates its own)
DELETE FROM notify.template;

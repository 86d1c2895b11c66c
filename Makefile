# notify_ext — PGXS build.
#   make && make install         build and install into the PostgreSQL found by pg_config
#   make installcheck            pg_regress tests (needs a server with notify_ext preloaded;
#                                see test/run)
#   make unitcheck               pure-C unit tests (template, mime) and the Mustache spec
#   make bench                   the benchmarks in test/bench (install the extension first; ~14 min)
#   make installcheck-debian     the README's install and first rule, as written, on a new Debian
#                                cluster (test/install_debian; root; runs make install; ~20 s)

EXTENSION = notify_ext
EXTVERSION = 0.3

MODULE_big = notify_ext
OBJS = \
	src/notify_ext.o \
	src/shmem.o \
	src/launcher.o \
	src/ddl.o \
	src/identity.o \
	src/capture.o \
	src/rowjson.o \
	src/context.o \
	src/worker.o \
	src/schedule.o \
	src/cron.o \
	src/fanout.o \
	src/render.o \
	src/sender.o \
	src/health.o \
	src/smtp.o \
	src/webhook.o \
	src/spi_util.o \
	src/template.o \
	src/mime.o \
	src/bounce.o \
	src/dsn.o \
	src/imap.o

SQL_SOURCES = $(sort $(wildcard src/sql/*.sql))
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
# earlier versions, frozen as released, and the scripts that update them
DATA = src/sql/upgrade/$(EXTENSION)--0.1.sql src/sql/upgrade/$(EXTENSION)--0.1--0.2.sql \
	src/sql/upgrade/$(EXTENSION)--0.2.sql src/sql/upgrade/$(EXTENSION)--0.2--0.3.sql

REGRESS = setup capture templates rules channels directory schedules security bounces
REGRESS_OPTS = --inputdir=. --outputdir=. --load-extension=$(EXTENSION)

# -Wno-unused-parameter: PostgreSQL's own headers (bufpage.h inlines) and fmgr callbacks trip it
PG_CPPFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -DNOTIFY_EXT_VERSION='"$(EXTVERSION)"'
SHLIB_LINK = -lcurl
EXTRA_CLEAN = results regression.diffs regression.out

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# PGXS tracks no header dependencies: a changed struct must rebuild every user
$(OBJS): $(wildcard src/*.h)

$(EXTENSION)--$(EXTVERSION).sql: $(SQL_SOURCES)
	cat $^ > $@

.PHONY: unitcheck
unitcheck:
	$(MAKE) -C test/unit check

.PHONY: bench
bench:
	test/bench/run

.PHONY: installcheck-debian
installcheck-debian:
	test/install_debian

# eventbus — PGXS build plus the developer commands (demo, test, bench).

EXTENSION   = eventbus
MODULE_big  = eventbus
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
DATA        = $(sort $(wildcard sql/eventbus--*.sql))
# pg_regress suite (make installcheck): test/regress/sql/NAME.sql against
# test/regress/expected/NAME.out; results and diffs stay under test/regress/.
REGRESS     = $(sort $(basename $(notdir $(wildcard test/regress/sql/*.sql))))
REGRESS_OPTS = --inputdir=test/regress --outputdir=test/regress
REGRESS_PREP = regress-preflight

PG_CONFIG  ?= pg_config
# -Wno-unused-parameter: PG_FUNCTION_ARGS and library callbacks have fixed signatures.
# -MMD -MP: each object's header dependencies, as the compiler saw them.
PG_CFLAGS   = -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers \
              -fvisibility=hidden -MMD -MP $(shell pkg-config --cflags rdkafka libnats)
# Export only what PostgreSQL looks up by name (_PG_init, the SQL functions,
# worker entry points): PostgreSQL 15 leaves PGDLLEXPORT empty on ELF.
PG_CPPFLAGS = -DPGDLLEXPORT='__attribute__((visibility("default")))'
SHLIB_LINK  = $(shell pkg-config --libs rdkafka libnats) -lpthread
EXTRA_CLEAN = test/tools/devbroker test/tools/natstool test/tools/kafkaraw $(OBJS:.o=.d) \
              test/regress/results test/regress/regression.diffs test/regress/regression.out

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

-include $(OBJS:.o=.d)

TOOL_CFLAGS = -std=gnu11 -O2 -Wall -Wextra -Werror

# The test tools are built with the extension for the test stack; a package
# build (debian/rules) sets EVENTBUS_NO_TOOLS=1, as it ships only the extension.
ifeq ($(EVENTBUS_NO_TOOLS),)
all: tools
endif
tools: test/tools/devbroker test/tools/natstool test/tools/kafkaraw

test/tools/devbroker: test/tools/devbroker.c test/tools/devbroker_proxy.c test/tools/devbroker_proxy.h \
		test/tools/devbroker_wire.c test/tools/devbroker_wire.h
	$(CC) $(TOOL_CFLAGS) -o $@ test/tools/devbroker.c test/tools/devbroker_proxy.c test/tools/devbroker_wire.c $(shell pkg-config --cflags --libs rdkafka) -lpthread -ldl

test/tools/kafkaraw: test/tools/kafkaraw.c
	$(CC) $(TOOL_CFLAGS) -o $@ $< $(shell pkg-config --cflags --libs rdkafka) -lpthread

test/tools/natstool: test/tools/natstool.c test/tools/natstool_admin.c test/tools/natstool.h
	$(CC) $(TOOL_CFLAGS) -o $@ test/tools/natstool.c test/tools/natstool_admin.c $(shell pkg-config --cflags --libs libnats) -lpthread

# The suite needs a server that preloads eventbus (GUCs, the 55000 checks)
# and a test database the launcher does not serve (the "not served" errors):
# say so up front instead of in a diff.
regress-preflight:
	@preload=$$('$(bindir)/psql' -X -A -t -d postgres -c 'SHOW shared_preload_libraries') || exit 1; \
	case ",$$(echo "$$preload" | tr -d ' ')," in *,eventbus,*) ;; \
	*) echo "make installcheck: the server must have shared_preload_libraries = 'eventbus' (it has '$$preload')"; exit 1 ;; esac; \
	served=$$('$(bindir)/psql' -X -A -t -d postgres -c 'SHOW eventbus.database') || exit 1; \
	if [ "$$served" = '$(CONTRIB_TESTDB)' ]; then \
		echo "make installcheck: eventbus.database must not be $(CONTRIB_TESTDB), the database pg_regress recreates"; exit 1; fi

.PHONY: deps tools start stop demo test bench fuzz package test-ops regress-preflight

deps:
	@scripts/deps.sh

start: all install
	@scripts/stack.sh start

stop:
	@scripts/stack.sh stop

demo: deps
	@$(MAKE) --no-print-directory all install
	@scripts/demo.sh

test: deps
	@$(MAKE) --no-print-directory all install
	@scripts/test.sh

bench: deps
	@$(MAKE) --no-print-directory all install
	@bench/run.sh

# The long decoder fuzz run (make test runs a short one): FUZZ_INPUTS,
# FUZZ_LATIN1_INPUTS, FUZZ_SEED.
fuzz: deps
	@$(MAKE) --no-print-directory all install
	@test/fuzz/run.sh

# The Debian package postgresql-15-eventbus (debian/, pg_buildext), built from
# a copy of the tree into build/package/.
package:
	@scripts/deps.sh --package
	@scripts/package.sh

# Operations tests (test/ops/): packaging and installation on this machine.
test-ops:
	@scripts/deps.sh --package
	@prove -v $(filter-out %/lib.sh,$(sort $(wildcard test/ops/*.sh)))

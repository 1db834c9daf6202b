# eventbus — PGXS build plus the developer commands (demo, test, bench).

EXTENSION   = eventbus
MODULE_big  = eventbus
OBJS        = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
DATA        = $(sort $(wildcard sql/eventbus--*.sql))
REGRESS     = $(sort $(patsubst sql/%.sql,%,$(filter-out sql/eventbus--%,$(wildcard sql/*.sql))))

PG_CONFIG  ?= pg_config
# -Wno-unused-parameter: PG_FUNCTION_ARGS and library callbacks have fixed signatures.
PG_CFLAGS   = -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers \
              $(shell pkg-config --cflags rdkafka libnats)
SHLIB_LINK  = $(shell pkg-config --libs rdkafka libnats) -lpthread
EXTRA_CLEAN = test/tools/devbroker test/tools/natstool

PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every object depends on the shared header (PGXS tracks no header dependencies).
$(OBJS): src/eventbus.h src/shmem.h

TOOL_CFLAGS = -std=gnu11 -O2 -Wall -Wextra -Werror

all: tools
tools: test/tools/devbroker test/tools/natstool

test/tools/devbroker: test/tools/devbroker.c
	$(CC) $(TOOL_CFLAGS) -o $@ $< $(shell pkg-config --cflags --libs rdkafka) -lpthread

test/tools/natstool: test/tools/natstool.c
	$(CC) $(TOOL_CFLAGS) -o $@ $< $(shell pkg-config --cflags --libs libnats) -lpthread

.PHONY: deps tools start stop demo test bench fuzz

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

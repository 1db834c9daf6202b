/*
 * util.c — small helpers shared across eventbus.  eb_fnv1a and
 * eb_backoff_next are plain C: library threads may call them.
 */
#include "postgres.h"

#ifdef __GLIBC__
#include <malloc.h>
#endif

#include "access/xact.h"
#include "executor/spi.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "util.h"

/*
 * Start a background worker's transaction with SPI and a snapshot.  Returns
 * the caller's memory context, which eb_xact_end restores (a commit would
 * otherwise leave TopMemoryContext current, where loop allocations leak).
 */
MemoryContext
eb_xact_begin(void)
{
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	return cxt;
}

/* Finish what eb_xact_begin started: commit, back to the caller's context. */
void
eb_xact_end(MemoryContext cxt)
{
	SPI_finish();
	PopActiveSnapshot();
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
}

/*
 * Prepare a statement once per process and keep its plan in *plan.  The
 * plan is generic: our statements look rows up by key or by arrays of keys,
 * where a custom plan is no better, and planning them anew at every
 * execution (which the plan cache otherwise may choose to do for good) cost
 * the relay and the pool several per cent of their CPU.
 */
SPIPlanPtr
eb_keep_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *argtypes)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare_cursor(sql, nargs, argtypes, CURSOR_OPT_GENERIC_PLAN);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

/* Is s in a list of C strings? */
bool
eb_string_member(List *list, const char *s)
{
	ListCell   *lc;

	foreach(lc, list)
		if (strcmp(lfirst(lc), s) == 0)
			return true;
	return false;
}

/* 32-bit FNV-1a of a string: short stable names for broker objects. */
uint32
eb_fnv1a(const char *s)
{
	uint32		h = 2166136261u;

	for (const unsigned char *p = (const unsigned char *) s; *p; p++)
		h = (h ^ *p) * 16777619u;
	return h;
}

/* The next delay of an exponential backoff: double, within [min_ms, max_ms]. */
int
eb_backoff_next(int current_ms, int min_ms, int max_ms)
{
	int			next = current_ms > max_ms / 2 ? max_ms : current_ms * 2;

	return next < min_ms ? min_ms : next > max_ms ? max_ms : next;
}

/* The delay before retry n (1-based): min_ms doubling, at most max_ms. */
int
eb_backoff_delay(int attempts, int min_ms, int max_ms)
{
	int			ms = 0;

	for (int i = 0; i < attempts && ms < max_ms; i++)
		ms = eb_backoff_next(ms, min_ms, max_ms);
	return ms;
}

/*
 * Copy src into dst allocated at its exact size (initStringInfo would take
 * at least 1 kB): thousands of small work items wait in the dispatcher.
 */
void
eb_stringinfo_copy_exact(StringInfo dst, const StringInfoData *src)
{
	dst->data = palloc(src->len + 1);
	memcpy(dst->data, src->data, src->len);
	dst->data[src->len] = '\0';
	dst->len = src->len;
	dst->maxlen = src->len + 1;
	dst->cursor = 0;
}

/*
 * Once a burst is over — work_done (a running count of the caller's work)
 * unchanged for HEAP_QUIET_MS — hand the C heap's free pages back to the
 * kernel, once.  glibc keeps what librdkafka's and cnats' threads freed in
 * their own arenas, and what a burst or a client restart freed.  Never
 * under steady traffic: trimming takes the arenas' locks from the client
 * threads.
 */
#define HEAP_QUIET_MS 1000

void
eb_heap_trim_after_burst(uint64 work_done)
{
#ifdef __GLIBC__
	static uint64 last_work = 0;
	static TimestampTz changed_at = 0;
	static bool dirty = true;	/* start-up allocations */
	TimestampTz now = GetCurrentTimestamp();

	if (work_done != last_work)
	{
		last_work = work_done;
		changed_at = now;
		dirty = true;
		return;
	}
	if (!dirty || now < TimestampTzPlusMilliseconds(changed_at, HEAP_QUIET_MS))
		return;
	dirty = false;
	malloc_trim(0);
#endif
}

/* Milliseconds from now until ts, at least 0. */
long
eb_ms_until(TimestampTz ts)
{
	long		secs;
	int			usecs;

	TimestampDifference(GetCurrentTimestamp(), ts, &secs, &usecs);
	return secs * 1000 + usecs / 1000;
}

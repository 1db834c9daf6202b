/*
 * util.h — small helpers shared across eventbus (util.c): background-worker
 * transactions, kept plans, string lists, hashing, backoff, buffers, heap, time.
 */
#ifndef EB_UTIL_H
#define EB_UTIL_H

#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "utils/timestamp.h"

struct _SPI_plan;

extern MemoryContext eb_xact_begin(void);
extern void eb_xact_end(MemoryContext cxt);
extern struct _SPI_plan *eb_keep_plan(struct _SPI_plan **plan, const char *sql, int nargs,
									  Oid *argtypes);
extern bool eb_string_member(List *list, const char *s);
extern uint32 eb_fnv1a(const char *s);
extern int	eb_backoff_next(int current_ms, int min_ms, int max_ms);
extern int	eb_backoff_delay(int attempts, int min_ms, int max_ms);
extern void eb_stringinfo_copy_exact(StringInfo dst, const StringInfoData *src);
extern void eb_heap_trim_after_burst(uint64 work_done);
extern long eb_ms_until(TimestampTz ts);

#endif							/* EB_UTIL_H */

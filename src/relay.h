/*
 * relay.h — the outbox relay (relay.c), its per-aggregate bookkeeping
 * (relay_keys.c) and the rows it moves aside (undeliverable.c).
 */
#ifndef EB_RELAY_H
#define EB_RELAY_H

#include "envelope.h"
#include "utils/hsearch.h"

/* relay.c: run by the launcher */
extern void eb_relay_init(void);
extern void eb_relay_shutdown(void);
extern long eb_relay_step(void);

/* relay_keys.c: the relay's per-(topic, aggregate) bookkeeping */
extern HTAB *eb_backoff_create(void);
extern void eb_backoff_clear(HTAB *backoff);
extern void eb_backoff_arrays(HTAB *backoff, TimestampTz now, const EbEvent *extra, int nextra,
							  Datum *topics, Datum *aggregates, TimestampTz *earliest);
extern void eb_backoff_fail(HTAB *backoff, const EbEvent *ev);
extern void eb_backoff_forget(HTAB *backoff, const EbEvent *ev);
extern void eb_aggregate_chains(const EbEvent *events, int n, int *prev, MemoryContext cxt);
extern int	eb_long_chains(const EbEvent *events, int n, int min_len, EbEvent *heads,
						   MemoryContext cxt);

/* undeliverable.c: rows moved aside by the relay, and back */
extern void eb_undeliverable_move_failed(Datum ids, Datum errors);
extern int	eb_undeliverable_move_held(int transport, int n, Datum *ids);
extern bool eb_undeliverable_any(int transport);
extern uint64 eb_undeliverable_release(int transport);

#endif							/* EB_RELAY_H */

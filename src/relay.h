/*
 * relay.h — the outbox relay (relay.c), where its reads start
 * (relay_floor.c), its per-aggregate bookkeeping (relay_keys.c) and the
 * rows it moves aside (undeliverable.c).
 */
#ifndef EB_RELAY_H
#define EB_RELAY_H

#include "envelope.h"
#include "utils/hsearch.h"

/*
 * relay_floor.c: where a transport's outbox reads start.  floor: rows with
 * ids up to it are gone for good.  The relay sets read_end and
 * excluded_from at each read.
 */
typedef struct EbReadFloor
{
	int64		floor;
	Oid			seq;			/* the outbox's sequence it is about, */
	Oid			filenode;		/* and that sequence's storage */
	bool		on;				/* this round may raise it */
	bool		cand_valid;		/* a candidate: */
	int64		cand_id;		/* the sequence's last value in a round's snapshot, */
	TransactionId cand_xid;		/* the next transaction id read after it */
	int64		safe_id;		/* this round: every row up to it that will ever exist is visible */
	int64		read_end;		/* this round: rows after it were not all read */
	int64		excluded_from;	/* this round: lowest id of the aggregates left out */
} EbReadFloor;

extern void eb_floor_begin(EbReadFloor *f, bool undeliverable);
extern void eb_floor_raise(EbReadFloor *f, bool undeliverable, int64 lowest_left);

/* relay.c: run by the launcher */
extern void eb_relay_init(void);
extern void eb_relay_shutdown(void);
extern long eb_relay_step(void);

/* relay_keys.c: the relay's per-(topic, aggregate) bookkeeping */
extern HTAB *eb_backoff_create(void);
extern void eb_backoff_clear(HTAB *backoff);
extern int	eb_backoff_arrays(HTAB *backoff, TimestampTz now, const EbEvent *extra, int nextra,
							  Datum *topics, Datum *aggregates, TimestampTz *earliest,
							  int64 *first_id);
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

/*
 * relay.h — the outbox relay (relay.c), its reads (relay_read.c), where
 * they start (relay_floor.c), its per-aggregate bookkeeping (relay_keys.c)
 * and the rows it moves aside (undeliverable.c).
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

/* relay.c and relay_read.c: one transport's round */
typedef enum SlotState
{
	SLOT_WAITING = 0,			/* not sent yet: behind its aggregate's previous event */
	SLOT_PENDING,				/* sent, outcome not known */
	SLOT_OK,
	SLOT_FAILED,				/* transient */
	SLOT_FAILED_PERMANENT
} SlotState;

/* One transport's relay state. */
typedef struct Round
{
	bool		client_up;		/* producer created */
	char	   *client_config;	/* configuration it was created with */
	bool		active;			/* events in flight */
	int			n;
	int			pending;		/* slots without an outcome (waiting or sent) */
	int			in_flight;		/* slots sent without an outcome */
	EbEvent    *events;			/* the round's events */
	int		   *prev;			/* previous slot of the same aggregate, or -1 */
	int		   *next;			/* next slot of the same aggregate, or -1 */
	int		   *wave;			/* slots sent last time (nwave; -1: none yet) */
	int			nwave;
	int		   *ready;			/* scratch: candidates for the next wave */
	SlotState  *state;
	char	  **errors;			/* per failed slot */
	TimestampTz deadline;
	TimestampTz next_try;		/* backoff after a database error */
	bool		more;			/* the last round found rows: look again */
	TimestampTz next_scan;		/* periodic look without a wake-up */
	bool		undeliverable;	/* eventbus.undeliverable may hold rows of ours */
	TimestampTz next_release;	/* next look for rows held behind nothing */
	TimestampTz backoff_due;	/* when a backed-off aggregate may be retried */
	HTAB	   *backoff;		/* aggregates backing off (relay_keys.c) */
	MemoryContext cxt;			/* reset after every round */
	TimestampTz last_start;		/* when the last round looked for rows */
	bool		left_behind;	/* the last round left rows it read unsent */
	bool		outpaced;		/* commits arrived while the last round ran */
	TimestampTz next_read_past; /* the next read past long chains (relay_read.c) */
	EbReadFloor floor;			/* where reads start (relay_floor.c) */
} Round;

/* relay.c: run by the launcher */
extern void eb_relay_init(void);
extern void eb_relay_shutdown(void);
extern long eb_relay_step(bool *failed);

/* relay_read.c: a round's rows */
extern int	eb_relay_fetch_batch(int t, Round *r, EbEvent **events, bool **held,
								 TimestampTz *earliest);
extern int	eb_relay_set_aside_held(int t, Round *r, EbEvent *events, bool *held, int n);

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

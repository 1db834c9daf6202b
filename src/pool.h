/*
 * pool.h — the consuming side behind the dispatcher: work items
 * (workitem.c), their scheduling onto pool workers (scheduler.c), the
 * shared-memory queues between them, and running handlers (handler.c,
 * pool.c).
 */
#ifndef EB_POOL_H
#define EB_POOL_H

#include "access/xlogdefs.h"
#include "port/atomics.h"

#include "envelope.h"
#include "utils/elog.h"

/* workitem.c: what the dispatcher sends a pool worker, and back */
typedef struct EbWorkItem
{
	uint64		tag;			/* dispatcher's delivery tag */
	int64		subscription_id;
	Oid			handler;
	Oid			role;
	int32		max_attempts;
	int32		transport;
	TimestampTz received_at;	/* the dispatcher took the message; 0: unknown */
	EbEvent		ev;
} EbWorkItem;

typedef enum EbOutcome
{
	EB_OUTCOME_HANDLED = 0,
	EB_OUTCOME_DUPLICATE,		/* already in the inbox: skipped */
	EB_OUTCOME_DEAD_LETTERED,
	EB_OUTCOME_OWNER_DROPPED	/* subscribing role gone: not run */
} EbOutcome;

/*
 * A finished item, sent after the pool's commit.  lsn: the end of the WAL
 * inserted by then (insert_end_lsn in pool.c), which covers every commit
 * the item's outcome rests on (its own, or the earlier one that put it in
 * the inbox); the dispatcher acknowledges the message only once the WAL is
 * flushed there.
 */
typedef struct EbCompletion
{
	uint64		tag;
	int32		outcome;
	XLogRecPtr	lsn;
} EbCompletion;

extern void eb_workitem_encode(StringInfo buf, const EbWorkItem *item);
extern void eb_workitem_decode(const char *data, Size len, EbWorkItem *item);

/* handler.c: run one handler invocation; EbOutcome, or -1 with *error set */
extern int	eb_handler_run(const EbWorkItem *item, ErrorData **error);
extern Datum eb_make_envelope(const EbWorkItem *item);
extern bool eb_handler_call(Oid handler, Oid role, Datum envelope, ErrorData **error);
extern void eb_handler_invoke(Oid handler, Oid role, Datum envelope);
extern ErrorData *eb_handler_error(Oid handler);
extern bool eb_handler_owner_present(const EbWorkItem *item);
extern void eb_handler_report_activity(const EbWorkItem *item);
extern void eb_dead_letter(const EbWorkItem *item, const ErrorData *error, int attempts);
extern Oid	eb_envelope_type(void);

/* inbox.c: a batch's look-up and record in eventbus.inbox */
extern void eb_inbox_check_batch(EbWorkItem *const *items, const bool *mask, int n, bool *seen);
extern void eb_inbox_record_batch(EbWorkItem *const *items, const bool *mask, int n);

/* DSM layout shared by dispatcher.c and pool.c: per worker an inbound
 * (dispatcher -> worker) and an outbound (completions) queue. */
#define EB_SHM_MAGIC		0x45564255	/* "EVBU" */
#define EB_IN_QUEUE_SIZE	(1024 * 1024)
#define EB_OUT_QUEUE_SIZE	(64 * 1024)
#define EB_TOC_IN(i)		((uint64) (i) * 2)
#define EB_TOC_OUT(i)		((uint64) (i) * 2 + 1)
#define EB_TOC_SLOTS(i)		(((uint64) 1 << 32) + (uint64) (i))

/*
 * Items per batch, and per worker a slot for each item of the batch it
 * runs.  The dispatcher sets a slot PENDING when it sends the item; the
 * worker takes it (PENDING -> STARTED) before running the item, and the
 * dispatcher may give a key back (PENDING -> REVOKED, scheduler.c) while the
 * worker is busy with an earlier one: whoever swaps first owns the item.
 */
#define EB_BATCH_ITEMS		64
#define EB_SLOT_PENDING		1
#define EB_SLOT_STARTED		2
#define EB_SLOT_REVOKED		3

typedef struct EbBatchSlots
{
	pg_atomic_uint32 state[EB_BATCH_ITEMS];
} EbBatchSlots;

/* scheduler.c: key-level scheduling of work items onto pool workers */
/*
 * Hand an item to a worker, slot being its place in the batch (buf NULL:
 * end of its batch); false: dropped.
 */
typedef bool (*EbSchedSend) (int worker, int slot, uint64 tag, StringInfo buf);
/* Take back the item in a worker's slot; false if the worker started it. */
typedef bool (*EbSchedRevoke) (int worker, int slot);
extern void eb_sched_init(int nworkers);
extern void eb_sched_submit(int64 subscription_id, const char *aggregate_id, uint64 tag,
							StringInfo buf);
extern void eb_sched_dispatch(EbSchedSend send);
extern long eb_sched_reassign(EbSchedRevoke revoke);
extern void eb_sched_worker_ready(int worker);
extern void eb_sched_complete(uint64 tag);
extern int64 eb_sched_pending_items(void);
extern int64 eb_sched_pending_bytes(void);
extern int64 eb_sched_inflight_bytes(void);

/*
 * A one-byte message ends each batch the dispatcher gives a worker; after
 * running it the worker sends a completion with the READY tag.
 */
#define EB_BATCH_END		'E'
#define EB_TAG_READY		0

#endif							/* EB_POOL_H */

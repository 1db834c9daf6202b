/*
 * dispatcher.c — the eventbus dispatcher background worker: runs every
 * configured transport's consumer, decodes messages (quarantining malformed
 * ones), and feeds the global keyed-worker pool through shared-memory
 * queues (pool_link.c); which worker runs which item is the scheduler's
 * choice (scheduler.c): a (subscription, aggregate) runs on one worker at a
 * time, in order.  A message is finished (the transport's consumer_done: Kafka
 * completion point advanced, JetStream message acked) only when every
 * subscription's handler for it committed or dead-lettered it, and the WAL
 * is flushed past those commits.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/ilist.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "pool.h"
#include "pool_link.h"
#include "quarantine.h"
#include "transport.h"
#include "util.h"

/* Inbox pruning: rows per transaction, and time per second spent on it. */
#define PRUNE_CHUNK		10000
#define PRUNE_BUDGET_MS	200
#define PRUNE_IDLE_MS	10000	/* after a pass that found nothing to delete */

/*
 * The statements this process runs every few seconds, idle or not: prepared
 * once (eb_keep_plan), as parsing and planning them each time was most of
 * an idle dispatcher's CPU.
 */
#define PRUNE_SQL \
	"DELETE FROM eventbus.inbox WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(SELECT ctid FROM eventbus.inbox" \
	" WHERE handled_at OPERATOR(pg_catalog.<) (pg_catalog.now() OPERATOR(pg_catalog.-)" \
	" pg_catalog.make_interval(mins => $1)) ORDER BY handled_at LIMIT " CppAsString2(PRUNE_CHUNK) "))"
#define SUBS_SQL \
	"SELECT s.id, s.topic, s.transport, s.handler::pg_catalog.oid, s.role_id, s.max_attempts" \
	" FROM eventbus.subscriptions s WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_authid a" \
	" WHERE a.oid OPERATOR(pg_catalog.=) s.role_id) ORDER BY s.id"

/*
 * Shared consumption, asked to stop: finish what was received, at most this
 * long, before leaving (the shutdown stays within 10 s with the rest).
 */
#define STOP_DRAIN_MS	3000

/* How often the status in shared memory is refreshed. */
#define STATUS_EVERY_MS	100

/*
 * Messages received and not yet finished, at most (backpressure): ~0.5 s
 * of a pool's work.  10,000 held up to 32 MiB in a 10,000-event burst.
 */
#define MAX_IN_FLIGHT	5000

/*
 * The pool commits without waiting for the WAL flush (pool.c); a message
 * whose items are all done waits until the WAL is flushed past their
 * commits.  Some other commit or the WAL writer usually flushes it first;
 * after this long the dispatcher flushes it itself.
 */
#define FLUSH_GRACE_MS	10

/* A subscription, as loaded from eventbus.subscriptions. */
typedef struct Sub
{
	int64		id;
	char	   *topic;
	int			transport;
	Oid			handler;
	Oid			role;
	int32		max_attempts;
	int64		in_flight;
} Sub;

/* One received message until it is finished. */
typedef struct Delivery
{
	int			transport;
	void	   *token;			/* consumer's handle */
	int			pending;		/* work items not yet completed */
	bool		abandoned;		/* an item was dropped: not handled here */
	XLogRecPtr	lsn;			/* WAL the pool's commits for it reach */
	TimestampTz done_at;		/* when it started waiting for the flush */
	dlist_node	node;			/* in unflushed while waiting */
} Delivery;

/* A work item in flight: its tag maps back to message and subscription. */
typedef struct ItemRef
{
	uint64		tag;
	Delivery   *delivery;
	int64		subscription_id;
	int			worker;
} ItemRef;

static Sub *subs = NULL;
static int	nsubs = 0;
static uint64 subs_generation = 0;
static TimestampTz subs_loaded_at = 0;
static SPIPlanPtr subs_plan = NULL;

static HTAB *items;				/* tag -> ItemRef */
static uint64 next_tag = 1;
static int	in_flight = 0;
static dlist_head unflushed = DLIST_STATIC_INIT(unflushed);	/* oldest first */
static MemoryContext msg_cxt;	/* deliveries */
static bool consumer_up[EB_NTRANSPORTS];
static bool shared_at_start = false;	/* eventbus.consumer_mode when it started */

static void dispatch_message(EbInbound *in);

/* Finish a message: commit point / ack, or give it back (abandoned). */
static void
finish(Delivery *d)
{
	const EbTransportRoutine *tr = eb_transport(d->transport);

	if (d->abandoned)
		tr->consumer_abandon(d->token);
	else
		tr->consumer_done(d->token);
	pfree(d);
	in_flight--;
}

/* A quarantined message is written: finish it (quarantine.c). */
static void
finish_quarantined(void *delivery)
{
	finish((Delivery *) delivery);
}

/*
 * Finish the messages whose commits are flushed; with force, or once the
 * oldest has waited FLUSH_GRACE_MS, flush the WAL for all of them first.
 * Returns the ms until the oldest still waiting is due, -1 if none waits.
 */
static long
finish_flushed(bool force)
{
	dlist_mutable_iter it;
	XLogRecPtr	flushed;
	TimestampTz due;

	if (dlist_is_empty(&unflushed))
		return -1;
	flushed = GetFlushRecPtr(NULL);
	due = TimestampTzPlusMilliseconds(dlist_head_element(Delivery, node, &unflushed)->done_at,
									  FLUSH_GRACE_MS);
	if (force || GetCurrentTimestamp() >= due)
	{
		XLogRecPtr	upto = flushed;
		dlist_iter	all;

		dlist_foreach(all, &unflushed)
			upto = Max(upto, dlist_container(Delivery, node, all.cur)->lsn);
		if (upto > flushed)
			XLogFlush(upto);
		flushed = upto;
	}
	dlist_foreach_modify(it, &unflushed)
	{
		Delivery   *d = dlist_container(Delivery, node, it.cur);

		if (d->lsn <= flushed)
		{
			dlist_delete(&d->node);
			finish(d);
		}
	}
	if (dlist_is_empty(&unflushed))
		return -1;
	due = TimestampTzPlusMilliseconds(dlist_head_element(Delivery, node, &unflushed)->done_at,
									  FLUSH_GRACE_MS);
	return eb_ms_until(due);
}

/*
 * An item of a message is finished (completed at lsn, or dropped); the
 * message is finished once all are and the WAL is flushed to the last.
 */
static void
item_finished(uint64 tag, ItemRef *ref, XLogRecPtr lsn)
{
	Delivery   *d = ref->delivery;

	for (int s = 0; s < nsubs; s++)
		if (subs[s].id == ref->subscription_id)
			subs[s].in_flight--;
	hash_search(items, &tag, HASH_REMOVE, NULL);
	d->lsn = Max(d->lsn, lsn);
	if (--d->pending > 0)
		return;
	if (d->abandoned || d->lsn <= GetFlushRecPtr(NULL))
		finish(d);
	else
	{
		d->done_at = GetCurrentTimestamp();
		dlist_push_tail(&unflushed, &d->node);
	}
}

/*
 * The scheduler gives worker w an item, or (buf NULL) ends its batch.  An
 * item whose message this instance gave up (shared consumption) is dropped:
 * another instance handles it.
 */
static bool
sched_send(int w, int slot, uint64 tag, StringInfo buf)
{
	ItemRef    *ref;

	if (buf == NULL)
	{
		eb_pool_link_end_batch(w);
		return true;
	}
	ref = hash_search(items, &tag, HASH_FIND, NULL);
	if (ref)
	{
		const EbTransportRoutine *tr = eb_transport(ref->delivery->transport);

		if (tr->consumer_live && !tr->consumer_live(ref->delivery->token))
		{
			ref->delivery->abandoned = true;
			item_finished(tag, ref, InvalidXLogRecPtr);
			return false;
		}
		ref->worker = w;
	}
	eb_pool_link_send(w, slot, buf);
	return true;
}

/*
 * Take one inbound message (the consumers' EbDeliverFn): decode it, then
 * either queue it for quarantine or hand one work item per matching
 * subscription to the scheduler.
 */
static void
dispatch_message(EbInbound *in)
{
	/*
	 * Only the delivery outlives this loop iteration; a quarantined message
	 * lives in loop memory until flushed; decoding and encoding happen in a
	 * context of this message's own (the scheduler keeps a copy of each
	 * work item), so the dispatcher holds one message's transient copies at
	 * a time, whatever its size.
	 */
	Delivery   *d = MemoryContextAllocZero(msg_cxt, sizeof(Delivery));
	MemoryContext parent = CurrentMemoryContext;
	MemoryContext mcxt = AllocSetContextCreate(parent, "eventbus message", ALLOCSET_DEFAULT_SIZES);
	EbEvent		ev;
	const char *reason;
	TimestampTz received_at = GetCurrentTimestamp();

	d->transport = in->transport;
	d->token = in->token;
	in_flight++;
	eb_shmem_count_consumed(in->transport, 1);

	/* Never throws, whatever the message: a bad one is quarantined. */
	MemoryContextSwitchTo(mcxt);
	reason = eb_envelope_decode(in->data, in->len, in->key, in->keylen,
								in->nheaders, in->header_names, in->header_values, &ev);
	MemoryContextSwitchTo(parent);
	if (reason != NULL)
	{
		eb_quarantine_queue(in, reason, d);	/* flushed in this iteration */
		MemoryContextDelete(mcxt);
		return;
	}

	MemoryContextSwitchTo(mcxt);
	ev.topic = pstrdup(in->topic);
	for (int i = 0; i < nsubs; i++)
	{
		EbWorkItem	item;
		StringInfo	buf;
		ItemRef    *ref;
		bool		found;

		if (subs[i].transport != in->transport || strcmp(subs[i].topic, in->topic) != 0)
			continue;
		memset(&item, 0, sizeof(item));
		item.tag = next_tag++;
		item.subscription_id = subs[i].id;
		item.handler = subs[i].handler;
		item.role = subs[i].role;
		item.max_attempts = subs[i].max_attempts;
		item.transport = in->transport;
		item.received_at = received_at;
		item.ev = ev;

		ref = hash_search(items, &item.tag, HASH_ENTER, &found);
		ref->delivery = d;
		ref->subscription_id = subs[i].id;
		ref->worker = -1;		/* set when the scheduler sends it */
		d->pending++;
		subs[i].in_flight++;

		buf = makeStringInfo();
		eb_workitem_encode(buf, &item);
		eb_sched_submit(subs[i].id, ev.aggregate_id, item.tag, buf);
	}
	MemoryContextSwitchTo(parent);
	MemoryContextDelete(mcxt);

	/* No subscription (any more) for it: nothing to do. */
	if (d->pending == 0)
		finish(d);
}

/*
 * The pool finished an item (eb_pool_link_drain): done with it here; false
 * if it was not in flight any more.
 */
static bool
item_completed(uint64 tag, XLogRecPtr lsn)
{
	ItemRef    *ref = hash_search(items, &tag, HASH_FIND, NULL);

	if (ref == NULL)
		return false;
	item_finished(tag, ref, lsn);
	return true;
}

/* Load eventbus.subscriptions and (re)subscribe the consumers. */
static void
load_subscriptions(void)
{
	List	   *topics[EB_NTRANSPORTS] = {NIL};
	Sub		   *fresh;
	int			n;
	MemoryContext old;
	MemoryContext cxt;

	cxt = eb_xact_begin();
	/* Subscriptions whose owner was dropped (from another database) stop. */
	if (SPI_execute_plan(eb_keep_plan(&subs_plan, SUBS_SQL, 0, NULL), NULL, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read subscriptions");
	n = (int) SPI_processed;
	old = MemoryContextSwitchTo(TopMemoryContext);
	fresh = palloc0(sizeof(Sub) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;

		fresh[i].id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));
		fresh[i].topic = SPI_getvalue(t, d, 2);
		fresh[i].transport = eb_transport_from_name(SPI_getvalue(t, d, 3));
		fresh[i].handler = DatumGetObjectId(SPI_getbinval(t, d, 4, &isnull));
		fresh[i].role = DatumGetObjectId(SPI_getbinval(t, d, 5, &isnull));
		fresh[i].max_attempts = DatumGetInt32(SPI_getbinval(t, d, 6, &isnull));
		for (int j = 0; j < nsubs; j++)
			if (subs[j].id == fresh[i].id)
				fresh[i].in_flight = subs[j].in_flight;
		if (fresh[i].transport >= 0 &&
			!eb_string_member(topics[fresh[i].transport], fresh[i].topic))
			topics[fresh[i].transport] = lappend(topics[fresh[i].transport], fresh[i].topic);
	}
	MemoryContextSwitchTo(old);
	eb_xact_end(cxt);

	for (int j = 0; j < nsubs; j++)
		pfree(subs[j].topic);
	if (subs)
		pfree(subs);
	subs = fresh;
	nsubs = n;
	subs_loaded_at = GetCurrentTimestamp();

	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		if (consumer_up[t])
			eb_transport(t)->consumer_set_topics(topics[t]);
		list_free(topics[t]);
	}
}

/* The settings the consumers depend on, as one string. */
static char *
consumer_config(void)
{
	StringInfoData buf;

	initStringInfo(&buf);
	appendStringInfo(&buf, "%d", eb_max_payload_bytes);
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		appendStringInfo(&buf, "|%s", eb_transport(t)->settings(false));
	return buf.data;
}

/* Start the consumers of configured transports; check the running ones. */
static void
manage_clients(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		const EbTransportRoutine *tr = eb_transport(t);

		if (!consumer_up[t] && tr->configured())
		{
			consumer_up[t] = tr->consumer_start(dispatch_message);
			if (consumer_up[t])
				subs_loaded_at = 0; /* subscribe it */
		}
		if (consumer_up[t] && !tr->consumer_check())
		{
			/*
			 * In-flight messages belong to the failed client: start over.
			 * The launcher starts a new dispatcher; unfinished messages are
			 * redelivered and the inbox skips what was handled.
			 */
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("the %s consumer failed, restarting the dispatcher", tr->name)));
			proc_exit(1);
		}
	}
}

/*
 * Forget inbox records older than eventbus.inbox_retention, a batch at a
 * time (a broker redelivering something older would run it again).
 */
static void
prune_inbox(void)
{
	static TimestampTz next = 0;
	static SPIPlanPtr plan = NULL;
	Oid			argtypes[1] = {INT4OID};
	Datum		args[1];
	TimestampTz start = GetCurrentTimestamp();
	uint64		pruned = 0;

	/*
	 * Every second, delete expired rows in chunks of PRUNE_CHUNK (one
	 * transaction each, oldest first by the handled_at index) until a chunk
	 * comes back short or PRUNE_BUDGET_MS passed: up to ~10 chunks a second,
	 * far above any sustained handling rate, without holding up consumption.
	 * A pass that found nothing waits PRUNE_IDLE_MS for the next: then rows
	 * expire seconds late, and an idle dispatcher runs no statement a second.
	 */
	if (eb_inbox_retention_min == 0 || start < next)
		return;
	args[0] = Int32GetDatum(eb_inbox_retention_min);
	for (;;)
	{
		MemoryContext cxt = eb_xact_begin();
		uint64		n;

		if (SPI_execute_plan(eb_keep_plan(&plan, PRUNE_SQL, 1, argtypes), args, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "could not prune the inbox");
		n = SPI_processed;
		eb_xact_end(cxt);
		pruned += n;
		if (n < PRUNE_CHUNK ||
			GetCurrentTimestamp() >= TimestampTzPlusMilliseconds(start, PRUNE_BUDGET_MS))
			break;
	}
	next = TimestampTzPlusMilliseconds(start, pruned > 0 ? 1000 : PRUNE_IDLE_MS);
}

/*
 * Publish queue depths, lag and shares for eventbus_status(), at most every
 * STATUS_EVERY_MS: the clients' look-ups (assignment, watermarks) would
 * otherwise run on every loop iteration, per subscription.
 */
static void
report_status(void)
{
	static TimestampTz last = 0;
	TimestampTz now = GetCurrentTimestamp();

	if (now < TimestampTzPlusMilliseconds(last, STATUS_EVERY_MS))
		return;
	last = now;
	eb_pool_link_report(nsubs);

	for (int i = 0; i < nsubs && i < EB_MAX_SUB_STATUS; i++)
	{
		const EbTransportRoutine *tr = eb_transport(subs[i].transport);
		int64		waiting = tr->consumer_lag(subs[i].topic);
		int			share = tr->consumer_share ? tr->consumer_share(subs[i].topic) : -1;

		eb_shmem_set_lag(i, subs[i].id, subs[i].in_flight + Max(waiting, 0), share);
	}
}

/*
 * Asked to stop in shared consumption: take nothing new, finish what was
 * received (so that what is handled here is committed or acked here, and
 * nothing after it has to be handled again elsewhere), at most
 * STOP_DRAIN_MS.  True when it is time to exit.
 */
static bool
stopping(TimestampTz *deadline)
{
	TimestampTz now = GetCurrentTimestamp();

	if (*deadline == 0)
	{
		*deadline = TimestampTzPlusMilliseconds(now, STOP_DRAIN_MS);
		ereport(LOG,
				(errmsg("dispatcher stopping: finishing %d messages received, for at most %d ms",
						in_flight, STOP_DRAIN_MS)));
	}
	if (in_flight > 0 && now < *deadline)
		return false;
	if (in_flight > 0)
		ereport(LOG,
				(errmsg("dispatcher stopping with %d messages unfinished: other instances get them again",
						in_flight)));
	return true;
}

/*
 * Bytes of eventbus.dispatcher_memory not taken by work waiting for the pool
 * or kept while the pool runs it.
 */
static int64
memory_budget(void)
{
	return (int64) eb_dispatcher_memory_kb * 1024 - eb_sched_pending_bytes() -
		eb_sched_inflight_bytes() - eb_pool_link_unsent_bytes();
}

/* On exit: stop the pool and the consumers (durables and offsets kept). */
static void
dispatcher_exit(int code, Datum arg)
{
	/*
	 * In shared consumption, what the pool handled is finished here (commit /
	 * ack) rather than given to another instance to handle a second time.
	 */
	eb_pool_link_stop(shared_at_start && items != NULL ? item_completed : NULL);
	/* What the pool handled and committed is finished once flushed. */
	PG_TRY();
	{
		(void) finish_flushed(true);
	}
	PG_CATCH();
	{
		/* Not acknowledged: redelivered, and the inbox skips what is there. */
		FlushErrorState();
	}
	PG_END_TRY();
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		if (consumer_up[t])
			eb_transport(t)->consumer_stop();
	eb_transports_close_libraries();
	eb_shmem_clear_dispatcher();
}

/* Main entry point of the dispatcher worker. */
void
eventbus_dispatcher_main(Datum main_arg)
{
	WaitEventSet *wes;
	HASHCTL		ctl;
	char	   *config;
	MemoryContext loop_cxt;
	TimestampTz stop_deadline = 0;
	int			nworkers;

	eb_worker_connect("eventbus dispatcher");
	shared_at_start = eb_consumer_mode == EB_CONSUMER_SHARED;
	if (shared_at_start)
		eb_stop_by_draining();

	eb_broker_slots = eb_shared->consumer;
	subs_generation = eb_shmem_subs_generation();
	eb_shmem_set_dispatcher(MyProcPid, MyLatch);
	before_shmem_exit(dispatcher_exit, (Datum) 0);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(ItemRef);
	items = hash_create("eventbus work items", 1024, &ctl, HASH_ELEM | HASH_BLOBS);
	msg_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus dispatcher messages",
									ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus dispatcher loop",
									 ALLOCSET_DEFAULT_SIZES);

	wes = eb_wakeup_wait_set();
	config = consumer_config();
	nworkers = eb_pool_link_start();
	eb_sched_init(nworkers);

	ereport(LOG, (errmsg("eventbus dispatcher started with %d pool workers", nworkers)));

	for (;;)
	{
		WaitEvent	event;
		long		timeout = 1000;
		int			got = 0;
		uint64		gen;
		int64		budget;
		long		flush_wait;
		long		reassign_wait;

		if (eb_worker_loop_top(loop_cxt))
		{
			char	   *now = consumer_config();

			if (strcmp(now, config) != 0 && !eb_stop_requested)
			{
				/*
				 * In-flight work belongs to the old clients: start over.  The
				 * launcher starts a new dispatcher; unfinished messages are
				 * redelivered and the inbox skips what was handled.  In shared
				 * mode, finish them first (another instance may get them).
				 */
				ereport(LOG, (errmsg("consumer settings changed, restarting the dispatcher")));
				if (!shared_at_start)
					proc_exit(0);
				eb_stop_requested = true;
			}
			pfree(now);
		}
		eb_pool_link_check();
		if (eb_stop_requested && stopping(&stop_deadline))
			proc_exit(0);

		manage_clients();

		gen = eb_shmem_subs_generation();
		if (gen != subs_generation ||
			GetCurrentTimestamp() >= TimestampTzPlusMilliseconds(subs_loaded_at, 5000))
		{
			subs_generation = gen;
			load_subscriptions();
		}

		eb_pool_link_drain(item_completed);
		flush_wait = finish_flushed(false);
		(void) eb_sched_reassign(eb_pool_link_revoke);	/* dispatched just below */
		eb_sched_dispatch(sched_send);
		eb_pool_link_flush();

		budget = memory_budget();
		/*
		 * Pool busy or memory full: stop fetching; nothing is dropped.  Keep
		 * serving the consumers (errors, logs, rebalances); a transport may
		 * still hand over a message it had already received, one per round
		 * (a single-mode Kafka consumer takes none), so memory stays bounded
		 * by eventbus.dispatcher_memory plus the clients' prefetch.
		 */
		for (int t = 0; t < EB_NTRANSPORTS; t++)
		{
			const EbTransportRoutine *tr = eb_transport(t);
			bool		pause = in_flight >= MAX_IN_FLIGHT || budget <= 0;

			if (!consumer_up[t] || eb_stop_requested)
				continue;		/* stopping: take nothing new */
			tr->consumer_pause(pause);
			if (pause)
				got += tr->consumer_poll(100, 1);
			else
			{
				got += tr->consumer_poll(MAX_IN_FLIGHT - in_flight, budget);
				budget = memory_budget();
			}
		}
		eb_sched_dispatch(sched_send);
		eb_pool_link_flush();
		/* Keys given back go to a ready worker at once. */
		while ((reassign_wait = eb_sched_reassign(eb_pool_link_revoke)) == 0)
		{
			eb_sched_dispatch(sched_send);
			eb_pool_link_flush();
		}
		eb_quarantine_flush(finish_quarantined);
		prune_inbox();
		report_status();

		if (got > 0)
			timeout = 0;
		else
		{
			for (int t = 0; t < EB_NTRANSPORTS; t++)
			{
				int			idle = consumer_up[t] ? eb_transport(t)->consumer_idle_poll_ms() : 0;

				if (idle > 0)
					timeout = Min(timeout, idle);
			}
			if (flush_wait >= 0)
				timeout = Min(timeout, Max(flush_wait, 1));
			if (reassign_wait >= 0)
				timeout = Min(timeout, Max(reassign_wait, 1));
		}

		pgstat_report_activity(STATE_IDLE, NULL);
		if (timeout > 0 && in_flight == 0)
		{
			uint64		received = 0;

			for (int t = 0; t < EB_NTRANSPORTS; t++)
				received += pg_atomic_read_u64(&eb_shared->counters[t].consumed);
			eb_heap_trim_after_burst(received);
		}
		if (timeout > 0)
		{
			timeout = eb_worker_report_stats(timeout);
			(void) WaitEventSetWait(wes, timeout, &event, 1, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
			eb_wakeup_drain();
		}
	}
}

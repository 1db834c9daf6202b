/*
 * pool_link.c — the dispatcher's end of the pool: starts the pool workers
 * with a shared-memory queue each way (items in, completions out), hands
 * items to a worker in order (keeping what its full queue cannot take yet),
 * reads completions back, and stops the workers.  A worker that is gone
 * means in-flight work can never complete: the dispatcher exits and the
 * launcher starts a new dispatcher and pool (unfinished messages are
 * redelivered and the inbox skips what was handled).
 */
#include "postgres.h"

#include <signal.h>

#include "miscadmin.h"
#include "nodes/pg_list.h"
#include "postmaster/bgworker.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/proc.h"
#include "storage/shm_mq.h"
#include "storage/shm_toc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "pool.h"
#include "pool_link.h"
#include "util.h"

/* At exit in shared consumption: wait this long for the pool to stop. */
#define EXIT_COLLECT_MS	2000

static int	nworkers;
static dsm_segment *seg;
static shm_mq_handle **toq;
static shm_mq_handle **fromq;
static EbBatchSlots **slots;	/* per worker: its batch's item slots */
static BackgroundWorkerHandle **whandles;
static List **unsent;			/* per worker: encoded items shm_mq could not take yet */
static int *queued;				/* per worker: items sent and not completed */
static int64 unsent_bytes = 0;	/* bytes in unsent[] */
static MemoryContext unsent_cxt;	/* unsent[] and its items */

/* A pool worker detached from its queue: restart the dispatcher and pool. */
static void
pg_attribute_noreturn()
worker_gone(int w)
{
	ereport(LOG,
			(errcode(ERRCODE_ADMIN_SHUTDOWN),
			 errmsg("pool worker %d is gone, restarting the dispatcher and its pool", w)));
	proc_exit(1);
}

/* Create the queues and start the pool workers; returns their number. */
int
eb_pool_link_start(void)
{
	shm_toc_estimator e;
	Size		size;
	shm_toc    *toc;
	dsm_handle	handle;

	nworkers = eb_workers;
	shm_toc_initialize_estimator(&e);
	for (int i = 0; i < nworkers; i++)
	{
		shm_toc_estimate_chunk(&e, EB_IN_QUEUE_SIZE);
		shm_toc_estimate_chunk(&e, EB_OUT_QUEUE_SIZE);
		shm_toc_estimate_chunk(&e, sizeof(EbBatchSlots));
	}
	shm_toc_estimate_keys(&e, 3 * nworkers);
	size = shm_toc_estimate(&e);

	seg = dsm_create(size, 0);
	dsm_pin_mapping(seg);
	toc = shm_toc_create(EB_SHM_MAGIC, dsm_segment_address(seg), size);
	handle = dsm_segment_handle(seg);

	toq = MemoryContextAllocZero(TopMemoryContext, sizeof(shm_mq_handle *) * nworkers);
	fromq = MemoryContextAllocZero(TopMemoryContext, sizeof(shm_mq_handle *) * nworkers);
	slots = MemoryContextAllocZero(TopMemoryContext, sizeof(EbBatchSlots *) * nworkers);
	whandles = MemoryContextAllocZero(TopMemoryContext, sizeof(BackgroundWorkerHandle *) * nworkers);
	unsent = MemoryContextAllocZero(TopMemoryContext, sizeof(List *) * nworkers);
	queued = MemoryContextAllocZero(TopMemoryContext, sizeof(int) * nworkers);
	unsent_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus unsent items",
									   ALLOCSET_DEFAULT_SIZES);

	eb_shmem_reset_workers(nworkers);

	for (int i = 0; i < nworkers; i++)
	{
		shm_mq	   *in = shm_mq_create(shm_toc_allocate(toc, EB_IN_QUEUE_SIZE), EB_IN_QUEUE_SIZE);
		shm_mq	   *out = shm_mq_create(shm_toc_allocate(toc, EB_OUT_QUEUE_SIZE), EB_OUT_QUEUE_SIZE);
		BackgroundWorker w;
		char		name[BGW_MAXLEN];

		slots[i] = shm_toc_allocate(toc, sizeof(EbBatchSlots));
		for (int k = 0; k < EB_BATCH_ITEMS; k++)
			pg_atomic_init_u32(&slots[i]->state[k], EB_SLOT_STARTED);
		shm_toc_insert(toc, EB_TOC_IN(i), in);
		shm_toc_insert(toc, EB_TOC_OUT(i), out);
		shm_toc_insert(toc, EB_TOC_SLOTS(i), slots[i]);
		shm_mq_set_sender(in, MyProc);
		shm_mq_set_receiver(out, MyProc);

		snprintf(name, sizeof(name), "eventbus worker %d", i);
		eb_bgworker_init(&w, "eventbus_worker_main", name, "eventbus worker");
		w.bgw_main_arg = Int32GetDatum(i);
		memcpy(w.bgw_extra, &handle, sizeof(handle));
		if (!RegisterDynamicBackgroundWorker(&w, &whandles[i]))
			ereport(ERROR,
					(errcode(ERRCODE_INSUFFICIENT_RESOURCES),
					 errmsg("could not start pool worker %d", i),
					 errhint("Raise max_worker_processes (the pool needs eventbus.workers + 2).")));
		toq[i] = shm_mq_attach(in, seg, whandles[i]);
		fromq[i] = shm_mq_attach(out, seg, whandles[i]);
	}
	return nworkers;
}

/* Exit (see worker_gone) if a pool worker exited. */
void
eb_pool_link_check(void)
{
	for (int i = 0; i < nworkers; i++)
	{
		pid_t		pid;

		if (GetBackgroundWorkerPid(whandles[i], &pid) == BGWH_STOPPED)
			worker_gone(i);
	}
}

/*
 * Put a message in worker w's queue.  Only the end of a batch is flushed
 * (made visible, and the worker's latch set): the worker runs a batch once
 * it has it whole, so waking it at every item only costs a signal and a
 * wake-up of the worker per item (measured: most of send_to's time).  A
 * full queue flushes what is pending by itself.
 */
static shm_mq_result
queue_put(int w, StringInfo buf)
{
	bool		batch_end = (buf->len == 1 && buf->data[0] == EB_BATCH_END);

	return shm_mq_send(toq[w], buf->len, buf->data, true, batch_end);
}

/*
 * Hand an encoded message (in loop memory) to worker w, keeping order
 * behind anything unsent.  Only one that must wait is copied (to
 * unsent_cxt).
 */
static void
send_to(int w, StringInfo buf)
{
	MemoryContext old;
	StringInfo	copy;

	if (unsent[w] == NIL)
	{
		shm_mq_result res = queue_put(w, buf);

		if (res == SHM_MQ_SUCCESS)
			return;
		if (res == SHM_MQ_DETACHED)
			worker_gone(w);
	}
	/* Would block: shm_mq needs the very same message again later. */
	old = MemoryContextSwitchTo(unsent_cxt);
	copy = palloc(sizeof(StringInfoData));
	eb_stringinfo_copy_exact(copy, buf);
	unsent[w] = lappend(unsent[w], copy);
	unsent_bytes += buf->len;
	MemoryContextSwitchTo(old);
}

/*
 * Give worker w an encoded work item, the slot-th of its batch.  The slot
 * is the worker's to take from when it gets there (it is done with its last
 * batch: it said ready).
 */
void
eb_pool_link_send(int w, int slot, StringInfo buf)
{
	pg_atomic_write_u32(&slots[w]->state[slot], EB_SLOT_PENDING);
	queued[w]++;
	send_to(w, buf);
}

/*
 * Take back the slot-th item of worker w's batch unless it started it; true
 * if it is given back (the worker may have marked it so itself, skipping a
 * key whose first item was taken back).
 */
bool
eb_pool_link_revoke(int w, int slot)
{
	uint32		expected = EB_SLOT_PENDING;

	if (!pg_atomic_compare_exchange_u32(&slots[w]->state[slot], &expected, EB_SLOT_REVOKED) &&
		expected != EB_SLOT_REVOKED)
		return false;
	queued[w]--;
	eb_shmem_worker_given_back(w);
	return true;
}

/* End worker w's batch: it runs what it received, then asks for more. */
void
eb_pool_link_end_batch(int w)
{
	StringInfoData end;

	initStringInfo(&end);
	appendStringInfoChar(&end, EB_BATCH_END);
	send_to(w, &end);
}

/* Retry unsent items in order. */
void
eb_pool_link_flush(void)
{
	for (int w = 0; w < nworkers; w++)
	{
		while (unsent[w] != NIL)
		{
			StringInfo	buf = linitial(unsent[w]);
			shm_mq_result res = queue_put(w, buf);

			if (res == SHM_MQ_WOULD_BLOCK)
				break;
			if (res == SHM_MQ_DETACHED)
				worker_gone(w);
			unsent[w] = list_delete_first(unsent[w]);
			unsent_bytes -= buf->len;
			pfree(buf->data);
			pfree(buf);
		}
	}
}

/* Bytes of items waiting for room in a worker's queue. */
int64
eb_pool_link_unsent_bytes(void)
{
	return unsent_bytes;
}

/*
 * Read every worker's completions: a worker ready for more goes to the
 * scheduler, a finished item to done().
 */
void
eb_pool_link_drain(EbPoolDoneFn done)
{
	for (int w = 0; w < nworkers; w++)
	{
		for (;;)
		{
			Size		len;
			void	   *data;
			shm_mq_result res = shm_mq_receive(fromq[w], &len, &data, true);
			EbCompletion *c = data;

			if (res == SHM_MQ_WOULD_BLOCK)
				break;
			if (res == SHM_MQ_DETACHED)
				worker_gone(w);
			for (Size i = 0; i < len / sizeof(EbCompletion); i++)
			{
				if (c[i].tag == EB_TAG_READY)
				{
					eb_sched_worker_ready(w);
					continue;
				}
				eb_sched_complete(c[i].tag);
				if (done(c[i].tag, c[i].lsn))
					queued[w]--;
			}
		}
	}
}

/* Publish each worker's queue depth for eventbus_status(). */
void
eb_pool_link_report(int nsubs)
{
	eb_shmem_set_queued(queued, nworkers, nsubs);
}

/*
 * At exit: stop the pool workers.  With collect (shared consumption), wait
 * (bounded) for them to stop and pass every completion they sent to
 * collect, so that the transports finish (commit / ack) what was handled
 * here instead of giving it to another instance, which would handle it a
 * second time.
 */
void
eb_pool_link_stop(EbPoolDoneFn collect)
{
	TimestampTz deadline;
	int			rounds = 0;

	if (whandles == NULL || fromq == NULL)
		return;
	for (int i = 0; i < nworkers; i++)
		if (whandles[i])
			TerminateBackgroundWorker(whandles[i]);
	if (collect == NULL)
		return;

	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), EXIT_COLLECT_MS);
	for (;;)
	{
		bool		running = false;

		for (int i = 0; i < nworkers; i++)
		{
			pid_t		pid;

			if (whandles[i] && GetBackgroundWorkerPid(whandles[i], &pid) != BGWH_STOPPED)
			{
				running = true;
				/*
				 * A worker that drains (shared mode) goes on through SIGTERM
				 * and stops at SIGUSR2 (repeated: one sent before it set its
				 * handler is ignored).
				 */
				if (rounds % 10 == 0 && pid > 0)
					(void) kill(pid, SIGUSR2);
			}
		}
		if (!running || GetCurrentTimestamp() >= deadline)
			break;
		pg_usleep(10 * 1000L);
		rounds++;
	}
	for (int w = 0; w < nworkers; w++)
	{
		Size		len;
		void	   *data;

		while (fromq[w] && shm_mq_receive(fromq[w], &len, &data, true) == SHM_MQ_SUCCESS)
		{
			EbCompletion *c = data;

			for (Size i = 0; i < len / sizeof(EbCompletion); i++)
				if (c[i].tag != EB_TAG_READY)
					(void) collect(c[i].tag, c[i].lsn);
		}
	}
}

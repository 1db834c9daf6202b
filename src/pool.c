/*
 * pool.c — a keyed-pool worker: receives work items from the dispatcher on
 * its shm_mq, runs their handlers in batched transactions (a subtransaction
 * per event), and reports completions on a second queue.
 *
 * Events of one (subscription, aggregate) arrive in order on one worker
 * (the dispatcher's scheduler binds a key to a worker while it has work
 * there), in batches the worker asks for when it ran all it had.
 * When a handler fails, that key is parked: its event is retried after a
 * backoff and its later events wait behind it, while every other key routed
 * here keeps going.  After max_attempts the event is dead-lettered and the
 * key moves on.
 *
 * A batch first runs optimistically: one transaction, the inbox checked for
 * all its events up front and written for those handled in one statement
 * at the end, handlers called without a subtransaction each.  Only when
 * something fails does it run again the careful way, a subtransaction per
 * event, so that one failing event costs only itself.
 *
 * Each item is taken from its batch slot before it runs (take_item): the
 * dispatcher may meanwhile give back a key this worker has not reached,
 * when the batch runs long (scheduler.c), and it then runs elsewhere.
 */
#include "postgres.h"

#include "access/xact.h"
#include "access/xlog.h"
#include "access/xlog_internal.h"
#include "lib/ilist.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "replication/syncrep.h"
#include "replication/walsender.h"
#include "storage/dsm.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/shm_mq.h"
#include "storage/shm_toc.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "pool.h"
#include "privilege.h"
#include "util.h"

#define BATCH_MAX	EB_BATCH_ITEMS	/* events per transaction */
#define KEY_LEN		(EB_MAX_AGGREGATE_ID + 24)

/*
 * Longest sleep with nothing to retry: new work, a stop and a reload set
 * the latch, so the timeout only bounds the wait, and an idle pool wakes
 * rarely.
 */
#define IDLE_WAIT_MS	10000

/* A work item waiting in a parked key's queue. */
typedef struct Pending
{
	dlist_node	node;
	MemoryContext cxt;			/* holds this struct and the item's strings */
	EbWorkItem	item;
	int			attempts;
	int			slot;			/* its slot in the batch it came in; -1 once held here */
} Pending;

/* A parked (subscription, aggregate): its events in order, head first. */
typedef struct Parked
{
	char		key[KEY_LEN];
	dlist_head	items;
	TimestampTz retry_at;
} Parked;

static int	my_index;
static shm_mq_handle *inq;
static shm_mq_handle *outq;
static EbBatchSlots *slots;		/* this worker's batch slots (pool.h) */
static HTAB *parked;
static MemoryContext item_cxt;	/* parent of each item's own context */

/* Key of an item: subscription and aggregate. */
static void
item_key(const EbWorkItem *item, char *key)
{
	memset(key, 0, KEY_LEN);
	snprintf(key, KEY_LEN, INT64_FORMAT ":%s", item->subscription_id, item->ev.aggregate_id);
}

/*
 * Take item p before running it: false if the dispatcher gave it (its key)
 * back to run on another worker (scheduler.c).  An item taken once, or held
 * here (parked), is ours.
 */
static bool
take_item(Pending *p)
{
	uint32		expected = EB_SLOT_PENDING;

	if (p->slot < 0)
		return true;
	if (pg_atomic_compare_exchange_u32(&slots->state[p->slot], &expected, EB_SLOT_STARTED))
		return true;
	return expected == EB_SLOT_STARTED;
}

/*
 * Is item i's key given back?  Yes if an earlier item of its key in this
 * batch was (revoked[] so far), or if the dispatcher takes it now: then its
 * later items are skipped too, so that none runs here before it.
 */
static bool
given_back(Pending **batch, int i, bool *revoked)
{
	for (int j = 0; j < i; j++)
		if (revoked[j] && batch[j]->item.subscription_id == batch[i]->item.subscription_id &&
			strcmp(batch[j]->item.ev.aggregate_id, batch[i]->item.ev.aggregate_id) == 0)
		{
			uint32		expected = EB_SLOT_PENDING;

			if (batch[i]->slot >= 0)
				(void) pg_atomic_compare_exchange_u32(&slots->state[batch[i]->slot], &expected,
													  EB_SLOT_REVOKED);
			return revoked[i] = true;
		}
	return revoked[i] = !take_item(batch[i]);
}

/*
 * Start a pool transaction.  Its commit does not wait for the WAL flush:
 * the dispatcher acknowledges the broker message only once the WAL is
 * flushed past the commit (EbCompletion.lsn), so a crash before the flush
 * loses a transaction whose message is redelivered, never an acknowledged
 * one.  With synchronous replication in effect, the commit waits as
 * configured (forced like a publishing transaction's), so that an
 * acknowledged message is on the standbys too.  A handler that publishes
 * makes its commit wait anyway (eventbus_publish).
 */
static void
start_pool_transaction(void)
{
	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	if (SyncRepRequested() && SyncRepStandbyNames != NULL && SyncRepStandbyNames[0] != '\0')
		ForceSyncCommit();
	else
		(void) set_config_option("synchronous_commit", "off", PGC_SUSET, PGC_S_SESSION,
								 GUC_ACTION_LOCAL, true, 0, false);
}

/*
 * The WAL insert position as the end of what is written so far.  Exactly at
 * a page boundary GetXLogInsertRecPtr() points past the next page's header,
 * where no WAL exists yet; XLogFlush() would refuse that position as past
 * the end of WAL (an ERROR in the dispatcher), so step back to the page.
 */
static XLogRecPtr
insert_end_lsn(void)
{
	XLogRecPtr	lsn = GetXLogInsertRecPtr();

	if (XLogSegmentOffset(lsn, wal_segment_size) == SizeOfXLogLongPHD)
		return lsn - SizeOfXLogLongPHD;
	if (lsn % XLOG_BLCKSZ == SizeOfXLogShortPHD)
		return lsn - SizeOfXLogShortPHD;
	return lsn;
}

/* Send completions to the dispatcher (blocking: it always drains). */
static void
send_completions(EbCompletion *done, int n)
{
	shm_mq_result res;
	XLogRecPtr	lsn;

	if (n == 0)
		return;
	lsn = insert_end_lsn();
	for (int i = 0; i < n; i++)
		done[i].lsn = lsn;
	res = shm_mq_send(outq, sizeof(EbCompletion) * n, done, false, true);
	if (res != SHM_MQ_SUCCESS)
		proc_exit(0);			/* dispatcher gone: it will start a new pool */
}

/* Append a new item to a parked key (creating the entry). */
static Parked *
park(Pending *p)
{
	char		key[KEY_LEN];
	bool		found;
	Parked	   *k;

	item_key(&p->item, key);
	k = hash_search(parked, key, HASH_ENTER, &found);
	if (!found)
	{
		dlist_init(&k->items);
		k->retry_at = 0;
	}
	dlist_push_tail(&k->items, &p->node);
	return k;
}

/*
 * Dead-letter an event whose last attempt failed at commit, in a transaction
 * of its own; if even that fails, it stays parked and is tried again.
 */
static bool
run_dead_letter(Pending *p, ErrorData *error)
{
	MemoryContext cxt = CurrentMemoryContext;
	volatile bool ok = true;

	PG_TRY();
	{
		start_pool_transaction();
		eb_dead_letter(&p->item, error, p->attempts + 1);
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		ErrorData  *e;

		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		ereport(WARNING,
				(errcode(e->sqlerrcode),
				 errmsg("could not dead-letter event %s of subscription " INT64_FORMAT,
						p->item.ev.event_id, p->item.subscription_id),
				 errdetail("%s", e->message)));
		ok = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	return ok;
}

/* The parts of an error the batch uses after commit, copied into cxt. */
static ErrorData *
keep_error(const ErrorData *e, MemoryContext cxt)
{
	ErrorData  *copy = MemoryContextAllocZero(cxt, sizeof(ErrorData));

	copy->sqlerrcode = e->sqlerrcode;
	copy->message = MemoryContextStrdup(cxt, e->message ? e->message : "unknown error");
	return copy;
}

/* What became of one item of a batch. */
typedef enum ItemResult
{
	RESULT_DONE,				/* handled, duplicate or dead-lettered: complete it */
	RESULT_FAILED,				/* failed: retry after backoff (key parked) */
	RESULT_WAIT,				/* its key is parked: wait behind the head */
	RESULT_GIVEN_BACK			/* the dispatcher runs it on another worker */
} ItemResult;

/* How the optimistic run of a batch ended. */
typedef enum FastResult
{
	FAST_COMMITTED,				/* all of it happened */
	FAST_HANDLER_FAILED,		/* a handler failed: nothing happened */
	FAST_COMMIT_FAILED,			/* recording it in the inbox or the commit failed:
								 * nothing happened */
	FAST_OTHER_FAILED			/* the inbox check failed: nothing happened */
} FastResult;

/*
 * Run a batch optimistically: one transaction, one inbox statement to skip
 * what was handled before and one to record what it handles, each handler
 * called without a subtransaction of its own.  Items of parked keys wait;
 * items whose owner was dropped are completed without running; items the
 * dispatcher took back are left out.  Fills result[] and outcome[] when it
 * committed; else nothing of it happened, and for a failed handler
 * *failed_at and *error say which and why (the careful run then counts that
 * attempt instead of running it again).
 */
static FastResult
run_optimistic(Pending **batch, int n, ItemResult *result, int *outcome,
			   int *failed_at, ErrorData **error, ErrorData **commit_error)
{
	MemoryContext cxt = CurrentMemoryContext;
	EbWorkItem *items[BATCH_MAX];
	bool		parked_key[BATCH_MAX];
	bool		runnable[BATCH_MAX];
	bool		seen[BATCH_MAX];
	bool		ran[BATCH_MAX];
	bool		revoked[BATCH_MAX];
	volatile int current = -1;
	volatile FastResult fr = FAST_OTHER_FAILED;

	*failed_at = -1;
	for (int i = 0; i < n; i++)
	{
		char		key[KEY_LEN];

		items[i] = &batch[i]->item;
		item_key(items[i], key);
		parked_key[i] = hash_search(parked, key, HASH_FIND, NULL) != NULL;
		ran[i] = false;
		revoked[i] = false;
	}

	PG_TRY();
	{
		start_pool_transaction();
		eb_constraints_immediate();
		pgstat_report_activity(STATE_RUNNING, "eventbus: running handlers");
		for (int i = 0; i < n; i++)
			runnable[i] = !parked_key[i] && eb_handler_owner_present(items[i]);
		eb_inbox_check_batch(items, runnable, n, seen);
		for (int i = 0; i < n; i++)
		{
			if (given_back(batch, i, revoked))
			{
				result[i] = RESULT_GIVEN_BACK;
				continue;
			}
			if (parked_key[i])
			{
				result[i] = RESULT_WAIT;
				continue;
			}
			result[i] = RESULT_DONE;
			outcome[i] = runnable[i] ? EB_OUTCOME_DUPLICATE : EB_OUTCOME_OWNER_DROPPED;
			if (!runnable[i] || seen[i])
				continue;
			current = i;
			eb_handler_report_activity(items[i]);
			eb_handler_invoke(items[i]->handler, items[i]->role, eb_make_envelope(items[i]));
			current = -1;
			outcome[i] = EB_OUTCOME_HANDLED;
			ran[i] = true;
		}
		/*
		 * Recording what ran is part of committing it: a doomed SERIALIZABLE
		 * transaction fails here already.
		 */
		fr = FAST_COMMIT_FAILED;
		eb_inbox_record_batch(items, ran, n);
		CommitTransactionCommand();
		fr = FAST_COMMITTED;
	}
	PG_CATCH();
	{
		/* As PostgresMain recovers from an error: nothing of the batch stays. */
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		if (current >= 0)
		{
			*failed_at = current;
			*error = eb_handler_error(items[current]->handler);
			fr = FAST_HANDLER_FAILED;
		}
		else
		{
			*commit_error = CopyErrorData();
			FlushErrorState();
		}
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return fr;
}

/*
 * Run the runnable items of a batch in one transaction, a subtransaction
 * each.  Item failed_at (if not -1) failed already with failed_error in an
 * optimistic run: that counts as its attempt, it does not run again.  Fills
 * result[], outcome[] and error[]; returns false (with *commit_error) when
 * the commit itself failed, e.g. a deferred constraint or a serialization
 * failure: then nothing of the batch happened.
 */
static bool
run_in_transaction(Pending **batch, int n, bool from_parked, int failed_at,
				   ErrorData *failed_error, ItemResult *result,
				   int *outcome, ErrorData **error, ErrorData **commit_error)
{
	MemoryContext cxt = CurrentMemoryContext;
	HTAB	   *failed_keys;
	HASHCTL		ctl;
	bool		revoked[BATCH_MAX];
	volatile bool committed = true;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = KEY_LEN;
	ctl.hcxt = cxt;
	failed_keys = hash_create("eventbus failed keys", 16, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);

	start_pool_transaction();
	eb_constraints_immediate();
	pgstat_report_activity(STATE_RUNNING, "eventbus: running handlers");

	for (int i = 0; i < n; i++)
	{
		Pending    *p = batch[i];
		char		key[KEY_LEN];
		Parked	   *k;

		error[i] = NULL;
		revoked[i] = false;
		if (given_back(batch, i, revoked))
		{
			result[i] = RESULT_GIVEN_BACK;
			continue;
		}
		item_key(&p->item, key);
		k = hash_search(parked, key, HASH_FIND, NULL);
		/* Later events of a parked key (or one failing in this batch) wait. */
		if ((k && !(from_parked && dlist_head_node(&k->items) == &p->node)) ||
			hash_search(failed_keys, key, HASH_FIND, NULL))
		{
			result[i] = RESULT_WAIT;
			continue;
		}
		if (i == failed_at)
		{
			outcome[i] = -1;
			error[i] = failed_error;
		}
		else
			outcome[i] = eb_handler_run(&p->item, &error[i]);
		if (error[i])
			error[i] = keep_error(error[i], cxt);	/* outlives the transaction */
		if (outcome[i] >= 0)
			result[i] = RESULT_DONE;
		else if (p->attempts + 1 >= p->item.max_attempts)
		{
			eb_dead_letter(&p->item, error[i], p->attempts + 1);
			outcome[i] = EB_OUTCOME_DEAD_LETTERED;
			result[i] = RESULT_DONE;
		}
		else
		{
			result[i] = RESULT_FAILED;
			hash_search(failed_keys, key, HASH_ENTER, NULL);
		}
	}

	PG_TRY();
	{
		CommitTransactionCommand();
	}
	PG_CATCH();
	{
		/* As PostgresMain recovers from an error: nothing of the batch stays. */
		HOLD_INTERRUPTS();
		MemoryContextSwitchTo(cxt);
		*commit_error = CopyErrorData();
		FlushErrorState();
		AbortCurrentTransaction();
		RESUME_INTERRUPTS();
		committed = false;
	}
	PG_END_TRY();
	MemoryContextSwitchTo(cxt);
	pgstat_report_activity(STATE_IDLE, NULL);
	return committed;
}

static void run_batch(Pending **batch, int n, bool from_parked);

/*
 * A batch's commit failed (a deferred constraint, a serialization failure):
 * run its events one transaction each, so only the event at fault fails.
 */
static void
run_one_by_one(Pending **batch, int n, bool from_parked, const ErrorData *commit_error)
{
	ereport(LOG,
			(errcode(commit_error->sqlerrcode),
			 errmsg("commit of a batch of %d events failed, running them one by one", n),
			 errdetail("%s", commit_error->message)));
	for (int i = 0; i < n; i++)
		run_batch(&batch[i], 1, from_parked);
}

/*
 * Process one batch.  batch[] holds items in arrival order; an item whose key
 * is parked (possibly by an earlier failure in this same batch) joins the
 * parked queue instead of running.  When the batch's commit fails, its items
 * run again one transaction each, so only the event at fault fails (and is
 * retried and dead-lettered like any other failure); no process restarts.
 */
static void
run_batch(Pending **batch, int n, bool from_parked)
{
	EbCompletion done[BATCH_MAX + 1];
	ItemResult	result[BATCH_MAX];
	int			outcome[BATCH_MAX];
	ErrorData  *error[BATCH_MAX];
	ErrorData  *commit_error = NULL;
	int			ndone = 0;
	TimestampTz started = GetCurrentTimestamp();
	int			handled = 0;
	int			duplicates = 0;
	int			failed = 0;
	int			dead = 0;
	int			failed_at = -1;
	ErrorData  *failed_error = NULL;
	FastResult	fr = FAST_OTHER_FAILED;

	/* Retries of parked keys go the careful way at once. */
	if (!from_parked)
		fr = run_optimistic(batch, n, result, outcome, &failed_at, &failed_error, &commit_error);
	if (fr == FAST_COMMIT_FAILED && n > 1)
	{
		run_one_by_one(batch, n, from_parked, commit_error);
		return;
	}
	if (fr != FAST_COMMITTED &&
		!run_in_transaction(batch, n, from_parked, failed_at, failed_error,
							result, outcome, error, &commit_error))
	{
		if (n > 1)
		{
			run_one_by_one(batch, n, from_parked, commit_error);
			return;
		}
		/* A single event failing at commit: a failed attempt like any other. */
		if (result[0] != RESULT_WAIT && result[0] != RESULT_GIVEN_BACK)
		{
			ereport(LOG,
					(errcode(commit_error->sqlerrcode),
					 errmsg("commit of event %s failed", batch[0]->item.ev.event_id),
					 errdetail("%s", commit_error->message)));
			result[0] = RESULT_FAILED;
			error[0] = commit_error;
			if (batch[0]->attempts + 1 >= batch[0]->item.max_attempts &&
				run_dead_letter(batch[0], commit_error))
			{
				result[0] = RESULT_DONE;
				outcome[0] = EB_OUTCOME_DEAD_LETTERED;
			}
		}
	}

	for (int i = 0; i < n; i++)
	{
		Pending    *p = batch[i];
		char		key[KEY_LEN];
		Parked	   *k;

		item_key(&p->item, key);
		k = hash_search(parked, key, HASH_FIND, NULL);
		switch (result[i])
		{
			case RESULT_GIVEN_BACK:
				MemoryContextDelete(p->cxt);
				continue;
			case RESULT_WAIT:
				p->slot = -1;	/* held here now */
				if (!from_parked)
				{
					if (k == NULL)
						k = park(p);	/* behind an item that failed in this batch */
					else
						dlist_push_tail(&k->items, &p->node);
				}
				continue;
			case RESULT_FAILED:
				p->slot = -1;	/* held here now */
				p->attempts++;
				failed++;
				ereport(LOG,
						(errcode(error[i] ? error[i]->sqlerrcode : ERRCODE_INTERNAL_ERROR),
						 errmsg("handler %u failed for event %s (attempt %d of %d), retrying",
								p->item.handler, p->item.ev.event_id, p->attempts, p->item.max_attempts),
						 errdetail("%s", error[i] && error[i]->message ? error[i]->message : "unknown error")));
				if (!k)
					k = park(p);
				else if (!from_parked)
					dlist_push_tail(&k->items, &p->node);
				k->retry_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), eb_backoff_delay(p->attempts, 100, 5000));
				continue;
			case RESULT_DONE:
				break;
		}
		if (outcome[i] == EB_OUTCOME_DEAD_LETTERED)
		{
			failed++;
			dead++;
		}
		else if (outcome[i] == EB_OUTCOME_DUPLICATE)
			duplicates++;
		else if (outcome[i] == EB_OUTCOME_HANDLED)
			handled++;
		/* Done: leave the parked queue if it came from there. */
		if (k)
		{
			dlist_delete(&p->node);
			k->retry_at = 0;
			if (dlist_is_empty(&k->items))
				hash_search(parked, key, HASH_REMOVE, NULL);
		}
		done[ndone].tag = p->item.tag;
		done[ndone].outcome = outcome[i];
		ndone++;
		MemoryContextDelete(p->cxt);
	}

	eb_shmem_worker_counts(my_index, handled, duplicates, failed, dead,
						   (uint64) Max(GetCurrentTimestamp() - started, 0));
	/* Only after commit: the dispatcher may now commit offsets / ack. */
	send_completions(done, ndone);
}

/* Retry the heads of parked keys whose backoff has passed; returns ms to the next. */
static long
run_due_parked(void)
{
	HASH_SEQ_STATUS seq;
	Parked	   *k;
	Pending    *batch[BATCH_MAX];
	int			n = 0;
	TimestampTz now = GetCurrentTimestamp();
	long		next = IDLE_WAIT_MS;

	hash_seq_init(&seq, parked);
	while ((k = hash_seq_search(&seq)) != NULL)
	{
		if (k->retry_at <= now && n < BATCH_MAX)
			batch[n++] = dlist_head_element(Pending, node, &k->items);
		else if (k->retry_at > now)
		{
			long		secs;
			int			usecs;

			TimestampDifference(now, k->retry_at, &secs, &usecs);
			next = Min(next, secs * 1000 + usecs / 1000 + 1);
		}
	}
	if (n > 0)
	{
		run_batch(batch, n, true);
		next = 0;
	}
	return next;
}

/*
 * Add what the dispatcher sent to batch[] (*n items so far), without
 * waiting, until the batch's end marker (*end set) or BATCH_MAX items.  The
 * batch runs only once it is complete: a worker that woke at its first item
 * would otherwise run the batch in pieces, as the items arrive.  False if
 * the dispatcher left.
 */
static bool
receive_batch(Pending **batch, int *n, bool *end)
{
	while (*n < BATCH_MAX && !*end)
	{
		Size		len;
		void	   *data;
		shm_mq_result res = shm_mq_receive(inq, &len, &data, true);
		MemoryContext cxt;
		MemoryContext old;
		Pending    *p;

		if (res == SHM_MQ_WOULD_BLOCK)
			break;
		if (res != SHM_MQ_SUCCESS)
			return false;
		if (len == 1 && *(char *) data == EB_BATCH_END)
		{
			*end = true;
			break;
		}
		cxt = AllocSetContextCreate(item_cxt, "eventbus item", ALLOCSET_SMALL_SIZES);
		old = MemoryContextSwitchTo(cxt);
		p = palloc0(sizeof(Pending));
		p->cxt = cxt;
		p->slot = *n;
		eb_workitem_decode(data, len, &p->item);
		MemoryContextSwitchTo(old);
		batch[(*n)++] = p;
	}
	return true;
}

/* Main entry point of a pool worker; main_arg is its index. */
void
eventbus_worker_main(Datum main_arg)
{
	dsm_handle	handle;
	dsm_segment *seg;
	shm_toc    *toc;
	HASHCTL		ctl;
	MemoryContext loop_cxt;

	my_index = DatumGetInt32(main_arg);
	memcpy(&handle, MyBgworkerEntry->bgw_extra, sizeof(handle));

	eb_worker_connect("eventbus worker");
	/* The dispatcher's "stop now", whatever the mode; shared mode drains. */
	pqsignal(SIGUSR2, die);
	if (eb_consumer_mode == EB_CONSUMER_SHARED)
		eb_stop_by_draining();

	seg = dsm_attach(handle);
	if (seg == NULL)
		proc_exit(0);			/* the dispatcher is already gone */
	dsm_pin_mapping(seg);		/* for the life of the process, not a resource owner */
	toc = shm_toc_attach(EB_SHM_MAGIC, dsm_segment_address(seg));
	if (toc == NULL)
	{
		/* Not ours: exit, and the dispatcher starts a new pool. */
		ereport(LOG,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("pool segment of the dispatcher has an unexpected layout, exiting")));
		proc_exit(1);
	}
	{
		shm_mq	   *in = shm_toc_lookup(toc, EB_TOC_IN(my_index), false);
		shm_mq	   *out = shm_toc_lookup(toc, EB_TOC_OUT(my_index), false);

		shm_mq_set_receiver(in, MyProc);
		shm_mq_set_sender(out, MyProc);
		inq = shm_mq_attach(in, seg, NULL);
		outq = shm_mq_attach(out, seg, NULL);
		slots = shm_toc_lookup(toc, EB_TOC_SLOTS(my_index), false);
	}

	eb_shmem_worker_started(my_index, MyProcPid);

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = sizeof(Parked);
	parked = hash_create("eventbus parked keys", 64, &ctl, HASH_ELEM | HASH_BLOBS);
	item_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus work items", ALLOCSET_DEFAULT_SIZES);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus worker loop", ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		static Pending *batch[BATCH_MAX];
		static int	n = 0;
		static bool batch_ended = false;
		bool		ran = false;
		long		wait;

		(void) eb_worker_loop_top(loop_cxt);

		if (!receive_batch(batch, &n, &batch_ended))
			proc_exit(0);		/* dispatcher detached */
		if ((batch_ended || n == BATCH_MAX) && n > 0)
		{
			run_batch(batch, n, false);
			n = 0;
			ran = true;
		}
		if (batch_ended)
		{
			/* Ran the whole batch it was given: ask the dispatcher for more. */
			EbCompletion ready = {EB_TAG_READY, 0};

			send_completions(&ready, 1);
			batch_ended = false;
			ran = true;
		}
		wait = run_due_parked();

		if (!ran && wait > 0)
		{
			wait = eb_worker_report_stats(wait);
			(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
							 wait, PG_WAIT_EXTENSION);
			ResetLatch(MyLatch);
		}
	}
}

/*
 * scheduler.c — which pool worker runs which work item: key-level
 * scheduling for the dispatcher.
 *
 * A key is a (subscription, aggregate).  It is bound to a worker only while
 * it has items in flight there; its later items wait here (in order) and go
 * to that same worker, so one key never runs on two workers at once.  Once
 * all its items completed (committed), the key is free and its next item may
 * go to any worker.  Workers pull: a worker gets a batch only when it said it
 * is ready (it ran everything it had).
 *
 * Batches are filled: a ready worker gets keys until its batch would take
 * about FILL_BUDGET_US (from the measured time per item), and only then does
 * the next ready worker get any.  Spreading a handful of items over every
 * idle worker costs a transaction, a wake-up and the claim statement per
 * item (measured: the pool's CPU per event at 1,000 events/s fell by a
 * third).  What keeps a slow or stuck handler from holding up the keys
 * packed with it is reassignment: a batch running longer than
 * REASSIGN_AFTER_MS while another worker is ready gives back every key the
 * worker has not started (the worker and the dispatcher race for each
 * item's slot in shared memory, pool.c take_item), and those go to the ready
 * worker.  So an item waits behind another key's handler at most that long
 * while a worker is free.
 */
#include "postgres.h"

#include "lib/ilist.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "pool.h"
#include "util.h"

#define KEY_LEN		(EB_MAX_AGGREGATE_ID + 24)
#define SCHED_BATCH	EB_BATCH_ITEMS	/* items per worker batch (its transaction) */
#define FILL_BUDGET_US	2000	/* a filled batch's expected run time */
#define REASSIGN_AFTER_MS 10	/* a batch running longer gives back unstarted keys */
#define ITEM_US_START	1000	/* time per item assumed before any was measured */

typedef struct SchedItem
{
	dlist_node	node;
	uint64		tag;
	StringInfoData buf;			/* the encoded work item */
} SchedItem;

typedef struct KeyState
{
	char		key[KEY_LEN];
	int			worker;			/* bound worker, or -1 */
	int			inflight;		/* items sent to it and not completed */
	dlist_head	pending;		/* items not yet sent, in arrival order */
	dlist_node	qnode;			/* in ready_keys or bound_keys[worker] */
	bool		queued;
} KeyState;

/*
 * An item's key, and while it is sent and not completed the item itself,
 * kept to give it to another worker if its key is given back.
 */
typedef struct TagKey
{
	uint64		tag;
	KeyState   *ks;
	SchedItem  *it;				/* NULL while it waits in ks->pending */
} TagKey;

/* The batch a worker runs: its items by slot (their tags). */
typedef struct WorkerBatch
{
	bool		open;			/* sent, its end not reported yet */
	int			n;
	TimestampTz sent_at;
	uint64		tag[SCHED_BATCH];
} WorkerBatch;

static MemoryContext sched_cxt;
static MemoryContext items_cxt;	/* the items, waiting or sent and not completed */
static HTAB *keys;
static HTAB *tags;
static int	nworkers;
static bool *ready;				/* worker asked for more */
static dlist_head ready_keys;	/* unbound keys with pending items */
static dlist_head *bound_keys;	/* per worker: bound keys with pending items */
static int	next_worker = 0;	/* round-robin start */
static int64 pending_items = 0;
static int64 pending_bytes = 0;
static int64 inflight_items = 0;	/* sent, kept until completed */
static int64 inflight_bytes = 0;
static WorkerBatch *batches;
static double item_us = ITEM_US_START;	/* moving average: batch time per item */

/* Set up for n workers (all ready). */
void
eb_sched_init(int n)
{
	HASHCTL		ctl;

	sched_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus scheduler",
									  ALLOCSET_DEFAULT_SIZES);
	items_cxt = AllocSetContextCreate(sched_cxt, "eventbus waiting items",
									  ALLOCSET_DEFAULT_SIZES);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = sizeof(KeyState);
	ctl.hcxt = sched_cxt;
	keys = hash_create("eventbus keys", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = sizeof(uint64);
	ctl.entrysize = sizeof(TagKey);
	ctl.hcxt = sched_cxt;
	tags = hash_create("eventbus tags", 1024, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	nworkers = n;
	ready = MemoryContextAllocZero(sched_cxt, sizeof(bool) * n);
	batches = MemoryContextAllocZero(sched_cxt, sizeof(WorkerBatch) * n);
	bound_keys = MemoryContextAlloc(sched_cxt, sizeof(dlist_head) * n);
	for (int w = 0; w < n; w++)
	{
		ready[w] = true;
		dlist_init(&bound_keys[w]);
	}
	dlist_init(&ready_keys);
}

/* Put a key with pending items on the list it belongs to. */
static void
enqueue_key(KeyState *ks)
{
	if (ks->queued || dlist_is_empty(&ks->pending))
		return;
	if (ks->worker < 0)
		dlist_push_tail(&ready_keys, &ks->qnode);
	else
		dlist_push_tail(&bound_keys[ks->worker], &ks->qnode);
	ks->queued = true;
}

/* Queue an encoded work item of (subscription, aggregate). */
void
eb_sched_submit(int64 subscription_id, const char *aggregate_id, uint64 tag, StringInfo buf)
{
	char		key[KEY_LEN];
	KeyState   *ks;
	TagKey	   *tk;
	SchedItem  *it;
	bool		found;
	MemoryContext old;

	memset(key, 0, sizeof(key));
	snprintf(key, sizeof(key), INT64_FORMAT ":%s", subscription_id, aggregate_id);
	ks = hash_search(keys, key, HASH_ENTER, &found);
	if (!found)
	{
		ks->worker = -1;
		ks->inflight = 0;
		ks->queued = false;
		dlist_init(&ks->pending);
	}
	tk = hash_search(tags, &tag, HASH_ENTER, NULL);
	tk->ks = ks;
	tk->it = NULL;

	old = MemoryContextSwitchTo(items_cxt);
	it = palloc(sizeof(SchedItem));
	it->tag = tag;
	eb_stringinfo_copy_exact(&it->buf, buf);
	MemoryContextSwitchTo(old);
	dlist_push_tail(&ks->pending, &it->node);
	pending_items++;
	pending_bytes += buf->len;
	enqueue_key(ks);
}

/* Take the next key for worker w: its own bound keys first, then a free one. */
static KeyState *
next_key_for(int w)
{
	KeyState   *ks;

	if (!dlist_is_empty(&bound_keys[w]))
		ks = dlist_container(KeyState, qnode, dlist_pop_head_node(&bound_keys[w]));
	else if (!dlist_is_empty(&ready_keys))
		ks = dlist_container(KeyState, qnode, dlist_pop_head_node(&ready_keys));
	else
		return NULL;
	ks->queued = false;
	ks->worker = w;
	return ks;
}

/*
 * Give worker w the pending items of one key (up to its batch's room);
 * returns false if no key is left for it.
 */
static bool
deal_key(int w, int *given, EbSchedSend send)
{
	KeyState   *ks = next_key_for(w);

	if (ks == NULL)
		return false;
	while (!dlist_is_empty(&ks->pending) && given[w] < SCHED_BATCH)
	{
		SchedItem  *it = dlist_container(SchedItem, node, dlist_pop_head_node(&ks->pending));
		TagKey	   *tk = hash_search(tags, &it->tag, HASH_FIND, NULL);

		pending_items--;
		pending_bytes -= it->buf.len;
		if (send(w, given[w], it->tag, &it->buf))
		{
			ks->inflight++;
			batches[w].tag[given[w]++] = it->tag;
			tk->it = it;		/* kept until completed */
			inflight_items++;
			inflight_bytes += it->buf.len;
			continue;
		}
		hash_search(tags, &it->tag, HASH_REMOVE, NULL);
		pfree(it->buf.data);
		pfree(it);
	}
	if (ks->inflight == 0)
	{
		/* Everything was dropped: the key stays free. */
		ks->worker = -1;
		if (dlist_is_empty(&ks->pending))
		{
			hash_search(keys, ks->key, HASH_REMOVE, NULL);
			return true;
		}
	}
	enqueue_key(ks);			/* the rest waits for w's next batch */
	return true;
}

/*
 * Give ready workers their batches.  First each ready worker in turn is
 * filled up to the fill target (see the header), then what is left is dealt
 * one key at a time to the ready workers in turn, up to a full batch each;
 * a key's pending items go together.  send is called for each item in
 * order (with its slot in the batch), then with a NULL buffer for the end of
 * each worker's batch.  An item send drops (its message was given up) is
 * forgotten here.
 */
void
eb_sched_dispatch(EbSchedSend send)
{
	int			given[EB_MAX_WORKERS];
	int			fill = (int) Max(1.0, Min((double) SCHED_BATCH, FILL_BUDGET_US / Max(item_us, 1.0)));
	bool		progress = true;

	memset(given, 0, sizeof(given));
	for (int i = 0; i < nworkers; i++)
	{
		int			w = (next_worker + i) % nworkers;

		while (ready[w] && given[w] < fill && deal_key(w, given, send))
			;
	}
	while (progress)
	{
		progress = false;
		for (int i = 0; i < nworkers; i++)
		{
			int			w = (next_worker + i) % nworkers;

			if (ready[w] && given[w] < SCHED_BATCH && deal_key(w, given, send))
				progress = true;
		}
	}
	for (int w = 0; w < nworkers; w++)
		if (given[w] > 0)
		{
			send(w, -1, 0, NULL);	/* end of the batch: the worker says ready after it */
			ready[w] = false;
			batches[w].open = true;
			batches[w].n = given[w];
			batches[w].sent_at = GetCurrentTimestamp();
		}
	next_worker = (next_worker + 1) % Max(nworkers, 1);

	/*
	 * Nothing waits or runs: give back the blocks a burst left.  An AllocSet
	 * keeps freed chunks for reuse and never returns its blocks (measured:
	 * 16 MB held after a 40,000-event burst).
	 */
	if (pending_items == 0 && inflight_items == 0 &&
		MemoryContextMemAllocated(items_cxt, false) > 1024 * 1024)
		MemoryContextReset(items_cxt);
}

/*
 * Give back the keys a long-running batch has not started (see the header).
 * revoke takes an item's slot from its worker, false if the worker started
 * it.  Returns 0 if keys were given back (dispatch them), else the ms until
 * a batch becomes due, -1 if none can be.
 */
long
eb_sched_reassign(EbSchedRevoke revoke)
{
	TimestampTz now;
	bool		any_ready = false;
	bool		gave = false;
	long		next = -1;

	for (int w = 0; w < nworkers; w++)
		any_ready |= ready[w];
	if (!any_ready)
		return -1;				/* rechecked when a worker reports ready */

	now = GetCurrentTimestamp();
	for (int w = 0; w < nworkers; w++)
	{
		WorkerBatch *b = &batches[w];
		TimestampTz due;

		if (!b->open)
			continue;
		due = TimestampTzPlusMilliseconds(b->sent_at, REASSIGN_AFTER_MS);
		if (now < due)
		{
			long		ms = (long) ((due - now + 999) / 1000);

			next = next < 0 ? ms : Min(next, ms);
			continue;
		}
		for (int s = 0; s < b->n; s++)
		{
			TagKey	   *tk = hash_search(tags, &b->tag[s], HASH_FIND, NULL);
			KeyState   *ks;
			int			count = 0;
			int			last = s;

			if (tk == NULL || tk->it == NULL)
				continue;		/* completed, or given back already */
			ks = tk->ks;
			/* The key's items in this batch are consecutive. */
			for (int t = s; t < b->n; t++)
			{
				TagKey	   *o = hash_search(tags, &b->tag[t], HASH_FIND, NULL);

				if (o == NULL || o->ks != ks)
					break;
				if (o->it != NULL)
					count++;
				last = t;
			}
			/*
			 * Only a key with nothing else on this worker (no parked retry
			 * ahead of it), and only if the worker has not started it: its
			 * first item's slot is ours.
			 */
			if (ks->inflight == count && revoke(w, s))
			{
				SchedItem  *back[SCHED_BATCH];
				int			nback = 0;

				for (int t = s; t <= last; t++)
				{
					TagKey	   *o = hash_search(tags, &b->tag[t], HASH_FIND, NULL);

					if (o == NULL || o->it == NULL)
						continue;
					if (t > s)
						(void) revoke(w, t);	/* the worker skips them anyway */
					back[nback++] = o->it;
					pending_items++;
					pending_bytes += o->it->buf.len;
					inflight_items--;
					inflight_bytes -= o->it->buf.len;
					o->it = NULL;
					ks->inflight--;
				}
				/* Ahead of what arrived since, in order. */
				while (nback > 0)
					dlist_push_head(&ks->pending, &back[--nback]->node);
				if (ks->queued)
				{
					dlist_delete(&ks->qnode);
					ks->queued = false;
				}
				ks->worker = -1;
				dlist_push_head(&ready_keys, &ks->qnode);
				ks->queued = true;
				gave = true;
			}
			s = last;
		}
		b->open = false;		/* given back what it could: not again */
	}
	return gave ? 0 : next;
}

/*
 * Worker w ran everything it had: it may get a new batch.  The batch's time
 * per item feeds the fill target.
 */
void
eb_sched_worker_ready(int w)
{
	if (w < 0 || w >= nworkers)
		return;
	ready[w] = true;
	if (batches[w].n > 0 && batches[w].sent_at != 0)
	{
		double		us = (double) (GetCurrentTimestamp() - batches[w].sent_at) / batches[w].n;

		item_us = 0.8 * item_us + 0.2 * us;
	}
	batches[w].open = false;
	batches[w].n = 0;
	batches[w].sent_at = 0;
}

/* An item completed (committed or dead-lettered): release its key. */
void
eb_sched_complete(uint64 tag)
{
	TagKey	   *tk = hash_search(tags, &tag, HASH_FIND, NULL);
	KeyState   *ks;

	if (tk == NULL)
		return;
	ks = tk->ks;
	if (tk->it == NULL)
		return;					/* given back: it completes where it runs next */
	inflight_items--;
	inflight_bytes -= tk->it->buf.len;
	pfree(tk->it->buf.data);
	pfree(tk->it);
	hash_search(tags, &tag, HASH_REMOVE, NULL);
	if (--ks->inflight > 0)
		return;
	/* Nothing of the key in flight: it is free to go to any worker. */
	if (ks->queued)
	{
		dlist_delete(&ks->qnode);
		ks->queued = false;
	}
	ks->worker = -1;
	if (dlist_is_empty(&ks->pending))
		hash_search(keys, ks->key, HASH_REMOVE, NULL);
	else
		enqueue_key(ks);
}

/* Items waiting here (not yet given to a worker), and their bytes. */
int64
eb_sched_pending_items(void)
{
	return pending_items;
}

int64
eb_sched_pending_bytes(void)
{
	return pending_bytes;
}

/* Bytes of the items the pool runs, kept until they complete. */
int64
eb_sched_inflight_bytes(void)
{
	return inflight_bytes;
}

/*
 * shmem.c — the extension's shared memory (shmem.h): reserving and creating
 * it, and every access to it.
 *
 * Counters that only grow and the relay's wake-up bits are atomics, so a
 * pool worker finishing a batch or a committing backend takes no lock.  The
 * rest (pids, states, details, latches, the worker and lag tables) sits
 * behind one LWLock: writers take it exclusive for a few stores, readers
 * shared.  No function here can ERROR while holding it, and none is called
 * from a library thread (those only write to the wakeup pipe).
 */
#include "postgres.h"

#include "miscadmin.h"
#include "storage/ipc.h"
#include "storage/lwlock.h"
#include "storage/shmem.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "transport.h"

#define EB_LWLOCK_TRANCHE "eventbus"

EbShared   *eb_shared = NULL;

/* Broker rows this process reports into (launcher: producer, dispatcher: consumer). */
EbBrokerStatus *eb_broker_slots = NULL;

static shmem_request_hook_type prev_shmem_request_hook = NULL;
static shmem_startup_hook_type prev_shmem_startup_hook = NULL;

/* Reserve our shared memory and lock (postmaster, at startup). */
static void
eb_shmem_request(void)
{
	if (prev_shmem_request_hook)
		prev_shmem_request_hook();
	RequestAddinShmemSpace(MAXALIGN(sizeof(EbShared)));
	RequestNamedLWLockTranche(EB_LWLOCK_TRANCHE, 1);
}

static void
init_broker(EbBrokerStatus *st)
{
	pg_atomic_init_u64(&st->published, 0);
	pg_atomic_init_u64(&st->failed, 0);
	pg_atomic_init_u64(&st->rounds, 0);
}

static void
init_worker(EbWorkerStatus *w)
{
	w->pid = 0;
	w->since = 0;
	w->queued = 0;
	pg_atomic_init_u64(&w->handled, 0);
	pg_atomic_init_u64(&w->duplicates, 0);
	pg_atomic_init_u64(&w->failed, 0);
	pg_atomic_init_u64(&w->dead_lettered, 0);
	pg_atomic_init_u64(&w->busy_us, 0);
	pg_atomic_init_u64(&w->given_back, 0);
}

/* Create or attach our shared memory. */
static void
eb_shmem_startup(void)
{
	bool		found;

	if (prev_shmem_startup_hook)
		prev_shmem_startup_hook();

	LWLockAcquire(AddinShmemInitLock, LW_EXCLUSIVE);
	eb_shared = ShmemInitStruct("eventbus", sizeof(EbShared), &found);
	if (!found)
	{
		memset(eb_shared, 0, sizeof(EbShared));
		eb_shared->lock = &(GetNamedLWLockTranche(EB_LWLOCK_TRANCHE))->lock;
		pg_atomic_init_u32(&eb_shared->relay_pending, 0);
		pg_atomic_init_u64(&eb_shared->subs_generation, 0);
		pg_atomic_init_u32(&eb_shared->launcher_check_database, 0);
		pg_atomic_init_u32(&eb_shared->database_release_pid, 0);
		for (int t = 0; t < EB_NTRANSPORTS; t++)
		{
			init_broker(&eb_shared->producer[t]);
			init_broker(&eb_shared->consumer[t]);
			pg_atomic_init_u64(&eb_shared->counters[t].published, 0);
			pg_atomic_init_u64(&eb_shared->counters[t].consumed, 0);
			pg_atomic_init_u64(&eb_shared->counters[t].quarantined, 0);
			pg_atomic_init_u64(&eb_shared->counters[t].topic_lookups, 0);
		}
		for (int w = 0; w < EB_MAX_WORKERS; w++)
			init_worker(&eb_shared->workers[w]);
	}
	LWLockRelease(AddinShmemInitLock);
}

/* Called from _PG_init when preloaded. */
void
eb_shmem_install_hooks(void)
{
	prev_shmem_request_hook = shmem_request_hook;
	shmem_request_hook = eb_shmem_request;
	prev_shmem_startup_hook = shmem_startup_hook;
	shmem_startup_hook = eb_shmem_startup;
}

static void
copy_atomic(pg_atomic_uint64 *dst, pg_atomic_uint64 *src)
{
	pg_atomic_init_u64(dst, pg_atomic_read_u64(src));
}

/*
 * Copy the whole state for eventbus_status(): the locked fields as one
 * consistent snapshot, then each counter read atomically into the copy.
 */
void
eb_shmem_snapshot(EbShared *out)
{
	LWLockAcquire(eb_shared->lock, LW_SHARED);
	memcpy(out, eb_shared, sizeof(EbShared));
	LWLockRelease(eb_shared->lock);

	/* The counters memcpy saw may be mid-update: read each one properly. */

	out->lock = NULL;
	pg_atomic_init_u32(&out->relay_pending, pg_atomic_read_u32(&eb_shared->relay_pending));
	copy_atomic(&out->subs_generation, &eb_shared->subs_generation);
	pg_atomic_init_u32(&out->launcher_check_database,
					   pg_atomic_read_u32(&eb_shared->launcher_check_database));
	pg_atomic_init_u32(&out->database_release_pid,
					   pg_atomic_read_u32(&eb_shared->database_release_pid));
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		copy_atomic(&out->producer[t].published, &eb_shared->producer[t].published);
		copy_atomic(&out->producer[t].failed, &eb_shared->producer[t].failed);
		copy_atomic(&out->consumer[t].published, &eb_shared->consumer[t].published);
		copy_atomic(&out->consumer[t].failed, &eb_shared->consumer[t].failed);
		copy_atomic(&out->counters[t].published, &eb_shared->counters[t].published);
		copy_atomic(&out->counters[t].consumed, &eb_shared->counters[t].consumed);
		copy_atomic(&out->counters[t].quarantined, &eb_shared->counters[t].quarantined);
		copy_atomic(&out->counters[t].topic_lookups, &eb_shared->counters[t].topic_lookups);
	}
	for (int w = 0; w < EB_MAX_WORKERS; w++)
	{
		copy_atomic(&out->workers[w].handled, &eb_shared->workers[w].handled);
		copy_atomic(&out->workers[w].duplicates, &eb_shared->workers[w].duplicates);
		copy_atomic(&out->workers[w].failed, &eb_shared->workers[w].failed);
		copy_atomic(&out->workers[w].dead_lettered, &eb_shared->workers[w].dead_lettered);
		copy_atomic(&out->workers[w].busy_us, &eb_shared->workers[w].busy_us);
		copy_atomic(&out->workers[w].given_back, &eb_shared->workers[w].given_back);
	}
}

/* Publish (or clear, pid 0) the launcher's presence. */
void
eb_shmem_set_launcher(pid_t pid, Latch *latch, bool ready)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->launcher_pid = pid;
	eb_shared->launcher_since = now;
	eb_shared->relay_latch = latch;
	eb_shared->extension_ready = ready;
	LWLockRelease(eb_shared->lock);
}

void
eb_shmem_set_extension_ready(bool ready)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->extension_ready = ready;
	LWLockRelease(eb_shared->lock);
}

/* The launcher waits for eventbus.database, and why (NULL: it does not). */
void
eb_shmem_set_launcher_waiting(const char *why)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	strlcpy(eb_shared->launcher_waiting, why ? why : "", sizeof(eb_shared->launcher_waiting));
	LWLockRelease(eb_shared->lock);
}

/*
 * Whether the next launcher checks that eventbus.database exists before it
 * connects (its last connection failed, or it left for DROP DATABASE); set
 * from an exit callback, so an atomic (no lock on the way out).
 */
void
eb_shmem_set_check_database(bool check)
{
	pg_atomic_write_u32(&eb_shared->launcher_check_database, check ? 1 : 0);
}

bool
eb_shmem_check_database(void)
{
	return pg_atomic_read_u32(&eb_shared->launcher_check_database) != 0;
}

/* A backend is about to drop or rename eventbus.database: eventbus stays out. */
void
eb_shmem_set_database_release(pid_t pid)
{
	pg_atomic_write_u32(&eb_shared->database_release_pid, (uint32) pid);
}

/* That backend's transaction ended (only its own mark is cleared). */
void
eb_shmem_end_database_release(pid_t pid)
{
	uint32		expected = (uint32) pid;

	(void) pg_atomic_compare_exchange_u32(&eb_shared->database_release_pid, &expected, 0);
}

/* The backend dropping or renaming eventbus.database, or 0. */
pid_t
eb_shmem_database_release(void)
{
	return eb_shared ? (pid_t) pg_atomic_read_u32(&eb_shared->database_release_pid) : 0;
}

/* A latch pointer read under the lock (its owner clears it on exit). */
static Latch *
read_latch(Latch **slot)
{
	Latch	   *latch;

	if (eb_shared == NULL)
		return NULL;
	LWLockAcquire(eb_shared->lock, LW_SHARED);
	latch = *slot;
	LWLockRelease(eb_shared->lock);
	return latch;
}

/* The relay's latch, or NULL when no launcher runs. */
Latch *
eb_shmem_relay_latch(void)
{
	return eb_shared ? read_latch(&eb_shared->relay_latch) : NULL;
}

/* The dispatcher's latch, or NULL when no dispatcher runs. */
Latch *
eb_shmem_dispatcher_latch(void)
{
	return eb_shared ? read_latch(&eb_shared->dispatcher_latch) : NULL;
}

/* Note that these transports (bit per transport) have newly committed rows. */
void
eb_shmem_mark_relay_pending(uint32 transports)
{
	if (eb_shared)
		pg_atomic_fetch_or_u32(&eb_shared->relay_pending, transports);
}

/* The transports marked since the last call, clearing them. */
uint32
eb_shmem_take_relay_pending(void)
{
	return pg_atomic_exchange_u32(&eb_shared->relay_pending, 0);
}

/* Count a relay round's outcome for one transport. */
void
eb_shmem_add_published(int transport, uint64 ok, uint64 failed)
{
	EbBrokerStatus *st = &eb_shared->producer[transport];

	if (ok > 0)
		pg_atomic_fetch_add_u64(&st->published, (int64) ok);
	if (failed > 0)
		pg_atomic_fetch_add_u64(&st->failed, (int64) failed);
}

/* A message size limit the launcher learned from a transport's broker. */
void
eb_shmem_set_max_message(int transport, int64 limit)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->max_message[transport] = limit;
	LWLockRelease(eb_shared->lock);
}

/* That limit; 0 while not known. */
int64
eb_shmem_max_message(int transport)
{
	int64		v;

	if (eb_shared == NULL)
		return 0;
	LWLockAcquire(eb_shared->lock, LW_SHARED);
	v = eb_shared->max_message[transport];
	LWLockRelease(eb_shared->lock);
	return v;
}

/* Publish the dispatcher's presence. */
void
eb_shmem_set_dispatcher(pid_t pid, Latch *latch)
{
	TimestampTz now = GetCurrentTimestamp();

	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->dispatcher_pid = pid;
	eb_shared->dispatcher_since = now;
	eb_shared->dispatcher_latch = latch;
	LWLockRelease(eb_shared->lock);
}

/* The dispatcher exits: no latch, no lag, its consumers off. */
void
eb_shmem_clear_dispatcher(void)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->dispatcher_pid = 0;
	eb_shared->dispatcher_latch = NULL;
	eb_shared->nsubs = 0;
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		eb_shared->consumer[t].state = EB_BROKER_OFF;
	LWLockRelease(eb_shared->lock);
}

/* Subscriptions changed: the dispatcher reloads them. */
void
eb_shmem_bump_subs_generation(void)
{
	if (eb_shared)
		pg_atomic_fetch_add_u64(&eb_shared->subs_generation, 1);
}

uint64
eb_shmem_subs_generation(void)
{
	return pg_atomic_read_u64(&eb_shared->subs_generation);
}

/* A new pool of nworkers: every worker row starts empty. */
void
eb_shmem_reset_workers(int nworkers)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->nworkers = Min(nworkers, EB_MAX_WORKERS);
	for (int w = 0; w < EB_MAX_WORKERS; w++)
	{
		EbWorkerStatus *ws = &eb_shared->workers[w];

		/* The counters go on: they count from server start. */
		ws->pid = 0;
		ws->since = 0;
		ws->queued = 0;
	}
	LWLockRelease(eb_shared->lock);
}

/* Queue depth per worker, and how many lag rows follow (eb_shmem_set_lag). */
void
eb_shmem_set_queued(const int *queued, int nworkers, int nsubs)
{
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	for (int w = 0; w < nworkers && w < EB_MAX_WORKERS; w++)
		eb_shared->workers[w].queued = queued[w];
	eb_shared->nsubs = Min(nsubs, EB_MAX_SUB_STATUS);
	LWLockRelease(eb_shared->lock);
}

/* Lag row i: a subscription's events in flight plus those waiting in the broker, and its share. */
void
eb_shmem_set_lag(int i, int64 subscription_id, int64 lag, int32 share)
{
	if (i < 0 || i >= EB_MAX_SUB_STATUS)
		return;
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->subs[i].id = subscription_id;
	eb_shared->subs[i].lag = lag;
	eb_shared->subs[i].share = share;
	LWLockRelease(eb_shared->lock);
}

/* A pool worker came up. */
void
eb_shmem_worker_started(int worker, pid_t pid)
{
	TimestampTz now = GetCurrentTimestamp();

	if (worker < 0 || worker >= EB_MAX_WORKERS)
		return;
	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	eb_shared->workers[worker].pid = pid;
	eb_shared->workers[worker].since = now;
	LWLockRelease(eb_shared->lock);
}

/* The dispatcher took an item back from a worker (scheduler.c). */
void
eb_shmem_worker_given_back(int worker)
{
	if (worker >= 0 && worker < EB_MAX_WORKERS)
		pg_atomic_fetch_add_u64(&eb_shared->workers[worker].given_back, 1);
}

/* Add a batch's outcomes to a worker slot's counters. */
void
eb_shmem_worker_counts(int worker, uint64 handled, uint64 duplicates, uint64 failed,
					   uint64 dead_lettered, uint64 busy_us)
{
	EbWorkerStatus *w;

	if (worker < 0 || worker >= EB_MAX_WORKERS)
		return;
	w = &eb_shared->workers[worker];
	if (handled > 0)
		pg_atomic_fetch_add_u64(&w->handled, (int64) handled);
	if (duplicates > 0)
		pg_atomic_fetch_add_u64(&w->duplicates, (int64) duplicates);
	if (failed > 0)
		pg_atomic_fetch_add_u64(&w->failed, (int64) failed);
	if (dead_lettered > 0)
		pg_atomic_fetch_add_u64(&w->dead_lettered, (int64) dead_lettered);
	pg_atomic_fetch_add_u64(&w->busy_us, (int64) busy_us);
}

/* Events a transaction committed to the outbox. */
void
eb_shmem_count_published(int transport, uint64 n)
{
	if (eb_shared && n > 0)
		pg_atomic_fetch_add_u64(&eb_shared->counters[transport].published, (int64) n);
}

/* Messages the dispatcher received. */
void
eb_shmem_count_consumed(int transport, uint64 n)
{
	pg_atomic_fetch_add_u64(&eb_shared->counters[transport].consumed, (int64) n);
}

/* A metadata request for subscribed topics' partitions was started. */
void
eb_shmem_count_topic_lookup(int transport)
{
	pg_atomic_fetch_add_u64(&eb_shared->counters[transport].topic_lookups, 1);
}

/* Messages written to eventbus.quarantine. */
void
eb_shmem_count_quarantined(int transport, uint64 n)
{
	pg_atomic_fetch_add_u64(&eb_shared->counters[transport].quarantined, (int64) n);
}

/* Name of a broker state. */
const char *
eb_broker_state_name(EbBrokerState state)
{
	switch (state)
	{
		case EB_BROKER_OFF:
			return "off";
		case EB_BROKER_CONNECTING:
			return "connecting";
		case EB_BROKER_CONNECTED:
			return "connected";
		case EB_BROKER_DOWN:
			return "down";
	}
	return "unknown";
}

/*
 * Record a broker client's connection state; log once per change, never per
 * attempt, so an outage does not flood the server log.
 */
void
eb_set_broker_state(int transport, EbBrokerState state, const char *detail)
{
	EbBrokerStatus *st;
	TimestampTz now = GetCurrentTimestamp();
	bool		changed;

	if (eb_broker_slots == NULL)
		return;
	st = &eb_broker_slots[transport];
	/* Status and log show URLs without their user:password (may ERROR: before the lock). */
	if (detail)
		detail = eb_mask_credentials(detail);

	LWLockAcquire(eb_shared->lock, LW_EXCLUSIVE);
	changed = st->state != state;
	if (changed)
	{
		st->state = state;
		st->since = now;
	}
	if (detail)
		strlcpy(st->detail, detail, sizeof(st->detail));
	LWLockRelease(eb_shared->lock);

	if (!changed)
		return;
	if (state == EB_BROKER_DOWN)
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("%s is unreachable, retrying with backoff",
						eb_transport_name(transport)),
				 detail ? errdetail("%s", detail) : 0));
	else
		ereport(LOG,
				(errmsg("%s %s", eb_transport_name(transport),
						eb_broker_state_name(state)),
				 detail ? errdetail("%s", detail) : 0));
}

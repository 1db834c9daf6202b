/*
 * shmem.h — the extension's shared memory: what eventbus_status() reports
 * and the latches a committing backend sets.
 *
 * Monotonic counters and the wake-up bits are atomics, bumped without a
 * lock; every other field is guarded by one LWLock that only shmem.c takes
 * (the accessors below), never across anything that can ERROR and never on
 * a library thread.  Needs eventbus.h's transport ids (EB_NTRANSPORTS).
 */
#ifndef EB_SHMEM_H
#define EB_SHMEM_H

#include "datatype/timestamp.h"
#include "port/atomics.h"
#include "storage/latch.h"
#include "storage/lwlock.h"

#define EB_DETAIL_LEN		256
#define EB_MAX_WORKERS		64
#define EB_MAX_SUB_STATUS	128

/* Connection state of one broker client, as shown by eventbus_status(). */
typedef enum EbBrokerState
{
	EB_BROKER_OFF = 0,			/* not configured */
	EB_BROKER_CONNECTING,		/* configured, first connection not yet made */
	EB_BROKER_CONNECTED,
	EB_BROKER_DOWN				/* was configured, unreachable: retrying */
} EbBrokerState;

typedef struct EbBrokerStatus
{
	/* under the lock */
	EbBrokerState state;
	TimestampTz since;			/* when state last changed */
	char		detail[EB_DETAIL_LEN];	/* last error or endpoint */
	/* atomic */
	pg_atomic_uint64 published; /* events acknowledged by the broker */
	pg_atomic_uint64 failed;	/* delivery attempts that failed */
	pg_atomic_uint64 rounds;	/* relay rounds that sent events */
} EbBrokerStatus;

/*
 * One pool worker slot, as shown by eventbus_status() and eventbus.metrics.
 * Its counters run from server start, across pool restarts.
 */
typedef struct EbWorkerStatus
{
	/* under the lock */
	pid_t		pid;
	TimestampTz since;
	int			queued;			/* items sent to it and not yet completed */
	/* atomic */
	pg_atomic_uint64 handled;	/* handler committed */
	pg_atomic_uint64 duplicates;	/* skipped: already in the inbox */
	pg_atomic_uint64 failed;	/* handler failures (each attempt) */
	pg_atomic_uint64 dead_lettered;
	pg_atomic_uint64 busy_us;	/* time spent running batches */
	pg_atomic_uint64 given_back;	/* items taken back to run on another worker */
} EbWorkerStatus;

/* Per transport, from server start (eventbus.metrics). */
typedef struct EbTransportCounters
{
	pg_atomic_uint64 published; /* events committed to the outbox */
	pg_atomic_uint64 consumed;	/* messages the dispatcher received */
	pg_atomic_uint64 quarantined;	/* of those, written to eventbus.quarantine */
	pg_atomic_uint64 topic_lookups; /* metadata requests for topics' partitions */
} EbTransportCounters;

/* Lag of one subscription, written by the dispatcher. */
typedef struct EbSubStatus
{
	int64		id;
	int64		lag;			/* in flight + waiting in the broker, when known */
	int32		share;			/* consumer_share of its topic, -1 unknown */
} EbSubStatus;

typedef struct EbShared
{
	LWLock	   *lock;			/* guards every field that is not atomic */

	/* atomic */
	pg_atomic_uint32 relay_pending; /* bit per transport with newly committed rows */
	pg_atomic_uint64 subs_generation;	/* bumped when subscriptions change */
	pg_atomic_uint32 launcher_check_database;	/* launcher: check that eventbus.database exists before connecting */
	pg_atomic_uint32 database_release_pid;	/* backend dropping or renaming eventbus.database */
	EbTransportCounters counters[EB_NTRANSPORTS];

	/* under the lock */
	pid_t		launcher_pid;
	TimestampTz launcher_since;
	bool		extension_ready;	/* launcher saw the extension installed */
	char		launcher_waiting[EB_DETAIL_LEN];	/* why it waits for the database, "" if connected */
	Latch	   *relay_latch;	/* set at commit by publishers */
	int64		max_message[EB_NTRANSPORTS];	/* learned from the broker, 0 = not known */
	EbBrokerStatus producer[EB_NTRANSPORTS];

	pid_t		dispatcher_pid;
	TimestampTz dispatcher_since;
	Latch	   *dispatcher_latch;	/* set at commit by (un)subscribers */
	EbBrokerStatus consumer[EB_NTRANSPORTS];
	int			nworkers;
	EbWorkerStatus workers[EB_MAX_WORKERS];
	int			nsubs;
	EbSubStatus subs[EB_MAX_SUB_STATUS];
} EbShared;

/* NULL unless the library was preloaded. */
extern EbShared *eb_shared;

extern void eb_shmem_install_hooks(void);

/* A consistent copy for eventbus_status(); read its atomics with pg_atomic_read_u64. */
extern void eb_shmem_snapshot(EbShared *out);

/* launcher and relay */
extern void eb_shmem_set_launcher(pid_t pid, Latch *latch, bool ready);
extern void eb_shmem_set_extension_ready(bool ready);
extern void eb_shmem_set_launcher_waiting(const char *why);
extern void eb_shmem_set_check_database(bool check);
extern bool eb_shmem_check_database(void);
extern void eb_shmem_set_database_release(pid_t pid);
extern void eb_shmem_end_database_release(pid_t pid);
extern pid_t eb_shmem_database_release(void);
extern Latch *eb_shmem_relay_latch(void);
extern void eb_shmem_mark_relay_pending(uint32 transports);
extern uint32 eb_shmem_take_relay_pending(void);
extern void eb_shmem_add_published(int transport, uint64 ok, uint64 failed);
extern void eb_shmem_set_max_message(int transport, int64 limit);
extern int64 eb_shmem_max_message(int transport);

/* dispatcher and pool */
extern void eb_shmem_set_dispatcher(pid_t pid, Latch *latch);
extern void eb_shmem_clear_dispatcher(void);
extern Latch *eb_shmem_dispatcher_latch(void);
extern void eb_shmem_bump_subs_generation(void);
extern uint64 eb_shmem_subs_generation(void);
extern void eb_shmem_reset_workers(int nworkers);
extern void eb_shmem_set_queued(const int *queued, int nworkers, int nsubs);
extern void eb_shmem_set_lag(int i, int64 subscription_id, int64 lag, int32 share);
extern void eb_shmem_worker_started(int worker, pid_t pid);
extern void eb_shmem_worker_given_back(int worker);
extern void eb_shmem_worker_counts(int worker, uint64 handled, uint64 duplicates,
								   uint64 failed, uint64 dead_lettered, uint64 busy_us);
extern void eb_shmem_count_published(int transport, uint64 n);
extern void eb_shmem_count_consumed(int transport, uint64 n);
extern void eb_shmem_count_topic_lookup(int transport);
extern void eb_shmem_count_quarantined(int transport, uint64 n);

/* Broker connection state (this process's rows: launcher producer, dispatcher consumer). */
extern EbBrokerStatus *eb_broker_slots;
extern void eb_set_broker_state(int transport, EbBrokerState state,
								const char *detail);
extern const char *eb_broker_state_name(EbBrokerState state);

#endif							/* EB_SHMEM_H */

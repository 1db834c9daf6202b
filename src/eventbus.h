/*
 * eventbus.h — module lifecycle and shared state: what every eventbus
 * process shares (eventbus.c, launcher.c, status.c, wakeup.c, bounded.c).
 * Each layer has its own header: guc.h, envelope.h, transport.h (and the
 * transports' own kafka_client.h / nats_client.h), relay.h, pool.h,
 * privilege.h, util.h.
 *
 * Process model: a static "launcher" background worker connects to
 * eventbus.database, waits for CREATE EXTENSION, owns the producers and runs
 * the outbox relay, and starts the dispatcher, which runs the consumers and
 * the pool of handler workers.  Shared memory holds what eventbus_status()
 * reports and the latches committing transactions set to wake them.
 */
#ifndef EVENTBUS_H
#define EVENTBUS_H

#include "postgres.h"

#include "fmgr.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"
#include "storage/spin.h"

/* Transports are numbered 0 .. EB_NTRANSPORTS - 1 (transport.h). */
#define EB_NTRANSPORTS		2

#define EB_DETAIL_LEN		256

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
	EbBrokerState state;
	TimestampTz since;			/* when state last changed */
	uint64		published;		/* events acknowledged by the broker */
	uint64		failed;			/* delivery attempts that failed */
	char		detail[EB_DETAIL_LEN];	/* last error or endpoint */
} EbBrokerStatus;

#define EB_MAX_WORKERS		64
#define EB_MAX_SUB_STATUS	128

/* One pool worker, as shown by eventbus_status(). */
typedef struct EbWorkerStatus
{
	pid_t		pid;
	TimestampTz since;
	uint64		processed;		/* events handled (or skipped as already handled) */
	uint64		failed;			/* handler failures (each attempt) */
	uint64		dead_lettered;
	int			queued;			/* items sent to it and not yet completed */
} EbWorkerStatus;

/* Lag of one subscription, written by the dispatcher. */
typedef struct EbSubStatus
{
	int64		id;
	int64		lag;			/* in flight + waiting in the broker, when known */
} EbSubStatus;

typedef struct EbShared
{
	slock_t		mutex;			/* protects everything below */
	pid_t		launcher_pid;
	TimestampTz launcher_since;
	bool		extension_ready;	/* launcher saw the extension installed */
	Latch	   *relay_latch;	/* set at commit by publishers */
	uint32		relay_pending;	/* bit per transport with newly committed rows */
	int64		nats_max_payload;	/* server's max_payload, 0 = not yet known */
	EbBrokerStatus producer[EB_NTRANSPORTS];

	uint64		subs_generation;	/* bumped when subscriptions change */
	pid_t		dispatcher_pid;
	TimestampTz dispatcher_since;
	Latch	   *dispatcher_latch;	/* set at commit by (un)subscribers */
	EbBrokerStatus consumer[EB_NTRANSPORTS];
	int			nworkers;
	EbWorkerStatus workers[EB_MAX_WORKERS];
	int			nsubs;
	EbSubStatus subs[EB_MAX_SUB_STATUS];
} EbShared;

/* eventbus.c */
extern EbShared *eb_shared;
extern bool eb_preloaded;
extern void eb_require_preload(void);
extern void eb_worker_connect(const char *appname);
extern bool eb_worker_loop_top(MemoryContext loop_cxt);
struct BackgroundWorker;
extern void eb_bgworker_init(struct BackgroundWorker *w, const char *function,
							 const char *name, const char *type);
extern void eb_wake_relay(void);
extern void eb_wake_dispatcher(void);
extern void eb_wake_at_commit(int relay_transport, bool dispatcher);

/* status.c */
extern EbBrokerStatus *eb_broker_slots;	/* this process's broker rows */
extern const char *eb_log_prefix;	/* "eventbus" or "eventbus consumer" */
extern void eb_set_broker_state(int transport, EbBrokerState state,
								const char *detail);
extern const char *eb_broker_state_name(EbBrokerState state);

/* wakeup.c: the pipe library threads write to, to wake the main thread */
struct WaitEventSet;
extern void eb_wakeup_init(void);
extern struct WaitEventSet *eb_wakeup_wait_set(void);
extern int	eb_wakeup_fd(void);
extern void eb_wakeup_drain(void);
extern void eb_wakeup_signal(void);
extern int	eb_wakeup_write_fd(void);

/* bounded.c: a library teardown call on a helper thread, with a deadline */
extern bool eb_run_bounded(void (*fn) (void *), void *arg, int timeout_ms);

/*
 * What PostgreSQL looks up by name, the only symbols the library exports:
 * _PG_init, the SQL functions and the background worker entry points.
 */
extern PGDLLEXPORT void _PG_init(void);
extern PGDLLEXPORT Datum eventbus_publish(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_subscribe(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_unsubscribe(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_replay_dead_letter(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_dead_letters(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_status(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_retry_undeliverable(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_discard_undeliverable(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_undeliverable(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_check_message(PG_FUNCTION_ARGS);
extern PGDLLEXPORT Datum eventbus_decode_message(PG_FUNCTION_ARGS);
extern PGDLLEXPORT void eventbus_launcher_main(Datum main_arg);
extern PGDLLEXPORT void eventbus_dispatcher_main(Datum main_arg);
extern PGDLLEXPORT void eventbus_worker_main(Datum main_arg);

#endif							/* EVENTBUS_H */

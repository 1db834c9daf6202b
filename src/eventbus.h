/*
 * eventbus.h — module lifecycle and shared state: what every eventbus
 * process shares (eventbus.c, launcher.c, wakeup.c, bounded.c; shared memory in shmem.h).
 * Each layer has its own header: shmem.h, guc.h, envelope.h, transport.h (and the
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

#include <signal.h>

#include "fmgr.h"

#include "datatype/timestamp.h"
#include "storage/latch.h"

/* The version of this library (its newest SQL script). */
#define EB_LIBRARY_VERSION	"0.2.0"

/* Transports are numbered 0 .. EB_NTRANSPORTS - 1 (transport.h). */
#define EB_NTRANSPORTS		2

#include "shmem.h"

/* eventbus.c */
extern bool eb_preloaded;
extern void eb_require_preload(void);
extern void eb_worker_connect(const char *appname);
extern volatile sig_atomic_t eb_stop_requested;
extern void eb_stop_by_draining(void);
extern bool eb_worker_loop_top(MemoryContext loop_cxt);
extern long eb_worker_report_stats(long timeout);
struct BackgroundWorker;
extern void eb_bgworker_init(struct BackgroundWorker *w, const char *function,
							 const char *name, const char *type);
extern void eb_wake_relay(void);
extern void eb_wake_dispatcher(void);
extern void eb_wake_at_commit(int relay_transport, bool dispatcher);
extern void eb_published_at_commit(int transport);

/* launcher_db.c: the launcher's connection to eventbus.database, DROP / RENAME DATABASE of it */
extern void eb_launcher_connect(void);
extern bool eb_launcher_must_release(void);
extern void eb_install_database_guard(void);

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
extern bool eb_thread_start(void *(*main) (void *), void *arg);

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
extern PGDLLEXPORT Datum eventbus_metrics(PG_FUNCTION_ARGS);
extern PGDLLEXPORT void eventbus_launcher_main(Datum main_arg);
extern PGDLLEXPORT void eventbus_dispatcher_main(Datum main_arg);
extern PGDLLEXPORT void eventbus_worker_main(Datum main_arg);

#endif							/* EVENTBUS_H */

/*
 * launcher.c — the eventbus launcher background worker: connect to
 * eventbus.database (launcher_db.c: also when it is missing or dropped),
 * wait until the extension exists, run the outbox relay, reload on SIGHUP,
 * stop cleanly on SIGTERM.
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "relay.h"
#include "transport.h"
#include "util.h"

/*
 * The versions of the extension's SQL this library runs with.  A newer one
 * means ALTER EXTENSION ran before PostgreSQL was restarted with the new
 * library: the old code must not run against it.
 */
static const char *const supported_versions[] = {"0.1.0", "0.2.0", NULL};

/* While the extension runs, how often the launcher looks whether it still does. */
#define EXT_CHECK_READY_MS	5000

typedef enum ExtensionState
{
	EXT_ABSENT,
	EXT_READY,
	EXT_NEWER					/* SQL newer than this library */
} ExtensionState;

/* Is the extension installed in our database, and in a version we support? */
static ExtensionState
extension_state(char **version)
{
	static SPIPlanPtr plan = NULL;
	ExtensionState state = EXT_ABSENT;
	MemoryContext cxt = eb_xact_begin();

	/* Prepared once: it runs every few seconds, idle or not. */
	*version = NULL;
	if (SPI_execute_plan(eb_keep_plan(&plan, "SELECT extversion FROM pg_catalog.pg_extension"
									  " WHERE extname OPERATOR(pg_catalog.=) 'eventbus'", 0, NULL),
						 NULL, NULL, true, 1) == SPI_OK_SELECT &&
		SPI_processed == 1)
	{
		char	   *v = SPI_getvalue(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1);

		state = EXT_NEWER;
		for (int i = 0; supported_versions[i]; i++)
			if (v && strcmp(v, supported_versions[i]) == 0)
				state = EXT_READY;
		*version = MemoryContextStrdup(cxt, v ? v : "");
	}
	eb_xact_end(cxt);
	return state;
}

/* Publish (or clear) the launcher's presence in shared memory. */
static void
set_launcher(pid_t pid, Latch *latch, bool ready)
{
	eb_shmem_set_launcher(pid, latch, ready);
}

static BackgroundWorkerHandle *dispatcher = NULL;
static TimestampTz dispatcher_next_start = 0;
static int	dispatcher_backoff_ms = 0;
static TimestampTz dispatcher_started = 0;

/* Start the dispatcher if it is not running (with backoff after failures). */
static void
ensure_dispatcher(void)
{
	BackgroundWorker w;
	pid_t		pid;
	MemoryContext old;
	bool		registered;

	if (dispatcher != NULL)
	{
		if (GetBackgroundWorkerPid(dispatcher, &pid) != BGWH_STOPPED)
			return;
		pfree(dispatcher);
		dispatcher = NULL;
		/* It stopped on its own: wait before the next start (1 s doubling to 30 s; reset after a minute of health). */
		if (GetCurrentTimestamp() > TimestampTzPlusMilliseconds(dispatcher_started, 60 * 1000))
			dispatcher_backoff_ms = 0;
		dispatcher_backoff_ms = eb_backoff_next(dispatcher_backoff_ms, 1000, 30000);
		dispatcher_next_start = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), dispatcher_backoff_ms);
	}
	if (GetCurrentTimestamp() < dispatcher_next_start)
		return;

	eb_bgworker_init(&w, "eventbus_dispatcher_main", "eventbus dispatcher", "eventbus dispatcher");
	dispatcher_started = GetCurrentTimestamp();
	/* The handle must outlive the loop's memory. */
	old = MemoryContextSwitchTo(TopMemoryContext);
	registered = RegisterDynamicBackgroundWorker(&w, &dispatcher);
	MemoryContextSwitchTo(old);
	if (!registered)
	{
		dispatcher = NULL;
		dispatcher_next_start = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 5000);
		ereport(WARNING,
				(errcode(ERRCODE_CONFIGURATION_LIMIT_EXCEEDED),
				 errmsg("could not start the dispatcher"),
				 errhint("Raise max_worker_processes (eventbus needs eventbus.workers + 2).")));
	}
}

/* Stop the dispatcher (and with it the pool). */
static void
stop_dispatcher(void)
{
	if (dispatcher == NULL)
		return;
	TerminateBackgroundWorker(dispatcher);
	(void) WaitForBackgroundWorkerShutdown(dispatcher);
	pfree(dispatcher);
	dispatcher = NULL;
	dispatcher_backoff_ms = 0;
	dispatcher_next_start = 0;
}

/* On exit: close broker connections and leave shared memory clean. */
static void
launcher_exit(int code, Datum arg)
{
	if (dispatcher)
		TerminateBackgroundWorker(dispatcher);
	eb_relay_shutdown();
	eb_transports_close_libraries();
	set_launcher(0, NULL, false);
}

/* Main entry point of the launcher worker. */
void
eventbus_launcher_main(Datum main_arg)
{
	WaitEventSet *wes;
	bool		ready = false;
	ExtensionState last = EXT_ABSENT;
	char	   *version = NULL;
	MemoryContext loop_cxt;
	TimestampTz checked_at = 0;
	bool		relay_failed = false;

	eb_launcher_connect();

	/*
	 * The relay's own writes (deleting acknowledged rows, noting failures)
	 * need not wait for the WAL flush: one lost in a crash only makes the
	 * relay send those events again, which the at-least-once delivery to
	 * the broker already allows (and the inbox and JetStream's duplicate
	 * window absorb).  The publishers' and the pool's commits are flushed
	 * whatever synchronous_commit says (ForceSyncCommit).
	 */
	SetConfigOption("synchronous_commit", "off", PGC_SUSET, PGC_S_OVERRIDE);

	/*
	 * The outbox is a queue: autovacuum often finds it (nearly) empty, and
	 * the planner then believes it is, and deletes a round's acknowledged
	 * rows by a sequential scan over all its dead space (measured: 29 % of
	 * the relay's CPU in a NATS burst).  Every statement the relay runs on
	 * a big table has an index for it: never scan sequentially where an
	 * index can serve.
	 */
	SetConfigOption("enable_seqscan", "off", PGC_SUSET, PGC_S_OVERRIDE);

	set_launcher(MyProcPid, MyLatch, false);
	before_shmem_exit(launcher_exit, (Datum) 0);

	eb_broker_slots = eb_shared->producer;
	wes = eb_wakeup_wait_set();
	eb_relay_init();

	ereport(LOG, (errmsg("eventbus launcher started for database \"%s\"", eb_database)));
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus launcher loop",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		WaitEvent	event;
		long		timeout = 1000;
		ExtensionState ext;

		(void) eb_worker_loop_top(loop_cxt);

		/* DROP DATABASE or RENAME of our database waits for us to leave. */
		if (eb_launcher_must_release())
		{
			ereport(LOG,
					(errcode(ERRCODE_ADMIN_SHUTDOWN),
					 errmsg("eventbus.database \"%s\" is being dropped, renamed, moved or copied, the launcher disconnects from it",
							eb_database)));
			proc_exit(1);
		}

		/*
		 * A catalog look-up, not on every commit's wake-up: every second
		 * while the extension is absent, every EXT_CHECK_READY_MS while it
		 * runs, and at once after the relay failed (a DROP EXTENSION fails
		 * the relay's next statement).
		 */
		if (!ready || relay_failed ||
			GetCurrentTimestamp() >= TimestampTzPlusMilliseconds(checked_at, EXT_CHECK_READY_MS))
		{
			ext = extension_state(&version);
			checked_at = GetCurrentTimestamp();
			relay_failed = false;
		}
		else
			ext = last;
		if (ext != last)
		{
			last = ext;
			ready = ext == EXT_READY;
			eb_shmem_set_extension_ready(ready);
			if (ready)
				ereport(LOG, (errmsg("extension found, starting relay")));
			else
			{
				if (ext == EXT_NEWER)
					ereport(LOG,
							(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
							 errmsg("extension eventbus is at version %s, which this eventbus library (%s) does not run; relay and consumers stopped",
									version, EB_LIBRARY_VERSION),
							 errhint("Restart PostgreSQL to load the library installed with that version.")));
				else
					ereport(LOG, (errmsg("extension not installed, waiting for CREATE EXTENSION eventbus")));
				stop_dispatcher();
				eb_relay_shutdown();
			}
		}

		if (ready)
		{
			ensure_dispatcher();
			timeout = eb_relay_step(&relay_failed);
		}
		if (timeout > 0)
		{
			uint64		sent = 0;

			for (int t = 0; t < EB_NTRANSPORTS; t++)
				sent += pg_atomic_read_u64(&eb_broker_slots[t].published);
			eb_heap_trim_after_burst(sent);
		}

		pgstat_report_activity(STATE_IDLE, NULL);
		timeout = eb_worker_report_stats(timeout);
		(void) WaitEventSetWait(wes, timeout, &event, 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		eb_wakeup_drain();
	}
}

/*
 * launcher.c — the eventbus launcher background worker: connect to
 * eventbus.database, wait until the extension exists, run the outbox relay,
 * reload on SIGHUP, stop cleanly on SIGTERM.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/extension.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "relay.h"
#include "transport.h"
#include "util.h"

/* Is the extension installed in our database? */
static bool
extension_installed(void)
{
	bool		found;
	MemoryContext cxt = CurrentMemoryContext;

	SetCurrentStatementStartTimestamp();
	StartTransactionCommand();
	found = OidIsValid(get_extension_oid("eventbus", true));
	CommitTransactionCommand();
	MemoryContextSwitchTo(cxt);
	pgstat_report_stat(false);
	return found;
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
	MemoryContext loop_cxt;
	TimestampTz checked_at = 0;

	eb_worker_connect("eventbus launcher");

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
		bool		now_ready;

		(void) eb_worker_loop_top(loop_cxt);

		/* A catalog look-up once a second, not on every commit's wake-up. */
		if (!ready || GetCurrentTimestamp() >= TimestampTzPlusMilliseconds(checked_at, 1000))
		{
			now_ready = extension_installed();
			checked_at = GetCurrentTimestamp();
		}
		else
			now_ready = ready;
		if (now_ready != ready)
		{
			ready = now_ready;
			eb_shmem_set_extension_ready(ready);
			if (ready)
				ereport(LOG, (errmsg("extension found, starting relay")));
			else
			{
				ereport(LOG, (errmsg("extension not installed, waiting for CREATE EXTENSION eventbus")));
				stop_dispatcher();
				eb_relay_shutdown();
			}
		}

		if (ready)
		{
			ensure_dispatcher();
			timeout = eb_relay_step();
		}

		pgstat_report_activity(STATE_IDLE, NULL);
		(void) WaitEventSetWait(wes, timeout, &event, 1, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		eb_wakeup_drain();
	}
}

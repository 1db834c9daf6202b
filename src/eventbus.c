/*
 * eventbus.c — module lifecycle: _PG_init, launcher registration, and the
 * helpers every SQL entry point needs.
 */
#include "postgres.h"

#include "access/xact.h"
#include "executor/spi.h"
#include "pgstat.h"
#include "postmaster/interrupt.h"
#include "tcop/tcopprot.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "postmaster/bgworker.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "privilege.h"
#include "util.h"

PG_MODULE_MAGIC;


/* True only when loaded through shared_preload_libraries. */
bool		eb_preloaded = false;

/*
 * Fill in a background worker of this library: database connection,
 * started after recovery, never restarted by the postmaster unless the
 * caller says otherwise, and reporting to the calling process.
 */
void
eb_bgworker_init(BackgroundWorker *w, const char *function, const char *name, const char *type)
{
	memset(w, 0, sizeof(*w));
	w->bgw_flags = BGWORKER_SHMEM_ACCESS | BGWORKER_BACKEND_DATABASE_CONNECTION;
	w->bgw_start_time = BgWorkerStart_RecoveryFinished;
	w->bgw_restart_time = BGW_NEVER_RESTART;
	snprintf(w->bgw_library_name, BGW_MAXLEN, "eventbus");
	snprintf(w->bgw_function_name, BGW_MAXLEN, "%s", function);
	snprintf(w->bgw_name, BGW_MAXLEN, "%s", name);
	snprintf(w->bgw_type, BGW_MAXLEN, "%s", type);
	w->bgw_notify_pid = MyProcPid;
}

/* Register the static launcher worker. */
static void
eb_register_launcher(void)
{
	BackgroundWorker worker;

	eb_bgworker_init(&worker, "eventbus_launcher_main", "eventbus launcher", "eventbus launcher");
	/* Restart after an error exit; a crash restart happens at once. */
	worker.bgw_restart_time = 5;
	worker.bgw_notify_pid = 0;
	RegisterBackgroundWorker(&worker);
}

/*
 * _PG_init — define GUCs always (so SET and SHOW work when the library is
 * loaded on demand), but reserve shared memory and start workers only when
 * preloaded, and never during binary upgrade.
 */
void
_PG_init(void)
{
	eb_define_gucs();

	if (!process_shared_preload_libraries_in_progress || IsBinaryUpgrade)
		return;

	eb_preloaded = true;
	eb_capture_config_search_path();
	eb_install_log_redaction();
	eb_install_ddl_guard();
	eb_install_database_guard();

	eb_shmem_install_hooks();

	eb_register_launcher();
}

/* Set by SIGTERM in a worker that drains before it stops. */
volatile sig_atomic_t eb_stop_requested = false;

/*
 * SIGTERM of a draining worker: note the request and wake the loop, which
 * finishes its work (bounded) and exits.  (The postmaster signals a child
 * and its process group, so one request may arrive twice.)
 */
static void
drain_sigterm(SIGNAL_ARGS)
{
	int			save_errno = errno;

	eb_stop_requested = true;
	SetLatch(MyLatch);
	errno = save_errno;
}

/*
 * Shared consumption: a clean stop (fast shutdown, a restart of the
 * dispatcher) hands work over to other instances, so what was received here
 * is finished here first instead of being rolled back — rolled back, it
 * would be handled again in another database next to the events handled
 * after it here.  The dispatcher drains (bounded) and exits; a pool worker
 * keeps working until its dispatcher is gone or sends it SIGUSR2 (see
 * eb_pool_worker_signals).
 */
void
eb_stop_by_draining(void)
{
	pqsignal(SIGTERM, drain_sigterm);
}

/*
 * Before a worker loop sleeps: send this process's table and I/O statistics
 * (at most once a second), and return how long it may sleep so that counts
 * held back are sent within PostgreSQL's idle interval.  A backend does so
 * when idle; a background worker must, or autovacuum would not see its
 * writes until it exits.  Held-back counts are sent by force once that
 * interval is over, as a backend's idle timeout does: pgstat measures the
 * interval from the last transaction's end, which does not move while the
 * process sleeps.  Call outside a transaction.
 */
long
eb_worker_report_stats(long timeout)
{
	static TimestampTz due = 0; /* when held-back counts go by force */
	TimestampTz now = GetCurrentTimestamp();
	long		next = pgstat_report_stat(due != 0 && now >= due);

	if (next <= 0)
	{
		due = 0;
		return timeout;
	}
	if (due == 0 || now >= due)
		due = TimestampTzPlusMilliseconds(now, next);
	next = Max(eb_ms_until(due), 1);
	return timeout < 0 || next < timeout ? next : timeout;
}

/*
 * Common start of every eventbus background worker: signal handlers (SIGHUP
 * reloads, SIGTERM terminates through die()), then a connection to
 * eventbus.database.
 */
void
eb_worker_connect(const char *appname)
{
	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(eb_database, NULL, 0);
	eb_pin_worker_search_path();
	pgstat_report_appname(appname);
}

/*
 * Top of every worker loop iteration: start from an empty iteration context,
 * serve interrupts (SIGTERM exits here), and reload the configuration after
 * SIGHUP.  Returns true when it reloaded.
 */
bool
eb_worker_loop_top(MemoryContext loop_cxt)
{
	MemoryContextReset(loop_cxt);
	MemoryContextSwitchTo(loop_cxt);
	CHECK_FOR_INTERRUPTS();
	if (!ConfigReloadPending)
		return false;
	ConfigReloadPending = false;
	ProcessConfigFile(PGC_SIGHUP);
	return true;
}

/* ERROR unless the library was preloaded (no shared memory otherwise). */
void
eb_require_preload(void)
{
	if (!eb_preloaded || eb_shared == NULL)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventbus is not loaded through shared_preload_libraries"),
				 errdetail("The eventbus background workers and shared state exist only when the library is preloaded."),
				 errhint("Add 'eventbus' to shared_preload_libraries in postgresql.conf and restart PostgreSQL.")));
}

/* Wake the relay. */
void
eb_wake_relay(void)
{
	Latch	   *latch = eb_shmem_relay_latch();

	if (latch)
		SetLatch(latch);
}

/* Wake the dispatcher (subscriptions changed). */
void
eb_wake_dispatcher(void)
{
	Latch	   *latch;

	if (eb_shared == NULL)
		return;
	eb_shmem_bump_subs_generation();
	latch = eb_shmem_dispatcher_latch();
	if (latch)
		SetLatch(latch);
}

static bool xact_callback_registered = false;
static uint32 wake_relay_at_commit = 0;	/* bit per transport published to */
static bool wake_dispatcher_at_commit = false;

/*
 * Events published per (sub)transaction level, innermost last, so that a
 * rolled-back savepoint takes its events out of the count (eventbus.metrics
 * counts what committed).
 */
typedef struct PublishedAtLevel
{
	int			level;
	uint64		n[EB_NTRANSPORTS];
} PublishedAtLevel;

static List *published = NIL;	/* PublishedAtLevel *, in TopMemoryContext */

/* Push a level's counts (the list lives as long as the process). */
static void
published_push(PublishedAtLevel *entry)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	published = lappend(published, entry);
	MemoryContextSwitchTo(old);
}

/* Forget the counts of levels at or above level (0: all). */
static void
published_drop(int level)
{
	while (published != NIL &&
		   ((PublishedAtLevel *) llast(published))->level >= level)
	{
		pfree(llast(published));
		published = list_delete_last(published);
	}
}

/* A subtransaction ended: its counts go to its parent, or away. */
static void
eb_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					SubTransactionId parentSubid, void *arg)
{
	int			level = GetCurrentTransactionNestLevel();
	PublishedAtLevel *top;

	if (published == NIL || ((PublishedAtLevel *) llast(published))->level < level)
		return;
	if (event == SUBXACT_EVENT_ABORT_SUB)
		published_drop(level);
	else if (event == SUBXACT_EVENT_COMMIT_SUB)
	{
		top = llast(published);
		published = list_delete_last(published);
		if (published != NIL && ((PublishedAtLevel *) llast(published))->level == level - 1)
		{
			PublishedAtLevel *parent = llast(published);

			for (int t = 0; t < EB_NTRANSPORTS; t++)
				parent->n[t] += top->n[t];
			pfree(top);
		}
		else
		{
			top->level = level - 1;
			published_push(top);
		}
	}
}

/* At commit: add what the transaction published to the shared counters. */
static void
published_commit(void)
{
	ListCell   *lc;

	foreach(lc, published)
		for (int t = 0; t < EB_NTRANSPORTS; t++)
			eb_shmem_count_published(t, ((PublishedAtLevel *) lfirst(lc))->n[t]);
	published_drop(0);
}

/* At commit, wake whoever this transaction's work concerns. */
static void
eb_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
			if (wake_relay_at_commit && eb_shared)
			{
				/* Tell the relay which transports have new rows. */
				eb_shmem_mark_relay_pending(wake_relay_at_commit);
				eb_wake_relay();
			}
			if (wake_dispatcher_at_commit)
				eb_wake_dispatcher();
			published_commit();
			wake_relay_at_commit = 0;
			wake_dispatcher_at_commit = false;
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			/*
			 * A prepared transaction is found by the periodic scans; its
			 * events are not counted as published.
			 */
			published_drop(0);
			wake_relay_at_commit = 0;
			wake_dispatcher_at_commit = false;
			break;
		default:
			break;
	}
}

/*
 * Ask for the relay (for the given transport, or -1 for none) and/or the
 * dispatcher to be woken when this transaction commits.
 */
void
eb_wake_at_commit(int relay_transport, bool dispatcher)
{
	if (!xact_callback_registered)
	{
		RegisterXactCallback(eb_xact_callback, NULL);
		RegisterSubXactCallback(eb_subxact_callback, NULL);
		xact_callback_registered = true;
	}
	if (relay_transport >= 0)
		wake_relay_at_commit |= 1u << relay_transport;
	wake_dispatcher_at_commit |= dispatcher;
}

/* An event was published to transport: count it and wake the relay at commit. */
void
eb_published_at_commit(int transport)
{
	int			level = GetCurrentTransactionNestLevel();
	PublishedAtLevel *top;

	eb_wake_at_commit(transport, false);
	if (published == NIL || ((PublishedAtLevel *) llast(published))->level != level)
	{
		top = MemoryContextAllocZero(TopMemoryContext, sizeof(PublishedAtLevel));
		top->level = level;
		published_push(top);
	}
	top = llast(published);
	top->n[transport]++;
}

/*
 * launcher_db.c — the launcher and the lifecycle of eventbus.database.
 *
 * The launcher is a static worker that the postmaster restarts 5 s after an
 * error exit, and connecting to a database that does not exist is a FATAL:
 * a missing eventbus.database (never created, dropped, renamed) would make
 * it fail every 5 s forever.  Instead a failed connection is noted in
 * shared memory, and the next launcher connects to no database (the shared
 * catalogs are enough to see pg_database), says once that the database is
 * missing, and waits; when the database exists it exits, and the one after
 * it connects.
 *
 * DROP DATABASE, ALTER DATABASE RENAME / SET TABLESPACE and CREATE
 * DATABASE ... TEMPLATE fail while other sessions are connected to the
 * database.  For eventbus.database, a ProcessUtility hook in the backend
 * running the statement first marks the database as released in shared
 * memory, which makes the launcher exit (stopping the dispatcher and with it
 * the pool), and waits, bounded, for eventbus's processes to leave; the mark
 * ends with that backend's transaction.
 */
#include "postgres.h"

#include "access/xact.h"
#include "commands/dbcommands.h"
#include "commands/defrem.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "pgstat.h"
#include "postmaster/bgworker.h"
#include "postmaster/interrupt.h"
#include "storage/ipc.h"
#include "storage/latch.h"
#include "storage/proc.h"
#include "storage/procarray.h"
#include "tcop/tcopprot.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"

/* How often a launcher without its database looks again. */
#define DATABASE_POLL_MS		2000

/*
 * How long DROP / RENAME waits for eventbus's processes to leave the
 * database: their shutdown is bounded (6.5 s at worst, the dispatcher's);
 * PostgreSQL then waits 5 s more for any session still there.
 */
#define RELEASE_WAIT_MS			10000

static bool connecting = false;

/* Exit callback: a launcher that dies while connecting has the next one check first. */
static void
connect_failed(int code, Datum arg)
{
	if (connecting)
		eb_shmem_set_check_database(true);
}

/* Exit callback of a launcher waiting for its database. */
static void
waiting_exit(int code, Datum arg)
{
	eb_shmem_set_launcher(0, NULL, false);
	eb_shmem_set_launcher_waiting(NULL);
}

/* Is a live backend dropping or renaming eventbus.database? */
static bool
database_released(void)
{
	pid_t		pid = eb_shmem_database_release();

	return pid != 0 && BackendPidGetProc(pid) != NULL;
}

/* Does eventbus.database exist?  (pg_database is a shared catalog.) */
static bool
database_exists(void)
{
	Oid			oid;

	StartTransactionCommand();
	oid = get_database_oid(eb_database, true);
	CommitTransactionCommand();
	return OidIsValid(oid);
}

/*
 * A launcher whose database is missing or being dropped: connected to no
 * database, it waits on its latch and looks again every few seconds; it
 * exits (to be restarted and connect) once the database exists and no one
 * is dropping or renaming it.  Never returns.
 */
static void
wait_for_database(void)
{
	bool		logged = false;
	char		why[EB_DETAIL_LEN] = "";
	MemoryContext loop_cxt;

	pqsignal(SIGHUP, SignalHandlerForConfigReload);
	pqsignal(SIGTERM, die);
	BackgroundWorkerUnblockSignals();
	BackgroundWorkerInitializeConnection(NULL, NULL, 0);
	pgstat_report_appname("eventbus launcher");
	before_shmem_exit(waiting_exit, (Datum) 0);
	eb_shmem_set_launcher(MyProcPid, NULL, false);
	loop_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus launcher wait",
									 ALLOCSET_DEFAULT_SIZES);

	for (;;)
	{
		bool		released;
		bool		exists;
		char		now[EB_DETAIL_LEN];

		(void) eb_worker_loop_top(loop_cxt);
		released = database_released();
		exists = database_exists();
		if (exists && !released)
		{
			eb_shmem_set_check_database(false);
			if (logged)
				ereport(LOG,
						(errmsg("eventbus.database \"%s\" exists now, the launcher restarts to connect to it",
								eb_database)));
			proc_exit(1);
		}
		if (!exists && !logged)
		{
			ereport(LOG,
					(errcode(ERRCODE_UNDEFINED_DATABASE),
					 errmsg("eventbus.database \"%s\" does not exist", eb_database),
					 errdetail("Nothing is relayed or consumed until it exists; the launcher checks every %d seconds.",
							   DATABASE_POLL_MS / 1000),
					 errhint("Create the database, or set eventbus.database to an existing database and restart PostgreSQL.")));
			logged = true;
		}
		snprintf(now, sizeof(now), exists ? "database \"%s\" is being dropped, renamed, moved or copied" :
				 "database \"%s\" does not exist", eb_database);
		if (strcmp(now, why) != 0)
		{
			strlcpy(why, now, sizeof(why));
			eb_shmem_set_launcher_waiting(why);
		}
		pgstat_report_activity(STATE_IDLE, NULL);
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 DATABASE_POLL_MS, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
	}
}

/*
 * Connect the launcher to eventbus.database: at once, unless the last
 * attempt failed or the database is being dropped or renamed; then first
 * wait until it can be connected to (see wait_for_database).
 */
void
eb_launcher_connect(void)
{
	if (eb_shmem_check_database() || eb_shmem_database_release() != 0)
		wait_for_database();
	before_shmem_exit(connect_failed, (Datum) 0);
	connecting = true;
	eb_worker_connect("eventbus launcher");
	connecting = false;
	eb_shmem_set_check_database(false);
	eb_shmem_set_launcher_waiting(NULL);
}

/*
 * Is the launcher to leave its database (a backend drops or renames it)?
 * If so, the next launcher checks before it connects.
 */
bool
eb_launcher_must_release(void)
{
	if (eb_shmem_database_release() == 0)
		return false;
	eb_shmem_set_check_database(true);
	return true;
}

/* ---------------------------------------------------------------------
 * In the backend running DROP DATABASE, ALTER DATABASE RENAME / SET
 * TABLESPACE or CREATE DATABASE ... TEMPLATE
 * --------------------------------------------------------------------- */

static ProcessUtility_hook_type prev_process_utility_hook = NULL;
static bool xact_callback_registered = false;

/* The statement's transaction ended: eventbus may come back. */
static void
release_end(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_COMMIT:
		case XACT_EVENT_PARALLEL_COMMIT:
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
		case XACT_EVENT_PREPARE:
			eb_shmem_end_database_release(MyProcPid);
			break;
		default:
			break;
	}
}

/* Is any of the pids a process connected to database dboid? */
static bool
connected_to(const pid_t *pids, int n, Oid dboid)
{
	for (int i = 0; i < n; i++)
	{
		PGPROC	   *proc = pids[i] ? BackendPidGetProc(pids[i]) : NULL;

		if (proc != NULL && proc->databaseId == dboid)
			return true;
	}
	return false;
}

/*
 * Mark eventbus.database (dboid) released, wake the launcher, and wait until
 * the launcher, the dispatcher and the pool workers left it, at most
 * RELEASE_WAIT_MS: PostgreSQL's own check follows and reports any process
 * still there.
 */
static void
release_database(Oid dboid)
{
	EbShared   *snap = palloc(sizeof(EbShared));
	pid_t		pids[2 + EB_MAX_WORKERS];
	int			n = 0;
	Latch	   *latch;
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RELEASE_WAIT_MS);

	if (!xact_callback_registered)
	{
		RegisterXactCallback(release_end, NULL);
		xact_callback_registered = true;
	}
	eb_shmem_set_database_release(MyProcPid);
	latch = eb_shmem_relay_latch();
	if (latch)
		SetLatch(latch);

	eb_shmem_snapshot(snap);
	pids[n++] = snap->launcher_pid;
	pids[n++] = snap->dispatcher_pid;
	for (int w = 0; w < snap->nworkers; w++)
		pids[n++] = snap->workers[w].pid;
	pfree(snap);

	while (connected_to(pids, n, dboid) && GetCurrentTimestamp() < deadline)
	{
		(void) WaitLatch(MyLatch, WL_LATCH_SET | WL_TIMEOUT | WL_EXIT_ON_PM_DEATH,
						 100L, PG_WAIT_EXTENSION);
		ResetLatch(MyLatch);
		CHECK_FOR_INTERRUPTS();
	}
}

/* The value of a statement's option (a name), or NULL if not given. */
static const char *
statement_option(List *options, const char *option)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *def = lfirst_node(DefElem, lc);

		if (strcmp(def->defname, option) == 0 && def->arg != NULL &&
			(IsA(def->arg, String) || IsA(def->arg, TypeName)))
			return defGetString(def);
	}
	return NULL;
}

/*
 * The database a statement that needs it free of sessions — DROP DATABASE,
 * ALTER DATABASE RENAME or SET TABLESPACE, CREATE DATABASE ... TEMPLATE —
 * and that PostgreSQL would let run is about to use, if it is
 * eventbus.database;
 * InvalidOid otherwise (eventbus is not disturbed by a statement that fails
 * its own checks, nor by one from a role that may not run it).
 */
static Oid
released_database(Node *stmt, bool isTopLevel)
{
	const char *name;
	Oid			dboid;

	if (IsA(stmt, DropdbStmt))
	{
		/* DROP DATABASE cannot run in a transaction block. */
		if (!isTopLevel || IsTransactionBlock())
			return InvalidOid;
		name = ((DropdbStmt *) stmt)->dbname;
	}
	else if (IsA(stmt, RenameStmt) && ((RenameStmt *) stmt)->renameType == OBJECT_DATABASE)
	{
		if (!have_createdb_privilege())
			return InvalidOid;
		name = ((RenameStmt *) stmt)->subname;
	}
	else if (IsA(stmt, CreatedbStmt))
	{
		/* CREATE DATABASE ... TEMPLATE eventbus.database copies it. */
		if (!isTopLevel || IsTransactionBlock() || !have_createdb_privilege())
			return InvalidOid;
		name = statement_option(((CreatedbStmt *) stmt)->options, "template");
	}
	else if (IsA(stmt, AlterDatabaseStmt))
	{
		/* Only SET TABLESPACE moves the files (and needs no sessions). */
		if (!isTopLevel || IsTransactionBlock() ||
			statement_option(((AlterDatabaseStmt *) stmt)->options, "tablespace") == NULL)
			return InvalidOid;
		name = ((AlterDatabaseStmt *) stmt)->dbname;
	}
	else
		return InvalidOid;

	if (eb_shared == NULL || name == NULL || strcmp(name, eb_database) != 0)
		return InvalidOid;
	dboid = get_database_oid(name, true);
	if (!OidIsValid(dboid) || dboid == MyDatabaseId ||
		!pg_database_ownercheck(dboid, GetUserId()))
		return InvalidOid;
	return dboid;
}

/* ProcessUtility_hook: let statements that need eventbus.database free through. */
static void
eb_database_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
					ProcessUtilityContext context, ParamListInfo params,
					QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Oid			dboid = released_database(pstmt->utilityStmt,
										  context == PROCESS_UTILITY_TOPLEVEL);

	if (OidIsValid(dboid))
		release_database(dboid);
	if (prev_process_utility_hook)
		prev_process_utility_hook(pstmt, queryString, readOnlyTree, context, params,
								  queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
								queryEnv, dest, qc);
}

/* Install the hook (preloaded library only). */
void
eb_install_database_guard(void)
{
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = eb_database_utility;
}

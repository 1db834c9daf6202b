/*
 * ddl_guard.c — subscriptions as dependents of their role and handler.
 *
 * A subscription row is not a catalog object, so PostgreSQL's dependency
 * machinery does not see it.  These hooks give it the same behaviour in the
 * database where eventbus is installed:
 *  - DROP ROLE of a role owning subscriptions fails (2BP01) until they are
 *    removed, REASSIGN OWNED moves them, DROP OWNED removes them;
 *  - DROP FUNCTION of a subscribed handler fails (2BP01) unless CASCADE,
 *    which removes the subscriptions with it.
 * A role dropped from another database cannot be seen here: the dispatcher
 * stops running its subscriptions and eventbus_status() shows them as
 * "owner dropped".
 */
#include "postgres.h"

#include "catalog/namespace.h"
#include "catalog/objectaccess.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/extension.h"
#include "executor/spi.h"
#include "miscadmin.h"
#include "nodes/parsenodes.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "eventbus.h"
#include "privilege.h"

static object_access_hook_type prev_object_access_hook = NULL;
static ProcessUtility_hook_type prev_process_utility_hook = NULL;

/* > 0 while a statement with CASCADE (DROP ..., DROP OWNED) runs. */
static int	cascade_depth = 0;

/* Is eventbus installed here, with its subscriptions table? */
static bool
eventbus_installed(void)
{
	Oid			nsp;

	if (!IsTransactionState() || !OidIsValid(get_extension_oid("eventbus", true)))
		return false;
	nsp = get_namespace_oid("eventbus", true);
	return OidIsValid(nsp) && OidIsValid(get_relname_relid("subscriptions", nsp));
}

/* Run one statement as the extension owner, in SPI of its own; returns SPI_processed. */
static uint64
run(const char *sql, Oid argtype, Datum arg, int expected)
{
	uint64		n;

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	n = eb_exec_as_owner(sql, 1, &argtype, &arg, NULL, expected);
	SPI_finish();
	return n;
}

/* Refuse to drop a role that owns subscriptions in this database. */
static void
guard_role_drop(Oid role)
{
	uint64		n;

	n = run("SELECT 1 FROM eventbus.subscriptions WHERE role_id OPERATOR(pg_catalog.=) $1",
			OIDOID, ObjectIdGetDatum(role), SPI_OK_SELECT);
	if (n > 0)
	{
		const char *name = GetUserNameFromId(role, true);

		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("role \"%s\" cannot be dropped because it owns eventbus subscriptions",
						name ? name : "?"),
				 errdetail_plural("%llu subscription in database \"%s\".",
								  "%llu subscriptions in database \"%s\".", n,
								  (unsigned long long) n, get_database_name(MyDatabaseId)),
				 errhint("Remove them with eventbus_unsubscribe(), or run REASSIGN OWNED or DROP OWNED for the role in that database first.")));
	}
}

/* A function dropped: refuse if subscribed, or remove its subscriptions under CASCADE. */
static void
guard_function_drop(Oid func)
{
	Oid			envelope;
	Oid			nsp = get_namespace_oid("eventbus", true);

	/* Only functions (eventbus.envelope) can be handlers. */
	envelope = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
							   CStringGetDatum("envelope"), ObjectIdGetDatum(nsp));
	if (!OidIsValid(envelope) || get_func_rettype(func) != VOIDOID)
		return;
	{
		Oid		   *argtypes;
		int			nargs;

		(void) get_func_signature(func, &argtypes, &nargs);
		if (nargs != 1 || argtypes[0] != envelope)
			return;
	}

	if (cascade_depth > 0)
	{
		uint64		n = run("DELETE FROM eventbus.subscriptions WHERE handler OPERATOR(pg_catalog.=) $1",
							OIDOID, ObjectIdGetDatum(func), SPI_OK_DELETE);

		if (n > 0)
		{
			ereport(NOTICE,
					(errmsg("drop cascades to %llu eventbus subscription%s of %s",
							(unsigned long long) n, n == 1 ? "" : "s", format_procedure(func))));
			eb_wake_at_commit(-1, true);
		}
		return;
	}
	if (run("SELECT 1 FROM eventbus.subscriptions WHERE handler OPERATOR(pg_catalog.=) $1",
			OIDOID, ObjectIdGetDatum(func), SPI_OK_SELECT) > 0)
		ereport(ERROR,
				(errcode(ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST),
				 errmsg("cannot drop function %s because eventbus subscriptions use it",
						format_procedure(func)),
				 errhint("Remove them with eventbus_unsubscribe(), or use DROP ... CASCADE to remove them too.")));
}

/* object_access_hook: DROP of a role or function. */
static void
eb_object_access(ObjectAccessType access, Oid classId, Oid objectId, int subId, void *arg)
{
	if (prev_object_access_hook)
		prev_object_access_hook(access, classId, objectId, subId, arg);
	if (access != OAT_DROP || !eventbus_installed())
		return;
	if (classId == AuthIdRelationId)
		guard_role_drop(objectId);
	else if (classId == ProcedureRelationId && subId == 0)
		guard_function_drop(objectId);
}

/* Role OIDs of a list of RoleSpec, as a PostgreSQL oid[] datum. */
static Datum
role_array(List *roles)
{
	Datum	   *oids = palloc(sizeof(Datum) * Max(list_length(roles), 1));
	int			n = 0;
	ListCell   *lc;

	foreach(lc, roles)
		oids[n++] = ObjectIdGetDatum(get_rolespec_oid(lfirst(lc), false));
	return PointerGetDatum(construct_array(oids, n, OIDOID, sizeof(Oid), true, TYPALIGN_INT));
}

/* ProcessUtility_hook: CASCADE tracking, DROP OWNED and REASSIGN OWNED. */
static void
eb_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;
	volatile bool cascade = false;

	if (IsA(stmt, DropStmt))
		cascade = ((DropStmt *) stmt)->behavior == DROP_CASCADE;
	else if (IsA(stmt, DropOwnedStmt))
	{
		DropOwnedStmt *d = (DropOwnedStmt *) stmt;

		cascade = d->behavior == DROP_CASCADE;
		/* Owned subscriptions go first, as owned objects do. */
		if (eventbus_installed() &&
			run("DELETE FROM eventbus.subscriptions WHERE role_id OPERATOR(pg_catalog.=) ANY ($1)",
				OIDARRAYOID, role_array(d->roles), SPI_OK_DELETE) > 0)
			eb_wake_at_commit(-1, true);
	}

	if (cascade)
		cascade_depth++;
	PG_TRY();
	{
		if (prev_process_utility_hook)
			prev_process_utility_hook(pstmt, queryString, readOnlyTree, context, params,
									  queryEnv, dest, qc);
		else
			standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params,
									queryEnv, dest, qc);
	}
	PG_FINALLY();
	{
		if (cascade)
			cascade_depth--;
	}
	PG_END_TRY();

	/* After PostgreSQL checked the caller may reassign these roles' objects. */
	if (IsA(stmt, ReassignOwnedStmt) && eventbus_installed())
	{
		ReassignOwnedStmt *r = (ReassignOwnedStmt *) stmt;
		Oid			to = get_rolespec_oid(r->newrole, false);
		char	   *sql = psprintf("UPDATE eventbus.subscriptions SET role_id = %u"
								   " WHERE role_id OPERATOR(pg_catalog.=) ANY ($1)", to);

		if (run(sql, OIDARRAYOID, role_array(r->roles), SPI_OK_UPDATE) > 0)
			eb_wake_at_commit(-1, true);
	}
}

/* Install the hooks (preloaded library only). */
void
eb_install_ddl_guard(void)
{
	prev_object_access_hook = object_access_hook;
	object_access_hook = eb_object_access;
	prev_process_utility_hook = ProcessUtility_hook;
	ProcessUtility_hook = eb_process_utility;
}

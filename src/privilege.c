/*
 * privilege.c — who eventbus's statements and handlers run as, and with
 * which settings.
 *
 * Three rules, as PostgreSQL applies them to index builds and materialized
 * views:
 *  - internal statements of the SQL API run as the extension owner, as a
 *    security-restricted operation, with search_path pinned to
 *    "pg_catalog, pg_temp" in a GUC nest level of their own;
 *  - background workers pin that search_path for their whole life, above
 *    any database or role setting;
 *  - a handler runs as its subscribing role, security-restricted, in a GUC
 *    nest level that starts from the role's defaults in this database and is
 *    thrown away when the call returns, so nothing it sets reaches the next.
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/indexing.h"
#include "catalog/pg_db_role_setting.h"
#include "catalog/pg_extension.h"
#include "executor/spi.h"
#include "commands/trigger.h"
#include "miscadmin.h"
#include "storage/proc.h"
#include "utils/acl.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/guc.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"

#include "privilege.h"

#define PINNED_SEARCH_PATH "pg_catalog, pg_temp"

/* search_path of postgresql.conf when the server started: a handler's base. */
static char *config_search_path = NULL;

/* Remember postgresql.conf's search_path (called from _PG_init). */
void
eb_capture_config_search_path(void)
{
	const char *v = GetConfigOption("search_path", true, false);

	config_search_path = MemoryContextStrdup(TopMemoryContext,
											 v ? v : "\"$user\", public");
}

/*
 * Pin a background worker's search_path above every database and role
 * setting (as autovacuum does), so ALTER DATABASE/ROLE ... SET cannot
 * redirect its statements to objects of the database owner's choosing.
 */
void
eb_pin_worker_search_path(void)
{
	SetConfigOption("search_path", PINNED_SEARCH_PATH, PGC_SUSET, PGC_S_OVERRIDE);
}

/* Role that owns the eventbus extension (and so its tables). */
Oid
eb_extension_owner(void)
{
	Relation	rel;
	ScanKeyData key;
	SysScanDesc scan;
	HeapTuple	tup;
	Oid			owner = InvalidOid;

	rel = table_open(ExtensionRelationId, AccessShareLock);
	ScanKeyInit(&key, Anum_pg_extension_extname, BTEqualStrategyNumber, F_NAMEEQ,
				CStringGetDatum("eventbus"));
	scan = systable_beginscan(rel, ExtensionNameIndexId, true, NULL, 1, &key);
	tup = systable_getnext(scan);
	if (HeapTupleIsValid(tup))
		owner = ((Form_pg_extension) GETSTRUCT(tup))->extowner;
	systable_endscan(scan);
	table_close(rel, AccessShareLock);

	if (!OidIsValid(owner))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("extension \"eventbus\" is not installed in this database"),
				 errhint("Run CREATE EXTENSION eventbus.")));
	return owner;
}

/*
 * Enter the context of eventbus's internal statements: the extension owner,
 * security-restricted, search_path pinned.  Leave with eb_as_owner_end; an
 * error in between is unwound by transaction abort.
 */
void
eb_as_owner_begin(EbSecContext *ctx)
{
	Oid			owner = eb_extension_owner();

	GetUserIdAndSecContext(&ctx->save_uid, &ctx->save_sec);
	SetUserIdAndSecContext(owner, ctx->save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	ctx->nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", PINNED_SEARCH_PATH, PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

/* Leave what eb_as_owner_begin entered. */
void
eb_as_owner_end(EbSecContext *ctx)
{
	AtEOXact_GUC(false, ctx->nestlevel);
	SetUserIdAndSecContext(ctx->save_uid, ctx->save_sec);
}

/*
 * Run one internal statement on eventbus's tables as the extension owner (the
 * caller has connected SPI); ERROR unless SPI answers expected.  Returns
 * SPI_processed.
 */
uint64
eb_exec_as_owner(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls,
				 int expected)
{
	EbSecContext ctx;
	int			rc;

	eb_as_owner_begin(&ctx);
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
	eb_as_owner_end(&ctx);
	if (rc != expected)
		elog(ERROR, "eventbus internal statement failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/* May the current user act for role (member of it, or superuser)? */
bool
eb_may_act_for(Oid role)
{
	return superuser() || (OidIsValid(role) && is_member_of_role(GetUserId(), role));
}

/* ERROR 42501 unless the current user may act for the subscription's owner. */
void
eb_require_owner(Oid role, const char *action, int64 subscription_id)
{
	const char *name;

	if (eb_may_act_for(role))
		return;
	name = GetUserNameFromId(role, true);
	ereport(ERROR,
			(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
			 errmsg("permission denied to %s subscription " INT64_FORMAT, action, subscription_id),
			 errdetail("The subscription is owned by role %s.", name ? quote_identifier(name) : "(dropped)"),
			 errhint("Only members of the owning role and superusers may change it, replay or read its dead letters.")));
}

/* A role's setting arrays, read once per transaction (a pool batch). */
typedef struct RoleDefaults
{
	Oid			role;
	Datum		arrays[4];		/* ALTER ROLE ALL, DATABASE, ROLE, ROLE IN DATABASE */
	bool		sets_search_path;	/* one of them sets search_path */
} RoleDefaults;

static List *defaults_cache = NIL;	/* in TopTransactionContext */
static LocalTransactionId defaults_lxid = InvalidLocalTransactionId;

/* Does a setconfig array ("name=value" items) set search_path? */
static bool
array_sets_search_path(ArrayType *a)
{
	Datum	   *items;
	bool	   *nulls;
	int			n;

	deconstruct_array(a, TEXTOID, -1, false, TYPALIGN_INT, &items, &nulls, &n);
	for (int i = 0; i < n; i++)
		if (!nulls[i] && pg_strncasecmp(TextDatumGetCString(items[i]), "search_path=", 12) == 0)
			return true;
	return false;
}

/* Read role's rows of pg_db_role_setting that apply in this database. */
static RoleDefaults *
read_role_defaults(Oid role)
{
	Relation	rel;
	SysScanDesc scan;
	HeapTuple	tup;
	Snapshot	snap;
	RoleDefaults *rd;
	MemoryContext old;
	ListCell   *lc;

	if (defaults_lxid != MyProc->lxid)
	{
		defaults_cache = NIL;
		defaults_lxid = MyProc->lxid;
	}
	foreach(lc, defaults_cache)
		if (((RoleDefaults *) lfirst(lc))->role == role)
			return lfirst(lc);

	old = MemoryContextSwitchTo(TopTransactionContext);
	rd = palloc0(sizeof(RoleDefaults));
	rd->role = role;
	snap = RegisterSnapshot(GetCatalogSnapshot(DbRoleSettingRelationId));
	rel = table_open(DbRoleSettingRelationId, AccessShareLock);
	scan = systable_beginscan(rel, InvalidOid, false, snap, 0, NULL);
	while ((tup = systable_getnext(scan)) != NULL)
	{
		Form_pg_db_role_setting s = (Form_pg_db_role_setting) GETSTRUCT(tup);
		bool		isnull;
		Datum		d;

		if ((s->setdatabase != InvalidOid && s->setdatabase != MyDatabaseId) ||
			(s->setrole != InvalidOid && s->setrole != role))
			continue;
		d = heap_getattr(tup, Anum_pg_db_role_setting_setconfig, RelationGetDescr(rel), &isnull);
		if (!isnull)
			rd->arrays[(s->setrole != InvalidOid ? 2 : 0) + (s->setdatabase != InvalidOid ? 1 : 0)] =
				PointerGetDatum(PG_DETOAST_DATUM_COPY(d));
	}
	systable_endscan(scan);
	table_close(rel, AccessShareLock);
	UnregisterSnapshot(snap);
	for (int i = 0; i < 4; i++)
		rd->sets_search_path |= rd->arrays[i] != (Datum) 0 &&
			array_sets_search_path(DatumGetArrayTypeP(rd->arrays[i]));
	defaults_cache = lappend(defaults_cache, rd);
	MemoryContextSwitchTo(old);
	return rd;
}

/*
 * Apply the settings a new session of role in this database would get from
 * ALTER ROLE/DATABASE ... SET, lowest precedence first (as PostgreSQL does at
 * connection): ALTER ROLE ALL, ALTER DATABASE, ALTER ROLE, ALTER ROLE IN
 * DATABASE.
 */
static void
apply_role_defaults(RoleDefaults *rd)
{
	for (int i = 0; i < 4; i++)
		if (rd->arrays[i] != (Datum) 0)
			ProcessGUCArray(DatumGetArrayTypeP(rd->arrays[i]), PGC_SUSET, PGC_S_SESSION,
							GUC_ACTION_SET);
}

/* Set search_path to sp, with pg_temp last unless sp places it. */
static void
set_handler_search_path(const char *sp)
{
	if (strstr(sp, "pg_temp") == NULL)
		sp = psprintf("%s, pg_temp", sp);
	(void) set_config_option("search_path", sp, PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SET, true, 0, false);
}

/*
 * Enter a handler's context: the subscribing role, security-restricted, in a
 * fresh GUC nest level holding postgresql.conf's search_path and the role's
 * defaults.  pg_temp goes last so a caller's temporary tables (replay runs in
 * the caller's session) never capture the handler's unqualified names.  The
 * search_path is set once when the role's defaults leave it alone (the
 * common case: a setting costs a parse and a GUC stack entry per event).
 */
void
eb_handler_context_begin(EbSecContext *ctx, Oid role)
{
	RoleDefaults *rd = read_role_defaults(role);
	const char *base = config_search_path ? config_search_path : "\"$user\", public";

	GetUserIdAndSecContext(&ctx->save_uid, &ctx->save_sec);
	SetUserIdAndSecContext(role, ctx->save_sec | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	ctx->nestlevel = NewGUCNestLevel();
	/* A replay runs in the caller's session: drop what that session SET. */
	if (!IsBackgroundWorker)
		ResetAllOptions();
	if (!rd->sets_search_path)
	{
		set_handler_search_path(base);
		apply_role_defaults(rd);
		return;
	}
	(void) set_config_option("search_path", base, PGC_SUSET, PGC_S_SESSION,
							 GUC_ACTION_SET, true, 0, false);
	apply_role_defaults(rd);
	set_handler_search_path(GetConfigOption("search_path", false, false));
}

/* Leave a handler's context: every setting it made is undone. */
void
eb_handler_context_end(EbSecContext *ctx)
{
	AtEOXact_GUC(false, ctx->nestlevel);
	SetUserIdAndSecContext(ctx->save_uid, ctx->save_sec);
}

/*
 * SET CONSTRAINTS ALL IMMEDIATE for the rest of the transaction: handlers are
 * security-restricted operations, in which PostgreSQL does not allow
 * deferred triggers to be queued.
 */
void
eb_constraints_immediate(void)
{
	ConstraintsSetStmt *stmt = makeNode(ConstraintsSetStmt);

	stmt->constraints = NIL;
	stmt->deferred = false;
	AfterTriggerSetState(stmt);
}

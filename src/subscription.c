/*
 * subscription.c — eventbus_subscribe, eventbus_unsubscribe and
 * eventbus_replay_dead_letter.
 *
 * These run as the caller (so the subscribing role is the caller's role);
 * their statements on eventbus's own tables run as the extension owner
 * (privilege.c).  EXECUTE on them is what GRANT controls; a subscription is
 * owned by its role, and changing it, replaying or reading its dead letters
 * takes membership in that role.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "eventbus.h"
#include "pool.h"
#include "privilege.h"
#include "transport.h"

PG_FUNCTION_INFO_V1(eventbus_subscribe);
PG_FUNCTION_INFO_V1(eventbus_unsubscribe);
PG_FUNCTION_INFO_V1(eventbus_replay_dead_letter);
PG_FUNCTION_INFO_V1(eventbus_dead_letters);

/* Is handler a function (eventbus.envelope) RETURNS void? */
bool
eb_handler_signature_ok(Oid handler)
{
	HeapTuple	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(handler));
	Form_pg_proc proc;
	bool		ok;

	if (!HeapTupleIsValid(tup))
		return false;
	proc = (Form_pg_proc) GETSTRUCT(tup);
	ok = proc->prokind == PROKIND_FUNCTION && proc->pronargs == 1 &&
		proc->proargtypes.values[0] == eb_envelope_type() &&
		proc->prorettype == VOIDOID && !proc->proretset;
	ReleaseSysCache(tup);
	return ok;
}

/* Column col of the first result row (SPI), as a Datum; *isnull set. */
static Datum
result_col(int col, bool *isnull)
{
	return SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, col, isnull);
}

#define FIND_SUB_SQL \
	"SELECT id, role_id FROM eventbus.subscriptions" \
	" WHERE topic OPERATOR(pg_catalog.=) $1 AND transport OPERATOR(pg_catalog.=) $2" \
	" AND handler OPERATOR(pg_catalog.=) $3 FOR UPDATE"

/* topic and handler arguments must not be NULL. */
static void
require_topic_handler(FunctionCallInfo fcinfo)
{
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", PG_ARGISNULL(0) ? "topic" : "handler")));
}

/*
 * eventbus_subscribe(topic, handler, transport, max_attempts) RETURNS bigint
 *
 * A new subscription is owned by the calling role.  Subscribing again to an
 * existing (topic, transport, handler) updates max_attempts and keeps the
 * owner; it needs membership in the owning role.
 */
Datum
eventbus_subscribe(PG_FUNCTION_ARGS)
{
	char	   *topic;
	Oid			handler;
	int			transport;
	int32		max_attempts;
	Oid			types[5] = {TEXTOID, TEXTOID, OIDOID, OIDOID, INT4OID};
	Datum		values[5];
	bool		isnull;
	int64		id = 0;

	eb_require_preload();
	require_topic_handler(fcinfo);
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	handler = PG_GETARG_OID(1);
	transport = eb_transport_arg(fcinfo, 2);
	max_attempts = PG_ARGISNULL(3) ? 5 : PG_GETARG_INT32(3);

	eb_validate_topic_for_transport(topic, transport);
	if (max_attempts < 1)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("max_attempts must be at least 1"),
				 errdetail("Got %d.", max_attempts)));
	if (!eb_handler_signature_ok(handler))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_FUNCTION_DEFINITION),
				 errmsg("handler %s must be a function taking one eventbus.envelope and returning void",
						format_procedure(handler)),
				 errhint("CREATE FUNCTION h(e eventbus.envelope) RETURNS void ...")));
	if (pg_proc_aclcheck(handler, GetUserId(), ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(handler)),
				 errdetail("A handler runs as the role that subscribes it, which needs EXECUTE on it.")));
	eb_require_transport_configured(transport);

	values[0] = CStringGetTextDatum(topic);
	values[1] = CStringGetTextDatum(eb_transport_name(transport));
	values[2] = ObjectIdGetDatum(handler);
	values[3] = ObjectIdGetDatum(GetUserId());
	values[4] = Int32GetDatum(max_attempts);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	/* Insert, or lock the existing row; a concurrent insert makes us look again. */
	for (int tries = 0; tries < 2 && id == 0; tries++)
	{
		if (eb_exec_as_owner("INSERT INTO eventbus.subscriptions (topic, transport, handler, role_id, max_attempts)"
						  " VALUES ($1, $2, $3::pg_catalog.regprocedure, $4, $5)"
						  " ON CONFLICT (topic, transport, handler) DO NOTHING RETURNING id",
						  5, types, values, NULL, SPI_OK_INSERT_RETURNING) == 1)
		{
			id = DatumGetInt64(result_col(1, &isnull));
			break;
		}
		if (eb_exec_as_owner(FIND_SUB_SQL, 3, types, values, NULL, SPI_OK_SELECT) == 1)
		{
			Datum		upd[2];
			Oid			updtypes[2] = {INT8OID, INT4OID};

			id = DatumGetInt64(result_col(1, &isnull));
			eb_require_owner(DatumGetObjectId(result_col(2, &isnull)), "change", id);
			upd[0] = Int64GetDatum(id);
			upd[1] = values[4];
			eb_exec_as_owner("UPDATE eventbus.subscriptions SET max_attempts = $2"
						  " WHERE id OPERATOR(pg_catalog.=) $1",
						  2, updtypes, upd, NULL, SPI_OK_UPDATE);
		}
	}
	SPI_finish();
	if (id == 0)
		ereport(ERROR,
				(errcode(ERRCODE_T_R_SERIALIZATION_FAILURE),
				 errmsg("subscription changed concurrently, try again")));

	eb_wake_at_commit(-1, true);
	PG_RETURN_INT64(id);
}

/* eventbus_unsubscribe(topic, handler, transport) RETURNS boolean */
Datum
eventbus_unsubscribe(PG_FUNCTION_ARGS)
{
	Oid			types[3] = {TEXTOID, TEXTOID, OIDOID};
	Datum		values[3];
	bool		isnull;
	bool		found;

	eb_require_preload();
	require_topic_handler(fcinfo);
	values[0] = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	values[1] = CStringGetTextDatum(eb_transport_name(eb_transport_arg(fcinfo, 2)));
	values[2] = PG_GETARG_DATUM(1);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	found = eb_exec_as_owner(FIND_SUB_SQL, 3, types, values, NULL, SPI_OK_SELECT) == 1;
	if (found)
	{
		int64		id = DatumGetInt64(result_col(1, &isnull));
		Oid			idtype = INT8OID;
		Datum		idval = Int64GetDatum(id);

		eb_require_owner(DatumGetObjectId(result_col(2, &isnull)), "remove", id);
		eb_exec_as_owner("DELETE FROM eventbus.subscriptions WHERE id OPERATOR(pg_catalog.=) $1",
					  1, &idtype, &idval, NULL, SPI_OK_DELETE);
	}
	SPI_finish();

	if (found)
		eb_wake_at_commit(-1, true);
	PG_RETURN_BOOL(found);
}

/*
 * eventbus_replay_dead_letter(id) RETURNS boolean — run the handler again,
 * now, in the caller's transaction, as the subscribing role and isolated as
 * in the pool.  A dead letter replays successfully at most once: its row is
 * locked for the call, so a concurrent replay waits and then finds it done.
 */
Datum
eventbus_replay_dead_letter(PG_FUNCTION_ARGS)
{
	int64		id;
	Oid			types[3] = {INT8OID, TEXTOID, TEXTOID};
	Datum		values[3];
	bool		isnull;
	Oid			handler;
	Oid			role;
	int64		sub_id;
	Datum		envelope;
	ErrorData  *error = NULL;
	bool		ok;

	eb_require_preload();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id must not be null")));
	id = PG_GETARG_INT64(0);
	values[0] = Int64GetDatum(id);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (eb_exec_as_owner("SELECT s.handler::pg_catalog.oid, s.role_id, d.envelope, s.id,"
					  " d.replayed_at IS NOT NULL"
					  " FROM eventbus.dead_letters d JOIN eventbus.subscriptions s"
					  " ON s.id OPERATOR(pg_catalog.=) d.subscription_id"
					  " WHERE d.id OPERATOR(pg_catalog.=) $1 FOR UPDATE OF d",
					  1, types, values, NULL, SPI_OK_SELECT) == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("dead letter " INT64_FORMAT " does not exist", id)));
	handler = DatumGetObjectId(result_col(1, &isnull));
	role = DatumGetObjectId(result_col(2, &isnull));
	envelope = SPI_datumTransfer(result_col(3, &isnull), false, -1);
	sub_id = DatumGetInt64(result_col(4, &isnull));
	eb_require_owner(role, "replay a dead letter of", sub_id);
	if (DatumGetBool(result_col(5, &isnull)))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("dead letter " INT64_FORMAT " was already replayed", id),
				 errdetail("A dead letter is replayed successfully at most once.")));

	/*
	 * The handler runs as a security-restricted operation, where PostgreSQL
	 * refuses to queue deferred triggers (they would fire later as another
	 * user): check deferrable constraints immediately from here on, as the
	 * pool does for every batch.  This also fires the caller's pending
	 * deferred triggers now, as the caller.
	 */
	eb_constraints_immediate();
	ok = eb_handler_call(handler, role, envelope, &error);
	if (ok)
		eb_exec_as_owner("WITH d AS (UPDATE eventbus.dead_letters SET replayed_at = pg_catalog.clock_timestamp()"
					  " WHERE id OPERATOR(pg_catalog.=) $1 RETURNING subscription_id, (envelope).event_id)"
					  " UPDATE eventbus.inbox i SET outcome = 'handled', handled_at = pg_catalog.clock_timestamp()"
					  " FROM d WHERE i.subscription_id OPERATOR(pg_catalog.=) d.subscription_id"
					  " AND i.event_id OPERATOR(pg_catalog.=) d.event_id",
					  1, types, values, NULL, SPI_OK_UPDATE);
	else
	{
		values[1] = CStringGetTextDatum(error->message ? error->message : "unknown error");
		values[2] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
		eb_exec_as_owner("UPDATE eventbus.dead_letters SET attempts = attempts OPERATOR(pg_catalog.+) 1,"
					  " error_message = $2, error_sqlstate = $3, failed_at = pg_catalog.clock_timestamp()"
					  " WHERE id OPERATOR(pg_catalog.=) $1",
					  3, types, values, NULL, SPI_OK_UPDATE);
		ereport(WARNING,
				(errcode(error->sqlerrcode),
				 errmsg("replay of dead letter " INT64_FORMAT " failed: %s", id, error->message),
				 errdetail("SQLSTATE %s", unpack_sql_state(error->sqlerrcode))));
	}
	SPI_finish();
	PG_RETURN_BOOL(ok);
}

/*
 * eventbus_dead_letters(subscription_id bigint DEFAULT NULL) RETURNS SETOF
 * record — dead letters of one subscription (42501 unless the caller may act
 * for its owner), or of every subscription the caller may act for.
 */
Datum
eventbus_dead_letters(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	Oid			types[2] = {INT8OID, OIDOID};
	Datum		values[2];
	char		nulls[2] = {' ', ' '};
	bool		superuser_caller = superuser();
	uint64		n;

	eb_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	values[1] = ObjectIdGetDatum(GetUserId());
	nulls[0] = PG_ARGISNULL(0) ? 'n' : ' ';
	values[0] = PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (!PG_ARGISNULL(0))
	{
		bool		isnull;

		if (eb_exec_as_owner("SELECT role_id FROM eventbus.subscriptions WHERE id OPERATOR(pg_catalog.=) $1",
						  1, types, values, nulls, SPI_OK_SELECT) == 0)
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("subscription " INT64_FORMAT " does not exist", PG_GETARG_INT64(0))));
		eb_require_owner(DatumGetObjectId(result_col(1, &isnull)), "read dead letters of",
						 PG_GETARG_INT64(0));
	}
	n = eb_exec_as_owner("SELECT d.id, d.subscription_id, s.topic, s.handler, d.envelope, d.error_message,"
					  " d.error_sqlstate, d.attempts, d.failed_at, d.replayed_at"
					  " FROM eventbus.dead_letters d JOIN eventbus.subscriptions s"
					  " ON s.id OPERATOR(pg_catalog.=) d.subscription_id"
					  " WHERE ($1 IS NULL OR s.id OPERATOR(pg_catalog.=) $1)"
					  " AND ($3 OR pg_catalog.pg_has_role($2, s.role_id, 'MEMBER'))"
					  " ORDER BY d.id",
					  3, (Oid[]) {INT8OID, OIDOID, BOOLOID},
					  (Datum[]) {values[0], values[1], BoolGetDatum(superuser_caller)},
					  (char[]) {nulls[0], ' ', ' '}, SPI_OK_SELECT);
	for (uint64 i = 0; i < n; i++)
	{
		Datum		row[10];
		bool		rownulls[10];

		heap_deform_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, row, rownulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, row, rownulls);
	}
	SPI_finish();
	return (Datum) 0;
}

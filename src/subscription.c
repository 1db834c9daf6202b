/*
 * subscription.c — eventbus_subscribe, eventbus_unsubscribe and
 * eventbus_replay_dead_letter.
 *
 * These run as the caller (so the subscribing role is the caller's role)
 * but read and write eventbus's own tables as their owner: EXECUTE on them
 * is what GRANT controls.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_authid.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/regproc.h"
#include "utils/syscache.h"

#include "eventbus.h"

PG_FUNCTION_INFO_V1(eventbus_subscribe);
PG_FUNCTION_INFO_V1(eventbus_unsubscribe);
PG_FUNCTION_INFO_V1(eventbus_replay_dead_letter);

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

/* Run one statement on eventbus's tables as the bootstrap superuser. */
static uint64
exec_as_owner(const char *sql, int nargs, Oid *types, Datum *values, const char *nulls,
			  int expected)
{
	Oid			save_uid;
	int			save_sec;
	int			rc;

	GetUserIdAndSecContext(&save_uid, &save_sec);
	SetUserIdAndSecContext(BOOTSTRAP_SUPERUSERID, save_sec | SECURITY_LOCAL_USERID_CHANGE);
	rc = SPI_execute_with_args(sql, nargs, types, values, nulls, false, 0);
	SetUserIdAndSecContext(save_uid, save_sec);
	if (rc != expected)
		elog(ERROR, "eventbus: statement failed: %s", SPI_result_code_string(rc));
	return SPI_processed;
}

/* eventbus_subscribe(topic, handler, transport, max_attempts) RETURNS bigint */
Datum
eventbus_subscribe(PG_FUNCTION_ARGS)
{
	char	   *topic;
	Oid			handler;
	int			transport;
	int32		max_attempts;
	Oid			types[5] = {TEXTOID, TEXTOID, REGPROCEDUREOID, OIDOID, INT4OID};
	Datum		values[5];
	bool		isnull;
	int64		id;

	eb_require_preload();
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", PG_ARGISNULL(0) ? "topic" : "handler")));
	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	handler = PG_GETARG_OID(1);
	transport = eb_transport_arg(fcinfo, 2);
	max_attempts = PG_ARGISNULL(3) ? 5 : PG_GETARG_INT32(3);

	eb_validate_topic(topic);
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
	exec_as_owner("INSERT INTO eventbus.subscriptions (topic, transport, handler, role_id, max_attempts)"
				  " VALUES ($1, $2, $3, $4, $5)"
				  " ON CONFLICT (topic, transport, handler) DO UPDATE"
				  " SET role_id = EXCLUDED.role_id, max_attempts = EXCLUDED.max_attempts"
				  " RETURNING id",
				  5, types, values, NULL, SPI_OK_INSERT_RETURNING);
	id = DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	SPI_finish();

	eb_wake_at_commit(-1, true);
	PG_RETURN_INT64(id);
}

/* eventbus_unsubscribe(topic, handler, transport) RETURNS boolean */
Datum
eventbus_unsubscribe(PG_FUNCTION_ARGS)
{
	Oid			types[3] = {TEXTOID, TEXTOID, REGPROCEDUREOID};
	Datum		values[3];
	uint64		n;

	eb_require_preload();
	if (PG_ARGISNULL(0) || PG_ARGISNULL(1))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", PG_ARGISNULL(0) ? "topic" : "handler")));
	values[0] = PointerGetDatum(PG_GETARG_TEXT_PP(0));
	values[1] = CStringGetTextDatum(eb_transport_name(eb_transport_arg(fcinfo, 2)));
	values[2] = PG_GETARG_DATUM(1);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	n = exec_as_owner("DELETE FROM eventbus.subscriptions"
					  " WHERE topic = $1 AND transport = $2 AND handler = $3",
					  3, types, values, NULL, SPI_OK_DELETE);
	SPI_finish();

	if (n > 0)
		eb_wake_at_commit(-1, true);
	PG_RETURN_BOOL(n > 0);
}

/*
 * eventbus_replay_dead_letter(id) RETURNS boolean — run the handler again,
 * now, in the caller's transaction, as the subscribing role.
 */
Datum
eventbus_replay_dead_letter(PG_FUNCTION_ARGS)
{
	int64		id = PG_GETARG_INT64(0);
	Oid			types[4] = {INT8OID, TEXTOID, TEXTOID, TEXTOID};
	Datum		values[4];
	bool		isnull;
	Oid			handler;
	Oid			role;
	Datum		envelope;
	ErrorData  *error = NULL;
	bool		ok;

	eb_require_preload();
	values[0] = Int64GetDatum(id);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	exec_as_owner("SELECT s.handler::oid, s.role_id, d.envelope FROM eventbus.dead_letters d"
				  " JOIN eventbus.subscriptions s ON s.id = d.subscription_id WHERE d.id = $1",
				  1, types, values, NULL, SPI_OK_SELECT);
	if (SPI_processed == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("dead letter " INT64_FORMAT " does not exist", id)));
	handler = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	role = DatumGetObjectId(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 2, &isnull));
	envelope = SPI_datumTransfer(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 3, &isnull),
								 false, -1);

	ok = eb_handler_call(handler, role, envelope, &error);
	if (ok)
		exec_as_owner("WITH d AS (UPDATE eventbus.dead_letters SET replayed_at = clock_timestamp()"
					  " WHERE id = $1 RETURNING subscription_id, (envelope).event_id)"
					  " UPDATE eventbus.inbox i SET outcome = 'handled', handled_at = clock_timestamp()"
					  " FROM d WHERE i.subscription_id = d.subscription_id AND i.event_id = d.event_id",
					  1, types, values, NULL, SPI_OK_UPDATE);
	else
	{
		values[1] = CStringGetTextDatum(error->message ? error->message : "unknown error");
		values[2] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
		exec_as_owner("UPDATE eventbus.dead_letters SET attempts = attempts + 1,"
					  " error_message = $2, error_sqlstate = $3, failed_at = clock_timestamp()"
					  " WHERE id = $1",
					  3, types, values, NULL, SPI_OK_UPDATE);
		ereport(WARNING,
				(errmsg("eventbus: replay of dead letter " INT64_FORMAT " failed: %s", id, error->message),
				 errdetail("SQLSTATE %s", unpack_sql_state(error->sqlerrcode))));
	}
	SPI_finish();
	PG_RETURN_BOOL(ok);
}

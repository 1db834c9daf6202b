/*
 * undeliverable.c — eventbus.undeliverable: outbox rows the broker refused
 * for good, and the later rows of their aggregate that wait behind them.
 *
 * The rule that keeps per-(topic, aggregate) order: when the relay moves a
 * failed row here, every later outbox row of the same (transport, topic,
 * aggregate) follows it when the relay reaches it (held_behind = the failed
 * row's id), until the failed row is retried or discarded.  Rows keep their
 * outbox id, so moving them back restores their place in the send order.
 *
 * Only the relay moves rows here; eventbus_retry_undeliverable moves an
 * aggregate's rows back and eventbus_discard_undeliverable deletes rows.  A
 * retry racing the relay can leave a row held behind nothing; the relay
 * returns such rows to the outbox (eb_undeliverable_release) before it
 * sends anything of their aggregate.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"

#include "eventbus.h"
#include "privilege.h"
#include "relay.h"
#include "transport.h"
#include "util.h"

PG_FUNCTION_INFO_V1(eventbus_retry_undeliverable);
PG_FUNCTION_INFO_V1(eventbus_discard_undeliverable);
PG_FUNCTION_INFO_V1(eventbus_undeliverable);

#define OUTBOX_COLS \
	"id, event_id, transport, topic, aggregate_id, event_type, event_version, occurred_at," \
	" trace_id, correlation_id, tenant_id, payload, headers, attempts, last_error"
#define SAME_KEY(a, b) \
	a ".transport OPERATOR(pg_catalog.=) " b ".transport AND " \
	a ".topic OPERATOR(pg_catalog.=) " b ".topic AND " \
	a ".aggregate_id OPERATOR(pg_catalog.=) " b ".aggregate_id"

/* $1 int8[] ids, $2 text[] errors: failed rows, from the outbox to here. */
#define MOVE_FAILED_SQL \
	"WITH f AS (SELECT * FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.text[])) AS f (id, error))," \
	" m AS (DELETE FROM eventbus.outbox o USING f WHERE o.id OPERATOR(pg_catalog.=) f.id" \
	"  RETURNING o.*, f.error)" \
	" INSERT INTO eventbus.undeliverable (" OUTBOX_COLS ", error, failed_at, held_behind)" \
	" SELECT id, event_id, transport, topic, aggregate_id, event_type, event_version, occurred_at," \
	"  trace_id, correlation_id, tenant_id, payload, headers, attempts OPERATOR(pg_catalog.+) 1, error," \
	"  error, pg_catalog.clock_timestamp(), NULL FROM m"

/*
 * $1 transport, $2 int8[] outbox ids: those whose aggregate has a failed
 * row here follow it (only later rows, by id).
 */
#define MOVE_HELD_SQL \
	"WITH h AS (SELECT topic, aggregate_id, pg_catalog.min(id) AS head FROM eventbus.undeliverable" \
	"  WHERE transport OPERATOR(pg_catalog.=) $1 AND held_behind IS NULL" \
	"  AND (topic, aggregate_id) IN (SELECT topic, aggregate_id FROM eventbus.outbox" \
	"   WHERE id OPERATOR(pg_catalog.=) ANY ($2))" \
	"  GROUP BY topic, aggregate_id)," \
	" m AS (DELETE FROM eventbus.outbox o USING h WHERE o.id OPERATOR(pg_catalog.=) ANY ($2)" \
	"  AND o.topic OPERATOR(pg_catalog.=) h.topic AND o.aggregate_id OPERATOR(pg_catalog.=) h.aggregate_id" \
	"  AND o.id OPERATOR(pg_catalog.>) h.head RETURNING o.*, h.head)" \
	" INSERT INTO eventbus.undeliverable (" OUTBOX_COLS ", error, failed_at, held_behind)" \
	" SELECT " OUTBOX_COLS "," \
	"  'waiting behind undeliverable event ' OPERATOR(pg_catalog.||) head::pg_catalog.text," \
	"  pg_catalog.clock_timestamp(), head FROM m"

/* $1 transport: held rows with no failed row of their aggregate before them go back. */
#define RELEASE_SQL \
	"WITH r AS (DELETE FROM eventbus.undeliverable u WHERE u.transport OPERATOR(pg_catalog.=) $1" \
	"  AND u.held_behind IS NOT NULL AND NOT EXISTS (SELECT 1 FROM eventbus.undeliverable h" \
	"   WHERE " SAME_KEY("h", "u") " AND h.held_behind IS NULL AND h.id OPERATOR(pg_catalog.<) u.id)" \
	"  RETURNING u.*)" \
	" INSERT INTO eventbus.outbox (" OUTBOX_COLS ") OVERRIDING SYSTEM VALUE" \
	" SELECT " OUTBOX_COLS " FROM r"

/* $1 id or NULL for all: every row of the id's aggregate goes back. */
#define RETRY_SQL \
	"WITH k AS (SELECT DISTINCT transport, topic, aggregate_id FROM eventbus.undeliverable" \
	"  WHERE $1 IS NULL OR id OPERATOR(pg_catalog.=) $1)," \
	" r AS (DELETE FROM eventbus.undeliverable u USING k WHERE " SAME_KEY("u", "k") " RETURNING u.*)" \
	" INSERT INTO eventbus.outbox (" OUTBOX_COLS ") OVERRIDING SYSTEM VALUE" \
	" SELECT id, event_id, transport, topic, aggregate_id, event_type, event_version, occurred_at," \
	"  trace_id, correlation_id, tenant_id, payload, headers, attempts," \
	"  CASE WHEN held_behind IS NULL THEN error ELSE last_error END FROM r RETURNING transport"

/* $1 id, $2 also the later rows of its aggregate. */
#define DISCARD_SQL \
	"WITH d AS (SELECT transport, topic, aggregate_id, id FROM eventbus.undeliverable" \
	"  WHERE id OPERATOR(pg_catalog.=) $1)" \
	" DELETE FROM eventbus.undeliverable u USING d WHERE u.id OPERATOR(pg_catalog.=) d.id" \
	"  OR ($2 AND " SAME_KEY("u", "d") " AND u.id OPERATOR(pg_catalog.>) d.id)" \
	" RETURNING u.transport"

static SPIPlanPtr move_failed_plan = NULL;
static SPIPlanPtr move_held_plan = NULL;
static SPIPlanPtr release_plan = NULL;
static SPIPlanPtr any_plan = NULL;

/*
 * Relay: move rows that failed permanently here (ids int8[], errors text[],
 * in the relay's transaction).
 */
void
eb_undeliverable_move_failed(Datum ids, Datum errors)
{
	Oid			types[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Datum		args[2] = {ids, errors};

	if (SPI_execute_plan(eb_keep_plan(&move_failed_plan, MOVE_FAILED_SQL, 2, types),
						 args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not move failed events to eventbus.undeliverable");
}

/*
 * Relay: of the given outbox rows, move those whose aggregate has a failed
 * row here behind it.  Returns how many moved.
 */
int
eb_undeliverable_move_held(int transport, int n, Datum *ids)
{
	Oid			types[2] = {TEXTOID, INT8ARRAYOID};
	Datum		args[2];

	args[0] = CStringGetTextDatum(eb_transport_name(transport));
	args[1] = PointerGetDatum(construct_array(ids, n, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (SPI_execute_plan(eb_keep_plan(&move_held_plan, MOVE_HELD_SQL, 2, types),
						 args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not hold events behind eventbus.undeliverable");
	return (int) SPI_processed;
}

/* Relay: does the transport have rows here? */
bool
eb_undeliverable_any(int transport)
{
	Oid			type = TEXTOID;
	Datum		arg = CStringGetTextDatum(eb_transport_name(transport));
	bool		isnull;

	if (SPI_execute_plan(eb_keep_plan(&any_plan,
								   "SELECT EXISTS (SELECT 1 FROM eventbus.undeliverable"
								   " WHERE transport OPERATOR(pg_catalog.=) $1)",
								   1, &type),
						 &arg, NULL, true, 0) != SPI_OK_SELECT || SPI_processed != 1)
		elog(ERROR, "could not read eventbus.undeliverable");
	return DatumGetBool(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
}

/*
 * Return held rows with no failed row of their aggregate before them to the
 * outbox (relay, and the SQL functions after a discard).  Returns how many.
 */
uint64
eb_undeliverable_release(int transport)
{
	Oid			type = TEXTOID;
	Datum		arg = CStringGetTextDatum(eb_transport_name(transport));

	if (SPI_execute_plan(eb_keep_plan(&release_plan, RELEASE_SQL, 1, &type),
						 &arg, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not release held events");
	return SPI_processed;
}

/* Wake the relay at commit for each transport of the result's column 1. */
static void
wake_for_result_transports(void)
{
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		int			t = eb_transport_from_name(SPI_getvalue(SPI_tuptable->vals[i],
															SPI_tuptable->tupdesc, 1));

		if (t >= 0)
			eb_wake_at_commit(t, false);
	}
}

/*
 * eventbus_retry_undeliverable(id bigint DEFAULT NULL) RETURNS bigint —
 * move the event and every other event of its (transport, topic, aggregate)
 * back to the outbox, in their original order; NULL: every event.  Returns
 * how many moved.
 */
Datum
eventbus_retry_undeliverable(PG_FUNCTION_ARGS)
{
	EbSecContext ctx;
	Oid			type = INT8OID;
	Datum		arg = PG_ARGISNULL(0) ? (Datum) 0 : PG_GETARG_DATUM(0);
	char		null = PG_ARGISNULL(0) ? 'n' : ' ';
	uint64		moved;
	int			rc;

	eb_require_preload();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	eb_as_owner_begin(&ctx);
	rc = SPI_execute_with_args(RETRY_SQL, 1, &type, &arg, &null, false, 0);
	eb_as_owner_end(&ctx);
	if (rc != SPI_OK_INSERT_RETURNING)
		elog(ERROR, "could not retry undeliverable events: %s", SPI_result_code_string(rc));
	moved = SPI_processed;
	wake_for_result_transports();
	SPI_finish();

	if (!PG_ARGISNULL(0) && moved == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("undeliverable event " INT64_FORMAT " does not exist", PG_GETARG_INT64(0))));
	PG_RETURN_INT64((int64) moved);
}

/*
 * eventbus_discard_undeliverable(id bigint, include_later boolean DEFAULT
 * false) RETURNS bigint — delete the event (and with include_later the
 * later events of its aggregate here).  Events that waited only behind it
 * go back to the outbox.  Returns how many were deleted.
 */
Datum
eventbus_discard_undeliverable(PG_FUNCTION_ARGS)
{
	EbSecContext ctx;
	Oid			types[2] = {INT8OID, BOOLOID};
	Datum		args[2];
	uint64		deleted;
	int			transport = -1;
	int			rc;

	eb_require_preload();
	if (PG_ARGISNULL(0))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("id must not be null")));
	args[0] = PG_GETARG_DATUM(0);
	args[1] = BoolGetDatum(!PG_ARGISNULL(1) && PG_GETARG_BOOL(1));

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	eb_as_owner_begin(&ctx);
	rc = SPI_execute_with_args(DISCARD_SQL, 2, types, args, NULL, false, 0);
	if (rc == SPI_OK_DELETE_RETURNING && SPI_processed > 0)
	{
		transport = eb_transport_from_name(SPI_getvalue(SPI_tuptable->vals[0],
														SPI_tuptable->tupdesc, 1));
		deleted = SPI_processed;
		if (transport >= 0 && eb_undeliverable_release(transport) > 0)
			eb_wake_at_commit(transport, false);
	}
	else
		deleted = 0;
	eb_as_owner_end(&ctx);
	SPI_finish();

	if (rc != SPI_OK_DELETE_RETURNING)
		elog(ERROR, "could not discard undeliverable events: %s", SPI_result_code_string(rc));
	if (deleted == 0)
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("undeliverable event " INT64_FORMAT " does not exist", PG_GETARG_INT64(0))));
	PG_RETURN_INT64((int64) deleted);
}

/*
 * eventbus_undeliverable() RETURNS SETOF record — the events in
 * eventbus.undeliverable, in send order, without payloads.
 */
Datum
eventbus_undeliverable(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EbSecContext ctx;
	int			rc;

	eb_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	eb_as_owner_begin(&ctx);
	rc = SPI_execute("SELECT id, transport, topic, aggregate_id, event_id, event_type, event_version,"
					 " occurred_at, attempts, error, failed_at, held_behind"
					 " FROM eventbus.undeliverable ORDER BY id", true, 0);
	eb_as_owner_end(&ctx);
	if (rc != SPI_OK_SELECT)
		elog(ERROR, "could not read eventbus.undeliverable");
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		Datum		row[12];
		bool		nulls[12];

		heap_deform_tuple(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, row, nulls);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, row, nulls);
	}
	SPI_finish();
	return (Datum) 0;
}

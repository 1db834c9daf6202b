/*
 * status.c — eventbus_status(): what the background processes report in
 * shared memory, plus the outbox backlog counted from the table.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "privilege.h"
#include "transport.h"

PG_FUNCTION_INFO_V1(eventbus_status);

#define STATUS_COLS 9

/* Outbox rows waiting per transport. */
static void
count_backlog(int64 backlog[EB_NTRANSPORTS])
{
	memset(backlog, 0, sizeof(int64) * EB_NTRANSPORTS);
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) eb_exec_as_owner("SELECT transport, pg_catalog.count(*) FROM eventbus.outbox GROUP BY transport",
							0, NULL, NULL, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		bool		isnull;
		char	   *name = SPI_getvalue(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 1);
		Datum		n = SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, 2, &isnull);
		int			t = eb_transport_from_name(name);

		if (t >= 0)
			backlog[t] = DatumGetInt64(n);
	}
	SPI_finish();
}

/*
 * One row per transport for eventbus.undeliverable: backlog = events there,
 * failed = those that failed themselves (the rest wait behind them), since
 * and detail = the oldest failed one.
 */
static void
add_undeliverable_rows(ReturnSetInfo *rsinfo)
{
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) eb_exec_as_owner("SELECT t.transport, pg_catalog.count(u.id),"
					 " pg_catalog.count(u.id) FILTER (WHERE u.held_behind IS NULL),"
					 " (SELECT f.failed_at FROM eventbus.undeliverable f WHERE f.transport OPERATOR(pg_catalog.=) t.transport"
					 "   AND f.held_behind IS NULL ORDER BY f.id LIMIT 1),"
					 " (SELECT 'event ' OPERATOR(pg_catalog.||) f.id::pg_catalog.text OPERATOR(pg_catalog.||) ': '"
					 "   OPERATOR(pg_catalog.||) f.error FROM eventbus.undeliverable f"
					 "   WHERE f.transport OPERATOR(pg_catalog.=) t.transport AND f.held_behind IS NULL ORDER BY f.id LIMIT 1)"
					 " FROM (VALUES ('kafka'), ('nats')) t (transport)"
					 " LEFT JOIN eventbus.undeliverable u ON u.transport OPERATOR(pg_catalog.=) t.transport"
					 " GROUP BY t.transport ORDER BY t.transport", 0, NULL, NULL, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		Datum		values[STATUS_COLS];
		bool		nulls[STATUS_COLS];
		bool		isnull;
		int64		total = DatumGetInt64(SPI_getbinval(t, d, 2, &isnull));
		char	   *detail = SPI_getvalue(t, d, 5);

		memset(nulls, true, sizeof(nulls));
		values[0] = CStringGetTextDatum("undeliverable");
		nulls[0] = false;
		values[2] = CStringGetTextDatum(SPI_getvalue(t, d, 1));
		nulls[2] = false;
		values[3] = CStringGetTextDatum(total > 0 ? "holding" : "empty");
		nulls[3] = false;
		values[4] = SPI_getbinval(t, d, 4, &nulls[4]);
		if (detail)
		{
			values[5] = CStringGetTextDatum(eb_mask_credentials(detail));
			nulls[5] = false;
		}
		values[6] = Int64GetDatum(total);
		nulls[6] = false;
		values[8] = SPI_getbinval(t, d, 3, &nulls[8]);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
}

/*
 * The share of its topic this instance consumes (0 in shared mode: other
 * instances consume it; -1: unknown), as the dispatcher last reported.
 */
static int
subscription_share(EbShared *snap, int64 id)
{
	for (int k = 0; k < snap->nsubs; k++)
		if (snap->subs[k].id == id)
			return snap->subs[k].share;
	return -1;
}

/* One row per subscription: handled / dead-lettered counts and lag. */
static void
add_subscription_rows(ReturnSetInfo *rsinfo, EbShared *snap)
{
	Datum		values[STATUS_COLS];
	bool		nulls[STATUS_COLS];
	Oid			types[2] = {BOOLOID, OIDOID};
	Datum		args[2];

	/* A non-superuser sees the subscriptions of roles it is a member of. */
	args[0] = BoolGetDatum(superuser());
	args[1] = ObjectIdGetDatum(GetUserId());
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) eb_exec_as_owner("SELECT s.id, s.transport, s.topic OPERATOR(pg_catalog.||) ' -> '"
							   " OPERATOR(pg_catalog.||) s.handler::pg_catalog.text, s.created_at,"
							   " (SELECT pg_catalog.count(*) FROM eventbus.inbox i"
							   "   WHERE i.subscription_id OPERATOR(pg_catalog.=) s.id"
							   "   AND i.outcome OPERATOR(pg_catalog.=) 'handled'),"
							   " (SELECT pg_catalog.count(*) FROM eventbus.dead_letters d"
							   "   WHERE d.subscription_id OPERATOR(pg_catalog.=) s.id AND d.replayed_at IS NULL),"
							   " EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.oid OPERATOR(pg_catalog.=) s.role_id)"
							   " FROM eventbus.subscriptions s"
							   " WHERE $1 OR pg_catalog.pg_has_role($2, s.role_id, 'MEMBER')"
							   " ORDER BY s.id", 2, types, args, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	t = SPI_tuptable->vals[i];
		TupleDesc	d = SPI_tuptable->tupdesc;
		bool		isnull;
		int64		id = DatumGetInt64(SPI_getbinval(t, d, 1, &isnull));

		memset(nulls, false, sizeof(nulls));
		values[0] = CStringGetTextDatum(psprintf("subscription " INT64_FORMAT, id));
		nulls[1] = true;
		values[2] = CStringGetTextDatum(SPI_getvalue(t, d, 2));
		values[3] = CStringGetTextDatum(!DatumGetBool(SPI_getbinval(t, d, 7, &isnull)) ? "owner dropped" :
										!snap->dispatcher_pid ? "inactive" :
										eb_consumer_mode == EB_CONSUMER_SHARED &&
										subscription_share(snap, id) == 0 ? "standby" : "active");
		values[4] = SPI_getbinval(t, d, 4, &isnull);
		values[5] = CStringGetTextDatum(SPI_getvalue(t, d, 3));
		nulls[6] = true;
		for (int k = 0; k < snap->nsubs; k++)
			if (snap->subs[k].id == id)
			{
				values[6] = Int64GetDatum(snap->subs[k].lag);
				nulls[6] = false;
			}
		values[7] = SPI_getbinval(t, d, 5, &isnull);
		values[8] = SPI_getbinval(t, d, 6, &isnull);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}
	SPI_finish();
}

/*
 * eventbus_status() RETURNS TABLE (component, pid, transport, state, since,
 * detail, backlog, processed, failed)
 */
Datum
eventbus_status(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EbShared	snap;
	int64		backlog[EB_NTRANSPORTS];
	Datum		values[STATUS_COLS];
	bool		nulls[STATUS_COLS];

	eb_require_preload();
	InitMaterializedSRF(fcinfo, 0);

	eb_shmem_snapshot(&snap);

	count_backlog(backlog);

	/* The launcher process itself. */
	memset(nulls, true, sizeof(nulls));
	values[0] = CStringGetTextDatum("launcher");
	nulls[0] = false;
	if (snap.launcher_pid != 0)
	{
		values[1] = Int32GetDatum(snap.launcher_pid);
		nulls[1] = false;
		values[4] = TimestampTzGetDatum(snap.launcher_since);
		nulls[4] = false;
	}
	values[3] = CStringGetTextDatum(snap.launcher_pid == 0 ? "stopped" :
									snap.launcher_waiting[0] ? "waiting for database" :
									snap.extension_ready ? "running" :
									"waiting for extension");
	nulls[3] = false;
	if (snap.launcher_pid != 0 && snap.launcher_waiting[0])
	{
		values[5] = CStringGetTextDatum(snap.launcher_waiting);
		nulls[5] = false;
	}
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);

	/* Its producers: one row per transport. */
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		EbBrokerStatus *st = &snap.producer[t];
		EbBrokerState state = snap.launcher_pid == 0 ? EB_BROKER_OFF : st->state;

		memset(nulls, false, sizeof(nulls));
		values[0] = CStringGetTextDatum("launcher");
		values[1] = Int32GetDatum(snap.launcher_pid);
		nulls[1] = snap.launcher_pid == 0;
		values[2] = CStringGetTextDatum(eb_transport_name(t));
		values[3] = CStringGetTextDatum(eb_broker_state_name(state));
		values[4] = TimestampTzGetDatum(st->since);
		nulls[4] = st->since == 0;
		values[5] = CStringGetTextDatum(st->detail);
		nulls[5] = st->detail[0] == '\0';
		values[6] = Int64GetDatum(backlog[t]);
		values[7] = Int64GetDatum((int64) pg_atomic_read_u64(&st->published));
		values[8] = Int64GetDatum((int64) pg_atomic_read_u64(&st->failed));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	/* Events the relay moved aside. */
	add_undeliverable_rows(rsinfo);

	/* The dispatcher and its consumers. */
	memset(nulls, true, sizeof(nulls));
	values[0] = CStringGetTextDatum("dispatcher");
	nulls[0] = false;
	if (snap.dispatcher_pid != 0)
	{
		values[1] = Int32GetDatum(snap.dispatcher_pid);
		nulls[1] = false;
		values[4] = TimestampTzGetDatum(snap.dispatcher_since);
		nulls[4] = false;
	}
	values[3] = CStringGetTextDatum(snap.dispatcher_pid ? "running" : "stopped");
	nulls[3] = false;
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		EbBrokerStatus *st = &snap.consumer[t];

		memset(nulls, true, sizeof(nulls));
		values[0] = CStringGetTextDatum("dispatcher");
		nulls[0] = false;
		values[1] = Int32GetDatum(snap.dispatcher_pid);
		nulls[1] = snap.dispatcher_pid == 0;
		values[2] = CStringGetTextDatum(eb_transport_name(t));
		nulls[2] = false;
		values[3] = CStringGetTextDatum(eb_broker_state_name(snap.dispatcher_pid ? st->state : EB_BROKER_OFF));
		nulls[3] = false;
		values[4] = TimestampTzGetDatum(st->since);
		nulls[4] = st->since == 0;
		values[5] = CStringGetTextDatum(st->detail);
		nulls[5] = st->detail[0] == '\0';
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	/* Pool workers. */
	for (int w = 0; w < snap.nworkers && snap.dispatcher_pid; w++)
	{
		EbWorkerStatus *ws = &snap.workers[w];

		memset(nulls, false, sizeof(nulls));
		values[0] = CStringGetTextDatum(psprintf("worker %d", w));
		values[1] = Int32GetDatum(ws->pid);
		nulls[1] = ws->pid == 0;
		nulls[2] = true;
		values[3] = CStringGetTextDatum(ws->pid ? "running" : "starting");
		values[4] = TimestampTzGetDatum(ws->since);
		nulls[4] = ws->since == 0;
		values[5] = CStringGetTextDatum(psprintf("dead-lettered " UINT64_FORMAT,
												   pg_atomic_read_u64(&ws->dead_lettered)));
		values[6] = Int64GetDatum(ws->queued);
		values[7] = Int64GetDatum((int64) (pg_atomic_read_u64(&ws->handled) +
										   pg_atomic_read_u64(&ws->duplicates)));
		values[8] = Int64GetDatum((int64) pg_atomic_read_u64(&ws->failed));
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	/* Subscriptions, with counts from the inbox and lag from the dispatcher. */
	add_subscription_rows(rsinfo, &snap);

	return (Datum) 0;
}

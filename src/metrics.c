/*
 * metrics.c — eventbus_metrics(), behind the eventbus.metrics view: the
 * counters and gauges monitoring systems scrape (docs/monitoring.md), one
 * row per metric and label set.
 *
 * Counters run from server start (a restart resets them, as Prometheus
 * expects of counters); gauges are read now.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "utils/builtins.h"

#include "eventbus.h"
#include "privilege.h"
#include "transport.h"

PG_FUNCTION_INFO_V1(eventbus_metrics);

#define METRIC_COLS 6

/* One row: name, kind, transport, subscription_id, worker, value. */
static void
put(ReturnSetInfo *rsinfo, const char *name, const char *kind, int transport,
	int64 subscription_id, int worker, double value)
{
	Datum		values[METRIC_COLS];
	bool		nulls[METRIC_COLS];

	memset(nulls, false, sizeof(nulls));
	values[0] = CStringGetTextDatum(name);
	values[1] = CStringGetTextDatum(kind);
	nulls[2] = transport < 0;
	values[2] = transport >= 0 ? CStringGetTextDatum(eb_transport_name(transport)) : (Datum) 0;
	nulls[3] = subscription_id < 0;
	values[3] = Int64GetDatum(subscription_id);
	nulls[4] = worker < 0;
	values[4] = Int32GetDatum(worker);
	values[5] = Float8GetDatum(value);
	tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
}

/* Outbox backlog, its oldest event's age and undeliverable events, per transport. */
static void
put_outbox_gauges(ReturnSetInfo *rsinfo)
{
	int64		backlog[EB_NTRANSPORTS] = {0};
	double		oldest[EB_NTRANSPORTS] = {0};
	int64		undeliverable[EB_NTRANSPORTS] = {0};

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	(void) eb_exec_as_owner("SELECT o.transport, pg_catalog.count(*),"
							" pg_catalog.date_part('epoch', pg_catalog.now() OPERATOR(pg_catalog.-)"
							"  pg_catalog.min(o.occurred_at)), 0::pg_catalog.int8"
							" FROM eventbus.outbox o GROUP BY o.transport"
							" UNION ALL SELECT u.transport, 0, 0, pg_catalog.count(*)"
							" FROM eventbus.undeliverable u GROUP BY u.transport",
							0, NULL, NULL, NULL, SPI_OK_SELECT);
	for (uint64 i = 0; i < SPI_processed; i++)
	{
		HeapTuple	tup = SPI_tuptable->vals[i];
		TupleDesc	desc = SPI_tuptable->tupdesc;
		bool		isnull;
		int			t = eb_transport_from_name(SPI_getvalue(tup, desc, 1));

		if (t < 0)
			continue;
		backlog[t] += DatumGetInt64(SPI_getbinval(tup, desc, 2, &isnull));
		oldest[t] = Max(oldest[t], DatumGetFloat8(SPI_getbinval(tup, desc, 3, &isnull)));
		undeliverable[t] += DatumGetInt64(SPI_getbinval(tup, desc, 4, &isnull));
	}
	SPI_finish();

	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		put(rsinfo, "outbox_backlog", "gauge", t, -1, -1, (double) backlog[t]);
		put(rsinfo, "outbox_oldest_seconds", "gauge", t, -1, -1, oldest[t]);
		put(rsinfo, "undeliverable", "gauge", t, -1, -1, (double) undeliverable[t]);
	}
}

/*
 * eventbus_metrics() RETURNS SETOF (name, kind, transport, subscription_id,
 * worker, value).
 */
Datum
eventbus_metrics(PG_FUNCTION_ARGS)
{
	ReturnSetInfo *rsinfo = (ReturnSetInfo *) fcinfo->resultinfo;
	EbShared	snap;

	eb_require_preload();
	InitMaterializedSRF(fcinfo, 0);
	eb_shmem_snapshot(&snap);

	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		EbTransportCounters *c = &snap.counters[t];

		put(rsinfo, "published_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&c->published));
		put(rsinfo, "relayed_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&snap.producer[t].published));
		put(rsinfo, "relay_failures_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&snap.producer[t].failed));
		put(rsinfo, "relay_rounds_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&snap.producer[t].rounds));
		put(rsinfo, "consumed_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&c->consumed));
		put(rsinfo, "quarantined_total", "counter", t, -1, -1,
			(double) pg_atomic_read_u64(&c->quarantined));
		if (t == EB_TRANSPORT_KAFKA)
			put(rsinfo, "topic_lookups_total", "counter", t, -1, -1,
				(double) pg_atomic_read_u64(&c->topic_lookups));
	}
	put_outbox_gauges(rsinfo);

	for (int w = 0; w < snap.nworkers; w++)
	{
		EbWorkerStatus *ws = &snap.workers[w];

		put(rsinfo, "handled_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->handled));
		put(rsinfo, "duplicates_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->duplicates));
		put(rsinfo, "given_back_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->given_back));
		put(rsinfo, "handler_failures_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->failed));
		put(rsinfo, "dead_lettered_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->dead_lettered));
		put(rsinfo, "worker_busy_seconds_total", "counter", -1, -1, w,
			(double) pg_atomic_read_u64(&ws->busy_us) / 1000000.0);
		put(rsinfo, "worker_queue_depth", "gauge", -1, -1, w,
			snap.dispatcher_pid ? (double) ws->queued : 0.0);
	}

	/* Per-subscription lag, as the dispatcher last measured it. */
	for (int i = 0; i < snap.nsubs && snap.dispatcher_pid; i++)
	{
		put(rsinfo, "subscription_lag", "gauge", -1, snap.subs[i].id, -1,
			(double) snap.subs[i].lag);
		if (snap.subs[i].share >= 0)
			put(rsinfo, "subscription_share", "gauge", -1, snap.subs[i].id, -1,
				(double) snap.subs[i].share);
	}

	return (Datum) 0;
}

/*
 * status.c — eventbus_status(): what the background processes report in
 * shared memory, plus the outbox backlog counted from the table.
 */
#include "postgres.h"

#include "executor/spi.h"
#include "fmgr.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/timestamp.h"

#include "eventbus.h"

PG_FUNCTION_INFO_V1(eventbus_status);

#define STATUS_COLS 9

/* Name of a broker state. */
const char *
eb_broker_state_name(EbBrokerState state)
{
	switch (state)
	{
		case EB_BROKER_OFF:
			return "off";
		case EB_BROKER_CONNECTING:
			return "connecting";
		case EB_BROKER_CONNECTED:
			return "connected";
		case EB_BROKER_DOWN:
			return "down";
	}
	return "unknown";
}

/*
 * Record a producer's connection state; log once per change, never per
 * attempt, so an outage does not flood the server log.
 */
void
eb_set_producer_state(int transport, EbBrokerState state, const char *detail)
{
	EbBrokerStatus *st = &eb_shared->producer[transport];
	bool		changed;

	SpinLockAcquire(&eb_shared->mutex);
	changed = st->state != state;
	if (changed)
	{
		st->state = state;
		st->since = GetCurrentTimestamp();
	}
	if (detail)
		strlcpy(st->detail, detail, sizeof(st->detail));
	SpinLockRelease(&eb_shared->mutex);

	if (!changed)
		return;
	if (state == EB_BROKER_DOWN)
		ereport(LOG,
				(errmsg("eventbus: %s is unreachable, retrying with backoff",
						eb_transport_name(transport)),
				 detail ? errdetail("%s", detail) : 0));
	else
		ereport(LOG,
				(errmsg("eventbus: %s %s", eb_transport_name(transport),
						eb_broker_state_name(state)),
				 detail ? errdetail("%s", detail) : 0));
}

/* Outbox rows waiting per transport. */
static void
count_backlog(int64 backlog[EB_NTRANSPORTS])
{
	memset(backlog, 0, sizeof(int64) * EB_NTRANSPORTS);

	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	if (SPI_execute("SELECT transport, count(*) FROM eventbus.outbox GROUP BY transport",
					true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not count the outbox backlog");
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

	SpinLockAcquire(&eb_shared->mutex);
	memcpy(&snap, eb_shared, sizeof(EbShared));
	SpinLockRelease(&eb_shared->mutex);

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
									snap.extension_ready ? "running" :
									"waiting for extension");
	nulls[3] = false;
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
		values[7] = Int64GetDatum((int64) st->published);
		values[8] = Int64GetDatum((int64) st->failed);
		tuplestore_putvalues(rsinfo->setResult, rsinfo->setDesc, values, nulls);
	}

	return (Datum) 0;
}

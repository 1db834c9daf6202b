/*
 * relay.c — the outbox relay: send committed outbox rows to their broker in
 * id order and delete each row only after the broker acknowledged it.
 *
 * Work proceeds in rounds per transport: read up to relay_batch_size rows,
 * produce them all, wait until every one is acknowledged or failed, delete
 * the acknowledged rows, then start the next round.  A round never starts
 * while the previous one still has events in flight, so a retried event is
 * never overtaken by a later event of its aggregate:
 *  - Kafka: the idempotent producer keeps a partition gap-free and ordered.
 *  - NATS: a round holds at most one event per (topic, aggregate), so any
 *    mix of lost and stored publishes cannot reorder an aggregate.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "miscadmin.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"

#include "eventbus.h"

typedef enum SlotState
{
	SLOT_PENDING = 0,
	SLOT_OK,
	SLOT_FAILED
} SlotState;

/* One transport's relay state. */
typedef struct Round
{
	bool		client_up;		/* producer created */
	char	   *client_config;	/* configuration it was created with */
	bool		active;			/* events in flight */
	int			n;
	int			pending;
	int64	   *ids;
	SlotState  *state;
	char	   *first_error;
	TimestampTz deadline;
	TimestampTz next_try;		/* backoff after a failed round */
	int			backoff_ms;
	bool		more;			/* the last round found rows: look again */
	TimestampTz next_scan;		/* periodic look without a wake-up */
	MemoryContext cxt;			/* reset after every round */
} Round;

static Round rounds[EB_NTRANSPORTS];
static SPIPlanPtr select_plan = NULL;
static SPIPlanPtr delete_plan = NULL;
static SPIPlanPtr fail_plan = NULL;

#define SELECT_SQL \
	"SELECT id, event_id::text, topic, aggregate_id, event_type, event_version," \
	" occurred_at, trace_id, correlation_id, tenant_id, payload::text," \
	" (SELECT pg_catalog.array_agg(key ORDER BY key) FROM pg_catalog.jsonb_each_text(headers))," \
	" (SELECT pg_catalog.array_agg(value ORDER BY key) FROM pg_catalog.jsonb_each_text(headers))" \
	" FROM eventbus.outbox WHERE transport OPERATOR(pg_catalog.=) $1 ORDER BY id LIMIT $2"
#define DELETE_SQL "DELETE FROM eventbus.outbox WHERE id OPERATOR(pg_catalog.=) ANY ($1)"
#define FAIL_SQL \
	"UPDATE eventbus.outbox SET attempts = attempts OPERATOR(pg_catalog.+) 1, last_error = $2" \
	" WHERE id OPERATOR(pg_catalog.=) ANY ($1)"

/* Set up memory; called once by the launcher. */
void
relay_init(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		rounds[t].cxt = AllocSetContextCreate(TopMemoryContext, "eventbus relay round",
											  ALLOCSET_DEFAULT_SIZES);
}

/* The configuration a transport's producer depends on, as one string. */
static char *
client_config(int t)
{
	if (t == EB_TRANSPORT_KAFKA)
		return psprintf("%s|%s|%d", eb_kafka_brokers, eb_kafka_properties, eb_ack_timeout_ms);
	return psprintf("%s|%s|%s", eb_nats_url, eb_nats_credentials_file, eb_nats_token);
}

/* Forget the in-flight round: its rows stay in the outbox and are resent. */
static void
round_reset(Round *r)
{
	r->active = false;
	r->n = r->pending = 0;
	r->ids = NULL;
	r->state = NULL;
	r->first_error = NULL;
	MemoryContextReset(r->cxt);
}

/* Stop one transport's producer. */
static void
stop_client(int t)
{
	Round	   *r = &rounds[t];

	if (!r->client_up)
		return;
	if (t == EB_TRANSPORT_KAFKA)
		kafka_client_stop();
	else
		nats_client_stop();
	r->client_up = false;
	if (r->client_config)
		pfree(r->client_config);
	r->client_config = NULL;
	round_reset(r);
}

/* Close all broker connections (extension dropped, or exiting). */
void
relay_shutdown(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		stop_client(t);
		if (eb_shared)
			eb_set_broker_state(t, EB_BROKER_OFF, "");
	}
}

/*
 * Completion of one slot of the current round.  Called on the launcher's
 * main thread (Kafka delivery reports from rd_kafka_poll, NATS acks drained
 * from nats.c's queue).
 */
void
eb_relay_ack(int transport, int slot, bool ok, const char *err)
{
	Round	   *r = &rounds[transport];

	if (!r->active || slot < 0 || slot >= r->n || r->state[slot] != SLOT_PENDING)
		return;
	r->state[slot] = ok ? SLOT_OK : SLOT_FAILED;
	r->pending--;
	if (!ok && r->first_error == NULL)
		r->first_error = MemoryContextStrdup(r->cxt, err ? err : "unknown error");
}

/* Read a text[] column into a C array of strings. */
static int
text_array(Datum d, bool isnull, char ***out)
{
	Datum	   *elems;
	bool	   *nulls;
	int			n;

	*out = NULL;
	if (isnull)
		return 0;
	deconstruct_array(DatumGetArrayTypeP(d), TEXTOID, -1, false, TYPALIGN_INT,
					  &elems, &nulls, &n);
	*out = palloc(sizeof(char *) * n);
	for (int i = 0; i < n; i++)
		(*out)[i] = nulls[i] ? pstrdup("") : TextDatumGetCString(elems[i]);
	return n;
}

/* Copy one outbox row into an event (in the current memory context). */
static void
row_to_event(HeapTuple tup, TupleDesc desc, EbEvent *ev)
{
	bool		isnull;
	Datum		d;
	int			nvalues;

	memset(ev, 0, sizeof(EbEvent));
	ev->outbox_id = DatumGetInt64(SPI_getbinval(tup, desc, 1, &isnull));
	ev->event_id = SPI_getvalue(tup, desc, 2);
	ev->topic = SPI_getvalue(tup, desc, 3);
	ev->aggregate_id = SPI_getvalue(tup, desc, 4);
	ev->event_type = SPI_getvalue(tup, desc, 5);
	ev->event_version = DatumGetInt64(SPI_getbinval(tup, desc, 6, &isnull));
	ev->occurred_at = DatumGetTimestampTz(SPI_getbinval(tup, desc, 7, &isnull));
	ev->trace_id = SPI_getvalue(tup, desc, 8);
	ev->correlation_id = SPI_getvalue(tup, desc, 9);
	d = SPI_getbinval(tup, desc, 10, &isnull);
	ev->has_tenant = !isnull;
	ev->tenant_id = isnull ? 0 : DatumGetInt32(d);
	ev->payload = SPI_getvalue(tup, desc, 11);
	d = SPI_getbinval(tup, desc, 12, &isnull);
	ev->nheaders = text_array(d, isnull, &ev->header_names);
	d = SPI_getbinval(tup, desc, 13, &isnull);
	nvalues = text_array(d, isnull, &ev->header_values);
	Assert(nvalues == ev->nheaders);
	(void) nvalues;
}

/* Prepare and keep a plan once per process. */
static SPIPlanPtr
keep_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *argtypes)
{
	if (*plan == NULL)
	{
		SPIPlanPtr	p = SPI_prepare(sql, nargs, argtypes);

		if (p == NULL)
			elog(ERROR, "SPI_prepare failed: %s", SPI_result_code_string(SPI_result));
		SPI_keepplan(p);
		*plan = p;
	}
	return *plan;
}

/* Read the next batch of a transport's outbox rows into r->cxt. */
static int
fetch_batch(int t, Round *r, EbEvent **events)
{
	Oid			argtypes[2] = {TEXTOID, INT4OID};
	Datum		args[2];
	int			n;
	MemoryContext old;

	args[0] = CStringGetTextDatum(eb_transport_name(t));
	args[1] = Int32GetDatum(eb_relay_batch_size);

	keep_plan(&select_plan, SELECT_SQL, 2, argtypes);
	if (SPI_execute_plan(select_plan, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "eventbus: could not read the outbox");

	n = (int) SPI_processed;
	old = MemoryContextSwitchTo(r->cxt);
	*events = palloc(sizeof(EbEvent) * Max(n, 1));
	for (int i = 0; i < n; i++)
		row_to_event(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, &(*events)[i]);
	MemoryContextSwitchTo(old);
	return n;
}

/*
 * NATS keeps one event per (topic, aggregate) per round: see the file
 * header.  Returns the new count.
 */
static int
distinct_aggregates(EbEvent *events, int n, MemoryContext cxt)
{
	HASHCTL		ctl;
	HTAB	   *seen;
	int			kept = 0;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = EB_MAX_TOPIC + EB_MAX_AGGREGATE_ID + 2;
	ctl.entrysize = ctl.keysize;
	ctl.hcxt = cxt;
	seen = hash_create("eventbus round keys", n, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);

	for (int i = 0; i < n; i++)
	{
		char		key[EB_MAX_TOPIC + EB_MAX_AGGREGATE_ID + 2];
		bool		found;

		snprintf(key, sizeof(key), "%s\x1f%s", events[i].topic, events[i].aggregate_id);
		(void) hash_search(seen, key, HASH_ENTER, &found);
		if (!found)
			events[kept++] = events[i];
	}
	hash_destroy(seen);
	return kept;
}

/* Start a round: read rows and hand them to the producer. */
static void
start_round(int t, Round *r)
{
	EbEvent    *events;
	StringInfoData buf;
	int			n;
	MemoryContext cxt;

	cxt = eb_xact_begin();
	n = fetch_batch(t, r, &events);
	eb_xact_end(cxt);

	r->more = n > 0;
	if (n == 0)
		return;
	if (t == EB_TRANSPORT_NATS)
		n = distinct_aggregates(events, n, r->cxt);

	r->ids = MemoryContextAllocZero(r->cxt, sizeof(int64) * n);
	r->state = MemoryContextAllocZero(r->cxt, sizeof(SlotState) * n);
	r->n = r->pending = n;
	r->first_error = NULL;
	r->active = true;
	r->deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), eb_ack_timeout_ms);

	if (t == EB_TRANSPORT_NATS)
		nats_publish_begin(events, n);
	else
		kafka_begin_round();

	initStringInfo(&buf);
	for (int i = 0; i < n; i++)
	{
		char	   *err = NULL;
		bool		ok;

		r->ids[i] = events[i].outbox_id;
		resetStringInfo(&buf);
		eb_envelope_encode(&buf, &events[i]);
		if (t == EB_TRANSPORT_KAFKA)
			ok = kafka_produce(&events[i], buf.data, buf.len, i, &err);
		else
			ok = nats_publish(&events[i], buf.data, buf.len, i, &err);
		if (!ok)
			eb_relay_ack(t, i, false, err);
	}
	pfree(buf.data);
}

/* Collect ids of slots in a given state into an int8[] datum. */
static Datum
ids_in_state(Round *r, SlotState state, int *count)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(r->n, 1));
	int			k = 0;

	for (int i = 0; i < r->n; i++)
		if (r->state[i] == state)
			d[k++] = Int64GetDatum(r->ids[i]);
	*count = k;
	return PointerGetDatum(construct_array(d, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
}

/* End a round: delete acknowledged rows, note failures, set backoff. */
static void
finish_round(int t, Round *r)
{
	Oid			argtypes[2] = {INT8ARRAYOID, TEXTOID};
	Datum		args[2];
	int			nok;
	int			nfailed;
	MemoryContext cxt;
	MemoryContext old = MemoryContextSwitchTo(r->cxt);

	/* Anything still pending (NATS ack timeout) failed. */
	for (int i = 0; i < r->n; i++)
		if (r->state[i] == SLOT_PENDING)
			eb_relay_ack(t, i, false, "no acknowledgement within eventbus.ack_timeout");

	cxt = eb_xact_begin();

	args[0] = ids_in_state(r, SLOT_OK, &nok);
	if (nok > 0)
	{
		keep_plan(&delete_plan, DELETE_SQL, 1, argtypes);
		if (SPI_execute_plan(delete_plan, args, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "eventbus: could not delete relayed outbox rows");
	}
	args[0] = ids_in_state(r, SLOT_FAILED, &nfailed);
	if (nfailed > 0)
	{
		args[1] = CStringGetTextDatum(r->first_error ? r->first_error : "unknown error");
		keep_plan(&fail_plan, FAIL_SQL, 2, argtypes);
		if (SPI_execute_plan(fail_plan, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "eventbus: could not record relay failures");
	}

	eb_xact_end(cxt);
	MemoryContextSwitchTo(old);

	SpinLockAcquire(&eb_shared->mutex);
	eb_shared->producer[t].published += nok;
	eb_shared->producer[t].failed += nfailed;
	SpinLockRelease(&eb_shared->mutex);

	if (nfailed > 0)
	{
		r->backoff_ms = Min(Max(r->backoff_ms * 2, 200), 10000);
		r->next_try = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), r->backoff_ms);
		eb_set_broker_state(t, t == EB_TRANSPORT_KAFKA && !kafka_connected() ?
							EB_BROKER_DOWN : eb_shared->producer[t].state,
							r->first_error);
	}
	else
	{
		r->backoff_ms = 0;
		r->next_try = 0;
	}
	round_reset(r);
}

/* Milliseconds from now until ts, at least 0. */
static long
ms_until(TimestampTz ts)
{
	long		secs;
	int			usecs;

	TimestampDifference(GetCurrentTimestamp(), ts, &secs, &usecs);
	return secs * 1000 + usecs / 1000;
}

/* One transport's share of a relay step; returns the wait it wants. */
static long
step_transport(int t, bool woken)
{
	Round	   *r = &rounds[t];
	bool		kafka = t == EB_TRANSPORT_KAFKA;
	char	   *config;

	if (!eb_transport_configured(t))
	{
		stop_client(t);
		eb_set_broker_state(t, EB_BROKER_OFF, "");
		return 1000;
	}

	config = client_config(t);
	if (r->client_up && strcmp(config, r->client_config) != 0)
	{
		ereport(LOG, (errmsg("eventbus: %s configuration changed, reconnecting",
							 eb_transport_name(t))));
		stop_client(t);
	}
	if (!r->client_up)
	{
		r->client_up = kafka ? kafka_producer_start() : nats_client_start("eventbus relay");
		if (!r->client_up)
			return 1000;
		r->client_config = MemoryContextStrdup(TopMemoryContext, config);
	}
	pfree(config);

	if (kafka)
	{
		kafka_producer_poll();
		if (kafka_fatal())
		{
			/* The idempotent producer cannot continue: start a new one. */
			stop_client(t);
			return 1000;
		}
		kafka_probe();
	}
	else
		nats_producer_poll();

	if (r->active)
	{
		if (r->pending == 0)
			finish_round(t, r);
		else if (!kafka && GetCurrentTimestamp() >= r->deadline)
		{
			nats_publish_abandon();
			finish_round(t, r);
		}
		else
			return kafka ? 100 : Max(ms_until(r->deadline), 1);
	}

	if (r->next_try != 0 && GetCurrentTimestamp() < r->next_try)
		return Max(ms_until(r->next_try), 1);
	if (!(kafka ? kafka_connected() : nats_connected()))
		return kafka ? 200 : 1000;

	/*
	 * Read the outbox only when there may be rows: a commit published to
	 * this transport, the last round found some, or the periodic scan (for
	 * prepared transactions and rows from before a restart) is due.
	 */
	if (!woken && !r->more && GetCurrentTimestamp() < r->next_scan)
		return Max(ms_until(r->next_scan), 1);
	r->next_scan = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
	start_round(t, r);
	if (r->active)
		return kafka ? 100 : Max(ms_until(r->deadline), 1);
	/* Idle: the periodic scan picks up prepared transactions and strays. */
	return 1000;
}

/*
 * One pass of the relay over both transports.  Returns how long the
 * launcher may sleep (ms) before it must call again; commits and broker
 * events wake it sooner.
 */
long
relay_step(void)
{
	volatile long timeout = 1000;
	uint32		pending;

	SpinLockAcquire(&eb_shared->mutex);
	pending = eb_shared->relay_pending;
	eb_shared->relay_pending = 0;
	SpinLockRelease(&eb_shared->mutex);

	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		MemoryContext oldcxt = CurrentMemoryContext;

		PG_TRY();
		{
			timeout = Min(timeout, step_transport(t, (pending & (1u << t)) != 0));
		}
		PG_CATCH();
		{
			/* A database error (e.g. extension being dropped): back off. */
			MemoryContextSwitchTo(oldcxt);
			EmitErrorReport();
			FlushErrorState();
			AbortOutOfAnyTransaction();
			rounds[t].next_try = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
			rounds[t].more = true;	/* look again after the backoff */
			timeout = Min(timeout, 1000);
		}
		PG_END_TRY();
	}
	return timeout;
}

/*
 * relay.c — the outbox relay: send committed outbox rows to their broker in
 * id order and delete each row only after the broker acknowledged it.
 *
 * Work proceeds in rounds per transport: read up to relay_batch_size rows,
 * produce them, wait until every one is acknowledged or failed, then record
 * the outcomes (one transaction) and start the next round.  A round never
 * starts while the previous one still has events in flight, and a failure
 * never lets an aggregate's later event reach the broker before an earlier
 * one:
 *  - on a transport that acknowledges each message on its own (NATS), an
 *    aggregate has at most one event in flight: its next event in the round
 *    is sent once the previous one is acknowledged (the round goes in
 *    waves, each sent when everything before is in), so any mix of lost,
 *    refused and stored publishes cannot reorder it.  Once commits arrived
 *    during the round, waves go on only until relay_interval after its
 *    start, when the next round would be due: the rest is read again with
 *    them, so a long chain of one aggregate does not hold the others' new
 *    events back for longer;
 *  - a transport that keeps a partition in order through failures (Kafka's
 *    idempotent producer with enable.gapless.guarantee: a batch the broker
 *    refuses for good makes the producer fail instead of renumbering and
 *    sending the batches after it) gets them all at once; when its client
 *    fails, the round is finished with what is known and a new client
 *    started;
 *  - after an event failed (or the client refused it before sending), the
 *    rest of its aggregate's events in the round are not sent.
 *
 * Outcomes, per row:
 *  - acknowledged: the row is deleted;
 *  - permanent failure (the broker or client can never take it as it is,
 *    as the transport classifies its errors): the row moves to
 *    eventbus.undeliverable, and from then on every later row of its
 *    (transport, topic, aggregate) follows it there when the relay reaches
 *    it, until the row is retried or discarded (undeliverable.c);
 *  - transient failure: the row stays, its (topic, aggregate) backs off
 *    (0.2 s doubling to 10 s) while every other aggregate keeps flowing.
 *
 * Reads start above a floor (relay_floor.c): an id below which every row
 * is gone for good.
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

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "relay.h"
#include "transport.h"
#include "util.h"

typedef enum SlotState
{
	SLOT_WAITING = 0,			/* not sent yet: behind its aggregate's previous event */
	SLOT_PENDING,				/* sent, outcome not known */
	SLOT_OK,
	SLOT_FAILED,				/* transient */
	SLOT_FAILED_PERMANENT
} SlotState;

/* One transport's relay state. */
typedef struct Round
{
	bool		client_up;		/* producer created */
	char	   *client_config;	/* configuration it was created with */
	bool		active;			/* events in flight */
	int			n;
	int			pending;		/* slots without an outcome (waiting or sent) */
	int			in_flight;		/* slots sent without an outcome */
	EbEvent    *events;			/* the round's events */
	int		   *prev;			/* previous slot of the same aggregate, or -1 */
	int		   *next;			/* next slot of the same aggregate, or -1 */
	int		   *wave;			/* slots sent last time (nwave; -1: none yet) */
	int			nwave;
	int		   *ready;			/* scratch: candidates for the next wave */
	SlotState  *state;
	char	  **errors;			/* per failed slot */
	TimestampTz deadline;
	TimestampTz next_try;		/* backoff after a database error */
	bool		more;			/* the last round found rows: look again */
	TimestampTz next_scan;		/* periodic look without a wake-up */
	bool		undeliverable;	/* eventbus.undeliverable may hold rows of ours */
	TimestampTz next_release;	/* next look for rows held behind nothing */
	TimestampTz backoff_due;	/* when a backed-off aggregate may be retried */
	HTAB	   *backoff;		/* aggregates backing off (relay_keys.c) */
	MemoryContext cxt;			/* reset after every round */
	TimestampTz last_start;		/* when the last round looked for rows */
	bool		left_behind;	/* the last round left rows it read unsent */
	bool		outpaced;		/* commits arrived while the last round ran */
	TimestampTz next_read_past; /* the next read past long chains (fetch_batch) */
	EbReadFloor floor;			/* where reads start (relay_floor.c) */
} Round;

/* Rows of one aggregate in a full batch that make it a long chain (fetch_batch). */
#define LONG_CHAIN	16

static Round rounds[EB_NTRANSPORTS];
/* The read's plans: [transport][held variant][with the backoff filter]. */
static SPIPlanPtr read_plan[EB_NTRANSPORTS][2][2];
static SPIPlanPtr delete_plan = NULL;
static SPIPlanPtr fail_plan = NULL;

/*
 * Rows in id order after id $4, without the aggregates backing off ($2, $3:
 * topics and aggregate ids).  The held variant also says whether a row's
 * aggregate has rows in eventbus.undeliverable: such a row must wait (not
 * be sent), in the same snapshot that found it.  The transport is a
 * literal (%s), one plan per transport: kept plans are generic, and a
 * generic plan for "transport = $1" cannot tell from the statistics that
 * one transport has a large backlog (the other's broker down) and would
 * walk it, in id order, at every round of the other.  No aggregate backs
 * off most of the time: then a plan without that filter is used, and the
 * headers are read as jsonb and split in C (row_to_event).  A round pays
 * for every sub-select and function scan of its read when the executor
 * starts, rows or not: they had been a fifth of the launcher's main
 * thread at one event per round.
 */
#define SELECT_COLS \
	"SELECT id, event_id::text, topic, aggregate_id, event_type, event_version," \
	" occurred_at, trace_id, correlation_id, tenant_id, payload::text, headers,"
#define SELECT_HELD \
	" EXISTS (SELECT 1 FROM eventbus.undeliverable u WHERE u.transport OPERATOR(pg_catalog.=) o.transport" \
	"  AND u.topic OPERATOR(pg_catalog.=) o.topic AND u.aggregate_id OPERATOR(pg_catalog.=) o.aggregate_id)"
#define SELECT_FROM \
	" FROM eventbus.outbox o WHERE transport OPERATOR(pg_catalog.=) %s"
#define SELECT_BACKOFF \
	" AND NOT EXISTS (SELECT 1 FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.text[])) b (t, a)" \
	"  WHERE b.t OPERATOR(pg_catalog.=) o.topic AND b.a OPERATOR(pg_catalog.=) o.aggregate_id)"
#define SELECT_ORDER \
	" AND id OPERATOR(pg_catalog.>) $4 ORDER BY id LIMIT $1"
#define DELETE_SQL "DELETE FROM eventbus.outbox WHERE id OPERATOR(pg_catalog.=) ANY ($1)"
#define FAIL_SQL \
	"UPDATE eventbus.outbox o SET attempts = o.attempts OPERATOR(pg_catalog.+) 1, last_error = f.error" \
	" FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[]), pg_catalog.unnest($2::pg_catalog.text[])) f (id, error)" \
	" WHERE o.id OPERATOR(pg_catalog.=) f.id"

/* Set up memory; called once by the launcher. */
void
eb_relay_init(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		rounds[t].cxt = AllocSetContextCreate(TopMemoryContext, "eventbus relay round",
											  ALLOCSET_DEFAULT_SIZES);
		rounds[t].backoff = eb_backoff_create();
		rounds[t].undeliverable = true; /* look once */
	}
}

/* Forget the in-flight round: its rows stay in the outbox and are resent. */
static void
round_reset(Round *r)
{
	r->active = false;
	r->n = r->pending = r->in_flight = 0;
	r->events = NULL;
	r->prev = r->next = r->wave = r->ready = NULL;
	r->nwave = -1;
	r->state = NULL;
	r->errors = NULL;
	MemoryContextReset(r->cxt);
}

/* Stop one transport's producer. */
static void
stop_client(int t)
{
	Round	   *r = &rounds[t];

	if (!r->client_up)
		return;
	eb_transport(t)->producer_stop();
	r->client_up = false;
	if (r->client_config)
		pfree(r->client_config);
	r->client_config = NULL;
	round_reset(r);
	eb_backoff_clear(r->backoff);
	r->undeliverable = true;
}

/* Close all broker connections (extension dropped, or exiting). */
void
eb_relay_shutdown(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		stop_client(t);
		if (eb_shared)
			eb_set_broker_state(t, EB_BROKER_OFF, "");
	}
}

/*
 * Completion of one slot of the current round: the producers' EbAckFn,
 * called on the launcher's main thread from their poll.
 */
static void
relay_ack(int transport, int slot, EbDelivery result, const char *err)
{
	Round	   *r = &rounds[transport];

	if (!r->active || slot < 0 || slot >= r->n || r->state[slot] != SLOT_PENDING)
		return;
	r->state[slot] = result == EB_DELIVERED ? SLOT_OK :
		result == EB_FAILED_PERMANENT ? SLOT_FAILED_PERMANENT : SLOT_FAILED;
	r->pending--;
	r->in_flight--;
	if (result != EB_DELIVERED)
		r->errors[slot] = MemoryContextStrdup(r->cxt, err ? err : "unknown error");
}

/* Copy one outbox row into an event (in the current memory context). */
static void
row_to_event(HeapTuple tup, TupleDesc desc, EbEvent *ev)
{
	bool		isnull;
	Datum		d;

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
	if (!isnull)
		(void) eb_event_headers_from_jsonb(DatumGetJsonbP(d), ev);
	eb_event_to_utf8(ev);
}

/*
 * Read up to relay_batch_size rows with ids greater than after, leaving out
 * the nbackoff aggregates in topics and aggregates (text[]), into *events and *held
 * (allocated in r->cxt).  (*held)[i] says whether row i must wait behind an
 * undeliverable row of its aggregate.  Runs in the round's snapshot (read
 * only).
 */
static int
read_rows(int t, Round *r, int64 after, int nbackoff, Datum topics, Datum aggregates,
		  EbEvent **events, bool **held)
{
	Oid			argtypes[4] = {INT4OID, TEXTARRAYOID, TEXTARRAYOID, INT8OID};
	Datum		args[4];
	int			n;
	MemoryContext old;
	SPIPlanPtr *keep = &read_plan[t][r->undeliverable][nbackoff > 0];

	args[0] = Int32GetDatum(eb_relay_batch_size);
	args[1] = topics;
	args[2] = aggregates;
	args[3] = Int64GetDatum(after);
	if (*keep == NULL)
	{
		char	   *sql = psprintf(SELECT_COLS "%s" SELECT_FROM "%s" SELECT_ORDER,
								   r->undeliverable ? SELECT_HELD : " false",
								   quote_literal_cstr(eb_transport_name(t)),
								   nbackoff > 0 ? SELECT_BACKOFF : "");

		(void) eb_keep_plan(keep, sql, 4, argtypes);
		pfree(sql);
	}
	if (SPI_execute_plan(*keep, args, NULL, true, 0) != SPI_OK_SELECT)
		elog(ERROR, "could not read the outbox");

	n = (int) SPI_processed;
	old = MemoryContextSwitchTo(r->cxt);
	*events = palloc(sizeof(EbEvent) * Max(n, 1));
	*held = palloc(sizeof(bool) * Max(n, 1));
	for (int i = 0; i < n; i++)
	{
		bool		isnull;

		row_to_event(SPI_tuptable->vals[i], SPI_tuptable->tupdesc, &(*events)[i]);
		(*held)[i] = DatumGetBool(SPI_getbinval(SPI_tuptable->vals[i], SPI_tuptable->tupdesc,
												13, &isnull));
	}
	MemoryContextSwitchTo(old);
	SPI_freetuptable(SPI_tuptable);
	return n;
}

/*
 * Read the next rows of a transport's outbox (see read_rows); returns how
 * many.
 *
 * Where the transport keeps one event per aggregate in flight, a full batch
 * whose rows are mostly a few long chains (an aggregate's thousands of
 * events in one transaction) takes a wave per event, and rows after it are
 * not read until the chains are shorter than the batch: every other
 * aggregate would wait seconds behind one.  So a full batch holding an
 * aggregate with LONG_CHAIN rows or more is followed by a second read, in
 * the same snapshot, of the rows after it without those aggregates: each
 * aggregate still gets a prefix of its rows, in order.  It leaves out the
 * aggregates backing off as the batch did (the same moment: one whose
 * backoff ended in between would have its later rows read without its
 * earlier ones).  That read walks the long chains' rows after the batch, so
 * it runs at most a fifth of the time (the next one waits four times as
 * long as this one took).
 */
static int
fetch_batch(int t, Round *r, EbEvent **events, bool **held, TimestampTz *earliest)
{
	Datum		topics;
	Datum		aggregates;
	int			n;
	int			nb;
	TimestampTz now = GetCurrentTimestamp();

	nb = eb_backoff_arrays(r->backoff, now, NULL, 0, &topics, &aggregates, earliest,
					  &r->floor.excluded_from);
	n = read_rows(t, r, r->floor.floor, nb, topics, aggregates, events, held);
	r->floor.read_end = n == eb_relay_batch_size ? (*events)[n - 1].outbox_id : PG_INT64_MAX;

	if (n == eb_relay_batch_size && eb_transport(t)->one_per_aggregate &&
		now >= r->next_read_past)
	{
		EbEvent    *heads = palloc(sizeof(EbEvent) * n);
		int			nlong = eb_long_chains(*events, n, LONG_CHAIN, heads, CurrentMemoryContext);

		if (nlong > 0)
		{
			TimestampTz start = GetCurrentTimestamp();
			TimestampTz end;
			TimestampTz ignored;
			int64		ignored_id;
			EbEvent    *more;
			bool	   *more_held;
			int			m;

			nb = eb_backoff_arrays(r->backoff, now, heads, nlong, &topics, &aggregates, &ignored, &ignored_id);
			m = read_rows(t, r, (*events)[n - 1].outbox_id, nb, topics, aggregates, &more, &more_held);
			if (m > 0)
			{
				*events = repalloc(*events, sizeof(EbEvent) * (n + m));
				*held = repalloc(*held, sizeof(bool) * (n + m));
				memcpy(*events + n, more, sizeof(EbEvent) * m);
				memcpy(*held + n, more_held, sizeof(bool) * m);
				n += m;
			}
			end = GetCurrentTimestamp();
			r->next_read_past = end + 4 * (end - start);
		}
	}
	return n;
}

/*
 * Rows whose aggregate has rows in eventbus.undeliverable are not sent:
 * move them there too (behind their aggregate's failed row), and leave
 * them out of the round.  Returns the new count.  Runs in the transaction
 * that read them.
 */
static int
set_aside_held(int t, Round *r, EbEvent *events, bool *held, int n)
{
	Datum	   *ids = palloc(sizeof(Datum) * Max(n, 1));
	int			nheld = 0;
	int			kept = 0;

	for (int i = 0; i < n; i++)
		if (held[i])
			ids[nheld++] = Int64GetDatum(events[i].outbox_id);
	if (nheld > 0)
	{
		int			nmoved = eb_undeliverable_move_held(t, nheld, ids);

		/*
		 * A row not moved waits behind rows whose failed row was just retried
		 * or discarded: let them go back to the outbox now.
		 */
		if (nmoved < nheld)
			(void) eb_undeliverable_release(t);
		for (int i = 0; i < n; i++)
			if (!held[i])
				events[kept++] = events[i];
			else
				eb_backoff_forget(r->backoff, &events[i]);
		n = kept;
	}
	r->undeliverable = eb_undeliverable_any(t);
	return n;
}

/*
 * Send the round's events that may go now: at the start every event whose
 * aggregate's previous event in the round is not in its way; after that
 * the next event of each aggregate whose last one sent was acknowledged.
 * An event waits until its aggregate's previous event in the round is
 * acknowledged, or, on a transport that keeps a partition in order through
 * failures, only until it was handed to the client.  Behind a failed event
 * it is not sent in this round: it stays in the outbox, untouched, for the
 * next round (its aggregate backing off, or moved aside behind a permanent
 * failure).  Each call looks only at its candidates, so one aggregate's
 * long chain costs a round O(n), not a scan of the round per event.
 */
static void
send_ready(int t, Round *r)
{
	const EbTransportRoutine *tr = eb_transport(t);
	StringInfoData buf;
	int			ncand = 0;

	if (r->nwave < 0)
		for (int i = 0; i < r->n; i++)
			r->ready[ncand++] = i;
	else
		for (int k = 0; k < r->nwave; k++)
			if (r->state[r->wave[k]] == SLOT_OK && r->next[r->wave[k]] >= 0)
				r->ready[ncand++] = r->next[r->wave[k]];
	r->nwave = 0;

	initStringInfo(&buf);
	for (int k = 0; k < ncand; k++)
	{
		int			i = r->ready[k];
		int			p = r->prev[i];
		char	   *err = NULL;
		bool		permanent = false;

		if (r->state[i] != SLOT_WAITING)
			continue;
		if (p >= 0 && r->state[p] != SLOT_OK &&
			(tr->one_per_aggregate || r->state[p] != SLOT_PENDING))
			continue;
		r->state[i] = SLOT_PENDING;
		r->in_flight++;
		r->wave[r->nwave++] = i;
		resetStringInfo(&buf);
		eb_envelope_encode(&buf, &r->events[i]);
		if (!tr->produce(&r->events[i], buf.data, buf.len, i, &err, &permanent))
			relay_ack(t, i, permanent ? EB_FAILED_PERMANENT : EB_FAILED_TRANSIENT, err);
	}
	pfree(buf.data);
	if (r->nwave > 0 && tr->wave_sent)
		tr->wave_sent(r->n);
	if (r->nwave > 0)
		r->deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), eb_ack_timeout_ms);
}

/*
 * Start a round: read rows and hand them to the producer.  Returns the
 * first moment a backed-off aggregate may be retried (0: none).
 */
static TimestampTz
start_round(int t, Round *r)
{
	const EbTransportRoutine *tr = eb_transport(t);
	EbEvent    *events;
	bool	   *held;
	int			n;
	int			fetched;
	MemoryContext cxt;
	TimestampTz earliest;

	cxt = eb_xact_begin();
	/*
	 * Once a second: return rows held behind nothing (a retry raced the
	 * relay), and look whether rows appeared that the relay did not move
	 * there itself (a restored dump).
	 */
	if (GetCurrentTimestamp() >= r->next_release)
	{
		if (r->undeliverable)
			(void) eb_undeliverable_release(t);
		else
			r->undeliverable = eb_undeliverable_any(t);
		r->next_release = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 1000);
	}
	eb_floor_begin(&r->floor, r->undeliverable);
	fetched = n = fetch_batch(t, r, &events, &held, &earliest);
	if (r->undeliverable)
		n = set_aside_held(t, r, events, held, n);
	eb_xact_end(cxt);
	if (fetched == 0)
		eb_floor_raise(&r->floor, r->undeliverable, PG_INT64_MAX);

	/* Look again at once only if this round sends or moved something. */
	r->more = fetched > 0 && (n > 0 || fetched >= eb_relay_batch_size);
	r->left_behind = fetched >= eb_relay_batch_size;
	if (n == 0)
		return earliest;

	r->events = events;
	r->prev = MemoryContextAlloc(r->cxt, sizeof(int) * n);
	eb_aggregate_chains(events, n, r->prev, r->cxt);
	r->next = MemoryContextAlloc(r->cxt, sizeof(int) * n);
	memset(r->next, -1, sizeof(int) * n);
	for (int i = 0; i < n; i++)
		if (r->prev[i] >= 0)
			r->next[r->prev[i]] = i;
	r->wave = MemoryContextAlloc(r->cxt, sizeof(int) * n);
	r->ready = MemoryContextAlloc(r->cxt, sizeof(int) * n);
	r->nwave = -1;
	r->state = MemoryContextAllocZero(r->cxt, sizeof(SlotState) * n);
	r->errors = MemoryContextAllocZero(r->cxt, sizeof(char *) * n);
	r->n = r->pending = n;
	r->in_flight = 0;
	r->active = true;
	pg_atomic_fetch_add_u64(&eb_shared->producer[t].rounds, 1);

	tr->round_begin(events, n);
	send_ready(t, r);
	return earliest;
}

/* Ids (and errors) of slots in a given state, as int8[] and text[] datums. */
static int
slots_in_state(Round *r, SlotState state, Datum *ids, Datum *errors)
{
	Datum	   *d = palloc(sizeof(Datum) * Max(r->n, 1));
	Datum	   *e = palloc(sizeof(Datum) * Max(r->n, 1));
	int			k = 0;

	for (int i = 0; i < r->n; i++)
		if (r->state[i] == state)
		{
			d[k] = Int64GetDatum(r->events[i].outbox_id);
			e[k++] = CStringGetTextDatum(r->errors[i] ? r->errors[i] : "");
		}
	*ids = PointerGetDatum(construct_array(d, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	if (errors)
		*errors = PointerGetDatum(construct_array(e, k, TEXTOID, -1, false, TYPALIGN_INT));
	return k;
}

/*
 * The lowest id of the round's rows still in the outbox once its outcomes
 * are recorded: neither delivered nor moved aside (PG_INT64_MAX: none).
 */
static int64
lowest_left(const Round *r)
{
	int64		lowest = PG_INT64_MAX;

	for (int i = 0; i < r->n; i++)
		if (r->state[i] != SLOT_OK && r->state[i] != SLOT_FAILED_PERMANENT)
			lowest = Min(lowest, r->events[i].outbox_id);
	return lowest;
}

/*
 * End a round: delete acknowledged rows, move permanently failed ones to
 * eventbus.undeliverable, note transient failures and back their
 * aggregates off.  Events still pending failed for the reason given.
 */
static void
finish_round(int t, Round *r, const char *pending_reason)
{
	Oid			argtypes[2] = {INT8ARRAYOID, TEXTARRAYOID};
	Datum		args[2];
	int			nok;
	int			nfailed;
	int			npermanent;
	bool		connected;
	const char *first_error = NULL;
	MemoryContext cxt;
	MemoryContext old = MemoryContextSwitchTo(r->cxt);

	for (int i = 0; i < r->n; i++)
		if (r->state[i] == SLOT_PENDING)
			relay_ack(t, i, EB_FAILED_TRANSIENT, pending_reason);

	cxt = eb_xact_begin();

	nok = slots_in_state(r, SLOT_OK, &args[0], NULL);
	if (nok > 0)
	{
		eb_keep_plan(&delete_plan, DELETE_SQL, 1, argtypes);
		if (SPI_execute_plan(delete_plan, args, NULL, false, 0) != SPI_OK_DELETE)
			elog(ERROR, "could not delete relayed outbox rows");
	}
	npermanent = slots_in_state(r, SLOT_FAILED_PERMANENT, &args[0], &args[1]);
	if (npermanent > 0)
	{
		eb_undeliverable_move_failed(args[0], args[1]);
		r->undeliverable = true;
	}
	nfailed = slots_in_state(r, SLOT_FAILED, &args[0], &args[1]);
	if (nfailed > 0)
	{
		eb_keep_plan(&fail_plan, FAIL_SQL, 2, argtypes);
		if (SPI_execute_plan(fail_plan, args, NULL, false, 0) != SPI_OK_UPDATE)
			elog(ERROR, "could not record relay failures");
	}

	eb_xact_end(cxt);
	eb_floor_raise(&r->floor, r->undeliverable, lowest_left(r));

	eb_shmem_add_published(t, nok, nfailed + npermanent);

	if (npermanent > 0)
		ereport(LOG,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("%d %s event(s) cannot be delivered, moved to eventbus.undeliverable",
						npermanent, eb_transport_name(t))));

	/*
	 * A transient failure backs off its aggregate only; failures while the
	 * connection is down need no backoff of their own (no round starts
	 * until it is back).
	 */
	connected = eb_transport(t)->connected();
	for (int i = 0; i < r->n; i++)
	{
		if (r->state[i] == SLOT_FAILED)
		{
			if (first_error == NULL)
				first_error = r->errors[i];
			if (connected)
				eb_backoff_fail(r->backoff, &r->events[i]);
		}
		else if (r->state[i] == SLOT_WAITING)
			r->left_behind = r->more = true;	/* not sent: read again at once */
		else
			eb_backoff_forget(r->backoff, &r->events[i]);
	}
	if (first_error)
		eb_set_broker_state(t, connected ? eb_shared->producer[t].state : EB_BROKER_DOWN,
							first_error);
	MemoryContextSwitchTo(old);
	round_reset(r);
}

/*
 * The wait while a round is in flight: acks wake the launcher, so until the
 * round's deadline; a client that reports every event itself is polled.
 */
static long
round_wait(const EbTransportRoutine *tr, Round *r)
{
	if (tr->round_abandon == NULL)
		return 100;
	return Max(eb_ms_until(r->deadline), 1);
}

/*
 * When the next round of a transport whose commits outpaced its last one is
 * due: eventbus.relay_interval after the last round started.
 */
static TimestampTz
next_round_due(const Round *r)
{
	return TimestampTzPlusMilliseconds(r->last_start, eb_relay_interval_ms);
}

/* One transport's share of a relay step; returns the wait it wants. */
static long
step_transport(int t, bool woken)
{
	const EbTransportRoutine *tr = eb_transport(t);
	Round	   *r = &rounds[t];
	char	   *config;

	if (!tr->configured())
	{
		stop_client(t);
		eb_set_broker_state(t, EB_BROKER_OFF, "");
		return 1000;
	}

	config = tr->settings(true);
	if (r->client_up && strcmp(config, r->client_config) != 0)
	{
		ereport(LOG, (errmsg("%s configuration changed, reconnecting", tr->name)));
		stop_client(t);
	}
	if (!r->client_up)
	{
		r->client_up = tr->producer_start(relay_ack);
		if (!r->client_up)
			return 1000;
		r->client_config = MemoryContextStrdup(TopMemoryContext, config);
	}
	pfree(config);

	if (!tr->producer_poll())
	{
		/*
		 * The client cannot continue (e.g. Kafka's gap-less guarantee after a
		 * batch refused for good): let the reports of what was in flight
		 * arrive (bounded), record the round — its refused events move
		 * aside, the rest is retried — and start a new client.
		 */
		if (r->active)
		{
			tr->producer_drain(1000);
			finish_round(t, r, "no acknowledgement before the producer failed");
		}
		stop_client(t);
		return 1000;
	}

	if (r->active)
	{
		if (woken)
			r->outpaced = true;

		/*
		 * Everything sent is acknowledged: send the aggregates' next events.
		 * Once commits arrived meanwhile, only until eventbus.relay_interval
		 * has passed since the round started, when the next round would be
		 * due: then the rest goes with those commits, in the next round,
		 * which starts at once.  The round ends when nothing more is sent.
		 */
		if (r->in_flight == 0 && r->pending > 0 &&
			(!r->outpaced ||
			 GetCurrentTimestamp() < next_round_due(r)))
			send_ready(t, r);
		if (r->in_flight == 0)
			finish_round(t, r, NULL);
		else if (tr->round_abandon && GetCurrentTimestamp() >= r->deadline)
		{
			tr->round_abandon();
			finish_round(t, r, "no acknowledgement within eventbus.ack_timeout");
		}
		else
			return round_wait(tr, r);
	}

	if (r->next_try != 0 && GetCurrentTimestamp() < r->next_try)
		return Max(eb_ms_until(r->next_try), 1);
	if (!tr->connected())
		return tr->reconnect_poll_ms;

	/*
	 * Read the outbox only when there may be rows: a commit published to
	 * this transport (now, or while the last round was in flight), the last
	 * round found some, or the periodic scan (for prepared transactions and
	 * rows from before a restart) is due.
	 */
	if (!woken && !r->more && !r->outpaced && GetCurrentTimestamp() < r->next_scan &&
		(r->backoff_due == 0 || GetCurrentTimestamp() < r->backoff_due))
		return Max(Min(eb_ms_until(r->next_scan),
					   r->backoff_due ? eb_ms_until(r->backoff_due) : 1000), 1);

	/*
	 * Pace the rounds when commits outpace them: under a stream of small
	 * commits, a round per commit costs a query, a broker exchange and a
	 * deletion for a few events each, CPU and WAL taken from the
	 * publishers.  When commits arrived while the last round was in flight,
	 * the next one waits until eventbus.relay_interval has passed since the
	 * last started, and carries several commits' events.  A commit that
	 * finds the relay idle goes at once, and so do rows the last round read
	 * but did not send (a full batch, or later events of aggregates whose
	 * waves the round stopped for waiting commits): waiting would not let a
	 * round carry more of them, and would cap a busy aggregate's rate.
	 */
	if (eb_relay_interval_ms > 0 && r->outpaced && !r->left_behind)
	{
		TimestampTz due = next_round_due(r);

		if (GetCurrentTimestamp() < due)
			return Max(eb_ms_until(due), 1);
	}
	r->outpaced = false;
	r->last_start = GetCurrentTimestamp();
	r->next_scan = TimestampTzPlusMilliseconds(r->last_start, 1000);
	r->backoff_due = start_round(t, r);
	if (r->active && r->in_flight == 0)
		finish_round(t, r, NULL);	/* everything refused before sending */
	if (r->active)
		return round_wait(tr, r);
	/* Idle: the periodic scan picks up prepared transactions and strays. */
	return r->backoff_due ? Max(Min(eb_ms_until(r->backoff_due), 1000), 1) : 1000;
}

/*
 * One pass of the relay over both transports.  Returns how long the
 * launcher may sleep (ms) before it must call again; commits and broker
 * events wake it sooner.
 */
long
eb_relay_step(void)
{
	volatile long timeout = 1000;
	uint32		pending;

	pending = eb_shmem_take_relay_pending();

	for (int t = 0; t < EB_NTRANSPORTS; t++)
	{
		MemoryContext oldcxt = CurrentMemoryContext;

		PG_TRY();
		{
			/* Not inside Min(): the macro would run the step twice. */
			long		wait = step_transport(t, (pending & (1u << t)) != 0);

			timeout = Min(timeout, wait);
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

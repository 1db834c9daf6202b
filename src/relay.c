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
 * is gone for good.  The reads themselves are in relay_read.c.
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

static Round rounds[EB_NTRANSPORTS];
static SPIPlanPtr delete_plan = NULL;
static SPIPlanPtr fail_plan = NULL;

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
	fetched = n = eb_relay_fetch_batch(t, r, &events, &held, &earliest);
	if (r->undeliverable)
		n = eb_relay_set_aside_held(t, r, events, held, n);
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
 * events wake it sooner.  *failed is set when a transport's step raised an
 * error (the extension may be being dropped).
 */
long
eb_relay_step(bool *failed)
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
			*failed = true;
		}
		PG_END_TRY();
	}
	return timeout;
}

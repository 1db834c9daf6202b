/*
 * relay_read.c — the outbox relay's reads: a round's rows of one transport,
 * in id order above the read floor, without the aggregates backing off,
 * and (where a transport keeps one event per aggregate in flight) past
 * long chains of one aggregate; rows held behind an undeliverable row of
 * their aggregate are moved aside instead of sent.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "relay.h"
#include "transport.h"
#include "util.h"

/* Rows of one aggregate in a full batch that make it a long chain (fetch_batch). */
#define LONG_CHAIN	16

/* The read's plans: [transport][held variant][with the backoff filter]. */
static SPIPlanPtr read_plan[EB_NTRANSPORTS][2][2];

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
int
eb_relay_fetch_batch(int t, Round *r, EbEvent **events, bool **held, TimestampTz *earliest)
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
int
eb_relay_set_aside_held(int t, Round *r, EbEvent *events, bool *held, int n)
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

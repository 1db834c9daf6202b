/*
 * relay_keys.c — the relay's bookkeeping per (topic, aggregate): which
 * aggregates back off after a transient failure (and until when), and the
 * order of each aggregate's events within a round.
 */
#include "postgres.h"

#include "catalog/pg_type.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "relay.h"
#include "util.h"

#define KEY_LEN (EB_MAX_TOPIC + EB_MAX_AGGREGATE_ID + 2)
#define BACKOFF_MIN_MS 200
#define BACKOFF_MAX_MS 10000

/* The last event of a (topic, aggregate) seen so far in a round. */
typedef struct LastOf
{
	char		key[KEY_LEN];
	int			index;
} LastOf;

/* A (topic, aggregate) backing off after a transient failure. */
typedef struct KeyBackoff
{
	char		key[KEY_LEN];	/* topic \x1f aggregate_id */
	TimestampTz next_try;
	int			backoff_ms;
	int64		first_id;		/* outbox id of its first row left (the failed one) */
} KeyBackoff;

/* An empty backoff table (for the life of the process). */
HTAB *
eb_backoff_create(void)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = sizeof(KeyBackoff);
	return hash_create("eventbus relay backoff", 64, &ctl, HASH_ELEM | HASH_STRINGS);
}

/* Forget every aggregate's backoff. */
void
eb_backoff_clear(HTAB *backoff)
{
	HASH_SEQ_STATUS seq;
	KeyBackoff *e;

	hash_seq_init(&seq, backoff);
	while ((e = hash_seq_search(&seq)) != NULL)
		(void) hash_search(backoff, e->key, HASH_REMOVE, NULL);
}

/* Key of an event's (topic, aggregate) in the backoff table. */
static void
event_key(const EbEvent *ev, char *key)
{
	snprintf(key, KEY_LEN, "%s\x1f%s", ev->topic, ev->aggregate_id);
}

/*
 * The aggregates still backing off at now, and those of the nextra events
 * of extra, as two text[] datums (topics, aggregate ids).  Entries long
 * expired (their rows went elsewhere) are dropped.  Sets *earliest to the
 * first moment a backed-off one may be retried (0: none) and *first_id to
 * the lowest outbox id of the rows left out that way (PG_INT64_MAX: none).
 * Reads of one round pass the same now: an aggregate left out of one must
 * be left out of the others.  Returns how many aggregates the arrays hold.
 */
int
eb_backoff_arrays(HTAB *backoff, TimestampTz now, const EbEvent *extra, int nextra,
				  Datum *topics, Datum *aggregates, TimestampTz *earliest, int64 *first_id)
{
	HASH_SEQ_STATUS seq;
	KeyBackoff *e;
	long		count = hash_get_num_entries(backoff) + nextra;
	Datum	   *t = palloc(sizeof(Datum) * Max(count, 1));
	Datum	   *a = palloc(sizeof(Datum) * Max(count, 1));
	int			k = 0;

	*earliest = 0;
	*first_id = PG_INT64_MAX;
	hash_seq_init(&seq, backoff);
	while ((e = hash_seq_search(&seq)) != NULL)
	{
		char	   *sep = strchr(e->key, '\x1f');

		if (now >= e->next_try)
		{
			if (now >= TimestampTzPlusMilliseconds(e->next_try, 60000))
				(void) hash_search(backoff, e->key, HASH_REMOVE, NULL);
			continue;
		}
		if (*earliest == 0 || e->next_try < *earliest)
			*earliest = e->next_try;
		*first_id = Min(*first_id, e->first_id);
		t[k] = PointerGetDatum(cstring_to_text_with_len(e->key, sep - e->key));
		a[k++] = CStringGetTextDatum(sep + 1);
	}
	for (int i = 0; i < nextra; i++)
	{
		t[k] = CStringGetTextDatum(extra[i].topic);
		a[k++] = CStringGetTextDatum(extra[i].aggregate_id);
	}
	*topics = PointerGetDatum(construct_array(t, k, TEXTOID, -1, false, TYPALIGN_INT));
	*aggregates = PointerGetDatum(construct_array(a, k, TEXTOID, -1, false, TYPALIGN_INT));
	return k;
}

/* A transient failure of an aggregate's event: back off that aggregate. */
void
eb_backoff_fail(HTAB *backoff, const EbEvent *ev)
{
	char		key[KEY_LEN];
	KeyBackoff *e;
	bool		found;

	event_key(ev, key);
	e = hash_search(backoff, key, HASH_ENTER, &found);
	/* Several failed events of one aggregate in a round back off once. */
	if (found && e->next_try > GetCurrentTimestamp())
	{
		e->first_id = Min(e->first_id, ev->outbox_id);
		return;
	}
	e->first_id = ev->outbox_id;
	e->backoff_ms = eb_backoff_next(found ? e->backoff_ms : 0, BACKOFF_MIN_MS, BACKOFF_MAX_MS);
	e->next_try = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), e->backoff_ms);
}

/* The aggregate's event left the outbox (delivered or moved aside). */
void
eb_backoff_forget(HTAB *backoff, const EbEvent *ev)
{
	char		key[KEY_LEN];

	if (hash_get_num_entries(backoff) == 0)
		return;
	event_key(ev, key);
	(void) hash_search(backoff, key, HASH_REMOVE, NULL);
}

/*
 * For each of the n events, the index of the previous event of its (topic,
 * aggregate) among them, or -1 for the first: the order in which the
 * events of one aggregate must be sent, one after the other.
 */
void
eb_aggregate_chains(const EbEvent *events, int n, int *prev, MemoryContext cxt)
{
	HASHCTL		ctl;
	HTAB	   *last;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = sizeof(LastOf);
	ctl.hcxt = cxt;
	last = hash_create("eventbus round chains", Max(n, 16), &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
	for (int i = 0; i < n; i++)
	{
		char		key[KEY_LEN];
		bool		found;
		LastOf	   *e;

		event_key(&events[i], key);
		e = hash_search(last, key, HASH_ENTER, &found);
		prev[i] = found ? e->index : -1;
		e->index = i;
	}
	hash_destroy(last);
}

/*
 * The aggregates with at least min_len of the n events: one event of each
 * goes to heads (room for n).  Returns how many.
 */
int
eb_long_chains(const EbEvent *events, int n, int min_len, EbEvent *heads, MemoryContext cxt)
{
	int		   *prev = MemoryContextAlloc(cxt, sizeof(int) * Max(n, 1));
	int		   *len = MemoryContextAlloc(cxt, sizeof(int) * Max(n, 1));
	int			k = 0;

	eb_aggregate_chains(events, n, prev, cxt);
	for (int i = 0; i < n; i++)
	{
		len[i] = prev[i] >= 0 ? len[prev[i]] + 1 : 1;
		if (len[i] == min_len)
			heads[k++] = events[i];
	}
	pfree(prev);
	pfree(len);
	return k;
}

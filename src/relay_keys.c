/*
 * relay_keys.c — the relay's bookkeeping per (topic, aggregate): which
 * aggregates back off after a transient failure (and until when), and sets
 * of aggregates within a round.
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

/* A (topic, aggregate) backing off after a transient failure. */
typedef struct KeyBackoff
{
	char		key[KEY_LEN];	/* topic \x1f aggregate_id */
	TimestampTz next_try;
	int			backoff_ms;
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
 * The aggregates still backing off, as two text[] datums (topics, aggregate
 * ids).  Entries long expired (their rows went elsewhere) are dropped.
 * Sets *earliest to the first moment one of them may be retried (0: none).
 */
void
eb_backoff_arrays(HTAB *backoff, Datum *topics, Datum *aggregates, TimestampTz *earliest)
{
	HASH_SEQ_STATUS seq;
	KeyBackoff *e;
	TimestampTz now = GetCurrentTimestamp();
	long		count = hash_get_num_entries(backoff);
	Datum	   *t = palloc(sizeof(Datum) * Max(count, 1));
	Datum	   *a = palloc(sizeof(Datum) * Max(count, 1));
	int			k = 0;

	*earliest = 0;
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
		t[k] = PointerGetDatum(cstring_to_text_with_len(e->key, sep - e->key));
		a[k++] = CStringGetTextDatum(sep + 1);
	}
	*topics = PointerGetDatum(construct_array(t, k, TEXTOID, -1, false, TYPALIGN_INT));
	*aggregates = PointerGetDatum(construct_array(a, k, TEXTOID, -1, false, TYPALIGN_INT));
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
		return;
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

/* A set of (topic, aggregate) keys in cxt. */
HTAB *
eb_key_set(MemoryContext cxt)
{
	HASHCTL		ctl;

	memset(&ctl, 0, sizeof(ctl));
	ctl.keysize = KEY_LEN;
	ctl.entrysize = ctl.keysize;
	ctl.hcxt = cxt;
	return hash_create("eventbus round keys", 64, &ctl, HASH_ELEM | HASH_STRINGS | HASH_CONTEXT);
}

/* Is ev's key in the set?  With add, put it there. */
bool
eb_key_in_set(HTAB *set, const EbEvent *ev, bool add)
{
	char		key[KEY_LEN];
	bool		found;

	event_key(ev, key);
	(void) hash_search(set, key, add ? HASH_ENTER : HASH_FIND, &found);
	return found;
}

/* NATS: at most one event per (topic, aggregate) per round (file header). */
int
eb_distinct_aggregates(EbEvent *events, int n, MemoryContext cxt)
{
	HTAB	   *seen = eb_key_set(cxt);
	int			kept = 0;

	for (int i = 0; i < n; i++)
		if (!eb_key_in_set(seen, &events[i], true))
			events[kept++] = events[i];
	hash_destroy(seen);
	return kept;
}


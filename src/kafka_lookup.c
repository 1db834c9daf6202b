/*
 * kafka_lookup.c — Kafka metadata look-ups off the worker's main thread.
 *
 * A metadata request waits for a broker: behind a fetch that the broker
 * holds on the same connection (up to the consumer's fetch.wait.max.ms,
 * 500 ms by default: a broker answers one request of a connection at a
 * time), or for its whole timeout while the cluster is unreachable or
 * hangs.  On the dispatcher's main thread that stopped everything else for
 * as long: NATS consumption, the hand-over to the pool, acknowledgements
 * (on the launcher's, the NATS relay).  So each look-up runs on a helper
 * thread (librdkafka calls only, every signal blocked: a bounded.c call),
 * one at a time per process; the main thread starts it, is woken through
 * the wakeup pipe when it is over and takes the result at its next poll.
 *
 * The helper uses the client it was given: eb_kafka_lookup_wait lets the
 * client's teardown wait (bounded) until no look-up uses it any more.
 */
#include "postgres.h"

#include "bounded.h"
#include "eventbus.h"
#include "kafka_client.h"

/*
 * The longest a look-up waits for its answer: a topic's, long enough for a
 * broker that holds it behind a fetch (fetch.wait.max.ms, 500 ms by
 * default); the probe of an unreachable cluster as before, as a teardown
 * waits for it.
 */
#define LOOKUP_TIMEOUT_MS	1000
#define PROBE_TIMEOUT_MS	500

/* One look-up: what to ask, and (once its call is done) the answer. */
typedef struct Lookup
{
	rd_kafka_t *rk;
	char		topic[EB_MAX_TOPIC + 1];	/* "" = the cluster (probe) */
	rd_kafka_resp_err_t err;
	int			partitions;		/* -1: not in the answer, or its error */
} Lookup;

static Lookup *lookup = NULL;	/* the one started last, until taken */
static EbCall *lookup_call = NULL;	/* where it runs (bounded.c) */

/* Helper thread (eb_call_start): one metadata request. */
static void
lookup_run(void *arg)
{
	Lookup	   *l = arg;
	rd_kafka_topic_t *rkt = NULL;
	const struct rd_kafka_metadata *md = NULL;

	l->partitions = -1;
	if (l->topic[0] != '\0' && (rkt = rd_kafka_topic_new(l->rk, l->topic, NULL)) == NULL)
		l->err = RD_KAFKA_RESP_ERR__INVALID_ARG;
	else
		l->err = rd_kafka_metadata(l->rk, 0, rkt, &md, rkt ? LOOKUP_TIMEOUT_MS : PROBE_TIMEOUT_MS);
	if (l->err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		for (int i = 0; rkt != NULL && i < md->topic_cnt; i++)
			if (strcmp(md->topics[i].topic, l->topic) == 0 &&
				md->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR)
				l->partitions = md->topics[i].partition_cnt;
		rd_kafka_metadata_destroy(md);
	}
	if (rkt != NULL)
		rd_kafka_topic_destroy(rkt);
}

/*
 * Start looking up topic's partitions (NULL: whether the cluster answers)
 * with client rk.  False if a look-up is still running or its outcome not
 * taken yet (ask again later).  The main thread is woken when it is over.
 */
bool
eb_kafka_lookup_start(rd_kafka_t *rk, const char *topic)
{
	Lookup	   *l;

	if (lookup_call != NULL || (l = calloc(1, sizeof(Lookup))) == NULL)
		return false;
	l->rk = rk;
	strlcpy(l->topic, topic ? topic : "", sizeof(l->topic));
	if ((lookup_call = eb_call_start(lookup_run, l, free, true)) == NULL)
	{
		free(l);
		return false;
	}
	lookup = l;
	return true;
}

/* The finished look-up, if it is one of this kind (probe or not); else NULL. */
static Lookup *
finished(bool probe)
{
	if (lookup_call == NULL || (lookup->topic[0] == '\0') != probe ||
		!eb_call_wait(lookup_call, 0))
		return NULL;
	return lookup;
}

/* Let the finished look-up go (its Lookup is freed with the call). */
static void
taken(void)
{
	eb_call_forget(lookup_call);
	lookup_call = NULL;
	lookup = NULL;
}

/* Take the cluster probe's outcome, if one came: true, and *err set. */
bool
eb_kafka_lookup_probe_result(rd_kafka_resp_err_t *err)
{
	Lookup	   *l = finished(true);

	if (l == NULL)
		return false;
	*err = l->err;
	taken();
	return true;
}

/*
 * Take a topic look-up's outcome, if one came: true, with the topic (a
 * buffer of EB_MAX_TOPIC + 1), *err and its partition count (-1 if the
 * answer did not have the topic).
 */
bool
eb_kafka_lookup_topic_result(char *topic, rd_kafka_resp_err_t *err, int *partitions)
{
	Lookup	   *l = finished(false);

	if (l == NULL)
		return false;
	memcpy(topic, l->topic, EB_MAX_TOPIC + 1);
	*err = l->err;
	*partitions = l->partitions;
	taken();
	return true;
}

/*
 * Before rk is destroyed: wait until no look-up uses it, at most a
 * look-up's own timeout and a little.  An outcome not taken is dropped.
 * False if one still runs (the caller must then leave rk alone).
 */
bool
eb_kafka_lookup_wait(rd_kafka_t *rk)
{
	bool		idle;

	if (lookup_call == NULL || lookup->rk != rk)
		return true;
	idle = eb_call_wait(lookup_call, LOOKUP_TIMEOUT_MS + 1000);
	taken();
	return idle;
}

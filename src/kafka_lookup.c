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
	int			ntopics;		/* 0: the cluster (probe) */
	rd_kafka_resp_err_t err;
	char		(*topics)[EB_MAX_TOPIC + 1];
	int		   *partitions;		/* per topic; -1: not in the answer, or its error */
} Lookup;

static Lookup *lookup = NULL;	/* the one started last, until taken */
static EbCall *lookup_call = NULL;	/* where it runs (bounded.c) */

/* Free a Lookup (plain C: the helper thread may do it). */
static void
lookup_free(void *arg)
{
	Lookup	   *l = arg;

	free(l->topics);
	free(l->partitions);
	free(l);
}

/*
 * Helper thread (eb_call_start): one metadata request.  One topic is asked
 * for by name; several at once as the client's known topics (a handle for
 * each makes it known), so that topics subscribed together are found in one
 * request rather than one after another, each possibly held behind a
 * fetch.
 */
static void
lookup_run(void *arg)
{
	Lookup	   *l = arg;
	rd_kafka_topic_t **rkt = NULL;
	const struct rd_kafka_metadata *md = NULL;

	l->err = RD_KAFKA_RESP_ERR_NO_ERROR;
	if (l->ntopics > 0 && (rkt = calloc(l->ntopics, sizeof(rd_kafka_topic_t *))) == NULL)
		l->err = RD_KAFKA_RESP_ERR__FAIL;
	/* A topic without a handle stays unknown (-1); the others are asked for. */
	for (int i = 0; i < l->ntopics; i++)
	{
		l->partitions[i] = -1;
		if (rkt != NULL)
			rkt[i] = rd_kafka_topic_new(l->rk, l->topics[i], NULL);
	}
	if (l->ntopics == 1 && rkt != NULL && rkt[0] == NULL)
		l->err = RD_KAFKA_RESP_ERR__INVALID_ARG;
	if (l->err == RD_KAFKA_RESP_ERR_NO_ERROR)
		l->err = rd_kafka_metadata(l->rk, 0, l->ntopics == 1 ? rkt[0] : NULL, &md,
								   l->ntopics > 0 ? LOOKUP_TIMEOUT_MS : PROBE_TIMEOUT_MS);
	if (l->err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		for (int t = 0; t < l->ntopics; t++)
			for (int i = 0; i < md->topic_cnt; i++)
				if (strcmp(md->topics[i].topic, l->topics[t]) == 0 &&
					md->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR)
					l->partitions[t] = md->topics[i].partition_cnt;
		rd_kafka_metadata_destroy(md);
	}
	for (int i = 0; rkt != NULL && i < l->ntopics; i++)
		if (rkt[i] != NULL)
			rd_kafka_topic_destroy(rkt[i]);
	free(rkt);
}

/*
 * Start looking up the partitions of ntopics topics (none: whether the
 * cluster answers) with client rk.  False if a look-up is still running or
 * its outcome not taken yet (ask again later).  The main thread is woken
 * when it is over.
 */
bool
eb_kafka_lookup_start(rd_kafka_t *rk, const char *const *topics, int ntopics)
{
	Lookup	   *l;

	if (lookup_call != NULL || (l = calloc(1, sizeof(Lookup))) == NULL)
		return false;
	l->rk = rk;
	l->ntopics = ntopics;
	l->topics = calloc(Max(ntopics, 1), sizeof(*l->topics));
	l->partitions = calloc(Max(ntopics, 1), sizeof(int));
	if (l->topics == NULL || l->partitions == NULL)
	{
		lookup_free(l);
		return false;
	}
	for (int i = 0; i < ntopics; i++)
		strlcpy(l->topics[i], topics[i], sizeof(l->topics[i]));
	if ((lookup_call = eb_call_start(lookup_run, l, lookup_free, true)) == NULL)
	{
		lookup_free(l);
		return false;
	}
	lookup = l;
	if (ntopics > 0)
		eb_shmem_count_topic_lookup(EB_TRANSPORT_KAFKA);
	return true;
}

/* The finished look-up, if it is one of this kind (probe or not); else NULL. */
static Lookup *
finished(bool probe)
{
	if (lookup_call == NULL || (lookup->ntopics == 0) != probe ||
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
 * Take a topic look-up's outcome, if one came: fn(topic, err, partitions,
 * arg) for each of its topics (partitions -1 if the answer did not have the
 * topic); true if there was one.
 */
bool
eb_kafka_lookup_topics_result(EbKafkaLookupFn fn, void *arg)
{
	Lookup	   *l = finished(false);

	if (l == NULL)
		return false;
	PG_TRY();
	{
		for (int i = 0; i < l->ntopics; i++)
			fn(l->topics[i], l->err, l->partitions[i], arg);
	}
	PG_FINALLY();
	{
		taken();
	}
	PG_END_TRY();
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

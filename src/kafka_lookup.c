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
 * thread (librdkafka calls only, every signal blocked), one at a time per
 * process; the main thread starts it, is woken through the wakeup pipe
 * when it is over and takes the result at its next poll.
 *
 * The helper uses the client it was given: eb_kafka_lookup_wait lets the
 * client's teardown wait (bounded) until no look-up uses it any more.
 */
#include "postgres.h"

#include <pthread.h>
#include <time.h>

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

static pthread_mutex_t lookup_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t lookup_cond;	/* on CLOCK_MONOTONIC: see cond_init */
static pthread_once_t cond_once = PTHREAD_ONCE_INIT;

static void
cond_init(void)
{
	eb_cond_init_monotonic(&lookup_cond);
}

/* Guarded by lookup_mutex. */
static struct
{
	bool		running;		/* a helper looks up */
	rd_kafka_t *rk;				/* the running look-up's client */
	char		topic[EB_MAX_TOPIC + 1];	/* its topic ("" = the cluster) */
	/* Results not yet taken (a later one of the same kind replaces it). */
	bool		probe_ready;
	rd_kafka_resp_err_t probe_err;
	bool		topic_ready;
	char		topic_done[EB_MAX_TOPIC + 1];
	rd_kafka_resp_err_t topic_err;
	int			partitions;		/* -1: not in the answer, or its error */
} lk;

/* Helper thread: one metadata request, its outcome noted, the owner woken. */
static void *
lookup_main(void *arg)
{
	rd_kafka_t *rk;
	char		topic[EB_MAX_TOPIC + 1];
	rd_kafka_topic_t *rkt = NULL;
	const struct rd_kafka_metadata *md = NULL;
	rd_kafka_resp_err_t err;
	int			partitions = -1;

	pthread_mutex_lock(&lookup_mutex);
	rk = lk.rk;
	memcpy(topic, lk.topic, sizeof(topic));
	pthread_mutex_unlock(&lookup_mutex);

	if (topic[0] != '\0' && (rkt = rd_kafka_topic_new(rk, topic, NULL)) == NULL)
		err = RD_KAFKA_RESP_ERR__INVALID_ARG;
	else
		err = rd_kafka_metadata(rk, 0, rkt, &md, rkt ? LOOKUP_TIMEOUT_MS : PROBE_TIMEOUT_MS);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		for (int i = 0; rkt != NULL && i < md->topic_cnt; i++)
			if (strcmp(md->topics[i].topic, topic) == 0 &&
				md->topics[i].err == RD_KAFKA_RESP_ERR_NO_ERROR)
				partitions = md->topics[i].partition_cnt;
		rd_kafka_metadata_destroy(md);
	}
	if (rkt != NULL)
		rd_kafka_topic_destroy(rkt);

	pthread_mutex_lock(&lookup_mutex);
	if (topic[0] == '\0')
	{
		lk.probe_ready = true;
		lk.probe_err = err;
	}
	else
	{
		lk.topic_ready = true;
		memcpy(lk.topic_done, topic, sizeof(topic));
		lk.topic_err = err;
		lk.partitions = partitions;
	}
	lk.running = false;
	lk.rk = NULL;
	pthread_cond_broadcast(&lookup_cond);
	pthread_mutex_unlock(&lookup_mutex);
	eb_wakeup_signal();
	return NULL;
}

/*
 * Start looking up topic's partitions (NULL: whether the cluster answers)
 * with client rk.  False if a look-up is still running (ask again later).
 */
bool
eb_kafka_lookup_start(rd_kafka_t *rk, const char *topic)
{
	bool		started = false;

	pthread_once(&cond_once, cond_init);
	pthread_mutex_lock(&lookup_mutex);
	if (!lk.running)
	{
		lk.running = true;
		lk.rk = rk;
		strlcpy(lk.topic, topic ? topic : "", sizeof(lk.topic));
		started = true;
	}
	pthread_mutex_unlock(&lookup_mutex);
	if (started && !eb_thread_start(lookup_main, NULL))
	{
		pthread_mutex_lock(&lookup_mutex);
		lk.running = false;
		lk.rk = NULL;
		pthread_mutex_unlock(&lookup_mutex);
		started = false;
	}
	return started;
}

/* Take the cluster probe's outcome, if one came: true, and *err set. */
bool
eb_kafka_lookup_probe_result(rd_kafka_resp_err_t *err)
{
	bool		ready;

	pthread_mutex_lock(&lookup_mutex);
	ready = lk.probe_ready;
	*err = lk.probe_err;
	lk.probe_ready = false;
	pthread_mutex_unlock(&lookup_mutex);
	return ready;
}

/*
 * Take a topic look-up's outcome, if one came: true, with the topic (a
 * buffer of EB_MAX_TOPIC + 1), *err and its partition count (-1 if the
 * answer did not have the topic).
 */
bool
eb_kafka_lookup_topic_result(char *topic, rd_kafka_resp_err_t *err, int *partitions)
{
	bool		ready;

	pthread_mutex_lock(&lookup_mutex);
	ready = lk.topic_ready;
	if (ready)
	{
		memcpy(topic, lk.topic_done, EB_MAX_TOPIC + 1);
		*err = lk.topic_err;
		*partitions = lk.partitions;
	}
	lk.topic_ready = false;
	pthread_mutex_unlock(&lookup_mutex);
	return ready;
}

/*
 * Before rk is destroyed: wait until no look-up uses it, at most a
 * look-up's own timeout and a little.  Results not taken are dropped.
 * False if one still runs (the caller must then leave rk alone).
 */
bool
eb_kafka_lookup_wait(rd_kafka_t *rk)
{
	struct timespec deadline;
	bool		idle;

	pthread_once(&cond_once, cond_init);
	eb_deadline_after(&deadline, LOOKUP_TIMEOUT_MS + 1000);
	pthread_mutex_lock(&lookup_mutex);
	while (lk.running && lk.rk == rk)
		if (pthread_cond_timedwait(&lookup_cond, &lookup_mutex, &deadline) != 0)
			break;
	idle = !(lk.running && lk.rk == rk);
	lk.probe_ready = false;
	lk.topic_ready = false;
	pthread_mutex_unlock(&lookup_mutex);
	return idle;
}

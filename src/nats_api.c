/*
 * nats_api.c — JetStream API requests off the worker's main thread.
 *
 * Creating a stream, binding a durable consumer and (shared mode,
 * nats_lease.c) reading or writing a lease are requests that wait for the
 * server's answer (5 s, a lease's 1 s, at most each).  A server that hangs, or a
 * network that drops packets without closing the connection, leaves the
 * connection up for minutes (until its pings go unanswered) and makes
 * every such request wait its whole timeout.  On the launcher's main thread
 * that stopped the Kafka relay, and on the dispatcher's Kafka consumption,
 * the hand-over to the pool and its acknowledgements, for as long as NATS
 * hung.  So each such request runs as a job on a helper thread (cnats calls
 * only, every signal blocked); the main thread starts it, is woken through
 * the wakeup pipe when it is over, and takes its outcome.
 *
 * A job uses the process's connection and JetStream context, and is
 * malloc'd, run as a bounded.c call: whichever side finishes last frees it
 * (a job given up by the main thread, e.g. its subscription released, is
 * freed by its helper).
 * eb_nats_jobs_wait lets the connection's teardown wait (bounded) until no
 * job uses it any more.
 */
#include "postgres.h"

#include <pthread.h>
#include <time.h>

#include "bounded.h"
#include "eventbus.h"
#include "nats_client.h"
#include "util.h"

/* Keep JetStream's dedupe window long enough to cover relay retries. */
#define DUPLICATE_WINDOW_NS ((int64) 10 * 60 * 1000000000)
#define API_WAIT_MS		5000	/* a JetStream API request's timeout */

static pthread_mutex_t job_mutex = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t job_cond;	/* on CLOCK_MONOTONIC: see cond_init */
static pthread_once_t cond_once = PTHREAD_ONCE_INIT;
static int	jobs_running = 0;	/* guarded by job_mutex */

static void
cond_init(void)
{
	eb_cond_init_monotonic(&job_cond);
}

/*
 * Errors after which retrying the same request cannot help: the message
 * (too large, invalid subject) or a stream configuration the server
 * refuses.  Everything else (no responders, timeouts, disconnections,
 * stream storage limits, JetStream unavailable) is transient.  Plain C:
 * called on cnats threads too.
 */
bool
eb_nats_error_permanent(natsStatus s, int jerr)
{
	switch (jerr)
	{
		case JSStreamMessageExceedsMaximumErr:
		case JSStreamInvalidConfig:
		case JSStreamInvalidErr:
			return true;
		default:
			break;
	}
	return s == NATS_MAX_PAYLOAD || s == NATS_INVALID_SUBJECT || s == NATS_INVALID_ARG;
}

/* Stream name for a topic: EVENTBUS_<topic with '.' as '_'>_<fnv1a hex>. */
static void
stream_name(const char *topic, char *buf, size_t len)
{
	uint32		h = eb_fnv1a(topic);
	int			k;

	k = snprintf(buf, len, "EVENTBUS_");
	for (const char *p = topic; *p && k < 200; p++)
		buf[k++] = *p == '.' ? '_' : *p;
	snprintf(buf + k, len - k, "_%08x", h);
}

/*
 * Make sure a stream captures the job's topic.  A stream that already
 * captures it (the user's own) is used as is; otherwise create one that
 * never discards unconsumed events: limits retention without limits, and
 * DiscardNew so a limit added later rejects new events instead of dropping
 * old ones.  Helper thread.
 */
static bool
job_stream(EbNatsJob *j)
{
	jsStreamConfig cfg;
	jsStreamInfo *si = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;
	char		name[256];
	const char *subjects[1];

	stream_name(j->topic, name, sizeof(name));
	subjects[0] = j->topic;
	jsStreamConfig_Init(&cfg);
	cfg.Name = name;
	cfg.Subjects = subjects;
	cfg.SubjectsLen = 1;
	cfg.Storage = js_FileStorage;
	cfg.Retention = js_LimitsPolicy;
	cfg.Discard = js_DiscardNew;
	cfg.MaxMsgs = -1;
	cfg.MaxBytes = -1;
	cfg.MaxAge = 0;
	cfg.MaxMsgsPerSubject = -1;
	cfg.Duplicates = DUPLICATE_WINDOW_NS;

	s = js_AddStream(&si, j->js, &cfg, NULL, &jerr);
	if (si)
		jsStreamInfo_Destroy(si);
	if (s != NATS_OK && jerr != JSStreamSubjectOverlapErr && jerr != JSStreamNameExistErr)
	{
		snprintf(j->error, sizeof(j->error),
				 "could not create JetStream stream %s for subject %s: %s (JetStream error %d)",
				 name, j->topic, natsStatus_GetText(s), (int) jerr);
		j->permanent = eb_nats_error_permanent(s, jerr);
		return false;
	}
	return true;
}

/* The name of the stream that captures the job's topic, into j->stream. */
static bool
job_stream_name(EbNatsJob *j)
{
	natsMsg    *reply = NULL;
	const char *data;
	const char *p;
	const char *end;
	natsStatus	s;

	s = natsConnection_Request(&reply, j->nc, "$JS.API.STREAM.NAMES", j->names_request,
							   (int) strlen(j->names_request), API_WAIT_MS);
	if (s != NATS_OK)
	{
		snprintf(j->error, sizeof(j->error), "no JetStream stream for %s: %s", j->topic, natsStatus_GetText(s));
		return false;
	}
	data = natsMsg_GetData(reply);
	/* {"type":...,"streams":["NAME"],...}: stream names contain no quotes. */
	if (data && (p = strstr(data, "\"streams\":[\"")) != NULL)
	{
		p += strlen("\"streams\":[\"");
		if ((end = strchr(p, '"')) != NULL && end - p < (ptrdiff_t) sizeof(j->stream))
		{
			memcpy(j->stream, p, end - p);
			j->stream[end - p] = '\0';
		}
	}
	natsMsg_Destroy(reply);
	if (j->stream[0] == '\0')
		snprintf(j->error, sizeof(j->error), "no JetStream stream for %s", j->topic);
	return j->stream[0] != '\0';
}

/*
 * Helper thread: open a KeyValue bucket of one revision per key on file
 * storage, creating it if needed; one created by someone else with other
 * settings is used as it is.  Plain C.
 */
natsStatus
eb_nats_kv_open(jsCtx *js, const char *bucket, const char *description, kvStore **kv)
{
	kvConfig	cfg;
	natsStatus	s;

	kvConfig_Init(&cfg);
	cfg.Bucket = bucket;
	cfg.Description = description;
	cfg.History = 1;
	cfg.StorageType = js_FileStorage;
	s = js_CreateKeyValue(kv, js, &cfg);
	if (s != NATS_OK)
		s = js_KeyValue(kv, js, bucket);
	return s;
}

/*
 * Helper thread: open the bucket of single mode's kept positions; NULL if
 * the server or the account does not allow it.
 */
static kvStore *
positions_open(EbNatsJob *j)
{
	kvStore    *kv = NULL;

	if (eb_nats_kv_open(j->js, EB_NATS_POSITIONS_BUCKET,
						"eventbus: up to which stream sequence each AckNone durable's messages are handled",
						&kv) != NATS_OK)
		return NULL;
	return kv;
}

/*
 * Helper thread: the kept position of the job's durable.  Returns false
 * when the server did not answer; *found false when no position is kept (or
 * what is kept is not a number: never trusted).
 */
static bool
position_read(EbNatsJob *j, kvStore *kv, uint64 *pos, bool *found)
{
	kvEntry    *e = NULL;
	natsStatus	s = kvStore_Get(&e, kv, j->lease_key);
	const char *v;
	int			len;

	*found = false;
	*pos = 0;
	if (s == NATS_NOT_FOUND)
		return true;
	if (s != NATS_OK)
	{
		snprintf(j->error, sizeof(j->error), "could not read the kept position of JetStream consumer %s: %s",
				 j->durable, natsStatus_GetText(s));
		return false;
	}
	v = kvEntry_Value(e);
	len = kvEntry_ValueLen(e);
	if (v != NULL && len > 0 && len <= 18)
	{
		uint64		n = 0;
		int			i;

		for (i = 0; i < len && v[i] >= '0' && v[i] <= '9'; i++)
			n = n * 10 + (uint64) (v[i] - '0');
		if (i == len)
		{
			*pos = n;
			*found = true;
		}
	}
	kvEntry_Destroy(e);
	return true;
}

/*
 * Bind the job's durable pull consumer (creating it if needed).  Helper
 * thread.
 *
 * ack_none (single mode): the durable is AckNone, and how far its messages
 * are handled is kept in EB_NATS_POSITIONS_BUCKET.  Every bind then is a
 * takeover: an AckNone durable forgets what it delivered and we did not
 * finish, so it is recreated at the kept position + 1.  The position is
 * written before the durable is recreated, so that an AckNone durable
 * always has one; one that has none (the bucket emptied by hand) starts
 * again from the stream's first message, which the inbox skips, rather
 * than lose any.  Without the bucket, or if
 * that write fails (permissions, a bucket of other settings): an
 * explicitly acked durable, as in shared mode.
 *
 * Explicitly acked (shared mode): takeover restarts an existing durable at
 * its ack floor + 1, else it is used as it is (a lease released cleanly:
 * nothing of it is in flight anywhere) unless it is an AckNone one.
 *
 * A durable is taken for absent only when the server says so: after no
 * answer the bind fails (and is tried again), rather than write a position
 * of 0 over the kept one.
 */
static bool
job_bind(EbNatsJob *j)
{
	jsConsumerConfig cfg;
	jsConsumerInfo *ci = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;
	kvStore    *kv = NULL;
	bool		exists = false;
	bool		was_none = false;
	uint64		ack_floor = 0;
	bool		ok = false;

	if (!job_stream(j) || !job_stream_name(j))
		return false;
	if (j->ack_none && (kv = positions_open(j)) == NULL)
	{
		snprintf(j->error, sizeof(j->error), "opening it: %s",
				 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : "no answer");
		strlcpy(j->positions_cause, j->error, sizeof(j->positions_cause));
		j->ack_none = false;
		j->no_positions = true;
	}
	s = js_GetConsumerInfo(&ci, j->js, j->stream, j->durable, NULL, &jerr);
	if (s != NATS_OK && s != NATS_NOT_FOUND && jerr != JSConsumerNotFoundErr)
	{
		snprintf(j->error, sizeof(j->error), "could not look up JetStream consumer %s: %s (JetStream error %d)",
				 j->durable, natsStatus_GetText(s), (int) jerr);
		goto done;
	}
	if (s == NATS_OK)
	{
		exists = true;
		was_none = ci->Config != NULL && ci->Config->AckPolicy == js_AckNone;
		ack_floor = ci->AckFloor.Stream;
		if (!was_none)
			j->unacked = ci->NumAckPending;
		jsConsumerInfo_Destroy(ci);
		ci = NULL;
	}
	if (exists && !j->takeover && !was_none && !j->ack_none)
		ok = true;				/* explicit, released cleanly: as it is */
	else
	{
		/* Where to start: 0 = every message the stream keeps. */
		j->start = 0;
		if (exists && !was_none)
			j->start = ack_floor + 1;
		else if (exists)
		{
			uint64		pos;
			bool		found;

			if (kv == NULL && (kv = positions_open(j)) == NULL)
			{
				snprintf(j->error, sizeof(j->error), "could not open the JetStream bucket %s for the position of consumer %s",
						 EB_NATS_POSITIONS_BUCKET, j->durable);
				goto done;
			}
			if (!position_read(j, kv, &pos, &found))
				goto done;
			if (found)
				j->start = pos + 1;
			else
				j->replay_all = true;
		}
		if (j->ack_none)
		{
			char		val[24];
			uint64		rev = 0;

			snprintf(val, sizeof(val), UINT64_FORMAT, j->start > 0 ? j->start - 1 : (uint64) 0);
			/* Not writable (permissions, a bucket of other settings): ack instead. */
			if ((s = kvStore_PutString(&rev, kv, j->lease_key, val)) != NATS_OK)
			{
				snprintf(j->positions_cause, sizeof(j->positions_cause), "writing a position: %s",
						 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s));
				snprintf(j->error, sizeof(j->error), "writing key %s: %s", j->lease_key,
						 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s));
				j->ack_none = false;
				j->no_positions = true;
			}
		}
		if (exists)
			js_DeleteConsumer(j->js, j->stream, j->durable, NULL, &jerr);

		/* A pull consumer: no deliver subject; the inbox receives its answers. */
		jsConsumerConfig_Init(&cfg);
		cfg.Durable = j->durable;
		cfg.AckPolicy = j->ack_none ? js_AckNone : js_AckExplicit;
		cfg.DeliverPolicy = j->start > 0 ? js_DeliverByStartSequence : js_DeliverAll;
		cfg.OptStartSeq = j->start;
		if (!j->ack_none)
		{
			cfg.AckWait = j->ack_wait_ns;
			cfg.MaxAckPending = j->max_ack_pending;
		}
		cfg.MaxDeliver = -1;
		cfg.FilterSubject = j->topic;
		jerr = 0;
		s = js_AddConsumer(&ci, j->js, j->stream, &cfg, NULL, &jerr);
		if (ci)
			jsConsumerInfo_Destroy(ci);
		if (s != NATS_OK)
			snprintf(j->error, sizeof(j->error), "could not bind JetStream consumer %s for %s: %s (JetStream error %d)",
					 j->durable, j->topic, natsStatus_GetText(s), (int) jerr);
		ok = s == NATS_OK;
	}
done:
	if (kv != NULL)
		kvStore_Destroy(kv);
	return ok;
}

/* Free a job and what it owns. */
static void
job_destroy(void *arg)
{
	EbNatsJob  *j = arg;

	eb_nats_lease_job_destroy(j);
	free(j->durable);
	free(j);
}

/* Helper thread (eb_call_start): run the job; the connection is free again after. */
static void
job_run(void *arg)
{
	EbNatsJob  *j = arg;

	if (j->kind == EB_NATS_JOB_STREAM)
		j->ok = job_stream(j);
	else if (j->kind == EB_NATS_JOB_BIND)
		j->ok = job_bind(j);
	else
		eb_nats_lease_job_run(j);
	pthread_mutex_lock(&job_mutex);
	jobs_running--;
	pthread_cond_broadcast(&job_cond);
	pthread_mutex_unlock(&job_mutex);
}

/*
 * A new job for topic (main thread; NULL if out of memory).  The caller
 * fills in what its kind needs, then eb_nats_job_start.
 */
EbNatsJob *
eb_nats_job_new(EbNatsJobKind kind, const char *topic)
{
	EbNatsJob  *j = calloc(1, sizeof(EbNatsJob));

	if (j == NULL)
		return NULL;
	j->kind = kind;
	strlcpy(j->topic, topic, sizeof(j->topic));
	return j;
}

/*
 * Start a job on a helper thread with the process's connection; the
 * dispatcher or relay is woken when it is over.  False (and the job freed)
 * if not connected or no thread could be started.
 */
bool
eb_nats_job_start(EbNatsJob *j)
{
	if (eb_nats_conn == NULL || eb_js == NULL)
	{
		job_destroy(j);
		return false;
	}
	pthread_once(&cond_once, cond_init);
	j->nc = eb_nats_conn;
	j->js = eb_js;
	pthread_mutex_lock(&job_mutex);
	jobs_running++;
	pthread_mutex_unlock(&job_mutex);
	if ((j->call = eb_call_start(job_run, j, job_destroy, true)) == NULL)
	{
		pthread_mutex_lock(&job_mutex);
		jobs_running--;
		pthread_mutex_unlock(&job_mutex);
		job_destroy(j);
		return false;
	}
	return true;
}

/* Is the job over?  Then its outcome may be read (it is no longer written). */
bool
eb_nats_job_done(EbNatsJob *j)
{
	return eb_call_wait(j->call, 0);
}

/* Wait at most timeout_ms for the job to be over; true if it is. */
bool
eb_nats_job_wait(EbNatsJob *j, int timeout_ms)
{
	return eb_call_wait(j->call, timeout_ms);
}

/* Free a started job, or (still running) leave it to its helper to free. */
void
eb_nats_job_free(EbNatsJob *j)
{
	if (j != NULL)
		eb_call_forget(j->call);
}

/*
 * Before the connection is destroyed: wait at most timeout_ms until no job
 * uses it.  False if one still runs (the caller must leave it alone).
 */
bool
eb_nats_jobs_wait(int timeout_ms)
{
	struct timespec deadline;
	bool		idle;

	pthread_once(&cond_once, cond_init);
	eb_deadline_after(&deadline, timeout_ms);
	pthread_mutex_lock(&job_mutex);
	while (jobs_running > 0)
		if (pthread_cond_timedwait(&job_cond, &job_mutex, &deadline) != 0)
			break;
	idle = jobs_running == 0;
	pthread_mutex_unlock(&job_mutex);
	return idle;
}

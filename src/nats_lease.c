/*
 * nats_lease.c — who consumes a JetStream subject when several PostgreSQL
 * instances share eventbus.consumer_group (eventbus.consumer_mode = shared).
 *
 * A subject has no partitions, so two instances pulling from one durable at
 * once would run an aggregate's events in two databases concurrently.
 * Instead each durable has a lease: a key (the durable's name) in the
 * JetStream KeyValue bucket LEASE_BUCKET whose value names the holder.  Only
 * the holder fetches; the others stand by.
 *
 * Values: "<system identifier>.<database OID>.<postmaster start>/<nonce>"
 * while held, "" once released cleanly.  The part before '/' names the
 * running instance (a restarted dispatcher of the same postmaster has the
 * same), the nonce one dispatcher.  The bucket keeps one revision per key
 * and no MaxAge: a released key stays "released" however long nobody
 * takes it, so whoever takes it next knows nothing is left in flight.
 *
 * Expiry is measured by the stand-by, not by the server: a holder rewrites
 * its key every LEASE_REFRESH_MS; a stand-by that sees the same revision
 * for LEASE_TTL_MS (by its own clock, between two reads) takes it over with
 * a compare-and-set on that revision.  The holder stops handing the
 * subject's messages to the pool LEASE_FENCE_MS after its last successful
 * refresh was sent, well before any stand-by can call it stale.
 *
 * Stand-bys do not poll: a plain subscription on the bucket's subjects
 * tells them (on a cnats thread, which only records the key and wakes the
 * dispatcher) when a lease was written or released; they read a key only
 * then and when its staleness deadline comes.
 *
 * Every request to the server (opening the bucket, reading, writing and
 * releasing a lease) runs as a job on a helper thread (nats_api.c), with
 * its own short timeout (LEASE_WAIT_MS), and only while connected: a
 * server that hangs holds up nothing on the dispatcher's main thread.
 */
#include "postgres.h"

#include <pthread.h>
#include <unistd.h>

#include "access/xlog.h"
#include "miscadmin.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "nats_client.h"

#define LEASE_BUCKET		"eventbus_leases"
#define LEASE_WAIT_MS		1000	/* a lease request's timeout */
#define CHANGED_MAX			64		/* changed keys remembered between polls */

/* Keys written since the main thread last looked (cnats thread -> main). */
static pthread_mutex_t changed_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct
{
	int			n;
	bool		overflow;		/* more than CHANGED_MAX: look at every key */
	char		key[CHANGED_MAX][EB_NATS_LEASE_KEY];
	bool		free[CHANGED_MAX];	/* released or deleted */
} changed;

static jsCtx *lease_js = NULL;
static kvStore *kv = NULL;
static EbNatsJob *open_job = NULL;	/* an open under way */
/* Lease requests under way that use kv (helper threads decrement it). */
static pthread_mutex_t jobs_mutex = PTHREAD_MUTEX_INITIALIZER;
static int	bucket_jobs = 0;
static natsSubscription *notify_sub = NULL;
static char instance[96];		/* the part of a value before '/' */
static char me[EB_NATS_LEASE_VALUE];	/* our whole value */
static bool open_failed = false;	/* the last open failed (and said so) */

/*
 * The lease key of a durable: KeyValue keys take [A-Za-z0-9_=/.-], durable
 * names may hold more (eventbus.consumer_group is free text).
 */
void
eb_nats_lease_key(const char *durable, char *key)
{
	int			i;

	for (i = 0; durable[i] && i < EB_NATS_LEASE_KEY - 1; i++)
	{
		char		c = durable[i];

		key[i] = ((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
				  c == '_' || c == '-' || c == '=') ? c : '_';
	}
	key[i] = '\0';
}

/* cnats thread: a lease was written.  Plain C only. */
static void
notify_cb(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
	const char *subject = natsMsg_GetSubject(msg);
	const char *op = NULL;
	size_t		prefix = strlen("$KV." LEASE_BUCKET ".");
	bool		is_free;

	is_free = natsMsg_GetDataLength(msg) == 0 ||
		(natsMsgHeader_Get(msg, "KV-Operation", &op) == NATS_OK && op != NULL);
	if (subject != NULL && strlen(subject) > prefix && strlen(subject) - prefix < EB_NATS_LEASE_KEY)
	{
		pthread_mutex_lock(&changed_mutex);
		if (changed.n < CHANGED_MAX)
		{
			strcpy(changed.key[changed.n], subject + prefix);
			changed.free[changed.n++] = is_free;
		}
		else
			changed.overflow = true;
		pthread_mutex_unlock(&changed_mutex);
		eb_wakeup_signal();
	}
	natsMsg_Destroy(msg);
}

/*
 * Helper thread: open the bucket (creating it) for an open job; the main
 * thread takes what it made (eb_nats_lease_open).  Plain C.
 */
static void
job_open(EbNatsJob *j)
{
	jsOptions	jo;
	natsStatus	s;

	jsOptions_Init(&jo);
	jo.Wait = LEASE_WAIT_MS;
	s = natsConnection_JetStream(&j->lease_js, j->nc, &jo);
	if (s == NATS_OK)
		s = eb_nats_kv_open(j->lease_js, LEASE_BUCKET,
							"eventbus: which instance consumes each shared JetStream durable", &j->kv);
	j->ok = s == NATS_OK;
	if (!j->ok)
		snprintf(j->error, sizeof(j->error), "%s",
				 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s));
}

/* Helper thread: read a lease (see EbNatsLeaseState).  Plain C. */
static void
job_read(EbNatsJob *j)
{
	kvEntry    *e = NULL;
	natsStatus	s = kvStore_Get(&e, j->kv, j->lease_key);
	const char *slash = strchr(j->lease_value, '/');
	size_t		ilen = slash ? (size_t) (slash - j->lease_value) : strlen(j->lease_value);
	const char *v;
	int			len;

	j->lease_rev = 0;
	if (s == NATS_NOT_FOUND)
		j->lease_state = EB_LEASE_FREE;
	if (s != NATS_OK)
		return;
	j->lease_rev = kvEntry_Revision(e);
	v = kvEntry_Value(e);
	len = kvEntry_ValueLen(e);
	if (len <= 0 || v == NULL)
		j->lease_state = EB_LEASE_FREE;
	else if ((size_t) len > ilen && memcmp(v, j->lease_value, ilen) == 0 && v[ilen] == '/')
		j->lease_state = EB_LEASE_MINE_BEFORE;
	else
		j->lease_state = EB_LEASE_OTHER;
	kvEntry_Destroy(e);
}

/*
 * Helper thread: write our name into the lease if its revision is still
 * lease_rev (0: the key must not exist); lease_newrev is the new revision,
 * 0 if someone else wrote it first or there was no answer.  Plain C.
 */
static void
job_write(EbNatsJob *j)
{
	uint64_t	newrev = 0;
	natsStatus	s;

	if (j->lease_rev == 0)
		s = kvStore_CreateString(&newrev, j->kv, j->lease_key, j->lease_value);
	else
		s = kvStore_UpdateString(&newrev, j->kv, j->lease_key, j->lease_value, j->lease_rev);
	j->lease_newrev = s == NATS_OK ? (uint64) newrev : 0;
}

/*
 * Helper thread: release a lease we hold at lease_rev (an empty value), so
 * that the next holder binds the durable as it is.  The NAKs published
 * before it are flushed (and the server has read them) first: the next
 * holder must get them first.  ok: released.  Plain C.
 */
static void
job_release(EbNatsJob *j)
{
	uint64_t	newrev = 0;

	(void) natsConnection_FlushTimeout(j->nc, LEASE_WAIT_MS);
	j->ok = kvStore_Update(&newrev, j->kv, j->lease_key, "", 0, j->lease_rev) == NATS_OK;
}

/* Helper thread (nats_api.c's job_run): run a lease job.  Plain C. */
void
eb_nats_lease_job_run(EbNatsJob *j)
{
	switch (j->kind)
	{
		case EB_NATS_JOB_LEASE_OPEN:
			job_open(j);
			return;				/* not counted: it uses no bucket */
		case EB_NATS_JOB_LEASE_READ:
			job_read(j);
			break;
		case EB_NATS_JOB_LEASE_WRITE:
			job_write(j);
			break;
		case EB_NATS_JOB_LEASE_RELEASE:
			job_release(j);
			break;
		default:
			return;
	}
	pthread_mutex_lock(&jobs_mutex);
	bucket_jobs--;
	pthread_mutex_unlock(&jobs_mutex);
}

/*
 * A job is freed (either side): an open job whose bucket was not taken
 * destroys it.  Plain C.
 */
void
eb_nats_lease_job_destroy(EbNatsJob *j)
{
	if (j->kind != EB_NATS_JOB_LEASE_OPEN)
		return;
	if (j->kv != NULL)
		kvStore_Destroy(j->kv);
	if (j->lease_js != NULL)
		jsCtx_Destroy(j->lease_js);
	j->kv = NULL;
	j->lease_js = NULL;
}

/*
 * Open the bucket and the notifications.  The request runs as a job
 * (nats_api.c): the first call starts it and returns false; a later call,
 * once it is over, takes its outcome (true: open).  The caller paces new
 * attempts (eb_nats_lease_opening: one is under way).  A failure is said
 * once per failure kind (LOG).  The nonce is new each time: a reopened
 * lease set is a new holder to the others only in its nonce.
 */
bool
eb_nats_lease_open(void)
{
	EbNatsJob  *j = open_job;
	natsStatus	s = NATS_OK;
	sigset_t	old;
	uint32		nonce = 0;

	if (kv != NULL)
		return true;
	if (j == NULL)
	{
		if (eb_nats_conn == NULL || !eb_nats_connected())
			return false;
		snprintf(instance, sizeof(instance), UINT64_FORMAT ".%u." INT64_FORMAT,
				 GetSystemIdentifier(), MyDatabaseId, (int64) PgStartTime);
		if (!pg_strong_random(&nonce, sizeof(nonce)))
			nonce = (uint32) MyProcPid ^ (uint32) GetCurrentTimestamp();
		snprintf(me, sizeof(me), "%s/%d.%08x", instance, MyProcPid, nonce);
		if ((j = eb_nats_job_new(EB_NATS_JOB_LEASE_OPEN, "")) != NULL && eb_nats_job_start(j))
			open_job = j;
		return false;
	}
	if (!eb_nats_job_done(j))
		return false;
	open_job = NULL;
	if (j->ok)
	{
		kv = j->kv;
		lease_js = j->lease_js;
		j->kv = NULL;
		j->lease_js = NULL;
		/* cnats may start a delivery thread: it must not take our signals. */
		eb_nats_block_signals(&old);
		s = natsConnection_Subscribe(&notify_sub, eb_nats_conn, "$KV." LEASE_BUCKET ".>",
									 notify_cb, NULL);
		if (s == NATS_OK)
			s = natsSubscription_SetPendingLimits(notify_sub, -1, -1);
		eb_nats_restore_signals(&old);
	}
	if (!j->ok || s != NATS_OK)
	{
		/* Said once until it opens: the caller retries every second. */
		ereport(open_failed ? DEBUG1 : LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not open the JetStream lease bucket %s: %s", LEASE_BUCKET,
						!j->ok ? j->error : natsStatus_GetText(s)),
				 errdetail("In eventbus.consumer_mode = shared no JetStream subject is consumed until it opens; retrying.")));
		eb_nats_job_free(j);
		eb_nats_lease_close();
		open_failed = true;
		return false;
	}
	eb_nats_job_free(j);
	open_failed = false;
	pthread_mutex_lock(&changed_mutex);
	changed.n = 0;
	changed.overflow = true;	/* look at every key once */
	pthread_mutex_unlock(&changed_mutex);
	return true;
}

/* Is an open of the bucket under way? */
bool
eb_nats_lease_opening(void)
{
	return open_job != NULL;
}

/*
 * Forget the bucket (the connection is closing).  A lease request still
 * under way keeps using it: then it is left to the process's end, as the
 * connection's teardown leaves a connection that a job still uses.
 */
void
eb_nats_lease_close(void)
{
	sigset_t	old;
	int			running;

	eb_nats_job_free(open_job);
	open_job = NULL;
	pthread_mutex_lock(&jobs_mutex);
	running = bucket_jobs;
	pthread_mutex_unlock(&jobs_mutex);
	eb_nats_block_signals(&old);
	if (notify_sub != NULL)
		natsSubscription_Destroy(notify_sub);
	if (running == 0)
	{
		if (kv != NULL)
			kvStore_Destroy(kv);
		if (lease_js != NULL)
			jsCtx_Destroy(lease_js);
	}
	eb_nats_restore_signals(&old);
	notify_sub = NULL;
	kv = NULL;
	lease_js = NULL;
}

/*
 * Take the keys written since the last call: calls fn(key, is_free, arg)
 * for each; returns true if some were lost (then every key counts as
 * changed).
 */
bool
eb_nats_lease_changes(void (*fn) (const char *key, bool is_free, void *arg), void *arg)
{
	int			n;
	bool		overflow;
	char		(*keys)[EB_NATS_LEASE_KEY];
	bool	   *frees;

	pthread_mutex_lock(&changed_mutex);
	n = changed.n;
	overflow = changed.overflow;
	keys = palloc(sizeof(changed.key[0]) * Max(n, 1));
	frees = palloc(sizeof(bool) * Max(n, 1));
	memcpy(keys, changed.key, sizeof(changed.key[0]) * n);
	memcpy(frees, changed.free, sizeof(bool) * n);
	changed.n = 0;
	changed.overflow = false;
	pthread_mutex_unlock(&changed_mutex);

	for (int i = 0; i < n; i++)
		fn(keys[i], frees[i], arg);
	pfree(keys);
	pfree(frees);
	return overflow;
}

/*
 * Start a lease request as a job (nats_api.c): read (EB_NATS_JOB_LEASE_READ),
 * write our name if the revision is still rev (WRITE; rev 0: the key must
 * not exist), or release what we hold at rev (RELEASE).  NULL when it
 * cannot be sent now (bucket not open, not connected, a release of
 * revision 0): as no answer.  The
 * caller takes the outcome once eb_nats_job_done says so, and frees it.
 */
EbNatsJob *
eb_nats_lease_start(EbNatsJobKind kind, const char *key, uint64 rev)
{
	EbNatsJob  *j;

	if (kv == NULL || !eb_nats_connected())
		return NULL;
	if (kind == EB_NATS_JOB_LEASE_RELEASE && rev == 0)
		return NULL;			/* never written by us: nothing to release */
	if ((j = eb_nats_job_new(kind, "")) == NULL)
		return NULL;
	strlcpy(j->lease_key, key, sizeof(j->lease_key));
	strlcpy(j->lease_value, me, sizeof(j->lease_value));
	j->lease_rev = rev;
	j->lease_state = EB_LEASE_UNKNOWN;
	j->kv = kv;
	pthread_mutex_lock(&jobs_mutex);
	bucket_jobs++;
	pthread_mutex_unlock(&jobs_mutex);
	if (!eb_nats_job_start(j))
	{
		pthread_mutex_lock(&jobs_mutex);
		bucket_jobs--;
		pthread_mutex_unlock(&jobs_mutex);
		return NULL;
	}
	return j;
}

/* Is the lease bucket open? */
bool
eb_nats_lease_ready(void)
{
	return kv != NULL;
}

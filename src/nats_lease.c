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
 * Every call here is a synchronous JetStream request, made from the main
 * thread with its own short timeout (LEASE_WAIT_MS), and only while
 * connected.
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
static natsSubscription *notify_sub = NULL;
static char instance[96];		/* the part of a value before '/' */
static char me[128];			/* our whole value */

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
 * Open the bucket (creating it) and the notifications; false (with a LOG
 * line once per failure kind) if that is not possible now.  The nonce is
 * new each time: a reopened lease set is a new holder to the others only
 * in its nonce.
 */
bool
eb_nats_lease_open(void)
{
	kvConfig	cfg;
	jsOptions	jo;
	natsStatus	s;
	sigset_t	old;
	uint32		nonce = 0;

	if (kv != NULL)
		return true;
	if (eb_nats_conn == NULL || !eb_nats_connected())
		return false;

	snprintf(instance, sizeof(instance), UINT64_FORMAT ".%u." INT64_FORMAT,
			 GetSystemIdentifier(), MyDatabaseId, (int64) PgStartTime);
	if (!pg_strong_random(&nonce, sizeof(nonce)))
		nonce = (uint32) MyProcPid ^ (uint32) GetCurrentTimestamp();
	snprintf(me, sizeof(me), "%s/%d.%08x", instance, MyProcPid, nonce);

	eb_nats_block_signals(&old);
	jsOptions_Init(&jo);
	jo.Wait = LEASE_WAIT_MS;
	s = natsConnection_JetStream(&lease_js, eb_nats_conn, &jo);
	if (s == NATS_OK)
	{
		kvConfig_Init(&cfg);
		cfg.Bucket = LEASE_BUCKET;
		cfg.Description = "eventbus: which instance consumes each shared JetStream durable";
		cfg.History = 1;
		cfg.StorageType = js_FileStorage;
		s = js_CreateKeyValue(&kv, lease_js, &cfg);
		/* Created by someone else with other settings: use it as it is. */
		if (s != NATS_OK)
			s = js_KeyValue(&kv, lease_js, LEASE_BUCKET);
	}
	if (s == NATS_OK)
		s = natsConnection_Subscribe(&notify_sub, eb_nats_conn, "$KV." LEASE_BUCKET ".>",
									 notify_cb, NULL);
	if (s == NATS_OK)
		s = natsSubscription_SetPendingLimits(notify_sub, -1, -1);
	eb_nats_restore_signals(&old);
	if (s != NATS_OK)
	{
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not open the JetStream lease bucket %s: %s", LEASE_BUCKET,
						nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s)),
				 errdetail("In eventbus.consumer_mode = shared no JetStream subject is consumed until it opens; retrying.")));
		eb_nats_lease_close();
		return false;
	}
	pthread_mutex_lock(&changed_mutex);
	changed.n = 0;
	changed.overflow = true;	/* look at every key once */
	pthread_mutex_unlock(&changed_mutex);
	return true;
}

/* Forget the bucket (the connection is closing or reconnected). */
void
eb_nats_lease_close(void)
{
	sigset_t	old;

	eb_nats_block_signals(&old);
	if (notify_sub != NULL)
		natsSubscription_Destroy(notify_sub);
	if (kv != NULL)
		kvStore_Destroy(kv);
	if (lease_js != NULL)
		jsCtx_Destroy(lease_js);
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
 * Read a lease: EB_LEASE_FREE (never held or released), EB_LEASE_MINE_BEFORE
 * (held by this instance: a dispatcher of ours that died, or this one before
 * a reconnect), EB_LEASE_OTHER (held elsewhere) or EB_LEASE_UNKNOWN (no
 * answer).  *rev is the revision read (0 when the key does not exist).
 */
EbNatsLeaseState
eb_nats_lease_read(const char *key, uint64 *rev)
{
	kvEntry    *e = NULL;
	natsStatus	s;
	sigset_t	old;
	EbNatsLeaseState st;
	size_t		ilen = strlen(instance);

	*rev = 0;
	if (kv == NULL || !eb_nats_connected())
		return EB_LEASE_UNKNOWN;
	eb_nats_block_signals(&old);
	s = kvStore_Get(&e, kv, key);
	eb_nats_restore_signals(&old);
	if (s == NATS_NOT_FOUND)
		return EB_LEASE_FREE;
	if (s != NATS_OK)
		return EB_LEASE_UNKNOWN;
	*rev = kvEntry_Revision(e);
	{
		const char *v = kvEntry_Value(e);
		int			len = kvEntry_ValueLen(e);

		if (len <= 0 || v == NULL)
			st = EB_LEASE_FREE;
		else if ((size_t) len > ilen && memcmp(v, instance, ilen) == 0 && v[ilen] == '/')
			st = EB_LEASE_MINE_BEFORE;
		else
			st = EB_LEASE_OTHER;
	}
	kvEntry_Destroy(e);
	return st;
}

/*
 * Write our name into the lease if its revision is still rev (0: the key
 * must not exist).  Returns the new revision, 0 if someone else wrote it
 * first or there was no answer.
 */
uint64
eb_nats_lease_write(const char *key, uint64 rev)
{
	uint64_t	newrev = 0;
	natsStatus	s;
	sigset_t	old;

	if (kv == NULL || !eb_nats_connected())
		return 0;
	eb_nats_block_signals(&old);
	if (rev == 0)
		s = kvStore_CreateString(&newrev, kv, key, me);
	else
		s = kvStore_UpdateString(&newrev, kv, key, me, rev);
	eb_nats_restore_signals(&old);
	return s == NATS_OK ? (uint64) newrev : 0;
}

/*
 * Release a lease we hold at revision rev (an empty value): the next
 * holder binds the durable as it is.  False if it was not ours any more or
 * there was no answer.
 */
bool
eb_nats_lease_release(const char *key, uint64 rev)
{
	uint64_t	newrev = 0;
	natsStatus	s;
	sigset_t	old;

	if (kv == NULL || !eb_nats_connected() || rev == 0)
		return false;
	eb_nats_block_signals(&old);
	s = kvStore_Update(&newrev, kv, key, "", 0, rev);
	eb_nats_restore_signals(&old);
	return s == NATS_OK;
}

/* Is the lease bucket open? */
bool
eb_nats_lease_ready(void)
{
	return kv != NULL;
}

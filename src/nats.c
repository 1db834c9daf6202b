/*
 * nats.c — the process's NATS connection and JetStream context (shared by
 * the launcher's relay and the dispatcher's consumers), stream creation, and
 * the relay's asynchronous JetStream publishing.
 *
 * cnats runs its own threads.  They inherit PostgreSQL's signal handlers
 * unless created with every signal blocked, so each cnats call that may start
 * a thread runs inside block_signals()/restore_signals().  Callbacks on
 * those threads touch only the ack table below (under a pthread mutex) and
 * the wakeup pipe; the main thread drains the table into the relay.
 */
#include "postgres.h"

#include <pthread.h>

#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "eventbus.h"

/* Keep JetStream's dedupe window long enough to cover relay retries. */
#define DUPLICATE_WINDOW_NS ((int64) 10 * 60 * 1000000000)

natsConnection *eb_nats_conn = NULL;
jsCtx	   *eb_js = NULL;

static natsOptions *opts = NULL;
static HTAB *streams_ready = NULL;	/* topics known to have a stream */
static bool library_opened = false;
static bool last_stream_error_permanent = false;	/* of nats_ensure_stream */
static int	reconnect_attempts = 0;	/* written by cnats threads (atomic) */

/* Event id -> slot of the current round, sorted for bsearch. */
typedef struct IdSlot
{
	char		id[40];
	int			slot;
} IdSlot;

typedef enum AckResult
{
	ACK_PENDING = 0,
	ACK_OK,
	ACK_FAILED,
	ACK_FAILED_PERMANENT,
	ACK_REPORTED
} AckResult;

#define ACK_ERROR_LEN 160

/* Shared with cnats threads; every field guarded by ack_mutex. */
static pthread_mutex_t ack_mutex = PTHREAD_MUTEX_INITIALIZER;
static struct
{
	bool		active;
	int			n;
	int			capacity;
	IdSlot	   *index;
	uint8	   *result;			/* AckResult per slot */
	char		(*error)[ACK_ERROR_LEN];	/* per failed slot */
	int			completed;
	bool		no_responders;	/* a subject without a stream: look again */
} acks;

/*
 * Errors after which publishing the same message can never succeed: larger
 * than the server's max_payload or the stream's max_msg_size, a subject or
 * stream configuration the server refuses.  Everything else (no responders,
 * timeouts, disconnections, stream storage limits, JetStream unavailable)
 * is transient.  Plain C: called on cnats threads too.
 */
bool
nats_error_permanent(natsStatus s, int jerr)
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

/* Block every signal in this thread; threads created meanwhile inherit it. */
void
nats_block_signals(sigset_t *old)
{
	sigset_t	all;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, old);
}

void
nats_restore_signals(const sigset_t *old)
{
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

/* cnats thread: connection events only wake the launcher. */
static void
conn_event_cb(natsConnection *nc, void *closure)
{
	eb_wakeup_signal();
}

/* cnats thread: exponential reconnect backoff, 100 ms doubling to 5 s. */
static int64_t
reconnect_delay_cb(natsConnection *nc, int attempts, void *closure)
{
	int64_t		delay = 100;

	__atomic_store_n(&reconnect_attempts, attempts, __ATOMIC_RELAXED);
	for (int i = 1; i < attempts && delay < 5000; i++)
		delay *= 2;
	return delay < 5000 ? delay : 5000;
}

static int
idslot_cmp(const void *a, const void *b)
{
	return strcmp(((const IdSlot *) a)->id, ((const IdSlot *) b)->id);
}

/*
 * cnats thread: a publish was acknowledged or failed.  Plain C only: look
 * the event up by its Nats-Msg-Id and record the outcome.
 */
static void
ack_cb(jsCtx *ctx, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
	const char *id = NULL;
	bool		wake = false;

	if (natsMsgHeader_Get(msg, "Nats-Msg-Id", &id) == NATS_OK && id != NULL)
	{
		IdSlot		key;
		IdSlot	   *hit;

		snprintf(key.id, sizeof(key.id), "%s", id);
		pthread_mutex_lock(&ack_mutex);
		hit = acks.active ? bsearch(&key, acks.index, acks.n, sizeof(IdSlot), idslot_cmp) : NULL;
		if (hit && acks.result[hit->slot] == ACK_PENDING)
		{
			if (pa != NULL)
				acks.result[hit->slot] = ACK_OK;
			else
			{
				natsStatus	err = pae ? pae->Err : NATS_ERR;
				int			jerr = pae ? (int) pae->ErrCode : 0;

				acks.result[hit->slot] = nats_error_permanent(err, jerr) ?
					ACK_FAILED_PERMANENT : ACK_FAILED;
				if (err == NATS_NO_RESPONDERS)
					acks.no_responders = true;
				snprintf(acks.error[hit->slot], ACK_ERROR_LEN, "NATS: %s%s%s (JetStream error %d)",
						 natsStatus_GetText(err),
						 pae && pae->ErrText ? ": " : "",
						 pae && pae->ErrText ? pae->ErrText : "", jerr);
			}
			acks.completed++;
			wake = acks.completed == acks.n || pa == NULL;
		}
		pthread_mutex_unlock(&ack_mutex);
	}
	natsMsg_Destroy(msg);
	if (wake)
		eb_wakeup_signal();
}

/* Record a cnats failure as the producer's state. */
static void
set_down(const char *what, natsStatus s)
{
	char		detail[EB_DETAIL_LEN];

	snprintf(detail, sizeof(detail), "%s: %s: %s", eb_nats_url, what,
			 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s));
	eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_DOWN, detail);
}

/* Connect (or keep retrying in the background) to eventbus.nats_url. */
bool
nats_client_start(const char *name)
{
	natsStatus	s;
	jsOptions	jsopts;
	sigset_t	old;

	nats_block_signals(&old);
	library_opened = true;
	s = natsOptions_Create(&opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(opts, eb_nats_url);
	if (s == NATS_OK)
		s = natsOptions_SetName(opts, name);
	if (s == NATS_OK)
		s = natsOptions_SetRetryOnFailedConnect(opts, true, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetMaxReconnect(opts, -1);
	if (s == NATS_OK)
		s = natsOptions_SetCustomReconnectDelay(opts, reconnect_delay_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(opts, 2000);
	if (s == NATS_OK)
		s = natsOptions_SetDisconnectedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetClosedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK && eb_nats_token[0] != '\0')
		s = natsOptions_SetToken(opts, eb_nats_token);
	if (s == NATS_OK && eb_nats_credentials_file[0] != '\0')
		s = natsOptions_SetUserCredentialsFromFiles(opts, eb_nats_credentials_file, NULL);
	if (s != NATS_OK)
	{
		nats_restore_signals(&old);
		set_down("invalid NATS options", s);
		natsOptions_Destroy(opts);
		opts = NULL;
		return false;
	}

	s = natsConnection_Connect(&eb_nats_conn, opts);
	if (s == NATS_OK || s == NATS_NOT_YET_CONNECTED)
	{
		jsOptions_Init(&jsopts);
		jsopts.Wait = 5000;
		jsopts.PublishAsync.AckHandler = ack_cb;
		jsopts.PublishAsync.MaxPending = 20000;
		s = natsConnection_JetStream(&eb_js, eb_nats_conn, &jsopts) == NATS_OK ? s : NATS_ERR;
	}
	nats_restore_signals(&old);

	if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED)
	{
		set_down("connect failed", s);
		nats_client_stop();
		return false;
	}
	if (s == NATS_NOT_YET_CONNECTED)
		set_down("not reachable, retrying", s);
	else
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_CONNECTED, eb_nats_url);
	return true;
}

/* Close the connection; unacknowledged events stay in the outbox / stream. */
void
nats_client_stop(void)
{
	sigset_t	old;

	nats_block_signals(&old);
	if (eb_js)
		jsCtx_Destroy(eb_js);
	if (eb_nats_conn)
		natsConnection_Destroy(eb_nats_conn);
	if (opts)
		natsOptions_Destroy(opts);
	nats_restore_signals(&old);
	eb_js = NULL;
	eb_nats_conn = NULL;
	opts = NULL;

	pthread_mutex_lock(&ack_mutex);
	acks.active = false;
	pthread_mutex_unlock(&ack_mutex);

	if (streams_ready)
	{
		hash_destroy(streams_ready);
		streams_ready = NULL;
	}
}

/* At process exit: stop cnats' own threads. */
void
nats_library_close(void)
{
	if (library_opened)
		nats_CloseAndWait(2000);
	library_opened = false;
}

/* Track the connection state (log once per change). */
void
nats_poll_state(void)
{
	if (eb_nats_conn == NULL)
		return;

	if (natsConnection_Status(eb_nats_conn) == NATS_CONN_STATUS_CONNECTED)
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_CONNECTED, eb_nats_url);
	else
	{
		char		detail[EB_DETAIL_LEN];

		snprintf(detail, sizeof(detail), "%s: not connected (attempt %d)", eb_nats_url,
				 __atomic_load_n(&reconnect_attempts, __ATOMIC_RELAXED));
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_DOWN, detail);
	}
}

/* Track connection state and hand finished acks to the relay. */
void
nats_producer_poll(void)
{
	int			n;
	int		   *done;
	uint8	   *res;
	char		(*errors)[ACK_ERROR_LEN];
	int			ndone = 0;
	bool		forget_streams;

	if (eb_nats_conn == NULL)
		return;
	nats_poll_state();

	/* Only this thread changes acks.n; allocate before taking the mutex. */
	n = acks.n;
	if (n == 0)
		return;
	done = palloc(sizeof(int) * n);
	res = palloc(n);
	errors = palloc((Size) ACK_ERROR_LEN * n);

	pthread_mutex_lock(&ack_mutex);
	for (int i = 0; acks.active && i < n; i++)
	{
		if (acks.result[i] == ACK_OK || acks.result[i] == ACK_FAILED ||
			acks.result[i] == ACK_FAILED_PERMANENT)
		{
			done[ndone] = i;
			res[ndone] = acks.result[i];
			memcpy(errors[ndone++], acks.error[i], ACK_ERROR_LEN);
			acks.result[i] = ACK_REPORTED;
		}
	}
	forget_streams = acks.no_responders;
	acks.no_responders = false;
	pthread_mutex_unlock(&ack_mutex);

	/* A stream was deleted under us: make sure of every stream again. */
	if (forget_streams && streams_ready)
	{
		hash_destroy(streams_ready);
		streams_ready = NULL;
	}

	for (int i = 0; i < ndone; i++)
		eb_relay_ack(EB_TRANSPORT_NATS, done[i],
					 res[i] == ACK_OK ? EB_DELIVERED :
					 res[i] == ACK_FAILED_PERMANENT ? EB_FAILED_PERMANENT : EB_FAILED_TRANSIENT,
					 res[i] == ACK_OK ? NULL : errors[i]);
	pfree(done);
	pfree(res);
	pfree(errors);
}

bool
nats_connected(void)
{
	return eb_nats_conn != NULL && natsConnection_Status(eb_nats_conn) == NATS_CONN_STATUS_CONNECTED;
}

/* Prepare the ack table for a round of n events (before any publish). */
void
nats_publish_begin(const EbEvent *events, int n)
{
	pthread_mutex_lock(&ack_mutex);
	if (n > acks.capacity)
	{
		if (acks.index)
		{
			pfree(acks.index);
			pfree(acks.result);
			pfree(acks.error);
		}
		acks.index = MemoryContextAlloc(TopMemoryContext, sizeof(IdSlot) * n);
		acks.result = MemoryContextAlloc(TopMemoryContext, n);
		acks.error = MemoryContextAlloc(TopMemoryContext, (Size) ACK_ERROR_LEN * n);
		acks.capacity = n;
	}
	for (int i = 0; i < n; i++)
	{
		strlcpy(acks.index[i].id, events[i].event_id, sizeof(acks.index[i].id));
		acks.index[i].slot = i;
	}
	qsort(acks.index, n, sizeof(IdSlot), idslot_cmp);
	memset(acks.result, ACK_PENDING, n);
	acks.n = n;
	acks.completed = 0;
	acks.active = true;
	pthread_mutex_unlock(&ack_mutex);
}

/* Give up on unacknowledged publishes of this round: they will be resent. */
void
nats_publish_abandon(void)
{
	natsMsgList pending;
	sigset_t	old;

	pthread_mutex_lock(&ack_mutex);
	acks.active = false;
	pthread_mutex_unlock(&ack_mutex);

	if (eb_js == NULL)
		return;
	nats_block_signals(&old);
	if (js_PublishAsyncGetPendingList(&pending, eb_js) == NATS_OK)
		natsMsgList_Destroy(&pending);
	nats_restore_signals(&old);
}

/* Stream name for a topic: EVENTBUS_<topic with '.' as '_'>_<fnv1a hex>. */
static void
stream_name(const char *topic, char *buf, size_t len)
{
	uint32		h = 2166136261u;
	int			k;

	for (const char *p = topic; *p; p++)
		h = (h ^ (unsigned char) *p) * 16777619u;
	k = snprintf(buf, len, "EVENTBUS_");
	for (const char *p = topic; *p && k < 200; p++)
		buf[k++] = *p == '.' ? '_' : *p;
	snprintf(buf + k, len - k, "_%08x", h);
}

/*
 * Make sure a stream captures the topic.  A stream that already captures it
 * (the user's own) is used as is; otherwise create one that never discards
 * unconsumed events: limits retention without limits, and DiscardNew so a
 * limit added later rejects new events instead of dropping old ones.
 */
bool
nats_ensure_stream(const char *topic, char **errmsg)
{
	jsStreamConfig cfg;
	jsStreamInfo *si = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;
	char		name[256];
	const char *subjects[1];
	bool		found;
	sigset_t	old;

	if (streams_ready == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = EB_MAX_TOPIC + 1;
		ctl.entrysize = EB_MAX_TOPIC + 1;
		streams_ready = hash_create("eventbus nats streams", 64, &ctl, HASH_ELEM | HASH_STRINGS);
	}
	if (hash_search(streams_ready, topic, HASH_FIND, NULL))
		return true;

	stream_name(topic, name, sizeof(name));
	subjects[0] = topic;
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

	nats_block_signals(&old);
	s = js_AddStream(&si, eb_js, &cfg, NULL, &jerr);
	if (si)
		jsStreamInfo_Destroy(si);
	nats_restore_signals(&old);

	if (s != NATS_OK && jerr != JSStreamSubjectOverlapErr && jerr != JSStreamNameExistErr)
	{
		*errmsg = psprintf("could not create JetStream stream %s for subject %s: %s (JetStream error %d)",
						   name, topic, natsStatus_GetText(s), (int) jerr);
		last_stream_error_permanent = nats_error_permanent(s, jerr);
		return false;
	}
	(void) hash_search(streams_ready, topic, HASH_ENTER, &found);
	return true;
}

/* Add one header to a NATS message. */
static void
add_header(void *arg, const char *name, const char *value)
{
	natsMsgHeader_Add((natsMsg *) arg, name, value);
}

/*
 * Publish one event asynchronously; its ack arrives in ack_cb.  On an
 * immediate failure, *permanent says whether retrying could help.
 */
bool
nats_publish(const EbEvent *ev, const char *value, size_t len, int slot, char **errmsg,
			 bool *permanent)
{
	natsMsg    *msg = NULL;
	natsStatus	s;
	sigset_t	old;

	*permanent = false;
	if (eb_js == NULL)
	{
		*errmsg = "NATS connection not running";
		return false;
	}
	last_stream_error_permanent = false;
	if (!nats_ensure_stream(ev->topic, errmsg))
	{
		*permanent = last_stream_error_permanent;
		return false;
	}

	s = natsMsg_Create(&msg, ev->topic, NULL, value, (int) len);
	if (s == NATS_OK)
	{
		eb_event_headers(ev, add_header, msg);
		s = natsMsgHeader_Set(msg, "Nats-Msg-Id", ev->event_id);
	}
	if (s == NATS_OK)
	{
		nats_block_signals(&old);
		s = js_PublishMsgAsync(eb_js, &msg, NULL);
		nats_restore_signals(&old);
	}
	if (s != NATS_OK)
	{
		if (msg)
			natsMsg_Destroy(msg);
		*errmsg = psprintf("NATS publish failed: %s", natsStatus_GetText(s));
		*permanent = nats_error_permanent(s, 0);
		return false;
	}
	return true;
}

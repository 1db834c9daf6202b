/*
 * nats.c — the NATS JetStream transport: the process's NATS connection and
 * JetStream context (shared by the launcher's relay and the dispatcher's
 * consumers), stream creation, the relay's asynchronous publishing, the
 * checks publishing backends make, and the transport routine.
 *
 * cnats runs its own threads.  They inherit PostgreSQL's signal handlers
 * unless created with every signal blocked, so each cnats call that may start
 * a thread runs inside block_signals()/restore_signals().  Callbacks on
 * those threads touch only the ack table below (under a pthread mutex) and
 * the wakeup pipe; the main thread drains the table into the relay.  (The
 * consumer's delivery callback is in nats_inbox.c, under the same rules.)
 */
#include "postgres.h"

#include <pthread.h>

#include "utils/hsearch.h"
#include "utils/memutils.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "nats_client.h"
#include "transport.h"
#include "util.h"

/*
 * The waves of a round of at most this many events are sent at once
 * (wave_sent); larger rounds leave them to cnats' flusher.
 */
#define FLUSH_ROUND_MAX	8

/* How long the relay waits for a stream creation before going on without it. */
#define STREAM_WAIT_MS	20

natsConnection *eb_nats_conn = NULL;
jsCtx	   *eb_js = NULL;

static natsOptions *opts = NULL;
static HTAB *streams_ready = NULL;	/* topics known to have a stream */
static EbNatsJob *stream_job = NULL;	/* the stream creation in flight */
static bool library_opened = false;
static bool last_stream_error_permanent = false;	/* of ensure_stream */
static int	reconnect_attempts = 0;	/* written by cnats threads (atomic) */
static EbAckFn ack_fn = NULL;	/* the relay's, while the producer runs */

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
	ACK_FAILED_PERMANENT
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
	int		   *done;			/* slots in the order their outcome came */
	int			completed;		/* entries of done */
	int			taken;			/* of them, handed to the relay */
	int			sent;			/* published so far (a round sends in waves) */
	bool		no_responders;	/* a subject without a stream: look again */
} acks;

/* Block every signal in this thread; threads created meanwhile inherit it. */
void
eb_nats_block_signals(sigset_t *old)
{
	sigset_t	all;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, old);
}

void
eb_nats_restore_signals(const sigset_t *old)
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
	__atomic_store_n(&reconnect_attempts, attempts, __ATOMIC_RELAXED);
	return eb_backoff_delay(attempts, 100, 5000);
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

				acks.result[hit->slot] = eb_nats_error_permanent(err, jerr) ?
					ACK_FAILED_PERMANENT : ACK_FAILED;
				if (err == NATS_NO_RESPONDERS)
					acks.no_responders = true;
				snprintf(acks.error[hit->slot], ACK_ERROR_LEN, "NATS: %s%s%s (JetStream error %d)",
						 natsStatus_GetText(err),
						 pae && pae->ErrText ? ": " : "",
						 pae && pae->ErrText ? pae->ErrText : "", jerr);
			}
			acks.done[acks.completed++] = hit->slot;
			/* Everything sent is in: the relay may send the next wave. */
			wake = acks.completed == acks.sent || pa == NULL;
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

/*
 * Connect (or keep retrying in the background) to eventbus.nats_url.  A
 * consumer's subscriptions (one per subject) share cnats' delivery thread
 * pool instead of a thread each.
 */
bool
eb_nats_client_start(const char *name, bool consumer)
{
	natsStatus	s;
	jsOptions	jsopts;
	sigset_t	old;

	eb_nats_block_signals(&old);
	library_opened = true;
	s = natsOptions_Create(&opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(opts, eb_nats_url);
	if (s == NATS_OK)
		s = natsOptions_SetName(opts, name);
	if (s == NATS_OK && consumer)
		s = natsOptions_UseGlobalMessageDelivery(opts, true);
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
		eb_nats_restore_signals(&old);
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
	eb_nats_restore_signals(&old);

	if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED)
	{
		set_down("connect failed", s);
		eb_nats_client_stop();
		return false;
	}
	if (s == NATS_NOT_YET_CONNECTED)
		set_down("not reachable, retrying", s);
	else
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_CONNECTED, eb_nats_url);
	return true;
}

/*
 * Shutdown budgets (ms).  Closing a connection flushes (0.5 s at most) and
 * joins its reconnect thread, which may sit in a connect attempt (2 s
 * timeout); closing the library joins cnats' own threads.
 */
#define CLOSE_BUDGET_MS		2000
#define LIBRARY_BUDGET_MS	1000

/* What a teardown helper thread destroys (malloc'd: it may outlive us). */
typedef struct NatsTeardown
{
	jsCtx	   *js;
	natsConnection *nc;
	natsOptions *opts;
} NatsTeardown;

static bool teardown_overran = false;

/* Helper thread: plain cnats calls only. */
static void
teardown(void *arg)
{
	NatsTeardown *t = arg;

	if (t->js)
		jsCtx_Destroy(t->js);
	if (t->nc)
		natsConnection_Destroy(t->nc);
	if (t->opts)
		natsOptions_Destroy(t->opts);
	free(t);
}

/*
 * Close the connection in bounded time; unacknowledged events stay in the
 * outbox / stream.  A close that overruns is left to the process exit.
 */
void
eb_nats_client_stop(void)
{
	NatsTeardown *t = malloc(sizeof(NatsTeardown));

	if (t == NULL)
		ereport(FATAL, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	t->js = eb_js;
	t->nc = eb_nats_conn;
	t->opts = opts;
	eb_js = NULL;
	eb_nats_conn = NULL;
	opts = NULL;

	pthread_mutex_lock(&ack_mutex);
	acks.active = false;
	pthread_mutex_unlock(&ack_mutex);

	eb_nats_job_free(stream_job);
	stream_job = NULL;
	if (!eb_nats_jobs_wait(CLOSE_BUDGET_MS))
	{
		/* A JetStream request still uses the connection: leave it behind. */
		teardown_overran = true;
		free(t);
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("a JetStream request did not end within %d ms, leaving the NATS connection behind",
						CLOSE_BUDGET_MS),
				 errdetail("Unacknowledged messages are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
	}
	else if (t->js || t->nc || t->opts)
	{
		if (!eb_run_bounded(teardown, t, CLOSE_BUDGET_MS))
		{
			teardown_overran = true;
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("the NATS connection did not close within %d ms, leaving it behind",
							CLOSE_BUDGET_MS),
					 errdetail("Unacknowledged messages are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
		}
	}
	else
		free(t);

	if (streams_ready)
	{
		hash_destroy(streams_ready);
		streams_ready = NULL;
	}
}

/* Helper thread: close the library and wait (bounded) for its threads. */
static void
library_close_thread(void *arg)
{
	nats_CloseAndWait(LIBRARY_BUDGET_MS);
}

/*
 * At process exit: stop cnats' own threads, in bounded time.  Skipped when
 * a connection close overran (the library would wait for it in vain).
 */
static void
library_close(void)
{
	if (library_opened && !teardown_overran)
		(void) eb_run_bounded(library_close_thread, NULL, LIBRARY_BUDGET_MS + 500);
	library_opened = false;
}

/* Reconnections of the current connection so far (0 if none). */
uint64
eb_nats_reconnects(void)
{
	natsStatistics *stats = NULL;
	uint64_t	reconnects = 0;

	if (eb_nats_conn == NULL || natsStatistics_Create(&stats) != NATS_OK)
		return 0;
	if (natsConnection_GetStats(eb_nats_conn, stats) == NATS_OK)
		natsStatistics_GetCounts(stats, NULL, NULL, NULL, NULL, &reconnects);
	natsStatistics_Destroy(stats);
	return (uint64) reconnects;
}

/* Track the connection state (log once per change). */
void
eb_nats_poll_state(void)
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

/*
 * Tell publishing backends the server's max_payload (they refuse larger
 * events); learned from the server's INFO on connect.
 */
static void
share_max_payload(void)
{
	int64		max_payload;

	if (!eb_nats_connected())
		return;
	max_payload = natsConnection_GetMaxPayload(eb_nats_conn);
	if (max_payload <= 0)
		return;
	eb_shmem_set_max_message(EB_TRANSPORT_NATS, max_payload);
}

/*
 * Track connection state and hand finished acks to the relay: only those
 * that came since the last poll (a round sending in waves is polled once
 * per wave).
 */
static bool
producer_poll(void)
{
	int			from;
	int			to;
	int			k = 0;
	int		   *done;
	uint8	   *res;
	char		(*errors)[ACK_ERROR_LEN];
	bool		forget_streams;

	if (eb_nats_conn == NULL)
		return true;
	eb_nats_poll_state();
	share_max_payload();

	pthread_mutex_lock(&ack_mutex);
	from = acks.taken;
	to = acks.active ? acks.completed : from;
	forget_streams = acks.no_responders;
	acks.no_responders = false;
	pthread_mutex_unlock(&ack_mutex);

	/* A stream was deleted under us: make sure of every stream again. */
	if (forget_streams && streams_ready)
	{
		hash_destroy(streams_ready);
		streams_ready = NULL;
	}
	if (to == from)
		return true;

	/*
	 * Allocate outside the mutex (an error must not leave it held); only
	 * this thread starts rounds or takes acks, so done[from..to) stays.
	 */
	done = palloc(sizeof(int) * (to - from));
	res = palloc(to - from);
	errors = palloc((Size) ACK_ERROR_LEN * (to - from));
	pthread_mutex_lock(&ack_mutex);
	for (int i = from; i < to; k++, i++)
	{
		done[k] = acks.done[i];
		res[k] = acks.result[done[k]];
		memcpy(errors[k], acks.error[done[k]], ACK_ERROR_LEN);
	}
	acks.taken = to;
	pthread_mutex_unlock(&ack_mutex);

	for (int i = 0; i < k && ack_fn != NULL; i++)
		ack_fn(EB_TRANSPORT_NATS, done[i],
			   res[i] == ACK_OK ? EB_DELIVERED :
			   res[i] == ACK_FAILED_PERMANENT ? EB_FAILED_PERMANENT : EB_FAILED_TRANSIENT,
			   res[i] == ACK_OK ? NULL : errors[i]);
	pfree(done);
	pfree(res);
	pfree(errors);
	return true;
}

/* Every ack arrives through producer_poll: nothing to wait for. */
static void
producer_drain(int timeout_ms)
{
	(void) producer_poll();
}

/* Connect the relay's producer. */
static bool
producer_start(EbAckFn ack)
{
	ack_fn = ack;
	return eb_nats_client_start("eventbus relay", false);
}

/* Close the relay's connection; unacknowledged events stay in the outbox. */
static void
producer_stop(void)
{
	eb_nats_client_stop();
	ack_fn = NULL;
}

/* Is the connection up? */
bool
eb_nats_connected(void)
{
	return eb_nats_conn != NULL && natsConnection_Status(eb_nats_conn) == NATS_CONN_STATUS_CONNECTED;
}

/* Prepare the ack table for a round of n events (before any publish). */
static void
round_begin(const EbEvent *events, int n)
{
	IdSlot	   *index = acks.index;
	uint8	   *result = acks.result;
	char		(*error)[ACK_ERROR_LEN] = acks.error;
	int		   *done = acks.done;
	bool		grow = n > acks.capacity;	/* only this thread changes it */

	/* Allocate outside the mutex: an error must not leave it held. */
	if (grow)
	{
		index = MemoryContextAlloc(TopMemoryContext, sizeof(IdSlot) * n);
		result = MemoryContextAlloc(TopMemoryContext, n);
		error = MemoryContextAlloc(TopMemoryContext, (Size) ACK_ERROR_LEN * n);
		done = MemoryContextAlloc(TopMemoryContext, sizeof(int) * n);
	}

	pthread_mutex_lock(&ack_mutex);
	if (grow)
	{
		/* The old arrays are freed below, once no thread can see them. */
		IdSlot	   *swap_index = acks.index;
		uint8	   *swap_result = acks.result;
		char		(*swap_error)[ACK_ERROR_LEN] = acks.error;
		int		   *swap_done = acks.done;

		acks.index = index;
		acks.result = result;
		acks.error = error;
		acks.done = done;
		acks.capacity = n;
		index = swap_index;
		result = swap_result;
		error = swap_error;
		done = swap_done;
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
	acks.taken = 0;
	acks.sent = 0;
	acks.active = true;
	pthread_mutex_unlock(&ack_mutex);

	if (grow && index != NULL)
	{
		pfree(index);
		pfree(result);
		pfree(error);
		pfree(done);
	}
}

/* Give up on unacknowledged publishes of this round: they will be resent. */
static void
round_abandon(void)
{
	natsMsgList pending;
	sigset_t	old;

	pthread_mutex_lock(&ack_mutex);
	acks.active = false;
	pthread_mutex_unlock(&ack_mutex);

	if (eb_js == NULL)
		return;
	eb_nats_block_signals(&old);
	if (js_PublishAsyncGetPendingList(&pending, eb_js) == NATS_OK)
		natsMsgList_Destroy(&pending);
	eb_nats_restore_signals(&old);
}

/*
 * The outcome of the stream creation in flight (it is over): true if the
 * stream is there, and the topic then known to have one.
 */
static bool
stream_job_taken(char **errmsg)
{
	EbNatsJob  *j = stream_job;
	bool		found;
	bool		ok = j->ok;

	stream_job = NULL;
	if (ok)
		(void) hash_search(streams_ready, j->topic, HASH_ENTER, &found);
	else
	{
		*errmsg = pstrdup(j->error);
		last_stream_error_permanent = j->permanent;
	}
	eb_nats_job_free(j);
	return ok;
}

/*
 * Make sure a stream captures the topic (nats_api.c creates it, or finds
 * the user's own).  The request runs on a helper thread, one at a time: a
 * healthy server answers within STREAM_WAIT_MS, waited for once per
 * request; otherwise the event fails for now (its aggregate backs off) and
 * the round goes on, so a NATS server that hangs holds up nothing else.
 */
bool
eb_nats_ensure_stream(const char *topic, char **errmsg)
{
	if (streams_ready == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = EB_MAX_TOPIC + 1;
		ctl.entrysize = EB_MAX_TOPIC + 1;
		streams_ready = hash_create("eventbus nats streams", 64, &ctl, HASH_ELEM | HASH_STRINGS);
	}
	if (hash_search(streams_ready, topic, HASH_FIND, NULL))
		return true;
	/* Not connected, a JetStream request would only wait for its timeout. */
	if (!eb_nats_connected())
	{
		*errmsg = psprintf("could not create the JetStream stream for subject %s: NATS not connected", topic);
		return false;
	}
	if (stream_job != NULL && strcmp(stream_job->topic, topic) != 0)
	{
		if (!eb_nats_job_done(stream_job))
		{
			*errmsg = psprintf("waiting for NATS to create the JetStream stream for subject %s first",
							   stream_job->topic);
			return false;
		}
		(void) stream_job_taken(errmsg);	/* another topic's: noted */
		last_stream_error_permanent = false;
	}
	if (stream_job == NULL)
	{
		EbNatsJob  *j = eb_nats_job_new(EB_NATS_JOB_STREAM, topic);

		if (j == NULL || !eb_nats_job_start(j))
		{
			*errmsg = psprintf("could not create the JetStream stream for subject %s: no helper thread", topic);
			return false;
		}
		stream_job = j;
		/* Only for the job just started: its topic's other events do not wait again. */
		(void) eb_nats_job_wait(stream_job, STREAM_WAIT_MS);
	}
	if (!eb_nats_job_done(stream_job))
	{
		*errmsg = psprintf("could not create the JetStream stream for subject %s: no answer from NATS yet", topic);
		return false;
	}
	return stream_job_taken(errmsg);
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
static bool
produce(const EbEvent *ev, const char *value, size_t len, int slot, char **errmsg,
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
	if (!eb_nats_ensure_stream(ev->topic, errmsg))
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
		pthread_mutex_lock(&ack_mutex);
		acks.sent++;
		pthread_mutex_unlock(&ack_mutex);
		eb_nats_block_signals(&old);
		s = js_PublishMsgAsync(eb_js, &msg, NULL);
		eb_nats_restore_signals(&old);
		if (s != NATS_OK)
		{
			pthread_mutex_lock(&ack_mutex);
			acks.sent--;
			pthread_mutex_unlock(&ack_mutex);
		}
	}
	if (s != NATS_OK)
	{
		if (msg)
			natsMsg_Destroy(msg);
		*errmsg = psprintf("NATS publish failed: %s", natsStatus_GetText(s));
		*permanent = eb_nats_error_permanent(s, 0);
		return false;
	}
	return true;
}

/*
 * Send a small round's wave now.  cnats (3.4) buffers publishes and its
 * flusher thread waits 1 ms for more before writing, so every wave, and
 * with it each step of an aggregate's chain, would wait that long.  A flush
 * writes the buffer at once with a PING and waits for the PONG, at most
 * 1 ms, while the wave's acknowledgements are awaited anyway.  Only a
 * round of a few events (light traffic, where that millisecond is most of
 * the relay's time) is sent so: under load, rounds that end sooner only
 * mean more of them, each an outbox read and delete.
 */
static void
wave_sent(int round_n)
{
	sigset_t	old;

	if (round_n > FLUSH_ROUND_MAX || eb_nats_conn == NULL || !eb_nats_connected())
		return;
	eb_nats_block_signals(&old);
	(void) natsConnection_FlushTimeout(eb_nats_conn, 1);
	eb_nats_restore_signals(&old);
}

/* --- configuration and the checks publishing backends make --- */

/* Is eventbus.nats_url set? */
static bool
configured(void)
{
	return eb_nats_url != NULL && eb_nats_url[0] != '\0';
}

/* The settings the producer (or the consumer: durable names) depends on. */
static char *
settings(bool producer)
{
	return psprintf("%s|%s|%s|%s|%d", eb_nats_url, eb_nats_credentials_file, eb_nats_token,
					producer ? "" : eb_consumer_group, producer ? 0 : eb_consumer_mode);
}

/*
 * A NATS subject is tokens separated by '.', none of them empty (nats-server
 * cannot capture "a..b" or ".a" in a stream).  Wildcards and whitespace are
 * already outside the characters every topic may use.
 */
static void
check_topic(const char *topic)
{
	for (const char *p = topic; *p; p++)
	{
		if (*p == '.' && (p == topic || p[1] == '.' || p[1] == '\0'))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid topic name \"%s\" for transport \"nats\"", topic),
					 errdetail("A NATS subject is tokens separated by '.'; the token %s character %d is empty.",
							   p == topic ? "before" : "after", (int) (p - topic) + 1),
					 errhint("Do not start or end the topic with '.' or repeat '.'.")));
	}
}

/* The server's max_payload, which the relay learns when it connects, else 1 MB. */
static int64
max_message(const char **limit_name)
{
	int64		limit = eb_shmem_max_message(EB_TRANSPORT_NATS);

	*limit_name = "the NATS server's max_payload";
	return limit > 0 ? limit : EB_NATS_DEFAULT_MAX_PAYLOAD;
}

/* Add one header line's size ("Name: value\r\n") to *arg (a Size). */
static void
count_header(void *arg, const char *name, const char *value)
{
	*(Size *) arg += strlen(name) + 2 + strlen(value) + 2;
}

/*
 * Size of ev's message as cnats and the server check it: the headers block
 * "NATS/1.0\r\n" + "Name: value\r\n"... + "\r\n", including Nats-Msg-Id,
 * plus the body.
 */
static Size
wire_size(const EbEvent *ev, Size envelope_len)
{
	Size		headers = 0;

	eb_event_headers(ev, count_header, &headers);
	count_header(&headers, "Nats-Msg-Id", ev->event_id);
	return 10 + headers + 2 + envelope_len;
}

const EbTransportRoutine eb_nats_transport = {
	.name = "nats",
	.setting = "eventbus.nats_url",
	.one_per_aggregate = true,	/* each publish is acknowledged on its own */
	.reconnect_poll_ms = 1000,	/* connection events wake the relay */

	.configured = configured,
	.settings = settings,
	.check_topic = check_topic,
	.max_message = max_message,
	.max_message_hint = "max_payload of the NATS server",
	.wire_size = wire_size,

	.producer_start = producer_start,
	.producer_stop = producer_stop,
	.producer_poll = producer_poll,
	.producer_drain = producer_drain,
	.connected = eb_nats_connected,
	.round_begin = round_begin,
	.produce = produce,
	.round_abandon = round_abandon,
	.wave_sent = wave_sent,

	.consumer_start = eb_nats_consumer_start,
	.consumer_stop = eb_nats_consumer_stop,
	.consumer_check = eb_nats_consumer_check,
	.consumer_set_topics = eb_nats_consumer_set_topics,
	.consumer_poll = eb_nats_consumer_poll,
	.consumer_done = eb_nats_consumer_done,
	.consumer_live = eb_nats_consumer_live,
	.consumer_abandon = eb_nats_consumer_abandon,
	.consumer_share = eb_nats_consumer_share,
	.consumer_pause = eb_nats_consumer_pause,
	.consumer_lag = eb_nats_consumer_lag,
	.consumer_idle_poll_ms = eb_nats_consumer_idle_poll_ms,

	.library_close = library_close,
};

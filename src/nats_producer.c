/*
 * nats_producer.c — the relay's JetStream publishing: the streams its
 * subjects need (created on a helper thread, nats_api.c), asynchronous
 * publishes with Nats-Msg-Id, and the table their acknowledgements land in.
 *
 * Acknowledgements arrive on cnats threads (eb_nats_ack_cb): plain C only,
 * under ack_mutex, then the wakeup pipe; the launcher's main thread takes
 * them in eb_nats_producer_poll and hands them to the relay.
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

static HTAB *streams_ready = NULL;	/* topics known to have a stream */
static EbNatsJob *stream_job = NULL;	/* the stream creation in flight */
static bool last_stream_error_permanent = false;	/* of ensure_stream */
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

static int
idslot_cmp(const void *a, const void *b)
{
	return strcmp(((const IdSlot *) a)->id, ((const IdSlot *) b)->id);
}

/*
 * cnats thread: a publish was acknowledged or failed.  Plain C only: look
 * the event up by its Nats-Msg-Id and record the outcome.
 */
void
eb_nats_ack_cb(jsCtx *ctx, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
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

/*
 * The connection closes: acknowledgements still to come belong to no round,
 * the stream creation in flight is abandoned (nats_api.c frees it), and
 * every stream is looked up again on the next connection.
 */
void
eb_nats_producer_forget(void)
{
	pthread_mutex_lock(&ack_mutex);
	acks.active = false;
	pthread_mutex_unlock(&ack_mutex);

	eb_nats_job_free(stream_job);
	stream_job = NULL;
	if (streams_ready)
	{
		hash_destroy(streams_ready);
		streams_ready = NULL;
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
bool
eb_nats_producer_poll(void)
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

/* Every ack arrives through eb_nats_producer_poll: nothing to wait for. */
void
eb_nats_producer_drain(int timeout_ms)
{
	(void) eb_nats_producer_poll();
}

/* Connect the relay's producer. */
bool
eb_nats_producer_start(EbAckFn ack)
{
	ack_fn = ack;
	return eb_nats_client_start("eventbus relay", false);
}

/* Close the relay's connection; unacknowledged events stay in the outbox. */
void
eb_nats_producer_stop(void)
{
	eb_nats_client_stop();
	ack_fn = NULL;
}

/* Prepare the ack table for a round of n events (before any publish). */
void
eb_nats_round_begin(const EbEvent *events, int n)
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
void
eb_nats_round_abandon(void)
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
bool
eb_nats_produce(const EbEvent *ev, const char *value, size_t len, int slot, char **errmsg,
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
void
eb_nats_wave_sent(int round_n)
{
	sigset_t	old;

	if (round_n > FLUSH_ROUND_MAX || eb_nats_conn == NULL || !eb_nats_connected())
		return;
	eb_nats_block_signals(&old);
	(void) natsConnection_FlushTimeout(eb_nats_conn, 1);
	eb_nats_restore_signals(&old);
}

/*
 * nats_consumer.c — the dispatcher's JetStream consumers: one durable pull
 * consumer per subscribed subject.  The main thread keeps a pull request
 * open on each (batch, max_bytes, expiry) for as much as the dispatcher can
 * take; the server answers as messages arrive, into the inbox
 * (nats_inbox.c), which wakes the dispatcher.  Nothing polls while idle: a
 * request only ends when used up or expired, and is then renewed.
 *
 * Single mode: the durables are AckNone, and we keep their positions, as
 * Kafka's consumer keeps its committed offsets.  Acking each message cost
 * the server and us more than handling it (an ack is a message of its own
 * for the server to route and apply).  A subscription's position is the
 * stream sequence up to which every message delivered to us is finished
 * (its handlers' commit flushed, or quarantined): the message before the
 * oldest one still out, else the last delivered.  It is written to the
 * KeyValue bucket EB_NATS_POSITIONS_BUCKET (a plain publish, no answer
 * awaited) at most every POSITION_EVERY_MS while it moves, and when the
 * subscription is released (shutdown included).  A position lost on the
 * way only means more comes again after a restart, which the inbox skips.
 * Shared mode keeps explicit acks: a lease's hand-over gives messages back
 * one by one (NAK), which an AckNone durable cannot take.
 *
 * Memory: the bytes queued in the inbox plus what the open requests may
 * still bring stay within the budget the dispatcher passes to poll (its
 * eventbus.dispatcher_memory minus what it holds).  A message larger than
 * a request's max_bytes ends the request with nothing (409); the consumer
 * then asks for more once that much is free, and a message larger than
 * eventbus.dispatcher_memory itself is fetched alone, when nothing else is
 * held.
 *
 * Order across restarts: an AckNone durable never redelivers, and an
 * explicit one redelivers a message that was delivered but never acked only
 * after AckWait, while new fetches would already return later messages (an
 * aggregate's later event could be handled first).  So when binding a
 * durable that exists, we restart it at its position + 1 (the kept one, or
 * an explicit durable's ack floor; delete, recreate at that stream
 * sequence, nats_api.c): everything not known to be finished comes again,
 * in stream order, and the inbox skips what was already handled.  The
 * durable's name and position survive; it is never deleted on shutdown.
 *
 * In shared mode (eventbus.consumer_mode = shared, nats_shared.c) a
 * subscription binds and fetches only while this instance holds its lease.
 */
#include "postgres.h"

#include "lib/ilist.h"
#include "miscadmin.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "nats_client.h"
#include "nats_consumer.h"
#include "transport.h"
#include "util.h"

/* Redelivery after this long without an ack (a crashed dispatcher's messages). */
#define ACK_WAIT_NS		((int64) 30 * 1000000000)
#define MAX_ACK_PENDING 20000
#define FETCH_MAX		256		/* messages per pull request */
#define IDLE_BATCH		32		/* ...of a subject whose last request was not used up */
#define REQUEST_EXPIRES_MS 10000	/* an idle request is renewed this often */
#define GRANT_MIN		(256 * 1024)	/* max_bytes of a request, at least... */
#define GRANT_FLOOR		(16 * 1024) /* ...unless many subjects share the budget */
#define RETRY_MS		1000	/* after an unexpected status */
#define POSITION_EVERY_MS 200	/* a moving position is written this often */

List	   *eb_nats_subs = NIL;		/* NatsSub *, bound or to be bound */
static List *wanted = NIL;		/* subjects to consume (char *) */
static uint64 seen_reconnects = 0;
static bool paused = false;
static int	next_turn = 0;		/* fairness: the sub served first */
static List *acks_due = NIL;	/* NatsHeld * finished, ack not sent yet */
static char said_positions_cause[256] = "";	/* the last fallback cause logged */

bool		eb_nats_shared_mode = false;	/* eventbus.consumer_mode = shared */

static void flush_acks(void);
static EbDeliverFn deliver_fn = NULL;	/* the dispatcher's */

/* Does ns fetch (bound, and the lease ours in shared mode)? */
static inline bool
fetching(const NatsSub *ns)
{
	return ns->feed != NULL && ns->state == SUB_HELD;
}

/* Durable name: <consumer_group>_<subject with . as _>_<fnv1a hex>. */
static char *
durable_name(const char *topic)
{
	uint32		h = eb_fnv1a(topic);
	StringInfoData buf;

	initStringInfo(&buf);
	for (const char *p = eb_consumer_group; *p; p++)
		appendStringInfoChar(&buf, (*p == '.' || *p == '*' || *p == '>' || *p == ' ') ? '_' : *p);
	appendStringInfoChar(&buf, '_');
	for (const char *p = topic; *p && buf.len < 200; p++)
		appendStringInfoChar(&buf, *p == '.' ? '_' : *p);
	appendStringInfo(&buf, "_%08x", h);
	return buf.data;
}

/*
 * An AckNone subscription's position: the stream sequence up to which every
 * message delivered to it is finished (see the top of this file).
 */
static uint64
position(NatsSub *ns)
{
	NatsHeld   *oldest;

	if (ns->stuck)
		return ns->kept;
	if (dlist_is_empty(&ns->out))
		return ns->last_seq;
	oldest = dlist_head_element(NatsHeld, node, &ns->out);
	/* Sequence unknown (no metadata): no further than before. */
	return oldest->seq > 0 ? oldest->seq - 1 : ns->kept;
}

/*
 * Write ns's position to the bucket if it moved (and, unless now, its
 * interval is over): a plain publish on the KeyValue subject, as a put
 * without waiting for the answer.
 */
static void
keep_position(NatsSub *ns, bool now)
{
	uint64		pos;
	char		subject[sizeof("$KV." EB_NATS_POSITIONS_BUCKET ".") + EB_NATS_LEASE_KEY];
	char		val[24];
	TimestampTz ts;

	if (!ns->ack_none || ns->released || eb_nats_conn == NULL)
		return;
	pos = position(ns);
	if (pos <= ns->kept)
		return;
	ts = GetCurrentTimestamp();
	if (!now && ts < ns->keep_at)
		return;
	snprintf(subject, sizeof(subject), "$KV." EB_NATS_POSITIONS_BUCKET ".%s", ns->lease_key);
	snprintf(val, sizeof(val), UINT64_FORMAT, pos);
	ns->keep_at = TimestampTzPlusMilliseconds(ts, POSITION_EVERY_MS);
	if (natsConnection_PublishString(eb_nats_conn, subject, val) != NATS_OK)
		return;					/* tried again after the interval */
	ns->kept = pos;
}

/* A subscription of one subject, not bound yet. */
NatsSub *
eb_nats_new_sub(const char *topic, SubState state)
{
	MemoryContext mc = MemoryContextSwitchTo(TopMemoryContext);
	NatsSub    *ns = palloc0(sizeof(NatsSub));

	ns->topic = pstrdup(topic);
	ns->durable = durable_name(topic);
	dlist_init(&ns->out);
	ns->state = state;
	eb_nats_lease_key(ns->durable, ns->lease_key);
	MemoryContextSwitchTo(mc);
	return ns;
}

/*
 * Start binding (creating if needed) the durable pull consumer of ns's
 * subject, as a job on a helper thread (nats_api.c): a NATS server that
 * hangs holds up nothing else here.  takeover: restart an existing durable
 * at its ack floor + 1 (see the top of this file); else use it as it is (a
 * lease released cleanly: nothing of it is in flight anywhere).  Its
 * outcome is taken at a poll (bind_finish); ns->feed stays NULL until then,
 * and after a failure (retried at the next subscription refresh).
 */
void
eb_nats_bind_sub(NatsSub *ns, bool takeover)
{
	EbNatsJob  *j;
	char	   *durable;
	StringInfoData body;

	if (ns->bind_job != NULL)
		return;					/* one at a time */
	initStringInfo(&body);
	appendStringInfoString(&body, "{\"subject\":");
	escape_json(&body, ns->topic);
	appendStringInfoChar(&body, '}');
	/* Out of memory: retried at the next subscription refresh. */
	if ((durable = strdup(ns->durable)) == NULL)
		return;
	if ((j = eb_nats_job_new(EB_NATS_JOB_BIND, ns->topic)) == NULL)
	{
		free(durable);
		return;
	}
	j->durable = durable;
	j->takeover = takeover;
	j->ack_none = !eb_nats_shared_mode;
	strlcpy(j->lease_key, ns->lease_key, sizeof(j->lease_key));
	j->ack_wait_ns = ACK_WAIT_NS;
	j->max_ack_pending = MAX_ACK_PENDING;
	strlcpy(j->names_request, body.data, sizeof(j->names_request));
	pfree(body.data);
	if (eb_nats_job_start(j))
		ns->bind_job = j;
}

/* A bind job is over: fetch from the durable, or say why not. */
static void
bind_finish(NatsSub *ns)
{
	EbNatsJob  *j = ns->bind_job;

	ns->bind_job = NULL;
	if (!j->ok)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("%s", j->error)));
		eb_nats_job_free(j);
		return;
	}
	/* Once per cause: binds of every subject repeat the same one. */
	if (j->no_positions && strcmp(j->positions_cause, said_positions_cause) != 0)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not use the JetStream KeyValue bucket \"%s\": JetStream consumers acknowledge every message",
						EB_NATS_POSITIONS_BUCKET),
				 errdetail("%s", j->error),
				 errhint("Allow the NATS account to create and use that bucket; consumption is slower without it.")));
		strlcpy(said_positions_cause, j->positions_cause, sizeof(said_positions_cause));
	}
	if (j->replay_all)
		ereport(WARNING,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("JetStream consumer %s has no kept position in bucket \"%s\": starting again from the stream's first message",
						ns->durable, EB_NATS_POSITIONS_BUCKET),
				 errdetail("Messages already handled are skipped (the inbox records them).")));
	ns->ack_none = j->ack_none;
	ns->last_seq = ns->kept = j->start > 0 ? j->start - 1 : 0;
	if (j->unacked > 0)
		ereport(LOG,
				(errmsg("resuming JetStream consumer %s at stream sequence " UINT64_FORMAT
						" so that " INT64_FORMAT " unacknowledged messages come again first, in order",
						ns->durable, j->start, j->unacked)));
	if (ns->next_subject == NULL)
		ns->next_subject = MemoryContextStrdup(TopMemoryContext,
											   psprintf("$JS.API.CONSUMER.MSG.NEXT.%s.%s", j->stream, ns->durable));
	eb_nats_job_free(j);
	/* NULL: retried at the next subscription refresh. */
	ns->feed = eb_nats_feed_create(ns->topic);
}

/* Take the outcomes of the bind jobs that are over. */
static void
binds_finish(void)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->bind_job != NULL && eb_nats_job_done(ns->bind_job))
			bind_finish(ns);
	}
}

/* Bind (creating if needed) the durable pull consumer of one subject. */
static NatsSub *
subscribe_topic(const char *topic)
{
	NatsSub    *ns = eb_nats_new_sub(topic, SUB_HELD);

	eb_nats_bind_sub(ns, true);
	return ns;
}

void
eb_nats_free_sub(NatsSub *ns)
{
	pfree(ns->topic);
	pfree(ns->durable);
	if (ns->next_subject)
		pfree(ns->next_subject);
	pfree(ns);
}

/*
 * Release a subscription without deleting its durable: what its inbox feed
 * had queued is dropped, unacked.  Its delivered messages keep the NatsSub
 * until they are finished (unacked).
 */
void
eb_nats_release_sub(NatsSub *ns)
{
	keep_position(ns, true);
	eb_nats_job_free(ns->bind_job);		/* a bind in flight is left to its helper */
	ns->bind_job = NULL;
	eb_nats_job_free(ns->lease_job);	/* as is a lease request */
	ns->lease_job = NULL;
	if (ns->feed)
	{
		eb_nats_feed_destroy(ns->feed);
		ns->feed = NULL;
	}
	ns->released = true;
	if (ns->held == 0)
		eb_nats_free_sub(ns);
}

/* Consume exactly these subjects (and retry binds that failed). */
void
eb_nats_consumer_set_topics(List *want)
{
	List	   *keep = NIL;
	ListCell   *lc;
	MemoryContext old;

	if (eb_js == NULL)
		return;
	/* eb_nats_subs and wanted outlive the dispatcher's loop memory. */
	old = MemoryContextSwitchTo(TopMemoryContext);
	if (want != wanted)
	{
		list_free_deep(wanted);
		wanted = NIL;
		foreach(lc, want)
			wanted = lappend(wanted, pstrdup(lfirst(lc)));
	}
	if (eb_nats_shared_mode)
	{
		eb_nats_shared_set_topics(want);
		MemoryContextSwitchTo(old);
		return;
	}
	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (eb_string_member(want, ns->topic) && (ns->feed != NULL || ns->bind_job != NULL))
			keep = lappend(keep, ns);
		else
			eb_nats_release_sub(ns);
	}
	list_free(eb_nats_subs);
	eb_nats_subs = NIL;
	foreach(lc, keep)
		eb_nats_subs = lappend(eb_nats_subs, lfirst(lc));
	list_free(keep);

	foreach(lc, want)
	{
		const char *topic = lfirst(lc);
		bool		have = false;
		ListCell   *lc2;

		/* Shutting down, or no server: each bind would only wait. */
		if (ProcDiePending || !eb_nats_connected())
			break;
		foreach(lc2, eb_nats_subs)
			if (strcmp(((NatsSub *) lfirst(lc2))->topic, topic) == 0)
				have = true;
		if (!have)
			eb_nats_subs = lappend(eb_nats_subs, subscribe_topic(topic));
	}
	MemoryContextSwitchTo(old);
}

/* Forget all subscriptions (the connection is being closed). */
static void
forget_subscriptions(void)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
		eb_nats_release_sub(lfirst(lc));
	list_free(eb_nats_subs);
	eb_nats_subs = NIL;
	seen_reconnects = 0;
}

/*
 * Hand one arrived message to the dispatcher, which copies what it keeps:
 * only the ack subject stays with us until the message is finished.
 */
static void
deliver(NatsSub *ns, natsMsg *msg)
{
	EbInbound	in;
	jsMsgMetaData *meta = NULL;
	const char **keys = NULL;
	int			nkeys = 0;
	const char *reply = natsMsg_GetReply(msg);
	size_t		rlen = reply ? strlen(reply) : 0;
	NatsHeld   *held = MemoryContextAlloc(TopMemoryContext, offsetof(NatsHeld, reply) + rlen + 1);

	held->ns = ns;
	held->seq = 0;
	memcpy(held->reply, reply ? reply : "", rlen + 1);
	dlist_push_tail(&ns->out, &held->node);
	ns->held++;

	memset(&in, 0, sizeof(in));
	in.transport = EB_TRANSPORT_NATS;
	in.topic = ns->topic;
	in.partition = -1;
	in.offset = -1;
	in.data = natsMsg_GetData(msg);
	in.len = natsMsg_GetDataLength(msg);
	in.token = held;
	if (natsMsg_GetMetaData(&meta, msg) == NATS_OK)
	{
		in.stream_seq = meta->Sequence.Stream;
		held->seq = in.stream_seq;
		ns->last_seq = Max(ns->last_seq, held->seq);
		ns->pending = (int64) meta->NumPending;
		jsMsgMetaData_Destroy(meta);
	}
	if (natsMsgHeader_Keys(msg, &keys, &nkeys) == NATS_OK && nkeys > 0)
	{
		in.header_names = palloc(sizeof(char *) * nkeys);
		in.header_values = palloc(sizeof(char *) * nkeys);
		for (int i = 0; i < nkeys; i++)
		{
			const char *v = NULL;

			if (natsMsgHeader_Get(msg, keys[i], &v) != NATS_OK || v == NULL)
				continue;
			in.header_names[in.nheaders] = pstrdup(keys[i]);
			in.header_values[in.nheaders] = pstrdup(v);
			in.nheaders++;
		}
		free((void *) keys);
	}
	deliver_fn(&in);
}

/* Bind the consumer of ns's subject again (it failed in the client or the server). */
static void
rebind(NatsSub *ns, const char *why)
{
	ereport(LOG,
			(errcode(ERRCODE_CONNECTION_FAILURE),
			 errmsg("rebinding JetStream consumer %s: %s", ns->durable, why)));
	eb_nats_subs = list_delete_ptr(eb_nats_subs, ns);
	eb_nats_release_sub(ns);
	/* Binds what is wanted and missing: this one, again at its ack floor + 1. */
	eb_nats_consumer_set_topics(wanted);
}

/*
 * Hand queued messages to the dispatcher: up to max, the first one of the
 * round whatever its size and the others while fewer than max_bytes went.
 * Subjects take turns.  Sets *bytes to what was handed over.
 */
static int
deliver_queued(int max, int64 max_bytes, int64 *bytes)
{
	int			n = 0;
	int			nsubs = list_length(eb_nats_subs);

	*bytes = 0;
	for (int k = 0; k < nsubs && n < max && *bytes < max_bytes; k++)
	{
		NatsSub    *ns = list_nth(eb_nats_subs, (next_turn + k) % nsubs);
		natsMsg    *msgs[TAKE_CHUNK];
		int64		sizes[TAKE_CHUNK];
		int			got;

		if (!fetching(ns))
			continue;
		do
		{
			got = eb_nats_feed_take(ns->feed, msgs, sizes, Min(max - n, TAKE_CHUNK), max_bytes - *bytes);
			for (int i = 0; i < got; i++)
			{
				ns->largest = Max(ns->largest, sizes[i]);
				ns->got++;
				ns->need = 0;
				ns->last_status = 0;
				*bytes += sizes[i];
				n++;
				deliver(ns, msgs[i]);
				natsMsg_Destroy(msgs[i]);
			}
		} while (got == TAKE_CHUNK && n < max && *bytes < max_bytes);
	}
	return n;
}

/*
 * Read every feed's state (once per poll: reading forgets ended requests),
 * learn from how requests ended, and return what is held: queued messages
 * and what open requests may still bring.  A feed that lost a message in
 * the client, or whose consumer is gone from the server, is returned in
 * *rebind_me.
 */
static void
read_states(EbNatsFeedState *st, int nsubs, int64 *held_msgs, int64 *held_bytes,
			bool *nothing_held, NatsSub **rebind_me)
{
	TimestampTz now = GetCurrentTimestamp();

	*held_msgs = 0;
	*held_bytes = 0;
	*nothing_held = true;
	*rebind_me = NULL;
	for (int i = 0; i < nsubs; i++)
	{
		NatsSub    *ns = list_nth(eb_nats_subs, i);

		if (ns->feed == NULL)
			continue;
		eb_nats_feed_state(ns->feed, &st[i]);
		ns->open_requests = st[i].open;
		*held_msgs += st[i].queued + st[i].credit_msgs;
		*held_bytes += st[i].queued_bytes + st[i].credit_bytes;
		if (st[i].queued > 0 || st[i].open > 0)
			*nothing_held = false;
		if (ns->state != SUB_HELD)
			continue;			/* a release ends it whatever happens */
		if ((st[i].broken || st[i].gone) && *rebind_me == NULL)
			*rebind_me = ns;
		if (st[i].too_big)
			ns->need = Max(ns->need, Max(ns->last_grant, GRANT_FLOOR) * 2);
		if (st[i].error_status != 0)
		{
			/* A server stopping or a new leader ends requests: say so quietly. */
			bool		routine = strcmp(st[i].error_desc, "Server Shutdown") == 0 ||
				strcmp(st[i].error_desc, "Leadership Change") == 0;

			if (st[i].error_status != ns->last_status)
				ereport(routine ? DEBUG1 : LOG,
						(errcode(ERRCODE_CONNECTION_FAILURE),
						 errmsg("JetStream ended a pull request of consumer %s with status %d \"%s\", asking again in %d ms",
								ns->durable, st[i].error_status, st[i].error_desc, RETRY_MS)));
			ns->last_status = st[i].error_status;
			ns->retry_at = TimestampTzPlusMilliseconds(now, RETRY_MS);
		}
	}
}

/*
 * Keep a pull request open on every bound subject, with the credit still
 * free (avail_msgs, avail_bytes: the dispatcher's budget minus what is
 * held).  What an open request may still bring is held until it is used up
 * or expires, so an idle subject's request asks for little: at most
 * IDLE_BATCH messages and its share of half the budget (max messages and
 * eventbus.dispatcher_memory over the subjects).  Idle subjects thus never
 * hold more than about half, and a subject whose last request was used up
 * (busy) asks for up to FETCH_MAX of what is free.  Before, every request
 * held a full share, and 40 idle subjects held it all: a subject that then
 * had a backlog got a few messages a request, one request per WAL flush.
 * Subjects take turns; one whose request would not fit holds the others
 * back until it does, so a large message is not starved by small ones.  A
 * message larger than eventbus.dispatcher_memory itself is asked for
 * alone, when nothing else is held.
 */
static void
grant_credit(EbNatsFeedState *st, int nsubs, int max, int64 avail_msgs, int64 avail_bytes,
			 int64 max_bytes, bool nothing_held)
{
	int64		dispatcher_memory = (int64) eb_dispatcher_memory_kb * 1024;
	TimestampTz now = GetCurrentTimestamp();
	int			blocked = -1;
	int			nbound = 0;
	int64		idle_msgs;
	int64		idle_bytes;
	int64		busy_bytes;

	for (int i = 0; i < nsubs; i++)
		if (fetching(list_nth(eb_nats_subs, i)))
			nbound++;
	idle_msgs = Max(1, Min(IDLE_BATCH, max / (2 * Max(nbound, 1))));
	idle_bytes = Max(GRANT_FLOOR, Min(GRANT_MIN, dispatcher_memory / (2 * Max(nbound, 1))));
	busy_bytes = Max(GRANT_FLOOR, Min(GRANT_MIN, dispatcher_memory / 2));

	for (int k = 0; k < nsubs && avail_msgs > 0; k++)
	{
		int			i = (next_turn + k) % nsubs;
		NatsSub    *ns = list_nth(eb_nats_subs, i);
		bool		busy = ns->asked > 0 && ns->got + st[i].queued >= ns->asked;
		int64		want = Max(busy ? busy_bytes : idle_bytes, Max(ns->need, 2 * ns->largest));
		int64		least = Max(GRANT_FLOOR, Max(ns->need, ns->largest));
		int			batch = (int) Min(busy ? FETCH_MAX : idle_msgs, avail_msgs);
		int64		grant;

		if (!fetching(ns) || st[i].open > 0 || now < ns->retry_at)
			continue;
		if (want <= avail_bytes)
			grant = want;
		else if (least <= avail_bytes)
			grant = avail_bytes;	/* what is free: enough for it to progress */
		else if (least > dispatcher_memory && nothing_held && max_bytes >= dispatcher_memory)
		{
			grant = 0;			/* one message of any size, alone */
			batch = 1;
		}
		else
		{
			blocked = i;		/* wait for credit to come back, first in line */
			break;
		}
		if (!eb_nats_feed_request(ns->feed, ns->next_subject, batch, grant,
								  eb_nats_shared_mode ? SHARED_EXPIRES_MS : REQUEST_EXPIRES_MS))
			continue;			/* not connected: retried at the next poll */
		ns->last_grant = grant;
		ns->asked = batch;
		ns->got = 0;
		avail_msgs -= batch;
		avail_bytes -= grant;
		nothing_held = false;
	}
	next_turn = blocked >= 0 ? blocked : (next_turn + 1) % nsubs;
}

/*
 * Hand what arrived to the dispatcher (up to max messages, about max_bytes)
 * and renew the pull requests with the credit left.  Never waits (but for
 * a rebind).
 */
int
eb_nats_consumer_poll(int max, int64 max_bytes)
{
	int			n;
	int			nsubs;
	int64		bytes;
	int64		held_msgs;
	int64		held_bytes;
	bool		nothing_held;
	NatsSub    *rebind_me;
	EbNatsFeedState *st;
	ListCell   *lc;

	flush_acks();
	foreach(lc, eb_nats_subs)
		keep_position(lfirst(lc), false);
	if (eb_nats_shared_mode)
		eb_nats_shared_tick();
	if (eb_js == NULL || !eb_nats_connected())
		return 0;
	/* Reconnected since the last poll: rebind every durable. */
	if (eb_nats_reconnects() != seen_reconnects)
	{
		List	   *topics = wanted;

		ereport(LOG, (errmsg("NATS reconnected, rebinding the JetStream consumers")));
		seen_reconnects = eb_nats_reconnects();
		foreach(lc, eb_nats_subs)
			eb_nats_release_sub(lfirst(lc));
		list_free(eb_nats_subs);
		eb_nats_subs = NIL;
		eb_nats_consumer_set_topics(topics);
	}

	binds_finish();
	n = deliver_queued(max, max_bytes, &bytes);

	nsubs = list_length(eb_nats_subs);
	if (nsubs == 0)
		return n;
	st = palloc0(sizeof(EbNatsFeedState) * nsubs);
	read_states(st, nsubs, &held_msgs, &held_bytes, &nothing_held, &rebind_me);
	if (rebind_me != NULL)
		rebind(rebind_me, eb_nats_feed_broken(rebind_me->feed) ?
			   "a message could not be queued (out of memory)" :
			   "the consumer no longer exists in the server");
	else if (!paused)
		grant_credit(st, nsubs, max, max - n - held_msgs, max_bytes - bytes - held_bytes,
					 max_bytes - bytes, nothing_held);
	pfree(st);
	return n;
}

/*
 * Send the acks of finished messages — only for a live subscription (see
 * the top of this file); else JetStream redelivers them.  Called from poll:
 * the dispatcher hands out the work a finished message freed before it
 * polls, so publishing acks (and waking cnats' flusher) never delays that.
 */
static void
flush_acks(void)
{
	ListCell   *lc;

	foreach(lc, acks_due)
	{
		NatsHeld   *held = lfirst(lc);
		NatsSub    *ns = held->ns;

		if (!ns->released && !ns->given_back && !ns->ack_none && eb_nats_conn != NULL &&
			held->reply[0] != '\0' && natsConnection_PublishString(eb_nats_conn, held->reply, "+ACK") != NATS_OK)
			ereport(DEBUG1, (errmsg_internal("JetStream ack failed; it will redeliver (the inbox skips it)")));
		dlist_delete(&held->node);
		pfree(held);
		if (--ns->held == 0 && ns->released)
			eb_nats_free_sub(ns);
	}
	list_free(acks_due);
	acks_due = NIL;
}

/* Handlers committed: the message's ack goes out at the next poll. */
void
eb_nats_consumer_done(void *token)
{
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	acks_due = lappend(acks_due, token);
	MemoryContextSwitchTo(old);
}

/* Messages of the subject still in the stream for us (last known), -1 if unknown. */
int64
eb_nats_consumer_lag(const char *topic)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (strcmp(ns->topic, topic) == 0)
			return ns->pending;
	}
	return -1;
}

/* Connect the dispatcher's consumer. */
bool
eb_nats_consumer_start(EbDeliverFn deliver)
{
	deliver_fn = deliver;
	paused = false;
	eb_nats_shared_mode = eb_consumer_mode == EB_CONSUMER_SHARED;
	return eb_nats_client_start("eventbus consumer", true);
}

/* Release the subscriptions (durables kept) and close the connection. */
void
eb_nats_consumer_stop(void)
{
	flush_acks();
	if (eb_nats_shared_mode)
		eb_nats_shared_stop();
	forget_subscriptions();
	eb_nats_client_stop();
	deliver_fn = NULL;
}

/* Track the connection state; poll rebinds after a reconnect. */
bool
eb_nats_consumer_check(void)
{
	eb_nats_poll_state();
	return true;
}

/*
 * Backpressure: no new pull request while paused; the open ones bring at
 * most the credit they were granted, and poll still hands over what came.
 */
void
eb_nats_consumer_pause(bool pause)
{
	paused = pause;
}

/*
 * Arrivals and request ends wake the dispatcher: no polling when idle, but
 * for a position still to write (when its interval is over).
 */
int
eb_nats_consumer_idle_poll_ms(void)
{
	ListCell   *lc;
	int			ms = 0;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->ack_none && !ns->released && eb_nats_conn != NULL && position(ns) > ns->kept)
		{
			int			due = (int) Max(1, eb_ms_until(ns->keep_at));

			ms = ms == 0 ? due : Min(ms, due);
		}
	}
	return ms;
}

/*
 * nats_consumer.c — the dispatcher's JetStream consumers: one durable pull
 * consumer per subscribed subject.  The main thread keeps a pull request
 * open on each (batch, max_bytes, expiry) for as much as the dispatcher can
 * take; the server answers as messages arrive, into the inbox
 * (nats_inbox.c), which wakes the dispatcher.  Nothing polls while idle: a
 * request only ends when used up or expired, and is then renewed.  A
 * message is acked only after its handlers' transaction committed.
 *
 * Memory: the bytes queued in the inbox plus what the open requests may
 * still bring stay within the budget the dispatcher passes to poll (its
 * eventbus.dispatcher_memory minus what it holds).  A message larger than
 * a request's max_bytes ends the request with nothing (409); the consumer
 * then asks for more once that much is free, and a message larger than
 * eventbus.dispatcher_memory itself is fetched alone, when nothing else is
 * held.
 *
 * Order across restarts: JetStream redelivers a message that was delivered
 * but never acked only after AckWait, while new fetches would already return
 * later messages — an aggregate's later event could be handled first.  So
 * when binding a durable that exists, we restart it at its ack floor + 1
 * (delete, recreate at that stream sequence): everything not known to be
 * finished comes again, in stream order, and the inbox skips what was
 * already handled.  The durable's name and position survive; it is never
 * deleted on shutdown.
 */
#include "postgres.h"

#include "lib/ilist.h"
#include "miscadmin.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "guc.h"
#include "nats_client.h"
#include "transport.h"
#include "util.h"

/* Redelivery after this long without an ack (a crashed dispatcher's messages). */
#define ACK_WAIT_NS		((int64) 30 * 1000000000)
#define MAX_ACK_PENDING 20000
#define FETCH_MAX		256		/* messages per pull request */
#define REQUEST_EXPIRES_MS 10000	/* an idle request is renewed this often */
#define GRANT_MIN		(256 * 1024)	/* max_bytes of a request, at least... */
#define GRANT_FLOOR		(16 * 1024) /* ...unless many subjects share the budget */
#define RETRY_MS		1000	/* after an unexpected status */
#define TAKE_CHUNK		64

/*
 * Shared mode (eventbus.consumer_mode = shared, see nats_lease.c).  Pull
 * requests expire sooner, so that a release waits at most that long for
 * the server to end them (nothing can be delivered to us after that).
 */
#define SHARED_EXPIRES_MS	1500
#define LEASE_TTL_MS		10000	/* a lease unchanged this long is stale */
#define LEASE_REFRESH_MS	(LEASE_TTL_MS / 3)
#define LEASE_FENCE_MS		(LEASE_TTL_MS / 2)	/* stop handing out after this */
#define LEASE_RETRY_MS		1000	/* after no answer */
#define LEASE_SPREAD_MS		300 /* per lease held, before taking a free one */
#define RELEASE_WAIT_MS		5000	/* for running handlers, at a release */
#define STOP_WAIT_MS		(SHARED_EXPIRES_MS + 500)	/* for requests, at exit */

typedef enum SubState
{
	SUB_HELD,					/* ours: bound and fetching (single: always) */
	SUB_STANDBY,				/* another instance's, or not taken yet */
	SUB_RELEASING				/* giving it back: waiting for what is out */
} SubState;

typedef struct NatsSub
{
	char	   *topic;
	char	   *durable;
	char	   *next_subject;	/* where its pull requests go */
	EbNatsFeed *feed;			/* NULL: not bound */
	int64		pending;		/* messages waiting in the stream (last known) */
	int64		held;			/* delivered messages not yet finished */
	int64		largest;		/* largest message seen (server's count) */
	int64		last_grant;		/* max_bytes of its last request */
	int64		need;			/* a request got nothing: ask for this much */
	int			last_status;	/* last unexpected status logged */
	TimestampTz retry_at;		/* no request before (after a status) */
	bool		released;		/* no longer in subs: never ack for it */
	dlist_head	out;			/* NatsHeld delivered, not finished */

	/* shared mode */
	SubState	state;
	char		lease_key[EB_NATS_LEASE_KEY];
	uint64		lease_rev;		/* HELD: our last write */
	bool		takeover;		/* HELD, not bound yet: bind at the ack floor */
	TimestampTz refresh_at;		/* HELD: next refresh */
	TimestampTz refreshed;		/* HELD: when the last good refresh was sent */
	TimestampTz check_at;		/* STANDBY: next look at the lease */
	TimestampTz free_since;		/* STANDBY: first seen free */
	uint64		seen_rev;		/* STANDBY: holder's revision, first seen at */
	TimestampTz seen_at;
	int			open_requests;	/* pull requests open at the last poll */
	TimestampTz release_by;		/* RELEASING: deadline */
	List	   *naks;			/* RELEASING: NatsNak * to give back */
} NatsSub;

/* The dispatcher's handle on one delivered message: what acks it. */
typedef struct NatsHeld
{
	NatsSub    *ns;
	dlist_node	node;			/* in ns->out */
	uint64		seq;			/* stream sequence, 0 if unknown */
	char		reply[FLEXIBLE_ARRAY_MEMBER];	/* the ack subject */
} NatsHeld;

/* A message to give back (NAK) at a release, in stream order. */
typedef struct NatsNak
{
	uint64		seq;
	char	   *reply;
} NatsNak;

static List *subs = NIL;		/* NatsSub *, bound or to be bound */
static List *wanted = NIL;		/* subjects to consume (char *) */
static uint64 seen_reconnects = 0;
static bool paused = false;
static int	next_turn = 0;		/* fairness: the sub served first */
static List *acks_due = NIL;	/* NatsHeld * finished, ack not sent yet */

static bool shared_mode = false;	/* eventbus.consumer_mode = shared */

static void flush_acks(void);
static void shared_set_topics(List *want);
static void shared_tick(void);
static void shared_stop(void);
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

/* Name of the stream that captures subject (palloc'd), or NULL. */
static char *
stream_for_subject(const char *subject)
{
	StringInfoData body;
	natsMsg    *reply = NULL;
	natsStatus	s;
	const char *data;
	const char *p;
	const char *end;
	sigset_t	old;
	char	   *name = NULL;

	initStringInfo(&body);
	appendStringInfoString(&body, "{\"subject\":");
	escape_json(&body, subject);
	appendStringInfoChar(&body, '}');
	eb_nats_block_signals(&old);
	s = natsConnection_Request(&reply, eb_nats_conn, "$JS.API.STREAM.NAMES", body.data, body.len, 5000);
	eb_nats_restore_signals(&old);
	if (s != NATS_OK)
		return NULL;
	data = natsMsg_GetData(reply);
	/* {"type":...,"streams":["NAME"],...}: stream names contain no quotes. */
	if (data && (p = strstr(data, "\"streams\":[\"")) != NULL)
	{
		p += strlen("\"streams\":[\"");
		if ((end = strchr(p, '"')) != NULL)
			name = pnstrdup(p, end - p);
	}
	natsMsg_Destroy(reply);
	return name;
}

/*
 * If the durable exists, delete it and return the stream sequence to
 * restart from (its ack floor + 1); 0 if it did not exist.
 */
static uint64
take_over_durable(const char *stream, const char *durable)
{
	jsConsumerInfo *ci = NULL;
	jsErrCode	jerr = 0;
	uint64		start = 0;
	int64		unacked = 0;
	sigset_t	old;

	eb_nats_block_signals(&old);
	if (js_GetConsumerInfo(&ci, eb_js, stream, durable, NULL, &jerr) == NATS_OK)
	{
		start = ci->AckFloor.Stream + 1;
		unacked = ci->NumAckPending;
		jsConsumerInfo_Destroy(ci);
		js_DeleteConsumer(eb_js, stream, durable, NULL, &jerr);
	}
	eb_nats_restore_signals(&old);
	if (unacked > 0)
		ereport(LOG,
				(errmsg("resuming JetStream consumer %s at stream sequence " UINT64_FORMAT
						" so that " INT64_FORMAT " unacknowledged messages come again first, in order",
						durable, start, unacked)));
	return start;
}

/* A subscription of one subject, not bound yet. */
static NatsSub *
new_sub(const char *topic, SubState state)
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
 * Bind (creating if needed) the durable pull consumer of ns's subject.
 * takeover: restart an existing durable at its ack floor + 1 (see the top
 * of this file); else use it as it is (a lease released cleanly: nothing
 * of it is in flight anywhere).  ns->feed stays NULL on failure.
 */
static void
bind_sub(NatsSub *ns, bool takeover)
{
	jsConsumerConfig cfg;
	jsConsumerInfo *ci = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;
	char	   *err = NULL;
	char	   *stream;
	uint64		start = 0;
	bool		exists = false;
	sigset_t	old;

	if (!eb_nats_ensure_stream(ns->topic, &err) || (stream = stream_for_subject(ns->topic)) == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("no JetStream stream for %s%s%s", ns->topic, err ? ": " : "", err ? err : "")));
		return;					/* retried at the next subscription refresh */
	}
	if (takeover)
		start = take_over_durable(stream, ns->durable);
	else
	{
		eb_nats_block_signals(&old);
		if (js_GetConsumerInfo(&ci, eb_js, stream, ns->durable, NULL, &jerr) == NATS_OK)
		{
			exists = true;
			jsConsumerInfo_Destroy(ci);
			ci = NULL;
		}
		eb_nats_restore_signals(&old);
	}

	s = NATS_OK;
	if (!exists)
	{
		/* A pull consumer: no deliver subject; the inbox receives its answers. */
		jsConsumerConfig_Init(&cfg);
		cfg.Durable = ns->durable;
		cfg.AckPolicy = js_AckExplicit;
		/* New durable: the start policy (everything retained); else resume. */
		cfg.DeliverPolicy = start > 0 ? js_DeliverByStartSequence : js_DeliverAll;
		cfg.OptStartSeq = start;
		cfg.AckWait = ACK_WAIT_NS;
		cfg.MaxAckPending = MAX_ACK_PENDING;
		cfg.MaxDeliver = -1;
		cfg.FilterSubject = ns->topic;

		eb_nats_block_signals(&old);
		s = js_AddConsumer(&ci, eb_js, stream, &cfg, NULL, &jerr);
		if (ci)
			jsConsumerInfo_Destroy(ci);
		eb_nats_restore_signals(&old);
	}
	if (s != NATS_OK)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not bind JetStream consumer %s for %s: %s",
						ns->durable, ns->topic, natsStatus_GetText(s)),
				 jerr ? errdetail("JetStream error %d", (int) jerr) : 0));
		pfree(stream);
		return;
	}
	if (ns->next_subject == NULL)
		ns->next_subject = MemoryContextStrdup(TopMemoryContext,
											   psprintf("$JS.API.CONSUMER.MSG.NEXT.%s.%s", stream, ns->durable));
	pfree(stream);
	/* NULL: retried at the next subscription refresh. */
	ns->feed = eb_nats_feed_create(ns->topic);
}

/* Bind (creating if needed) the durable pull consumer of one subject. */
static NatsSub *
subscribe_topic(const char *topic)
{
	NatsSub    *ns = new_sub(topic, SUB_HELD);

	bind_sub(ns, true);
	return ns;
}

static void
free_sub(NatsSub *ns)
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
static void
release(NatsSub *ns)
{
	if (ns->feed)
	{
		eb_nats_feed_destroy(ns->feed);
		ns->feed = NULL;
	}
	ns->released = true;
	if (ns->held == 0)
		free_sub(ns);
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
	/* subs and wanted outlive the dispatcher's loop memory. */
	old = MemoryContextSwitchTo(TopMemoryContext);
	if (want != wanted)
	{
		list_free_deep(wanted);
		wanted = NIL;
		foreach(lc, want)
			wanted = lappend(wanted, pstrdup(lfirst(lc)));
	}
	if (shared_mode)
	{
		shared_set_topics(want);
		MemoryContextSwitchTo(old);
		return;
	}
	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (eb_string_member(want, ns->topic) && ns->feed != NULL)
			keep = lappend(keep, ns);
		else
			release(ns);
	}
	list_free(subs);
	subs = NIL;
	foreach(lc, keep)
		subs = lappend(subs, lfirst(lc));
	list_free(keep);

	foreach(lc, want)
	{
		const char *topic = lfirst(lc);
		bool		have = false;
		ListCell   *lc2;

		/* Shutting down, or no server: each bind would only wait. */
		if (ProcDiePending || !eb_nats_connected())
			break;
		foreach(lc2, subs)
			if (strcmp(((NatsSub *) lfirst(lc2))->topic, topic) == 0)
				have = true;
		if (!have)
			subs = lappend(subs, subscribe_topic(topic));
	}
	MemoryContextSwitchTo(old);
}

/* Forget all subscriptions (the connection is being closed). */
static void
forget_subscriptions(void)
{
	ListCell   *lc;

	foreach(lc, subs)
		release(lfirst(lc));
	list_free(subs);
	subs = NIL;
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
	subs = list_delete_ptr(subs, ns);
	release(ns);
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
	int			nsubs = list_length(subs);

	*bytes = 0;
	for (int k = 0; k < nsubs && n < max && *bytes < max_bytes; k++)
	{
		NatsSub    *ns = list_nth(subs, (next_turn + k) % nsubs);
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
		NatsSub    *ns = list_nth(subs, i);

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
 * held).  An idle subject's request holds only its share of the budget
 * (max messages and eventbus.dispatcher_memory over the subjects), so that
 * every subject has one open.  Subjects take turns; one whose request would
 * not fit holds the others back until it does, so a large message is not
 * starved by small ones.  A message larger than eventbus.dispatcher_memory
 * itself is asked for alone, when nothing else is held.
 */
static void
grant_credit(EbNatsFeedState *st, int nsubs, int max, int64 avail_msgs, int64 avail_bytes,
			 int64 max_bytes, bool nothing_held)
{
	int64		dispatcher_memory = (int64) eb_dispatcher_memory_kb * 1024;
	TimestampTz now = GetCurrentTimestamp();
	int			blocked = -1;
	int			nbound = 0;
	int64		share_msgs;
	int64		share_bytes;

	for (int i = 0; i < nsubs; i++)
		if (fetching(list_nth(subs, i)))
			nbound++;
	share_msgs = Max(1, Min(FETCH_MAX, max / Max(nbound, 1)));
	share_bytes = Max(GRANT_FLOOR, Min(GRANT_MIN, dispatcher_memory / Max(nbound, 1)));

	for (int k = 0; k < nsubs && avail_msgs > 0; k++)
	{
		int			i = (next_turn + k) % nsubs;
		NatsSub    *ns = list_nth(subs, i);
		int64		want = Max(share_bytes, Max(ns->need, 2 * ns->largest));
		int64		least = Max(GRANT_FLOOR, Max(ns->need, ns->largest));
		int			batch = (int) Min(share_msgs, avail_msgs);
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
								  shared_mode ? SHARED_EXPIRES_MS : REQUEST_EXPIRES_MS))
			continue;			/* not connected: retried at the next poll */
		ns->last_grant = grant;
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
	if (shared_mode)
		shared_tick();
	if (eb_js == NULL || !eb_nats_connected())
		return 0;
	/* Reconnected since the last poll: rebind every durable. */
	if (eb_nats_reconnects() != seen_reconnects)
	{
		List	   *topics = wanted;

		ereport(LOG, (errmsg("NATS reconnected, rebinding the JetStream consumers")));
		seen_reconnects = eb_nats_reconnects();
		foreach(lc, subs)
			release(lfirst(lc));
		list_free(subs);
		subs = NIL;
		eb_nats_consumer_set_topics(topics);
	}

	n = deliver_queued(max, max_bytes, &bytes);

	nsubs = list_length(subs);
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

		if (!ns->released && eb_nats_conn != NULL && held->reply[0] != '\0' &&
			natsConnection_PublishString(eb_nats_conn, held->reply, "+ACK") != NATS_OK)
			ereport(DEBUG1, (errmsg_internal("JetStream ack failed; it will redeliver (the inbox skips it)")));
		dlist_delete(&held->node);
		pfree(held);
		if (--ns->held == 0 && ns->released)
			free_sub(ns);
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

/* --- shared mode: one instance at a time consumes a durable --- */

/*
 * May the message still be handled here?  Not once its subscription was
 * given up: released, being released, or its lease lost (a later lease of
 * the same subject is a new NatsSub, so this one's messages stay given up).
 */
bool
eb_nats_consumer_live(void *token)
{
	NatsHeld   *held = token;

	if (!shared_mode)
		return true;			/* single: every message is handled here */
	return !held->ns->released && held->ns->state == SUB_HELD;
}

/*
 * A message that was not handled here.  During a clean release it is given
 * back (NAK) with the others, in stream order, so the next holder gets it
 * first; after a lost lease it is left to the new holder.
 */
void
eb_nats_consumer_abandon(void *token)
{
	NatsHeld   *held = token;
	NatsSub    *ns = held->ns;

	dlist_delete(&held->node);
	if (!ns->released && ns->state == SUB_RELEASING && held->reply[0] != '\0')
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		NatsNak    *nak = palloc(sizeof(NatsNak));

		nak->seq = held->seq;
		nak->reply = pstrdup(held->reply);
		ns->naks = lappend(ns->naks, nak);
		MemoryContextSwitchTo(old);
	}
	pfree(held);
	if (--ns->held == 0 && ns->released)
		free_sub(ns);
}

static int
nak_cmp(const ListCell *a, const ListCell *b)
{
	uint64		x = ((NatsNak *) lfirst(a))->seq;
	uint64		y = ((NatsNak *) lfirst(b))->seq;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* Leases this instance holds. */
static int
leases_held(void)
{
	int			n = 0;
	ListCell   *lc;

	foreach(lc, subs)
		if (((NatsSub *) lfirst(lc))->state == SUB_HELD)
			n++;
	return n;
}

/* The subscription in subs (other than a releasing one) with that lease key. */
static NatsSub *
sub_of_key(const char *key)
{
	ListCell   *lc;

	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state != SUB_RELEASING && strcmp(ns->lease_key, key) == 0)
			return ns;
	}
	return NULL;
}

/* Replace ns in subs by a stand-by of the same subject; release ns. */
static void
give_up(NatsSub *ns)
{
	ListCell   *lc;

	foreach(lc, subs)
	{
		if (lfirst(lc) == ns)
		{
			lfirst(lc) = new_sub(ns->topic, SUB_STANDBY);
			break;
		}
	}
	release(ns);
}

/*
 * Give a lease back: its queued and abandoned messages (and, at a
 * deadline, those still out) are NAKed in stream order, so the next holder
 * gets them first and in order; then the lease is marked released, and
 * the next holder binds the durable as it is (no take-over).
 */
static void
finish_release(NatsSub *ns)
{
	natsMsg    *msgs[TAKE_CHUNK];
	int64		sizes[TAKE_CHUNK];
	int			got;
	int			still_out = 0;
	dlist_mutable_iter it;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (ns->feed)
	{
		while ((got = eb_nats_feed_take(ns->feed, msgs, sizes, TAKE_CHUNK, PG_INT64_MAX)) > 0)
		{
			for (int i = 0; i < got; i++)
			{
				jsMsgMetaData *meta = NULL;
				const char *reply = natsMsg_GetReply(msgs[i]);

				if (reply != NULL && natsMsg_GetMetaData(&meta, msgs[i]) == NATS_OK)
				{
					NatsNak    *nak = palloc(sizeof(NatsNak));

					nak->seq = meta->Sequence.Stream;
					nak->reply = pstrdup(reply);
					ns->naks = lappend(ns->naks, nak);
					jsMsgMetaData_Destroy(meta);
				}
				natsMsg_Destroy(msgs[i]);
			}
		}
	}
	/* Out past the deadline: their handlers' outcome is not known here. */
	dlist_foreach_modify(it, &ns->out)
	{
		NatsHeld   *held = dlist_container(NatsHeld, node, it.cur);
		NatsNak    *nak = palloc(sizeof(NatsNak));

		nak->seq = held->seq;
		nak->reply = pstrdup(held->reply);
		ns->naks = lappend(ns->naks, nak);
		still_out++;
	}
	MemoryContextSwitchTo(old);

	list_sort(ns->naks, nak_cmp);
	foreach(lc, ns->naks)
	{
		NatsNak    *nak = lfirst(lc);

		if (eb_nats_conn != NULL)
			(void) natsConnection_PublishString(eb_nats_conn, nak->reply, "-NAK");
		pfree(nak->reply);
		pfree(nak);
	}
	if (eb_nats_conn != NULL)
	{
		sigset_t	sigs;

		eb_nats_block_signals(&sigs);
		(void) natsConnection_FlushTimeout(eb_nats_conn, 1000);
		eb_nats_restore_signals(&sigs);
	}
	if (still_out > 0)
		ereport(LOG,
				(errmsg("JetStream consumer %s: %d messages delivered here were not finished at the release; given back",
						ns->durable, still_out),
				 errdetail("A handler of one of them that commits here after all runs in this database and in the next holder's.")));
	if (eb_nats_lease_release(ns->lease_key, ns->lease_rev))
		ereport(LOG,
				(errmsg("released the JetStream lease of consumer %s (subject %s), %d messages given back",
						ns->durable, ns->topic, list_length(ns->naks))));
	else
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not release the JetStream lease of consumer %s; another instance takes it when it goes stale",
						ns->durable)));
	list_free(ns->naks);
	ns->naks = NIL;
	subs = list_delete_ptr(subs, ns);
	release(ns);
}

/* Stop fetching ns's subject and give its lease back once what is out came back. */
static void
start_release(NatsSub *ns)
{
	ns->state = SUB_RELEASING;
	ns->release_by = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RELEASE_WAIT_MS);
}

/* We hold ns's lease at revision rev, written at sent: bind and fetch. */
static void
lease_acquired(NatsSub *ns, uint64 rev, TimestampTz sent, bool takeover, const char *how)
{
	ns->state = SUB_HELD;
	ns->lease_rev = rev;
	ns->refreshed = sent;
	ns->refresh_at = TimestampTzPlusMilliseconds(sent, LEASE_REFRESH_MS);
	ns->takeover = takeover;
	ereport(LOG,
			(errmsg("holding the JetStream lease of consumer %s (subject %s): %s",
					ns->durable, ns->topic, how)));
	bind_sub(ns, takeover);
}

/* A stand-by's look at its lease: take it if free, ours, or stale. */
static void
try_acquire(NatsSub *ns, TimestampTz now)
{
	uint64		rev;
	uint64		newrev;
	EbNatsLeaseState st = eb_nats_lease_read(ns->lease_key, &rev);

	switch (st)
	{
		case EB_LEASE_UNKNOWN:
			ns->check_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
			return;
		case EB_LEASE_FREE:
			/* Leave free subjects to instances holding fewer for a moment. */
			if (ns->free_since == 0)
				ns->free_since = now;
			ns->check_at = TimestampTzPlusMilliseconds(ns->free_since, LEASE_SPREAD_MS * leases_held());
			if (now < ns->check_at)
				return;
			newrev = eb_nats_lease_write(ns->lease_key, rev);
			if (newrev != 0)
				lease_acquired(ns, newrev, now, rev == 0,
							   rev == 0 ? "first holder" : "released cleanly by its last holder");
			else
				ns->check_at = TimestampTzPlusMilliseconds(now, 200);
			return;
		case EB_LEASE_MINE_BEFORE:
			/* Ours before (a dispatcher of ours that died, or a reconnect). */
			newrev = eb_nats_lease_write(ns->lease_key, rev);
			if (newrev != 0)
				lease_acquired(ns, newrev, now, true, "taken back from a previous dispatcher of this instance");
			else
				ns->check_at = TimestampTzPlusMilliseconds(now, 200);
			return;
		case EB_LEASE_OTHER:
			ns->free_since = 0;
			if (rev != ns->seen_rev)
			{
				ns->seen_rev = rev;
				ns->seen_at = now;
			}
			else if (now >= TimestampTzPlusMilliseconds(ns->seen_at, LEASE_TTL_MS))
			{
				newrev = eb_nats_lease_write(ns->lease_key, rev);
				if (newrev != 0)
				{
					lease_acquired(ns, newrev, now, true, "its holder stopped refreshing it");
					return;
				}
			}
			ns->check_at = TimestampTzPlusMilliseconds(ns->seen_at, LEASE_TTL_MS + 100);
			return;
	}
}

/* Refresh a lease we hold; give the subject up if it is not ours any more. */
static void
refresh(NatsSub *ns, TimestampTz now)
{
	uint64		rev;
	uint64		newrev = eb_nats_lease_write(ns->lease_key, ns->lease_rev);

	if (newrev != 0)
	{
		ns->lease_rev = newrev;
		ns->refreshed = now;
		ns->refresh_at = TimestampTzPlusMilliseconds(now, LEASE_REFRESH_MS);
		return;
	}
	switch (eb_nats_lease_read(ns->lease_key, &rev))
	{
		case EB_LEASE_UNKNOWN:
		case EB_LEASE_MINE_BEFORE:	/* our write landed, its answer did not */
			if (rev != 0)
				ns->lease_rev = rev;
			ns->refresh_at = TimestampTzPlusMilliseconds(now, rev != 0 ? 0 : LEASE_RETRY_MS);
			return;
		default:
			ereport(LOG,
					(errmsg("lost the JetStream lease of consumer %s (subject %s) to another instance",
							ns->durable, ns->topic)));
			give_up(ns);
			return;
	}
}

/* A lease was written (nats_lease.c's notification): look at it soon. */
static void
lease_changed(const char *key, bool is_free, void *arg)
{
	NatsSub    *ns = sub_of_key(key);

	if (ns != NULL && ns->state == SUB_STANDBY)
		ns->check_at = 0;
}

/*
 * Shared mode, every poll: fence, refresh, take, release leases.  A lease
 * not refreshed for LEASE_FENCE_MS (no server) is given up here before any
 * stand-by can find it stale.
 */
static void
shared_tick(void)
{
	TimestampTz now = GetCurrentTimestamp();
	static TimestampTz open_at = 0;
	List	   *snapshot;
	ListCell   *lc;

	snapshot = list_copy(subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_HELD && now >= TimestampTzPlusMilliseconds(ns->refreshed, LEASE_FENCE_MS))
		{
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not refresh the JetStream lease of consumer %s for %d ms, giving subject %s up",
							ns->durable, LEASE_FENCE_MS, ns->topic)));
			give_up(ns);
		}
	}
	list_free(snapshot);

	if (eb_js == NULL || !eb_nats_connected())
		return;
	if (!eb_nats_lease_ready())
	{
		if (now < open_at)
			return;
		open_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
		if (!eb_nats_lease_open())
			return;
	}
	if (eb_nats_lease_changes(lease_changed, NULL))
		foreach(lc, subs)
			((NatsSub *) lfirst(lc))->check_at = 0;

	snapshot = list_copy(subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ProcDiePending)
			break;
		switch (ns->state)
		{
			case SUB_HELD:
				if (now >= ns->refresh_at)
					refresh(ns, now);
				else if (ns->feed == NULL)
					bind_sub(ns, ns->takeover);
				break;
			case SUB_STANDBY:
				if (now >= ns->check_at)
					try_acquire(ns, now);
				break;
			case SUB_RELEASING:
				if ((ns->held == 0 && ns->open_requests == 0) || now >= ns->release_by)
					finish_release(ns);
				break;
		}
	}
	list_free(snapshot);
}

/*
 * Shared mode: consume exactly these subjects — the ones not wanted any
 * more are released, new ones stand by until their lease is ours.  No
 * request to the server here: shared_tick does that.
 */
static void
shared_set_topics(List *want)
{
	List	   *keep = NIL;
	ListCell   *lc;

	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);
		bool		is_wanted = eb_string_member(want, ns->topic);

		if (ns->state == SUB_RELEASING || (is_wanted && ns->state != SUB_RELEASING))
			keep = lappend(keep, ns);
		else if (ns->state == SUB_HELD)
		{
			start_release(ns);
			keep = lappend(keep, ns);
		}
		else
			release(ns);
	}
	list_free(subs);
	subs = keep;

	foreach(lc, want)
	{
		const char *topic = lfirst(lc);
		bool		have = false;
		ListCell   *lc2;

		foreach(lc2, subs)
		{
			NatsSub    *ns = lfirst(lc2);

			if (ns->state != SUB_RELEASING && strcmp(ns->topic, topic) == 0)
				have = true;
		}
		if (!have)
			subs = lappend(subs, new_sub(topic, SUB_STANDBY));
	}
}

/*
 * Shared mode, at exit: give every lease back.  The server ends our pull
 * requests within SHARED_EXPIRES_MS; whatever they brought and whatever is
 * out unfinished is NAKed in stream order, then the leases are released.
 */
static void
shared_stop(void)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STOP_WAIT_MS);
	List	   *snapshot;
	ListCell   *lc;

	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_HELD)
			ns->state = SUB_RELEASING;
	}
	for (;;)
	{
		bool		open = false;

		foreach(lc, subs)
		{
			NatsSub    *ns = lfirst(lc);
			EbNatsFeedState st;

			if (ns->state != SUB_RELEASING || ns->feed == NULL)
				continue;
			eb_nats_feed_state(ns->feed, &st);
			if (st.open > 0)
				open = true;
		}
		if (!open || !eb_nats_connected() || GetCurrentTimestamp() >= deadline)
			break;
		pg_usleep(20 * 1000);
	}
	snapshot = list_copy(subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_RELEASING && ns->lease_rev != 0)
			finish_release(ns);
	}
	list_free(snapshot);
	eb_nats_lease_close();
}

/* Messages of the subject still in the stream for us (last known), -1 if unknown. */
int64
eb_nats_consumer_lag(const char *topic)
{
	ListCell   *lc;

	foreach(lc, subs)
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
	shared_mode = eb_consumer_mode == EB_CONSUMER_SHARED;
	return eb_nats_client_start("eventbus consumer", true);
}

/* Release the subscriptions (durables kept) and close the connection. */
void
eb_nats_consumer_stop(void)
{
	flush_acks();
	if (shared_mode)
		shared_stop();
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

/* Arrivals and request ends wake the dispatcher: no polling when idle. */
int
eb_nats_consumer_idle_poll_ms(void)
{
	return 0;
}

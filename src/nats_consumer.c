/*
 * nats_consumer.c — the dispatcher's JetStream consumers: one durable pull
 * consumer per subscribed subject, fetched without waiting from the main
 * thread.  A message is acked only after its handlers' transaction
 * committed.
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

#include "miscadmin.h"
#include "utils/json.h"
#include "utils/memutils.h"

#include "guc.h"
#include "nats_client.h"
#include "transport.h"
#include "util.h"

/* Redelivery after this long without an ack (a crashed dispatcher's messages). */
#define ACK_WAIT_NS		((int64) 30 * 1000000000)
#define MAX_ACK_PENDING 20000
#define FETCH_MAX		256

typedef struct NatsSub
{
	char	   *topic;
	char	   *durable;
	natsSubscription *sub;
	int64		pending;		/* messages waiting in the stream (last known) */
	int64		held;			/* fetched messages not yet finished */
	bool		released;		/* no longer in subs: never ack through it */
} NatsSub;

/* The dispatcher's handle on one fetched message. */
typedef struct NatsHeld
{
	natsMsg    *msg;
	NatsSub    *ns;
} NatsHeld;

static List *subs = NIL;		/* NatsSub *, bound or to be bound */
static List *wanted = NIL;		/* subjects to consume (char *) */
static uint64 seen_reconnects = 0;
static bool paused = false;
static EbDeliverFn deliver_fn = NULL;	/* the dispatcher's */

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

/* Bind (creating if needed) the durable pull consumer of one subject. */
static NatsSub *
subscribe_topic(const char *topic)
{
	NatsSub    *ns;
	jsSubOptions so;
	jsErrCode	jerr = 0;
	natsStatus	s;
	char	   *err = NULL;
	char	   *stream;
	uint64		start;
	sigset_t	old;
	MemoryContext mc = MemoryContextSwitchTo(TopMemoryContext);

	ns = palloc0(sizeof(NatsSub));
	ns->topic = pstrdup(topic);
	ns->durable = durable_name(topic);
	MemoryContextSwitchTo(mc);

	if (!eb_nats_ensure_stream(topic, &err) || (stream = stream_for_subject(topic)) == NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("no JetStream stream for %s%s%s", topic, err ? ": " : "", err ? err : "")));
		return ns;				/* retried at the next subscription refresh */
	}
	start = take_over_durable(stream, ns->durable);

	jsSubOptions_Init(&so);
	so.Stream = stream;
	so.Config.Durable = ns->durable;
	so.Config.AckPolicy = js_AckExplicit;
	/* New durable: the start policy (everything retained); else resume. */
	so.Config.DeliverPolicy = start > 0 ? js_DeliverByStartSequence : js_DeliverAll;
	so.Config.OptStartSeq = start;
	so.Config.AckWait = ACK_WAIT_NS;
	so.Config.MaxAckPending = MAX_ACK_PENDING;
	so.Config.MaxDeliver = -1;
	so.Config.FilterSubject = ns->topic;

	eb_nats_block_signals(&old);
	s = js_PullSubscribe(&ns->sub, eb_js, ns->topic, ns->durable, NULL, &so, &jerr);
	eb_nats_restore_signals(&old);
	if (s != NATS_OK)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not bind JetStream consumer %s for %s: %s",
						ns->durable, ns->topic, natsStatus_GetText(s)),
				 jerr ? errdetail("JetStream error %d", (int) jerr) : 0));
		ns->sub = NULL;
	}
	return ns;
}

static void
free_sub(NatsSub *ns)
{
	pfree(ns->topic);
	pfree(ns->durable);
	pfree(ns);
}

/*
 * Release a subscription without deleting its durable.  Its held messages
 * keep the NatsSub until they are finished (unacked).
 */
static void
release(NatsSub *ns)
{
	if (ns->sub)
	{
		sigset_t	old;

		eb_nats_block_signals(&old);
		natsSubscription_Destroy(ns->sub);
		eb_nats_restore_signals(&old);
		ns->sub = NULL;
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
	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (eb_string_member(want, ns->topic) && ns->sub != NULL)
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

/* Hand one fetched message to the dispatcher (which now owns it). */
static void
deliver(NatsSub *ns, natsMsg *msg)
{
	EbInbound	in;
	jsMsgMetaData *meta = NULL;
	const char **keys = NULL;
	int			nkeys = 0;
	NatsHeld   *held = MemoryContextAlloc(TopMemoryContext, sizeof(NatsHeld));

	held->msg = msg;
	held->ns = ns;
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

/* Fetch up to max messages (about max_bytes) across the subjects, without waiting. */
int
eb_nats_consumer_poll(int max, int64 max_bytes)
{
	int			n = 0;
	ListCell   *lc;

	if (eb_js == NULL || !eb_nats_connected() || paused)
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
	foreach(lc, subs)
	{
		NatsSub    *ns = lfirst(lc);
		jsFetchRequest req;
		natsMsgList list = {0};
		natsStatus	s;
		sigset_t	old;

		if (ns->sub == NULL || n >= max || max_bytes <= 0)
			continue;
		jsFetchRequest_Init(&req);
		req.Batch = Min(max - n, FETCH_MAX);
		req.MaxBytes = Max(max_bytes, 1);
		req.NoWait = true;
		eb_nats_block_signals(&old);
		s = natsSubscription_FetchRequest(&list, ns->sub, &req);
		eb_nats_restore_signals(&old);
		if (s != NATS_OK)
			continue;			/* nothing waiting (timeout / not found) or a lost connection */
		for (int i = 0; i < list.Count; i++)
		{
			natsMsg    *msg = list.Msgs[i];

			list.Msgs[i] = NULL;
			max_bytes -= natsMsg_GetDataLength(msg);
			deliver(ns, msg);
			n++;
		}
		natsMsgList_Destroy(&list);
	}
	return n;
}

/*
 * Handlers committed: acknowledge the message — only through a live
 * subscription (see the top of this file); else JetStream redelivers it.
 */
void
eb_nats_consumer_done(void *token)
{
	NatsHeld   *held = token;
	NatsSub    *ns = held->ns;

	if (!ns->released &&
		natsMsg_Ack(held->msg, NULL) != NATS_OK)
		ereport(DEBUG1, (errmsg_internal("JetStream ack failed; it will redeliver (the inbox skips it)")));
	natsMsg_Destroy(held->msg);
	pfree(held);
	if (--ns->held == 0 && ns->released)
		free_sub(ns);
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
	return eb_nats_client_start("eventbus consumer");
}

/* Release the subscriptions (durables kept) and close the connection. */
void
eb_nats_consumer_stop(void)
{
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
 * Backpressure: fetch nothing while paused (a pull consumer holds nothing
 * in the client between fetches).
 */
void
eb_nats_consumer_pause(bool pause)
{
	paused = pause;
}

/* JetStream pull: while subjects are consumed, fetch again shortly. */
int
eb_nats_consumer_idle_poll_ms(void)
{
	return subs != NIL ? 50 : 0;
}

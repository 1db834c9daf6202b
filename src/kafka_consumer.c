/*
 * kafka_consumer.c — the dispatcher's Kafka consumer: every partition of
 * every subscribed topic, polled on the main thread.
 *
 * With eventbus.consumer_mode = single (the default), partitions are
 * assigned by eventbus itself (rd_kafka_incremental_assign), not by joining
 * a consumer group: the dispatcher is the only consumer of its group (one
 * per database), so a group protocol would only add a join and a rebalance
 * to every start, restart and subscription change — and, after a crash, a
 * wait until the dead member's session times out (45 s with librdkafka's
 * defaults) before anything is consumed again.  The group
 * (eventbus.consumer_group) still stores the committed offsets, so Kafka
 * tools show its position and lag.  The partitions of a topic are read from
 * broker metadata when it is subscribed, and again every 30 s so partitions
 * added later are consumed too (on a helper thread, kafka_lookup.c: the
 * main thread never waits for a broker).  With consumer_mode = shared, the group
 * assigns them instead (kafka_group.c).
 *
 * Offsets: librdkafka auto-commits only what we store, and we store only a
 * partition's contiguous completion point — the offset after the longest
 * run of messages that are all handled, dead-lettered or quarantined — so a
 * message is never skipped because a later one finished first.
 */
#include "postgres.h"

#include "lib/ilist.h"
#include "utils/hsearch.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "kafka_client.h"
#include "transport.h"
#include "util.h"

#define RECHECK_MS		30000	/* look for partitions added to a topic */
#define RETRY_MS		1000	/* topic not there yet, or broker slow */
#define STATUS_SNAPSHOT_MS 10	/* one assignment snapshot serves a status report */
#define LOOKUP_TOPICS_MAX 100	/* topics one metadata request asks for */

/* The dispatcher's handle on one message. */
typedef struct KafkaToken
{
	dlist_node	node;
	EbKafkaPart *part;			/* NULL once the partition was unassigned */
	int64		offset;
	bool		done;
	bool		abandoned;		/* given back unhandled: never committed */
} KafkaToken;

/* A subscribed topic and how many of its partitions are assigned. */
typedef struct TopicState
{
	char	   *name;
	int32		nparts;			/* 0 = not found yet */
	TimestampTz next_check;		/* next metadata look-up */
} TopicState;

static HTAB *parts = NULL;
static List *topics = NIL;		/* TopicState *, in TopMemoryContext */
static bool paused = false;
static bool held = false;		/* single mode: take no message (backpressure) */
static bool shared = false;		/* consumer_mode = shared: kafka_group.c assigns */
static MemoryContext token_cxt = NULL;
static rd_kafka_resp_err_t commit_error = RD_KAFKA_RESP_ERR_NO_ERROR;
static EbDeliverFn deliver_fn = NULL;	/* the dispatcher's */
static rd_kafka_topic_partition_list_t *status_list = NULL; /* status_assignment */
static TimestampTz status_at = 0;

/* Start tracking a partition's messages (nothing if it is tracked already). */
EbKafkaPart *
eb_kafka_part_track(const char *topic, int32 partition)
{
	EbKafkaPartKey key;
	bool		found;
	EbKafkaPart *t;

	memset(&key, 0, sizeof(key));
	strlcpy(key.topic, topic, sizeof(key.topic));
	key.partition = partition;
	t = hash_search(parts, &key, HASH_ENTER, &found);
	if (!found)
	{
		dlist_init(&t->inflight);
		t->running = 0;
		t->point = -1;
		t->revoked = false;
	}
	return t;
}

/* The tracked partition, or NULL. */
EbKafkaPart *
eb_kafka_part_find(const char *topic, int32 partition)
{
	EbKafkaPartKey key;

	if (parts == NULL)
		return NULL;
	memset(&key, 0, sizeof(key));
	strlcpy(key.topic, topic, sizeof(key.topic));
	key.partition = partition;
	return hash_search(parts, &key, HASH_FIND, NULL);
}

/* Forget partitions: their in-flight messages no longer commit. */
void
eb_kafka_parts_forget(const rd_kafka_topic_partition_list_t *list)
{
	for (int i = 0; i < list->cnt; i++)
	{
		EbKafkaPart *t = eb_kafka_part_find(list->elems[i].topic, list->elems[i].partition);
		dlist_mutable_iter it;

		if (t == NULL)
			continue;
		dlist_foreach_modify(it, &t->inflight)
		{
			KafkaToken *tok = dlist_container(KafkaToken, node, it.cur);

			dlist_delete(&tok->node);
			tok->part = NULL;
			if (tok->done || tok->abandoned)
				pfree(tok);
		}
		hash_search(parts, &t->key, HASH_REMOVE, NULL);
	}
}

/* Partitions [from, to) of a topic, at their committed offsets. */
static rd_kafka_topic_partition_list_t *
partition_range(const char *topic, int from, int to)
{
	rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(Max(to - from, 1));

	for (int p = from; p < to; p++)
		rd_kafka_topic_partition_list_add(list, topic, p)->offset = RD_KAFKA_OFFSET_INVALID;
	return list;
}

/*
 * Start consuming partitions [from, to) of a topic: from the group's
 * committed offset, else from the earliest retained message.
 */
static void
assign_partitions(const char *topic, int from, int to)
{
	rd_kafka_topic_partition_list_t *list = partition_range(topic, from, to);
	rd_kafka_error_t *error;

	for (int i = 0; i < list->cnt; i++)
		eb_kafka_part_track(topic, list->elems[i].partition);
	error = rd_kafka_incremental_assign(eb_kafka, list);
	if (error != NULL)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not assign partitions of Kafka topic %s: %s",
						topic, rd_kafka_error_string(error))));
		rd_kafka_error_destroy(error);
	}
	else
	{
		if (paused)
			rd_kafka_pause_partitions(eb_kafka, list);
		ereport(DEBUG1, (errmsg_internal("Kafka topic %s partitions %d..%d assigned",
										 topic, from, to - 1)));
	}
	rd_kafka_topic_partition_list_destroy(list);
}

/* Stop consuming a topic (stored completion points are committed). */
static void
unassign_topic(TopicState *ts)
{
	rd_kafka_topic_partition_list_t *list;
	rd_kafka_error_t *error;

	if (ts->nparts <= 0)
		return;
	list = partition_range(ts->name, 0, ts->nparts);
	error = rd_kafka_incremental_unassign(eb_kafka, list);
	if (error != NULL)
		rd_kafka_error_destroy(error);
	eb_kafka_parts_forget(list);
	rd_kafka_topic_partition_list_destroy(list);
}

static TopicState *find_topic(const char *name);

/* A look-up of ts's partitions answered: assign new ones, and when to look again. */
static void
discovered(TopicState *ts, rd_kafka_resp_err_t err, int cnt)
{
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR || cnt <= 0)
		return;					/* broker slow, or topic not created yet: soon */
	if (cnt > ts->nparts)
	{
		assign_partitions(ts->name, ts->nparts, cnt);
		ts->nparts = cnt;
	}
	ts->next_check = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RECHECK_MS);
}

/* eb_kafka_lookup_topics_result's callback: one topic's answer. */
static void
topic_found(const char *name, rd_kafka_resp_err_t err, int cnt, void *arg)
{
	TopicState *ts = find_topic(name);

	if (ts != NULL)				/* else unsubscribed meanwhile */
		discovered(ts, err, cnt);
}

/*
 * Assign what the last look-up found, and start the next one for every
 * topic that is due (only while the broker is reachable): topics subscribed
 * together are found by one request, not one after another.  A look-up runs
 * on a helper thread (kafka_lookup.c), one at a time, and wakes the
 * dispatcher when it is over.
 */
static void
discover(void)
{
	const char *due[LOOKUP_TOPICS_MAX];
	TopicState *which[LOOKUP_TOPICS_MAX];
	int			n = 0;
	TimestampTz now;
	ListCell   *lc;

	(void) eb_kafka_lookup_topics_result(topic_found, NULL);
	if (!eb_kafka_connected())
		return;
	now = GetCurrentTimestamp();
	foreach(lc, topics)
	{
		TopicState *ts = lfirst(lc);

		if (now < ts->next_check)
			continue;
		which[n] = ts;
		due[n++] = ts->name;
		if (n == LOOKUP_TOPICS_MAX)
			break;
	}
	if (n > 0 && eb_kafka_lookup_start(eb_kafka, due, n))
		for (int i = 0; i < n; i++)
			which[i]->next_check = TimestampTzPlusMilliseconds(now, RETRY_MS);
}

/*
 * A Kafka header value (bytes) as a C string.  A NUL byte would cut it
 * short, silently turning "abc\0x" into a different, maybe valid, value
 * (an X-Aggregate-ID); 0xFF bytes in its place keep it whole and make it
 * invalid UTF-8, which is what it is: not text.  So such a header is left
 * out of envelope.headers, and refused as an aggregate id (quarantine).
 */
static char *
header_value(const void *val, size_t size)
{
	char	   *s = palloc(size + 1);

	if (size > 0)
		memcpy(s, val, size);
	s[size] = '\0';
	for (size_t i = 0; i < size; i++)
		if (s[i] == '\0')
			s[i] = (char) 0xFF;
	return s;
}

/*
 * Commit results (main thread, from rd_kafka_consumer_poll).  A failure
 * means redelivery after a restart, not loss; it is logged once per kind.
 * Rejected commits usually mean another consumer joined our group — except
 * in shared mode, where members come and go by design and a commit refused
 * during a rebalance is expected (the rebalance itself is logged).
 */
static void
offset_commit_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
				 rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
	if (err == RD_KAFKA_RESP_ERR__NO_OFFSET || err == commit_error)
		return;
	commit_error = err;
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
		return;
	if (shared && (err == RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID ||
				   err == RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION ||
				   err == RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS))
		ereport(DEBUG1,
				(errmsg_internal("Kafka refused offsets of group \"%s\" during a rebalance: %s",
								 eb_consumer_group, rd_kafka_err2str(err))));
	else if (err == RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID || err == RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION)
		ereport(WARNING,
				(errcode(ERRCODE_LOCK_NOT_AVAILABLE),
				 errmsg("Kafka refused to store the offsets of group \"%s\": %s",
						eb_consumer_group, rd_kafka_err2str(err)),
				 errdetail("Another consumer is a member of that group."),
				 errhint("Give each database its own eventbus.consumer_group; events since the last stored offset are redelivered after a restart (the inbox skips what was handled).")));
	else
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not commit Kafka offsets: %s", rd_kafka_err2str(err)),
				 errdetail("They are committed again later; until then a restart redelivers, and the inbox skips, what was handled.")));
}

/* Create the consumer (offsets stored in group eventbus.consumer_group). */
bool
eb_kafka_consumer_start(EbDeliverFn deliver)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	HASHCTL		ctl;

	if (rd_kafka_conf_set(conf, "group.id", eb_consumer_group, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "client.id", "eventbus-consumer", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "enable.auto.commit", "true", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "auto.commit.interval.ms", "1000", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "enable.auto.offset.store", "false", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "auto.offset.reset", "earliest", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "enable.partition.eof", "false", errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		/* librdkafka's prefetch: an eighth of eventbus.dispatcher_memory. */
		rd_kafka_conf_set(conf, "queued.max.messages.kbytes", psprintf("%d", Max(eb_dispatcher_memory_kb / 8, 1024)),
						  errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK ||
		(eb_consumer_mode == EB_CONSUMER_SHARED &&
		 !eb_kafka_group_configure(conf, errstr, sizeof(errstr))))
	{
		rd_kafka_conf_destroy(conf);
		eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, errstr);
		return false;
	}
	rd_kafka_conf_set_offset_commit_cb(conf, offset_commit_cb);

	if (parts == NULL)
	{
		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(EbKafkaPartKey);
		ctl.entrysize = sizeof(EbKafkaPart);
		parts = hash_create("eventbus kafka partitions", 64, &ctl, HASH_ELEM | HASH_BLOBS);
		token_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus kafka tokens",
										  ALLOCSET_DEFAULT_SIZES);
	}
	topics = NIL;
	paused = false;
	held = false;
	shared = eb_consumer_mode == EB_CONSUMER_SHARED;
	commit_error = RD_KAFKA_RESP_ERR_NO_ERROR;
	deliver_fn = deliver;
	if (!eb_kafka_client_start(RD_KAFKA_CONSUMER, conf))
		return false;
	if (shared)
		eb_kafka_group_started();
	return true;
}

/* The subscribed topic of that name, or NULL. */
static TopicState *
find_topic(const char *name)
{
	ListCell   *lc;

	foreach(lc, topics)
		if (strcmp(((TopicState *) lfirst(lc))->name, name) == 0)
			return lfirst(lc);
	return NULL;
}

/*
 * Consume exactly these topics: unassign the ones no longer wanted; new
 * ones are assigned as soon as their partitions are known.
 */
void
eb_kafka_consumer_set_topics(List *want)
{
	List	   *keep = NIL;
	ListCell   *lc;
	MemoryContext old;

	if (eb_kafka == NULL)
		return;
	if (shared)
	{
		eb_kafka_group_set_topics(want);
		return;
	}
	old = MemoryContextSwitchTo(TopMemoryContext);
	foreach(lc, topics)
	{
		TopicState *ts = lfirst(lc);

		if (eb_string_member(want, ts->name))
			keep = lappend(keep, ts);
		else
		{
			unassign_topic(ts);
			pfree(ts->name);
			pfree(ts);
		}
	}
	list_free(topics);
	topics = keep;
	foreach(lc, want)
	{
		TopicState *ts;

		if (find_topic(lfirst(lc)) != NULL)
			continue;
		ts = palloc0(sizeof(TopicState));
		ts->name = pstrdup(lfirst(lc));
		topics = lappend(topics, ts);
	}
	MemoryContextSwitchTo(old);
	discover();
}

/*
 * Poll up to max messages or max_bytes of values (and serve errors, logs,
 * commit results); returns count.
 */
int
eb_kafka_consumer_poll(int max, int64 max_bytes)
{
	int			n = 0;
	int64		bytes = 0;

	if (eb_kafka == NULL)
		return 0;
	if (shared)
		eb_kafka_group_serve();
	else
		discover();
	if (held)					/* only ever set in single mode */
		return 0;
	while (n < max && bytes < max_bytes && eb_kafka != NULL)
	{
		rd_kafka_message_t *m = rd_kafka_consumer_poll(eb_kafka, 0);
		rd_kafka_headers_t *hdrs = NULL;
		EbInbound	in;
		EbKafkaPart *t;
		KafkaToken *tok;
		size_t		nh;

		if (m == NULL)
			break;
		if (m->err)
		{
			if (m->err == RD_KAFKA_RESP_ERR__TRANSPORT ||
				m->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
				eb_kafka_mark_down(rd_kafka_message_errstr(m));
			else
				ereport(DEBUG1, (errmsg_internal("Kafka consumer: %s", rd_kafka_message_errstr(m))));
			rd_kafka_message_destroy(m);
			continue;
		}
		eb_kafka_mark_connected();
		t = eb_kafka_part_find(rd_kafka_topic_name(m->rkt), m->partition);
		if (shared && (t == NULL || t->revoked))
		{
			/* Fetched before the partition was given up: its owner reads it. */
			rd_kafka_message_destroy(m);
			continue;
		}
		bytes += (int64) m->len + (int64) m->key_len;

		tok = MemoryContextAllocZero(token_cxt, sizeof(KafkaToken));
		tok->part = t;
		tok->offset = m->offset;
		if (t)
		{
			dlist_push_tail(&t->inflight, &tok->node);
			t->running++;
		}

		memset(&in, 0, sizeof(in));
		in.transport = EB_TRANSPORT_KAFKA;
		in.topic = rd_kafka_topic_name(m->rkt);
		in.data = m->payload;
		in.len = m->payload ? m->len : 0;
		in.key = m->key;
		in.keylen = m->key ? m->key_len : 0;
		in.partition = m->partition;
		in.offset = m->offset;
		in.stream_seq = 0;
		in.token = tok;
		if (rd_kafka_message_headers(m, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR &&
			(nh = rd_kafka_header_cnt(hdrs)) > 0)
		{
			in.header_names = palloc(sizeof(char *) * nh);
			in.header_values = palloc(sizeof(char *) * nh);
			for (size_t i = 0; i < nh; i++)
			{
				const char *name;
				const void *val;
				size_t		size;

				if (rd_kafka_header_get_all(hdrs, i, &name, &val, &size) != RD_KAFKA_RESP_ERR_NO_ERROR)
					break;
				in.header_names[in.nheaders] = pstrdup(name);
				in.header_values[in.nheaders] = header_value(val, size);
				in.nheaders++;
			}
		}
		deliver_fn(&in);
		rd_kafka_message_destroy(m);
		n++;
	}
	return n;
}

/*
 * A message is finished: advance its partition's completion point over the
 * contiguous finished prefix and store it for the next auto-commit.
 */
void
eb_kafka_consumer_done(void *token)
{
	KafkaToken *tok = token;
	EbKafkaPart *t = tok->part;
	int64		commit = -1;

	tok->done = true;
	if (t == NULL)
	{
		pfree(tok);
		return;
	}
	t->running--;
	while (!dlist_is_empty(&t->inflight))
	{
		KafkaToken *head = dlist_head_element(KafkaToken, node, &t->inflight);

		if (!head->done)
			break;
		commit = head->offset + 1;
		dlist_pop_head_node(&t->inflight);
		pfree(head);
	}
	if (commit >= 0 && eb_kafka != NULL)
	{
		rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);

		rd_kafka_topic_partition_list_add(list, t->key.topic, t->key.partition)->offset = commit;
		rd_kafka_offsets_store(eb_kafka, list);
		rd_kafka_topic_partition_list_destroy(list);
		t->point = commit;
	}
}

/*
 * May the message still be handled here?  Not once its partition was given
 * up (shared mode): the new owner handles it.
 */
bool
eb_kafka_consumer_live(void *token)
{
	KafkaToken *tok = token;

	if (!shared)
		return true;

	/*
	 * A revoked partition's messages received before the revoke are still
	 * handled here while the hand-over drains (one not handled would stop
	 * its completion point, and the next owner would handle again every
	 * later message handled here); once the partition is given up, not.
	 */
	return tok->part != NULL;
}

/*
 * A message was given back unhandled (its partition was given up): it stays
 * in the partition's list as a barrier, so the completion point never moves
 * past it.
 */
void
eb_kafka_consumer_abandon(void *token)
{
	KafkaToken *tok = token;

	tok->abandoned = true;
	if (tok->part == NULL)
	{
		pfree(tok);
		return;
	}
	tok->part->running--;
}

/* Is fetching paused (backpressure)?  New partitions start paused then. */
bool
eb_kafka_consumer_paused(void)
{
	return paused;
}

/*
 * Backpressure.  A single-mode consumer just takes no more messages (see
 * eb_kafka_consumer_poll): librdkafka stops fetching by itself once its
 * queue holds queued.max.messages.kbytes.  Pausing the partitions instead
 * throws their prefetched messages away and resuming fetches them again:
 * measured with a 2,000-message in-flight limit, a 10,000-event backlog
 * was consumed at 2,400 events/s that way, 9,900 without.  Shared mode
 * still pauses every assigned partition: rebalance events come through
 * the same queue as messages and must not wait behind a full one.
 */
void
eb_kafka_consumer_pause(bool pause)
{
	rd_kafka_topic_partition_list_t *list = NULL;

	if (!shared)
	{
		held = pause;
		return;
	}
	if (eb_kafka == NULL || pause == paused)
		return;
	paused = pause;
	if (rd_kafka_assignment(eb_kafka, &list) != RD_KAFKA_RESP_ERR_NO_ERROR || list == NULL)
		return;
	if (pause)
		rd_kafka_pause_partitions(eb_kafka, list);
	else
		rd_kafka_resume_partitions(eb_kafka, list);
	rd_kafka_topic_partition_list_destroy(list);
}

/* Drop the status snapshot. */
static void
status_forget(void)
{
	if (status_list != NULL)
		rd_kafka_topic_partition_list_destroy(status_list);
	status_list = NULL;
}

/*
 * The assignment with each partition's position, taken once for a status
 * report: the dispatcher asks for every subscription's lag and share in one
 * go, and a copy of the whole assignment and a position look-up of each of
 * its partitions per subscription cost subscriptions x partitions look-ups
 * under librdkafka's locks, ten times a second.  NULL when unknown.
 */
static rd_kafka_topic_partition_list_t *
status_assignment(void)
{
	TimestampTz now = GetCurrentTimestamp();

	/* A snapshot belongs to the client it came from. */
	if (eb_kafka != NULL && status_list != NULL &&
		now < TimestampTzPlusMilliseconds(status_at, STATUS_SNAPSHOT_MS))
		return status_list;
	status_forget();
	if (eb_kafka == NULL || rd_kafka_assignment(eb_kafka, &status_list) != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		status_list = NULL;
		return NULL;
	}
	rd_kafka_position(eb_kafka, status_list);
	status_at = now;
	return status_list;
}

/* Messages of topic not yet fetched (from cached watermarks), -1 if unknown. */
int64
eb_kafka_consumer_lag(const char *topic)
{
	rd_kafka_topic_partition_list_t *list = status_assignment();
	int64		lag = 0;
	bool		known = false;

	if (list == NULL)
		return -1;
	for (int i = 0; i < list->cnt; i++)
	{
		int64_t		lo,
					hi;

		if (strcmp(list->elems[i].topic, topic) != 0 || list->elems[i].offset < 0)
			continue;
		if (rd_kafka_get_watermark_offsets(eb_kafka, topic, list->elems[i].partition, &lo, &hi) == RD_KAFKA_RESP_ERR_NO_ERROR &&
			hi >= list->elems[i].offset)
		{
			lag += hi - list->elems[i].offset;
			known = true;
		}
	}
	return known ? lag : -1;
}

/* consumer_share: partitions of topic assigned to this consumer now (-1: unknown). */
int
eb_kafka_consumer_share(const char *topic)
{
	rd_kafka_topic_partition_list_t *list = status_assignment();
	int			n = 0;

	if (list == NULL)
		return -1;
	for (int i = 0; i < list->cnt; i++)
		if (strcmp(list->elems[i].topic, topic) == 0)
			n++;
	return n;
}

/* Stop the consumer (offsets stored so far are committed on the way). */
void
eb_kafka_consumer_stop(void)
{
	status_forget();
	if (shared)
		eb_kafka_group_stop();
	eb_kafka_client_stop();
	deliver_fn = NULL;
}

/* Probe while not connected; false once the client failed for good. */
bool
eb_kafka_consumer_check(void)
{
	eb_kafka_probe();
	return !eb_kafka_fatal();
}

/*
 * librdkafka's queue event wakes the dispatcher: no idle polling, except
 * while a partition hand-over waits for a deadline (shared mode).
 */
int
eb_kafka_consumer_idle_poll_ms(void)
{
	return shared ? eb_kafka_group_wait_ms() : 0;
}

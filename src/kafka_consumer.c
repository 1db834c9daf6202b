/*
 * kafka_consumer.c — the dispatcher's Kafka consumer: one group member for
 * every subscribed topic, polled on the main thread.
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

#include "eventbus.h"

typedef struct PartKey
{
	char		topic[EB_MAX_TOPIC + 1];
	int32		partition;
} PartKey;

/* In-flight messages of one assigned partition, in offset order. */
typedef struct PartTrack
{
	PartKey		key;
	dlist_head	inflight;
} PartTrack;

/* The dispatcher's handle on one message. */
typedef struct KafkaToken
{
	dlist_node	node;
	PartTrack  *part;			/* NULL once the partition was revoked */
	int64		offset;
	bool		done;
} KafkaToken;

static HTAB *parts = NULL;
static List *topics = NIL;		/* currently subscribed (char *) */
static bool paused = false;
static MemoryContext token_cxt = NULL;

/* Forget revoked partitions: their in-flight messages no longer commit. */
static void
drop_partitions(rd_kafka_topic_partition_list_t *list)
{
	for (int i = 0; i < list->cnt; i++)
	{
		PartKey		key;
		PartTrack  *t;
		dlist_mutable_iter it;

		memset(&key, 0, sizeof(key));
		strlcpy(key.topic, list->elems[i].topic, sizeof(key.topic));
		key.partition = list->elems[i].partition;
		t = hash_search(parts, &key, HASH_FIND, NULL);
		if (t == NULL)
			continue;
		dlist_foreach_modify(it, &t->inflight)
		{
			KafkaToken *tok = dlist_container(KafkaToken, node, it.cur);

			dlist_delete(&tok->node);
			tok->part = NULL;
			if (tok->done)
				pfree(tok);
		}
		hash_search(parts, &key, HASH_REMOVE, NULL);
	}
}

/* Rebalance (main thread, from rd_kafka_consumer_poll). */
static void
rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			 rd_kafka_topic_partition_list_t *list, void *opaque)
{
	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS)
	{
		for (int i = 0; i < list->cnt; i++)
		{
			PartKey		key;
			bool		found;
			PartTrack  *t;

			memset(&key, 0, sizeof(key));
			strlcpy(key.topic, list->elems[i].topic, sizeof(key.topic));
			key.partition = list->elems[i].partition;
			t = hash_search(parts, &key, HASH_ENTER, &found);
			if (!found)
				dlist_init(&t->inflight);
		}
		rd_kafka_assign(rk, list);
		if (paused)
			rd_kafka_pause_partitions(rk, list);
		ereport(DEBUG1, (errmsg("eventbus consumer: %d Kafka partitions assigned", list->cnt)));
	}
	else
	{
		/* Completion points are stored as they advance; commit them now. */
		rd_kafka_commit(rk, NULL, 0);
		drop_partitions(list);
		rd_kafka_assign(rk, NULL);
		ereport(DEBUG1, (errmsg("eventbus consumer: %d Kafka partitions revoked", list->cnt)));
	}
}

/* Create the consumer (group eventbus.consumer_group, earliest start). */
bool
kafka_consumer_start(void)
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
		rd_kafka_conf_set(conf, "queued.max.messages.kbytes", psprintf("%d", Max(eb_dispatcher_memory_kb / 2, 1024)),
						  errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK)
	{
		rd_kafka_conf_destroy(conf);
		eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, errstr);
		return false;
	}
	rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);

	if (parts == NULL)
	{
		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(PartKey);
		ctl.entrysize = sizeof(PartTrack);
		parts = hash_create("eventbus kafka partitions", 64, &ctl, HASH_ELEM | HASH_BLOBS);
		token_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus kafka tokens",
										  ALLOCSET_DEFAULT_SIZES);
	}
	topics = NIL;
	paused = false;
	return kafka_client_start(RD_KAFKA_CONSUMER, conf);
}

/* Subscribe to exactly these topics (a change means a rebalance). */
void
kafka_consumer_set_topics(List *want)
{
	rd_kafka_topic_partition_list_t *list;
	ListCell   *lc;
	bool		same = list_length(want) == list_length(topics);

	if (eb_kafka == NULL)
		return;
	foreach(lc, want)
		if (!eb_string_member(topics, lfirst(lc)))
			same = false;
	if (same)
		return;

	list_free_deep(topics);
	topics = NIL;
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

		foreach(lc, want)
			topics = lappend(topics, pstrdup(lfirst(lc)));
		MemoryContextSwitchTo(old);
	}

	if (topics == NIL)
	{
		rd_kafka_unsubscribe(eb_kafka);
		return;
	}
	list = rd_kafka_topic_partition_list_new(list_length(topics));
	foreach(lc, topics)
		rd_kafka_topic_partition_list_add(list, lfirst(lc), RD_KAFKA_PARTITION_UA);
	if (rd_kafka_subscribe(eb_kafka, list) != RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(WARNING, (errmsg("eventbus consumer: could not subscribe to Kafka topics")));
	rd_kafka_topic_partition_list_destroy(list);
}

/*
 * Poll up to max messages or max_bytes of values (and serve rebalances,
 * errors, logs); returns count.
 */
int
kafka_consumer_poll(int max, int64 max_bytes)
{
	int			n = 0;
	int64		bytes = 0;

	if (eb_kafka == NULL)
		return 0;
	while (n < max && bytes < max_bytes)
	{
		rd_kafka_message_t *m = rd_kafka_consumer_poll(eb_kafka, 0);
		rd_kafka_headers_t *hdrs = NULL;
		EbInbound	in;
		PartKey		key;
		PartTrack  *t;
		KafkaToken *tok;
		size_t		nh;

		if (m == NULL)
			break;
		if (m->err)
		{
			if (m->err == RD_KAFKA_RESP_ERR__TRANSPORT ||
				m->err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
				kafka_mark_down(rd_kafka_message_errstr(m));
			else
				ereport(DEBUG1, (errmsg("eventbus consumer: %s", rd_kafka_message_errstr(m))));
			rd_kafka_message_destroy(m);
			continue;
		}
		kafka_mark_connected();
		bytes += (int64) m->len + (int64) m->key_len;

		memset(&key, 0, sizeof(key));
		strlcpy(key.topic, rd_kafka_topic_name(m->rkt), sizeof(key.topic));
		key.partition = m->partition;
		t = hash_search(parts, &key, HASH_FIND, NULL);

		tok = MemoryContextAllocZero(token_cxt, sizeof(KafkaToken));
		tok->part = t;
		tok->offset = m->offset;
		if (t)
			dlist_push_tail(&t->inflight, &tok->node);

		memset(&in, 0, sizeof(in));
		in.transport = EB_TRANSPORT_KAFKA;
		in.topic = key.topic;
		in.data = m->payload;
		in.len = m->payload ? m->len : 0;
		in.key = m->key;
		in.keylen = m->key ? m->key_len : 0;
		in.partition = m->partition;
		in.offset = m->offset;
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
				in.header_values[in.nheaders] = val ? pnstrdup(val, size) : pstrdup("");
				in.nheaders++;
			}
		}
		dispatch_message(&in);
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
kafka_consumer_done(void *token)
{
	KafkaToken *tok = token;
	PartTrack  *t = tok->part;
	int64		commit = -1;

	tok->done = true;
	if (t == NULL)
	{
		pfree(tok);
		return;
	}
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
	}
}

/* Stop or resume fetching (backpressure) on every assigned partition. */
void
kafka_consumer_pause(bool pause)
{
	rd_kafka_topic_partition_list_t *list = NULL;

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

/* Messages of topic not yet fetched (from cached watermarks), -1 if unknown. */
int64
kafka_consumer_lag(const char *topic)
{
	rd_kafka_topic_partition_list_t *list = NULL;
	int64		lag = 0;
	bool		known = false;

	if (eb_kafka == NULL || rd_kafka_assignment(eb_kafka, &list) != RD_KAFKA_RESP_ERR_NO_ERROR)
		return -1;
	rd_kafka_position(eb_kafka, list);
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
	rd_kafka_topic_partition_list_destroy(list);
	return known ? lag : -1;
}

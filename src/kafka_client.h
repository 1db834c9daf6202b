/*
 * kafka_client.h — the Kafka transport's own declarations, shared by
 * kafka.c (client, producer, publish-time checks, the routine),
 * kafka_lookup.c (metadata look-ups off the main thread),
 * kafka_consumer.c (the dispatcher's consumer) and kafka_group.c (its
 * consumer-group mode).  Only these files include librdkafka.
 */
#ifndef EB_KAFKA_CLIENT_H
#define EB_KAFKA_CLIENT_H

#include <librdkafka/rdkafka.h>

#include "lib/ilist.h"

#include "envelope.h"
#include "transport.h"

typedef struct EbKafkaPartKey
{
	char		topic[EB_MAX_TOPIC + 1];
	int32		partition;
} EbKafkaPartKey;

/* An assigned partition and its messages not yet finished, in offset order. */
typedef struct EbKafkaPart
{
	EbKafkaPartKey key;
	dlist_head	inflight;		/* KafkaTokens (kafka_consumer.c) */
	int			running;		/* tokens neither done nor abandoned */
	int64		point;			/* completion point stored, -1 if none yet */
	bool		revoked;		/* being handed over: no new messages taken */
} EbKafkaPart;

/* The process's librdkafka client (launcher: producer; dispatcher: consumer). */
extern rd_kafka_t *eb_kafka;

/* kafka.c */
extern bool eb_kafka_client_start(rd_kafka_type_t type, rd_kafka_conf_t *conf);
extern void eb_kafka_client_stop(void);
extern bool eb_kafka_connected(void);
extern bool eb_kafka_fatal(void);
extern void eb_kafka_mark_down(const char *reason);
extern void eb_kafka_mark_connected(void);
extern void eb_kafka_probe(void);

/* kafka_lookup.c: metadata look-ups on a helper thread */
typedef void (*EbKafkaLookupFn) (const char *topic, rd_kafka_resp_err_t err, int partitions, void *arg);
extern bool eb_kafka_lookup_start(rd_kafka_t *rk, const char *const *topics, int ntopics);
extern bool eb_kafka_lookup_probe_result(rd_kafka_resp_err_t *err);
extern bool eb_kafka_lookup_topics_result(EbKafkaLookupFn fn, void *arg);
extern bool eb_kafka_lookup_wait(rd_kafka_t *rk);

/* kafka_consumer.c */
extern bool eb_kafka_consumer_start(EbDeliverFn deliver);
extern void eb_kafka_consumer_stop(void);
extern bool eb_kafka_consumer_check(void);
extern void eb_kafka_consumer_set_topics(List *topics);
extern int	eb_kafka_consumer_poll(int max, int64 max_bytes);
extern void eb_kafka_consumer_done(void *token);
extern void eb_kafka_consumer_pause(bool pause);
extern int64 eb_kafka_consumer_lag(const char *topic);
extern int	eb_kafka_consumer_share(const char *topic);
extern int	eb_kafka_consumer_idle_poll_ms(void);
extern bool eb_kafka_consumer_live(void *token);
extern bool eb_kafka_consumer_paused(void);
extern void eb_kafka_consumer_abandon(void *token);
extern EbKafkaPart *eb_kafka_part_track(const char *topic, int32 partition);
extern EbKafkaPart *eb_kafka_part_find(const char *topic, int32 partition);
extern void eb_kafka_parts_forget(const rd_kafka_topic_partition_list_t *list);

/* kafka_group.c: eventbus.consumer_mode = shared */
extern bool eb_kafka_group_configure(rd_kafka_conf_t *conf, char *errstr, size_t errlen);
extern void eb_kafka_group_started(void);
extern void eb_kafka_group_set_topics(List *topics);
extern void eb_kafka_group_serve(void);
extern void eb_kafka_group_stop(void);
extern int	eb_kafka_group_wait_ms(void);
extern void eb_kafka_group_close_event(rd_kafka_t *rk, rd_kafka_event_t *ev);

#endif							/* EB_KAFKA_CLIENT_H */

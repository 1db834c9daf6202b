/*
 * kafka_client.h — the Kafka transport's own declarations, shared by
 * kafka.c (client, producer, publish-time checks, the routine) and
 * kafka_consumer.c.  Only these files include librdkafka.
 */
#ifndef EB_KAFKA_CLIENT_H
#define EB_KAFKA_CLIENT_H

#include <librdkafka/rdkafka.h>

#include "transport.h"

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

/* kafka_consumer.c */
extern bool eb_kafka_consumer_start(EbDeliverFn deliver);
extern void eb_kafka_consumer_stop(void);
extern bool eb_kafka_consumer_check(void);
extern void eb_kafka_consumer_set_topics(List *topics);
extern int	eb_kafka_consumer_poll(int max, int64 max_bytes);
extern void eb_kafka_consumer_done(void *token);
extern void eb_kafka_consumer_pause(bool pause);
extern int64 eb_kafka_consumer_lag(const char *topic);
extern int	eb_kafka_consumer_idle_poll_ms(void);

#endif							/* EB_KAFKA_CLIENT_H */

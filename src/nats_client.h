/*
 * nats_client.h — the NATS JetStream transport's own declarations, shared
 * by nats.c (connection, streams, producer, publish-time checks, the
 * routine) and nats_consumer.c.  Only these files include cnats.
 */
#ifndef EB_NATS_CLIENT_H
#define EB_NATS_CLIENT_H

#include <signal.h>

#include <nats/nats.h>

#include "transport.h"

/* Message size limit when the server's max_payload is not known yet. */
#define EB_NATS_DEFAULT_MAX_PAYLOAD		(1024 * 1024)

/* The process's NATS connection and JetStream context. */
extern natsConnection *eb_nats_conn;
extern jsCtx *eb_js;

/* nats.c */
extern bool eb_nats_client_start(const char *name);
extern void eb_nats_client_stop(void);
extern bool eb_nats_connected(void);
extern void eb_nats_poll_state(void);
extern void eb_nats_block_signals(sigset_t *old);
extern void eb_nats_restore_signals(const sigset_t *old);
extern uint64 eb_nats_reconnects(void);
extern bool eb_nats_ensure_stream(const char *topic, char **errmsg);

/* nats_consumer.c */
extern bool eb_nats_consumer_start(EbDeliverFn deliver);
extern void eb_nats_consumer_stop(void);
extern bool eb_nats_consumer_check(void);
extern void eb_nats_consumer_set_topics(List *topics);
extern int	eb_nats_consumer_poll(int max, int64 max_bytes);
extern void eb_nats_consumer_done(void *token);
extern void eb_nats_consumer_pause(bool pause);
extern int64 eb_nats_consumer_lag(const char *topic);
extern int	eb_nats_consumer_idle_poll_ms(void);

#endif							/* EB_NATS_CLIENT_H */

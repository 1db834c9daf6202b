/*
 * transport.h — the interface between eventbus and a message broker.
 *
 * Each transport (Kafka, NATS JetStream) is one static const
 * EbTransportRoutine, found through eb_transport(id).  The relay and the
 * dispatcher call brokers only through it, and brokers answer only through
 * the callbacks passed in (EbAckFn, EbDeliverFn), so data flows one way:
 * outbox -> relay -> transport -> broker -> transport -> dispatcher.
 *
 * A process runs at most one client per transport: the launcher a producer,
 * the dispatcher a consumer.  Every routine runs on the process's main
 * thread; library threads only write to the wakeup pipe (wakeup.c).
 */
#ifndef EB_TRANSPORT_H
#define EB_TRANSPORT_H

#include "fmgr.h"
#include "nodes/pg_list.h"

#include "envelope.h"

#define EB_TRANSPORT_KAFKA	0
#define EB_TRANSPORT_NATS	1

/* Outcome of one delivery attempt. */
typedef enum EbDelivery
{
	EB_DELIVERED = 0,
	EB_FAILED_TRANSIENT,		/* retry with backoff */
	EB_FAILED_PERMANENT			/* can never succeed as is: move aside */
} EbDelivery;

/* The relay's callback: slot of the current round finished (main thread). */
typedef void (*EbAckFn) (int transport, int slot, EbDelivery result, const char *err);

/* A message received by a consumer, handed to the dispatcher. */
typedef struct EbInbound
{
	int			transport;
	const char *topic;
	const char *data;
	size_t		len;
	const char *key;			/* Kafka key or NULL */
	size_t		keylen;
	int32		partition;		/* Kafka; -1 when the transport has none */
	int64		offset;			/* Kafka; -1 when the transport has none */
	uint64		stream_seq;		/* JetStream; 0 when the transport has none */
	int			nheaders;
	char	  **header_names;
	char	  **header_values;
	void	   *token;			/* the consumer's handle: passed back when done */
} EbInbound;

/* The dispatcher's callback: take one message (main thread). */
typedef void (*EbDeliverFn) (EbInbound *in);

typedef struct EbTransportRoutine
{
	const char *name;			/* as stored in eventbus.outbox.transport */
	const char *setting;		/* the GUC that configures it */

	/*
	 * The ordering property.  If the broker acknowledges each message on its
	 * own, a failed publish followed by a stored one reorders an aggregate:
	 * the relay then keeps at most one event per aggregate in flight, and
	 * sends the next once it is acknowledged.  If the client keeps a
	 * partition's messages in order through failures (Kafka's idempotent,
	 * gap-less producer), an aggregate's events go together.
	 */
	bool		one_per_aggregate;

	/* Wait (ms) between polls while the producer is not connected. */
	int			reconnect_poll_ms;

	/* --- usable in any backend: configuration and publish-time checks --- */
	bool		(*configured) (void);
	/* The settings its producer (or consumer) depends on, as one string. */
	char	   *(*settings) (bool producer);
	/* ERROR if the topic can never be a topic of this transport. */
	void		(*check_topic) (const char *topic);
	/* Largest message it takes, and the setting that limit comes from. */
	int64		(*max_message) (const char **limit_name);
	const char *max_message_hint;	/* how to raise that limit */
	/* Size of ev's message as the client checks it against max_message. */
	Size		(*wire_size) (const EbEvent *ev, Size envelope_len);

	/* --- producer (the relay in the launcher) --- */
	bool		(*producer_start) (EbAckFn ack);
	void		(*producer_stop) (void);
	/* Serve callbacks (acks reach EbAckFn); false: the client failed for good. */
	bool		(*producer_poll) (void);
	/* Let in-flight reports of a failed client arrive, for at most timeout_ms. */
	void		(*producer_drain) (int timeout_ms);
	bool		(*connected) (void);
	/*
	 * A round of n events starts; acks of earlier rounds are ignored.  Its
	 * events may be produced in waves: the client wakes the launcher once
	 * everything produced so far is acknowledged (or one failed).
	 */
	void		(*round_begin) (const EbEvent *events, int n);
	/* Send one event as slot; false on an immediate failure. */
	bool		(*produce) (const EbEvent *ev, const char *value, size_t len, int slot,
							char **errmsg, bool *permanent);

	/*
	 * A wave of the current round (round_n events) was produced: send what
	 * the client still buffers (NULL: the client sends on its own).
	 */
	void		(*wave_sent) (int round_n);

	/*
	 * Forget the round's unacknowledged events after eventbus.ack_timeout
	 * (they are sent again).  NULL if the client itself reports every event
	 * within that time (librdkafka's message.timeout.ms): the relay waits.
	 */
	void		(*round_abandon) (void);

	/* --- consumer (the dispatcher) --- */
	bool		(*consumer_start) (EbDeliverFn deliver);
	void		(*consumer_stop) (void);
	/* Track connection state; false: the client failed for good. */
	bool		(*consumer_check) (void);
	/* Consume exactly these topics (a List of C strings). */
	void		(*consumer_set_topics) (List *topics);
	/* Deliver up to max messages / about max_bytes; returns the count. */
	int			(*consumer_poll) (int max, int64 max_bytes);
	/* Every handler of a delivered message finished: commit point / ack. */
	void		(*consumer_done) (void *token);

	/*
	 * Shared consumption (eventbus.consumer_mode = shared): false once this
	 * instance gave up the message's partition or topic (a rebalance, a
	 * lost lease), so another instance gets it.  The dispatcher checks it
	 * before it hands each work item to a worker, and abandons the item
	 * instead: it is not handled here.  A message with an abandoned item
	 * ends with consumer_abandon (not consumer_done), once its items that
	 * were already running finished: it must not be committed or acked as
	 * handled.  Both NULL when every message is always handled here.
	 */
	bool		(*consumer_live) (void *token);
	void		(*consumer_abandon) (void *token);
	/* Backpressure: while paused, poll takes only what is already fetched. */
	void		(*consumer_pause) (bool pause);
	/* Messages of topic waiting in the broker, -1 if unknown. */
	int64		(*consumer_lag) (const char *topic);

	/*
	 * How much of topic this instance consumes now: Kafka, partitions
	 * assigned; JetStream, 1 while its durable is bound here (in shared
	 * mode: while this instance holds the lease), else 0.  -1 if unknown
	 * (NULL: always unknown).
	 */
	int			(*consumer_share) (const char *topic);
	/* Wait (ms) before polling again when idle, 0 if the broker wakes us. */
	int			(*consumer_idle_poll_ms) (void);

	/* At process exit, after the clients stopped (NULL if nothing to do). */
	void		(*library_close) (void);
} EbTransportRoutine;

extern const EbTransportRoutine eb_kafka_transport;
extern const EbTransportRoutine eb_nats_transport;

/* transport.c: the registry */
extern const EbTransportRoutine *eb_transport(int transport);
extern const char *eb_transport_name(int transport);
extern int	eb_transport_from_name(const char *name);
extern int	eb_transport_arg(FunctionCallInfo fcinfo, int argno);
extern bool eb_transport_configured(int transport);
extern void eb_require_transport_configured(int transport);
extern void eb_validate_topic_for_transport(const char *topic, int transport);
extern int64 eb_transport_max_message(int transport, const char **limit_name);
extern Size eb_event_wire_size(const EbEvent *ev, int transport, Size envelope_len);
extern void eb_transports_close_libraries(void);

#endif							/* EB_TRANSPORT_H */

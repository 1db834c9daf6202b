/*
 * kafka.c — the Kafka transport: the process's librdkafka client
 * (configuration, connection state and backoff probing shared by the
 * launcher's producer and the dispatcher's consumer), the relay's producer,
 * the checks publishing backends make, and the transport routine.
 *
 * Every librdkafka callback (delivery reports, errors, logs with log.queue)
 * is served by a poll on the worker's main thread, and the queue event only
 * writes to the wakeup pipe, so no library thread enters PostgreSQL.
 */
#include "postgres.h"

#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "kafka_client.h"
#include "transport.h"
#include "util.h"

rd_kafka_t *eb_kafka = NULL;

static bool connected = false;
static bool fatal = false;
static TimestampTz next_probe = 0;
static int	probe_backoff_ms = 0;
static int	probe_attempts = 0;	/* failed probes since last connected */
static uint32 round_gen = 0;
static EbAckFn ack_fn = NULL;	/* the relay's, while the producer runs */

/* librdkafka's default message.max.bytes. */
#define KAFKA_DEFAULT_MAX_MESSAGE	1000000

/* Producer slots carry the round generation so a stale report is never misread. */
#define SLOT_BITS 20
#define MAKE_OPAQUE(slot) ((void *) (intptr_t) (((intptr_t) (round_gen & 0x7ff) << SLOT_BITS) | (slot)))

/* Note a lost connection (main thread). */
void
eb_kafka_mark_down(const char *reason)
{
	connected = false;
	next_probe = 0;
	eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, reason);
}

/* Note a working connection (main thread). */
void
eb_kafka_mark_connected(void)
{
	if (connected)
		return;
	connected = true;
	probe_backoff_ms = 0;
	probe_attempts = 0;
	eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_CONNECTED, eb_kafka_brokers);
}

/* Client-level errors: all brokers down, or a fatal idempotence error. */
static void
error_cb(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
	if (err == RD_KAFKA_RESP_ERR__FATAL)
	{
		char		buf[256];

		rd_kafka_fatal_error(rk, buf, sizeof(buf));
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("fatal Kafka client error, recreating the client"),
				 errdetail("%s", buf)));
		fatal = true;
	}
	else if (err == RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN)
		eb_kafka_mark_down(reason);
}

/*
 * librdkafka's own log lines go to DEBUG1: it repeats connection failures,
 * and state changes are already logged once by eb_set_broker_state.
 */
static void
log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
	ereport(DEBUG1, (errmsg_internal("librdkafka %s: %s", fac, buf)));
}

/* Set one property; false (with the reason in errstr) if rejected. */
static bool
set_prop(rd_kafka_conf_t *conf, const char *name, const char *value,
		 char *errstr, size_t errlen)
{
	return rd_kafka_conf_set(conf, name, value, errstr, errlen) == RD_KAFKA_CONF_OK;
}

/*
 * Apply eventbus.kafka_properties.  Errors name the property, never its
 * value (it may be a password).
 */
static bool
apply_extra_properties(rd_kafka_conf_t *conf, char *errstr, size_t errlen)
{
	List	   *names;
	List	   *values;
	char	   *err = NULL;
	ListCell   *ln;
	ListCell   *lv;

	if (!eb_kafka_properties_parse(eb_kafka_properties, &names, &values, &err))
	{
		snprintf(errstr, errlen, "eventbus.kafka_properties: %s", err);
		return false;
	}
	forboth(ln, names, lv, values)
	{
		const char *name = lfirst(ln);
		char		ignored[512];
		rd_kafka_conf_res_t res;

		if (eb_kafka_property_mandatory(name))
		{
			snprintf(errstr, errlen, "eventbus.kafka_properties: \"%s\" is set by eventbus", name);
			return false;
		}
		res = rd_kafka_conf_set(conf, name, lfirst(lv), ignored, sizeof(ignored));
		if (res != RD_KAFKA_CONF_OK)
		{
			snprintf(errstr, errlen, "eventbus.kafka_properties: %s \"%s\"",
					 res == RD_KAFKA_CONF_UNKNOWN ? "unknown property" : "invalid value for", name);
			return false;
		}
	}
	return true;
}

/*
 * Create the process's client from conf (which the caller filled with its
 * role's properties and callbacks; consumed here in every case).
 */
bool
eb_kafka_client_start(rd_kafka_type_t type, rd_kafka_conf_t *conf)
{
	rd_kafka_queue_t *q;
	char		errstr[512];

	if (!set_prop(conf, "bootstrap.servers", eb_kafka_brokers, errstr, sizeof(errstr)) ||
		!set_prop(conf, "log.queue", "true", errstr, sizeof(errstr)) ||
		/*
		 * Small requests go out at once: with several in flight on one
		 * connection, Nagle's algorithm holds the next one until the
		 * previous is acknowledged (up to the peer's delayed ACK, ~40 ms).
		 */
		!set_prop(conf, "socket.nagle.disable", "true", errstr, sizeof(errstr)) ||
		!apply_extra_properties(conf, errstr, sizeof(errstr)))
	{
		rd_kafka_conf_destroy(conf);
		eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, errstr);
		return false;
	}
	rd_kafka_conf_set_error_cb(conf, error_cb);
	rd_kafka_conf_set_log_cb(conf, log_cb);

	eb_kafka = rd_kafka_new(type, conf, errstr, sizeof(errstr));
	if (eb_kafka == NULL)
	{
		/* rd_kafka_new frees conf only on success. */
		rd_kafka_conf_destroy(conf);
		eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, errstr);
		return false;
	}

	rd_kafka_set_log_queue(eb_kafka, NULL);
	if (type == RD_KAFKA_CONSUMER)
	{
		/* One queue for messages, rebalances, errors and logs. */
		rd_kafka_poll_set_consumer(eb_kafka);
		q = rd_kafka_queue_get_consumer(eb_kafka);
	}
	else
		q = rd_kafka_queue_get_main(eb_kafka);
	rd_kafka_queue_io_event_enable(q, eb_wakeup_write_fd(), "k", 1);
	rd_kafka_queue_destroy(q);

	connected = false;
	fatal = false;
	next_probe = 0;
	probe_backoff_ms = 0;
	probe_attempts = 0;
	eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_CONNECTING, eb_kafka_brokers);
	return true;
}

/*
 * Shutdown budgets (ms).  The consumer's orderly close stores its final
 * commit; rd_kafka_destroy then joins librdkafka's threads, which can wait
 * on an unreachable broker far longer than a shutdown may take.
 */
#define CLOSE_BUDGET_MS		1500
#define DESTROY_BUDGET_MS	1500

/* Helper thread: destroy after a completed close (or a producer). */
static void
destroy_client(void *rk)
{
	rd_kafka_destroy((rd_kafka_t *) rk);
}

/* Helper thread: destroy without the consumer's group/commit handshake. */
static void
destroy_client_now(void *rk)
{
	rd_kafka_destroy_flags((rd_kafka_t *) rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
}

/*
 * Close the consumer in order — unassign, commit the stored completion
 * points, leave the group (shared mode) — serving its events here, for at
 * most budget_ms.  True if closed.
 */
static bool
consumer_close_bounded(rd_kafka_t *rk, int budget_ms)
{
	rd_kafka_queue_t *q = rd_kafka_queue_new(rk);
	rd_kafka_error_t *error = rd_kafka_consumer_close_queue(rk, q);
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), budget_ms);
	bool		closed;

	if (error != NULL)
		rd_kafka_error_destroy(error);
	else
	{
		while (!rd_kafka_consumer_closed(rk) && GetCurrentTimestamp() < deadline)
		{
			rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 100);

			if (ev == NULL)
				continue;
			/* Leaving the group (shared mode): give the partitions back. */
			if (rd_kafka_event_type(ev) == RD_KAFKA_EVENT_REBALANCE)
				eb_kafka_group_close_event(rk, ev);
			rd_kafka_event_destroy(ev);
		}
	}
	closed = rd_kafka_consumer_closed(rk);
	rd_kafka_queue_destroy(q);
	return closed;
}

/*
 * Destroy the client in bounded time; unacknowledged work stays in the
 * outbox / broker.  If librdkafka does not finish within the budget its
 * threads are left to the process exit: nothing is lost (offsets not
 * committed are redelivered, and the inbox skips what was handled).
 */
void
eb_kafka_client_stop(void)
{
	rd_kafka_t *rk = eb_kafka;
	bool		orderly = false;

	if (rk == NULL)
		return;
	eb_kafka = NULL;
	if (rd_kafka_type(rk) == RD_KAFKA_PRODUCER)
	{
		rd_kafka_purge(rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
		rd_kafka_poll(rk, 0);
		orderly = true;
	}
	else if (connected && !fatal)
		orderly = consumer_close_bounded(rk, CLOSE_BUDGET_MS);
	connected = false;

	if (!eb_kafka_lookup_wait(rk))
	{
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("a Kafka metadata look-up did not end in time, leaving the client behind"),
				 errdetail("Offsets not yet committed are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
		return;
	}
	if (!eb_run_bounded(orderly ? destroy_client : destroy_client_now, rk, DESTROY_BUDGET_MS))
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("the Kafka client did not shut down within %d ms, leaving it behind",
						DESTROY_BUDGET_MS),
				 errdetail("Offsets not yet committed are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
}

/* Is the client connected (and usable)? */
bool
eb_kafka_connected(void)
{
	return eb_kafka != NULL && connected && !fatal;
}

/* Did the client fail for good (it must be recreated)? */
bool
eb_kafka_fatal(void)
{
	return fatal;
}

/*
 * While not connected, ask a broker for metadata, with exponential backoff
 * between attempts (0.5 s doubling to 5 s).  The request runs on a helper
 * thread (kafka_lookup.c): its outcome is taken at a later call.
 */
void
eb_kafka_probe(void)
{
	rd_kafka_resp_err_t err;

	if (eb_kafka == NULL)
		return;
	if (eb_kafka_lookup_probe_result(&err) && !connected)
	{
		if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
			eb_kafka_mark_connected();
		else
		{
			char		detail[EB_DETAIL_LEN];

			probe_backoff_ms = eb_backoff_next(probe_backoff_ms, 500, 5000);
			probe_attempts++;
			next_probe = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), probe_backoff_ms);
			snprintf(detail, sizeof(detail), "%s: %s (attempt %d, next in %d ms)",
					 eb_kafka_brokers, rd_kafka_err2str(err), probe_attempts, probe_backoff_ms);
			eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, detail);
		}
	}
	if (connected || GetCurrentTimestamp() < next_probe)
		return;
	/* Not again before this one's outcome (it sets the next time). */
	if (eb_kafka_lookup_start(eb_kafka, NULL, 0))
		next_probe = DT_NOEND;
}

/*
 * Errors after which the same message can never be produced as it is: the
 * message itself (too large, invalid), or its topic (missing with
 * auto-creation off, invalid, not authorized, refused by policy).  librdkafka
 * reports them without retrying.  Everything else (timeouts, broker or
 * leader unavailable, purges, fatal producer errors, cluster-wide
 * authorization) is transient: retried with backoff.
 */
static bool
error_permanent(rd_kafka_resp_err_t err)
{
	switch (err)
	{
		case RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_MSG:
		case RD_KAFKA_RESP_ERR_INVALID_MSG_SIZE:
		case RD_KAFKA_RESP_ERR_RECORD_LIST_TOO_LARGE:
		case RD_KAFKA_RESP_ERR_INVALID_RECORD:
		case RD_KAFKA_RESP_ERR_INVALID_TIMESTAMP:
		case RD_KAFKA_RESP_ERR_UNSUPPORTED_FOR_MESSAGE_FORMAT:
		case RD_KAFKA_RESP_ERR_TOPIC_EXCEPTION:
		case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
		case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
		case RD_KAFKA_RESP_ERR_POLICY_VIOLATION:
		case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
		case RD_KAFKA_RESP_ERR__INVALID_ARG:
			return true;
		default:
			return false;
	}
}

/* Producer delivery report: hand the outcome to the relay. */
static void
dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *msg, void *opaque)
{
	intptr_t	v = (intptr_t) msg->_private;
	int			slot = (int) (v & ((1 << SLOT_BITS) - 1));

	if ((uint32) (v >> SLOT_BITS) != (round_gen & 0x7ff) || ack_fn == NULL)
		return;
	if (msg->err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		eb_kafka_mark_connected();
		ack_fn(EB_TRANSPORT_KAFKA, slot, EB_DELIVERED, NULL);
	}
	else
	{
		if (msg->err == RD_KAFKA_RESP_ERR__MSG_TIMED_OUT ||
			msg->err == RD_KAFKA_RESP_ERR__TRANSPORT)
			eb_kafka_mark_down(rd_kafka_err2str(msg->err));
		ack_fn(EB_TRANSPORT_KAFKA, slot,
			   error_permanent(msg->err) ? EB_FAILED_PERMANENT : EB_FAILED_TRANSIENT,
					 psprintf("Kafka: %s (%s)", rd_kafka_err2str(msg->err), rd_kafka_err2name(msg->err)));
	}
}

/* The relay's producer: idempotent, fnv1a partitioner, bounded by ack_timeout. */
static bool
producer_start(EbAckFn ack)
{
	rd_kafka_conf_t *conf = rd_kafka_conf_new();
	char		errstr[512];
	char		timeout[32];

	snprintf(timeout, sizeof(timeout), "%d", eb_ack_timeout_ms);
	if (!set_prop(conf, "client.id", "eventbus-relay", errstr, sizeof(errstr)) ||
		!set_prop(conf, "enable.idempotence", "true", errstr, sizeof(errstr)) ||
		/* A batch refused for good stops the producer instead of letting
		 * later messages of its partition through (the relay's order). */
		!set_prop(conf, "enable.gapless.guarantee", "true", errstr, sizeof(errstr)) ||
		!set_prop(conf, "partitioner", "fnv1a", errstr, sizeof(errstr)) ||
		!set_prop(conf, "message.timeout.ms", timeout, errstr, sizeof(errstr)) ||
		/* Send at once: a round's events are produced back to back anyway. */
		!set_prop(conf, "linger.ms", "1", errstr, sizeof(errstr)))
	{
		rd_kafka_conf_destroy(conf);
		eb_set_broker_state(EB_TRANSPORT_KAFKA, EB_BROKER_DOWN, errstr);
		return false;
	}
	rd_kafka_conf_set_dr_msg_cb(conf, dr_cb);
	ack_fn = ack;
	return eb_kafka_client_start(RD_KAFKA_PRODUCER, conf);
}

/* Serve delivery reports, errors and logs; probe while not connected. */
static bool
producer_poll(void)
{
	if (eb_kafka)
		while (rd_kafka_poll(eb_kafka, 0) > 0)
			;
	if (fatal)
		return false;
	eb_kafka_probe();
	return true;
}

/* Wait (bounded) for the reports of what is in flight. */
static void
producer_drain(int timeout_ms)
{
	if (eb_kafka)
	{
		rd_kafka_flush(eb_kafka, timeout_ms);
		while (rd_kafka_poll(eb_kafka, 0) > 0)
			;
	}
}

/* Stop the producer; its unreported events stay in the outbox. */
static void
producer_stop(void)
{
	eb_kafka_client_stop();
	ack_fn = NULL;
}

/* A new relay round begins: reports of earlier rounds are ignored. */
static void
round_begin(const EbEvent *events, int n)
{
	round_gen++;
}

/* Add one header to a librdkafka header list. */
static void
add_header(void *arg, const char *name, const char *value)
{
	rd_kafka_header_add((rd_kafka_headers_t *) arg, name, -1, value, -1);
}

/*
 * Produce one event; its delivery report arrives through rd_kafka_poll.  On
 * an immediate failure, *permanent says whether retrying could help.
 */
static bool
produce(const EbEvent *ev, const char *value, size_t len, int slot, char **errmsg,
		bool *permanent)
{
	rd_kafka_headers_t *hdrs;
	rd_kafka_resp_err_t err;

	*permanent = false;
	if (eb_kafka == NULL)
	{
		*errmsg = "Kafka producer not running";
		return false;
	}

	hdrs = rd_kafka_headers_new(8 + ev->nheaders);
	eb_event_headers(ev, add_header, hdrs);

	for (;;)
	{
		err = rd_kafka_producev(eb_kafka,
								RD_KAFKA_V_TOPIC(ev->topic),
								RD_KAFKA_V_KEY(ev->aggregate_id, strlen(ev->aggregate_id)),
								RD_KAFKA_V_VALUE((void *) value, len),
								RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
								RD_KAFKA_V_HEADERS(hdrs),
								RD_KAFKA_V_OPAQUE(MAKE_OPAQUE(slot)),
								RD_KAFKA_V_END);
		if (err != RD_KAFKA_RESP_ERR__QUEUE_FULL)
			break;
		/* Local queue full: let deliveries drain, then try again. */
		rd_kafka_poll(eb_kafka, 100);
	}

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		rd_kafka_headers_destroy(hdrs);
		*errmsg = psprintf("Kafka: %s (%s)", rd_kafka_err2str(err), rd_kafka_err2name(err));
		*permanent = error_permanent(err);
		return false;
	}
	return true;
}

/* --- configuration and the checks publishing backends make --- */

/* Is eventbus.kafka_brokers set? */
static bool
configured(void)
{
	return eb_kafka_brokers != NULL && eb_kafka_brokers[0] != '\0';
}

/* The settings the producer (or the consumer) depends on. */
static char *
settings(bool producer)
{
	if (producer)
		return psprintf("%s|%s|%d", eb_kafka_brokers, eb_kafka_properties, eb_ack_timeout_ms);
	return psprintf("%s|%s|%s|%d|%d", eb_kafka_brokers, eb_kafka_properties,
					eb_consumer_group, eb_dispatcher_memory_kb, eb_consumer_mode);
}

/* Kafka refuses the topic names "." and "..". */
static void
check_topic(const char *topic)
{
	if (strcmp(topic, ".") == 0 || strcmp(topic, "..") == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid topic name \"%s\" for transport \"kafka\"", topic),
				 errdetail("Kafka does not allow the topic names \".\" and \"..\".")));
}

/*
 * The producer's message.max.bytes (librdkafka refuses a larger message
 * before sending it): eventbus.kafka_properties, else librdkafka's default.
 */
static int64
max_message(const char **limit_name)
{
	/* Parsed again only when the setting changed (it is per publish). */
	static char *parsed_spec = NULL;
	static int64 parsed_limit = 0;
	const char *spec = eb_kafka_properties ? eb_kafka_properties : "";
	int64		limit = KAFKA_DEFAULT_MAX_MESSAGE;
	List	   *names;
	List	   *values;
	char	   *err;
	ListCell   *ln;
	ListCell   *lv;

	*limit_name = "message.max.bytes";
	if (parsed_spec && strcmp(parsed_spec, spec) == 0)
		return parsed_limit;
	if (eb_kafka_properties_parse(spec, &names, &values, &err))
	{
		/* The last setting wins, as in librdkafka. */
		forboth(ln, names, lv, values)
		{
			char	   *end;
			long		v;

			if (strcmp(lfirst(ln), "message.max.bytes") != 0)
				continue;
			errno = 0;
			v = strtol(lfirst(lv), &end, 10);
			if (errno == 0 && *end == '\0' && v > 0)
				limit = v;
		}
	}
	if (parsed_spec)
		pfree(parsed_spec);
	parsed_spec = MemoryContextStrdup(TopMemoryContext, spec);
	parsed_limit = limit;
	return limit;
}

/* Bytes of a zigzag varint (Kafka record fields). */
static Size
zigzag_varint_size(int64 n)
{
	uint64		z = ((uint64) n << 1) ^ (uint64) (n >> 63);
	Size		bytes = 1;

	while (z >= 0x80)
	{
		z >>= 7;
		bytes++;
	}
	return bytes;
}

/* Add one header's serialized size to *arg (a Size). */
static void
count_header(void *arg, const char *name, const char *value)
{
	Size		nl = strlen(name);
	Size		vl = strlen(value);

	*(Size *) arg += nl + vl + zigzag_varint_size(nl) + zigzag_varint_size(vl);
}

/*
 * Size of ev's record as librdkafka checks it before producing: 36 bytes of
 * maximum record overhead + key (the aggregate id) + value + headers.
 */
static Size
wire_size(const EbEvent *ev, Size envelope_len)
{
	Size		headers = 0;

	eb_event_headers(ev, count_header, &headers);
	return 36 + strlen(ev->aggregate_id) + envelope_len + headers;
}

const EbTransportRoutine eb_kafka_transport = {
	.name = "kafka",
	.setting = "eventbus.kafka_brokers",
	.one_per_aggregate = false,
	.reconnect_poll_ms = 200,	/* the probe has its own backoff */

	.configured = configured,
	.settings = settings,
	.check_topic = check_topic,
	.max_message = max_message,
	.max_message_hint = "message.max.bytes in eventbus.kafka_properties (and the brokers' and topic's limits)",
	.wire_size = wire_size,

	.producer_start = producer_start,
	.producer_stop = producer_stop,
	.producer_poll = producer_poll,
	.producer_drain = producer_drain,
	.connected = eb_kafka_connected,
	.round_begin = round_begin,
	.produce = produce,
	.round_abandon = NULL,		/* message.timeout.ms = eventbus.ack_timeout */

	.consumer_start = eb_kafka_consumer_start,
	.consumer_stop = eb_kafka_consumer_stop,
	.consumer_check = eb_kafka_consumer_check,
	.consumer_set_topics = eb_kafka_consumer_set_topics,
	.consumer_poll = eb_kafka_consumer_poll,
	.consumer_done = eb_kafka_consumer_done,
	.consumer_live = eb_kafka_consumer_live,
	.consumer_abandon = eb_kafka_consumer_abandon,
	.consumer_pause = eb_kafka_consumer_pause,
	.consumer_lag = eb_kafka_consumer_lag,
	.consumer_share = eb_kafka_consumer_share,
	.consumer_idle_poll_ms = eb_kafka_consumer_idle_poll_ms,

	.library_close = NULL,
};

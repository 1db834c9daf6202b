/*
 * eventbus.h — shared declarations of the eventbus extension.
 *
 * Process model: a static "launcher" background worker connects to
 * eventbus.database, waits for CREATE EXTENSION, owns the producers and runs
 * the outbox relay.  Shared memory holds what eventbus_status() reports and
 * the latch a committing publisher sets to wake the relay.
 */
#ifndef EVENTBUS_H
#define EVENTBUS_H

#include "postgres.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "storage/latch.h"
#include "storage/spin.h"

#define EB_TRANSPORT_KAFKA	0
#define EB_TRANSPORT_NATS	1
#define EB_NTRANSPORTS		2

#define EB_DETAIL_LEN		256
#define EB_MAX_AGGREGATE_ID 256
#define EB_MAX_TOPIC		249

/* Connection state of one broker client, as shown by eventbus_status(). */
typedef enum EbBrokerState
{
	EB_BROKER_OFF = 0,			/* not configured */
	EB_BROKER_CONNECTING,		/* configured, first connection not yet made */
	EB_BROKER_CONNECTED,
	EB_BROKER_DOWN				/* was configured, unreachable: retrying */
} EbBrokerState;

typedef struct EbBrokerStatus
{
	EbBrokerState state;
	TimestampTz since;			/* when state last changed */
	uint64		published;		/* events acknowledged by the broker */
	uint64		failed;			/* delivery attempts that failed */
	char		detail[EB_DETAIL_LEN];	/* last error or endpoint */
} EbBrokerStatus;

typedef struct EbShared
{
	slock_t		mutex;			/* protects everything below */
	pid_t		launcher_pid;
	TimestampTz launcher_since;
	bool		extension_ready;	/* launcher saw the extension installed */
	Latch	   *relay_latch;	/* set at commit by publishers */
	EbBrokerStatus producer[EB_NTRANSPORTS];
} EbShared;

/* eventbus.c */
extern EbShared *eb_shared;
extern bool eb_preloaded;
extern void eb_require_preload(void);
extern void eb_wake_relay(void);

/* guc.c */
extern char *eb_database;
extern char *eb_kafka_brokers;
extern char *eb_nats_url;
extern int	eb_default_transport;
extern int	eb_workers;
extern char *eb_consumer_group;
extern char *eb_kafka_properties;
extern char *eb_nats_credentials_file;
extern char *eb_nats_token;
extern int	eb_relay_batch_size;
extern int	eb_ack_timeout_ms;
extern int	eb_max_payload_bytes;
extern void eb_define_gucs(void);
extern bool eb_transport_configured(int transport);

/* envelope.c */
typedef struct EbEvent
{
	int64		outbox_id;
	char	   *event_id;		/* canonical UUID text */
	char	   *topic;
	char	   *aggregate_id;
	char	   *event_type;
	int64		event_version;
	TimestampTz occurred_at;
	char	   *trace_id;		/* NULL when not set */
	char	   *correlation_id;
	bool		has_tenant;
	int32		tenant_id;
	char	   *payload;		/* JSON text */
	int			nheaders;		/* user headers (eventbus_publish headers) */
	char	  **header_names;
	char	  **header_values;
} EbEvent;

extern const char *eb_transport_name(int transport);
extern int	eb_transport_from_name(const char *name);
extern void eb_validate_topic(const char *topic);
extern void eb_validate_aggregate_id(const char *aggregate_id);
extern void eb_uuidv7(unsigned char out[16]);
extern void eb_format_timestamp(TimestampTz ts, char *buf, size_t len);
extern void eb_envelope_encode(StringInfo buf, const EbEvent *ev);

/* Callback that receives each header of an event (name, value). */
typedef void (*EbHeaderFn) (void *arg, const char *name, const char *value);
extern void eb_event_headers(const EbEvent *ev, EbHeaderFn fn, void *arg);

/* status.c */
extern void eb_set_producer_state(int transport, EbBrokerState state,
								  const char *detail);
extern const char *eb_broker_state_name(EbBrokerState state);

/* launcher.c */
extern PGDLLEXPORT void eventbus_launcher_main(Datum main_arg);

/* relay.c */
extern void relay_init(void);
extern void relay_shutdown(void);
extern long relay_step(void);
extern int	eb_wakeup_fd(void);
extern void eb_wakeup_drain(void);
extern void eb_wakeup_signal(void);
extern int	eb_wakeup_write_fd(void);
/* Completion of one in-flight slot; main thread only. */
extern void eb_relay_ack(int transport, int slot, bool ok, const char *err);

/*
 * Producers used by the relay.  Library threads never call PostgreSQL: they
 * only write to the wakeup pipe; results are handed over on the main thread.
 */

/* kafka.c */
extern bool kafka_producer_start(void);
extern void kafka_producer_stop(void);
extern void kafka_producer_poll(void);
extern bool kafka_producer_connected(void);
extern bool kafka_producer_fatal(void);
extern void kafka_probe(void);
extern void kafka_begin_round(void);
extern bool kafka_produce(const EbEvent *ev, const char *value, size_t len,
						  int slot, char **errmsg);

/* nats.c */
extern bool nats_producer_start(void);
extern void nats_producer_stop(void);
extern void nats_producer_poll(void);
extern bool nats_producer_connected(void);
extern void nats_publish_begin(const EbEvent *events, int n);
extern bool nats_publish(const EbEvent *ev, const char *value, size_t len,
						 int slot, char **errmsg);
extern void nats_publish_abandon(void);
extern void nats_library_close(void);

#endif							/* EVENTBUS_H */

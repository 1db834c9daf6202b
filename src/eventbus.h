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

#include "fmgr.h"

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "nodes/pg_list.h"
#include "storage/latch.h"
#include "utils/hsearch.h"
#include "utils/elog.h"

#include <signal.h>

#define EB_TRANSPORT_KAFKA	0
#define EB_TRANSPORT_NATS	1
#define EB_NTRANSPORTS		2

#include "shmem.h"

#define EB_MAX_AGGREGATE_ID 256
#define EB_MAX_TOPIC		249

/*
 * Limits of an inbound message (decode.c), far above what a real producer
 * sends: JSON nesting (PostgreSQL's JSON parser recurses per level), and
 * header count and sizes (the headers travel to the pool in the work item
 * and into the envelope's headers jsonb).
 */
#define EB_MAX_JSON_DEPTH	256
#define EB_MAX_HEADERS		1000
#define EB_MAX_HEADER_NAME	256
#define EB_MAX_HEADER_VALUE 32768
#define EB_MAX_HEADER_BYTES (1024 * 1024)

/*
 * User headers eventbus_publish accepts (eventbus adds up to 8 of its own).
 * Kept well inside what the consuming side takes, so a published event is
 * never quarantined for its headers.
 */
#define EB_MAX_USER_HEADERS		64
#define EB_MAX_USER_HEADER_VALUE	1024
#define EB_MAX_USER_HEADER_BYTES	16384

/* Message size limits when nothing better is known (Kafka producer / NATS server). */
#define EB_KAFKA_DEFAULT_MAX_MESSAGE	1000000
#define EB_NATS_DEFAULT_MAX_PAYLOAD		(1024 * 1024)

/* eventbus.c */
extern bool eb_preloaded;
extern void eb_require_preload(void);
extern MemoryContext eb_xact_begin(void);
extern void eb_xact_end(MemoryContext cxt);
struct _SPI_plan;
extern struct _SPI_plan *eb_keep_plan(struct _SPI_plan **plan, const char *sql, int nargs, Oid *argtypes);
extern void eb_worker_connect(const char *appname);
extern bool eb_worker_loop_top(MemoryContext loop_cxt);
struct BackgroundWorker;
extern void eb_bgworker_init(struct BackgroundWorker *w, const char *function,
							 const char *name, const char *type);
extern void eb_wake_relay(void);
extern void eb_wake_dispatcher(void);
extern void eb_wake_at_commit(int relay_transport, bool dispatcher);

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
extern int	eb_inbox_retention_min;
extern int	eb_handler_timeout_ms;
extern int	eb_dispatcher_memory_kb;
extern void eb_define_gucs(void);
extern bool eb_kafka_properties_parse(const char *spec, List **names, List **values, char **err);
extern bool eb_kafka_property_mandatory(const char *name);
extern char *eb_mask_credentials(const char *s);
extern void eb_install_log_redaction(void);
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
extern int	eb_transport_arg(FunctionCallInfo fcinfo, int argno);
extern void eb_require_transport_configured(int transport);
extern char *eb_headers_json(int n, char **names, char **values);
extern void eb_validate_topic(const char *topic);
extern void eb_validate_topic_for_transport(const char *topic, int transport);
extern int64 eb_transport_max_message(int transport, const char **limit_name);
extern Size eb_event_wire_size(const EbEvent *ev, int transport, Size envelope_len);
extern void eb_validate_aggregate_id(const char *aggregate_id);
extern void eb_uuidv7(unsigned char out[16]);
extern void eb_format_timestamp(TimestampTz ts, char *buf, size_t len);
extern void eb_envelope_encode(StringInfo buf, const EbEvent *ev);
extern const char *eb_aggregate_id_problem(const char *id, size_t len);

/* Callback that receives each header of an event (name, value). */
typedef void (*EbHeaderFn) (void *arg, const char *name, const char *value);
extern void eb_event_headers(const EbEvent *ev, EbHeaderFn fn, void *arg);

/* decode.c: inbound messages; never throws (NULL or the quarantine reason) */
extern const char *eb_envelope_decode(const char *data, size_t len,
									  const char *key, size_t keylen,
									  int nheaders, char **header_names,
									  char **header_values, EbEvent *ev);
extern char *eb_inbound_headers_json(int n, char **names, char **values);

/* inbound_text.c: checks of inbound text before PostgreSQL's parsers see it */
typedef struct EbJsonScan
{
	int64		tokens;			/* containers, strings, numbers, literals */
	int64		number_growth;	/* bytes numbers gain when numeric writes them */
	const char *number_problem; /* the first number numeric cannot hold */
} EbJsonScan;

extern char *eb_printable(const char *s, size_t len, size_t max);
extern bool eb_needs_conversion(void);
extern Oid	eb_utf8_to_server_proc(void);
extern bool eb_utf8_to_server(const char *s, size_t len, char **out, size_t *outlen);
extern char *eb_unescape_non_ascii(const char *s, size_t len, size_t *outlen);
extern const char *eb_json_prescan(const char *s, size_t len, EbJsonScan *scan);
extern bool eb_parse_rfc3339(const char *s, int len, TimestampTz *out);

/* launcher.c */
extern PGDLLEXPORT void eventbus_launcher_main(Datum main_arg);

/* wakeup.c */
extern void eb_wakeup_init(void);
extern WaitEventSet *eb_wakeup_wait_set(void);
extern int	eb_wakeup_fd(void);
extern void eb_wakeup_drain(void);
extern void eb_wakeup_signal(void);
extern int	eb_wakeup_write_fd(void);

/* bounded.c: a library teardown call on a helper thread, with a deadline */
extern bool eb_run_bounded(void (*fn) (void *), void *arg, int timeout_ms);

/* relay.c */
extern void relay_init(void);
extern void relay_shutdown(void);
extern long relay_step(void);

/* Outcome of one delivery attempt. */
typedef enum EbDelivery
{
	EB_DELIVERED = 0,
	EB_FAILED_TRANSIENT,		/* retry with backoff */
	EB_FAILED_PERMANENT			/* can never succeed as is: move aside */
} EbDelivery;

/* Completion of one in-flight slot; main thread only. */
extern void eb_relay_ack(int transport, int slot, EbDelivery result, const char *err);

/* relay_keys.c: the relay's per-(topic, aggregate) bookkeeping */
extern HTAB *eb_backoff_create(void);
extern void eb_backoff_clear(HTAB *backoff);
extern void eb_backoff_arrays(HTAB *backoff, Datum *topics, Datum *aggregates,
							  TimestampTz *earliest);
extern void eb_backoff_fail(HTAB *backoff, const EbEvent *ev);
extern void eb_backoff_forget(HTAB *backoff, const EbEvent *ev);
extern HTAB *eb_key_set(MemoryContext cxt);
extern bool eb_key_in_set(HTAB *set, const EbEvent *ev, bool add);
extern int	eb_distinct_aggregates(EbEvent *events, int n, MemoryContext cxt);

/* undeliverable.c: rows moved aside by the relay, and back */
extern void eb_undeliverable_move_failed(Datum ids, Datum errors);
extern int	eb_undeliverable_move_held(int transport, int n, Datum *ids);
extern bool eb_undeliverable_any(int transport);
extern uint64 eb_undeliverable_release(int transport);

/*
 * Producers used by the relay.  Library threads never call PostgreSQL: they
 * only write to the wakeup pipe; results are handed over on the main thread.
 */

/* kafka.c: the process's librdkafka client (launcher: producer; dispatcher: consumer) */
#include <librdkafka/rdkafka.h>
extern rd_kafka_t *eb_kafka;
extern bool kafka_client_start(rd_kafka_type_t type, rd_kafka_conf_t *conf);
extern void kafka_client_stop(void);
extern bool kafka_connected(void);
extern bool kafka_fatal(void);
extern void kafka_mark_down(const char *reason);
extern void kafka_mark_connected(void);
extern void kafka_probe(void);
extern void kafka_producer_poll(void);
extern bool kafka_producer_start(void);
extern void kafka_begin_round(void);
extern bool kafka_produce(const EbEvent *ev, const char *value, size_t len,
						  int slot, char **errmsg, bool *permanent);
extern bool kafka_error_permanent(rd_kafka_resp_err_t err);

/* nats.c: the process's NATS connection and JetStream context */
#include <nats/nats.h>
extern natsConnection *eb_nats_conn;
extern jsCtx *eb_js;
extern bool nats_client_start(const char *name);
extern void nats_client_stop(void);
extern bool nats_connected(void);
extern void nats_poll_state(void);
extern bool nats_ensure_stream(const char *topic, char **errmsg);
extern void nats_block_signals(sigset_t *old);
extern void nats_restore_signals(const sigset_t *old);
extern void nats_library_close(void);
extern uint64 nats_reconnects(void);
extern void nats_producer_poll(void);
extern void nats_publish_begin(const EbEvent *events, int n);
extern bool nats_publish(const EbEvent *ev, const char *value, size_t len,
						 int slot, char **errmsg, bool *permanent);
extern void nats_publish_abandon(void);
extern bool nats_error_permanent(natsStatus s, int jerr);

/* workitem.c: what the dispatcher sends a pool worker, and back */
typedef struct EbWorkItem
{
	uint64		tag;			/* dispatcher's delivery tag */
	int64		subscription_id;
	Oid			handler;
	Oid			role;
	int32		max_attempts;
	int32		transport;
	EbEvent		ev;
} EbWorkItem;

typedef enum EbOutcome
{
	EB_OUTCOME_HANDLED = 0,
	EB_OUTCOME_DUPLICATE,		/* already in the inbox: skipped */
	EB_OUTCOME_DEAD_LETTERED,
	EB_OUTCOME_OWNER_DROPPED	/* subscribing role gone: not run */
} EbOutcome;

typedef struct EbCompletion
{
	uint64		tag;
	int32		outcome;
} EbCompletion;

extern void eb_workitem_encode(StringInfo buf, const EbWorkItem *item);
extern void eb_workitem_decode(const char *data, Size len, EbWorkItem *item);

/* handler.c: run one handler invocation; EbOutcome, or -1 with *error set */
extern int	eb_handler_run(const EbWorkItem *item, ErrorData **error);
extern Datum eb_make_envelope(const EbWorkItem *item);
extern bool eb_handler_call(Oid handler, Oid role, Datum envelope, ErrorData **error);
extern void eb_dead_letter(const EbWorkItem *item, const ErrorData *error, int attempts);
extern Oid	eb_envelope_type(void);

/* privilege.c: the user and settings statements and handlers run with */
typedef struct EbSecContext
{
	Oid			save_uid;
	int			save_sec;
	int			nestlevel;
} EbSecContext;

extern void eb_capture_config_search_path(void);
extern void eb_pin_worker_search_path(void);
extern Oid	eb_extension_owner(void);
extern void eb_as_owner_begin(EbSecContext *ctx);
extern void eb_as_owner_end(EbSecContext *ctx);
extern uint64 eb_exec_as_owner(const char *sql, int nargs, Oid *types, Datum *values,
							   const char *nulls, int expected);
extern bool eb_may_act_for(Oid role);
extern void eb_require_owner(Oid role, const char *action, int64 subscription_id);
extern void eb_handler_context_begin(EbSecContext *ctx, Oid role);
extern void eb_handler_context_end(EbSecContext *ctx);
extern void eb_constraints_immediate(void);

/* ddl_guard.c */
extern void eb_install_ddl_guard(void);

/* subscription.c */
extern bool eb_handler_signature_ok(Oid handler);

/* A message received by a consumer, handed to the dispatcher. */
typedef struct EbInbound
{
	int			transport;
	const char *topic;
	const char *data;
	size_t		len;
	const char *key;			/* Kafka key or NULL */
	size_t		keylen;
	int32		partition;		/* Kafka */
	int64		offset;			/* Kafka */
	uint64		stream_seq;		/* JetStream */
	int			nheaders;
	char	  **header_names;
	char	  **header_values;
	void	   *token;			/* the consumer's handle: passed back when done */
} EbInbound;

/* dispatcher.c: take one inbound message; string list membership */
extern bool eb_string_member(List *list, const char *s);
extern void dispatch_message(EbInbound *in);

/* kafka_consumer.c */
extern bool kafka_consumer_start(void);
extern void kafka_consumer_set_topics(List *topics);
extern int	kafka_consumer_poll(int max, int64 max_bytes);
extern void kafka_consumer_done(void *token);
extern void kafka_consumer_pause(bool pause);
extern int64 kafka_consumer_lag(const char *topic);

/* nats_consumer.c */
extern void nats_consumer_set_topics(List *topics);
extern int	nats_consumer_poll(int max, int64 max_bytes);
extern void nats_consumer_done(void *token);
extern int64 nats_consumer_lag(const char *topic);
extern void nats_consumer_forget(void);

/* DSM layout shared by dispatcher.c and pool.c: per worker an inbound
 * (dispatcher -> worker) and an outbound (completions) queue. */
#define EB_SHM_MAGIC		0x45564255	/* "EVBU" */
#define EB_IN_QUEUE_SIZE	(1024 * 1024)
#define EB_OUT_QUEUE_SIZE	(64 * 1024)
#define EB_TOC_IN(i)		((uint64) (i) * 2)
#define EB_TOC_OUT(i)		((uint64) (i) * 2 + 1)

/* scheduler.c: key-level scheduling of work items onto pool workers */
typedef void (*EbSchedSend) (int worker, uint64 tag, StringInfo buf);
extern void eb_sched_init(int nworkers);
extern void eb_sched_submit(int64 subscription_id, const char *aggregate_id, uint64 tag,
							StringInfo buf);
extern void eb_sched_dispatch(EbSchedSend send);
extern void eb_sched_worker_ready(int worker);
extern void eb_sched_complete(uint64 tag);
extern int64 eb_sched_pending_items(void);
extern int64 eb_sched_pending_bytes(void);

/*
 * A one-byte message ends each batch the dispatcher gives a worker; after
 * running it the worker sends a completion with the READY tag.
 */
#define EB_BATCH_END		'E'
#define EB_TAG_READY		0

/* dispatcher.c / pool.c */
extern PGDLLEXPORT void eventbus_dispatcher_main(Datum main_arg);
extern PGDLLEXPORT void eventbus_worker_main(Datum main_arg);

#endif							/* EVENTBUS_H */

/*
 * nats_client.h — the NATS JetStream transport's own declarations, shared
 * by nats.c (connection, publish-time checks, the routine),
 * nats_producer.c (the relay's streams and publishing), nats_api.c
 * (JetStream API requests off the main thread),
 * nats_consumer.c (the dispatcher's consumers) and nats_inbox.c (where
 * their messages arrive).  Only these files include cnats.
 */
#ifndef EB_NATS_CLIENT_H
#define EB_NATS_CLIENT_H

#include <signal.h>

#include <nats/nats.h>

#include "envelope.h"
#include "transport.h"

/* Message size limit when the server's max_payload is not known yet. */
#define EB_NATS_DEFAULT_MAX_PAYLOAD		(1024 * 1024)

/* The process's NATS connection and JetStream context. */
extern natsConnection *eb_nats_conn;
extern jsCtx *eb_js;

/* nats.c */
extern bool eb_nats_client_start(const char *name, bool consumer);
extern void eb_nats_client_stop(void);
extern bool eb_nats_connected(void);
extern void eb_nats_poll_state(void);
extern void eb_nats_block_signals(sigset_t *old);
extern void eb_nats_restore_signals(const sigset_t *old);
extern uint64 eb_nats_reconnects(void);

/* nats_producer.c: the relay's publishing */
extern void eb_nats_ack_cb(jsCtx *ctx, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure);
extern void eb_nats_producer_forget(void);
extern bool eb_nats_ensure_stream(const char *topic, char **errmsg);
extern bool eb_nats_producer_start(EbAckFn ack);
extern void eb_nats_producer_stop(void);
extern bool eb_nats_producer_poll(void);
extern void eb_nats_producer_drain(int timeout_ms);
extern void eb_nats_round_begin(const EbEvent *events, int n);
extern bool eb_nats_produce(const EbEvent *ev, const char *value, size_t len, int slot,
							char **errmsg, bool *permanent);
extern void eb_nats_round_abandon(void);
extern void eb_nats_wave_sent(int round_n);

/*
 * Single mode's durables are AckNone: how far each one's messages are
 * finished is kept in this KeyValue bucket (key: the lease key of the
 * durable), see nats_consumer.c.
 */
#define EB_NATS_POSITIONS_BUCKET	"eventbus_positions"

/* Lease keys and what a read of one found (nats_lease.c). */
#define EB_NATS_LEASE_KEY			256 /* key length limit, with its NUL */
#define EB_NATS_LEASE_VALUE			128 /* a holder's name, with its NUL */

typedef enum EbNatsLeaseState
{
	EB_LEASE_UNKNOWN,			/* no answer */
	EB_LEASE_FREE,				/* never held, or released cleanly */
	EB_LEASE_MINE_BEFORE,		/* held by this instance (a dispatcher before) */
	EB_LEASE_OTHER				/* held by another instance */
} EbNatsLeaseState;

/*
 * nats_api.c: JetStream API requests (stream creation, durable binds, the
 * shared mode's lease requests) as jobs on a helper thread.  The main
 * thread fills in a job, starts it, and reads its outcome once
 * eb_nats_job_done says so.
 */
typedef enum EbNatsJobKind
{
	EB_NATS_JOB_STREAM,			/* make sure a stream captures the topic */
	EB_NATS_JOB_BIND,			/* that, and bind the durable pull consumer */
	EB_NATS_JOB_LEASE_OPEN,		/* open (create) the lease bucket */
	EB_NATS_JOB_LEASE_READ,		/* read a lease */
	EB_NATS_JOB_LEASE_WRITE,	/* write our name into it (compare-and-set) */
	EB_NATS_JOB_LEASE_RELEASE	/* flush (NAKs sent before), then mark it released */
} EbNatsJobKind;

typedef struct EbNatsJob
{
	/* in */
	EbNatsJobKind kind;
	char		topic[EB_MAX_TOPIC + 1];
	char	   *durable;		/* bind (malloc'd: a consumer group name has no length limit) */
	bool		takeover;		/* bind: restart an existing durable at its position + 1 */
	bool		ack_none;		/* bind: keep the position ourselves (out: if we can) */
	int64		ack_wait_ns;	/* bind: the new consumer's settings */
	int64		max_ack_pending;
	char		names_request[EB_MAX_TOPIC * 6 + 32];	/* bind: {"subject":...} */
	/* out, once done */
	bool		ok;
	bool		permanent;		/* retrying cannot help */
	char		error[512];
	char		stream[256];	/* bind: the stream capturing the topic */
	uint64		start;			/* bind: restarted at this stream sequence (0: not) */
	int64		unacked;		/* bind: messages unacknowledged before the restart */
	bool		no_positions;	/* bind: the positions bucket could not be opened */
	char		positions_cause[256];	/* why, without key names (said once per cause) */
	bool		replay_all;		/* bind: an AckNone durable without a kept position */
	/* lease jobs (nats_lease.c) */
	char		lease_key[EB_NATS_LEASE_KEY];
	char		lease_value[EB_NATS_LEASE_VALUE];	/* our name (write; read: whose) */
	uint64		lease_rev;		/* write, release: expected; read: out (0: no key) */
	uint64		lease_newrev;	/* write: out, 0 if refused or no answer */
	EbNatsLeaseState lease_state;	/* read: out */
	kvStore    *kv;				/* the bucket (open: out, until taken) */
	jsCtx	   *lease_js;		/* open: out, until taken */
	/* the helper's */
	natsConnection *nc;
	jsCtx	   *js;
	struct EbCall *call;		/* bounded.c: where it runs */
} EbNatsJob;

extern bool eb_nats_error_permanent(natsStatus s, int jerr);
extern EbNatsJob *eb_nats_job_new(EbNatsJobKind kind, const char *topic);
extern bool eb_nats_job_start(EbNatsJob *j);
extern bool eb_nats_job_done(EbNatsJob *j);
extern bool eb_nats_job_wait(EbNatsJob *j, int timeout_ms);
extern void eb_nats_job_free(EbNatsJob *j);
extern bool eb_nats_jobs_wait(int timeout_ms);
extern natsStatus eb_nats_kv_open(jsCtx *js, const char *bucket, const char *description,
								  kvStore **kv);

/*
 * nats_inbox.c: where pull requests are answered.  A feed is one consumer's
 * queue of arrived messages and its requests in flight.
 */
#define EB_NATS_FEED_REQUESTS		2	/* requests in flight per feed, at most */
#define EB_NATS_REQUEST_GRACE_MS	2000	/* after expiry, before forgetting one */
#define EB_NATS_STATUS_DESC			64	/* status descriptions kept, bytes */

typedef struct EbNatsFeed EbNatsFeed;

/* What a feed holds and may still receive (eb_nats_feed_state). */
typedef struct EbNatsFeedState
{
	int			open;			/* requests in flight */
	int			credit_msgs;	/* messages they may still bring */
	int64		credit_bytes;	/* bytes they may still bring */
	int			queued;			/* arrived, not taken yet */
	int64		queued_bytes;
	bool		too_big;		/* a request got nothing: the next message exceeds its max_bytes */
	bool		broken;			/* a message was lost in the client: rebind */
	bool		gone;			/* the consumer no longer exists: rebind */
	int			error_status;	/* a request ended with this unexpected status */
	char		error_desc[EB_NATS_STATUS_DESC];
} EbNatsFeedState;

extern EbNatsFeed *eb_nats_feed_create(const char *topic);
extern void eb_nats_feed_destroy(EbNatsFeed *f);
extern bool eb_nats_feed_request(EbNatsFeed *f, const char *next_subject, int batch,
								 int64 max_bytes, int expires_ms);
extern void eb_nats_feed_state(EbNatsFeed *f, EbNatsFeedState *st);
extern bool eb_nats_feed_broken(EbNatsFeed *f);
extern int	eb_nats_feed_take(EbNatsFeed *f, natsMsg **msgs, int64 *sizes, int max, int64 max_bytes);

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
extern bool eb_nats_consumer_live(void *token);
extern void eb_nats_consumer_abandon(void *token);
extern int	eb_nats_consumer_share(const char *topic);

/* nats_lease.c: one instance at a time consumes a shared durable */
extern bool eb_nats_lease_open(void);
extern bool eb_nats_lease_opening(void);
extern void eb_nats_lease_close(void);
extern bool eb_nats_lease_ready(void);
extern void eb_nats_lease_key(const char *durable, char *key);
extern bool eb_nats_lease_changes(void (*fn) (const char *key, bool is_free, void *arg), void *arg);
extern EbNatsJob *eb_nats_lease_start(EbNatsJobKind kind, const char *key, uint64 rev);
extern void eb_nats_lease_job_run(EbNatsJob *j);
extern void eb_nats_lease_job_destroy(EbNatsJob *j);

#endif							/* EB_NATS_CLIENT_H */

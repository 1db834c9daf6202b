/*
 * nats_consumer.h — what nats_consumer.c (the JetStream consumers) shares
 * with nats_shared.c (their shared mode): the subscription records.  Only
 * these two files include it.
 */
#ifndef EB_NATS_CONSUMER_H
#define EB_NATS_CONSUMER_H

#include "lib/ilist.h"
#include "utils/timestamp.h"

#include "nats_client.h"

#define TAKE_CHUNK		64		/* messages taken from a feed at a time */

/*
 * Shared mode (eventbus.consumer_mode = shared, see nats_shared.c).  Pull
 * requests expire sooner, so that a release waits at most that long for
 * the server to end them (nothing can be delivered to us after that).
 */
#define SHARED_EXPIRES_MS	1500
#define LEASE_TTL_MS		10000	/* a lease unchanged this long is stale */
#define LEASE_REFRESH_MS	(LEASE_TTL_MS / 3)
#define LEASE_FENCE_MS		(LEASE_TTL_MS / 2)	/* stop handing out after this */
#define LEASE_RETRY_MS		1000	/* after no answer */
#define LEASE_SPREAD_MS		300 /* per lease held, before taking a free one */
#define RELEASE_WAIT_MS		5000	/* for running handlers, at a release */
#define STOP_WAIT_MS		(SHARED_EXPIRES_MS + 500)	/* for requests, at exit */

typedef enum SubState
{
	SUB_HELD,					/* ours: bound and fetching (single: always) */
	SUB_STANDBY,				/* another instance's, or not taken yet */
	SUB_RELEASING				/* giving it back: waiting for what is out */
} SubState;

typedef struct NatsSub
{
	char	   *topic;
	char	   *durable;
	char	   *next_subject;	/* where its pull requests go */
	EbNatsFeed *feed;			/* NULL: not bound */
	EbNatsJob  *bind_job;		/* a bind in flight (nats_api.c), or NULL */
	int64		pending;		/* messages waiting in the stream (last known) */
	int64		held;			/* delivered messages not yet finished */
	int64		largest;		/* largest message seen (server's count) */
	int64		last_grant;		/* max_bytes of its last request */
	int			asked;			/* messages its last request asked for */
	int			got;			/* of those, taken since */
	int64		need;			/* a request got nothing: ask for this much */
	int			last_status;	/* last unexpected status logged */
	TimestampTz retry_at;		/* no request before (after a status) */
	bool		released;		/* no longer in subs: never ack for it */
	dlist_head	out;			/* NatsHeld delivered, not finished (delivery order) */

	/* single mode: an AckNone durable whose position we keep */
	bool		ack_none;
	uint64		last_seq;		/* stream sequence of the last message delivered */
	uint64		kept;			/* position last written to the bucket */
	bool		stuck;			/* a message was abandoned: position stays */
	TimestampTz keep_at;		/* write it no sooner than this */

	/* shared mode */
	SubState	state;
	char		lease_key[EB_NATS_LEASE_KEY];
	uint64		lease_rev;		/* HELD: our last write */
	bool		takeover;		/* HELD, not bound yet: bind at the ack floor */
	TimestampTz refresh_at;		/* HELD: next refresh */
	TimestampTz refreshed;		/* HELD: when the last good refresh was sent */
	TimestampTz check_at;		/* STANDBY: next look at the lease; HELD: bind retry */
	TimestampTz free_since;		/* STANDBY: first seen free */
	uint64		seen_rev;		/* STANDBY: holder's revision, first seen at */
	TimestampTz seen_at;
	int			open_requests;	/* pull requests open at the last poll */
	TimestampTz release_by;		/* RELEASING: deadline */
	List	   *naks;			/* RELEASING: NatsNak * to give back */
	EbNatsJob  *lease_job;		/* a lease request in flight (nats_shared.c), or NULL */
	int			lease_step;		/* what it is for (nats_shared.c's LeaseStep) */
	TimestampTz lease_sent;		/* when it was sent */
	bool		acquire_takeover;	/* STANDBY, taking the lease: bind at the ack floor */
	const char *acquire_how;	/* and why it may be taken (for the log) */
	bool		given_back;		/* RELEASING: its messages were NAKed: no ack, no NAK */
	int			naks_sent;		/* how many */
	int			still_out;		/* of which were out unfinished */
} NatsSub;

/* The dispatcher's handle on one delivered message: what acks it. */
typedef struct NatsHeld
{
	NatsSub    *ns;
	dlist_node	node;			/* in ns->out */
	uint64		seq;			/* stream sequence, 0 if unknown */
	char		reply[FLEXIBLE_ARRAY_MEMBER];	/* the ack subject */
} NatsHeld;

/* A message to give back (NAK) at a release, in stream order. */
typedef struct NatsNak
{
	uint64		seq;
	char	   *reply;
} NatsNak;

extern List *eb_nats_subs;		/* NatsSub *, bound or to be bound */
extern bool eb_nats_shared_mode;	/* eventbus.consumer_mode = shared */

/* nats_consumer.c */
extern NatsSub *eb_nats_new_sub(const char *topic, SubState state);
extern void eb_nats_bind_sub(NatsSub *ns, bool takeover);
extern void eb_nats_release_sub(NatsSub *ns);
extern void eb_nats_free_sub(NatsSub *ns);

/* nats_shared.c */
extern void eb_nats_shared_set_topics(List *want);
extern void eb_nats_shared_tick(void);
extern void eb_nats_shared_stop(void);

#endif							/* EB_NATS_CONSUMER_H */

/*
 * nats_inbox.c — where the dispatcher's JetStream messages arrive.  Each
 * consumer has a feed: a cnats subscription on an inbox of its own, which
 * receives the answers to the consumer's pull requests as the server sends
 * them (on a cnats thread), and a queue of arrived messages that the main
 * thread takes; the callback wakes it through the wakeup pipe.
 *
 * A pull request's reply subject is <feed inbox>.<request id>: a status
 * (404 no messages, 408 expired, 409 ...) arrives on it and names the
 * request it ends.  Messages arrive with their stream subject, on the
 * feed's subscription; the server fills one consumer's requests in the
 * order they came, so a message is counted against the oldest open one.
 * Every message of a live feed is queued, whatever request it answers: the
 * server sends one consumer's messages in stream order, and dropping one
 * would let later ones overtake it.  A feed that was destroyed
 * (unsubscribed, rebound) is out of the registry and its subscription gone:
 * a late message is dropped unacknowledged, and the recreated consumer
 * delivers it again.
 *
 * The callback runs on a cnats thread: plain C only (no PostgreSQL call),
 * everything it shares under inbox_mutex, feeds and queue nodes malloc'd,
 * and its closure a feed id, never a pointer.  The main thread owns the
 * rest: it sends the requests with the credit it can afford and reads back
 * how much of each is left.
 */
#include "postgres.h"

#include <pthread.h>
#include <time.h>

#include "eventbus.h"
#include "nats_client.h"

/*
 * A request with less than this left is used up: no JetStream message is
 * that small (its ack subject alone is longer), and the server ends a
 * request silently when its bytes are used up exactly.
 */
#define MIN_MESSAGE		64

/* A pull request in flight, as far as the client can tell. */
typedef struct InboxRequest
{
	uint64		id;				/* 0: slot free */
	int			msgs_left;
	int64		bytes_left;		/* counted as the server counts */
	bool		bytes_limited;	/* false: one message of any size */
	int			received;
	int			status;			/* the status that ended it, 0 while open */
	bool		too_big;		/* 409: the next message exceeds what is left */
	bool		gone;			/* the consumer no longer exists */
	char		desc[EB_NATS_STATUS_DESC];	/* the status's description */
	int64		deadline_ms;	/* forget it after this (a lost status) */
} InboxRequest;

/* One queued message. */
typedef struct InboxNode
{
	natsMsg    *msg;
	int64		size;
	struct InboxNode *next;
} InboxNode;

struct EbNatsFeed
{
	uint64		id;				/* immutable while registered */
	char		inbox[96];		/* immutable while registered */
	int			topic_len;		/* the stream subject's, counted by the server */
	natsSubscription *sub;		/* main thread only */
	struct EbNatsFeed *next;	/* registry */
	InboxNode  *head;
	InboxNode  *tail;
	int			queued;
	int64		queued_bytes;
	bool		broken;			/* a message could not be queued */
	InboxRequest req[EB_NATS_FEED_REQUESTS];
};

/* The registry, queues and requests, shared with cnats threads. */
static pthread_mutex_t inbox_mutex = PTHREAD_MUTEX_INITIALIZER;
static EbNatsFeed *feeds = NULL;
static uint64 next_id = 1;

/* Milliseconds of a monotonic clock. */
static int64
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/*
 * Size of a message as nats-server counts it against a request's max_bytes:
 * stream subject + ack subject + header block + body.  The header block
 * ("NATS/1.0\r\n", "Name: value\r\n" each, "\r\n") is rebuilt from the
 * parsed headers.  Plain C: runs on the cnats thread.
 */
static int64
message_size(natsMsg *msg, int topic_len)
{
	const char *reply = natsMsg_GetReply(msg);
	const char **keys = NULL;
	int			nkeys = 0;
	int64		size = topic_len + natsMsg_GetDataLength(msg) + (reply ? strlen(reply) : 0);

	if (natsMsgHeader_Keys(msg, &keys, &nkeys) == NATS_OK && nkeys > 0)
	{
		size += 12;
		for (int i = 0; i < nkeys; i++)
		{
			const char **values = NULL;
			int			nvalues = 0;

			if (natsMsgHeader_Values(msg, keys[i], &values, &nvalues) != NATS_OK)
				continue;
			for (int j = 0; j < nvalues; j++)
				size += strlen(keys[i]) + 4 + strlen(values[j]);
			free((void *) values);
		}
		free((void *) keys);
	}
	return size;
}

/* Under inbox_mutex: the live feed of that id, or NULL. */
static EbNatsFeed *
find_feed(uint64 id)
{
	for (EbNatsFeed *f = feeds; f; f = f->next)
		if (f->id == id)
			return f;
	return NULL;
}

/* Under inbox_mutex: the request a status names by its reply subject. */
static InboxRequest *
status_request(EbNatsFeed *f, const char *subject)
{
	size_t		len = strlen(f->inbox);
	char	   *end;
	uint64		id;

	if (subject == NULL || strncmp(subject, f->inbox, len) != 0 || subject[len] != '.')
		return NULL;
	id = strtoull(subject + len + 1, &end, 10);
	if (id == 0 || *end != '\0')
		return NULL;
	for (int i = 0; i < EB_NATS_FEED_REQUESTS; i++)
		if (f->req[i].id == id)
			return &f->req[i];
	return NULL;
}

/* Under inbox_mutex: the request a message answers, the oldest open one. */
static InboxRequest *
oldest_open(EbNatsFeed *f)
{
	InboxRequest *best = NULL;

	for (int i = 0; i < EB_NATS_FEED_REQUESTS; i++)
	{
		InboxRequest *r = &f->req[i];

		if (r->id != 0 && r->status == 0 && r->msgs_left > 0 &&
			(!r->bytes_limited || r->bytes_left >= MIN_MESSAGE) &&
			(best == NULL || r->id < best->id))
			best = r;
	}
	return best;
}

/*
 * cnats thread: an answer to one of a feed's pull requests (closure: the
 * feed's id).  Queue a message, or record the status that ended a request;
 * wake the main thread when there is something new for it.
 */
static void
inbox_cb(natsConnection *nc, natsSubscription *sub, natsMsg *msg, void *closure)
{
	uint64		feed_id = (uint64) (uintptr_t) closure;
	const char *status = NULL;
	const char *desc = NULL;
	bool		wake = false;
	EbNatsFeed *f;

	/* A status is a message without a body whose header line has a code. */
	if (natsMsg_GetDataLength(msg) == 0 &&
		natsMsgHeader_Get(msg, "Status", &status) == NATS_OK && status != NULL)
		(void) natsMsgHeader_Get(msg, "Description", &desc);
	else
		status = NULL;

	pthread_mutex_lock(&inbox_mutex);
	f = find_feed(feed_id);
	if (f != NULL && status != NULL)
	{
		InboxRequest *r = status_request(f, natsMsg_GetSubject(msg));
		int			code = atoi(status);

		/* 100 is an idle heartbeat; anything else ends the request. */
		if (code != 100 && r != NULL && r->status == 0)
		{
			r->status = code;
			snprintf(r->desc, sizeof(r->desc), "%s", desc ? desc : "");
			r->too_big = code == 409 && desc != NULL && strstr(desc, "MaxBytes") != NULL;
			/* No responders, or deleted under us: bind it again. */
			r->gone = code == 503 || (code == 409 && desc != NULL && strstr(desc, "Deleted") != NULL);
			wake = true;
		}
	}
	else if (f != NULL)
	{
		InboxRequest *r = oldest_open(f);
		InboxNode  *node = malloc(sizeof(InboxNode));
		int64		size = message_size(msg, f->topic_len);

		if (node == NULL)
		{
			f->broken = true;	/* the main thread rebinds the consumer */
			wake = true;
		}
		else
		{
			node->msg = msg;
			node->size = size;
			node->next = NULL;
			if (f->tail)
				f->tail->next = node;
			else
				f->head = node;
			f->tail = node;
			wake = f->queued == 0;
			f->queued++;
			f->queued_bytes += size;
			msg = NULL;
		}
		if (r != NULL)
		{
			r->received++;
			r->msgs_left--;
			r->bytes_left -= size;
		}
	}
	pthread_mutex_unlock(&inbox_mutex);

	if (msg != NULL)
		natsMsg_Destroy(msg);
	if (wake)
		eb_wakeup_signal();
}

/*
 * Register a feed for the consumer of a subject and subscribe to its inbox;
 * NULL if cnats refused.  Pending limits are off: what can arrive is bounded
 * by the credit the main thread grants, and a message dropped as a slow
 * consumer's would break the stream order.
 */
EbNatsFeed *
eb_nats_feed_create(const char *topic)
{
	EbNatsFeed *f;
	natsInbox  *inbox = NULL;
	natsStatus	s;
	sigset_t	old;
	char		subject[sizeof(f->inbox) + 2];

	if (eb_nats_conn == NULL || (f = calloc(1, sizeof(EbNatsFeed))) == NULL)
		return NULL;
	f->topic_len = (int) strlen(topic);
	eb_nats_block_signals(&old);
	s = natsInbox_Create(&inbox);
	if (s == NATS_OK)
	{
		strlcpy(f->inbox, inbox, sizeof(f->inbox));
		natsInbox_Destroy(inbox);
		snprintf(subject, sizeof(subject), "%s.*", f->inbox);

		/* In the registry before anything can arrive. */
		pthread_mutex_lock(&inbox_mutex);
		f->id = next_id++;
		f->next = feeds;
		feeds = f;
		pthread_mutex_unlock(&inbox_mutex);

		s = natsConnection_Subscribe(&f->sub, eb_nats_conn, subject, inbox_cb,
									 (void *) (uintptr_t) f->id);
		if (s == NATS_OK)
			s = natsSubscription_SetPendingLimits(f->sub, -1, -1);
	}
	eb_nats_restore_signals(&old);
	if (s != NATS_OK)
	{
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not subscribe to a JetStream delivery inbox: %s", natsStatus_GetText(s))));
		eb_nats_feed_destroy(f);
		return NULL;
	}
	return f;
}

/*
 * Unsubscribe and unregister a feed, and destroy what it had queued (never
 * acknowledged).  A callback still running for it finds no feed.
 */
void
eb_nats_feed_destroy(EbNatsFeed *f)
{
	InboxNode  *node;

	pthread_mutex_lock(&inbox_mutex);
	for (EbNatsFeed **p = &feeds; *p; p = &(*p)->next)
	{
		if (*p == f)
		{
			*p = f->next;
			break;
		}
	}
	pthread_mutex_unlock(&inbox_mutex);

	if (f->sub != NULL)
	{
		sigset_t	old;

		eb_nats_block_signals(&old);
		natsSubscription_Destroy(f->sub);
		eb_nats_restore_signals(&old);
	}
	node = f->head;
	while (node)
	{
		InboxNode  *next = node->next;

		natsMsg_Destroy(node->msg);
		free(node);
		node = next;
	}
	free(f);
}

/*
 * Ask the server for up to batch messages and max_bytes (0: one message of
 * any size; batch must then be 1) on the consumer's next-message subject,
 * the request expiring after expires_ms.  False if no request slot is free
 * or the publish failed.
 */
bool
eb_nats_feed_request(EbNatsFeed *f, const char *next_subject, int batch,
					 int64 max_bytes, int expires_ms)
{
	InboxRequest *r = NULL;
	uint64		id = 0;
	char		reply[sizeof(f->inbox) + 24];
	char		body[160];
	int			len;
	natsStatus	s;
	sigset_t	old;

	if (eb_nats_conn == NULL)
		return false;
	/* Registered first: its answers may arrive before the publish returns. */
	pthread_mutex_lock(&inbox_mutex);
	for (int i = 0; i < EB_NATS_FEED_REQUESTS && r == NULL; i++)
		if (f->req[i].id == 0)
			r = &f->req[i];
	if (r != NULL)
	{
		memset(r, 0, sizeof(InboxRequest));
		r->id = id = next_id++;
		r->msgs_left = batch;
		r->bytes_left = max_bytes;
		r->bytes_limited = max_bytes > 0;
		r->deadline_ms = now_ms() + expires_ms + EB_NATS_REQUEST_GRACE_MS;
	}
	pthread_mutex_unlock(&inbox_mutex);
	if (r == NULL)
		return false;

	snprintf(reply, sizeof(reply), "%s." UINT64_FORMAT, f->inbox, id);
	if (max_bytes > 0)
		len = snprintf(body, sizeof(body), "{\"batch\":%d,\"max_bytes\":" INT64_FORMAT ",\"expires\":" INT64_FORMAT "}",
					   batch, max_bytes, (int64) expires_ms * 1000000);
	else
		len = snprintf(body, sizeof(body), "{\"batch\":%d,\"expires\":" INT64_FORMAT "}",
					   batch, (int64) expires_ms * 1000000);
	eb_nats_block_signals(&old);
	s = natsConnection_PublishRequest(eb_nats_conn, next_subject, reply, body, len);
	eb_nats_restore_signals(&old);
	if (s != NATS_OK)
	{
		pthread_mutex_lock(&inbox_mutex);
		r->id = 0;
		pthread_mutex_unlock(&inbox_mutex);
		return false;
	}
	return true;
}

/*
 * The feed's state for the main thread: forget requests that ended (a
 * status, their batch or bytes used up, or past their deadline), and
 * report what the open ones may still bring and what is queued.
 */
void
eb_nats_feed_state(EbNatsFeed *f, EbNatsFeedState *st)
{
	int64		now = now_ms();

	memset(st, 0, sizeof(EbNatsFeedState));
	pthread_mutex_lock(&inbox_mutex);
	for (int i = 0; i < EB_NATS_FEED_REQUESTS; i++)
	{
		InboxRequest *r = &f->req[i];

		if (r->id == 0)
			continue;
		if (r->status != 0 || r->msgs_left <= 0 ||
			(r->bytes_limited && r->bytes_left < MIN_MESSAGE) || now >= r->deadline_ms)
		{
			if (r->too_big && r->received == 0)
				st->too_big = true;
			if (r->gone)
				st->gone = true;
			else if (r->status != 0 && r->status != 404 && r->status != 408 && !r->too_big)
			{
				st->error_status = r->status;
				memcpy(st->error_desc, r->desc, sizeof(st->error_desc));
			}
			r->id = 0;
			continue;
		}
		st->open++;
		st->credit_msgs += r->msgs_left;
		st->credit_bytes += r->bytes_limited ? r->bytes_left : 0;
	}
	st->queued = f->queued;
	st->queued_bytes = f->queued_bytes;
	st->broken = f->broken;
	pthread_mutex_unlock(&inbox_mutex);
}

/* Did the feed lose a message in the client? */
bool
eb_nats_feed_broken(EbNatsFeed *f)
{
	bool		broken;

	pthread_mutex_lock(&inbox_mutex);
	broken = f->broken;
	pthread_mutex_unlock(&inbox_mutex);
	return broken;
}

/*
 * Take up to max queued messages, the first one whatever its size and the
 * others while fewer than max_bytes were taken; the caller owns them.
 * Returns how many were put in msgs[] (their sizes in sizes[]).
 */
int
eb_nats_feed_take(EbNatsFeed *f, natsMsg **msgs, int64 *sizes, int max, int64 max_bytes)
{
	int			n = 0;
	int64		taken = 0;
	InboxNode  *done = NULL;

	pthread_mutex_lock(&inbox_mutex);
	/* After a lost message, later ones must not overtake it: none. */
	while (!f->broken && f->head != NULL && n < max && taken < max_bytes)
	{
		InboxNode  *node = f->head;

		f->head = node->next;
		if (f->head == NULL)
			f->tail = NULL;
		f->queued--;
		f->queued_bytes -= node->size;
		msgs[n] = node->msg;
		sizes[n++] = node->size;
		taken += node->size;
		node->next = done;
		done = node;
	}
	pthread_mutex_unlock(&inbox_mutex);

	while (done)
	{
		InboxNode  *next = done->next;

		free(done);
		done = next;
	}
	return n;
}

/*
 * nats.c — the NATS JetStream transport: the process's NATS connection and
 * JetStream context (shared by the launcher's relay and the dispatcher's
 * consumers), its state and bounded teardown, the checks publishing
 * backends make, and the transport routine.  The relay's publishing is in
 * nats_producer.c, the consumer in nats_consumer.c.
 *
 * cnats runs its own threads.  They inherit PostgreSQL's signal handlers
 * unless created with every signal blocked, so each cnats call that may start
 * a thread runs inside eb_nats_block_signals()/eb_nats_restore_signals().
 * Callbacks on those threads touch only plain C state under pthread mutexes
 * and the wakeup pipe.
 */
#include "postgres.h"

#include <pthread.h>


#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "nats_client.h"
#include "transport.h"
#include "util.h"

natsConnection *eb_nats_conn = NULL;
jsCtx	   *eb_js = NULL;

static natsOptions *opts = NULL;
static bool library_opened = false;
static int	reconnect_attempts = 0;	/* written by cnats threads (atomic) */

/* Block every signal in this thread; threads created meanwhile inherit it. */
void
eb_nats_block_signals(sigset_t *old)
{
	sigset_t	all;

	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, old);
}

void
eb_nats_restore_signals(const sigset_t *old)
{
	pthread_sigmask(SIG_SETMASK, old, NULL);
}

/* cnats thread: connection events only wake the launcher. */
static void
conn_event_cb(natsConnection *nc, void *closure)
{
	eb_wakeup_signal();
}

/* cnats thread: exponential reconnect backoff, 100 ms doubling to 5 s. */
static int64_t
reconnect_delay_cb(natsConnection *nc, int attempts, void *closure)
{
	__atomic_store_n(&reconnect_attempts, attempts, __ATOMIC_RELAXED);
	return eb_backoff_delay(attempts, 100, 5000);
}

/* Record a cnats failure as the producer's state. */
static void
set_down(const char *what, natsStatus s)
{
	char		detail[EB_DETAIL_LEN];

	snprintf(detail, sizeof(detail), "%s: %s: %s", eb_nats_url, what,
			 nats_GetLastError(NULL) ? nats_GetLastError(NULL) : natsStatus_GetText(s));
	eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_DOWN, detail);
}

/*
 * Connect (or keep retrying in the background) to eventbus.nats_url.  A
 * consumer's subscriptions (one per subject) share cnats' delivery thread
 * pool instead of a thread each.
 */
bool
eb_nats_client_start(const char *name, bool consumer)
{
	natsStatus	s;
	jsOptions	jsopts;
	sigset_t	old;

	eb_nats_block_signals(&old);
	library_opened = true;
	s = natsOptions_Create(&opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(opts, eb_nats_url);
	if (s == NATS_OK)
		s = natsOptions_SetName(opts, name);
	if (s == NATS_OK && consumer)
		s = natsOptions_UseGlobalMessageDelivery(opts, true);
	if (s == NATS_OK)
		s = natsOptions_SetRetryOnFailedConnect(opts, true, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetMaxReconnect(opts, -1);
	if (s == NATS_OK)
		s = natsOptions_SetCustomReconnectDelay(opts, reconnect_delay_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(opts, 2000);
	if (s == NATS_OK)
		s = natsOptions_SetDisconnectedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetReconnectedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK)
		s = natsOptions_SetClosedCB(opts, conn_event_cb, NULL);
	if (s == NATS_OK && eb_nats_token[0] != '\0')
		s = natsOptions_SetToken(opts, eb_nats_token);
	if (s == NATS_OK && eb_nats_credentials_file[0] != '\0')
		s = natsOptions_SetUserCredentialsFromFiles(opts, eb_nats_credentials_file, NULL);
	if (s != NATS_OK)
	{
		eb_nats_restore_signals(&old);
		set_down("invalid NATS options", s);
		natsOptions_Destroy(opts);
		opts = NULL;
		return false;
	}

	s = natsConnection_Connect(&eb_nats_conn, opts);
	if (s == NATS_OK || s == NATS_NOT_YET_CONNECTED)
	{
		jsOptions_Init(&jsopts);
		jsopts.Wait = 5000;
		jsopts.PublishAsync.AckHandler = eb_nats_ack_cb;
		jsopts.PublishAsync.MaxPending = 20000;
		s = natsConnection_JetStream(&eb_js, eb_nats_conn, &jsopts) == NATS_OK ? s : NATS_ERR;
	}
	eb_nats_restore_signals(&old);

	if (s != NATS_OK && s != NATS_NOT_YET_CONNECTED)
	{
		set_down("connect failed", s);
		eb_nats_client_stop();
		return false;
	}
	if (s == NATS_NOT_YET_CONNECTED)
		set_down("not reachable, retrying", s);
	else
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_CONNECTED, eb_nats_url);
	return true;
}

/*
 * Shutdown budgets (ms).  Closing a connection flushes (0.5 s at most) and
 * joins its reconnect thread, which may sit in a connect attempt (2 s
 * timeout); closing the library joins cnats' own threads.
 */
#define CLOSE_BUDGET_MS		2000
#define LIBRARY_BUDGET_MS	1000

/* What a teardown helper thread destroys (malloc'd: it may outlive us). */
typedef struct NatsTeardown
{
	jsCtx	   *js;
	natsConnection *nc;
	natsOptions *opts;
} NatsTeardown;

static bool teardown_overran = false;

/* Helper thread: plain cnats calls only. */
static void
teardown(void *arg)
{
	NatsTeardown *t = arg;

	if (t->js)
		jsCtx_Destroy(t->js);
	if (t->nc)
		natsConnection_Destroy(t->nc);
	if (t->opts)
		natsOptions_Destroy(t->opts);
	free(t);
}

/*
 * Close the connection in bounded time; unacknowledged events stay in the
 * outbox / stream.  A close that overruns is left to the process exit.
 */
void
eb_nats_client_stop(void)
{
	NatsTeardown *t = malloc(sizeof(NatsTeardown));

	if (t == NULL)
		ereport(FATAL, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	t->js = eb_js;
	t->nc = eb_nats_conn;
	t->opts = opts;
	eb_js = NULL;
	eb_nats_conn = NULL;
	opts = NULL;

	eb_nats_producer_forget();
	if (!eb_nats_jobs_wait(CLOSE_BUDGET_MS))
	{
		/* A JetStream request still uses the connection: leave it behind. */
		teardown_overran = true;
		free(t);
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("a JetStream request did not end within %d ms, leaving the NATS connection behind",
						CLOSE_BUDGET_MS),
				 errdetail("Unacknowledged messages are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
	}
	else if (t->js || t->nc || t->opts)
	{
		if (!eb_run_bounded(teardown, t, CLOSE_BUDGET_MS))
		{
			teardown_overran = true;
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("the NATS connection did not close within %d ms, leaving it behind",
							CLOSE_BUDGET_MS),
					 errdetail("Unacknowledged messages are redelivered and the inbox skips what was handled; unacknowledged events stay in the outbox.")));
		}
	}
	else
		free(t);
}

/* Helper thread: close the library and wait (bounded) for its threads. */
static void
library_close_thread(void *arg)
{
	nats_CloseAndWait(LIBRARY_BUDGET_MS);
}

/*
 * At process exit: stop cnats' own threads, in bounded time.  Skipped when
 * a connection close overran (the library would wait for it in vain).
 */
static void
library_close(void)
{
	if (library_opened && !teardown_overran)
		(void) eb_run_bounded(library_close_thread, NULL, LIBRARY_BUDGET_MS + 500);
	library_opened = false;
}

/* Reconnections of the current connection so far (0 if none). */
uint64
eb_nats_reconnects(void)
{
	natsStatistics *stats = NULL;
	uint64_t	reconnects = 0;

	if (eb_nats_conn == NULL || natsStatistics_Create(&stats) != NATS_OK)
		return 0;
	if (natsConnection_GetStats(eb_nats_conn, stats) == NATS_OK)
		natsStatistics_GetCounts(stats, NULL, NULL, NULL, NULL, &reconnects);
	natsStatistics_Destroy(stats);
	return (uint64) reconnects;
}

/* Track the connection state (log once per change). */
void
eb_nats_poll_state(void)
{
	if (eb_nats_conn == NULL)
		return;

	if (natsConnection_Status(eb_nats_conn) == NATS_CONN_STATUS_CONNECTED)
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_CONNECTED, eb_nats_url);
	else
	{
		char		detail[EB_DETAIL_LEN];

		snprintf(detail, sizeof(detail), "%s: not connected (attempt %d)", eb_nats_url,
				 __atomic_load_n(&reconnect_attempts, __ATOMIC_RELAXED));
		eb_set_broker_state(EB_TRANSPORT_NATS, EB_BROKER_DOWN, detail);
	}
}

/* Is the connection up? */
bool
eb_nats_connected(void)
{
	return eb_nats_conn != NULL && natsConnection_Status(eb_nats_conn) == NATS_CONN_STATUS_CONNECTED;
}

/* --- configuration and the checks publishing backends make --- */

/* Is eventbus.nats_url set? */
static bool
configured(void)
{
	return eb_nats_url != NULL && eb_nats_url[0] != '\0';
}

/* The settings the producer (or the consumer: durable names) depends on. */
static char *
settings(bool producer)
{
	return psprintf("%s|%s|%s|%s|%d", eb_nats_url, eb_nats_credentials_file, eb_nats_token,
					producer ? "" : eb_consumer_group, producer ? 0 : eb_consumer_mode);
}

/*
 * A NATS subject is tokens separated by '.', none of them empty (nats-server
 * cannot capture "a..b" or ".a" in a stream).  Wildcards and whitespace are
 * already outside the characters every topic may use.
 */
static void
check_topic(const char *topic)
{
	for (const char *p = topic; *p; p++)
	{
		if (*p == '.' && (p == topic || p[1] == '.' || p[1] == '\0'))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid topic name \"%s\" for transport \"nats\"", topic),
					 errdetail("A NATS subject is tokens separated by '.'; the token %s character %d is empty.",
							   p == topic ? "before" : "after", (int) (p - topic) + 1),
					 errhint("Do not start or end the topic with '.' or repeat '.'.")));
	}
}

/* The server's max_payload, which the relay learns when it connects, else 1 MB. */
static int64
max_message(const char **limit_name)
{
	int64		limit = eb_shmem_max_message(EB_TRANSPORT_NATS);

	*limit_name = "the NATS server's max_payload";
	return limit > 0 ? limit : EB_NATS_DEFAULT_MAX_PAYLOAD;
}

/* Add one header line's size ("Name: value\r\n") to *arg (a Size). */
static void
count_header(void *arg, const char *name, const char *value)
{
	*(Size *) arg += strlen(name) + 2 + strlen(value) + 2;
}

/*
 * Size of ev's message as cnats and the server check it: the headers block
 * "NATS/1.0\r\n" + "Name: value\r\n"... + "\r\n", including Nats-Msg-Id,
 * plus the body.
 */
static Size
wire_size(const EbEvent *ev, Size envelope_len)
{
	Size		headers = 0;

	eb_event_headers(ev, count_header, &headers);
	count_header(&headers, "Nats-Msg-Id", ev->event_id);
	return 10 + headers + 2 + envelope_len;
}

const EbTransportRoutine eb_nats_transport = {
	.name = "nats",
	.setting = "eventbus.nats_url",
	.one_per_aggregate = true,	/* each publish is acknowledged on its own */
	.reconnect_poll_ms = 1000,	/* connection events wake the relay */

	.configured = configured,
	.settings = settings,
	.check_topic = check_topic,
	.max_message = max_message,
	.max_message_hint = "max_payload of the NATS server",
	.wire_size = wire_size,

	.producer_start = eb_nats_producer_start,
	.producer_stop = eb_nats_producer_stop,
	.producer_poll = eb_nats_producer_poll,
	.producer_drain = eb_nats_producer_drain,
	.connected = eb_nats_connected,
	.round_begin = eb_nats_round_begin,
	.produce = eb_nats_produce,
	.round_abandon = eb_nats_round_abandon,
	.wave_sent = eb_nats_wave_sent,

	.consumer_start = eb_nats_consumer_start,
	.consumer_stop = eb_nats_consumer_stop,
	.consumer_check = eb_nats_consumer_check,
	.consumer_set_topics = eb_nats_consumer_set_topics,
	.consumer_poll = eb_nats_consumer_poll,
	.consumer_done = eb_nats_consumer_done,
	.consumer_live = eb_nats_consumer_live,
	.consumer_abandon = eb_nats_consumer_abandon,
	.consumer_share = eb_nats_consumer_share,
	.consumer_pause = eb_nats_consumer_pause,
	.consumer_lag = eb_nats_consumer_lag,
	.consumer_idle_poll_ms = eb_nats_consumer_idle_poll_ms,

	.library_close = library_close,
};

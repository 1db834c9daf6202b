/*
 * bounded.c — run a library teardown call with a deadline (and start the
 * helper threads that run library calls off a worker's main thread).
 *
 * Closing a broker client can block for as long as the library likes:
 * rd_kafka_destroy joins threads that wait for a group coordinator or a
 * commit, natsConnection_Destroy joins a reconnect thread stuck in a
 * connect.  Shutdown must be bounded, so such calls run on a helper thread
 * and the caller waits at most a deadline.  A call that overruns is left
 * running: the process is about to exit (or drops the handle), and the
 * broker side recovers on its own (Kafka commits are redone from the last
 * stored point, unacknowledged JetStream messages are redelivered).
 *
 * The helper never calls PostgreSQL: it runs only the library call, with
 * every signal blocked so that PostgreSQL's handlers never run on it.  Its
 * bookkeeping is malloc'd, not palloc'd, because whichever side finishes
 * last frees it, possibly after the caller's memory contexts are gone.
 */
#include "postgres.h"

#include <pthread.h>
#include <time.h>

#include "bounded.h"
#include "eventbus.h"

typedef struct BoundedCall
{
	void		(*fn) (void *);
	void	   *arg;
	pthread_mutex_t mutex;
	pthread_cond_t cond;
	bool		done;
	bool		abandoned;		/* the caller stopped waiting: helper frees */
} BoundedCall;

static void
bounded_free(BoundedCall *c)
{
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->mutex);
	free(c);
}

static void *
bounded_main(void *p)
{
	BoundedCall *c = p;
	bool		abandoned;

	c->fn(c->arg);
	pthread_mutex_lock(&c->mutex);
	c->done = true;
	abandoned = c->abandoned;
	pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->mutex);
	if (abandoned)
		bounded_free(c);
	return NULL;
}

/* Initialize cond on CLOCK_MONOTONIC: a clock change must not stretch a wait. */
void
eb_cond_init_monotonic(pthread_cond_t *cond)
{
	pthread_condattr_t ca;

	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(cond, &ca);
	pthread_condattr_destroy(&ca);
}

/* *deadline = CLOCK_MONOTONIC now + timeout_ms (for pthread_cond_timedwait). */
void
eb_deadline_after(struct timespec *deadline, int timeout_ms)
{
	clock_gettime(CLOCK_MONOTONIC, deadline);
	deadline->tv_sec += timeout_ms / 1000;
	deadline->tv_nsec += (long) (timeout_ms % 1000) * 1000000L;
	if (deadline->tv_nsec >= 1000000000L)
	{
		deadline->tv_sec++;
		deadline->tv_nsec -= 1000000000L;
	}
}

/*
 * Start a detached helper thread running main(arg), with every signal
 * blocked so that PostgreSQL's handlers never run on it.  False if none
 * could be started.
 */
bool
eb_thread_start(void *(*main) (void *), void *arg)
{
	pthread_attr_t ta;
	pthread_t	thread;
	sigset_t	all;
	sigset_t	old;
	bool		started;

	pthread_attr_init(&ta);
	pthread_attr_setdetachstate(&ta, PTHREAD_CREATE_DETACHED);
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	started = pthread_create(&thread, &ta, main, arg) == 0;
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	pthread_attr_destroy(&ta);
	return started;
}

/*
 * Run fn(arg) and wait at most timeout_ms for it.  True if it finished;
 * false if it is still running (then it keeps running in the background
 * and the caller must not touch what it uses).  If no thread can be
 * started, fn runs here, unbounded: better than leaking the client.
 */
bool
eb_run_bounded(void (*fn) (void *), void *arg, int timeout_ms)
{
	BoundedCall *c = malloc(sizeof(BoundedCall));
	struct timespec deadline;
	bool		done;

	if (c == NULL)
	{
		fn(arg);
		return true;
	}
	c->fn = fn;
	c->arg = arg;
	c->done = false;
	c->abandoned = false;
	pthread_mutex_init(&c->mutex, NULL);
	eb_cond_init_monotonic(&c->cond);

	if (!eb_thread_start(bounded_main, c))
	{
		bounded_free(c);
		fn(arg);
		return true;
	}

	eb_deadline_after(&deadline, timeout_ms);

	pthread_mutex_lock(&c->mutex);
	while (!c->done)
		if (pthread_cond_timedwait(&c->cond, &c->mutex, &deadline) != 0)
			break;
	done = c->done;
	if (!done)
		c->abandoned = true;
	pthread_mutex_unlock(&c->mutex);
	if (done)
		bounded_free(c);
	return done;
}

/*
 * bounded.c — library calls on helper threads: a teardown call with a
 * deadline (eb_run_bounded), and calls the main thread starts and looks at
 * later (eb_call_start: broker requests off a worker's main thread).
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

struct EbCall
{
	void		(*fn) (void *);
	void	   *arg;
	void		(*release) (void *);	/* frees arg once the call is forgotten */
	bool		wake;			/* write to the wakeup pipe when done */
	pthread_mutex_t mutex;
	pthread_cond_t cond;
	bool		done;
	bool		abandoned;		/* the caller forgot it: helper frees */
};

static void
call_free(EbCall *c)
{
	if (c->release)
		c->release(c->arg);
	pthread_cond_destroy(&c->cond);
	pthread_mutex_destroy(&c->mutex);
	free(c);
}

static void *
call_main(void *p)
{
	EbCall	   *c = p;
	bool		abandoned;

	c->fn(c->arg);
	pthread_mutex_lock(&c->mutex);
	c->done = true;
	abandoned = c->abandoned;
	pthread_cond_signal(&c->cond);
	pthread_mutex_unlock(&c->mutex);
	if (abandoned)
		call_free(c);
	else if (c->wake)
		eb_wakeup_signal();
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
 * Start fn(arg) on a helper thread; NULL (fn not run) if none could be
 * started.  wake: the helper writes to the wakeup pipe when fn returns.
 * The caller looks with eb_call_wait and ends with eb_call_forget, after
 * which release(arg) runs (if given): at once if fn has returned, else on
 * the helper when it does.
 */
EbCall *
eb_call_start(void (*fn) (void *), void *arg, void (*release) (void *), bool wake)
{
	EbCall	   *c = malloc(sizeof(EbCall));

	if (c == NULL)
		return NULL;
	c->fn = fn;
	c->arg = arg;
	c->release = release;
	c->wake = wake;
	c->done = false;
	c->abandoned = false;
	pthread_mutex_init(&c->mutex, NULL);
	eb_cond_init_monotonic(&c->cond);
	if (!eb_thread_start(call_main, c))
	{
		c->release = NULL;		/* the caller keeps arg */
		call_free(c);
		return NULL;
	}
	return c;
}

/* Wait at most timeout_ms (0: just look) for fn to return; true if it has. */
bool
eb_call_wait(EbCall *c, int timeout_ms)
{
	struct timespec deadline;
	bool		done;

	eb_deadline_after(&deadline, timeout_ms);
	pthread_mutex_lock(&c->mutex);
	while (!c->done && timeout_ms > 0)
		if (pthread_cond_timedwait(&c->cond, &c->mutex, &deadline) != 0)
			break;
	done = c->done;
	pthread_mutex_unlock(&c->mutex);
	return done;
}

/* Done with the call: freed now if fn returned, else by its helper. */
void
eb_call_forget(EbCall *c)
{
	bool		done;

	if (c == NULL)
		return;
	pthread_mutex_lock(&c->mutex);
	done = c->done;
	if (!done)
		c->abandoned = true;
	pthread_mutex_unlock(&c->mutex);
	if (done)
		call_free(c);
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
	EbCall	   *c = eb_call_start(fn, arg, NULL, false);
	bool		done;

	if (c == NULL)
	{
		fn(arg);
		return true;
	}
	done = eb_call_wait(c, timeout_ms);
	eb_call_forget(c);
	return done;
}

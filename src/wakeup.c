/*
 * wakeup.c — a pipe that library threads write to, to wake a background
 * worker's WaitEventSet.  write(2) is the only thing a library thread does
 * on our behalf: it never calls PostgreSQL.
 */
#include "postgres.h"

#include <fcntl.h>
#include <unistd.h>

#include "miscadmin.h"
#include "storage/latch.h"
#include "utils/memutils.h"

#include "eventbus.h"

static int	wakeup_pipe[2] = {-1, -1};

/* Create the pipe (once per process). */
void
eb_wakeup_init(void)
{
	if (wakeup_pipe[0] >= 0)
		return;
	if (pipe(wakeup_pipe) != 0 ||
		fcntl(wakeup_pipe[0], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(wakeup_pipe[1], F_SETFL, O_NONBLOCK) != 0 ||
		fcntl(wakeup_pipe[0], F_SETFD, FD_CLOEXEC) != 0 ||
		fcntl(wakeup_pipe[1], F_SETFD, FD_CLOEXEC) != 0)
		ereport(ERROR,
				(errcode_for_file_access(),
				 errmsg("could not create wakeup pipe: %m")));
}

/*
 * The pipe plus the WaitEventSet a worker's main loop waits on: its latch,
 * postmaster death, and the pipe.
 */
WaitEventSet *
eb_wakeup_wait_set(void)
{
	WaitEventSet *wes;

	eb_wakeup_init();
	wes = CreateWaitEventSet(TopMemoryContext, 3);
	AddWaitEventToSet(wes, WL_LATCH_SET, PGINVALID_SOCKET, MyLatch, NULL);
	AddWaitEventToSet(wes, WL_EXIT_ON_PM_DEATH, PGINVALID_SOCKET, NULL, NULL);
	AddWaitEventToSet(wes, WL_SOCKET_READABLE, wakeup_pipe[0], NULL, NULL);
	return wes;
}

/* The read end, for the WaitEventSet. */
int
eb_wakeup_fd(void)
{
	return wakeup_pipe[0];
}

/* The write end, for librdkafka's queue event. */
int
eb_wakeup_write_fd(void)
{
	return wakeup_pipe[1];
}

/* Wake the process, from any thread. */
void
eb_wakeup_signal(void)
{
	char		c = 1;

	/* EAGAIN means the pipe is full: the process is woken anyway. */
	if (wakeup_pipe[1] >= 0 && write(wakeup_pipe[1], &c, 1) < 0)
		return;
}

/* Empty the pipe. */
void
eb_wakeup_drain(void)
{
	char		buf[256];

	while (read(wakeup_pipe[0], buf, sizeof(buf)) > 0)
		;
}

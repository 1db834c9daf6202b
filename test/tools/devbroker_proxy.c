/*
 * devbroker_proxy.c — makes the dev broker answer a fetch when data
 * arrives, as a real Kafka broker does.
 *
 * librdkafka's mock cluster holds a Fetch that finds no data for the whole
 * fetch.wait.max.ms, even when a producer writes meanwhile (its own source
 * says so: cutting the wait short was "too much of a hassle").  A consumer
 * then either waits that long for a message produced just after its fetch,
 * or uses a tiny wait and spends CPU on empty fetches (at 2 ms, about a
 * quarter of a core between the consumer and this program).
 *
 * So clients do not talk to the mock brokers directly.  Each mock broker's
 * listener is aliased (getsockname below) to a port of this proxy, which
 * is what the mock then advertises in its metadata; the proxy forwards
 * every connection to the mock broker behind it, byte for byte, except:
 *  - a Fetch (version 4-11) with a wait goes upstream with MaxWait 0; an
 *    empty answer is held back (parked) until a Produce was answered by
 *    any broker (the fetch is then sent again) or the client's wait is
 *    over (the empty answer is then delivered);
 *  - while a fetch is outstanding, the connection's later requests wait,
 *    as a Kafka broker processes one request per connection at a time.
 * Brokers down (SIGUSR1) closes the proxy's listeners and connections, so
 * clients get "connection refused", and keeps each port bound meanwhile; up
 * (SIGUSR2) listens on the same ports.
 *
 * One thread, epoll, non-blocking sockets.  Plain C: this is a test tool.
 */
#define _GNU_SOURCE

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "devbroker_proxy.h"
#include "devbroker_wire.h"

#define MAX_LISTENERS	64

typedef struct Inflight
{
	int16_t		api;
	int16_t		version;
	bool		fetch_held;		/* a fetch this proxy may hold back */
} Inflight;

typedef struct Conn
{
	int			cfd;			/* the client's socket */
	int			ufd;			/* the mock broker's */
	Buf			from_client;	/* requests not yet forwarded */
	Buf			to_client;
	Buf			to_upstream;
	Buf			from_upstream;
	Inflight   *inflight;		/* requests forwarded, answers pending, in order */
	size_t		ninflight;
	size_t		capinflight;
	bool		fetching;		/* a held fetch is outstanding: later requests wait */
	char	   *fetch_req;		/* its request (MaxWait 0), to send again */
	size_t		fetch_len;
	int16_t		fetch_version;
	int64_t		fetch_deadline; /* ms, monotonic: the client's wait ends */
	char	   *parked;			/* its last empty answer, while waiting for data */
	size_t		parked_len;
	bool		resent;			/* sent again, answer pending */
	uint64_t	fetch_gen;		/* produce_gen when it was last sent */
	struct Conn *next;
} Conn;

typedef struct Listener
{
	int			fd;				/* listening socket, -1 while down */
	int			held;			/* while down: a socket bound to the port, not listening */
	int			port;			/* the proxy's (advertised) port */
	int			real_port;		/* the mock broker's */
} Listener;

static Listener listeners[MAX_LISTENERS];
static int	nlisteners = 0;
static pthread_mutex_t alias_lock = PTHREAD_MUTEX_INITIALIZER;
static bool aliasing = false;
static Conn *conns = NULL;
static int	epfd = -1;
static int	cmd_pipe[2] = {-1, -1};
static pthread_t thread;
static bool started = false;
static pthread_mutex_t cmd_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cmd_done = PTHREAD_COND_INITIALIZER;
static uint64_t cmds_done = 0;		/* commands the thread has carried out */
static void (*logf_cb) (const char *fmt,...);

static int	(*real_getsockname) (int, struct sockaddr *, socklen_t *);
static uint64_t produce_gen = 0;	/* Produce answers seen, all brokers */
static char stale_event;		/* tag of an event whose connection is gone */

static int64_t
now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void
nonblock_nodelay(int fd)
{
	int			on = 1;

	fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
}

/* A socket bound to 127.0.0.1:port (0: the kernel picks), not listening; -1 on failure. */
static int
bound_socket(int port)
{
	struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	int			on = 1;
	int			fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);

	a.sin_port = htons((uint16_t) port);
	if (fd >= 0 && setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof(on)) == 0 &&
		bind(fd, (struct sockaddr *) &a, sizeof(a)) == 0)
		return fd;
	if (fd >= 0)
		close(fd);
	return -1;
}

/*
 * getsockname, as the mock cluster calls it right after binding a broker's
 * listener: while aliasing, hand it a port of the proxy instead, so that
 * the port it advertises leads here.
 */
int
getsockname(int fd, struct sockaddr *addr, socklen_t *len)
{
	int			rc;

	if (real_getsockname == NULL)
		real_getsockname = (int (*) (int, struct sockaddr *, socklen_t *)) dlsym(RTLD_NEXT, "getsockname");
	rc = real_getsockname(fd, addr, len);
	if (rc != 0 || addr->sa_family != AF_INET)
		return rc;
	pthread_mutex_lock(&alias_lock);
	if (aliasing && nlisteners < MAX_LISTENERS)
	{
		struct sockaddr_in *sin = (struct sockaddr_in *) addr;
		struct sockaddr_in mine;
		socklen_t	mlen = sizeof(mine);
		int			lfd = bound_socket(0);

		if (lfd >= 0 &&
			real_getsockname(lfd, (struct sockaddr *) &mine, &mlen) == 0 &&
			listen(lfd, 64) == 0)
		{
			listeners[nlisteners].fd = lfd;
			listeners[nlisteners].held = -1;
			listeners[nlisteners].port = ntohs(mine.sin_port);
			listeners[nlisteners].real_port = ntohs(sin->sin_port);
			nlisteners++;
			sin->sin_port = mine.sin_port;
		}
		else if (lfd >= 0)
			close(lfd);
	}
	pthread_mutex_unlock(&alias_lock);
	return rc;
}

void
devbroker_proxy_aliasing(bool on)
{
	pthread_mutex_lock(&alias_lock);
	aliasing = on;
	pthread_mutex_unlock(&alias_lock);
}

static void
watch(int fd, void *ptr, uint32_t events, int op)
{
	struct epoll_event ev = {.events = events, .data.ptr = ptr};

	epoll_ctl(epfd, op, fd, &ev);
}

/* epoll data: listeners are tagged by their address in listeners[]; a Conn
 * needs to know which side fired, so each side has its own tag. */
typedef struct Side
{
	Conn	   *conn;
	bool		upstream;
} Side;

/* The two epoll tags of a connection live right after it. */
typedef struct ConnBox
{
	Conn		c;
	Side		client;
	Side		upstream;
} ConnBox;

static void
conn_free(Conn *c)
{
	Conn	  **pp;

	for (pp = &conns; *pp; pp = &(*pp)->next)
		if (*pp == c)
		{
			*pp = c->next;
			break;
		}
	close(c->cfd);
	close(c->ufd);
	free(c->from_client.data);
	free(c->to_client.data);
	free(c->to_upstream.data);
	free(c->from_upstream.data);
	free(c->inflight);
	free(c->fetch_req);
	free(c->parked);
	free((ConnBox *) c);
}

static void
update_events(Conn *c)
{
	ConnBox    *box = (ConnBox *) c;

	watch(c->cfd, &box->client, EPOLLIN | (c->to_client.len > c->to_client.off ? EPOLLOUT : 0), EPOLL_CTL_MOD);
	watch(c->ufd, &box->upstream, EPOLLIN | (c->to_upstream.len > c->to_upstream.off ? EPOLLOUT : 0), EPOLL_CTL_MOD);
}

static void
push_inflight(Conn *c, int16_t api, int16_t version, bool fetch_held)
{
	if (c->ninflight == c->capinflight)
	{
		c->capinflight = c->capinflight ? c->capinflight * 2 : 16;
		c->inflight = realloc(c->inflight, c->capinflight * sizeof(Inflight));
		if (c->inflight == NULL)
			abort();
	}
	c->inflight[c->ninflight].api = api;
	c->inflight[c->ninflight].version = version;
	c->inflight[c->ninflight].fetch_held = fetch_held;
	c->ninflight++;
}

/* Forward the client's requests, up to and including a fetch to hold. */
static bool
forward_requests(Conn *c)
{
	size_t		n;

	while (!c->fetching && (n = frame_at(&c->from_client)) != 0)
	{
		char	   *f = c->from_client.data + c->from_client.off;
		int16_t		api,
					version;
		size_t		wait_at;
		bool		hold = false;

		if (n == (size_t) -1 || n < 12)
			return false;
		api = rd16(f + 4);
		version = rd16(f + 6);
		wait_at = fetch_wait_at(f, n);
		if (wait_at > 0)
		{
			hold = true;
			c->fetching = true;
			c->resent = false;
			c->fetch_version = version;
			c->fetch_deadline = now_ms() + rd32(f + wait_at);
			c->fetch_gen = produce_gen;
			wr32(f + wait_at, 0);
			free(c->fetch_req);
			c->fetch_req = copy_of(f, n);
			c->fetch_len = n;
		}
		push_inflight(c, api, version, hold);
		buf_append(&c->to_upstream, f, n);
		buf_consume(&c->from_client, n);
	}
	return true;
}

/* Send a held fetch upstream again. */
static void
resend(Conn *c)
{
	buf_append(&c->to_upstream, c->fetch_req, c->fetch_len);
	push_inflight(c, API_FETCH, c->fetch_version, true);
	c->resent = true;
	c->fetch_gen = produce_gen;
}

static void
deliver_fetch(Conn *c, const char *f, size_t n)
{
	buf_append(&c->to_client, f, n);
	c->fetching = false;
	c->resent = false;
	free(c->parked);
	c->parked = NULL;
	c->parked_len = 0;
}

/* Handle the mock's answers; returns whether a Produce was answered. */
static bool
forward_answers(Conn *c, bool *bad)
{
	bool		produced = false;
	size_t		n;

	while ((n = frame_at(&c->from_upstream)) != 0)
	{
		char	   *f = c->from_upstream.data + c->from_upstream.off;
		Inflight	head;

		if (n == (size_t) -1 || c->ninflight == 0)
		{
			*bad = true;
			return produced;
		}
		head = c->inflight[0];
		memmove(c->inflight, c->inflight + 1, (c->ninflight - 1) * sizeof(Inflight));
		c->ninflight--;
		if (head.api == API_PRODUCE)
		{
			produced = true;
			produce_gen++;
		}
		if (head.fetch_held && c->fetching)
		{
			if (fetch_answer_matters(f, n, head.version) || now_ms() >= c->fetch_deadline)
				deliver_fetch(c, f, n);
			else
			{
				free(c->parked);
				c->parked = copy_of(f, n);
				c->parked_len = n;
				c->resent = false;
				/* Data arrived while it was on its way: ask again now. */
				if (c->fetch_gen != produce_gen)
					resend(c);
			}
		}
		else
			buf_append(&c->to_client, f, n);
		buf_consume(&c->from_upstream, n);
	}
	return produced;
}

/* Send parked fetches again: data arrived somewhere. */
static void
resend_parked(void)
{
	for (Conn *c = conns; c; c = c->next)
		if (c->fetching && c->parked != NULL && !c->resent)
		{
			resend(c);
			update_events(c);
		}
}

/* Deliver parked empty answers whose wait is over; returns the next timeout. */
static int
expire_parked(void)
{
	int64_t		now = now_ms();
	int64_t		next = -1;

	for (Conn *c = conns; c; c = c->next)
	{
		if (!c->fetching || c->parked == NULL || c->resent)
			continue;
		if (now >= c->fetch_deadline)
		{
			deliver_fetch(c, c->parked, c->parked_len);
			forward_requests(c);
			update_events(c);
		}
		else if (next < 0 || c->fetch_deadline - now < next)
			next = c->fetch_deadline - now;
	}
	return next < 0 ? 1000 : (int) next + 1;
}

static void
accept_client(Listener *l)
{
	for (;;)
	{
		int			cfd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
		int			ufd;
		struct sockaddr_in up = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
		ConnBox    *box;

		if (cfd < 0)
			return;
		up.sin_port = htons((uint16_t) l->real_port);
		ufd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (ufd >= 0)
			nonblock_nodelay(ufd);
		/* Not waiting for it: what is written meanwhile goes once connected. */
		if (ufd < 0 ||
			(connect(ufd, (struct sockaddr *) &up, sizeof(up)) != 0 && errno != EINPROGRESS))
		{
			if (ufd >= 0)
				close(ufd);
			close(cfd);
			continue;
		}
		nonblock_nodelay(cfd);
		box = calloc(1, sizeof(ConnBox));
		if (box == NULL)
			abort();
		box->c.cfd = cfd;
		box->c.ufd = ufd;
		box->client.conn = &box->c;
		box->upstream.conn = &box->c;
		box->upstream.upstream = true;
		box->c.next = conns;
		conns = &box->c;
		watch(cfd, &box->client, EPOLLIN, EPOLL_CTL_ADD);
		watch(ufd, &box->upstream, EPOLLIN, EPOLL_CTL_ADD);
	}
}

/*
 * Brokers down: close the listeners (connection refused); with hold, keep
 * each port bound, so that no other socket takes it before they are up
 * again.
 */
static void
set_listening(bool up, bool hold)
{
	for (int i = 0; i < nlisteners; i++)
	{
		Listener   *l = &listeners[i];

		if (!up && l->fd >= 0)
		{
			epoll_ctl(epfd, EPOLL_CTL_DEL, l->fd, NULL);
			close(l->fd);
			l->fd = -1;
			if (hold)
				l->held = bound_socket(l->port);
		}
		else if (up && l->fd < 0)
		{
			int			fd = l->held >= 0 ? l->held : bound_socket(l->port);

			l->held = -1;
			if (fd >= 0 && listen(fd, 64) == 0)
			{
				nonblock_nodelay(fd);
				l->fd = fd;
				watch(fd, l, EPOLLIN, EPOLL_CTL_ADD);
			}
			else
			{
				if (logf_cb)
					logf_cb("proxy: cannot listen on port %d again: %s", l->port, strerror(errno));
				if (fd >= 0)
					close(fd);
			}
		}
	}
	if (!up)
		while (conns)
			conn_free(conns);
}

static bool
is_listener(void *ptr)
{
	return ptr >= (void *) listeners && ptr < (void *) (listeners + MAX_LISTENERS);
}

static void *
proxy_main(void *arg)
{
	struct epoll_event evs[64];
	int			timeout = 1000;

	(void) arg;
	for (;;)
	{
		int			n = epoll_wait(epfd, evs, 64, timeout);
		bool		produced = false;

		for (int i = 0; i < n; i++)
		{
			void	   *ptr = evs[i].data.ptr;

			if (ptr == NULL)
			{
				char		cmd;

				while (read(cmd_pipe[0], &cmd, 1) == 1)
				{
					set_listening(cmd == 'u', cmd == 'd');
					pthread_mutex_lock(&cmd_lock);
					cmds_done++;
					pthread_cond_signal(&cmd_done);
					pthread_mutex_unlock(&cmd_lock);
					if (cmd == 'q')
						return NULL;
				}
				/* Connections may be gone: this batch's events are stale. */
				n = 0;
				break;
			}
			if (ptr == &stale_event)
				continue;
			if (is_listener(ptr))
			{
				if (((Listener *) ptr)->fd >= 0)
					accept_client((Listener *) ptr);
				continue;
			}
			{
				Side	   *s = ptr;
				Conn	   *c = s->conn;
				bool		ok = true;
				bool		bad = false;

				if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
				{
					if (s->upstream)
					{
						ok = read_into(c->ufd, &c->from_upstream);
						if (forward_answers(c, &bad))
							produced = true;
						forward_requests(c);
					}
					else
					{
						ok = read_into(c->cfd, &c->from_client);
						if (!forward_requests(c))
							bad = true;
					}
				}
				if (ok && !bad)
					ok = write_from(c->ufd, &c->to_upstream) && write_from(c->cfd, &c->to_client);
				if (!ok || bad)
				{
					/* Later events of this batch may name it: drop them. */
					for (int j = i + 1; j < n; j++)
					{
						Side	   *o = evs[j].data.ptr;

						if (o != NULL && (void *) o != &stale_event && !is_listener(o) && o->conn == c)
							evs[j].data.ptr = &stale_event;
					}
					conn_free(c);
					continue;
				}
				update_events(c);
			}
		}
		if (produced)
			resend_parked();
		timeout = expire_parked();
		/* Answers queued by resend/expiry go out now. */
		for (Conn *c = conns, *next; c; c = next)
		{
			next = c->next;
			if (!write_from(c->ufd, &c->to_upstream) || !write_from(c->cfd, &c->to_client))
				conn_free(c);
		}
	}
}

bool
devbroker_proxy_start(void (*log) (const char *fmt,...))
{
	logf_cb = log;
	if (nlisteners == 0)
		return false;
	epfd = epoll_create1(EPOLL_CLOEXEC);
	if (epfd < 0 || pipe2(cmd_pipe, O_CLOEXEC | O_NONBLOCK) != 0)
		return false;
	watch(cmd_pipe[0], NULL, EPOLLIN, EPOLL_CTL_ADD);
	for (int i = 0; i < nlisteners; i++)
	{
		nonblock_nodelay(listeners[i].fd);
		watch(listeners[i].fd, &listeners[i], EPOLLIN, EPOLL_CTL_ADD);
	}
	if (pthread_create(&thread, NULL, proxy_main, NULL) != 0)
		return false;
	started = true;
	return true;
}

/* Have the thread carry out a command; returns once it has. */
static void
command(char cmd)
{
	uint64_t	before;

	if (!started)
		return;
	pthread_mutex_lock(&cmd_lock);
	before = cmds_done;
	if (write(cmd_pipe[1], &cmd, 1) == 1)
		while (cmds_done == before)
			pthread_cond_wait(&cmd_done, &cmd_lock);
	pthread_mutex_unlock(&cmd_lock);
}

int
devbroker_proxy_set_up(bool up)
{
	int			changed = 0;

	command(up ? 'u' : 'd');
	/* The thread is done with the listeners (command waited for it). */
	for (int i = 0; i < nlisteners; i++)
		if ((listeners[i].fd >= 0) == up)
			changed++;
	return changed;
}

void
devbroker_proxy_stop(void)
{
	if (!started)
		return;
	command('q');
	pthread_join(thread, NULL);
	started = false;
}

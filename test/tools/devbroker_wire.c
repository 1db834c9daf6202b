/*
 * devbroker_wire.c — the bytes of the Kafka protocol the dev broker's proxy
 * reads and rewrites (frames, a Fetch request's wait, whether a Fetch
 * answer carries anything), and the byte buffers it moves them in.
 *
 * Plain C: this is a test tool.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "devbroker_wire.h"

int16_t
rd16(const char *p)
{
	return (int16_t) (((uint16_t) (unsigned char) p[0] << 8) | (unsigned char) p[1]);
}

int32_t
rd32(const char *p)
{
	return (int32_t) (((uint32_t) (unsigned char) p[0] << 24) | ((uint32_t) (unsigned char) p[1] << 16) |
					  ((uint32_t) (unsigned char) p[2] << 8) | (unsigned char) p[3]);
}

void
wr32(char *p, int32_t v)
{
	p[0] = (char) ((uint32_t) v >> 24);
	p[1] = (char) ((uint32_t) v >> 16);
	p[2] = (char) ((uint32_t) v >> 8);
	p[3] = (char) v;
}

/* A copy of n bytes (this tool has no use going on without memory). */
char *
copy_of(const char *src, size_t n)
{
	char	   *p = malloc(n > 0 ? n : 1);

	if (p == NULL)
		abort();
	memcpy(p, src, n);
	return p;
}

void
buf_append(Buf *b, const char *data, size_t n)
{
	if (b->len + n > b->cap)
	{
		b->cap = b->cap > 0 ? b->cap : 4096;
		while (b->len + n > b->cap)
			b->cap *= 2;
		b->data = realloc(b->data, b->cap);
		if (b->data == NULL)
			abort();
	}
	memcpy(b->data + b->len, data, n);
	b->len += n;
}

void
buf_consume(Buf *b, size_t n)
{
	b->off += n;
	if (b->off == b->len)
		b->off = b->len = 0;
	else if (b->off > 65536 && b->off * 2 > b->len)
	{
		memmove(b->data, b->data + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
	}
}

/* The length of the complete frame at the front of b, 0 if incomplete, (size_t) -1 if invalid. */
size_t
frame_at(const Buf *b)
{
	size_t		have = b->len - b->off;
	int32_t		size;

	if (have < 4)
		return 0;
	size = rd32(b->data + b->off);
	if (size < 0 || size > MAX_FRAME)
		return (size_t) -1;
	if (have < (size_t) size + 4)
		return 0;
	return (size_t) size + 4;
}

/*
 * Where a Fetch request (versions 4-11) holds its MaxWait, if it has one
 * above 0; 0 otherwise (another request, or a fetch not to hold).
 */
size_t
fetch_wait_at(const char *f, size_t n)
{
	int16_t		api = rd16(f + 4);
	int16_t		version = rd16(f + 6);
	int16_t		clen;
	size_t		wait_at;

	if (api != API_FETCH || version < FETCH_MIN_VERSION || version > FETCH_MAX_VERSION || n < 14)
		return 0;
	clen = rd16(f + 12);
	wait_at = 14 + (clen > 0 ? (size_t) clen : 0) + 4;
	if (wait_at + 4 <= n && rd32(f + wait_at) > 0)
		return wait_at;
	return 0;
}

/* Does a Fetch answer (versions 4-11) carry records or an error? */
bool
fetch_answer_matters(const char *f, size_t n, int16_t version)
{
	size_t		p = 8;			/* size, correlation id */
	int32_t		ntopics;

#define NEED(k) do { if (p + (k) > n) return true; } while (0)
	NEED(4);
	p += 4;						/* throttle time */
	if (version >= 7)
	{
		NEED(6);
		if (rd16(f + p) != 0)
			return true;
		p += 6;
	}
	NEED(4);
	ntopics = rd32(f + p);
	p += 4;
	for (int32_t t = 0; t < ntopics; t++)
	{
		int16_t		tlen;
		int32_t		nparts;

		NEED(2);
		tlen = rd16(f + p);
		p += 2 + (tlen > 0 ? (size_t) tlen : 0);
		NEED(4);
		nparts = rd32(f + p);
		p += 4;
		for (int32_t i = 0; i < nparts; i++)
		{
			int32_t		naborted,
						rsize;

			NEED(6);
			if (rd16(f + p + 4) != 0)
				return true;
			p += 4 + 2 + 8 + 8 + (version >= 5 ? 8 : 0);
			NEED(4);
			naborted = rd32(f + p);
			p += 4 + (naborted > 0 ? (size_t) naborted * 16 : 0);
			if (version >= 11)
				p += 4;
			NEED(4);
			rsize = rd32(f + p);
			if (rsize > 0)
				return true;
			p += 4;
		}
	}
#undef NEED
	return false;
}

/* Read what is there; false on EOF or error. */
bool
read_into(int fd, Buf *b)
{
	char		tmp[65536];

	for (;;)
	{
		ssize_t		r = read(fd, tmp, sizeof(tmp));

		if (r > 0)
			buf_append(b, tmp, (size_t) r);
		else if (r == 0)
			return false;
		else if (errno == EINTR)
			continue;
		else
			return errno == EAGAIN || errno == EWOULDBLOCK;
		if ((size_t) r < sizeof(tmp))
			return true;
	}
}

/* Write what can go; false on error. */
bool
write_from(int fd, Buf *b)
{
	while (b->len > b->off)
	{
		ssize_t		w = write(fd, b->data + b->off, b->len - b->off);

		if (w > 0)
			buf_consume(b, (size_t) w);
		else if (w < 0 && errno == EINTR)
			continue;
		else
			return w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
	}
	return true;
}

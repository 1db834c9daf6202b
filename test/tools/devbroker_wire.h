/*
 * devbroker_wire.h — Kafka protocol bytes and byte buffers for the dev
 * broker's proxy (devbroker_wire.c).
 */
#ifndef DEVBROKER_WIRE_H
#define DEVBROKER_WIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define API_PRODUCE		0
#define API_FETCH		1
#define FETCH_MIN_VERSION 4		/* the layouts parsed in devbroker_wire.c */
#define FETCH_MAX_VERSION 11	/* later ones have flexible headers */
#define MAX_FRAME		(256 * 1024 * 1024)

typedef struct Buf
{
	char	   *data;
	size_t		cap;			/* bytes allocated */
	size_t		len;			/* bytes held */
	size_t		off;			/* bytes consumed from the front */
} Buf;

extern int16_t rd16(const char *p);
extern int32_t rd32(const char *p);
extern void wr32(char *p, int32_t v);
/* A copy of n bytes (this tool has no use going on without memory). */
extern char *copy_of(const char *src, size_t n);
extern void buf_append(Buf *b, const char *data, size_t n);
extern void buf_consume(Buf *b, size_t n);
/* The length of the complete frame at the front of b, 0 if incomplete, (size_t) -1 if invalid. */
extern size_t frame_at(const Buf *b);
/* Where a holdable Fetch request keeps its MaxWait (above 0), else 0. */
extern size_t fetch_wait_at(const char *f, size_t n);
/* Does a Fetch answer (versions 4-11) carry records or an error? */
extern bool fetch_answer_matters(const char *f, size_t n, int16_t version);
/* Read what is there; false on EOF or error. */
extern bool read_into(int fd, Buf *b);
/* Write what can go; false on error. */
extern bool write_from(int fd, Buf *b);

#endif

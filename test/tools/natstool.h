/*
 * natstool.h — what natstool.c (the command line, publishing, dumping,
 * listening) shares with natstool_admin.c (streams, consumers and
 * KeyValue keys).
 */
#ifndef NATSTOOL_H
#define NATSTOOL_H

#include <nats/nats.h>

#define EXIT_ERR		1
#define EXIT_NOSTREAM	2
#define EXIT_USAGE		64
#define TIMEOUT_MS		5000

extern natsConnection *nc;
extern jsCtx *js;

extern int	fail(const char *what, natsStatus s, jsErrCode jerr);
extern int	usage(const char *msg);
extern void put_json_str(const char *s);
extern int	cmp_str(const void *a, const void *b);
extern int	find_stream(const char *subject, char **name);

/* natstool_admin.c: the commands of the same names */
extern int	cmd_ensure_stream(const char *name, const char **subjects, int nsubjects);
extern int	cmd_set_limit(const char *name, bool msgs, const char *value);
extern int	cmd_stream_info(const char *subject);
extern int	cmd_consumers(const char *stream);
extern int	cmd_consumer(const char *stream, const char *durable);
extern int	cmd_kv_get(const char *bucket, const char *key);
extern int	cmd_kv_del(const char *bucket, const char *key);
extern int	cmd_stream_delete(const char *name);
extern int	cmd_kv_add_sealed(const char *bucket);

#endif							/* NATSTOOL_H */

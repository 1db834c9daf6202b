/*
 * bounded.h — bounded.c's calls on helper threads, and its pthread
 * helpers, for the files that run library calls off the main thread
 * (kafka_lookup.c, nats_api.c).
 */
#ifndef EB_BOUNDED_H
#define EB_BOUNDED_H

#include <pthread.h>
#include <time.h>

typedef struct EbCall EbCall;

extern EbCall *eb_call_start(void (*fn) (void *), void *arg, void (*release) (void *), bool wake);
extern bool eb_call_wait(EbCall *c, int timeout_ms);
extern void eb_call_forget(EbCall *c);
extern void eb_cond_init_monotonic(pthread_cond_t *cond);
extern void eb_deadline_after(struct timespec *deadline, int timeout_ms);

#endif							/* EB_BOUNDED_H */

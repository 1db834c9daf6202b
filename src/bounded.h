/*
 * bounded.h — the pthread helpers of bounded.c for the files that run
 * library calls on helper threads (kafka_lookup.c, nats_api.c).
 */
#ifndef EB_BOUNDED_H
#define EB_BOUNDED_H

#include <pthread.h>
#include <time.h>

extern void eb_cond_init_monotonic(pthread_cond_t *cond);
extern void eb_deadline_after(struct timespec *deadline, int timeout_ms);

#endif							/* EB_BOUNDED_H */

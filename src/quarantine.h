/*
 * quarantine.h — the dispatcher's quarantine of inbound messages it cannot
 * decode (quarantine.c).
 */
#ifndef EB_QUARANTINE_H
#define EB_QUARANTINE_H

#include "transport.h"

extern void eb_quarantine_queue(const EbInbound *in, const char *reason, void *delivery);
extern void eb_quarantine_flush(void (*finish) (void *delivery));

#endif							/* EB_QUARANTINE_H */

/*
 * pool_link.h — the dispatcher's end of the pool (pool_link.c): the pool
 * workers, the shared-memory queues to and from them, items sent in order,
 * completions read back.
 */
#ifndef EB_POOL_LINK_H
#define EB_POOL_LINK_H

#include "access/xlogdefs.h"
#include "lib/stringinfo.h"

/*
 * A completion read from the pool: the item's tag, and the WAL position its
 * commit reached.  Returns whether the dispatcher still knew the item (then
 * it counts as no longer queued).
 */
typedef bool (*EbPoolDoneFn) (uint64 tag, XLogRecPtr lsn);

extern int	eb_pool_link_start(void);
extern void eb_pool_link_check(void);
extern void eb_pool_link_send(int w, int slot, StringInfo buf);
extern bool eb_pool_link_revoke(int w, int slot);
extern void eb_pool_link_end_batch(int w);
extern void eb_pool_link_flush(void);
extern int64 eb_pool_link_unsent_bytes(void);
extern void eb_pool_link_drain(EbPoolDoneFn done);
extern void eb_pool_link_report(int nsubs);
extern void eb_pool_link_stop(EbPoolDoneFn collect);

#endif

/*
 * devbroker_proxy.h — the dev broker's fetch-on-arrival proxy
 * (devbroker_proxy.c).
 */
#ifndef DEVBROKER_PROXY_H
#define DEVBROKER_PROXY_H

#include <stdbool.h>

/* While on, mock broker listeners created by this thread are aliased to proxy ports. */
extern void devbroker_proxy_aliasing(bool on);
/* Start forwarding; false if no listener was aliased (clients then reach the mock). */
extern bool devbroker_proxy_start(void (*log) (const char *fmt,...));
/*
 * Brokers down (listeners closed, connections dropped) or up again (same
 * ports); returns how many brokers changed to that state.
 */
extern int	devbroker_proxy_set_up(bool up);
extern void devbroker_proxy_stop(void);

#endif

/*
 * guc.h — eventbus's configuration parameters (guc.c).
 */
#ifndef EB_GUC_H
#define EB_GUC_H

#include "nodes/pg_list.h"

extern char *eb_database;
extern char *eb_kafka_brokers;
extern char *eb_nats_url;
extern int	eb_default_transport;
extern int	eb_workers;
extern char *eb_consumer_group;
extern char *eb_kafka_properties;
extern char *eb_nats_credentials_file;
extern char *eb_nats_token;
extern int	eb_relay_batch_size;
extern int	eb_relay_interval_ms;
extern int	eb_ack_timeout_ms;
extern int	eb_max_payload_bytes;
extern int	eb_inbox_retention_min;
extern int	eb_handler_timeout_ms;
extern int	eb_dispatcher_memory_kb;
extern int	eb_consumer_mode;

/* eventbus.consumer_mode */
#define EB_CONSUMER_SINGLE	0	/* the only consumer of its group */
#define EB_CONSUMER_SHARED	1	/* several instances share the group */

extern void eb_define_gucs(void);
extern bool eb_kafka_properties_parse(const char *spec, List **names, List **values, char **err);
extern bool eb_kafka_property_mandatory(const char *name);
extern char *eb_mask_credentials(const char *s);
extern void eb_install_log_redaction(void);

#endif							/* EB_GUC_H */

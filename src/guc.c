/*
 * guc.c — the eventbus.* configuration parameters.
 *
 * Names and contexts of the parameters in DESIGN §3 are a contract.
 * Credentials and raw client properties are superuser-only and hidden from
 * other roles (GUC_SUPERUSER_ONLY).
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/guc.h"

#include "eventbus.h"

char	   *eb_database = NULL;
char	   *eb_kafka_brokers = NULL;
char	   *eb_nats_url = NULL;
int			eb_default_transport = EB_TRANSPORT_KAFKA;
int			eb_workers = 4;
char	   *eb_consumer_group = NULL;
char	   *eb_kafka_properties = NULL;
char	   *eb_nats_credentials_file = NULL;
char	   *eb_nats_token = NULL;
int			eb_relay_batch_size = 1000;
int			eb_ack_timeout_ms = 30000;
int			eb_max_payload_bytes = 1000000;
int			eb_inbox_retention_min = 7 * 24 * 60;

static const struct config_enum_entry transport_options[] = {
	{"kafka", EB_TRANSPORT_KAFKA, false},
	{"nats", EB_TRANSPORT_NATS, false},
	{NULL, 0, false}
};

/*
 * Define every eventbus.* GUC.  PostgreSQL refuses PGC_POSTMASTER variables
 * after startup, so those exist only when the library is preloaded (the only
 * case in which they mean anything).
 */
void
eb_define_gucs(void)
{
	bool		preloading = process_shared_preload_libraries_in_progress;

	if (preloading)
		DefineCustomStringVariable("eventbus.database",
								   "Database the eventbus background workers connect to.",
								   NULL, &eb_database, "postgres",
								   PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.kafka_brokers",
							   "Kafka bootstrap servers (host:port,...); empty disables Kafka.",
							   NULL, &eb_kafka_brokers, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.nats_url",
							   "NATS server URL(s), e.g. nats://127.0.0.1:4222; empty disables NATS.",
							   NULL, &eb_nats_url, "",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomEnumVariable("eventbus.default_transport",
							 "Transport eventbus_publish uses when none is given.",
							 NULL, &eb_default_transport, EB_TRANSPORT_KAFKA,
							 transport_options,
							 PGC_USERSET, 0, NULL, NULL, NULL);

	if (preloading)
		DefineCustomIntVariable("eventbus.workers",
								"Number of processes in the keyed-worker pool.",
								NULL, &eb_workers, 4, 1, 64,
								PGC_POSTMASTER, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.consumer_group",
							   "Kafka group.id and JetStream durable-name prefix.",
							   NULL, &eb_consumer_group, "eventbus",
							   PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.kafka_properties",
							   "Extra librdkafka properties, 'name=value' pairs separated by ';' (SASL, TLS, tuning).",
							   NULL, &eb_kafka_properties, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.nats_credentials_file",
							   "NATS user credentials (.creds) file.",
							   NULL, &eb_nats_credentials_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.nats_token",
							   "NATS authentication token.",
							   NULL, &eb_nats_token, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.relay_batch_size",
							"Maximum outbox rows the relay sends per round.",
							NULL, &eb_relay_batch_size, 1000, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.ack_timeout",
							"How long the relay waits for a broker acknowledgement before retrying.",
							NULL, &eb_ack_timeout_ms, 30000, 1000, 3600000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.max_payload_bytes",
							"Largest payload (JSON text) eventbus_publish accepts.",
							NULL, &eb_max_payload_bytes, 1000000, 1024, 100000000,
							PGC_SUSET, GUC_UNIT_BYTE, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.inbox_retention",
							"How long handled-event records are kept for duplicate detection; 0 keeps them forever.",
							NULL, &eb_inbox_retention_min, 7 * 24 * 60, 0, 10 * 365 * 24 * 60,
							PGC_SIGHUP, GUC_UNIT_MIN, NULL, NULL, NULL);

	MarkGUCPrefixReserved("eventbus");
}

/* Is the broker of this transport configured? */
bool
eb_transport_configured(int transport)
{
	const char *v = transport == EB_TRANSPORT_KAFKA ? eb_kafka_brokers : eb_nats_url;

	return v != NULL && v[0] != '\0';
}

/*
 * guc.c — the eventbus.* configuration parameters.
 *
 * Names and contexts of the documented parameters are a contract.
 * Credentials and raw client properties are superuser-only and hidden from
 * other roles (GUC_SUPERUSER_ONLY), and their values never reach the server
 * log: not through eventbus, and not through PostgreSQL's own "parameter
 * changed" or "invalid value" lines (redacted by an emit_log_hook).
 */
#include "postgres.h"

#include "miscadmin.h"
#include "tcop/tcopprot.h"
#include "utils/elog.h"
#include "utils/guc.h"
#include "utils/memutils.h"

#include "eventbus.h"
#include "guc.h"
#include "transport.h"

char	   *eb_database = NULL;
char	   *eb_kafka_brokers = NULL;
char	   *eb_nats_url = NULL;
int			eb_default_transport = 0;
int			eb_workers = 4;
char	   *eb_consumer_group = NULL;
char	   *eb_kafka_properties = NULL;
char	   *eb_nats_credentials_file = NULL;
char	   *eb_nats_token = NULL;
int			eb_relay_batch_size = 1000;
int			eb_relay_interval_ms = 5;
int			eb_ack_timeout_ms = 30000;
int			eb_max_payload_bytes = 1000000;
int			eb_inbox_retention_min = 7 * 24 * 60;
int			eb_handler_timeout_ms = 60000;
int			eb_dispatcher_memory_kb = 64 * 1024;
int			eb_consumer_mode = EB_CONSUMER_SINGLE;

/* Values of eventbus.default_transport: the registered transports. */
static struct config_enum_entry transport_options[EB_NTRANSPORTS + 1];

static const struct config_enum_entry consumer_mode_options[] = {
	{"single", EB_CONSUMER_SINGLE, false},
	{"shared", EB_CONSUMER_SHARED, false},
	{NULL, 0, false}
};

/*
 * librdkafka properties eventbus sets itself: the guarantees (idempotent,
 * ordered production; offsets stored only up to completed work; reading from
 * the earliest offset; callbacks on the main thread) depend on them.
 */
static const char *const mandatory_kafka_properties[] = {
	"bootstrap.servers", "metadata.broker.list", "group.id",
	"log.queue", "enable.idempotence", "partitioner", "acks",
	"request.required.acks", "message.timeout.ms", "delivery.timeout.ms",
	"enable.auto.commit", "enable.auto.offset.store", "auto.offset.reset",
	"enable.partition.eof", "enable.gapless.guarantee", NULL
};

/*
 * Split "name=value;name=value" into names and values (palloc'd lists).
 * "\;" is a ';' and "\\" a '\' inside a value or name; blanks around names
 * and before values are dropped; empty items are skipped.  On a malformed
 * item returns false with *err set; values are never quoted in *err.
 */
bool
eb_kafka_properties_parse(const char *spec, List **names, List **values, char **err)
{
	StringInfoData item;
	const char *p = spec ? spec : "";

	*names = NIL;
	*values = NIL;
	initStringInfo(&item);
	for (;;)
	{
		int			eq = -1;

		resetStringInfo(&item);
		for (; *p && *p != ';'; p++)
		{
			if (*p == '\\' && (p[1] == ';' || p[1] == '\\'))
				p++;
			else if (*p == '=' && eq < 0)
			{
				eq = item.len;
				appendStringInfoChar(&item, '\0');
				continue;
			}
			appendStringInfoChar(&item, *p);
		}
		{
			char	   *name = item.data;
			char	   *value;
			char	   *e;

			while (*name == ' ' || *name == '\t' || *name == '\n' || *name == '\r')
				name++;
			if (eq < 0)
			{
				if (*name != '\0')
				{
					*err = psprintf("item %d is not name=value", list_length(*names) + 1);
					return false;
				}
			}
			else
			{
				value = item.data + eq + 1;
				for (e = item.data + eq - 1; e >= name && (*e == ' ' || *e == '\t' || *e == '\n'); e--)
					*e = '\0';
				while (*value == ' ' || *value == '\t')
					value++;
				if (*name == '\0')
				{
					*err = psprintf("item %d has no property name", list_length(*names) + 1);
					return false;
				}
				*names = lappend(*names, pstrdup(name));
				*values = lappend(*values, pstrdup(value));
			}
		}
		if (*p == '\0')
			break;
		p++;
	}
	pfree(item.data);
	return true;
}

/* Is name a property eventbus sets itself? */
bool
eb_kafka_property_mandatory(const char *name)
{
	for (int i = 0; mandatory_kafka_properties[i]; i++)
		if (pg_strcasecmp(name, mandatory_kafka_properties[i]) == 0)
			return true;
	return false;
}

/* Check hook of eventbus.kafka_properties: well-formed, no mandatory property. */
static bool
check_kafka_properties(char **newval, void **extra, GucSource source)
{
	List	   *names;
	List	   *values;
	char	   *err = NULL;
	ListCell   *lc;

	if (!eb_kafka_properties_parse(*newval, &names, &values, &err))
	{
		GUC_check_errdetail("eventbus.kafka_properties: %s.", err);
		GUC_check_errhint("Use name=value pairs separated by ';'; write \\; for a ';' inside a value.");
		return false;
	}
	foreach(lc, names)
	{
		const char *name = lfirst(lc);

		if (eb_kafka_property_mandatory(name))
		{
			GUC_check_errdetail("eventbus sets Kafka property \"%s\" itself; it cannot be set in eventbus.kafka_properties.",
								name);
			GUC_check_errhint("Remove \"%s\" from the setting.", name);
			return false;
		}
	}
	return true;
}

/*
 * Copy of s with the user:password of every "scheme://user:password@host"
 * replaced by "***".
 */
char *
eb_mask_credentials(const char *s)
{
	StringInfoData out;
	const char *p = s;

	initStringInfo(&out);
	while (*p)
	{
		const char *scheme = strstr(p, "://");
		const char *q;

		if (scheme == NULL)
			break;
		appendBinaryStringInfo(&out, p, scheme + 3 - p);
		p = scheme + 3;
		for (q = p; *q && *q != '@' && *q != '/' && *q != ',' && *q != ' ' && *q != ';'; q++)
			;
		if (*q == '@')
		{
			appendStringInfoString(&out, "***");
			p = q;
		}
	}
	appendStringInfoString(&out, p);
	return out.data;
}

/* Keep a shown value in TopMemoryContext until the next call of its hook. */
static const char *
keep_shown(char **slot, char *value)
{
	if (*slot)
		pfree(*slot);
	*slot = MemoryContextStrdup(TopMemoryContext, value);
	pfree(value);
	return *slot;
}

/*
 * SHOW hooks: pg_read_all_settings (so pg_monitor) may read superuser-only
 * parameters; to anyone but a superuser they show no secret: property names
 * without values, URLs without user:password, no token.
 */
static const char *
show_kafka_properties(void)
{
	static char *shown = NULL;
	List	   *names;
	List	   *values;
	char	   *err;
	ListCell   *ln;
	StringInfoData out;

	if (superuser())
		return eb_kafka_properties;
	if (!eb_kafka_properties_parse(eb_kafka_properties, &names, &values, &err))
		return "(malformed)";
	initStringInfo(&out);
	foreach(ln, names)
	{
		const char *name = lfirst(ln);

		appendStringInfo(&out, "%s%s=***", out.len > 0 ? ";" : "", name);
	}
	return keep_shown(&shown, out.data);
}

static const char *
show_nats_url(void)
{
	static char *shown = NULL;

	if (superuser())
		return eb_nats_url;
	return keep_shown(&shown, eb_mask_credentials(eb_nats_url ? eb_nats_url : ""));
}

static const char *
show_nats_token(void)
{
	if (superuser())
		return eb_nats_token;
	return eb_nats_token && eb_nats_token[0] ? "***" : "";
}

/* Parameters whose values may hold credentials. */
static const char *const secret_gucs[] = {
	"eventbus.kafka_properties", "eventbus.nats_url", "eventbus.nats_token",
	"eventbus.nats_credentials_file", NULL
};

static emit_log_hook_type prev_emit_log_hook = NULL;

/* Does s name a secret parameter? */
static bool
mentions_secret_guc(const char *s)
{
	if (s == NULL)
		return false;
	for (int i = 0; secret_gucs[i]; i++)
		if (strstr(s, secret_gucs[i]) != NULL)
			return true;
	return false;
}

/*
 * Keep secret parameter values out of the server log: PostgreSQL logs a
 * reloaded parameter's new value ("parameter ... changed to ...") and an
 * invalid value ("invalid value for parameter ...") verbatim, and the
 * statement that set it.  Cut such messages after the parameter name.
 */
static void
redact_secrets_hook(ErrorData *edata)
{
	for (int i = 0; edata->message && secret_gucs[i]; i++)
	{
		char	   *at = strstr(edata->message, secret_gucs[i]);
		const char *rest;

		if (at == NULL)
			continue;
		/* Only a message that goes on after the name can hold a value. */
		rest = at + strlen(secret_gucs[i]);
		if (*rest == '"')
			rest++;
		if (*rest != '\0')
		{
			edata->message = psprintf("%.*s (value hidden)", (int) (rest - edata->message),
									  edata->message);
			edata->hide_stmt = true;
		}
		break;
	}
	if (mentions_secret_guc(debug_query_string))
		edata->hide_stmt = true;
	if (prev_emit_log_hook)
		prev_emit_log_hook(edata);
}

/* Install the log redaction (postmaster, inherited by every process). */
void
eb_install_log_redaction(void)
{
	prev_emit_log_hook = emit_log_hook;
	emit_log_hook = redact_secrets_hook;
}

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
							   "May carry user:password@; superuser-only for that reason.",
							   &eb_nats_url, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, show_nats_url);

	for (int t = 0; t < EB_NTRANSPORTS; t++)
		transport_options[t] = (struct config_enum_entry)
		{
			eb_transport_name(t), t, false
		};
	DefineCustomEnumVariable("eventbus.default_transport",
							 "Transport eventbus_publish uses when none is given.",
							 NULL, &eb_default_transport, 0,
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

	DefineCustomEnumVariable("eventbus.consumer_mode",
							 "Whether this database is the only consumer of eventbus.consumer_group (single) or shares it with other instances (shared).",
							 "single: eventbus takes every partition and durable itself (fastest restart). shared: Kafka partitions are split by the group protocol and each JetStream topic is consumed by one instance at a time, with fail-over.",
							 &eb_consumer_mode, EB_CONSUMER_SINGLE,
							 consumer_mode_options,
							 PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.kafka_properties",
							   "Extra librdkafka properties, 'name=value' pairs separated by ';' (SASL, TLS, tuning).",
							   "Write \\; for a ';' and \\\\ for a '\\' inside a value. Properties eventbus sets itself are refused.",
							   &eb_kafka_properties, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, check_kafka_properties, NULL, show_kafka_properties);

	DefineCustomStringVariable("eventbus.nats_credentials_file",
							   "NATS user credentials (.creds) file.",
							   NULL, &eb_nats_credentials_file, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, NULL);

	DefineCustomStringVariable("eventbus.nats_token",
							   "NATS authentication token.",
							   NULL, &eb_nats_token, "",
							   PGC_SIGHUP, GUC_SUPERUSER_ONLY, NULL, NULL, show_nats_token);

	DefineCustomIntVariable("eventbus.relay_batch_size",
							"Maximum outbox rows the relay reads at once for a round.",
							NULL, &eb_relay_batch_size, 1000, 1, 10000,
							PGC_SIGHUP, 0, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.relay_interval",
							"Least time between the starts of two relay rounds of one transport when commits outpace the relay.",
							"When commits arrived while a round was in flight, the next round waits until this long after the last started; a commit that finds the relay idle is sent at once. 0 starts a round as soon as the previous one is done.",
							&eb_relay_interval_ms, 5, 0, 1000,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

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

	DefineCustomIntVariable("eventbus.handler_timeout",
							"Longest a handler may run for one event before it is cancelled (a failed attempt); 0 = no limit.",
							NULL, &eb_handler_timeout_ms, 60000, 0, PG_INT32_MAX,
							PGC_SIGHUP, GUC_UNIT_MS, NULL, NULL, NULL);

	DefineCustomIntVariable("eventbus.dispatcher_memory",
							"Most message bytes the dispatcher holds before it stops fetching (Kafka's prefetch gets an eighth of it).",
							NULL, &eb_dispatcher_memory_kb, 64 * 1024, 1024, 4 * 1024 * 1024,
							PGC_SIGHUP, GUC_UNIT_KB, NULL, NULL, NULL);

	MarkGUCPrefixReserved("eventbus");
}

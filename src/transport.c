/*
 * transport.c — the transport registry: transport ids, names and SQL
 * arguments, and the per-transport checks publishing backends make.
 */
#include "postgres.h"

#include "fmgr.h"
#include "utils/builtins.h"

#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "transport.h"

/* Indexed by transport id. */
static const EbTransportRoutine *const transports[EB_NTRANSPORTS] = {
	[EB_TRANSPORT_KAFKA] = &eb_kafka_transport,
	[EB_TRANSPORT_NATS] = &eb_nats_transport,
};

/* The routine of a transport id. */
const EbTransportRoutine *
eb_transport(int transport)
{
	Assert(transport >= 0 && transport < EB_NTRANSPORTS);
	return transports[transport];
}

/* Name of a transport. */
const char *
eb_transport_name(int transport)
{
	return eb_transport(transport)->name;
}

/* Transport id from its name, -1 if unknown. */
int
eb_transport_from_name(const char *name)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		if (strcmp(name, transports[t]->name) == 0)
			return t;
	return -1;
}

/* A transport argument of a SQL function (NULL = default); ERROR if unknown. */
int
eb_transport_arg(FunctionCallInfo fcinfo, int argno)
{
	char	   *name;
	int			t;

	if (PG_ARGISNULL(argno))
		return eb_default_transport;
	name = text_to_cstring(PG_GETARG_TEXT_PP(argno));
	t = eb_transport_from_name(name);
	if (t < 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("unknown transport \"%s\"", name),
				 errhint("Use 'kafka' or 'nats', or NULL for eventbus.default_transport.")));
	return t;
}

/* Is the transport's broker setting set? */
bool
eb_transport_configured(int transport)
{
	return eb_transport(transport)->configured();
}

/* ERROR unless the transport's broker setting is set. */
void
eb_require_transport_configured(int transport)
{
	const EbTransportRoutine *tr = eb_transport(transport);

	if (!tr->configured())
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("transport \"%s\" is not configured", tr->name),
				 errhint("Set %s in postgresql.conf and reload.", tr->setting)));
}

/* The topic rules every transport shares, then the transport's own. */
void
eb_validate_topic_for_transport(const char *topic, int transport)
{
	eb_validate_topic(topic);
	eb_transport(transport)->check_topic(topic);
}

/*
 * Largest message the transport takes, in the units eb_event_wire_size
 * counts; *limit_name names the setting it comes from.
 */
int64
eb_transport_max_message(int transport, const char **limit_name)
{
	return eb_transport(transport)->max_message(limit_name);
}

/* Size of the message the relay sends for ev (envelope_len bytes of JSON). */
Size
eb_event_wire_size(const EbEvent *ev, int transport, Size envelope_len)
{
	return eb_transport(transport)->wire_size(ev, envelope_len);
}

/* At process exit: release every transport library's own resources. */
void
eb_transports_close_libraries(void)
{
	for (int t = 0; t < EB_NTRANSPORTS; t++)
		if (transports[t]->library_close)
			transports[t]->library_close();
}

/*
 * envelope.c — the wire format of DESIGN §4: validation of the identifying
 * fields, UUIDv7 event ids, and the JSON envelope and headers we send.
 * Inbound messages are decoded in decode.c.
 */
#include "postgres.h"

#include <sys/time.h>

#include "lib/stringinfo.h"
#include "common/jsonapi.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/datetime.h"
#include "utils/json.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"

/* Name of a transport. */
const char *
eb_transport_name(int transport)
{
	return transport == EB_TRANSPORT_KAFKA ? "kafka" : "nats";
}

/* Transport number from its name, -1 if unknown. */
int
eb_transport_from_name(const char *name)
{
	if (strcmp(name, "kafka") == 0)
		return EB_TRANSPORT_KAFKA;
	if (strcmp(name, "nats") == 0)
		return EB_TRANSPORT_NATS;
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

/* ERROR unless the transport's broker setting is set. */
void
eb_require_transport_configured(int transport)
{
	if (!eb_transport_configured(transport))
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("transport \"%s\" is not configured", eb_transport_name(transport)),
				 errhint("Set %s in postgresql.conf and reload.",
						 transport == EB_TRANSPORT_KAFKA ? "eventbus.kafka_brokers" : "eventbus.nats_url")));
}

/*
 * Name/value headers (text in the database encoding) as a JSON object text,
 * NULL when there are none.  Pairs that are not valid text are left out
 * (they cannot be JSON).
 */
char *
eb_headers_json(int n, char **names, char **values)
{
	StringInfoData buf;
	int			enc = GetDatabaseEncoding();

	if (n == 0)
		return NULL;
	initStringInfo(&buf);
	appendStringInfoChar(&buf, '{');
	for (int i = 0; i < n; i++)
	{
		if (!pg_verify_mbstr(enc, names[i], strlen(names[i]), true) ||
			!pg_verify_mbstr(enc, values[i], strlen(values[i]), true))
			continue;
		if (buf.len > 1)
			appendStringInfoChar(&buf, ',');
		escape_json(&buf, names[i]);
		appendStringInfoChar(&buf, ':');
		escape_json(&buf, values[i]);
	}
	appendStringInfoChar(&buf, '}');
	return buf.data;
}

/* Topic names: 1–249 characters of [A-Za-z0-9._-] (Kafka's rule). */
void
eb_validate_topic(const char *topic)
{
	size_t		len = strlen(topic);

	if (len == 0 || len > EB_MAX_TOPIC)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("invalid topic name: must be 1 to %d characters long", EB_MAX_TOPIC),
				 errdetail("The topic is %zu characters long.", len)));

	for (const char *p = topic; *p; p++)
	{
		if (!(isalnum((unsigned char) *p) && (unsigned char) *p < 128) &&
			*p != '.' && *p != '_' && *p != '-')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid topic name \"%s\"", topic),
					 errdetail("Character %d is not allowed.", (int) (p - topic) + 1),
					 errhint("Topic names use only A-Z, a-z, 0-9, '.', '_' and '-'.")));
	}
}

/*
 * The topic rules of one transport, on top of eb_validate_topic's: Kafka
 * refuses the names "." and ".."; a NATS subject is tokens separated by '.',
 * none of them empty (nats-server cannot capture "a..b" or ".a" in a stream).
 * Wildcards and whitespace are already outside the allowed characters.
 */
void
eb_validate_topic_for_transport(const char *topic, int transport)
{
	eb_validate_topic(topic);

	if (transport == EB_TRANSPORT_KAFKA)
	{
		if (strcmp(topic, ".") == 0 || strcmp(topic, "..") == 0)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid topic name \"%s\" for transport \"kafka\"", topic),
					 errdetail("Kafka does not allow the topic names \".\" and \"..\".")));
		return;
	}

	for (const char *p = topic; *p; p++)
	{
		if (*p == '.' && (p == topic || p[1] == '.' || p[1] == '\0'))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("invalid topic name \"%s\" for transport \"nats\"", topic),
					 errdetail("A NATS subject is tokens separated by '.'; the token %s character %d is empty.",
							   p == topic ? "before" : "after", (int) (p - topic) + 1),
					 errhint("Do not start or end the topic with '.' or repeat '.'.")));
	}
}

/*
 * Largest message the transport takes, in the units eb_event_wire_size
 * counts; *limit_name names the setting it comes from.
 *  - Kafka: the producer's message.max.bytes (librdkafka refuses a larger
 *    message before sending it): eventbus.kafka_properties, else 1,000,000.
 *  - NATS: the server's max_payload, which the relay learns when it
 *    connects, else 1 MB; and never above the consuming side's limit.
 */
int64
eb_transport_max_message(int transport, const char **limit_name)
{
	int64		limit = 0;

	if (transport == EB_TRANSPORT_KAFKA)
	{
		/* Parsed again only when the setting changed (it is per publish). */
		static char *parsed_spec = NULL;
		static int64 parsed_limit = 0;
		List	   *names;
		List	   *values;
		char	   *err;
		ListCell   *ln;
		ListCell   *lv;

		*limit_name = "message.max.bytes";
		if (parsed_spec && strcmp(parsed_spec, eb_kafka_properties ? eb_kafka_properties : "") == 0)
			return parsed_limit;
		limit = EB_KAFKA_DEFAULT_MAX_MESSAGE;
		if (eb_kafka_properties_parse(eb_kafka_properties, &names, &values, &err))
		{
			/* The last setting wins, as in librdkafka. */
			forboth(ln, names, lv, values)
			{
				char	   *end;
				long		v;

				if (strcmp(lfirst(ln), "message.max.bytes") != 0)
					continue;
				errno = 0;
				v = strtol(lfirst(lv), &end, 10);
				if (errno == 0 && *end == '\0' && v > 0)
					limit = v;
			}
		}
		if (parsed_spec)
			pfree(parsed_spec);
		parsed_spec = MemoryContextStrdup(TopMemoryContext,
										  eb_kafka_properties ? eb_kafka_properties : "");
		parsed_limit = limit;
		return limit;
	}

	*limit_name = "the NATS server's max_payload";
	limit = eb_shmem_nats_max_payload();
	return limit > 0 ? limit : EB_NATS_DEFAULT_MAX_PAYLOAD;
}

/* Bytes of a zigzag varint (Kafka record fields). */
static Size
zigzag_varint_size(int64 n)
{
	uint64		z = ((uint64) n << 1) ^ (uint64) (n >> 63);
	Size		bytes = 1;

	while (z >= 0x80)
	{
		z >>= 7;
		bytes++;
	}
	return bytes;
}

typedef struct WireSize
{
	int			transport;
	Size		bytes;
} WireSize;

static void
count_header(void *arg, const char *name, const char *value)
{
	WireSize   *ws = (WireSize *) arg;
	Size		nl = strlen(name);
	Size		vl = strlen(value);

	if (ws->transport == EB_TRANSPORT_KAFKA)
		ws->bytes += nl + vl + zigzag_varint_size(nl) + zigzag_varint_size(vl);
	else
		ws->bytes += nl + 2 + vl + 2;	/* "Name: value\r\n" */
}

/*
 * Size of the message the relay sends for ev, whose envelope (as encoded by
 * eb_envelope_encode) is envelope_len bytes, counted as the client library
 * checks it against the limit of eb_transport_max_message:
 *  - Kafka (librdkafka's check before producing): 36 bytes of maximum
 *    record overhead + key (the aggregate id) + value + serialized headers.
 *  - NATS (cnats' and the server's check): headers block
 *    "NATS/1.0\r\n" + "Name: value\r\n"... + "\r\n", including Nats-Msg-Id,
 *    plus the body.
 */
Size
eb_event_wire_size(const EbEvent *ev, int transport, Size envelope_len)
{
	WireSize	ws;

	ws.transport = transport;
	ws.bytes = 0;
	eb_event_headers(ev, count_header, &ws);
	if (transport == EB_TRANSPORT_KAFKA)
		return 36 + strlen(ev->aggregate_id) + envelope_len + ws.bytes;
	count_header(&ws, "Nats-Msg-Id", ev->event_id);
	return 10 + ws.bytes + 2 + envelope_len;
}

/* Is c allowed in an aggregate id ([A-Za-z0-9:_./-])? */
static bool
aggregate_id_char(unsigned char c)
{
	return (c < 128 && isalnum(c)) || c == ':' || c == '_' || c == '.' || c == '/' || c == '-';
}

/* Aggregate ids: 1–256 bytes of [A-Za-z0-9:_./-]. */
void
eb_validate_aggregate_id(const char *aggregate_id)
{
	size_t		len = strlen(aggregate_id);

	if (len == 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("aggregate_id must not be empty")));
	if (len > EB_MAX_AGGREGATE_ID)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("aggregate_id is too long"),
				 errdetail("It is %zu bytes; the limit is %d.", len, EB_MAX_AGGREGATE_ID)));

	for (const char *p = aggregate_id; *p; p++)
	{
		unsigned char c = (unsigned char) *p;

		if (!aggregate_id_char(c))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("aggregate_id contains an invalid character"),
					 errdetail("Byte %d (0x%02x) is not allowed.", (int) (p - aggregate_id) + 1, c),
					 errhint("Use only A-Z, a-z, 0-9 and the characters : _ . / -")));
	}
}

/*
 * Generate a UUIDv7 (RFC 9562): 48-bit Unix milliseconds, then a 12-bit
 * counter that keeps ids from one backend increasing within a millisecond,
 * then 62 random bits.
 */
void
eb_uuidv7(unsigned char out[16])
{
	static uint64 last_ms = 0;
	static uint16 counter = 0;
	struct timeval tv;
	uint64		ms;

	gettimeofday(&tv, NULL);
	ms = (uint64) tv.tv_sec * 1000 + tv.tv_usec / 1000;

	if (!pg_strong_random(out, 16))
		ereport(ERROR,
				(errcode(ERRCODE_INTERNAL_ERROR),
				 errmsg("could not generate random bytes for an event id")));

	if (ms <= last_ms)
	{
		ms = last_ms;
		if (++counter > 0x0fff)
		{
			/* Counter exhausted: borrow the next millisecond. */
			ms = ++last_ms;
			counter = out[6] & 0x03;
		}
	}
	else
	{
		last_ms = ms;
		/* Start low so many ids fit in one millisecond. */
		counter = ((out[6] << 8) | out[7]) & 0x01ff;
	}

	out[0] = (ms >> 40) & 0xff;
	out[1] = (ms >> 32) & 0xff;
	out[2] = (ms >> 24) & 0xff;
	out[3] = (ms >> 16) & 0xff;
	out[4] = (ms >> 8) & 0xff;
	out[5] = ms & 0xff;
	out[6] = 0x70 | ((counter >> 8) & 0x0f);
	out[7] = counter & 0xff;
	out[8] = 0x80 | (out[8] & 0x3f);
}

/* RFC 3339 in UTC with microseconds, e.g. 2026-11-21T00:13:02.123456Z. */
void
eb_format_timestamp(TimestampTz ts, char *buf, size_t len)
{
	struct pg_tm tm;
	fsec_t		fsec;

	if (timestamp2tm(ts, NULL, &tm, &fsec, NULL, NULL) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_DATETIME_VALUE_OUT_OF_RANGE),
				 errmsg("timestamp out of range")));
	snprintf(buf, len, "%04d-%02d-%02dT%02d:%02d:%02d.%06dZ",
			 tm.tm_year, tm.tm_mon, tm.tm_mday,
			 tm.tm_hour, tm.tm_min, tm.tm_sec, (int) fsec);
}

/* Append "name":"value" (value escaped), with a leading comma. */
static void
append_string_field(StringInfo buf, const char *name, const char *value)
{
	appendStringInfo(buf, ",\"%s\":", name);
	escape_json(buf, value);
}

/*
 * Encode the JSON envelope (DESIGN §4).  payload is already JSON text and is
 * embedded as a value, not a string.
 */
void
eb_envelope_encode(StringInfo buf, const EbEvent *ev)
{
	char		ts[64];

	eb_format_timestamp(ev->occurred_at, ts, sizeof(ts));

	appendStringInfoString(buf, "{\"event_id\":");
	escape_json(buf, ev->event_id);
	append_string_field(buf, "aggregate_id", ev->aggregate_id);
	append_string_field(buf, "event_type", ev->event_type);
	appendStringInfo(buf, ",\"event_version\":" INT64_FORMAT, ev->event_version);
	append_string_field(buf, "timestamp", ts);
	if (ev->trace_id)
		append_string_field(buf, "trace_id", ev->trace_id);
	if (ev->correlation_id)
		append_string_field(buf, "correlation_id", ev->correlation_id);
	if (ev->has_tenant)
		appendStringInfo(buf, ",\"tenant_id\":%d", ev->tenant_id);
	appendStringInfoString(buf, ",\"payload\":");
	appendStringInfoString(buf, ev->payload);
	appendStringInfoChar(buf, '}');
}

/*
 * Call fn for each header of the event: the X-* headers of DESIGN §4, then
 * the user's own headers.
 */
void
eb_event_headers(const EbEvent *ev, EbHeaderFn fn, void *arg)
{
	char		num[32];

	fn(arg, "X-Event-ID", ev->event_id);
	fn(arg, "X-Aggregate-ID", ev->aggregate_id);
	snprintf(num, sizeof(num), INT64_FORMAT, ev->event_version);
	fn(arg, "X-Event-Version", num);
	fn(arg, "X-Event-Type", ev->event_type);
	if (ev->trace_id)
		fn(arg, "X-Trace-ID", ev->trace_id);
	if (ev->correlation_id)
		fn(arg, "X-Correlation-ID", ev->correlation_id);
	if (ev->has_tenant)
	{
		snprintf(num, sizeof(num), "%d", ev->tenant_id);
		fn(arg, "X-Tenant-ID", num);
	}
	for (int i = 0; i < ev->nheaders; i++)
		fn(arg, ev->header_names[i], ev->header_values[i]);
}

/* Why an inbound aggregate id (len bytes, NUL bytes included) is invalid, or NULL. */
const char *
eb_aggregate_id_problem(const char *id, size_t len)
{
	if (len == 0)
		return "aggregate_id is empty";
	if (len > EB_MAX_AGGREGATE_ID)
		return "aggregate_id is longer than 256 bytes";
	for (size_t i = 0; i < len; i++)
		if (!aggregate_id_char((unsigned char) id[i]))
			return "aggregate_id contains a character outside [A-Za-z0-9:_./-]";
	return NULL;
}

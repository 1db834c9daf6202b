/*
 * outbox.c — eventbus_publish(): validate, assign the aggregate version,
 * insert the outbox row, make the commit durable, and wake the relay when the
 * transaction commits.
 *
 * Versions come from an upsert on eventbus.aggregate_versions whose row lock
 * is held to commit, so concurrent publishers of one (topic, aggregate) are
 * serialized: versions and outbox ids follow commit order, which is what
 * lets the relay send rows in id order.  The row itself goes into the
 * table and its indexes directly (direct_insert.c) while the outbox is as
 * the extension created it; one statement does both otherwise.
 *
 * Nothing that can never be delivered is accepted: the topic must be valid
 * for its transport, and the event, encoded exactly as the relay will send
 * it, must fit the transport's message size limit and what consumers accept.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/dependency.h"
#include "catalog/pg_type.h"
#include "commands/dbcommands.h"
#include "commands/sequence.h"
#include "executor/spi.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "direct_insert.h"
#include "envelope.h"
#include "eventbus.h"
#include "guc.h"
#include "transport.h"
#include "util.h"

PG_FUNCTION_INFO_V1(eventbus_publish);

/* The arguments of the statements below, as numbered there. */
enum
{
	A_TOPIC, A_AGGREGATE, A_TYPE, A_PAYLOAD, A_TRANSPORT, A_VERSION,
	A_TRACE, A_CORRELATION, A_TENANT, A_HEADERS, A_EVENT_ID, N_ARGS
};

static SPIPlanPtr insert_plan = NULL;
static SPIPlanPtr upsert_plan = NULL;
static Oid	insert_types[N_ARGS] = {TEXTOID, TEXTOID, TEXTOID, JSONBOID, TEXTOID,
	INT8OID, TEXTOID, TEXTOID, INT4OID, JSONBOID, UUIDOID};

/* The aggregate's version: $1 topic, $2 aggregate, $6 an explicit version. */
#define UPSERT_SQL \
	"INSERT INTO eventbus.aggregate_versions AS a (topic, aggregate_id, version)" \
	" VALUES ($1, $2, COALESCE($6, 1))" \
	" ON CONFLICT (topic, aggregate_id) DO UPDATE SET version =" \
	"  CASE WHEN $6 IS NULL THEN a.version OPERATOR(pg_catalog.+) 1 ELSE GREATEST(a.version, $6) END" \
	" RETURNING version"

/* The version and the outbox row in one statement (outbox not as created). */
#define INSERT_SQL \
	"WITH v AS (" UPSERT_SQL ")" \
	" INSERT INTO eventbus.outbox (event_id, transport, topic, aggregate_id," \
	"  event_type, event_version, occurred_at, trace_id, correlation_id," \
	"  tenant_id, payload, headers)" \
	" SELECT $11, $5, $1, $2, $3, COALESCE($6, v.version), pg_catalog.clock_timestamp()," \
	"  $7, $8, $9, $4, $10 FROM v RETURNING event_version"

/* eventbus.outbox's columns as the extension creates it (id: identity). */
static const Oid outbox_types[] = {INT8OID, UUIDOID, TEXTOID, TEXTOID, TEXTOID,
	TEXTOID, INT8OID, TIMESTAMPTZOID, TEXTOID, TEXTOID, INT4OID, JSONBOID, JSONBOID,
	INT4OID, TEXTOID};

/* The columns eventbus_publish may leave NULL: trace_id, correlation_id, tenant_id, headers, last_error. */
#define OUTBOX_NULLABLE ((UINT32_C(1) << 8) | (UINT32_C(1) << 9) | (UINT32_C(1) << 10) | \
						 (UINT32_C(1) << 12) | (UINT32_C(1) << 14))

/* The outbox whose id sequence is cached (until its relcache entry is invalidated). */
static Oid	seq_of_relid = InvalidOid;
static Oid	outbox_seqid = InvalidOid;

/* ERROR with 22004 naming the field when a required argument is NULL. */
static void
require_not_null(FunctionCallInfo fcinfo, int argno, const char *field)
{
	if (PG_ARGISNULL(argno))
		ereport(ERROR,
				(errcode(ERRCODE_NULL_VALUE_NOT_ALLOWED),
				 errmsg("%s must not be null", field)));
}

/* Header values and ids travel in protocol headers: no control characters. */
static void
validate_header_text(const char *field, const char *value)
{
	for (const char *p = value; *p; p++)
		if ((unsigned char) *p < 0x20 || *p == 0x7f)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("%s must not contain control characters", field)));
	if (strlen(value) > EB_MAX_USER_HEADER_VALUE)
		ereport(ERROR,
				(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
				 errmsg("%s is too long", field),
				 errdetail("The limit is %d bytes.", EB_MAX_USER_HEADER_VALUE)));
}

/* Is this header name one eventbus sets itself? */
static bool
reserved_header(const char *name)
{
	static const char *const reserved[] = {
		"X-Event-ID", "X-Aggregate-ID", "X-Event-Version", "X-Event-Type",
		"X-Trace-ID", "X-Correlation-ID", "X-Tenant-ID", NULL
	};

	if (pg_strncasecmp(name, "Nats-", 5) == 0)
		return true;
	for (int i = 0; reserved[i]; i++)
		if (pg_strcasecmp(name, reserved[i]) == 0)
			return true;
	return false;
}

/*
 * headers must be a JSON object of scalar (string, number, boolean) values
 * whose names are HTTP-style tokens and not reserved, within the count and
 * size limits.  Fills ev's header arrays with the names and the values as
 * the relay sends them (jsonb_each_text's text).
 */
static void
validate_headers(Jsonb *headers, EbEvent *ev)
{
	Size		bytes = 0;
	int			bad;

	if (!JB_ROOT_IS_OBJECT(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("headers must be a JSON object")));
	if (JB_ROOT_COUNT(headers) > EB_MAX_USER_HEADERS)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("headers: too many headers"),
				 errdetail("There are %u; the limit is %d.", JB_ROOT_COUNT(headers), EB_MAX_USER_HEADERS)));
	bad = eb_event_headers_from_jsonb(headers, ev);

	for (int i = 0; i < ev->nheaders; i++)
	{
		const char *name = ev->header_names[i];

		if (name[0] == '\0')
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("headers: a header name must not be empty")));
		if (strlen(name) > EB_MAX_HEADER_NAME)
			ereport(ERROR,
					(errcode(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
					 errmsg("headers: a header name is too long"),
					 errdetail("It is %zu bytes; the limit is %d.", strlen(name), EB_MAX_HEADER_NAME)));
		for (const char *p = name; *p; p++)
			if ((unsigned char) *p <= 0x20 || (unsigned char) *p >= 0x7f || *p == ':')
				ereport(ERROR,
						(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
						 errmsg("headers: invalid header name \"%s\"", name),
						 errhint("Header names are printable ASCII without spaces or ':'.")));
		if (reserved_header(name))
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("headers: header \"%s\" is reserved", name),
					 errdetail("eventbus sets the X-Event-*, X-Aggregate-ID, X-Trace-ID, X-Correlation-ID, X-Tenant-ID and Nats-* headers itself.")));
		if (i == bad)
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("headers: value of \"%s\" must be a string, number or boolean", name)));
		validate_header_text("headers", ev->header_values[i]);
		bytes += strlen(name) + strlen(ev->header_values[i]);
	}
	if (bytes > EB_MAX_USER_HEADER_BYTES)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("headers are too large"),
				 errdetail("Names and values take %zu bytes; the limit is %d.", bytes, EB_MAX_USER_HEADER_BYTES)));
}

/* Decimal digits of a positive version number. */
static int
version_digits(int64 v)
{
	int			d = 1;

	while (v >= 10)
	{
		v /= 10;
		d++;
	}
	return d;
}

/*
 * ERROR unless the event, as the relay will send it, fits the transport and
 * what the consuming side accepts.  wire and envelope are the sizes of
 * eb_event_wire_size and eb_envelope_encode.
 */
static void
check_event_size(int transport, Size wire, Size envelope)
{
	const char *limit_name;
	int64		limit = eb_transport_max_message(transport, &limit_name);

	if ((int64) wire > limit)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large for transport \"%s\"", eb_transport_name(transport)),
				 errdetail("The event would be a %zu-byte message (envelope %zu bytes, plus key and headers); "
						   "the limit is %lld bytes (%s).",
						   wire, envelope, (long long) limit, limit_name),
				 errhint("Publish a smaller payload, or raise %s. The envelope is JSON text: control characters in strings take 6 bytes each.",
						 eb_transport(transport)->max_message_hint)));
	/* The consuming side quarantines envelopes over max_payload_bytes + 64 kB. */
	if (envelope > (Size) eb_max_payload_bytes + 65536)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large"),
				 errdetail("The envelope would be %zu bytes; consumers accept at most eventbus.max_payload_bytes (%d) + 65536.",
						   envelope, eb_max_payload_bytes),
				 errhint("The envelope is JSON text: control characters in strings take 6 bytes each.")));
}

/* Relcache callback: the outbox changed (or everything did), look its sequence up again. */
static void
forget_outbox_sequence(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == seq_of_relid)
		seq_of_relid = InvalidOid;
}

/* The sequence of the outbox's identity column (rel opened, so invalidations are in). */
static Oid
outbox_sequence(Relation rel)
{
	static bool registered = false;

	if (!registered)
	{
		CacheRegisterRelcacheCallback(forget_outbox_sequence, (Datum) 0);
		registered = true;
	}
	if (seq_of_relid != RelationGetRelid(rel))
	{
		outbox_seqid = getIdentitySequence(RelationGetRelid(rel), 1, false);
		seq_of_relid = RelationGetRelid(rel);
	}
	return outbox_seqid;
}

/*
 * The version and the outbox row (args as the statements number them):
 * the version by the upsert, then the row written directly, its id drawn
 * after the upsert locked the aggregate's version row as the statement
 * draws it.  The one statement instead when the outbox is not as the
 * extension created it.  Returns the event's version.  The direct write
 * makes no executor checks of its own: a read-only transaction or parallel
 * mode is refused by the upsert statement, which always runs first.
 */
static int64
insert_event(Datum *args, char *nulls, TimestampTz occurred_at)
{
	Relation	rel;
	int64		version;
	bool		isnull;
	int			rc;

	rel = eb_open_own_table("outbox", RowExclusiveLock);
	if (!eb_direct_ok(rel, outbox_types, lengthof(outbox_types), 1, OUTBOX_NULLABLE))
	{
		table_close(rel, NoLock);
		rc = SPI_execute_plan(eb_keep_plan(&insert_plan, INSERT_SQL, N_ARGS, insert_types),
							  args, nulls, false, 0);
		if (rc != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
			elog(ERROR, "eventbus outbox insert failed: %s", SPI_result_code_string(rc));
		return DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull));
	}

	rc = SPI_execute_plan(eb_keep_plan(&upsert_plan, UPSERT_SQL, N_ARGS, insert_types),
						  args, nulls, false, 0);
	if (rc != SPI_OK_INSERT_RETURNING || SPI_processed != 1)
		elog(ERROR, "eventbus aggregate version upsert failed: %s", SPI_result_code_string(rc));
	version = nulls[A_VERSION] == 'n'
		? DatumGetInt64(SPI_getbinval(SPI_tuptable->vals[0], SPI_tuptable->tupdesc, 1, &isnull))
		: DatumGetInt64(args[A_VERSION]);

	{
		Datum		values[lengthof(outbox_types)];
		bool		rownulls[lengthof(outbox_types)];
		const int	from_arg[lengthof(outbox_types)] = {
			-1, A_EVENT_ID, A_TRANSPORT, A_TOPIC, A_AGGREGATE, A_TYPE, -1, -1,
			A_TRACE, A_CORRELATION, A_TENANT, A_PAYLOAD, A_HEADERS, -1, -1
		};
		EbDirectInsert *d;

		for (int i = 0; i < (int) lengthof(outbox_types); i++)
		{
			values[i] = from_arg[i] >= 0 ? args[from_arg[i]] : (Datum) 0;
			rownulls[i] = from_arg[i] >= 0 ? nulls[from_arg[i]] == 'n' : false;
		}
		values[0] = Int64GetDatum(nextval_internal(outbox_sequence(rel), true));
		values[6] = Int64GetDatum(version);
		values[7] = TimestampTzGetDatum(occurred_at);
		values[13] = Int32GetDatum(0);	/* attempts */
		rownulls[14] = true;			/* last_error */
		d = eb_direct_begin(rel);
		eb_direct_row(d, values, rownulls);
		eb_direct_end(d);
	}
	table_close(rel, NoLock);
	return version;
}

/* eventbus_publish(topic, aggregate_id, event_type, payload, ...) RETURNS uuid */
Datum
eventbus_publish(PG_FUNCTION_ARGS)
{
	char	   *topic;
	char	   *aggregate_id;
	char	   *event_type;
	Jsonb	   *payload;
	int			transport;
	pg_uuid_t  *event_id;
	EbEvent		ev;
	StringInfoData envelope;
	Size		wire;
	Datum		values[N_ARGS];
	char		nulls[N_ARGS];
	int64		version;

	eb_require_preload();

	require_not_null(fcinfo, 0, "topic");
	require_not_null(fcinfo, 1, "aggregate_id");
	require_not_null(fcinfo, 2, "event_type");
	require_not_null(fcinfo, 3, "payload");

	topic = text_to_cstring(PG_GETARG_TEXT_PP(0));
	aggregate_id = text_to_cstring(PG_GETARG_TEXT_PP(1));
	event_type = text_to_cstring(PG_GETARG_TEXT_PP(2));
	payload = PG_GETARG_JSONB_P(3);
	transport = eb_transport_arg(fcinfo, 4);

	eb_validate_topic_for_transport(topic, transport);
	eb_validate_aggregate_id(aggregate_id);
	if (event_type[0] == '\0')
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_type must not be empty")));
	validate_header_text("event_type", event_type);

	if (VARSIZE_ANY_EXHDR(payload) > (Size) eb_max_payload_bytes)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("payload is too large"),
				 errdetail("It is %zu bytes; eventbus.max_payload_bytes is %d.",
						   (size_t) VARSIZE_ANY_EXHDR(payload), eb_max_payload_bytes)));

	eb_require_transport_configured(transport);

	if (!PG_ARGISNULL(5) && PG_GETARG_INT64(5) <= 0)
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("event_version must be greater than zero"),
				 errdetail("Got " INT64_FORMAT ".", PG_GETARG_INT64(5))));

	/* The event as the relay will read it back from the outbox. */
	memset(&ev, 0, sizeof(ev));
	event_id = palloc(sizeof(pg_uuid_t));
	eb_uuidv7(event_id->data);
	ev.event_id = DatumGetCString(DirectFunctionCall1(uuid_out, UUIDPGetDatum(event_id)));
	ev.topic = topic;
	ev.aggregate_id = aggregate_id;
	ev.event_type = event_type;
	/* An automatic version is known after the insert: count it as 1 for now. */
	ev.event_version = PG_ARGISNULL(5) ? 1 : PG_GETARG_INT64(5);
	ev.occurred_at = GetCurrentTimestamp();	/* same width as the stored one */
	if (!PG_ARGISNULL(6))
	{
		ev.trace_id = text_to_cstring(PG_GETARG_TEXT_PP(6));
		validate_header_text("trace_id", ev.trace_id);
	}
	if (!PG_ARGISNULL(7))
	{
		ev.correlation_id = text_to_cstring(PG_GETARG_TEXT_PP(7));
		validate_header_text("correlation_id", ev.correlation_id);
	}
	ev.has_tenant = !PG_ARGISNULL(8);
	ev.tenant_id = ev.has_tenant ? PG_GETARG_INT32(8) : 0;
	if (!PG_ARGISNULL(9))
		validate_headers(PG_GETARG_JSONB_P(9), &ev);
	ev.payload = JsonbToCString(NULL, &payload->root, VARSIZE(payload));

	/* Measured as the relay will send it: in UTF-8. */
	eb_event_to_utf8(&ev);
	initStringInfo(&envelope);
	eb_envelope_encode(&envelope, &ev);
	wire = eb_event_wire_size(&ev, transport, envelope.len);
	check_event_size(transport, wire, envelope.len);

	/* Only the launcher's database is relayed: refuse rather than strand events. */
	if (strcmp(get_database_name(MyDatabaseId), eb_database) != 0)
		ereport(ERROR,
				(errcode(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
				 errmsg("eventbus relays events only from database \"%s\"", eb_database),
				 errdetail("Events published in database \"%s\" would never be sent.",
						   get_database_name(MyDatabaseId)),
				 errhint("Publish from database \"%s\", or set eventbus.database and restart.", eb_database)));

	values[A_TOPIC] = PointerGetDatum(cstring_to_text(topic));
	values[A_AGGREGATE] = PointerGetDatum(cstring_to_text(aggregate_id));
	values[A_TYPE] = PointerGetDatum(cstring_to_text(event_type));
	values[A_PAYLOAD] = PointerGetDatum(payload);
	values[A_TRANSPORT] = PointerGetDatum(cstring_to_text(eb_transport_name(transport)));
	memset(nulls, ' ', sizeof(nulls));
	for (int i = A_VERSION; i <= A_HEADERS; i++)
	{
		if (PG_ARGISNULL(i))
		{
			nulls[i] = 'n';
			values[i] = (Datum) 0;
		}
		else
			values[i] = PG_GETARG_DATUM(i);
	}
	values[A_EVENT_ID] = UUIDPGetDatum(event_id);

	/*
	 * The transaction id first, the row's id (the sequence) after it: the
	 * relay relies on that order to skip rows it relayed (relay_floor.c).
	 */
	(void) GetTopTransactionId();
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	version = insert_event(values, nulls, ev.occurred_at);
	if (PG_ARGISNULL(5))
	{
		int			extra = version_digits(version) - 1;

		/* The version appears in the envelope and in X-Event-Version. */
		if (extra > 0)
			check_event_size(transport, wire + 2 * extra, envelope.len + extra);
	}
	SPI_finish();

	/*
	 * The relay may send the event as soon as the transaction is visible, so
	 * its commit is flushed first, whatever synchronous_commit says.
	 */
	ForceSyncCommit();
	eb_published_at_commit(transport);

	PG_RETURN_UUID_P(event_id);
}

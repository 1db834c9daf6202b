/*
 * envelope.c — wire format, docs/wire-format.md: validation of the identifying
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
#include "utils/numeric.h"
#include "utils/timestamp.h"

#include "envelope.h"

/* A user header while eb_event_headers_from_jsonb sorts them. */
typedef struct HeaderPair
{
	char	   *name;
	char	   *value;
	bool		scalar;
} HeaderPair;

static int
header_pair_cmp(const void *a, const void *b)
{
	return strcmp(((const HeaderPair *) a)->name, ((const HeaderPair *) b)->name);
}

/*
 * The user headers of an outbox row (a jsonb object) into ev's header
 * arrays, in byte order of their names (docs/wire-format.md), each value as
 * jsonb_each_text gives it: a string's text, a number or boolean written
 * out, a null as "" and a nested value as its JSON text.  Returns the index
 * of the first value that is not a string, number or boolean (-1: none),
 * for eventbus_publish to refuse.
 */
int
eb_event_headers_from_jsonb(Jsonb *headers, EbEvent *ev)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	HeaderPair *pairs;
	int			n = 0;
	int			bad = -1;
	int			count = JB_ROOT_IS_OBJECT(headers) ? JB_ROOT_COUNT(headers) : 0;

	ev->nheaders = 0;
	ev->header_names = palloc(sizeof(char *) * Max(count, 1));
	ev->header_values = palloc(sizeof(char *) * Max(count, 1));
	if (count == 0)
		return -1;

	pairs = palloc(sizeof(HeaderPair) * count);
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			pairs[n].name = pnstrdup(v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE)
		{
			pairs[n].scalar = true;
			if (v.type == jbvString)
				pairs[n].value = pnstrdup(v.val.string.val, v.val.string.len);
			else if (v.type == jbvNumeric)
				pairs[n].value = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v.val.numeric)));
			else if (v.type == jbvBool)
				pairs[n].value = pstrdup(v.val.boolean ? "true" : "false");
			else
			{
				pairs[n].scalar = false;
				pairs[n].value = v.type == jbvBinary ?
					JsonbToCString(NULL, v.val.binary.data, v.val.binary.len) : pstrdup("");
			}
			n++;
		}
	}
	qsort(pairs, n, sizeof(HeaderPair), header_pair_cmp);

	for (int i = 0; i < n; i++)
	{
		ev->header_names[i] = pairs[i].name;
		ev->header_values[i] = pairs[i].value;
		if (!pairs[i].scalar && bad < 0)
			bad = i;
	}
	ev->nheaders = n;
	pfree(pairs);
	return bad;
}

/*
 * Name/value headers (text in the database encoding) as a jsonb object, NULL
 * when there are none: what jsonb_in reads from the object text of the
 * pairs, built directly (the pool makes one per event).  Pairs that are not
 * valid text are left out (they cannot be JSON); of repeated names the last
 * one is kept.
 */
Jsonb *
eb_headers_jsonb(int n, char **names, char **values)
{
	JsonbParseState *state = NULL;
	JsonbValue *obj;
	int			enc = GetDatabaseEncoding();

	if (n == 0)
		return NULL;
	(void) pushJsonbValue(&state, WJB_BEGIN_OBJECT, NULL);
	for (int i = 0; i < n; i++)
	{
		JsonbValue	name;
		JsonbValue	value;

		if (!pg_verify_mbstr(enc, names[i], strlen(names[i]), true) ||
			!pg_verify_mbstr(enc, values[i], strlen(values[i]), true))
			continue;
		name.type = jbvString;
		name.val.string.len = strlen(names[i]);
		name.val.string.val = names[i];
		value.type = jbvString;
		value.val.string.len = strlen(values[i]);
		value.val.string.val = values[i];
		(void) pushJsonbValue(&state, WJB_KEY, &name);
		(void) pushJsonbValue(&state, WJB_VALUE, &value);
	}
	obj = pushJsonbValue(&state, WJB_END_OBJECT, NULL);
	return JsonbValueToJsonb(obj);
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
 * Encode the JSON envelope (docs/wire-format.md).  payload is JSON text and is
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
 * Call fn for each header: the X-* headers of docs/wire-format.md, then
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

/* A string of the database encoding in UTF-8 (the same pointer if ASCII). */
static char *
to_utf8(char *s)
{
	return s ? pg_server_to_any(s, strlen(s), PG_UTF8) : NULL;
}

/*
 * Convert an event's text (read from the database) to UTF-8, the encoding
 * of the wire format, in place; nothing to do in a UTF-8 database.  The
 * identifying fields are ASCII by their validation; a character UTF-8
 * cannot hold (SQL_ASCII bytes that are not UTF-8) is an ERROR.
 */
void
eb_event_to_utf8(EbEvent *ev)
{
	if (GetDatabaseEncoding() == PG_UTF8)
		return;
	ev->event_type = to_utf8(ev->event_type);
	ev->trace_id = to_utf8(ev->trace_id);
	ev->correlation_id = to_utf8(ev->correlation_id);
	ev->payload = to_utf8(ev->payload);
	for (int i = 0; i < ev->nheaders; i++)
	{
		ev->header_names[i] = to_utf8(ev->header_names[i]);
		ev->header_values[i] = to_utf8(ev->header_values[i]);
	}
}

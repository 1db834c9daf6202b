/*
 * check_message.c — diagnostics of inbound messages:
 * eventbus_check_message(value, key, headers) says why the consumer would
 * quarantine a message (NULL when it would accept it), and
 * eventbus_decode_message(...) returns the envelope its handler would
 * receive (NULL when quarantined).
 *
 * Both run the dispatcher's decoder, then what the rest of the path does
 * with the result that could fail: for an accepted message, the work item
 * round trip to a pool worker and building the eventbus.envelope the
 * handler receives; for a rejected one, the quarantine row's headers.  So a
 * message they accept cannot make the dispatcher or a pool worker throw
 * before its handler runs (the fuzz harness in test/fuzz relies on this).
 */
#include "postgres.h"

#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"
#include "utils/numeric.h"

#include "envelope.h"
#include "eventbus.h"
#include "pool.h"
#include "transport.h"

PG_FUNCTION_INFO_V1(eventbus_check_message);
PG_FUNCTION_INFO_V1(eventbus_decode_message);

/* A header value given as a JSON scalar, as text (ERROR for containers). */
static char *
header_text(const char *name, JsonbValue *v)
{
	switch (v->type)
	{
		case jbvString:
			return pnstrdup(v->val.string.val, v->val.string.len);
		case jbvNumeric:
			return DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
		case jbvBool:
			return pstrdup(v->val.boolean ? "true" : "false");
		case jbvNull:
			return pstrdup("");
		default:
			ereport(ERROR,
					(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
					 errmsg("headers: value of \"%s\" must be a string, number or boolean", name)));
	}
	return NULL;				/* not reached */
}

/*
 * The headers argument (a JSON object) as name/value arrays in UTF-8, as
 * the consumers hand them to the dispatcher.
 */
static int
headers_arg(Jsonb *headers, char ***names, char ***values)
{
	JsonbIterator *it;
	JsonbValue	v;
	JsonbIteratorToken tok;
	int			n = 0;
	int			max = JB_ROOT_COUNT(headers);
	char	   *name = NULL;

	if (!JB_ROOT_IS_OBJECT(headers))
		ereport(ERROR,
				(errcode(ERRCODE_INVALID_PARAMETER_VALUE),
				 errmsg("headers must be a JSON object")));
	*names = palloc(sizeof(char *) * Max(max, 1));
	*values = palloc(sizeof(char *) * Max(max, 1));
	it = JsonbIteratorInit(&headers->root);
	while ((tok = JsonbIteratorNext(&it, &v, true)) != WJB_DONE)
	{
		if (tok == WJB_KEY)
			name = pnstrdup(v.val.string.val, v.val.string.len);
		else if (tok == WJB_VALUE)
		{
			char	   *value = header_text(name, &v);

			(*names)[n] = pg_server_to_any(name, strlen(name), PG_UTF8);
			(*values)[n] = pg_server_to_any(value, strlen(value), PG_UTF8);
			n++;
		}
	}
	return n;
}

/*
 * The consumer's path for the message in the arguments (value bytea, key
 * bytea, headers jsonb): the quarantine reason, or NULL with *envelope set.
 */
static const char *
check(FunctionCallInfo fcinfo, Datum *envelope)
{
	bytea	   *value = PG_ARGISNULL(0) ? NULL : PG_GETARG_BYTEA_PP(0);
	bytea	   *key = PG_ARGISNULL(1) ? NULL : PG_GETARG_BYTEA_PP(1);
	char	  **names = NULL;
	char	  **values = NULL;
	int			n = 0;
	const char *reason;
	EbWorkItem	item;
	EbWorkItem	back;
	StringInfoData buf;

	if (!PG_ARGISNULL(2))
		n = headers_arg(PG_GETARG_JSONB_P(2), &names, &values);

	/* A NULL value is what a Kafka tombstone looks like: an empty message. */
	memset(&item, 0, sizeof(item));
	reason = eb_envelope_decode(value ? VARDATA_ANY(value) : "",
								value ? VARSIZE_ANY_EXHDR(value) : 0,
								key ? VARDATA_ANY(key) : NULL,
								key ? VARSIZE_ANY_EXHDR(key) : 0,
								n, names, values, &item.ev);
	if (reason != NULL)
	{
		/* The quarantine row's headers, as the dispatcher writes them. */
		(void) eb_inbound_headers_jsonb(n, names, values);
		return reason;
	}

	/* What the dispatcher sends a pool worker, and what the worker builds. */
	item.tag = 1;
	item.max_attempts = 1;
	/* As documented: a keyed message is taken for a Kafka message. */
	item.transport = eb_transport_from_name(key ? "kafka" : "nats");
	item.ev.topic = "";
	initStringInfo(&buf);
	eb_workitem_encode(&buf, &item);
	eb_workitem_decode(buf.data, buf.len, &back);
	*envelope = eb_make_envelope(&back);
	return NULL;
}

/*
 * eventbus_check_message(value bytea, key bytea DEFAULT NULL,
 *                        headers jsonb DEFAULT NULL) RETURNS text
 */
Datum
eventbus_check_message(PG_FUNCTION_ARGS)
{
	Datum		envelope;
	const char *reason = check(fcinfo, &envelope);

	if (reason == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(reason));
}

/*
 * eventbus_decode_message(value bytea, key bytea DEFAULT NULL,
 *                         headers jsonb DEFAULT NULL) RETURNS eventbus.envelope
 * (topic empty; transport 'kafka' when a key is given, else 'nats')
 */
Datum
eventbus_decode_message(PG_FUNCTION_ARGS)
{
	Datum		envelope;

	if (check(fcinfo, &envelope) != NULL)
		PG_RETURN_NULL();
	PG_RETURN_DATUM(envelope);
}

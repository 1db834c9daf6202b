/*
 * decode.c — the inbound decoder (docs/wire-format.md).  It never throws for
 * any input: a broker message must never stop consumption, so every way a
 * message can be unusable becomes a quarantine reason.
 *
 * Each limit is checked before the PostgreSQL routine that would raise an
 * ERROR on it runs: the nesting depth before the recursive JSON parser
 * (which stops at the stack depth limit), number ranges before numeric_in,
 * the character set before the JSON parser, the size of the jsonb before
 * building it, header counts and sizes before the work item and the
 * envelope's headers are built; timestamps are read by a parser of our own
 * (the checks of the text are in inbound_text.c).  The JSON syntax is
 * checked by pg_parse_json, which reports errors by return code, in the
 * same pass that builds the jsonb (as jsonb_in would).  What
 * is left (running out of memory) is caught by a narrow safety net,
 * decode_guarded(); the fuzz harness in test/fuzz checks that it never
 * fires for anything else.
 */
#include "postgres.h"

#include "common/jsonapi.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/memutils.h"
#include "utils/resowner.h"
#include "utils/timestamp.h"

#include "envelope.h"
#include "guc.h"

/* Upper bound of the jsonb bytes a JSON token needs beyond its text
 * (JEntry, alignment, container and numeric headers). */
#define JSONB_BYTES_PER_TOKEN	32
/* jsonb offsets have 28 bits (JENTRY_OFFLENMASK): stay well below. */
#define JSONB_SIZE_LIMIT		200000000
/* Quarantine reasons are clipped to about this many bytes. */
#define REASON_MAX				400

/* The top level of the message, as the JSON parser reports it. */
typedef struct TopLevel
{
	int			depth;
	int			nfields;
	int			maxfields;
	char	  **fields;			/* names of the top-level fields */
} TopLevel;

/* The names of the top-level fields, as the JSON parser reports them. */
static void
top_field(TopLevel *t, char *fname)
{
	if (t->depth != 1)
		return;
	if (t->nfields == t->maxfields)
	{
		t->maxfields = Max(16, t->maxfields * 2);
		t->fields = t->fields ? repalloc(t->fields, sizeof(char *) * t->maxfields) :
			palloc(sizeof(char *) * t->maxfields);
	}
	t->fields[t->nfields++] = fname;
}

/*
 * One pass of the JSON parser both checks the message and builds its jsonb,
 * with the same values, in the same order, as jsonb_in would (a second
 * parse was a quarter of decoding).  It builds only what decode() has
 * already found buildable: an object whose numbers numeric_in takes and
 * whose size jsonb can hold (the prescan), so nothing here throws.
 */
typedef struct ParseState
{
	TopLevel	top;
	bool		build;
	const char *number_problem; /* a number token numeric cannot hold */
	JsonbParseState *ps;
	JsonbValue *res;
} ParseState;

static void
parse_push(ParseState *p, JsonbIteratorToken tok, JsonbValue *v)
{
	if (p->build)
		p->res = pushJsonbValue(&p->ps, tok, v);
}

/* A container starts (depth 1) or ends (-1). */
static void
parse_nest(void *arg, int depth, JsonbIteratorToken tok)
{
	((ParseState *) arg)->top.depth += depth;
	parse_push(arg, tok, NULL);
}

static void
parse_object_start(void *arg)
{
	parse_nest(arg, 1, WJB_BEGIN_OBJECT);
}

static void
parse_object_end(void *arg)
{
	parse_nest(arg, -1, WJB_END_OBJECT);
}

static void
parse_array_start(void *arg)
{
	parse_nest(arg, 1, WJB_BEGIN_ARRAY);
}

static void
parse_array_end(void *arg)
{
	parse_nest(arg, -1, WJB_END_ARRAY);
}

static void
parse_field(void *arg, char *fname, bool isnull)
{
	JsonbValue	v;

	top_field(&((ParseState *) arg)->top, fname);
	v.type = jbvString;
	v.val.string.len = strlen(fname);
	v.val.string.val = fname;
	parse_push(arg, WJB_KEY, &v);
}

static void
parse_scalar(void *arg, char *token, JsonTokenType tokentype)
{
	ParseState *p = arg;
	JsonbValue	v;

	if (!p->build)
		return;
	/* Only inside the top-level object (build says it is one). */
	if (p->ps == NULL)
	{
		p->build = false;		/* a scalar at the top: no envelope to build */
		return;
	}
	switch (tokentype)
	{
		case JSON_TOKEN_STRING:
			v.type = jbvString;
			v.val.string.len = strlen(token);
			v.val.string.val = token;
			break;
		case JSON_TOKEN_NUMBER:

			/*
			 * The prescan judged the text's runs of number characters; a
			 * run that is not one number (1e999999-5) reaches here as its
			 * first token before the parser fails on the rest.
			 */
			{
				int64		growth;
				const char *problem = eb_json_number_problem(token, strlen(token), &growth);

				if (problem != NULL)
				{
					p->build = false;
					p->number_problem = problem;
					return;
				}
			}
			v.type = jbvNumeric;
			v.val.numeric = DatumGetNumeric(DirectFunctionCall3(numeric_in, CStringGetDatum(token),
																ObjectIdGetDatum(InvalidOid),
																Int32GetDatum(-1)));
			break;
		case JSON_TOKEN_TRUE:
		case JSON_TOKEN_FALSE:
			v.type = jbvBool;
			v.val.boolean = tokentype == JSON_TOKEN_TRUE;
			break;
		case JSON_TOKEN_NULL:
		default:				/* the parser reports no other scalar */
			v.type = jbvNull;
			break;
	}
	parse_push(p, p->ps->contVal.type == jbvArray ? WJB_ELEM : WJB_VALUE, &v);
}

static int
compare_names(const void *a, const void *b)
{
	return strcmp(*(char *const *) a, *(char *const *) b);
}

/* A field that occurs twice at the top level, or NULL. */
static const char *
duplicate_field(TopLevel *t)
{
	if (t->nfields > 1)
		qsort(t->fields, t->nfields, sizeof(char *), compare_names);
	for (int i = 1; i < t->nfields; i++)
		if (strcmp(t->fields[i - 1], t->fields[i]) == 0)
			return t->fields[i];
	return NULL;
}

/* What a JSON text that is not an object is, from its first byte. */
static const char *
json_kind(const char *s, size_t len)
{
	size_t		i = 0;

	while (i < len && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r'))
		i++;
	if (i >= len)
		return "nothing";
	switch (s[i])
	{
		case '{':
			return "an object";
		case '[':
			return "an array";
		case '"':
			return "a string";
		case 't':
		case 'f':
			return "a boolean";
		case 'n':
			return "null";
		default:
			return "a number";
	}
}

/* Canonical lower-case UUID text, or false if s is not a UUID. */
static bool
canonical_uuid(const char *s, int len, char out[37])
{
	static const int dashes[] = {8, 13, 18, 23};
	int			d = 0;

	if (len != 36)
		return false;
	for (int i = 0; i < 36; i++)
	{
		if (d < 4 && i == dashes[d])
		{
			if (s[i] != '-')
				return false;
			out[i] = '-';
			d++;
		}
		else if (isxdigit((unsigned char) s[i]))
			out[i] = tolower((unsigned char) s[i]);
		else
			return false;
	}
	out[36] = '\0';
	return true;
}

/* Look up a top-level field of the envelope (absent and null alike: false). */
static bool
get_field(Jsonb *jb, const char *key, JsonbValue *v)
{
	return getKeyJsonValueFromContainer(&jb->root, key, strlen(key), v) != NULL &&
		v->type != jbvNull;
}

/* Optional string field: NULL when absent; *problem set when not a string. */
static char *
optional_string(Jsonb *jb, const char *key, const char **problem, const char *msg)
{
	JsonbValue	v;

	if (!get_field(jb, key, &v))
		return NULL;
	if (v.type != jbvString)
	{
		*problem = msg;
		return NULL;
	}
	return pnstrdup(v.val.string.val, v.val.string.len);
}

/* An integral numeric within [min, max], else false. */
static bool
numeric_integer(JsonbValue *v, int64 min, int64 max, int64 *out)
{
	char	   *text;
	char	   *end;
	long long	n;

	if (v->type != jbvNumeric)
		return false;
	text = DatumGetCString(DirectFunctionCall1(numeric_out, NumericGetDatum(v->val.numeric)));
	errno = 0;
	n = strtoll(text, &end, 10);
	if (errno != 0 || *end != '\0' || n < min || n > max)
		return false;
	*out = n;
	return true;
}

/* Why the headers break the limits, or NULL. */
static const char *
header_problem(int n, char **names, char **values)
{
	size_t		total = 0;

	if (n > EB_MAX_HEADERS)
		return psprintf("message has %d headers, more than %d", n, EB_MAX_HEADERS);
	for (int i = 0; i < n; i++)
	{
		size_t		nl = strlen(names[i]);
		size_t		vl = strlen(values[i]);

		if (nl > EB_MAX_HEADER_NAME)
			return psprintf("header %d has a name of %zu bytes, more than %d",
							i + 1, nl, EB_MAX_HEADER_NAME);
		if (vl > EB_MAX_HEADER_VALUE)
			return psprintf("header \"%s\" has a value of %zu bytes, more than %d",
							eb_printable(names[i], nl, 64), vl, EB_MAX_HEADER_VALUE);
		total += nl + vl;
	}
	if (total > EB_MAX_HEADER_BYTES)
		return psprintf("message has %zu bytes of headers, more than %d", total, EB_MAX_HEADER_BYTES);
	return NULL;
}

/*
 * The headers that are text, in the database encoding: those that are not
 * valid UTF-8, or that the database encoding cannot represent, are left
 * out.  At most EB_MAX_HEADERS of them and EB_MAX_HEADER_BYTES in all, each
 * within the size limits (the headers of a quarantined message may break
 * them).
 */
static int
text_headers(int n, char **names, char **values, char ***out_names, char ***out_values)
{
	int			count = 0;
	size_t		total = 0;

	*out_names = palloc(sizeof(char *) * Max(Min(n, EB_MAX_HEADERS), 1));
	*out_values = palloc(sizeof(char *) * Max(Min(n, EB_MAX_HEADERS), 1));
	for (int i = 0; i < n && count < EB_MAX_HEADERS; i++)
	{
		size_t		nl = strlen(names[i]);
		size_t		vl = strlen(values[i]);
		char	   *cn;
		char	   *cv;
		size_t		l;

		if (nl > EB_MAX_HEADER_NAME || vl > EB_MAX_HEADER_VALUE ||
			total + nl + vl > EB_MAX_HEADER_BYTES ||
			!pg_verify_mbstr(PG_UTF8, names[i], (int) nl, true) ||
			!pg_verify_mbstr(PG_UTF8, values[i], (int) vl, true) ||
			!eb_utf8_to_server(names[i], nl, &cn, &l) ||
			!eb_utf8_to_server(values[i], vl, &cv, &l))
			continue;
		total += nl + vl;
		(*out_names)[count] = cn;
		(*out_values)[count] = cv;
		count++;
	}
	return count;
}

/*
 * The headers of an inbound message as a jsonb object for the quarantine row
 * (NULL when none): those text_headers() keeps.  Never throws.
 */
Jsonb *
eb_inbound_headers_jsonb(int n, char **names, char **values)
{
	char	  **tn;
	char	  **tv;
	int			count;

	if (n == 0)
		return NULL;
	if (eb_needs_conversion())
		(void) eb_utf8_to_server_conversion();
	count = text_headers(n, names, values, &tn, &tv);
	return eb_headers_jsonb(count, tn, tv);
}

/*
 * The decoder proper, allocating in the current (decode) context; see
 * eb_envelope_decode.
 */
static const char *
decode(const char *data, size_t len, const char *key, size_t keylen,
	   int nheaders, char **header_names, char **header_values, EbEvent *ev)
{
	EbJsonScan	scan;
	ParseState	parse;
	JsonSemAction sem;
	JsonLexContext *lex;
	JsonParseErrorType jerr;
	Jsonb	   *jb;
	JsonbValue	v;
	const char *problem = NULL;
	const char *unbuildable = NULL;
	const char *kind;
	const char *nul;
	char	   *text;
	size_t		textlen;
	char		uuid[37];
	int64		n;
	int			valid;

	if (len == 0)
		return "empty message";
	if (len > (size_t) eb_max_payload_bytes + 65536)
		return psprintf("message is %zu bytes, larger than eventbus.max_payload_bytes + 64 kB", len);
	if ((problem = header_problem(nheaders, header_names, header_values)) != NULL)
		return problem;
	if ((nul = memchr(data, '\0', len)) != NULL)
		return psprintf("message contains a NUL byte (at byte %zu)", (size_t) (nul - data));
	if ((valid = pg_encoding_verifymbstr(PG_UTF8, data, (int) len)) < (int) len)
		return psprintf("message is not valid UTF-8 (at byte %d)", valid);
	if ((problem = eb_json_prescan(data, len, &scan)) != NULL)
		return problem;

	/* The text in the database encoding, NUL-terminated for jsonb_in. */
	if (eb_needs_conversion())
	{
		text = eb_unescape_non_ascii(data, len, &textlen);
		if (!eb_utf8_to_server(text, textlen, &text, &textlen))
			return psprintf("message contains characters the database encoding %s cannot represent",
							GetDatabaseEncodingName());
	}
	else
	{
		text = pnstrdup(data, len);
		textlen = len;
	}

	/*
	 * What the prescan found that rules out the jsonb; reported after the
	 * syntax and the top level, as before a jsonb was built in the parse.
	 */
	if (scan.number_problem)
		unbuildable = psprintf("message has a number numeric cannot hold (%s)", scan.number_problem);
	else if ((int64) textlen + scan.tokens * JSONB_BYTES_PER_TOKEN > JSONB_SIZE_LIMIT)
		unbuildable = "message has too many JSON values to be stored as jsonb";
	else if (scan.number_growth > (int64) eb_max_payload_bytes + 65536)
		unbuildable = "message has numbers that written out in full exceed eventbus.max_payload_bytes + 64 kB";

	/*
	 * The syntax, and the top level: an object without duplicate fields; its
	 * jsonb is built in the same pass unless ruled out.
	 */
	kind = json_kind(text, textlen);
	memset(&parse, 0, sizeof(parse));
	parse.build = strcmp(kind, "an object") == 0 && unbuildable == NULL;
	memset(&sem, 0, sizeof(sem));
	sem.semstate = &parse;
	sem.object_start = parse_object_start;
	sem.object_end = parse_object_end;
	sem.array_start = parse_array_start;
	sem.array_end = parse_array_end;
	sem.object_field_start = parse_field;
	sem.scalar = parse_scalar;
	lex = makeJsonLexContextCstringLen(text, (int) textlen, GetDatabaseEncoding(), true);
	if ((jerr = pg_parse_json(lex, &sem)) != JSON_SUCCESS)
		return psprintf("message is not valid JSON: %s", json_errdetail(jerr, lex));
	if (strcmp(kind, "an object") != 0)
		return psprintf("message is not a JSON object but %s", kind);
	if ((problem = duplicate_field(&parse.top)) != NULL)
		return psprintf("the envelope has the field \"%s\" more than once",
						eb_printable(problem, strlen(problem), 64));
	if (unbuildable)
		return unbuildable;
	if (!parse.build || parse.res == NULL)	/* not expected: see parse_scalar */
		return psprintf("message has a number numeric cannot hold (%s)",
						parse.number_problem ? parse.number_problem : "unknown");
	jb = JsonbValueToJsonb(parse.res);

	/* event_id: a non-empty string holding a UUID */
	if (!get_field(jb, "event_id", &v))
		return "event_id is missing";
	if (v.type != jbvString || v.val.string.len == 0)
		return "event_id is not a non-empty string";
	if (!canonical_uuid(v.val.string.val, v.val.string.len, uuid))
		return "event_id is not a UUID";
	ev->event_id = pstrdup(uuid);

	/* aggregate_id: envelope, else the X-Aggregate-ID header, else the key */
	if (get_field(jb, "aggregate_id", &v))
	{
		if (v.type != jbvString)
			return "aggregate_id is not a string";
		ev->aggregate_id = pnstrdup(v.val.string.val, v.val.string.len);
		problem = eb_aggregate_id_problem(v.val.string.val, v.val.string.len);
	}
	else
	{
		const char *hdr = NULL;

		for (int i = 0; i < nheaders && hdr == NULL; i++)
			if (pg_strcasecmp(header_names[i], "X-Aggregate-ID") == 0)
				hdr = header_values[i];
		if (hdr != NULL)
		{
			ev->aggregate_id = pstrdup(hdr);
			problem = eb_aggregate_id_problem(hdr, strlen(hdr));
		}
		else if (key != NULL && keylen > 0)
		{
			/* the whole key: a NUL byte in it is a bad character */
			ev->aggregate_id = pnstrdup(key, keylen);
			problem = eb_aggregate_id_problem(key, keylen);
		}
		else
			return "no aggregate id (envelope field, X-Aggregate-ID header or key)";
	}
	if (problem)
		return problem;

	/* event_type: non-empty string */
	if (!get_field(jb, "event_type", &v))
		return "event_type is missing";
	if (v.type != jbvString || v.val.string.len == 0)
		return "event_type is not a non-empty string";
	ev->event_type = pnstrdup(v.val.string.val, v.val.string.len);

	/* event_version: integer > 0 */
	if (!get_field(jb, "event_version", &v))
		return "event_version is missing";
	if (!numeric_integer(&v, 1, PG_INT64_MAX, &n))
		return "event_version is not an integer from 1 to 9223372036854775807";
	ev->event_version = n;

	/* timestamp: optional RFC 3339; receipt time when absent */
	ev->occurred_at = GetCurrentTimestamp();
	if (get_field(jb, "timestamp", &v))
	{
		if (v.type != jbvString)
			return "timestamp is not a string";
		if (!eb_parse_rfc3339(v.val.string.val, v.val.string.len, &ev->occurred_at))
			return "timestamp is not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.fraction] and Z or +HH:MM/-HH:MM; years 0001-9999)";
	}

	ev->trace_id = optional_string(jb, "trace_id", &problem, "trace_id is not a string");
	ev->correlation_id = optional_string(jb, "correlation_id", &problem, "correlation_id is not a string");
	if (problem)
		return problem;
	if (get_field(jb, "tenant_id", &v))
	{
		if (!numeric_integer(&v, PG_INT32_MIN, PG_INT32_MAX, &n))
			return "tenant_id is not a 32-bit integer";
		ev->has_tenant = true;
		ev->tenant_id = (int32) n;
	}

	/* payload: required, any JSON value (null too) */
	if (getKeyJsonValueFromContainer(&jb->root, "payload", strlen("payload"), &v) == NULL)
		return "payload is missing";
	ev->payload_jsonb = (struct varlena *) JsonbValueToJsonb(&v);

	ev->nheaders = text_headers(nheaders, header_names, header_values,
								&ev->header_names, &ev->header_values);
	return NULL;
}

/*
 * Run decode() in the memory context work, with a safety net.  Everything
 * decode() calls was checked beforehand not to throw on this input; what
 * remains is running out of memory (or a check that is wrong: it is logged).
 * Catching an ERROR without a subtransaction is safe here because decode()
 * only computes in memory: it takes no lock, buffer pin, file, snapshot or
 * catalog reference (the one catalog lookup, of the encoding conversion,
 * happens before), so there is nothing a subtransaction abort would have to
 * release.  Restoring the memory context (an ERROR leaves ErrorContext
 * current), the resource owner and the interrupt holdoff count, and flushing
 * the error state, is the whole recovery.  A cancel or shutdown request is
 * re-thrown, never swallowed.
 */
static const char *
decode_guarded(MemoryContext work, const char *data, size_t len,
			   const char *key, size_t keylen,
			   int nheaders, char **header_names, char **header_values, EbEvent *ev)
{
	MemoryContext caller = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	uint32		holdoff = InterruptHoldoffCount;
	const char *volatile reason = NULL;

	PG_TRY();
	{
		MemoryContextSwitchTo(work);
		reason = decode(data, len, key, keylen, nheaders, header_names, header_values, ev);
		MemoryContextSwitchTo(caller);
	}
	PG_CATCH();
	{
		ErrorData  *edata;

		MemoryContextSwitchTo(caller);
		CurrentResourceOwner = owner;
		InterruptHoldoffCount = holdoff;
		edata = CopyErrorData();
		FlushErrorState();
		if (ERRCODE_TO_CATEGORY(edata->sqlerrcode) == ERRCODE_OPERATOR_INTERVENTION)
			ReThrowError(edata);
		ereport(WARNING,
				(errcode(edata->sqlerrcode),
				 errmsg("the inbound message decoder caught an error: %s", edata->message),
				 errdetail("The message is quarantined.")));
		reason = psprintf("internal error while decoding: %s", edata->message);
		FreeErrorData(edata);
		memset(ev, 0, sizeof(EbEvent));
	}
	PG_END_TRY();
	return reason;
}

/* A reason as stored: valid text in the database encoding, clipped. */
static char *
finish_reason(const char *r)
{
	size_t		len = strlen(r);

	if (!pg_verify_mbstr(GetDatabaseEncoding(), r, (int) len, true))
		return eb_printable(r, len, REASON_MAX);
	if (len > REASON_MAX)
		return psprintf("%.*s...", pg_mbcliplen(r, (int) len, REASON_MAX), r);
	return pstrdup(r);
}

static char *
copy_string(const char *s)
{
	return s ? pstrdup(s) : NULL;
}

/*
 * Decode an inbound message (value, Kafka key or NULL, headers in UTF-8)
 * into ev, allocated in the current memory context.  Returns NULL on
 * success, else the reason the message is quarantined.  Never throws for
 * any input (see decode_guarded), and leaves the current memory context as
 * it was on every path; its working memory is freed before it returns.
 *
 * The aggregate id comes from the envelope, else the X-Aggregate-ID header,
 * else the Kafka key (docs/wire-format.md); ev->headers: the headers that are
 * text, in the database encoding; ev->topic is left to the caller.
 */
const char *
eb_envelope_decode(const char *data, size_t len, const char *key, size_t keylen,
				   int nheaders, char **header_names, char **header_values, EbEvent *ev)
{
	MemoryContext work;
	EbEvent		tmp;
	const char *reason;

	memset(ev, 0, sizeof(EbEvent));
	memset(&tmp, 0, sizeof(EbEvent));
	if (eb_needs_conversion())
		(void) eb_utf8_to_server_conversion();	/* outside the safety net */
	work = AllocSetContextCreate(CurrentMemoryContext, "eventbus decode", ALLOCSET_DEFAULT_SIZES);
	reason = decode_guarded(work, data, len, key, keylen,
							nheaders, header_names, header_values, &tmp);
	if (reason != NULL)
		reason = finish_reason(reason);
	else
	{
		*ev = tmp;
		ev->event_id = copy_string(tmp.event_id);
		ev->aggregate_id = copy_string(tmp.aggregate_id);
		ev->event_type = copy_string(tmp.event_type);
		ev->trace_id = copy_string(tmp.trace_id);
		ev->correlation_id = copy_string(tmp.correlation_id);
		ev->payload_jsonb = palloc(VARSIZE(tmp.payload_jsonb));
		memcpy(ev->payload_jsonb, tmp.payload_jsonb, VARSIZE(tmp.payload_jsonb));
		ev->header_names = palloc(sizeof(char *) * Max(tmp.nheaders, 1));
		ev->header_values = palloc(sizeof(char *) * Max(tmp.nheaders, 1));
		for (int i = 0; i < tmp.nheaders; i++)
		{
			ev->header_names[i] = pstrdup(tmp.header_names[i]);
			ev->header_values[i] = pstrdup(tmp.header_values[i]);
		}
	}
	MemoryContextDelete(work);
	return reason;
}

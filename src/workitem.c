/*
 * workitem.c — the messages between the dispatcher and a pool worker on
 * their shm_mq: EbWorkItem in pqformat's network byte order (fixed fields,
 * then each string as an int32 byte count, -1 for NULL, and its bytes).
 *
 * Strings travel as raw bytes with explicit lengths: no encoding
 * conversion, any byte but NUL (they are C strings on both sides).  The
 * payload travels as the jsonb the dispatcher decoded, so the pool does not
 * parse it again.  The reading side is pqformat's bounds-checked cursor, so
 * a short or corrupt message ERRORs instead of reading past its end.
 */
#include "postgres.h"

#include "libpq/pqformat.h"

#include "envelope.h"
#include "pool.h"

/* Append a string (or NULL) with its length. */
static void
put_string(StringInfo buf, const char *s)
{
	size_t		len;

	if (s == NULL)
	{
		pq_sendint32(buf, (uint32) -1);
		return;
	}
	len = strlen(s);
	if (len > (size_t) PG_INT32_MAX)
		elog(ERROR, "work item string of %zu bytes is too long", len);
	pq_sendint32(buf, (uint32) len);
	pq_sendbytes(buf, s, (int) len);
}

/* Read a string written by put_string (palloc'd, NUL-terminated). */
static char *
get_string(StringInfo msg)
{
	int32		n = (int32) pq_getmsgint(msg, 4);
	const char *bytes;

	if (n == -1)
		return NULL;
	/* pq_getmsgbytes rejects a negative or too large count. */
	bytes = pq_getmsgbytes(msg, n);
	if (memchr(bytes, '\0', n) != NULL)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("corrupt work item: string contains a NUL byte")));
	return pnstrdup(bytes, n);
}

/* Append a varlena (a jsonb) with its length; NULL as put_string's. */
static void
put_varlena(StringInfo buf, const struct varlena *v)
{
	if (v == NULL)
	{
		pq_sendint32(buf, (uint32) -1);
		return;
	}
	pq_sendint32(buf, (uint32) VARSIZE(v));
	pq_sendbytes(buf, (const char *) v, (int) VARSIZE(v));
}

/* Read a varlena written by put_varlena (palloc'd, so aligned). */
static struct varlena *
get_varlena(StringInfo msg)
{
	int32		n = (int32) pq_getmsgint(msg, 4);
	const char *bytes;
	struct varlena *v;

	if (n == -1)
		return NULL;
	bytes = pq_getmsgbytes(msg, n);
	if (n < VARHDRSZ)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("corrupt work item: a value of %d bytes", n)));
	v = palloc(n);
	memcpy(v, bytes, n);
	if (VARATT_IS_EXTENDED(v) || VARSIZE(v) != (Size) n)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("corrupt work item: a value's length does not match")));
	return v;
}

/* Serialize a work item. */
void
eb_workitem_encode(StringInfo buf, const EbWorkItem *item)
{
	const EbEvent *ev = &item->ev;

	pq_sendint64(buf, item->tag);
	pq_sendint64(buf, (uint64) item->subscription_id);
	pq_sendint32(buf, item->handler);
	pq_sendint32(buf, item->role);
	pq_sendint32(buf, (uint32) item->max_attempts);
	pq_sendint32(buf, (uint32) item->transport);
	pq_sendint64(buf, (uint64) item->received_at);
	pq_sendint64(buf, (uint64) ev->event_version);
	pq_sendint64(buf, (uint64) ev->occurred_at);
	pq_sendbyte(buf, ev->has_tenant ? 1 : 0);
	pq_sendint32(buf, (uint32) ev->tenant_id);
	pq_sendint32(buf, (uint32) ev->nheaders);
	put_string(buf, ev->event_id);
	put_string(buf, ev->topic);
	put_string(buf, ev->aggregate_id);
	put_string(buf, ev->event_type);
	put_string(buf, ev->trace_id);
	put_string(buf, ev->correlation_id);
	put_varlena(buf, ev->payload_jsonb);
	for (int i = 0; i < ev->nheaders; i++)
	{
		put_string(buf, ev->header_names[i]);
		put_string(buf, ev->header_values[i]);
	}
}

/* Names the work item in the CONTEXT of an error while decoding it. */
static void
decode_error_context(void *arg)
{
	errcontext("decoding a work item of %d bytes", *(int *) arg);
}

/* Deserialize a work item (strings palloc'd in the current context). */
void
eb_workitem_decode(const char *data, Size len, EbWorkItem *item)
{
	EbEvent    *ev = &item->ev;
	StringInfoData msg;
	ErrorContextCallback errcb;
	int			tenant;

	if (len > (Size) PG_INT32_MAX)
		ereport(ERROR,
				(errcode(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
				 errmsg("work item of %zu bytes is too large", len)));

	/* A read-only cursor over the received bytes; pq_getmsg* never write. */
	msg.data = unconstify(char *, data);
	msg.len = (int) len;
	msg.maxlen = (int) len;
	msg.cursor = 0;

	errcb.callback = decode_error_context;
	errcb.arg = &msg.len;
	errcb.previous = error_context_stack;
	error_context_stack = &errcb;

	memset(item, 0, sizeof(EbWorkItem));
	item->tag = (uint64) pq_getmsgint64(&msg);
	item->subscription_id = pq_getmsgint64(&msg);
	item->handler = (Oid) pq_getmsgint(&msg, 4);
	item->role = (Oid) pq_getmsgint(&msg, 4);
	item->max_attempts = (int32) pq_getmsgint(&msg, 4);
	item->transport = (int32) pq_getmsgint(&msg, 4);
	item->received_at = (TimestampTz) pq_getmsgint64(&msg);
	ev->event_version = pq_getmsgint64(&msg);
	ev->occurred_at = (TimestampTz) pq_getmsgint64(&msg);
	tenant = pq_getmsgbyte(&msg);
	ev->tenant_id = (int32) pq_getmsgint(&msg, 4);
	ev->nheaders = (int32) pq_getmsgint(&msg, 4);
	ev->has_tenant = tenant != 0;
	if (ev->nheaders < 0 || ev->nheaders > EB_MAX_HEADERS)
		ereport(ERROR,
				(errcode(ERRCODE_DATA_CORRUPTED),
				 errmsg("corrupt work item: %d headers", ev->nheaders)));
	ev->event_id = get_string(&msg);
	ev->topic = get_string(&msg);
	ev->aggregate_id = get_string(&msg);
	ev->event_type = get_string(&msg);
	ev->trace_id = get_string(&msg);
	ev->correlation_id = get_string(&msg);
	ev->payload_jsonb = get_varlena(&msg);
	ev->header_names = palloc(sizeof(char *) * Max(ev->nheaders, 1));
	ev->header_values = palloc(sizeof(char *) * Max(ev->nheaders, 1));
	for (int i = 0; i < ev->nheaders; i++)
	{
		ev->header_names[i] = get_string(&msg);
		ev->header_values[i] = get_string(&msg);
	}
	pq_getmsgend(&msg);

	error_context_stack = errcb.previous;
}

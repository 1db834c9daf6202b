/*
 * workitem.c — the messages between the dispatcher and a pool worker on
 * their shm_mq: a flat encoding of EbWorkItem (fixed fields, then
 * length-prefixed strings, -1 for NULL).
 */
#include "postgres.h"

#include "envelope.h"
#include "pool.h"

/* Append a string (or NULL) with its length. */
static void
put_string(StringInfo buf, const char *s)
{
	int32		len = s ? (int32) strlen(s) : -1;

	appendBinaryStringInfo(buf, (const char *) &len, sizeof(len));
	if (s)
		appendBinaryStringInfo(buf, s, len);
}

/* Read a string written by put_string; advances *pos. */
static char *
get_string(const char *data, Size len, Size *pos)
{
	int32		n;
	char	   *s;

	if (*pos + sizeof(n) > len)
		elog(ERROR, "eventbus: truncated work item");
	memcpy(&n, data + *pos, sizeof(n));
	*pos += sizeof(n);
	if (n < 0)
		return NULL;
	if (*pos + n > len)
		elog(ERROR, "eventbus: truncated work item");
	s = pnstrdup(data + *pos, n);
	*pos += n;
	return s;
}

#define PUT(buf, field) appendBinaryStringInfo((buf), (const char *) &(field), sizeof(field))
#define GET(data, pos, field) (memcpy(&(field), (data) + (pos), sizeof(field)), (pos) += sizeof(field))

/* Serialize a work item. */
void
eb_workitem_encode(StringInfo buf, const EbWorkItem *item)
{
	const EbEvent *ev = &item->ev;
	int32		tenant = ev->has_tenant ? 1 : 0;

	PUT(buf, item->tag);
	PUT(buf, item->subscription_id);
	PUT(buf, item->handler);
	PUT(buf, item->role);
	PUT(buf, item->max_attempts);
	PUT(buf, item->transport);
	PUT(buf, ev->event_version);
	PUT(buf, ev->occurred_at);
	PUT(buf, tenant);
	PUT(buf, ev->tenant_id);
	PUT(buf, ev->nheaders);
	put_string(buf, ev->event_id);
	put_string(buf, ev->topic);
	put_string(buf, ev->aggregate_id);
	put_string(buf, ev->event_type);
	put_string(buf, ev->trace_id);
	put_string(buf, ev->correlation_id);
	put_string(buf, ev->payload);
	for (int i = 0; i < ev->nheaders; i++)
	{
		put_string(buf, ev->header_names[i]);
		put_string(buf, ev->header_values[i]);
	}
}

/* Deserialize a work item (strings palloc'd in the current context). */
void
eb_workitem_decode(const char *data, Size len, EbWorkItem *item)
{
	EbEvent    *ev = &item->ev;
	Size		pos = 0;
	int32		tenant;

	memset(item, 0, sizeof(EbWorkItem));
	if (len < sizeof(uint64) * 2 + sizeof(int64) * 2 + sizeof(Oid) * 2 + sizeof(int32) * 5)
		elog(ERROR, "eventbus: truncated work item");
	GET(data, pos, item->tag);
	GET(data, pos, item->subscription_id);
	GET(data, pos, item->handler);
	GET(data, pos, item->role);
	GET(data, pos, item->max_attempts);
	GET(data, pos, item->transport);
	GET(data, pos, ev->event_version);
	GET(data, pos, ev->occurred_at);
	GET(data, pos, tenant);
	GET(data, pos, ev->tenant_id);
	GET(data, pos, ev->nheaders);
	ev->has_tenant = tenant != 0;
	ev->event_id = get_string(data, len, &pos);
	ev->topic = get_string(data, len, &pos);
	ev->aggregate_id = get_string(data, len, &pos);
	ev->event_type = get_string(data, len, &pos);
	ev->trace_id = get_string(data, len, &pos);
	ev->correlation_id = get_string(data, len, &pos);
	ev->payload = get_string(data, len, &pos);
	if (ev->nheaders < 0 || ev->nheaders > EB_MAX_HEADERS)
		elog(ERROR, "eventbus: corrupt work item");
	ev->header_names = palloc(sizeof(char *) * Max(ev->nheaders, 1));
	ev->header_values = palloc(sizeof(char *) * Max(ev->nheaders, 1));
	for (int i = 0; i < ev->nheaders; i++)
	{
		ev->header_names[i] = get_string(data, len, &pos);
		ev->header_values[i] = get_string(data, len, &pos);
	}
}

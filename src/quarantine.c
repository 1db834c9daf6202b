/*
 * quarantine.c — the dispatcher's quarantine: an inbound message that cannot
 * be decoded is queued in the loop iteration that took it, with where it
 * came from and why; eb_quarantine_flush writes the iteration's queue to
 * eventbus.quarantine in one transaction, flushed (the messages are
 * acknowledged next), and then has the dispatcher finish each, as a handled
 * message is.  The queue lives in the iteration's memory.
 */
#include "postgres.h"

#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/jsonb.h"

#include "envelope.h"
#include "eventbus.h"
#include "quarantine.h"
#include "util.h"

/* A malformed message waiting to be written to eventbus.quarantine. */
typedef struct Quarantined
{
	void	   *delivery;		/* the dispatcher's, finished once written */
	int			transport;
	char	   *topic;
	int32		partition;
	int64		offset;
	uint64		stream_seq;
	bytea	   *key;
	Jsonb	   *headers;
	bytea	   *raw;
	const char *reason;
} Quarantined;

static List *queue = NIL;

/* A bytea copy of bytes. */
static bytea *
to_bytea(const char *data, size_t len)
{
	bytea	   *b = palloc(VARHDRSZ + len);

	SET_VARSIZE(b, VARHDRSZ + len);
	if (len > 0)
		memcpy(VARDATA(b), data, len);
	return b;
}

/* Queue a message that could not be decoded (in the current memory context). */
void
eb_quarantine_queue(const EbInbound *in, const char *reason, void *delivery)
{
	Quarantined *q = palloc0(sizeof(Quarantined));

	q->delivery = delivery;
	q->transport = in->transport;
	q->topic = pstrdup(in->topic);
	q->partition = in->partition;
	q->offset = in->offset;
	q->stream_seq = in->stream_seq;
	q->key = in->key ? to_bytea(in->key, in->keylen) : NULL;
	q->headers = eb_inbound_headers_jsonb(in->nheaders, in->header_names, in->header_values);
	q->raw = to_bytea(in->data, in->len);
	q->reason = pstrdup(reason);
	queue = lappend(queue, q);
}

/* Write the queued messages to eventbus.quarantine, then finish them. */
void
eb_quarantine_flush(void (*finish) (void *delivery))
{
	ListCell   *lc;
	Oid			types[10] = {TEXTOID, TEXTOID, INT4OID, INT8OID, INT8OID, BYTEAOID, JSONBOID, BYTEAOID, TEXTOID};

	MemoryContext cxt;

	if (queue == NIL)
		return;
	cxt = eb_xact_begin();
	foreach(lc, queue)
	{
		Quarantined *q = lfirst(lc);
		Datum		v[9];
		char		n[9];

		memset(n, ' ', sizeof(n));
		v[0] = CStringGetTextDatum(eb_transport_name(q->transport));
		v[1] = CStringGetTextDatum(q->topic);
		v[2] = Int32GetDatum(q->partition);
		n[2] = q->partition >= 0 ? ' ' : 'n';
		v[3] = Int64GetDatum(q->offset);
		n[3] = q->offset >= 0 ? ' ' : 'n';
		v[4] = Int64GetDatum((int64) q->stream_seq);
		n[4] = q->stream_seq > 0 ? ' ' : 'n';
		v[5] = PointerGetDatum(q->key);
		n[5] = q->key ? ' ' : 'n';
		v[6] = JsonbPGetDatum(q->headers);
		n[6] = q->headers ? ' ' : 'n';
		v[7] = PointerGetDatum(q->raw);
		v[8] = CStringGetTextDatum(q->reason);
		if (SPI_execute_with_args("INSERT INTO eventbus.quarantine (transport, topic, kafka_partition,"
								  " kafka_offset, stream_sequence, message_key, headers, raw, reason)"
								  " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
								  9, types, v, n, false, 0) != SPI_OK_INSERT)
			elog(ERROR, "could not write to eventbus.quarantine");
		ereport(LOG,
				(errcode(ERRCODE_DATA_EXCEPTION),
				 errmsg("quarantined a message from %s topic %s: %s",
						eb_transport_name(q->transport), q->topic, q->reason)));
	}
	/* The messages are acknowledged next: flushed whatever synchronous_commit says. */
	ForceSyncCommit();
	eb_xact_end(cxt);

	foreach(lc, queue)
	{
		Quarantined *q = lfirst(lc);

		eb_shmem_count_quarantined(q->transport, 1);
		finish(q->delivery);
	}
	list_free(queue);
	queue = NIL;
}

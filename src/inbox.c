/*
 * inbox.c — the pool's batch look-ups and records in eventbus.inbox.
 *
 * A batch's events are looked up in the inbox before its handlers run
 * (redeliveries are skipped), and the ones that ran are recorded after
 * them, in the same transaction, so the records commit with the handlers'
 * effects or not at all.  Both go to the table and its indexes directly,
 * not through SQL: per batch of a few events, planning-cache checks and
 * executor start-up cost about as much as the index work itself.  Only
 * the record has a statement to fall back on, for a table changed since
 * the extension created it (eb_direct_ok, direct_insert.c).
 */
#include "postgres.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/pg_type.h"
#include "executor/executor.h"
#include "executor/spi.h"
#include "utils/builtins.h"
#include "utils/fmgroids.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/timestamp.h"
#include "utils/uuid.h"

#include "direct_insert.h"
#include "pool.h"
#include "util.h"

/* The statement used when the table is not as created (eb_direct_ok). */
#define RECORD_BATCH_SQL \
	"INSERT INTO eventbus.inbox (subscription_id, event_id, outcome)" \
	" SELECT x.s, x.e, 'handled' FROM ROWS FROM (pg_catalog.unnest($1::pg_catalog.int8[])," \
	"  pg_catalog.unnest($2::pg_catalog.uuid[])) x (s, e)"

static SPIPlanPtr record_batch_plan = NULL;

/* An item's event id as a uuid Datum. */
static Datum
event_uuid(const EbWorkItem *item)
{
	return DirectFunctionCall1(uuid_in, CStringGetDatum(item->ev.event_id));
}

/*
 * Which of a batch's events (those in mask) the inbox already has: seen[i]
 * set for each, and for an item repeating an earlier one's (subscription,
 * event).  Probed in the inbox's primary key with a dirty snapshot, as a
 * unique check does: no predicate lock (the pool may run SERIALIZABLE) and
 * no row claimed, so that items given back to the dispatcher (scheduler.c)
 * never wait for this transaction on another worker.  A row another
 * transaction is still inserting does not count (it may roll back): the
 * insert of eb_inbox_record_batch then waits for it, and fails if it
 * committed.
 */
void
eb_inbox_check_batch(EbWorkItem *const *items, const bool *mask, int n, bool *seen)
{
	Relation	heap;
	Relation	index;
	SnapshotData dirty;
	IndexScanDesc scan;
	TupleTableSlot *slot;
	bool		any = false;

	for (int i = 0; i < n; i++)
	{
		seen[i] = false;
		for (int j = 0; j < i && mask[i]; j++)
			if (mask[j] && items[j]->subscription_id == items[i]->subscription_id &&
				pg_strcasecmp(items[j]->ev.event_id, items[i]->ev.event_id) == 0)
				seen[i] = true;
		any |= mask[i] && !seen[i];
	}
	if (!any)
		return;

	heap = eb_open_own_table("inbox", AccessShareLock);
	index = index_open(RelationGetPrimaryKeyIndex(heap), AccessShareLock);
	InitDirtySnapshot(dirty);
	scan = index_beginscan(heap, index, &dirty, 2, 0);
	slot = table_slot_create(heap, NULL);
	for (int i = 0; i < n; i++)
	{
		ScanKeyData keys[2];

		if (!mask[i] || seen[i])
			continue;
		ScanKeyInit(&keys[0], 1, BTEqualStrategyNumber, F_INT8EQ,
					Int64GetDatum(items[i]->subscription_id));
		ScanKeyInit(&keys[1], 2, BTEqualStrategyNumber, F_UUID_EQ, event_uuid(items[i]));
		index_rescan(scan, keys, 2, NULL, 0);
		if (index_getnext_slot(scan, ForwardScanDirection, slot))
			seen[i] = !TransactionIdIsValid(dirty.xmin);
		ExecClearTuple(slot);
	}
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(index, NoLock);
	table_close(heap, NoLock);
}

/* The batch's records through the SQL statement. */
static void
record_by_sql(EbWorkItem *const *items, const bool *mask, int n)
{
	Oid			types[2] = {INT8ARRAYOID, UUIDARRAYOID};
	Datum	   *subs = palloc(sizeof(Datum) * n);
	Datum	   *events = palloc(sizeof(Datum) * n);
	Datum		args[2];
	int			k = 0;

	for (int i = 0; i < n; i++)
	{
		if (!mask[i])
			continue;
		subs[k] = Int64GetDatum(items[i]->subscription_id);
		events[k++] = event_uuid(items[i]);
	}
	args[0] = PointerGetDatum(construct_array(subs, k, INT8OID, 8, FLOAT8PASSBYVAL, TYPALIGN_DOUBLE));
	args[1] = PointerGetDatum(construct_array(events, k, UUIDOID, UUID_LEN, false, TYPALIGN_CHAR));
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "SPI_connect failed");
	PushActiveSnapshot(GetTransactionSnapshot());
	if (SPI_execute_plan(eb_keep_plan(&record_batch_plan, RECORD_BATCH_SQL, 2, types),
						 args, NULL, false, 0) != SPI_OK_INSERT)
		elog(ERROR, "could not record handled events in eventbus.inbox");
	PopActiveSnapshot();
	SPI_finish();
}

/*
 * Record the handled events of a batch (those in mask) in the inbox, before
 * its commit: each row and its index entries, as an INSERT would write
 * them (handled_at is the clock at the insert, as the column's default).
 * One that is there already (handled meanwhile in another transaction)
 * fails the primary key's unique check, as the statement would: the caller
 * rolls the batch back and runs it the careful way, which skips it.
 */
void
eb_inbox_record_batch(EbWorkItem *const *items, const bool *mask, int n)
{
	static const Oid types[] = {INT8OID, UUIDOID, TEXTOID, TIMESTAMPTZOID};
	Relation	rel;
	EbDirectInsert *d;
	Datum		values[lengthof(types)];
	bool		isnull[lengthof(types)] = {false};
	bool		any = false;

	for (int i = 0; i < n; i++)
		any |= mask[i];
	if (!any)
		return;

	rel = eb_open_own_table("inbox", RowExclusiveLock);
	if (!eb_direct_ok(rel, types, lengthof(types), 0, 0))
	{
		table_close(rel, NoLock);
		record_by_sql(items, mask, n);
		return;
	}

	d = eb_direct_begin(rel);
	values[2] = CStringGetTextDatum("handled");
	for (int i = 0; i < n; i++)
	{
		if (!mask[i])
			continue;
		values[0] = Int64GetDatum(items[i]->subscription_id);
		values[1] = event_uuid(items[i]);
		values[3] = TimestampTzGetDatum(GetCurrentTimestamp());
		eb_direct_row(d, values, isnull);
	}
	eb_direct_end(d);
	table_close(rel, NoLock);
}

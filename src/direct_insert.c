/*
 * direct_insert.c — rows written into the extension's own tables the way an
 * INSERT writes them (heap tuple, then every index entry), without a
 * statement: for a row or a few per call, plan-cache checks and executor
 * start-up cost about as much as the writes themselves.
 *
 * Only for a table still as the extension created it (eb_direct_ok); the
 * callers keep a statement for any other shape, which honours whatever a
 * superuser added (a trigger, a CHECK constraint, a policy, a rule).
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "executor/executor.h"
#include "nodes/execnodes.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

#include "direct_insert.h"

struct EbDirectInsert
{
	Relation	rel;
	EState	   *estate;
	ResultRelInfo *rri;
	TupleTableSlot *slot;
};

/* Open eventbus.<name>, one of the extension's own tables. */
Relation
eb_open_own_table(const char *name, LOCKMODE lockmode)
{
	return table_open(get_relname_relid(name, get_namespace_oid("eventbus", false)), lockmode);
}

/*
 * May rows go into rel directly?  Only while it is a plain table with
 * exactly the columns `types` (no dropped or generated ones), no triggers
 * (a foreign key's included), no CHECK constraints, no rules and no row
 * security.  identity_att names the one column that must be an identity
 * column (0: none may be); the caller fills it from its sequence.  A column
 * in nullable (bit i: column i + 1) gets NULL from the caller at times: it
 * must not have been made NOT NULL (the statement then reports it).
 */
bool
eb_direct_ok(Relation rel, const Oid *types, int ntypes, AttrNumber identity_att,
			 uint32 nullable)
{
	TupleDesc	desc = RelationGetDescr(rel);

	if (rel->rd_rel->relkind != RELKIND_RELATION || rel->trigdesc != NULL ||
		rel->rd_rules != NULL || rel->rd_rel->relrowsecurity ||
		(desc->constr && desc->constr->num_check > 0) ||
		desc->natts != ntypes)
		return false;
	for (int i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);

		if (att->attisdropped || att->atttypid != types[i] || att->attgenerated ||
			(att->attidentity != '\0') != (i + 1 == identity_att) ||
			(att->attnotnull && (nullable & (UINT32_C(1) << i))))
			return false;
	}
	return true;
}

/* Start writing rows into rel (opened RowExclusiveLock, eb_direct_ok). */
EbDirectInsert *
eb_direct_begin(Relation rel)
{
	EbDirectInsert *d = palloc(sizeof(EbDirectInsert));

	d->rel = rel;
	d->estate = CreateExecutorState();
	d->rri = makeNode(ResultRelInfo);
	InitResultRelInfo(d->rri, rel, 1, NULL, 0);
	ExecOpenIndices(d->rri, false);
	d->slot = table_slot_create(rel, NULL);
	return d;
}

/*
 * Write one row (NULLs only where eb_direct_ok allowed them): a duplicate
 * key fails its unique index's check, as the statement's would.
 */
void
eb_direct_row(EbDirectInsert *d, const Datum *values, const bool *isnull)
{
	TupleDesc	desc = RelationGetDescr(d->rel);

	ExecClearTuple(d->slot);
	memcpy(d->slot->tts_values, values, sizeof(Datum) * desc->natts);
	memcpy(d->slot->tts_isnull, isnull, sizeof(bool) * desc->natts);
	ExecStoreVirtualTuple(d->slot);
	table_tuple_insert(d->rel, d->slot, GetCurrentCommandId(true), 0, NULL);
	(void) ExecInsertIndexTuples(d->rri, d->slot, d->estate, false, false, NULL, NIL);
	ResetPerTupleExprContext(d->estate);
}

/* Finish: release the executor state; the rows are visible to the next command. */
void
eb_direct_end(EbDirectInsert *d)
{
	ExecDropSingleTupleTableSlot(d->slot);
	ExecCloseIndices(d->rri);
	FreeExecutorState(d->estate);
	pfree(d);
	CommandCounterIncrement();
}

/*
 * relay_floor.c — where the relay's reads of a transport's outbox start.
 *
 * A deleted outbox row stays in the outbox's indexes and heap until no
 * snapshot can see it any more.  So while any session holds an old
 * snapshot (a long report, pg_dump, a transaction left open at REPEATABLE
 * READ, a standby's hot_standby_feedback), a read from the start of the
 * outbox walks every row deleted since that snapshot was taken, at every
 * round.  Reads therefore start above a floor: an id below which every row
 * of the transport is gone for good.
 *
 * Ids come from a sequence, so a transaction that took its id earlier may
 * commit after later rows were relayed: the floor only passes ids that no
 * running transaction can still commit.  eventbus_publish takes its
 * transaction id before its row's id.  In each round's snapshot the relay
 * notes the highest id taken so far (the sequence's last value) and then
 * the next transaction id (a candidate).  A transaction that took an id up
 * to that one took its transaction id before; once a snapshot shows no
 * transaction id below the noted one running (its xmin), every row up to
 * the noted id that will ever be committed is visible: at once when nothing
 * was writing, else in a later round.  The other
 * transport's rows count too: the floor passes a backlog waiting for the
 * other broker.  Sessions that only read do not hold this back,
 * however old their snapshots; a long writing transaction does.
 *
 * The floor rises to that id after a round's outcomes are committed, but
 * never above a row still in the outbox.  It starts again from 0 while
 * eventbus.undeliverable may hold rows of the transport (a retry brings
 * them back under their old ids) and when the sequence was replaced
 * (extension re-created), restarted or set back below it; it is not used
 * when the sequence hands out ids in blocks (CACHE above 1), as they then do
 * not follow the order in which they were taken.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/transam.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_sequence.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"

#include "relay.h"

/*
 * May this round use (and raise) the floor?  Records the sequence it is
 * about and sets *last to its last value (0: none handed out yet); false in
 * the round that finds it replaced, restarted or set back.
 */
static bool
floor_usable(EbReadFloor *f, bool undeliverable, int64 *last)
{
	Oid			seq = get_relname_relid("outbox_id_seq", get_namespace_oid("eventbus", true));
	HeapTuple	tup;
	bool		ok = false;
	Oid			filenode = InvalidOid;
	Datum		d;

	LOCAL_FCINFO(fcinfo, 1);

	*last = 0;
	if (undeliverable || !OidIsValid(seq))
		return false;
	tup = SearchSysCache1(SEQRELID, ObjectIdGetDatum(seq));
	if (HeapTupleIsValid(tup))
	{
		ok = ((Form_pg_sequence) GETSTRUCT(tup))->seqcache == 1;
		ReleaseSysCache(tup);
	}
	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(seq));
	if (HeapTupleIsValid(tup))
	{
		filenode = ((Form_pg_class) GETSTRUCT(tup))->relfilenode;
		ReleaseSysCache(tup);
	}
	/* Not called yet (no id handed out): NULL, taken as 0. */
	InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = ObjectIdGetDatum(seq);
	fcinfo->args[0].isnull = false;
	d = pg_sequence_last_value(fcinfo);
	if (!fcinfo->isnull)
		*last = DatumGetInt64(d);
	if (seq != f->seq || filenode != f->filenode || *last < f->floor)
	{
		f->seq = seq;
		f->filenode = filenode;
		return false;
	}
	return ok;
}

/*
 * At a round's start, in its snapshot: may it use the floor (else it is 0),
 * did the candidate become safe, and a new candidate (the sequence's last
 * value, read before the next transaction id).
 */
void
eb_floor_begin(EbReadFloor *f, bool undeliverable)
{
	int64		last;

	f->safe_id = 0;
	f->on = floor_usable(f, undeliverable, &last);
	if (!f->on)
	{
		f->floor = 0;
		f->cand_valid = false;
		return;
	}
	if (f->cand_valid && TransactionIdFollowsOrEquals(GetActiveSnapshot()->xmin, f->cand_xid))
	{
		f->safe_id = f->cand_id;
		f->cand_valid = false;
	}
	if (!f->cand_valid && last > 0)
	{
		f->cand_id = last;
		f->cand_xid = ReadNextTransactionId();
		f->cand_valid = true;

		/*
		 * Safe at once if this round's snapshot already shows no transaction
		 * id below the noted one running: its xmin can only reach the next
		 * transaction id, read after the snapshot and the sequence, if no
		 * transaction id was running when it was taken and none was assigned
		 * since.  Every transaction that took an id up to the noted one then
		 * ended before the snapshot, so this round's read sees its rows.
		 * Otherwise an idle transport's floor stays two rounds behind, and
		 * each of its reads walks what the other transport relayed meanwhile
		 * (when planned on the primary key), every row twice.
		 */
		if (TransactionIdFollowsOrEquals(GetActiveSnapshot()->xmin, f->cand_xid))
		{
			f->safe_id = f->cand_id;
			f->cand_valid = false;
		}
	}
}

/*
 * Once the round's outcomes are committed: raise the floor as far as the
 * safe id goes, but below every row still in the outbox: lowest_left (the
 * round's rows neither delivered nor moved aside), the rows of the
 * aggregates left out of the read (backing off) and what lies past a full
 * batch.
 */
void
eb_floor_raise(EbReadFloor *f, bool undeliverable, int64 lowest_left)
{
	int64		up_to;

	if (undeliverable)
	{
		f->floor = 0;
		f->cand_valid = false;
		return;
	}
	if (!f->on)
		return;
	up_to = Min(Min(f->safe_id, f->read_end), Min(f->excluded_from, lowest_left) - 1);
	f->floor = Max(f->floor, up_to);
}

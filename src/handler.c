/*
 * handler.c — run one subscribed handler for one event, effectively once.
 *
 * Each invocation runs in its own subtransaction of the caller's (pool
 * worker's batch) transaction: claim the event in eventbus.inbox (a
 * duplicate claim means it was handled before: skip), enter the
 * subscribing role's isolated context (privilege.c), call the handler, leave.  The inbox row commits
 * with the handler's effects, or neither does.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "executor/spi.h"
#include "funcapi.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/json.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/relcache.h"
#include "utils/regproc.h"
#include "utils/resowner.h"
#include "utils/snapmgr.h"
#include "storage/latch.h"
#include "utils/syscache.h"
#include "utils/timeout.h"
#include "utils/typcache.h"
#include "utils/uuid.h"

#include "envelope.h"
#include "guc.h"
#include "pool.h"
#include "privilege.h"
#include "transport.h"
#include "util.h"

static SPIPlanPtr claim_plan = NULL;
static SPIPlanPtr dead_plan = NULL;

#define CLAIM_SQL \
	"INSERT INTO eventbus.inbox (subscription_id, event_id, outcome)" \
	" VALUES ($1, $2, 'handled') ON CONFLICT DO NOTHING"
#define DEAD_SQL \
	"WITH d AS (INSERT INTO eventbus.dead_letters" \
	"  (subscription_id, envelope, error_message, error_sqlstate, attempts)" \
	"  VALUES ($1, $2, $3, $4, $5))" \
	" INSERT INTO eventbus.inbox (subscription_id, event_id, outcome)" \
	" VALUES ($1, ($2).event_id, 'dead_lettered') ON CONFLICT DO NOTHING"

/*
 * OID of eventbus.envelope, looked up once per process: the pool and the
 * dispatcher are restarted when the extension is dropped, and a backend that
 * survives a DROP/CREATE re-checks the cached OID below.
 */
Oid
eb_envelope_type(void)
{
	static Oid	cached = InvalidOid;

	if (!OidIsValid(cached) || !SearchSysCacheExists1(TYPEOID, ObjectIdGetDatum(cached)))
	{
		Oid			nsp = get_namespace_oid("eventbus", false);

		cached = GetSysCacheOid2(TYPENAMENSP, Anum_pg_type_oid,
								 CStringGetDatum("envelope"), ObjectIdGetDatum(nsp));
	}
	return cached;
}

/* A handler's call info, kept per process so PL/pgSQL reuses its compiled function. */
typedef struct HandlerEntry
{
	Oid			handler;
	FmgrInfo	flinfo;
} HandlerEntry;

static HTAB *handlers = NULL;
static MemoryContext handlers_cxt = NULL;
static bool handlers_stale = false;

/* Any change to pg_proc (e.g. CREATE OR REPLACE of a handler) drops the cache. */
static void
handlers_invalidate(Datum arg, int cacheid, uint32 hashvalue)
{
	handlers_stale = true;
}

/* The cached call info of a handler. */
static FmgrInfo *
handler_fmgr(Oid handler)
{
	HandlerEntry *e;
	bool		found;

	if (handlers_cxt == NULL)
	{
		handlers_cxt = AllocSetContextCreate(TopMemoryContext, "eventbus handlers",
											 ALLOCSET_SMALL_SIZES);
		CacheRegisterSyscacheCallback(PROCOID, handlers_invalidate, (Datum) 0);
	}
	if (handlers_stale)
	{
		MemoryContextReset(handlers_cxt);
		handlers = NULL;
		handlers_stale = false;
	}
	if (handlers == NULL)
	{
		HASHCTL		ctl;

		memset(&ctl, 0, sizeof(ctl));
		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(HandlerEntry);
		ctl.hcxt = handlers_cxt;
		handlers = hash_create("eventbus handlers", 16, &ctl, HASH_ELEM | HASH_BLOBS | HASH_CONTEXT);
	}
	e = hash_search(handlers, &handler, HASH_ENTER, &found);
	if (!found)
	{
		PG_TRY();
		{
			fmgr_info_cxt(handler, &e->flinfo, handlers_cxt);
		}
		PG_CATCH();
		{
			hash_search(handlers, &handler, HASH_REMOVE, NULL);
			PG_RE_THROW();
		}
		PG_END_TRY();
	}
	return &e->flinfo;
}

/* Build the eventbus.envelope composite a handler receives. */
Datum
eb_make_envelope(const EbWorkItem *item)
{
	const EbEvent *ev = &item->ev;
	TupleDesc	desc = lookup_rowtype_tupdesc(eb_envelope_type(), -1);
	Datum		values[13];
	bool		nulls[13];
	Jsonb	   *hdrs = eb_headers_jsonb(ev->nheaders, ev->header_names, ev->header_values);
	HeapTuple	tuple;

	memset(nulls, false, sizeof(nulls));
	values[0] = DirectFunctionCall1(uuid_in, CStringGetDatum(ev->event_id));
	values[1] = CStringGetTextDatum(ev->topic);
	values[2] = CStringGetTextDatum(ev->aggregate_id);
	values[3] = CStringGetTextDatum(ev->event_type);
	values[4] = Int64GetDatum(ev->event_version);
	values[5] = TimestampTzGetDatum(ev->occurred_at);
	nulls[6] = ev->trace_id == NULL;
	values[6] = ev->trace_id ? CStringGetTextDatum(ev->trace_id) : (Datum) 0;
	nulls[7] = ev->correlation_id == NULL;
	values[7] = ev->correlation_id ? CStringGetTextDatum(ev->correlation_id) : (Datum) 0;
	nulls[8] = !ev->has_tenant;
	values[8] = Int32GetDatum(ev->tenant_id);
	if (ev->payload_jsonb == NULL)
		elog(ERROR, "work item of event %s has no payload", ev->event_id);
	values[9] = PointerGetDatum(ev->payload_jsonb);
	nulls[10] = hdrs == NULL;
	values[10] = JsonbPGetDatum(hdrs);
	values[11] = CStringGetTextDatum(eb_transport_name(item->transport));
	nulls[12] = item->received_at == 0;
	values[12] = TimestampTzGetDatum(item->received_at);

	tuple = heap_form_tuple(desc, values, nulls);
	ReleaseTupleDesc(desc);
	return HeapTupleGetDatum(tuple);
}

/*
 * eventbus.handler_timeout: a handler running longer is cancelled as a query
 * would be (57014), which makes it a failed attempt.
 */
static TimeoutId handler_timeout_id = MAX_TIMEOUTS;
static volatile sig_atomic_t handler_timed_out = false;

/* Timeout handler (signal context): request a query cancel. */
static void
handler_timeout_fired(void)
{
	handler_timed_out = true;
	QueryCancelPending = true;
	InterruptPending = true;
	SetLatch(MyLatch);
}

/* Arm the handler timeout, if one is set. */
static void
handler_timeout_arm(void)
{
	if (eb_handler_timeout_ms <= 0)
		return;
	if (handler_timeout_id == MAX_TIMEOUTS)
		handler_timeout_id = RegisterTimeout(USER_TIMEOUT, handler_timeout_fired);
	handler_timed_out = false;
	enable_timeout_after(handler_timeout_id, eb_handler_timeout_ms);
}

/* Disarm it; a cancel it requested after the handler returned is dropped. */
static bool
handler_timeout_disarm(void)
{
	bool		fired = handler_timed_out;

	if (handler_timeout_id != MAX_TIMEOUTS)
		disable_timeout(handler_timeout_id, false);
	if (fired)
		QueryCancelPending = false;
	handler_timed_out = false;
	return fired;
}

/*
 * Call handler(envelope) as role, in the subscriber's isolated context.
 * Throws on failure: the caller's (sub)transaction abort restores the user,
 * the settings and the snapshot; then eb_handler_error takes the error.
 */
void
eb_handler_invoke(Oid handler, Oid role, Datum envelope)
{
	EbSecContext sec;
	FmgrInfo   *flinfo;
	LOCAL_FCINFO(fcinfo, 1);

	if (!SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(role)))
		ereport(ERROR,
				(errcode(ERRCODE_UNDEFINED_OBJECT),
				 errmsg("the role that subscribed handler %s no longer exists", format_procedure(handler))));
	if (pg_proc_aclcheck(handler, role, ACL_EXECUTE) != ACLCHECK_OK)
		ereport(ERROR,
				(errcode(ERRCODE_INSUFFICIENT_PRIVILEGE),
				 errmsg("permission denied for function %s", format_procedure(handler)),
				 errdetail("The subscribing role %s lacks EXECUTE on the handler.",
						   GetUserNameFromId(role, false))));

	flinfo = handler_fmgr(handler);
	eb_handler_context_begin(&sec, role);
	PushActiveSnapshot(GetTransactionSnapshot());
	/* Called directly: a void function may return NULL (SQL functions do). */
	InitFunctionCallInfoData(*fcinfo, flinfo, 1, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = envelope;
	fcinfo->args[0].isnull = false;
	handler_timeout_arm();
	(void) FunctionCallInvoke(fcinfo);
	(void) handler_timeout_disarm();
	PopActiveSnapshot();
	eb_handler_context_end(&sec);
}

/*
 * The error eb_handler_invoke threw, copied into the current memory context
 * and flushed, before the caller rolls back; a cancel by
 * eventbus.handler_timeout says so.
 */
ErrorData *
eb_handler_error(Oid handler)
{
	bool		timed_out = handler_timeout_disarm();
	ErrorData  *e = CopyErrorData();

	FlushErrorState();
	if (timed_out && e->sqlerrcode == ERRCODE_QUERY_CANCELED)
		e->message = psprintf("handler %s ran longer than eventbus.handler_timeout (%d ms) and was cancelled",
							  format_procedure(handler), eb_handler_timeout_ms);
	return e;
}

/*
 * Call handler(envelope) as role, in a subtransaction of the current
 * transaction.  On failure the subtransaction is rolled back, *error is set
 * (allocated in the caller's memory context) and false returned.
 */
bool
eb_handler_call(Oid handler, Oid role, Datum envelope, ErrorData **error)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	volatile bool ok = true;

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		eb_handler_invoke(handler, role, envelope);
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		MemoryContextSwitchTo(cxt);
		*error = eb_handler_error(handler);
		/* Also restores the user id and settings of before the subtransaction. */
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		ok = false;
	}
	PG_END_TRY();
	return ok;
}

/* Run a statement of a kept plan. */
static int
exec_plan(SPIPlanPtr *plan, const char *sql, int nargs, Oid *types, Datum *values)
{
	int			rc = SPI_execute_plan(eb_keep_plan(plan, sql, nargs, types), values, NULL, false, 0);

	if (rc < 0)
		elog(ERROR, "statement failed: %s", SPI_result_code_string(rc));
	return (int) SPI_processed;
}

/* Show in pg_stat_activity which subscription and event this worker runs. */
void
eb_handler_report_activity(const EbWorkItem *item)
{
	char		activity[EB_MAX_TOPIC + EB_MAX_AGGREGATE_ID + 160];

	snprintf(activity, sizeof(activity),
			 "eventbus: subscription " INT64_FORMAT ", event %s (topic %s, aggregate %s)",
			 item->subscription_id, item->ev.event_id, item->ev.topic, item->ev.aggregate_id);
	pgstat_report_activity(STATE_RUNNING, activity);
}

/*
 * Is the role a work item runs as still there?  A role dropped from another
 * database leaves its subscriptions behind; the dispatcher stops routing to
 * them within seconds.  Never run a handler under a dangling role, and do
 * not retry what cannot succeed: logged, and the caller completes the item.
 */
bool
eb_handler_owner_present(const EbWorkItem *item)
{
	if (SearchSysCacheExists1(AUTHOID, ObjectIdGetDatum(item->role)))
		return true;
	ereport(LOG,
			(errcode(ERRCODE_UNDEFINED_OBJECT),
			 errmsg("not running event %s for subscription " INT64_FORMAT ": its owning role was dropped",
					item->ev.event_id, item->subscription_id)));
	return false;
}

/*
 * Handle one work item effectively once: returns EB_OUTCOME_HANDLED,
 * EB_OUTCOME_DUPLICATE, or -1 with *error set when the handler failed (its
 * effects and the inbox claim rolled back together).
 */
int
eb_handler_run(const EbWorkItem *item, ErrorData **error)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Oid			types[2] = {INT8OID, UUIDOID};
	Datum		args[2];
	volatile int outcome = EB_OUTCOME_HANDLED;

	if (!eb_handler_owner_present(item))
		return EB_OUTCOME_OWNER_DROPPED;

	args[0] = Int64GetDatum(item->subscription_id);
	args[1] = DirectFunctionCall1(uuid_in, CStringGetDatum(item->ev.event_id));

	/* The claim and the handler share one subtransaction. */
	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		int			claimed;

		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		PushActiveSnapshot(GetTransactionSnapshot());
		claimed = exec_plan(&claim_plan, CLAIM_SQL, 2, types, args);
		PopActiveSnapshot();
		SPI_finish();

		if (claimed == 0)
			outcome = EB_OUTCOME_DUPLICATE;
		else
		{
			eb_handler_report_activity(item);
			if (!eb_handler_call(item->handler, item->role, eb_make_envelope(item), error))
				outcome = -1;
		}

		if (outcome == -1)
			RollbackAndReleaseCurrentSubTransaction();
		else
			ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		/* The claim itself failed (e.g. subscription just removed). */
		MemoryContextSwitchTo(cxt);
		*error = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		outcome = -1;
	}
	PG_END_TRY();
	return outcome;
}

/*
 * Record an event whose handler failed max_attempts times, and mark it
 * done in the inbox so a redelivery does not run it again.  Errors here
 * (the subscription was removed meanwhile) are logged and the event dropped
 * with it.
 */
void
eb_dead_letter(const EbWorkItem *item, const ErrorData *error, int attempts)
{
	MemoryContext cxt = CurrentMemoryContext;
	ResourceOwner owner = CurrentResourceOwner;
	Oid			types[5] = {INT8OID, eb_envelope_type(), TEXTOID, TEXTOID, INT4OID};
	Datum		args[5];

	args[0] = Int64GetDatum(item->subscription_id);
	args[1] = eb_make_envelope(item);
	args[2] = CStringGetTextDatum(error->message ? error->message : "unknown error");
	args[3] = CStringGetTextDatum(unpack_sql_state(error->sqlerrcode));
	args[4] = Int32GetDatum(attempts);

	BeginInternalSubTransaction(NULL);
	MemoryContextSwitchTo(cxt);
	PG_TRY();
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "SPI_connect failed");
		PushActiveSnapshot(GetTransactionSnapshot());
		exec_plan(&dead_plan, DEAD_SQL, 5, types, args);
		PopActiveSnapshot();
		SPI_finish();
		ReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
	}
	PG_CATCH();
	{
		ErrorData  *e;

		MemoryContextSwitchTo(cxt);
		e = CopyErrorData();
		FlushErrorState();
		RollbackAndReleaseCurrentSubTransaction();
		MemoryContextSwitchTo(cxt);
		CurrentResourceOwner = owner;
		ereport(WARNING,
				(errcode(e->sqlerrcode),
				 errmsg("could not dead-letter event %s of subscription " INT64_FORMAT,
						item->ev.event_id, item->subscription_id),
				 errdetail("%s", e->message)));
	}
	PG_END_TRY();
}

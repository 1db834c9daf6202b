/*
 * nats_shared.c — JetStream shared mode (eventbus.consumer_mode = shared):
 * each subscribed subject's durable is consumed by one instance at a time,
 * the holder of its lease (nats_lease.c); the others stand by and take
 * over.  Every poll, shared_tick refreshes the leases held, gives up those
 * that could not be refreshed in time (fencing), lets stand-bys take free,
 * stale or their own instance's leases, and finishes releases: a released
 * subject's messages that were not handled here are NAKed in stream order
 * before its lease is marked released, so the next holder gets them first
 * and binds the durable as it is.  See docs/scale-out.md.
 */
#include "postgres.h"

#include "miscadmin.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "nats_client.h"
#include "nats_consumer.h"
#include "util.h"

/* What a subscription's lease request (ns->lease_job) is for. */
typedef enum LeaseStep
{
	STEP_NONE,
	STEP_ACQUIRE_READ,			/* a stand-by looks at its lease */
	STEP_ACQUIRE_WRITE,			/* and takes it */
	STEP_REFRESH_WRITE,			/* a holder rewrites it */
	STEP_REFRESH_READ,			/* that was refused or not answered: whose is it? */
	STEP_RELEASE				/* NAKs flushed, then marked released */
} LeaseStep;

#define STOP_RELEASE_MS		2500	/* at exit: the releases (a flush, then a write) */

static void release_end(NatsSub *ns, bool released);

/* Send a lease request for ns as a job; false if it cannot be sent now. */
static bool
lease_send(NatsSub *ns, EbNatsJobKind kind, LeaseStep step, uint64 rev, TimestampTz now)
{
	ns->lease_job = eb_nats_lease_start(kind, ns->lease_key, rev);
	if (ns->lease_job == NULL)
		return false;
	ns->lease_step = step;
	ns->lease_sent = now;
	return true;
}

/* --- shared mode: one instance at a time consumes a durable --- */

/*
 * May the message still be handled here?  Not once its subscription was
 * given up: released, being released, or its lease lost (a later lease of
 * the same subject is a new NatsSub, so this one's messages stay given up).
 */
bool
eb_nats_consumer_live(void *token)
{
	NatsHeld   *held = token;

	if (!eb_nats_shared_mode)
		return true;			/* single: every message is handled here */
	return !held->ns->released && held->ns->state == SUB_HELD;
}

/*
 * A message that was not handled here.  During a clean release it is given
 * back (NAK) with the others, in stream order, so the next holder gets it
 * first; after a lost lease it is left to the new holder.
 */
void
eb_nats_consumer_abandon(void *token)
{
	NatsHeld   *held = token;
	NatsSub    *ns = held->ns;

	/* Not finished: an AckNone durable's position must not pass it. */
	if (ns->ack_none)
		ns->stuck = true;
	dlist_delete(&held->node);
	if (!ns->released && ns->state == SUB_RELEASING && !ns->given_back && held->reply[0] != '\0')
	{
		MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);
		NatsNak    *nak = palloc(sizeof(NatsNak));

		nak->seq = held->seq;
		nak->reply = pstrdup(held->reply);
		ns->naks = lappend(ns->naks, nak);
		MemoryContextSwitchTo(old);
	}
	pfree(held);
	if (--ns->held == 0 && ns->released)
		eb_nats_free_sub(ns);
}

static int
nak_cmp(const ListCell *a, const ListCell *b)
{
	uint64		x = ((NatsNak *) lfirst(a))->seq;
	uint64		y = ((NatsNak *) lfirst(b))->seq;

	return x < y ? -1 : x > y ? 1 : 0;
}

/* consumer_share: 1 while topic's durable is bound here (shared: its lease held), else 0. */
int
eb_nats_consumer_share(const char *topic)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_HELD && strcmp(ns->topic, topic) == 0)
			return 1;
	}
	return 0;
}

/* Leases this instance holds. */
static int
leases_held(void)
{
	int			n = 0;
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
		if (((NatsSub *) lfirst(lc))->state == SUB_HELD)
			n++;
	return n;
}

/* The subscription in eb_nats_subs (other than a releasing one) with that lease key. */
static NatsSub *
sub_of_key(const char *key)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state != SUB_RELEASING && strcmp(ns->lease_key, key) == 0)
			return ns;
	}
	return NULL;
}

/* Replace ns in eb_nats_subs by a stand-by of the same subject; release ns. */
static void
give_up(NatsSub *ns)
{
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		if (lfirst(lc) == ns)
		{
			lfirst(lc) = eb_nats_new_sub(ns->topic, SUB_STANDBY);
			break;
		}
	}
	eb_nats_release_sub(ns);
}

/*
 * Give a lease back: its queued and abandoned messages (and, at a
 * deadline, those still out) are NAKed in stream order, so the next holder
 * gets them first and in order; then the lease is marked released (a job:
 * it flushes the NAKs first), and the next holder binds the durable as it
 * is (no take-over).  release_end finishes it.
 */
static void
release_begin(NatsSub *ns, TimestampTz now)
{
	natsMsg    *msgs[TAKE_CHUNK];
	int64		sizes[TAKE_CHUNK];
	int			got;
	dlist_mutable_iter it;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	if (ns->feed)
	{
		while ((got = eb_nats_feed_take(ns->feed, msgs, sizes, TAKE_CHUNK, PG_INT64_MAX)) > 0)
		{
			for (int i = 0; i < got; i++)
			{
				jsMsgMetaData *meta = NULL;
				const char *reply = natsMsg_GetReply(msgs[i]);

				if (reply != NULL && natsMsg_GetMetaData(&meta, msgs[i]) == NATS_OK)
				{
					NatsNak    *nak = palloc(sizeof(NatsNak));

					nak->seq = meta->Sequence.Stream;
					nak->reply = pstrdup(reply);
					ns->naks = lappend(ns->naks, nak);
					jsMsgMetaData_Destroy(meta);
				}
				natsMsg_Destroy(msgs[i]);
			}
		}
	}
	/* Out past the deadline: their handlers' outcome is not known here. */
	ns->still_out = 0;
	dlist_foreach_modify(it, &ns->out)
	{
		NatsHeld   *held = dlist_container(NatsHeld, node, it.cur);
		NatsNak    *nak = palloc(sizeof(NatsNak));

		nak->seq = held->seq;
		nak->reply = pstrdup(held->reply);
		ns->naks = lappend(ns->naks, nak);
		ns->still_out++;
	}
	MemoryContextSwitchTo(old);

	list_sort(ns->naks, nak_cmp);
	foreach(lc, ns->naks)
	{
		NatsNak    *nak = lfirst(lc);

		if (eb_nats_conn != NULL)
			(void) natsConnection_PublishString(eb_nats_conn, nak->reply, "-NAK");
		pfree(nak->reply);
		pfree(nak);
	}
	ns->naks_sent = list_length(ns->naks);
	list_free(ns->naks);
	ns->naks = NIL;
	/* From now on its messages are neither acked nor NAKed here. */
	ns->given_back = true;
	if (!lease_send(ns, EB_NATS_JOB_LEASE_RELEASE, STEP_RELEASE, ns->lease_rev, now))
		release_end(ns, false);
}

/* The release is over (released: the lease is marked so): forget ns. */
static void
release_end(NatsSub *ns, bool released)
{
	if (ns->still_out > 0)
		ereport(LOG,
				(errmsg("JetStream consumer %s: %d messages delivered here were not finished at the release; given back",
						ns->durable, ns->still_out),
				 errdetail("A handler of one of them that commits here after all runs in this database and in the next holder's.")));
	if (released)
		ereport(LOG,
				(errmsg("released the JetStream lease of consumer %s (subject %s), %d messages given back",
						ns->durable, ns->topic, ns->naks_sent)));
	else
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not release the JetStream lease of consumer %s; another instance takes it when it goes stale",
						ns->durable)));
	eb_nats_subs = list_delete_ptr(eb_nats_subs, ns);
	eb_nats_release_sub(ns);
}

/* Stop fetching ns's subject and give its lease back once what is out came back. */
static void
start_release(NatsSub *ns)
{
	ns->state = SUB_RELEASING;
	ns->release_by = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), RELEASE_WAIT_MS);
}

/* We hold ns's lease at revision rev, written at sent: bind and fetch. */
static void
lease_acquired(NatsSub *ns, uint64 rev, TimestampTz sent, bool takeover, const char *how)
{
	ns->state = SUB_HELD;
	ns->lease_rev = rev;
	ns->refreshed = sent;
	ns->refresh_at = TimestampTzPlusMilliseconds(sent, LEASE_REFRESH_MS);
	ns->takeover = takeover;
	ns->check_at = TimestampTzPlusMilliseconds(sent, LEASE_RETRY_MS);
	ereport(LOG,
			(errmsg("holding the JetStream lease of consumer %s (subject %s): %s",
					ns->durable, ns->topic, how)));
	eb_nats_bind_sub(ns, takeover);
}

/* A stand-by takes its lease: write our name if its revision is still rev. */
static void
acquire_write(NatsSub *ns, uint64 rev, bool takeover, const char *how, TimestampTz now)
{
	ns->acquire_takeover = takeover;
	ns->acquire_how = how;
	if (!lease_send(ns, EB_NATS_JOB_LEASE_WRITE, STEP_ACQUIRE_WRITE, rev, now))
		ns->check_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
}

/* What a stand-by's read of its lease found: take it if free, ours, or stale. */
static void
acquire_read_done(NatsSub *ns, EbNatsLeaseState st, uint64 rev, TimestampTz now)
{
	switch (st)
	{
		case EB_LEASE_UNKNOWN:
			ns->check_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
			return;
		case EB_LEASE_FREE:
			/* Leave free subjects to instances holding fewer for a moment. */
			if (ns->free_since == 0)
				ns->free_since = now;
			ns->check_at = TimestampTzPlusMilliseconds(ns->free_since, LEASE_SPREAD_MS * leases_held());
			if (now < ns->check_at)
				return;
			acquire_write(ns, rev, rev == 0,
						  rev == 0 ? "first holder" : "released cleanly by its last holder", now);
			return;
		case EB_LEASE_MINE_BEFORE:
			/* Ours before (a dispatcher of ours that died, or a reconnect). */
			acquire_write(ns, rev, true, "taken back from a previous dispatcher of this instance", now);
			return;
		case EB_LEASE_OTHER:
			ns->free_since = 0;
			if (rev != ns->seen_rev)
			{
				ns->seen_rev = rev;
				ns->seen_at = now;
			}
			else if (now >= TimestampTzPlusMilliseconds(ns->seen_at, LEASE_TTL_MS))
			{
				acquire_write(ns, rev, true, "its holder stopped refreshing it", now);
				return;
			}
			ns->check_at = TimestampTzPlusMilliseconds(ns->seen_at, LEASE_TTL_MS + 100);
			return;
	}
}

/* Refresh a lease we hold: write our name again at the revision we wrote. */
static void
refresh(NatsSub *ns, TimestampTz now)
{
	if (!lease_send(ns, EB_NATS_JOB_LEASE_WRITE, STEP_REFRESH_WRITE, ns->lease_rev, now))
		ns->refresh_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
}

/*
 * A refresh's write was refused or not answered: what does the lease say?
 * Give the subject up if it is not ours any more.
 */
static void
refresh_read_done(NatsSub *ns, EbNatsLeaseState st, uint64 rev, TimestampTz now)
{
	switch (st)
	{
		case EB_LEASE_UNKNOWN:
		case EB_LEASE_MINE_BEFORE:	/* our write landed, its answer did not */
			if (rev != 0)
				ns->lease_rev = rev;
			ns->refresh_at = TimestampTzPlusMilliseconds(now, rev != 0 ? 0 : LEASE_RETRY_MS);
			return;
		default:
			ereport(LOG,
					(errmsg("lost the JetStream lease of consumer %s (subject %s) to another instance",
							ns->durable, ns->topic)));
			give_up(ns);
			return;
	}
}

/*
 * ns's lease request is over: go on from where it was sent.  ns may be
 * given up (and freed) here.
 */
static void
lease_step_done(NatsSub *ns, EbNatsJob *j, TimestampTz now)
{
	switch ((LeaseStep) ns->lease_step)
	{
		case STEP_ACQUIRE_READ:
			if (ns->state == SUB_STANDBY)
				acquire_read_done(ns, j->lease_state, j->lease_rev, now);
			break;
		case STEP_ACQUIRE_WRITE:
			if (ns->state != SUB_STANDBY)
				break;
			if (j->lease_newrev != 0)
				lease_acquired(ns, j->lease_newrev, ns->lease_sent, ns->acquire_takeover, ns->acquire_how);
			else
				ns->check_at = TimestampTzPlusMilliseconds(now, 200);
			break;
		case STEP_REFRESH_WRITE:
			if (j->lease_newrev != 0)
			{
				ns->lease_rev = j->lease_newrev;
				ns->refreshed = ns->lease_sent;
				ns->refresh_at = TimestampTzPlusMilliseconds(ns->lease_sent, LEASE_REFRESH_MS);
			}
			else if (ns->state == SUB_HELD &&
					 !lease_send(ns, EB_NATS_JOB_LEASE_READ, STEP_REFRESH_READ, 0, now))
				ns->refresh_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
			break;
		case STEP_REFRESH_READ:
			if (ns->state == SUB_HELD)
				refresh_read_done(ns, j->lease_state, j->lease_rev, now);
			break;
		case STEP_RELEASE:
			release_end(ns, j->ok);
			break;
		case STEP_NONE:
			break;
	}
}

/* Take the outcomes of the lease requests that are over. */
static void
lease_steps_finish(TimestampTz now)
{
	List	   *snapshot = list_copy(eb_nats_subs);
	ListCell   *lc;

	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);
		EbNatsJob  *j = ns->lease_job;

		if (j == NULL || !eb_nats_job_done(j))
			continue;
		ns->lease_job = NULL;
		lease_step_done(ns, j, now);
		eb_nats_job_free(j);
	}
	list_free(snapshot);
}

/* A lease was written (nats_lease.c's notification): look at it soon. */
static void
lease_changed(const char *key, bool is_free, void *arg)
{
	NatsSub    *ns = sub_of_key(key);

	if (ns != NULL && ns->state == SUB_STANDBY)
		ns->check_at = 0;
}

/*
 * Shared mode, every poll: fence, refresh, take, release leases.  A lease
 * not refreshed for LEASE_FENCE_MS (no server) is given up here before any
 * stand-by can find it stale.  Every request to the server is a job (at
 * most one per subscription at a time): this only starts them and takes
 * their outcomes.
 */
void
eb_nats_shared_tick(void)
{
	TimestampTz now = GetCurrentTimestamp();
	static TimestampTz open_at = 0;
	List	   *snapshot;
	ListCell   *lc;

	/* First the answers that came: a refresh answered just now counts. */
	lease_steps_finish(now);
	snapshot = list_copy(eb_nats_subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_HELD && now >= TimestampTzPlusMilliseconds(ns->refreshed, LEASE_FENCE_MS))
		{
			ereport(LOG,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("could not refresh the JetStream lease of consumer %s for %d ms, giving subject %s up",
							ns->durable, LEASE_FENCE_MS, ns->topic)));
			give_up(ns);
		}
	}
	list_free(snapshot);

	if (eb_js == NULL || !eb_nats_connected())
		return;
	if (!eb_nats_lease_ready())
	{
		if (!eb_nats_lease_opening())
		{
			if (now < open_at)
				return;
			open_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
		}
		if (!eb_nats_lease_open())
			return;
	}
	if (eb_nats_lease_changes(lease_changed, NULL))
		foreach(lc, eb_nats_subs)
			((NatsSub *) lfirst(lc))->check_at = 0;

	snapshot = list_copy(eb_nats_subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ProcDiePending)
			break;
		if (ns->lease_job != NULL)
			continue;			/* one request at a time */
		switch (ns->state)
		{
			case SUB_HELD:
				if (now >= ns->refresh_at)
					refresh(ns, now);
				else if (ns->feed == NULL && now >= ns->check_at)
				{
					/* The bind after the acquire failed: again, now and then. */
					ns->check_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
					eb_nats_bind_sub(ns, ns->takeover);
				}
				break;
			case SUB_STANDBY:
				if (now >= ns->check_at &&
					!lease_send(ns, EB_NATS_JOB_LEASE_READ, STEP_ACQUIRE_READ, 0, now))
					ns->check_at = TimestampTzPlusMilliseconds(now, LEASE_RETRY_MS);
				break;
			case SUB_RELEASING:
				if ((ns->held == 0 && ns->open_requests == 0) || now >= ns->release_by)
					release_begin(ns, now);
				break;
		}
	}
	list_free(snapshot);
}

/*
 * Shared mode: consume exactly these subjects — the ones not wanted any
 * more are released, new ones stand by until their lease is ours.  No
 * request to the server here: shared_tick does that.
 */
void
eb_nats_shared_set_topics(List *want)
{
	List	   *keep = NIL;
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);
		bool		is_wanted = eb_string_member(want, ns->topic);

		if (ns->state == SUB_RELEASING || (is_wanted && ns->state != SUB_RELEASING))
			keep = lappend(keep, ns);
		else if (ns->state == SUB_HELD)
		{
			start_release(ns);
			keep = lappend(keep, ns);
		}
		else
			eb_nats_release_sub(ns);
	}
	list_free(eb_nats_subs);
	eb_nats_subs = keep;

	foreach(lc, want)
	{
		const char *topic = lfirst(lc);
		bool		have = false;
		ListCell   *lc2;

		foreach(lc2, eb_nats_subs)
		{
			NatsSub    *ns = lfirst(lc2);

			if (ns->state != SUB_RELEASING && strcmp(ns->topic, topic) == 0)
				have = true;
		}
		if (!have)
			eb_nats_subs = lappend(eb_nats_subs, eb_nats_new_sub(topic, SUB_STANDBY));
	}
}

/*
 * Shared mode, at exit: give every lease back.  The server ends our pull
 * requests within SHARED_EXPIRES_MS; whatever they brought and whatever is
 * out unfinished is NAKed in stream order, then the leases are released
 * (their requests together, waited for at most STOP_RELEASE_MS).
 */
void
eb_nats_shared_stop(void)
{
	TimestampTz deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STOP_WAIT_MS);
	List	   *snapshot;
	ListCell   *lc;

	foreach(lc, eb_nats_subs)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state == SUB_HELD)
			ns->state = SUB_RELEASING;
	}
	for (;;)
	{
		bool		open = false;

		foreach(lc, eb_nats_subs)
		{
			NatsSub    *ns = lfirst(lc);
			EbNatsFeedState st;

			if (ns->state != SUB_RELEASING || ns->feed == NULL)
				continue;
			eb_nats_feed_state(ns->feed, &st);
			if (st.open > 0)
				open = true;
		}
		if (!open || !eb_nats_connected() || GetCurrentTimestamp() >= deadline)
			break;
		pg_usleep(20 * 1000);
	}

	/* A refresh under way may still move the revision: wait for it. */
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), STOP_RELEASE_MS);
	snapshot = list_copy(eb_nats_subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);

		if (ns->state != SUB_RELEASING || ns->lease_rev == 0)
			continue;
		if (ns->lease_job != NULL && ns->lease_step != STEP_RELEASE)
		{
			EbNatsJob  *j = ns->lease_job;

			if (!eb_nats_job_wait(j, Max(0, eb_ms_until(deadline))))
				continue;		/* no answer: others take it when it goes stale */
			ns->lease_job = NULL;
			if (j->kind == EB_NATS_JOB_LEASE_WRITE && j->lease_newrev != 0)
				ns->lease_rev = j->lease_newrev;
			eb_nats_job_free(j);
		}
		if (ns->lease_job == NULL)
			release_begin(ns, GetCurrentTimestamp());
	}
	list_free(snapshot);

	/* The releases, sent together: wait for them (bounded). */
	snapshot = list_copy(eb_nats_subs);
	foreach(lc, snapshot)
	{
		NatsSub    *ns = lfirst(lc);
		EbNatsJob  *j = ns->lease_job;

		if (j == NULL || ns->lease_step != STEP_RELEASE)
			continue;
		ns->lease_job = NULL;
		release_end(ns, eb_nats_job_wait(j, Max(0, eb_ms_until(deadline))) && j->ok);
		eb_nats_job_free(j);
	}
	list_free(snapshot);
	eb_nats_lease_close();
}

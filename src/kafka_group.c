/*
 * kafka_group.c — Kafka consumption shared between PostgreSQL instances
 * (eventbus.consumer_mode = shared): the dispatcher joins
 * eventbus.consumer_group with rd_kafka_subscribe, and the group splits the
 * partitions of the subscribed topics between the instances.
 *
 * Hand-over.  With the eager rebalance protocol (librdkafka's default
 * assignors), every rebalance first revokes each member's partitions.
 * librdkafka 2.0.2 pauses them, hands the revoke to our rebalance callback
 * and then waits — join state "wait-unassign-call", heartbeats still sent —
 * until the application calls rd_kafka_assign(NULL); only then does the
 * member commit and rejoin, and only after every member rejoined does the
 * group hand out the new assignment.  We use that wait: on revoke no new
 * message of those partitions is taken, the dispatcher loop keeps running
 * and handles the ones it already received — all of them, since one left
 * unhandled would stop the partition's completion point and the next owner
 * would handle again every later message handled here — and once they all
 * finished, or the drain deadline passed (then the rest are dropped, not
 * handled here), their completion points are committed synchronously
 * (bounded) and only then do we unassign.  So the next owner
 * of a partition starts after everything handled here, and an aggregate's
 * next event is not handled there before its previous one finished here.
 *
 * The drain deadline is session.timeout.ms - 2 x heartbeat.interval.ms
 * - 1 s (at least 1 s; 3 s with the defaults below).  Why: a broker that
 * stops counting a member's heartbeats while the group rebalances (the
 * librdkafka mock does; Kafka itself keeps counting them) expels it
 * session.timeout.ms after its last counted one — which may be a heartbeat
 * interval before the rebalance began, and we learn of the rebalance up to
 * one more interval after — and then gives its partitions to another
 * member whatever we do.  A handler still running at the deadline finishes
 * here, and the new owner may handle that event again.
 *
 * A commit the broker refuses during the rebalance (the mock refuses every
 * commit from the moment a member asks to join; Kafka accepts it) is kept
 * and sent again, synchronously, as soon as this member is in the new
 * generation, before it takes its own partitions — and kept again if that
 * is refused too (a new rebalance can begin right after an assignment);
 * and every member takes its assigned
 * partitions HANDOVER_GRACE_MS after the assignment arrived, so that the
 * previous owner's commit is stored before the committed offsets are read.
 * Messages of a partition no longer assigned are never committed.
 */
#include "postgres.h"

#include "lib/stringinfo.h"
#include "utils/memutils.h"
#include "utils/timestamp.h"

#include "eventbus.h"
#include "guc.h"
#include "kafka_client.h"
#include "util.h"

/* Synchronous commit of revoked partitions' completion points, at most. */
#define COMMIT_TIMEOUT_MS	2000

/*
 * Assigned partitions start this much later, so that a previous owner's
 * commit sent again after the rebalance (see above) is stored before we
 * read the committed offsets.
 */
#define HANDOVER_GRACE_MS	500

static bool draining = false;	/* a revoke waits for its messages */
static rd_kafka_topic_partition_list_t *revoking = NULL;
static TimestampTz drain_start = 0;
static TimestampTz drain_deadline = 0;
static int	drain_ms = 3000;
static List *wanted = NIL;		/* topics to subscribe (TopMemoryContext) */
static bool subscribed = false; /* rd_kafka_subscribe done */
static bool subscription_due = false;	/* wanted changed, not applied yet */

/*
 * Completion points the broker refused mid-rebalance: sent again at the
 * next assignment, and kept until a commit of them succeeds (a rebalance
 * may follow the assignment at once and refuse them again), for at most
 * DEFERRED_TRIES assignments.
 */
#define DEFERRED_TRIES		3
static rd_kafka_topic_partition_list_t *deferred = NULL;
static int	deferred_tries = 0;

/* An assignment waiting for HANDOVER_GRACE_MS. */
static rd_kafka_topic_partition_list_t *pending = NULL;
static TimestampTz pending_at = 0;

/* Is the group's protocol incremental (cooperative-sticky assignor)? */
static bool
cooperative(rd_kafka_t *rk)
{
	return strcmp(rd_kafka_rebalance_protocol(rk), "COOPERATIVE") == 0;
}

/* "topic[0,1,2] other[3]" for a log line (truncated when long). */
static char *
describe(const rd_kafka_topic_partition_list_t *list)
{
	StringInfoData buf;
	const char *prev = NULL;
	int			i;

	initStringInfo(&buf);
	for (i = 0; i < list->cnt && buf.len < 400; i++)
	{
		if (prev == NULL || strcmp(prev, list->elems[i].topic) != 0)
			appendStringInfo(&buf, "%s%s[%d", prev ? "] " : "", list->elems[i].topic,
							 list->elems[i].partition);
		else
			appendStringInfo(&buf, ",%d", list->elems[i].partition);
		prev = list->elems[i].topic;
	}
	if (prev)
		appendStringInfoString(&buf, i < list->cnt ? ", ...]" : "]");
	return buf.data;
}

/* Messages of these partitions neither finished nor given back yet. */
static int
running_in(const rd_kafka_topic_partition_list_t *list)
{
	int			n = 0;

	for (int i = 0; i < list->cnt; i++)
	{
		EbKafkaPart *t = eb_kafka_part_find(list->elems[i].topic, list->elems[i].partition);

		if (t)
			n += t->running;
	}
	return n;
}

/*
 * Commit these offsets and wait for the answer, at most COMMIT_TIMEOUT_MS.
 * On failure (a broker refusing commits while the group rebalances, or no
 * answer in time) they join "deferred", for the next generation; offsets
 * already deferred for other partitions stay there.  Takes offsets over.
 */
static void
commit_sync(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *offsets)
{
	rd_kafka_queue_t *q;
	rd_kafka_event_t *ev;
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR__TIMED_OUT;

	q = rd_kafka_queue_new(rk);
	if (rd_kafka_commit_queue(rk, offsets, q, NULL, NULL) == RD_KAFKA_RESP_ERR_NO_ERROR &&
		(ev = rd_kafka_queue_poll(q, COMMIT_TIMEOUT_MS)) != NULL)
	{
		const rd_kafka_topic_partition_list_t *res = rd_kafka_event_topic_partition_list(ev);

		err = rd_kafka_event_error(ev);
		for (int i = 0; err == RD_KAFKA_RESP_ERR_NO_ERROR && res && i < res->cnt; i++)
			err = res->elems[i].err;
		rd_kafka_event_destroy(ev);
	}
	rd_kafka_queue_destroy(q);

	if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		rd_kafka_topic_partition_list_destroy(offsets);
		return;
	}
	ereport(DEBUG1,
			(errmsg_internal("Kafka group \"%s\": commit of revoked partitions failed (%s), sent again after the rebalance",
							 eb_consumer_group, rd_kafka_err2str(err))));
	if (deferred)
	{
		for (int i = 0; i < deferred->cnt; i++)
			if (rd_kafka_topic_partition_list_find(offsets, deferred->elems[i].topic,
												   deferred->elems[i].partition) == NULL)
				rd_kafka_topic_partition_list_add(offsets, deferred->elems[i].topic,
												  deferred->elems[i].partition)->offset = deferred->elems[i].offset;
		rd_kafka_topic_partition_list_destroy(deferred);
	}
	deferred = offsets;
}

/* Commit the completion points of these partitions (see commit_sync). */
static void
commit_points(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *list)
{
	rd_kafka_topic_partition_list_t *offsets = rd_kafka_topic_partition_list_new(Max(list->cnt, 1));

	for (int i = 0; i < list->cnt; i++)
	{
		EbKafkaPart *t = eb_kafka_part_find(list->elems[i].topic, list->elems[i].partition);

		if (t && t->point >= 0)
			rd_kafka_topic_partition_list_add(offsets, t->key.topic, t->key.partition)->offset = t->point;
	}
	if (offsets->cnt == 0)
	{
		rd_kafka_topic_partition_list_destroy(offsets);
		return;
	}
	commit_sync(rk, offsets);
}

/*
 * The revoked partitions are drained (or the deadline passed, or they were
 * lost): commit what was handled, forget them, let librdkafka rejoin.
 */
static void
finish_revoke(rd_kafka_t *rk, bool lost)
{
	int			left = running_in(revoking);
	long		ms = (long) ((GetCurrentTimestamp() - drain_start) / 1000);

	if (!lost)
		commit_points(rk, revoking);
	eb_kafka_parts_forget(revoking);
	if (cooperative(rk))
	{
		rd_kafka_error_t *error = rd_kafka_incremental_unassign(rk, revoking);

		if (error)
			rd_kafka_error_destroy(error);
	}
	else
		rd_kafka_assign(rk, NULL);

	if (left > 0 && !lost)
		ereport(WARNING,
				(errcode(ERRCODE_QUERY_CANCELED),
				 errmsg("Kafka consumer group \"%s\": gave up %d partitions after %ld ms with %d events still running here",
						eb_consumer_group, revoking->cnt, ms, left),
				 errdetail("The drain deadline (%d ms) passed; the new owner may handle those events again, and their aggregates' next events before they finish here.",
						   drain_ms),
				 errhint("Raise session.timeout.ms in eventbus.kafka_properties: the deadline is session.timeout.ms - 2 x heartbeat.interval.ms - 1 s.")));
	else
		ereport(LOG,
				(errmsg("Kafka consumer group \"%s\": released %d partitions after %ld ms%s",
						eb_consumer_group, revoking->cnt, ms,
						lost ? " (lost: not committed)" : "")));
	rd_kafka_topic_partition_list_destroy(revoking);
	revoking = NULL;
	draining = false;
}

/* Take the group's assignment (or an incremental addition to it). */
static void
do_assign(rd_kafka_t *rk, const rd_kafka_topic_partition_list_t *list)
{
	rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
	rd_kafka_topic_partition_list_t *copy = rd_kafka_topic_partition_list_copy(list);

	for (int i = 0; i < copy->cnt; i++)
	{
		EbKafkaPart *t = eb_kafka_part_find(copy->elems[i].topic, copy->elems[i].partition);

		/* Left from an earlier assignment: those messages never commit. */
		if (t != NULL)
		{
			rd_kafka_topic_partition_list_t *one = rd_kafka_topic_partition_list_new(1);

			rd_kafka_topic_partition_list_add(one, t->key.topic, t->key.partition);
			eb_kafka_parts_forget(one);
			rd_kafka_topic_partition_list_destroy(one);
		}
		eb_kafka_part_track(copy->elems[i].topic, copy->elems[i].partition);
	}
	if (cooperative(rk))
	{
		rd_kafka_error_t *error = rd_kafka_incremental_assign(rk, copy);

		if (error)
		{
			err = rd_kafka_error_code(error);
			rd_kafka_error_destroy(error);
		}
	}
	else
		err = rd_kafka_assign(rk, copy);
	if (err == RD_KAFKA_RESP_ERR_NO_ERROR && eb_kafka_consumer_paused() && copy->cnt > 0)
		rd_kafka_pause_partitions(rk, copy);

	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("Kafka consumer group \"%s\": could not take %d assigned partitions: %s",
						eb_consumer_group, copy->cnt, rd_kafka_err2str(err))));
	else
		ereport(LOG,
				(errmsg("Kafka consumer group \"%s\" rebalanced: %d partitions assigned to this instance",
						eb_consumer_group, copy->cnt),
				 copy->cnt > 0 ? errdetail("%s", describe(copy)) : 0));
	rd_kafka_topic_partition_list_destroy(copy);
}

/*
 * The group's new assignment: first the commits refused during the
 * rebalance (we are in the new generation now), then take the partitions,
 * HANDOVER_GRACE_MS later.  (Any of them may come from another member whose
 * commit is still on its way, whatever we held before: ownership may have
 * changed in a generation we did not take part in.)
 */
static void
on_assign(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *list)
{
	if (deferred)
	{
		rd_kafka_topic_partition_list_t *d = deferred;

		/*
		 * Synchronously: the other members take their partitions only
		 * HANDOVER_GRACE_MS from now.  Refused again (a rebalance began at
		 * once), it stays deferred for the next assignment, a few times.
		 */
		deferred = NULL;
		if (++deferred_tries > DEFERRED_TRIES)
		{
			ereport(LOG,
					(errmsg("Kafka consumer group \"%s\": %d completion points of revoked partitions could not be committed",
							eb_consumer_group, d->cnt),
					 errdetail("Their next owner may handle again events handled here.")));
			rd_kafka_topic_partition_list_destroy(d);
		}
		else
			commit_sync(rk, d);
		if (deferred == NULL)
			deferred_tries = 0;
	}
	if (pending)
		rd_kafka_topic_partition_list_destroy(pending);
	pending = NULL;
	if (list->cnt == 0)
	{
		do_assign(rk, list);
		return;
	}
	pending = rd_kafka_topic_partition_list_copy(list);
	pending_at = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), HANDOVER_GRACE_MS);
}

/*
 * Partitions are taken from this instance: stop handling their messages and
 * wait (in the dispatcher loop, see eb_kafka_group_serve) until the ones
 * already running finished.
 */
static void
on_revoke(rd_kafka_t *rk, rd_kafka_topic_partition_list_t *list)
{
	bool		lost = rd_kafka_assignment_lost(rk);
	int			running;

	if (draining)				/* never two at once; be safe */
		finish_revoke(rk, false);
	if (pending)				/* revoked before we took it */
	{
		rd_kafka_topic_partition_list_destroy(pending);
		pending = NULL;
	}
	for (int i = 0; i < list->cnt; i++)
	{
		EbKafkaPart *t = eb_kafka_part_find(list->elems[i].topic, list->elems[i].partition);

		if (t)
			t->revoked = true;
	}
	revoking = rd_kafka_topic_partition_list_copy(list);
	draining = true;
	drain_start = GetCurrentTimestamp();
	drain_deadline = TimestampTzPlusMilliseconds(drain_start, drain_ms);
	running = running_in(list);

	ereport(LOG,
			(errmsg("Kafka consumer group \"%s\" rebalancing: %d partitions revoked from this instance, %d of their events in flight",
					eb_consumer_group, list->cnt, running),
			 lost ? errdetail("The assignment was lost (session timed out): nothing of it is committed.") :
			 running > 0 ? errdetail("Finishing the running ones first, for at most %d ms.", drain_ms) : 0));
	if (lost || running == 0)
		finish_revoke(rk, lost);
}

/* librdkafka's rebalance callback (main thread, inside consumer poll). */
static void
rebalance_cb(rd_kafka_t *rk, rd_kafka_resp_err_t err,
			 rd_kafka_topic_partition_list_t *partitions, void *opaque)
{
	if (err == RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS)
		on_assign(rk, partitions);
	else if (err == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS)
		on_revoke(rk, partitions);
	else
	{
		ereport(LOG,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("Kafka consumer group \"%s\": rebalance failed: %s",
						eb_consumer_group, rd_kafka_err2str(err))));
		rd_kafka_assign(rk, NULL);
	}
}

/*
 * Shared-mode settings of the consumer, before eventbus.kafka_properties
 * (which may override them): short session so that an instance that died
 * is replaced within seconds; completion points committed every 200 ms,
 * since what a dead instance handled and had not committed is handled
 * again elsewhere (librdkafka commits only partitions whose point moved);
 * and a metadata refresh that finds topics created after the subscription.
 */
bool
eb_kafka_group_configure(rd_kafka_conf_t *conf, char *errstr, size_t errlen)
{
	if (rd_kafka_conf_set(conf, "session.timeout.ms", "6000", errstr, errlen) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "heartbeat.interval.ms", "1000", errstr, errlen) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "auto.commit.interval.ms", "200", errstr, errlen) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "topic.metadata.refresh.interval.ms", "5000", errstr, errlen) != RD_KAFKA_CONF_OK)
		return false;
	rd_kafka_conf_set_rebalance_cb(conf, rebalance_cb);
	draining = false;
	revoking = NULL;
	deferred = NULL;
	deferred_tries = 0;
	pending = NULL;
	subscribed = false;
	subscription_due = false;
	list_free_deep(wanted);
	wanted = NIL;
	return true;
}

/* An integer property of the running client, or dflt. */
static int
conf_int(const char *name, int dflt)
{
	char		buf[64];
	size_t		size = sizeof(buf);

	if (rd_kafka_conf_get(rd_kafka_conf(eb_kafka), name, buf, &size) != RD_KAFKA_CONF_OK)
		return dflt;
	return atoi(buf);
}

/* The client exists: derive the drain deadline from its session settings. */
void
eb_kafka_group_started(void)
{
	drain_ms = Max(1000, conf_int("session.timeout.ms", 6000) -
				   2 * conf_int("heartbeat.interval.ms", 1000) - 1000);
}

/* Subscribe to the wanted topics (a changed set is a rebalance). */
static void
apply_subscription(void)
{
	rd_kafka_topic_partition_list_t *list;
	rd_kafka_resp_err_t err;
	ListCell   *lc;

	subscription_due = false;
	if (wanted == NIL)
	{
		if (subscribed)
			rd_kafka_unsubscribe(eb_kafka);
		subscribed = false;
		return;
	}
	list = rd_kafka_topic_partition_list_new(list_length(wanted));
	foreach(lc, wanted)
		rd_kafka_topic_partition_list_add(list, lfirst(lc), RD_KAFKA_PARTITION_UA);
	err = rd_kafka_subscribe(eb_kafka, list);
	rd_kafka_topic_partition_list_destroy(list);
	if (err != RD_KAFKA_RESP_ERR_NO_ERROR)
		ereport(WARNING,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not subscribe Kafka consumer group \"%s\" to %d topics: %s",
						eb_consumer_group, list_length(wanted), rd_kafka_err2str(err))));
	else
		subscribed = true;
}

/*
 * Consume exactly these topics.  A name starting with '^' is never a Kafka
 * topic (and librdkafka would take it for a pattern): it is left out.
 */
void
eb_kafka_group_set_topics(List *want)
{
	List	   *fresh = NIL;
	bool		same;
	ListCell   *lc;
	MemoryContext old = MemoryContextSwitchTo(TopMemoryContext);

	foreach(lc, want)
	{
		const char *topic = lfirst(lc);

		if (topic[0] == '^')
			continue;
		if (!eb_string_member(fresh, topic))
			fresh = lappend(fresh, pstrdup(topic));
	}
	MemoryContextSwitchTo(old);

	same = list_length(fresh) == list_length(wanted);
	foreach(lc, fresh)
		if (!eb_string_member(wanted, lfirst(lc)))
			same = false;
	if (same)
	{
		list_free_deep(fresh);
		return;
	}
	foreach(lc, want)
		if (((const char *) lfirst(lc))[0] == '^')
			ereport(WARNING,
					(errcode(ERRCODE_INVALID_NAME),
					 errmsg("Kafka topic \"%s\" is not consumed: a Kafka topic name cannot start with '^'",
							(const char *) lfirst(lc))));
	list_free_deep(wanted);
	wanted = fresh;
	subscription_due = true;
	eb_kafka_group_serve();
}

/*
 * Every dispatcher loop iteration: finish a revoke once its messages came
 * back or its deadline passed; take an assignment once its grace passed;
 * then apply a changed subscription (never in the middle of a hand-over).
 */
void
eb_kafka_group_serve(void)
{
	if (eb_kafka == NULL)
		return;
	if (draining &&
		(running_in(revoking) == 0 || GetCurrentTimestamp() >= drain_deadline))
		finish_revoke(eb_kafka, false);
	if (pending && GetCurrentTimestamp() >= pending_at)
	{
		rd_kafka_topic_partition_list_t *list = pending;

		pending = NULL;
		do_assign(eb_kafka, list);
		rd_kafka_topic_partition_list_destroy(list);
	}
	if (!draining && pending == NULL && subscription_due)
		apply_subscription();
}

/*
 * The consumer stops (its pool is gone): a hand-over in progress ends now,
 * with what was handled committed, and an assignment waiting is taken (the
 * close gives it back at once).  The close then leaves the group.
 */
void
eb_kafka_group_stop(void)
{
	if (eb_kafka != NULL && draining)
		finish_revoke(eb_kafka, false);
	if (deferred)
		rd_kafka_topic_partition_list_destroy(deferred);
	deferred = NULL;
	deferred_tries = 0;
	if (pending)
	{
		/* librdkafka's close waits for the answer to that assignment. */
		if (eb_kafka != NULL)
			do_assign(eb_kafka, pending);
		rd_kafka_topic_partition_list_destroy(pending);
	}
	pending = NULL;
}

/* Wait (ms) before the dispatcher must look again (a deadline), 0 if none. */
int
eb_kafka_group_wait_ms(void)
{
	return (draining || pending) ? 100 : 0;
}

/*
 * A rebalance event while the consumer closes: hand everything back (the
 * stored completion points are committed by the unassign, since
 * enable.auto.commit is on).
 */
void
eb_kafka_group_close_event(rd_kafka_t *rk, rd_kafka_event_t *ev)
{
	const rd_kafka_topic_partition_list_t *list = rd_kafka_event_topic_partition_list(ev);
	bool		revoke = rd_kafka_event_error(ev) == RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS;

	if (list != NULL)
		eb_kafka_parts_forget(list);
	if (cooperative(rk) && list != NULL)
	{
		rd_kafka_error_t *error = revoke ?
			rd_kafka_incremental_unassign(rk, list) :
			rd_kafka_incremental_assign(rk, list);

		if (error)
			rd_kafka_error_destroy(error);
	}
	else
		rd_kafka_assign(rk, NULL);
	if (revoke && list != NULL)
		ereport(LOG,
				(errmsg("Kafka consumer group \"%s\": leaving the group, %d partitions released",
						eb_consumer_group, list->cnt)));
}

/*
 * natstool_admin.c — natstool's commands about JetStream streams, durable
 * consumers and KeyValue keys (see natstool.c for the command line).
 */
#define _GNU_SOURCE
#include <nats/nats.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "natstool.h"

/* Is every subject of a also in b? */
static bool
all_in(const char **a, int na, const char **b, int nb)
{
	for (int i = 0; i < na; i++)
	{
		int			j = 0;

		while (j < nb && strcmp(a[i], b[j]) != 0)
			j++;
		if (j == nb)
			return false;
	}
	return true;
}

int
cmd_ensure_stream(const char *name, const char **subjects, int nsubjects)
{
	jsStreamInfo *si = NULL;
	jsStreamConfig cfg;
	jsErrCode	jerr = 0;
	natsStatus	s = js_GetStreamInfo(&si, js, name, NULL, &jerr);

	if (s == NATS_OK)
	{
		jsStreamConfig *c = si->Config;
		bool		same = c->Storage == js_FileStorage &&
			all_in(c->Subjects, c->SubjectsLen, subjects, nsubjects) &&
			all_in(subjects, nsubjects, c->Subjects, c->SubjectsLen);

		jsStreamInfo_Destroy(si);
		if (!same)
		{
			fprintf(stderr, "natstool: stream %s exists with other subjects or storage\n", name);
			return EXIT_ERR;
		}
		printf("exists %s\n", name);
		return 0;
	}
	if (s != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr)
		return fail("looking up the stream", s, jerr);
	jsStreamConfig_Init(&cfg);
	cfg.Name = name;
	cfg.Subjects = subjects;
	cfg.SubjectsLen = nsubjects;
	cfg.Storage = js_FileStorage;
	s = js_AddStream(&si, js, &cfg, NULL, &jerr);
	if (s != NATS_OK)
		return fail("creating the stream", s, jerr);
	jsStreamInfo_Destroy(si);
	printf("created %s\n", name);
	return 0;
}

int
cmd_set_limit(const char *name, bool msgs, const char *value)
{
	jsStreamInfo *si = NULL,
			   *updated = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s;
	char	   *end;
	long		v;

	errno = 0;
	v = strtol(value, &end, 10);
	if (errno != 0 || *end != '\0' || end == value || v < -1 || v > INT32_MAX)
		return usage("the limit must be -1 or a non-negative 32-bit number");
	s = js_GetStreamInfo(&si, js, name, NULL, &jerr);
	if (s != NATS_OK)
		return fail("looking up the stream", s, jerr);
	if (msgs)
		si->Config->MaxMsgs = v;
	else
		si->Config->MaxMsgSize = (int32_t) v;
	s = js_UpdateStream(&updated, js, si->Config, NULL, &jerr);
	jsStreamInfo_Destroy(si);
	if (s != NATS_OK)
		return fail("updating the stream", s, jerr);
	jsStreamInfo_Destroy(updated);
	printf("updated %s %s %ld\n", name, msgs ? "max_msgs" : "max_msg_size", v);
	return 0;
}

int
cmd_stream_info(const char *subject)
{
	char	   *stream = NULL;
	jsStreamInfo *si = NULL;
	jsStreamConfig *c;
	jsErrCode	jerr = 0;
	natsStatus	s;
	int			rc;

	if ((rc = find_stream(subject, &stream)) != 0)
		return rc;
	s = js_GetStreamInfo(&si, js, stream, NULL, &jerr);
	free(stream);
	if (s != NATS_OK)
		return fail("getting stream info", s, jerr);
	c = si->Config;
	fputs("{\"name\":", stdout);
	put_json_str(c->Name);
	fputs(",\"subjects\":[", stdout);
	for (int i = 0; i < c->SubjectsLen; i++)
	{
		if (i > 0)
			putchar(',');
		put_json_str(c->Subjects[i]);
	}
	printf("],\"retention\":\"%s\",\"discard\":\"%s\",\"max_msgs\":%lld,\"max_bytes\":%lld,"
		   "\"max_age\":%lld,\"max_msgs_per_subject\":%lld,\"max_msg_size\":%lld,"
		   "\"storage\":\"%s\",\"replicas\":%lld,\"duplicate_window\":%lld,"
		   "\"allow_direct\":%s,\"messages\":%llu,\"bytes\":%llu,\"first_seq\":%llu,"
		   "\"last_seq\":%llu,\"num_deleted\":%llu,\"consumer_count\":%lld}\n",
		   c->Retention == js_InterestPolicy ? "interest" :
		   c->Retention == js_WorkQueuePolicy ? "workqueue" : "limits",
		   c->Discard == js_DiscardNew ? "new" : "old",
		   (long long) c->MaxMsgs, (long long) c->MaxBytes, (long long) c->MaxAge,
		   (long long) c->MaxMsgsPerSubject, (long long) c->MaxMsgSize,
		   c->Storage == js_MemoryStorage ? "memory" : "file",
		   (long long) c->Replicas, (long long) c->Duplicates,
		   c->AllowDirect ? "true" : "false",
		   (unsigned long long) si->State.Msgs, (unsigned long long) si->State.Bytes,
		   (unsigned long long) si->State.FirstSeq, (unsigned long long) si->State.LastSeq,
		   (unsigned long long) si->State.NumDeleted, (long long) si->State.Consumers);
	jsStreamInfo_Destroy(si);
	return 0;
}

int
cmd_consumers(const char *stream)
{
	jsConsumerInfoList *list = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s = js_Consumers(&list, js, stream, NULL, &jerr);
	const char **names;
	int			n = 0;

	if (s == NATS_NOT_FOUND && jerr != JSStreamNotFoundErr)
		return 0;				/* the stream has no consumers */
	if (s != NATS_OK)
		return fail("listing consumers", s, jerr);
	names = calloc(list->Count + 1, sizeof(*names));
	for (int i = 0; names != NULL && i < list->Count; i++)
		if (list->List[i]->Config->Durable && list->List[i]->Config->Durable[0])
			names[n++] = list->List[i]->Config->Durable;
	if (names != NULL)
		qsort(names, n, sizeof(*names), cmp_str);
	for (int i = 0; i < n; i++)
		printf("%s\n", names[i]);
	free(names);
	jsConsumerInfoList_Destroy(list);
	return 0;
}

/* Print one durable's ack policy and positions. */
int
cmd_consumer(const char *stream, const char *durable)
{
	jsConsumerInfo *ci = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s = js_GetConsumerInfo(&ci, js, stream, durable, NULL, &jerr);

	if (s != NATS_OK)
		return fail("reading the consumer", s, jerr);
	printf("ack=%s delivered=%llu ack_floor=%llu ack_pending=%lld pending=%llu\n",
		   ci->Config->AckPolicy == js_AckNone ? "none" :
		   ci->Config->AckPolicy == js_AckAll ? "all" : "explicit",
		   (unsigned long long) ci->Delivered.Stream, (unsigned long long) ci->AckFloor.Stream,
		   (long long) ci->NumAckPending, (unsigned long long) ci->NumPending);
	jsConsumerInfo_Destroy(ci);
	return 0;
}

/* Print a KeyValue entry's value; exit status 3 if there is none. */
int
cmd_kv_get(const char *bucket, const char *key)
{
	kvStore    *kv = NULL;
	kvEntry    *e = NULL;
	natsStatus	s = js_KeyValue(&kv, js, bucket);

	if (s == NATS_OK)
		s = kvStore_Get(&e, kv, key);
	if (s == NATS_NOT_FOUND)
	{
		kvStore_Destroy(kv);
		return 3;
	}
	if (s != NATS_OK)
	{
		kvStore_Destroy(kv);
		return fail("reading the key", s, 0);
	}
	printf("%.*s\n", kvEntry_ValueLen(e), kvEntry_ValueString(e));
	kvEntry_Destroy(e);
	kvStore_Destroy(kv);
	return 0;
}

/* Delete a KeyValue key with its history. */
int
cmd_kv_del(const char *bucket, const char *key)
{
	kvStore    *kv = NULL;
	natsStatus	s = js_KeyValue(&kv, js, bucket);

	if (s == NATS_OK)
		s = kvStore_Purge(kv, key, NULL);
	kvStore_Destroy(kv);
	if (s != NATS_OK)
		return fail("deleting the key", s, 0);
	printf("deleted %s\n", key);
	return 0;
}

/* Delete a stream (with its messages and consumers). */
int
cmd_stream_delete(const char *name)
{
	jsErrCode	jerr = 0;
	natsStatus	s = js_DeleteStream(js, name, NULL, &jerr);

	if (s != NATS_OK)
		return fail("deleting the stream", s, jerr);
	printf("deleted %s\n", name);
	return 0;
}

/*
 * Create a KeyValue bucket (one revision per key) and seal its stream: it
 * can be opened and read, but takes no write.
 */
int
cmd_kv_add_sealed(const char *bucket)
{
	kvStore    *kv = NULL;
	kvConfig	cfg;
	jsStreamInfo *si = NULL,
			   *updated = NULL;
	jsErrCode	jerr = 0;
	char		stream[256];
	natsStatus	s;

	kvConfig_Init(&cfg);
	cfg.Bucket = bucket;
	cfg.History = 1;
	s = js_CreateKeyValue(&kv, js, &cfg);
	if (s != NATS_OK)
		return fail("creating the bucket", s, 0);
	kvStore_Destroy(kv);
	snprintf(stream, sizeof(stream), "KV_%s", bucket);
	s = js_GetStreamInfo(&si, js, stream, NULL, &jerr);
	if (s != NATS_OK)
		return fail("looking up the bucket's stream", s, jerr);
	si->Config->Sealed = true;
	s = js_UpdateStream(&updated, js, si->Config, NULL, &jerr);
	jsStreamInfo_Destroy(si);
	if (s != NATS_OK)
		return fail("sealing the bucket's stream", s, jerr);
	jsStreamInfo_Destroy(updated);
	printf("created %s (sealed)\n", bucket);
	return 0;
}

/*
 * natstool — an independent JetStream client for the eventbus tests: it reads
 * back what eventbus published and publishes inbound test messages (also
 * malformed ones).  It shares no code with eventbus; it uses only cnats' own
 * JetStream, message and header APIs.
 *
 * Usage: natstool --url nats://HOST:PORT COMMAND ...
 *
 *   dump SUBJECT
 *       Every stored message whose subject matches SUBJECT (wildcards allowed),
 *       in stream order, one JSON object per line:
 *         {"stream":"S","seq":N,"subject":"...","time":"...","headers":{"Name":"value",...},"data":"..."}
 *       "time" is when the server stored the message (RFC 3339, UTC,
 *       nanoseconds).
 *       Header names sorted; a header with several values is an array.  A body
 *       that is not valid UTF-8 is given as "data_hex" instead of "data".
 *       Read through an ordered (ephemeral, unacknowledged) consumer.
 *       Headers are parsed by cnats (natsMsgHeader_Keys/Values).  With cnats
 *       3.4.1 a message of 100 or more headers comes back with some distinct
 *       names merged (e.g. X-H1's value listed under X-H100); eventbus's own
 *       messages carry about ten.
 *   pub SUBJECT [--header 'Name: value']... [--msg-id-from-event-id] [--hex]
 *       One message per stdin line (without its newline).  --hex: each line is
 *       the hex encoding of the body.  --msg-id-from-event-id: Nats-Msg-Id is
 *       the body's first "event_id":"..." string (skipped when absent, empty
 *       or escaped).  Every message must be acked; prints "published N".
 *   ensure-stream NAME SUBJECT...
 *       Create file-storage stream NAME capturing SUBJECTs, or keep it if it
 *       exists with that subject set and file storage: "created/exists NAME".
 *   set-max-msg-size NAME BYTES | set-max-msgs NAME COUNT   (-1 = unlimited)
 *       Prints "updated NAME max_msg_size BYTES" / "updated NAME max_msgs COUNT".
 *   stream-info SUBJECT
 *       One JSON line about the stream capturing SUBJECT (config and state).
 *   consumers STREAM
 *       Durable consumer names of STREAM, sorted, one per line.
 *   consumer STREAM DURABLE
 *       "ack=none|all|explicit delivered=SEQ ack_floor=SEQ ack_pending=N
 *       pending=N" (stream sequences) for that durable.
 *   kv-get BUCKET KEY
 *       The key's value on one line; exit status 3 if the key does not exist.
 *   kv-del BUCKET KEY
 *       Delete the key (its history too): "deleted KEY".
 *   stream-delete NAME
 *       Delete the stream with its messages and consumers: "deleted NAME".
 *   kv-add-sealed BUCKET
 *       Create a KeyValue bucket and seal its stream (it can be opened and
 *       read but takes no write): "created BUCKET (sealed)".
 *
 * Exit status: 0 success, 1 error, 2 no such stream, 3 no such key, 64 usage error.
 */
#define _GNU_SOURCE
#include <nats/nats.h>

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "natstool.h"


natsConnection *nc;
jsCtx	   *js;

/* Async publish results; written by cnats' reply thread only, read after
 * js_PublishAsyncComplete (which waits for the handlers under the js lock). */
static uint64_t n_acked,
			n_dups,
			n_failed;

int
fail(const char *what, natsStatus s, jsErrCode jerr)
{
	const char *detail = nats_GetLastError(NULL);

	fprintf(stderr, "natstool: %s: %s", what, natsStatus_GetText(s));
	if (jerr != 0)
		fprintf(stderr, " (JetStream error %d)", (int) jerr);
	if (detail != NULL && *detail != '\0')
		fprintf(stderr, ": %s", detail);
	fputc('\n', stderr);
	return (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr) ? EXIT_NOSTREAM : EXIT_ERR;
}

int
usage(const char *msg)
{
	if (msg)
		fprintf(stderr, "natstool: %s\n", msg);
	fputs("usage: natstool --url nats://HOST:PORT COMMAND ...\n"
		  "  dump SUBJECT\n"
		  "  pub SUBJECT [--header 'Name: value']... [--msg-id-from-event-id] [--hex]\n"
		  "  ensure-stream NAME SUBJECT...\n"
		  "  set-max-msg-size NAME BYTES | set-max-msgs NAME COUNT\n"
		  "  stream-info SUBJECT\n"
		  "  consumers STREAM\n"
		  "  consumer STREAM DURABLE\n"
		  "  kv-get BUCKET KEY | kv-del BUCKET KEY\n"
		  "  stream-delete NAME | kv-add-sealed BUCKET\n"
		  "  listen SUBJECT SECONDS [data]\n", stderr);
	return EXIT_USAGE;
}

/* Length of the well-formed UTF-8 sequence at s (n > 0 bytes), 0 if ill-formed. */
static size_t
utf8_len(const unsigned char *s, size_t n)
{
	unsigned char lo = 0x80,
				hi = 0xBF;
	size_t		len,
				i;

	if (s[0] < 0x80)
		return 1;
	if (s[0] >= 0xC2 && s[0] <= 0xDF)
		len = 2;
	else if (s[0] >= 0xE0 && s[0] <= 0xEF)
	{
		len = 3;
		lo = s[0] == 0xE0 ? 0xA0 : 0x80;	/* no overlong forms */
		hi = s[0] == 0xED ? 0x9F : 0xBF;	/* no surrogates */
	}
	else if (s[0] >= 0xF0 && s[0] <= 0xF4)
	{
		len = 4;
		lo = s[0] == 0xF0 ? 0x90 : 0x80;
		hi = s[0] == 0xF4 ? 0x8F : 0xBF;	/* up to U+10FFFF */
	}
	else
		return 0;
	if (n < len || s[1] < lo || s[1] > hi)
		return 0;
	for (i = 2; i < len; i++)
		if (s[i] < 0x80 || s[i] > 0xBF)
			return 0;
	return len;
}

/* Print s as a JSON string; ill-formed UTF-8 bytes become U+FFFD. */
static void
put_json(const char *data, size_t n)
{
	const unsigned char *s = (const unsigned char *) data;
	size_t		i = 0;

	putchar('"');
	while (i < n)
	{
		size_t		l = utf8_len(s + i, n - i);

		if (s[i] == '"' || s[i] == '\\')
			printf("\\%c", s[i]);
		else if (s[i] < 0x20 || s[i] == 0x7F)
			printf("\\u%04x", s[i]);
		else if (l == 0)
			fputs("\\ufffd", stdout);
		else
			fwrite(s + i, 1, l, stdout);
		i += l ? l : 1;
	}
	putchar('"');
}

void
put_json_str(const char *s)
{
	put_json(s ? s : "", s ? strlen(s) : 0);
}

static int
hexval(char c)
{
	const char *digits = "0123456789abcdef0123456789ABCDEF";
	const char *p = c ? strchr(digits, c) : NULL;

	return p ? (int) ((p - digits) % 16) : -1;
}

int
cmp_str(const void *a, const void *b)
{
	return strcmp(*(const char *const *) a, *(const char *const *) b);
}

/* Name of the stream capturing subject (js_StreamNames filters by subject). */
int
find_stream(const char *subject, char **name)
{
	jsStreamNamesList *list = NULL;
	jsOptions	o;
	jsErrCode	jerr = 0;
	natsStatus	s;

	jsOptions_Init(&o);
	o.Stream.Info.SubjectsFilter = subject;
	s = js_StreamNames(&list, js, &o, &jerr);
	if (s == NATS_NOT_FOUND)
	{
		fprintf(stderr, "natstool: no stream captures subject %s\n", subject);
		return EXIT_NOSTREAM;
	}
	if (s != NATS_OK)
		return fail("listing streams", s, jerr);
	*name = strdup(list->List[0]);
	jsStreamNamesList_Destroy(list);
	return 0;
}

/* ,"time":"..." for a JetStream timestamp (ns since the epoch, UTC). */
static void
put_time(int64_t ns)
{
	time_t		secs = (time_t) (ns / 1000000000);
	struct tm	tm;

	gmtime_r(&secs, &tm);
	printf(",\"time\":\"%04d-%02d-%02dT%02d:%02d:%02d.%09lldZ\"",
		   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
		   tm.tm_sec, (long long) (ns % 1000000000));
}

/* "headers":{...} from the keys natsMsgHeader_Keys gave (sorted here). */
static void
put_headers(natsMsg *m, const char **keys, int nkeys)
{
	fputs("\"headers\":{", stdout);
	qsort(keys, nkeys, sizeof(*keys), cmp_str);
	for (int i = 0; i < nkeys; i++)
	{
		const char **vals = NULL;
		int			nvals = 0;

		if (i > 0)
			putchar(',');
		put_json_str(keys[i]);
		putchar(':');
		if (natsMsgHeader_Values(m, keys[i], &vals, &nvals) != NATS_OK)
			nvals = 0;
		if (nvals == 1)
			put_json_str(vals[0]);
		else
		{
			putchar('[');
			for (int j = 0; j < nvals; j++)
			{
				if (j > 0)
					putchar(',');
				put_json_str(vals[j]);
			}
			putchar(']');
		}
		free(vals);
	}
	putchar('}');
}

static int
cmd_dump(const char *subject)
{
	char	   *stream = NULL;
	jsStreamInfo *si = NULL;
	jsOptions	o;
	jsSubOptions so;
	natsSubscription *sub = NULL;
	jsErrCode	jerr = 0;
	natsStatus	s = NATS_OK;
	uint64_t	expected = 0;
	int			rc;

	if ((rc = find_stream(subject, &stream)) != 0)
		return rc;
	/* Count the matching messages first: a consumer on none would just wait. */
	jsOptions_Init(&o);
	o.Stream.Info.SubjectsFilter = subject;
	s = js_GetStreamInfo(&si, js, stream, &o, &jerr);
	if (s != NATS_OK)
	{
		free(stream);
		return fail("getting stream info", s, jerr);
	}
	for (int i = 0; si->State.Subjects && i < si->State.Subjects->Count; i++)
		expected += si->State.Subjects->List[i].Msgs;
	jsStreamInfo_Destroy(si);

	jsSubOptions_Init(&so);
	so.Stream = stream;
	so.Ordered = true;
	if (expected > 0)
		s = js_SubscribeSync(&sub, js, subject, NULL, &so, &jerr);
	if (s == NATS_OK && sub != NULL)
		s = natsSubscription_SetPendingLimits(sub, -1, -1);
	if (s != NATS_OK)
		rc = fail("creating an ordered consumer", s, jerr);

	/* Until the server says nothing matching is pending after a message. */
	while (rc == 0 && expected > 0)
	{
		natsMsg    *m = NULL;
		jsMsgMetaData *meta = NULL;
		const char **keys = NULL;
		int			nkeys = 0;
		bool		last;

		s = natsSubscription_NextMsg(&m, sub, TIMEOUT_MS);
		if (s == NATS_OK)
			s = natsMsg_GetMetaData(&meta, m);
		if (s == NATS_OK)
			s = natsMsgHeader_Keys(m, &keys, &nkeys);
		if (s == NATS_NOT_FOUND)
			s = NATS_OK;		/* no headers */
		if (s != NATS_OK)
		{
			jsMsgMetaData_Destroy(meta);
			natsMsg_Destroy(m);
			rc = fail("reading the stream", s, 0);
			break;
		}
		fputs("{\"stream\":", stdout);
		put_json_str(stream);
		printf(",\"seq\":%llu,\"subject\":", (unsigned long long) meta->Sequence.Stream);
		put_json_str(natsMsg_GetSubject(m));
		put_time(meta->Timestamp);
		putchar(',');
		put_headers(m, keys, nkeys);
		free(keys);
		{
			const unsigned char *d = (const unsigned char *) natsMsg_GetData(m);
			size_t		n = (size_t) natsMsg_GetDataLength(m),
						i = 0,
						l;

			while (i < n && (l = utf8_len(d + i, n - i)) > 0)
				i += l;
			if (i == n)
			{
				fputs(",\"data\":", stdout);
				put_json(n ? (const char *) d : "", n);
			}
			else
			{
				fputs(",\"data_hex\":\"", stdout);
				for (i = 0; i < n; i++)
					printf("%02x", d[i]);
				putchar('"');
			}
		}
		fputs("}\n", stdout);
		last = meta->NumPending == 0;
		jsMsgMetaData_Destroy(meta);
		natsMsg_Destroy(m);
		if (last)
			break;
	}
	if (sub != NULL)
	{
		natsSubscription_Unsubscribe(sub);
		natsSubscription_Destroy(sub);
	}
	free(stream);
	return rc;
}

static void
on_ack(jsCtx *ctx, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
	if (pae != NULL)
	{
		if (n_failed++ == 0)
			fprintf(stderr, "natstool: publish to %s not acked: %s %s (JetStream error %d)\n",
					natsMsg_GetSubject(msg), natsStatus_GetText(pae->Err),
					pae->ErrText ? pae->ErrText : "", (int) pae->ErrCode);
	}
	else if (pa != NULL)
	{
		n_acked++;
		n_dups += pa->Duplicate;
	}
	natsMsg_Destroy(msg);
	(void) ctx;
	(void) closure;
}

/* The body's first "event_id":"..." value, plain characters only; or NULL. */
static char *
event_id(const char *body, size_t len)
{
	static const char key[] = "\"event_id\"";
	const char *end = body + len,
			   *p = body,
			   *q;

	while ((q = memmem(p, end - p, key, sizeof(key) - 1)) != NULL)
	{
		const char *v = q + sizeof(key) - 1;

		p = q + 1;
		while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
			v++;
		if (v == end || *v++ != ':')
			continue;
		while (v < end && (*v == ' ' || *v == '\t' || *v == '\n' || *v == '\r'))
			v++;
		if (v == end || *v++ != '"')
			continue;
		for (q = v; q < end && *q != '"'; q++)
			if (*q == '\\' || (unsigned char) *q < 0x20)
				return NULL;
		return q < end && q > v ? strndup(v, q - v) : NULL;
	}
	return NULL;
}

typedef struct
{
	char	   *name;
	char	   *value;
} header;

/* 'Name: value' (blanks around both trimmed); false if there is no name. */
static bool
parse_header(const char *arg, header *h)
{
	const char *colon = strchr(arg, ':');
	const char *ne = colon,
			   *v;
	size_t		vl;

	if (colon == NULL)
		return false;
	while (*arg == ' ' || *arg == '\t')
		arg++;
	while (ne > arg && (ne[-1] == ' ' || ne[-1] == '\t'))
		ne--;
	if (ne <= arg)
		return false;
	for (v = colon + 1; *v == ' ' || *v == '\t'; v++)
		;
	for (vl = strlen(v); vl > 0 && (v[vl - 1] == ' ' || v[vl - 1] == '\t'); vl--)
		;
	h->name = strndup(arg, ne - arg);
	h->value = strndup(v, vl);
	return h->name != NULL && h->value != NULL;
}

static int
cmd_pub(const char *subject, header *hdrs, int nhdrs, bool msgid, bool hex)
{
	jsPubOptions po;
	char	   *line = NULL;
	size_t		cap = 0;
	ssize_t		n;
	uint64_t	sent = 0;
	natsStatus	s = NATS_OK;
	int			rc = 0;

	jsPubOptions_Init(&po);
	po.MaxWait = TIMEOUT_MS;
	while (rc == 0 && (n = getline(&line, &cap, stdin)) >= 0)
	{
		natsMsg    *m = NULL;
		char	   *id = NULL;

		if (n > 0 && line[n - 1] == '\n')
			line[--n] = '\0';
		if (hex)
		{
			ssize_t		i;

			if (n > 0 && line[n - 1] == '\r')
				n--;
			for (i = 0; i + 1 < n && hexval(line[i]) >= 0 && hexval(line[i + 1]) >= 0; i += 2)
				line[i / 2] = (char) (hexval(line[i]) * 16 + hexval(line[i + 1]));
			if (i != n)
			{
				fprintf(stderr, "natstool: stdin line %llu: invalid hex\n",
						(unsigned long long) sent + 1);
				rc = EXIT_ERR;
				break;
			}
			n /= 2;
		}
		s = natsMsg_Create(&m, subject, NULL, line, (int) n);
		for (int i = 0; s == NATS_OK && i < nhdrs; i++)
			s = natsMsgHeader_Add(m, hdrs[i].name, hdrs[i].value);
		if (s == NATS_OK && msgid && (id = event_id(line, n)) != NULL)
			s = natsMsgHeader_Set(m, "Nats-Msg-Id", id);
		free(id);
		if (s == NATS_OK)
			s = js_PublishMsgAsync(js, &m, &po);
		natsMsg_Destroy(m);		/* NULL once cnats owns it */
		if (s == NATS_OK)
			sent++;
		else
		{
			char		what[300];

			snprintf(what, sizeof(what), "publishing stdin line %llu to %s",
					 (unsigned long long) sent + 1, subject);
			rc = fail(what, s, 0);
		}
	}
	free(line);

	/* Wait for every outstanding ack, also after an error. */
	po.MaxWait = TIMEOUT_MS + 5000;
	s = js_PublishAsyncComplete(js, &po);
	if (s != NATS_OK)
		rc = fail("waiting for publish acks", s, 0);
	if (n_dups > 0)
		fprintf(stderr, "natstool: %llu duplicate(s) (Nats-Msg-Id seen before)\n",
				(unsigned long long) n_dups);
	if (rc == 0 && (n_failed > 0 || n_acked != sent))
	{
		fprintf(stderr, "natstool: sent %llu, acked %llu, failed %llu\n",
				(unsigned long long) sent, (unsigned long long) n_acked,
				(unsigned long long) n_failed);
		rc = EXIT_ERR;
	}
	if (rc == 0)
		printf("published %llu\n", (unsigned long long) n_acked);
	return rc;
}

/*
 * Print the subject of every message on SUBJECT (wildcards allowed) for
 * SECONDS; with data, a tab and its payload after it (one line: a payload
 * holding a newline is printed as is).
 */
static int
cmd_listen(const char *subject, const char *seconds, bool data)
{
	natsSubscription *sub = NULL;
	natsStatus	s;
	char	   *end;
	long		secs = strtol(seconds, &end, 10);
	int64_t		deadline;

	if (*end != '\0' || secs <= 0)
		return usage("listen: SECONDS must be a positive number");
	s = natsConnection_SubscribeSync(&sub, nc, subject);
	if (s == NATS_OK)
		s = natsSubscription_SetPendingLimits(sub, -1, -1);
	if (s == NATS_OK)
		s = natsConnection_Flush(nc);
	if (s != NATS_OK)
	{
		natsSubscription_Destroy(sub);
		return fail("subscribing", s, 0);
	}
	deadline = nats_Now() + secs * 1000;
	for (;;)
	{
		natsMsg    *msg = NULL;
		int64_t		left = deadline - nats_Now();

		if (left <= 0)
			break;
		s = natsSubscription_NextMsg(&msg, sub, left);
		if (s == NATS_TIMEOUT)
			break;
		if (s != NATS_OK)
		{
			natsSubscription_Destroy(sub);
			return fail("receiving", s, 0);
		}
		if (data)
			printf("%s\t%.*s\n", natsMsg_GetSubject(msg), natsMsg_GetDataLength(msg),
				   natsMsg_GetData(msg) ? natsMsg_GetData(msg) : "");
		else
			printf("%s\n", natsMsg_GetSubject(msg));
		fflush(stdout);			/* a listener may be killed when enough was seen */
		natsMsg_Destroy(msg);
	}
	natsSubscription_Destroy(sub);
	return 0;
}

int
main(int argc, char **argv)
{
	natsOptions *opts = NULL;
	jsOptions	jo;
	const char *url,
			   *cmd;
	header	   *hdrs = NULL;
	int			nhdrs = 0,
				nargs,
				rc;
	bool		msgid = false,
				hex = false;
	natsStatus	s;

	if (argc < 4 || strcmp(argv[1], "--url") != 0)
		return usage(NULL);
	url = argv[2];
	cmd = argv[3];
	nargs = argc - 4;
	argv += 4;

	/* Check the command line before connecting. */
	if (strcmp(cmd, "pub") == 0)
	{
		hdrs = calloc(argc, sizeof(*hdrs));
		if (hdrs == NULL)
			return EXIT_ERR;
		for (int i = 1; i < nargs; i++)
		{
			if (strcmp(argv[i], "--header") == 0 && i + 1 < nargs &&
				parse_header(argv[i + 1], &hdrs[nhdrs]))
				nhdrs++, i++;
			else if (strcmp(argv[i], "--msg-id-from-event-id") == 0)
				msgid = true;
			else if (strcmp(argv[i], "--hex") == 0)
				hex = true;
			else
				return usage("pub: bad option (--header needs 'Name: value')");
		}
		if (nargs < 1 || argv[0][0] == '\0' || argv[0][0] == '-')
			return usage("pub needs a SUBJECT first");
	}
	else if ((strcmp(cmd, "dump") == 0 || strcmp(cmd, "stream-info") == 0 ||
			  strcmp(cmd, "consumers") == 0 || strcmp(cmd, "stream-delete") == 0 ||
			  strcmp(cmd, "kv-add-sealed") == 0) ? nargs != 1 :
			 strcmp(cmd, "ensure-stream") == 0 ? nargs < 2 :
			 (strcmp(cmd, "set-max-msg-size") == 0 || strcmp(cmd, "set-max-msgs") == 0 ||
			  strcmp(cmd, "consumer") == 0 ||
			  strcmp(cmd, "kv-get") == 0 || strcmp(cmd, "kv-del") == 0) ?
			 nargs != 2 :
			 strcmp(cmd, "listen") == 0 ?
			 !(nargs == 2 || (nargs == 3 && strcmp(argv[2], "data") == 0)) : true)
		return usage("unknown command or wrong number of arguments");

	s = natsOptions_Create(&opts);
	if (s == NATS_OK)
		s = natsOptions_SetURL(opts, url);
	if (s == NATS_OK)
		s = natsOptions_SetTimeout(opts, TIMEOUT_MS);
	if (s == NATS_OK)
		s = natsOptions_SetAllowReconnect(opts, false);
	if (s == NATS_OK)
		s = natsConnection_Connect(&nc, opts);
	jsOptions_Init(&jo);
	jo.Wait = TIMEOUT_MS;
	jo.PublishAsync.MaxPending = 2048;
	jo.PublishAsync.AckHandler = on_ack;
	jo.PublishAsync.StallWait = TIMEOUT_MS;
	if (s == NATS_OK)
		s = natsConnection_JetStream(&js, nc, &jo);
	if (s != NATS_OK)
		rc = fail("connecting", s, 0);
	else if (strcmp(cmd, "dump") == 0)
		rc = cmd_dump(argv[0]);
	else if (strcmp(cmd, "pub") == 0)
		rc = cmd_pub(argv[0], hdrs, nhdrs, msgid, hex);
	else if (strcmp(cmd, "ensure-stream") == 0)
		rc = cmd_ensure_stream(argv[0], (const char **) argv + 1, nargs - 1);
	else if (strcmp(cmd, "stream-info") == 0)
		rc = cmd_stream_info(argv[0]);
	else if (strcmp(cmd, "consumers") == 0)
		rc = cmd_consumers(argv[0]);
	else if (strcmp(cmd, "listen") == 0)
		rc = cmd_listen(argv[0], argv[1], nargs == 3);
	else if (strcmp(cmd, "consumer") == 0)
		rc = cmd_consumer(argv[0], argv[1]);
	else if (strcmp(cmd, "kv-get") == 0)
		rc = cmd_kv_get(argv[0], argv[1]);
	else if (strcmp(cmd, "kv-del") == 0)
		rc = cmd_kv_del(argv[0], argv[1]);
	else if (strcmp(cmd, "stream-delete") == 0)
		rc = cmd_stream_delete(argv[0]);
	else if (strcmp(cmd, "kv-add-sealed") == 0)
		rc = cmd_kv_add_sealed(argv[0]);
	else
		rc = cmd_set_limit(argv[0], strcmp(cmd, "set-max-msgs") == 0, argv[1]);

	if (fflush(stdout) != 0 && rc == 0)
		rc = EXIT_ERR;
	for (int i = 0; i < nhdrs; i++)
		free(hdrs[i].name), free(hdrs[i].value);
	free(hdrs);
	jsCtx_Destroy(js);
	natsConnection_Destroy(nc);
	natsOptions_Destroy(opts);
	nats_CloseAndWait(2000);
	return rc;
}

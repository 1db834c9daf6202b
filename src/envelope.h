/*
 * envelope.h — events and their wire format: the outbound envelope and
 * headers (envelope.c), the inbound decoder (decode.c) and its text checks
 * (inbound_text.c).  docs/wire-format.md describes the format.
 */
#ifndef EB_ENVELOPE_H
#define EB_ENVELOPE_H

#include "datatype/timestamp.h"
#include "lib/stringinfo.h"
#include "utils/jsonb.h"

#define EB_MAX_AGGREGATE_ID 256
#define EB_MAX_TOPIC		249

/*
 * Limits of an inbound message (decode.c), far above what a real producer
 * sends: JSON nesting (PostgreSQL's JSON parser recurses per level), and
 * header count and sizes (the headers travel to the pool in the work item
 * and into the envelope's headers jsonb).
 */
#define EB_MAX_JSON_DEPTH	256
#define EB_MAX_HEADERS		1000
#define EB_MAX_HEADER_NAME	256
#define EB_MAX_HEADER_VALUE 32768
#define EB_MAX_HEADER_BYTES (1024 * 1024)

/*
 * User headers eventbus_publish accepts (eventbus adds up to 8 of its own).
 * Kept well inside what the consuming side takes, so a published event is
 * never quarantined for its headers.
 */
#define EB_MAX_USER_HEADERS		64
#define EB_MAX_USER_HEADER_VALUE	1024
#define EB_MAX_USER_HEADER_BYTES	16384

typedef struct EbEvent
{
	int64		outbox_id;
	char	   *event_id;		/* canonical UUID text */
	char	   *topic;
	char	   *aggregate_id;
	char	   *event_type;
	int64		event_version;
	TimestampTz occurred_at;
	char	   *trace_id;		/* NULL when not set */
	char	   *correlation_id;
	bool		has_tenant;
	int32		tenant_id;
	char	   *payload;		/* JSON text; NULL on the consume side */
	struct varlena *payload_jsonb;	/* consume side: the payload as decoded, a
									 * jsonb (so that neither the dispatcher
									 * writes it out nor the pool parses it
									 * again) */
	int			nheaders;		/* user headers (eventbus_publish headers) */
	char	  **header_names;
	char	  **header_values;
} EbEvent;

/* envelope.c */
extern Jsonb *eb_headers_jsonb(int n, char **names, char **values);
extern int	eb_event_headers_from_jsonb(Jsonb *headers, EbEvent *ev);
extern void eb_validate_topic(const char *topic);
extern void eb_validate_aggregate_id(const char *aggregate_id);
extern void eb_uuidv7(unsigned char out[16]);
extern void eb_format_timestamp(TimestampTz ts, char *buf, size_t len);
extern void eb_envelope_encode(StringInfo buf, const EbEvent *ev);
extern void eb_event_to_utf8(EbEvent *ev);
extern const char *eb_aggregate_id_problem(const char *id, size_t len);

/* Callback that receives each header of an event (name, value). */
typedef void (*EbHeaderFn) (void *arg, const char *name, const char *value);
extern void eb_event_headers(const EbEvent *ev, EbHeaderFn fn, void *arg);

/* decode.c: inbound messages; never throws (NULL or the quarantine reason) */
extern const char *eb_envelope_decode(const char *data, size_t len,
									  const char *key, size_t keylen,
									  int nheaders, char **header_names,
									  char **header_values, EbEvent *ev);
extern Jsonb *eb_inbound_headers_jsonb(int n, char **names, char **values);

/* inbound_text.c: checks of inbound text before PostgreSQL's parsers see it */
typedef struct EbJsonScan
{
	int64		tokens;			/* containers, strings, numbers, literals */
	int64		number_growth;	/* bytes numbers gain when numeric writes them */
	const char *number_problem; /* the first number numeric cannot hold */
} EbJsonScan;

extern char *eb_printable(const char *s, size_t len, size_t max);
extern bool eb_needs_conversion(void);
extern struct FmgrInfo *eb_utf8_to_server_conversion(void);
extern bool eb_utf8_to_server(const char *s, size_t len, char **out, size_t *outlen);
extern char *eb_unescape_non_ascii(const char *s, size_t len, size_t *outlen);
extern const char *eb_json_prescan(const char *s, size_t len, EbJsonScan *scan);
extern const char *eb_json_number_problem(const char *tok, size_t n, int64 *growth);
extern bool eb_parse_rfc3339(const char *s, int len, TimestampTz *out);

#endif							/* EB_ENVELOPE_H */

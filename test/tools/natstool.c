/*
 * natstool — an independent JetStream client for the eventbus integration tests.
 *
 * It reads back what eventbus published and publishes inbound test messages
 * (including deliberately malformed ones). It shares no code with eventbus.
 *
 * Usage:
 *   natstool --url nats://127.0.0.1:PORT [--timeout MS] COMMAND ...
 *
 *   dump SUBJECT
 *       Print every message of the stream capturing SUBJECT whose subject matches
 *       SUBJECT (equality, or NATS wildcard match if SUBJECT contains * or >), in
 *       stream order, one JSON object per line:
 *         {"stream":"S","seq":N,"subject":"...","headers":{"Name":"value",...},"data":"..."}
 *       "data" is the body as a JSON string when it is valid UTF-8, otherwise the
 *       object has "data_hex" (lower-case hex) instead. Header names are sorted; a
 *       header with several values is printed as an array of strings. Messages are
 *       read with the stream "get message by sequence" API, so no consumer is
 *       created.
 *   pub SUBJECT [--header 'Name: value']... [--msg-id-from-event-id] [--hex]
 *               [--subject-prefix-tab]
 *       Publish one message per stdin line (without its trailing newline; an empty
 *       line is an empty body). --hex: each line is the hex encoding of the body.
 *       --subject-prefix-tab: each line is SUBJECT<TAB>BODY (BODY hex with --hex);
 *       the SUBJECT argument is then optional and ignored. --msg-id-from-event-id:
 *       set header Nats-Msg-Id to the first "event_id":"..." string value found in
 *       the body (skipped when absent or empty). Every message must be acked by
 *       JetStream; prints "published N" (N = acked messages, duplicates included;
 *       the number of duplicates is reported on stderr when non-zero).
 *   ensure-stream NAME SUBJECT...
 *       Create a file-storage stream NAME capturing SUBJECTs, or keep it if it
 *       already exists with the same subject set and file storage. Prints
 *       "created NAME" or "exists NAME".
 *   set-max-msg-size NAME BYTES
 *   set-max-msgs NAME COUNT
 *       Change stream NAME's max_msg_size / max_msgs (-1 = unlimited). Prints
 *       "updated NAME max_msg_size BYTES" / "updated NAME max_msgs COUNT".
 *   stream-info SUBJECT
 *       One JSON line about the stream capturing SUBJECT (config and state).
 *   consumers STREAM
 *       Durable consumer names of STREAM, sorted, one per line.
 *   listen SUBJECT SECONDS
 *       Subscribe to SUBJECT (wildcards allowed) for SECONDS and print the
 *       subject of every message published on it meanwhile, one per line: e.g.
 *       '$JS.API.CONSUMER.MSG.NEXT.>' shows the pull requests clients send.
 *
 * Exit status: 0 success; 1 error (connection, JetStream API, publish not acked,
 * malformed input, ...); 2 no such stream (no stream captures SUBJECT, or STREAM
 * does not exist); 64 usage error. Errors are reported on stderr.
 */
#define _GNU_SOURCE
#include <nats/nats.h>

#include <ctype.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define EXIT_ERR      1
#define EXIT_NOSTREAM 2
#define EXIT_USAGE    64

static const char *progname = "natstool";
static int64_t     timeout_ms = 5000;

static natsConnection *g_nc;
static jsCtx          *g_js;
static natsOptions    *g_opts;

/* ------------------------------------------------------------------------ */
/* small helpers                                                            */
/* ------------------------------------------------------------------------ */

static void
errmsg(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", progname);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

static void
usage(void)
{
    fprintf(stderr,
            "usage: %s --url nats://HOST:PORT [--timeout MS] COMMAND ...\n"
            "  dump SUBJECT\n"
            "  pub [SUBJECT] [--header 'Name: value']... [--msg-id-from-event-id] [--hex]"
            " [--subject-prefix-tab]\n"
            "  ensure-stream NAME SUBJECT...\n"
            "  set-max-msg-size NAME BYTES\n"
            "  set-max-msgs NAME COUNT\n"
            "  stream-info SUBJECT\n"
            "  consumers STREAM\n"
            "  listen SUBJECT SECONDS\n",
            progname);
}

static void *
xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);

    if (p == NULL)
    {
        errmsg("out of memory");
        exit(EXIT_ERR);
    }
    return p;
}

static void *
xrealloc(void *old, size_t n)
{
    void *p = realloc(old, n ? n : 1);

    if (p == NULL)
    {
        errmsg("out of memory");
        exit(EXIT_ERR);
    }
    return p;
}

static char *
xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);

    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static double
now_sec(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double) ts.tv_sec + (double) ts.tv_nsec / 1e9;
}

/* Describe a failed cnats call: status text, JetStream error code, last error. */
static void
nats_fail(const char *what, natsStatus s, jsErrCode jerr)
{
    const char *detail = nats_GetLastError(NULL);

    if (jerr != 0)
        errmsg("%s failed: %s (JetStream error %d)%s%s", what, natsStatus_GetText(s), (int) jerr,
               detail && *detail ? ": " : "", detail && *detail ? detail : "");
    else
        errmsg("%s failed: %s%s%s", what, natsStatus_GetText(s),
               detail && *detail ? ": " : "", detail && *detail ? detail : "");
}

/* Growable byte buffer. */
typedef struct
{
    char   *p;
    size_t  len;
    size_t  cap;
} buf_t;

static void
buf_reserve(buf_t *b, size_t extra)
{
    if (b->len + extra + 1 > b->cap)
    {
        size_t ncap = b->cap ? b->cap : 256;

        while (ncap < b->len + extra + 1)
            ncap *= 2;
        b->p = xrealloc(b->p, ncap);
        b->cap = ncap;
    }
}

static void
buf_put(buf_t *b, const void *data, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void
buf_putc(buf_t *b, char c)
{
    buf_reserve(b, 1);
    b->p[b->len++] = c;
    b->p[b->len] = '\0';
}

static void
buf_puts(buf_t *b, const char *s)
{
    buf_put(b, s, strlen(s));
}

static void __attribute__((format(printf, 2, 3)))
buf_printf(buf_t *b, const char *fmt, ...)
{
    va_list ap;
    size_t  room;
    int     n;

    buf_reserve(b, 64);
    room = b->cap - b->len;
    va_start(ap, fmt);
    n = vsnprintf(b->p + b->len, room, fmt, ap);
    va_end(ap);
    if (n < 0)
    {
        b->p[b->len] = '\0';
        return;
    }
    if ((size_t) n >= room)
    {
        buf_reserve(b, (size_t) n);
        va_start(ap, fmt);
        vsnprintf(b->p + b->len, (size_t) n + 1, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t) n;
}

/* ------------------------------------------------------------------------ */
/* UTF-8, JSON and hex                                                      */
/* ------------------------------------------------------------------------ */

/* Length of the well-formed UTF-8 sequence at s (n bytes available), 0 if ill-formed. */
static size_t
utf8_seq_len(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    unsigned char lo = 0x80, hi = 0xBF;
    size_t        len, i;

    if (c < 0x80)
        return 1;
    if (c >= 0xC2 && c <= 0xDF)
        len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
    {
        len = 3;
        if (c == 0xE0)
            lo = 0xA0;          /* no overlongs */
        else if (c == 0xED)
            hi = 0x9F;          /* no surrogates */
    }
    else if (c >= 0xF0 && c <= 0xF4)
    {
        len = 4;
        if (c == 0xF0)
            lo = 0x90;          /* no overlongs */
        else if (c == 0xF4)
            hi = 0x8F;          /* <= U+10FFFF */
    }
    else
        return 0;
    if (n < len)
        return 0;
    if (s[1] < lo || s[1] > hi)
        return 0;
    for (i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF)
            return 0;
    return len;
}

static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n)
    {
        size_t l;

        if (s[i] < 0x80)
        {
            i++;
            continue;
        }
        l = utf8_seq_len(s + i, n - i);
        if (l == 0)
            return false;
        i += l;
    }
    return true;
}

/*
 * Append s as a JSON string literal. Quotes and backslashes are escaped, control
 * characters (and DEL) become \u00XX. Ill-formed UTF-8 bytes are replaced by
 * U+FFFD (callers that need lossless output check utf8_valid first).
 */
static void
json_str(buf_t *b, const void *data, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    const unsigned char *s = data;
    size_t i = 0;

    buf_reserve(b, n + 2);
    buf_putc(b, '"');
    while (i < n)
    {
        unsigned char c = s[i];

        if (c == '"' || c == '\\')
        {
            char e[2] = {'\\', (char) c};

            buf_put(b, e, 2);
            i++;
        }
        else if (c < 0x20 || c == 0x7F)
        {
            char e[6] = {'\\', 'u', '0', '0', hexd[c >> 4], hexd[c & 15]};

            buf_put(b, e, 6);
            i++;
        }
        else if (c < 0x80)
        {
            /* copy a run of plain ASCII at once */
            size_t j = i + 1;

            while (j < n && s[j] >= 0x20 && s[j] < 0x7F && s[j] != '"' && s[j] != '\\')
                j++;
            buf_put(b, s + i, j - i);
            i = j;
        }
        else
        {
            size_t l = utf8_seq_len(s + i, n - i);

            if (l == 0)
            {
                buf_puts(b, "\\ufffd");
                i++;
            }
            else
            {
                buf_put(b, s + i, l);
                i += l;
            }
        }
    }
    buf_putc(b, '"');
}

static void
json_cstr(buf_t *b, const char *s)
{
    if (s == NULL)
        buf_puts(b, "null");
    else
        json_str(b, s, strlen(s));
}

static void
hex_encode(buf_t *b, const void *data, size_t n)
{
    static const char hexd[] = "0123456789abcdef";
    const unsigned char *s = data;
    size_t i;

    buf_reserve(b, 2 * n);
    for (i = 0; i < n; i++)
    {
        b->p[b->len++] = hexd[s[i] >> 4];
        b->p[b->len++] = hexd[s[i] & 15];
    }
    b->p[b->len] = '\0';
}

static int
hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Decode n hex digits from s into out (capacity >= n/2). Returns decoded length or -1. */
static long
hex_decode(const char *s, size_t n, unsigned char *out)
{
    size_t i;

    if (n % 2 != 0)
        return -1;
    for (i = 0; i < n; i += 2)
    {
        int h = hexval((unsigned char) s[i]);
        int l = hexval((unsigned char) s[i + 1]);

        if (h < 0 || l < 0)
            return -1;
        out[i / 2] = (unsigned char) (h << 4 | l);
    }
    return (long) (n / 2);
}

/* ------------------------------------------------------------------------ */
/* subject matching                                                          */
/* ------------------------------------------------------------------------ */

/* Does literal subject subj match pattern pat (NATS wildcards * and >)? */
static bool
subject_matches(const char *pat, const char *subj)
{
    const char *p = pat, *s = subj;

    for (;;)
    {
        const char *pe = strchr(p, '.');
        const char *se = strchr(s, '.');
        size_t      pl = pe ? (size_t) (pe - p) : strlen(p);
        size_t      sl = se ? (size_t) (se - s) : strlen(s);

        if (pl == 1 && p[0] == '>' && pe == NULL)
            return sl > 0 || se != NULL;        /* one or more remaining tokens */
        if (!(pl == 1 && p[0] == '*') && (pl != sl || memcmp(p, s, pl) != 0))
            return false;
        if (pe == NULL || se == NULL)
            return pe == NULL && se == NULL;
        p = pe + 1;
        s = se + 1;
    }
}

/* ------------------------------------------------------------------------ */
/* connection                                                               */
/* ------------------------------------------------------------------------ */

static int
nats_setup(const char *url, const jsOptions *async_opts)
{
    natsStatus s;
    jsOptions  jo;

    s = natsOptions_Create(&g_opts);
    if (s == NATS_OK)
        s = natsOptions_SetURL(g_opts, url);
    if (s == NATS_OK)
        s = natsOptions_SetTimeout(g_opts, timeout_ms);
    if (s == NATS_OK)
        s = natsOptions_SetAllowReconnect(g_opts, false);
    if (s != NATS_OK)
    {
        nats_fail("setting connection options", s, 0);
        return EXIT_ERR;
    }
    s = natsConnection_Connect(&g_nc, g_opts);
    if (s != NATS_OK)
    {
        char what[512];

        snprintf(what, sizeof what, "connecting to %s", url);
        nats_fail(what, s, 0);
        return EXIT_ERR;
    }
    jsOptions_Init(&jo);
    jo.Wait = timeout_ms;
    if (async_opts != NULL)
    {
        /* caller-provided async publish settings */
        jo.PublishAsync = async_opts->PublishAsync;
    }
    s = natsConnection_JetStream(&g_js, g_nc, &jo);
    if (s != NATS_OK)
    {
        nats_fail("creating JetStream context", s, 0);
        return EXIT_ERR;
    }
    return 0;
}

static void
nats_teardown(void)
{
    if (g_js != NULL)
        jsCtx_Destroy(g_js);
    if (g_nc != NULL)
    {
        natsConnection_Close(g_nc);
        natsConnection_Destroy(g_nc);
    }
    if (g_opts != NULL)
        natsOptions_Destroy(g_opts);
    g_js = NULL;
    g_nc = NULL;
    g_opts = NULL;
    nats_CloseAndWait(2000);
}

/* ------------------------------------------------------------------------ */
/* minimal JSON scanning of API replies                                      */
/* ------------------------------------------------------------------------ */

static const char *
skip_ws(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/*
 * Parse a JSON string literal starting at *pp (which must point at '"').
 * Handles the simple escapes; \uXXXX is decoded for the BMP only (enough for
 * stream names and error texts). Returns a malloc'd string or NULL.
 */
static char *
json_parse_string(const char **pp, const char *end)
{
    const char *p = *pp;
    buf_t       b = {0};

    if (p >= end || *p != '"')
        return NULL;
    p++;
    while (p < end && *p != '"')
    {
        if (*p == '\\' && p + 1 < end)
        {
            p++;
            switch (*p)
            {
                case 'n': buf_putc(&b, '\n'); break;
                case 't': buf_putc(&b, '\t'); break;
                case 'r': buf_putc(&b, '\r'); break;
                case 'b': buf_putc(&b, '\b'); break;
                case 'f': buf_putc(&b, '\f'); break;
                case 'u':
                    if (p + 4 < end)
                    {
                        unsigned cp = 0;
                        int      k;

                        for (k = 1; k <= 4; k++)
                        {
                            int v = hexval((unsigned char) p[k]);

                            cp = cp * 16 + (unsigned) (v < 0 ? 0 : v);
                        }
                        p += 4;
                        if (cp < 0x80)
                            buf_putc(&b, (char) cp);
                        else if (cp < 0x800)
                        {
                            buf_putc(&b, (char) (0xC0 | (cp >> 6)));
                            buf_putc(&b, (char) (0x80 | (cp & 0x3F)));
                        }
                        else
                        {
                            buf_putc(&b, (char) (0xE0 | (cp >> 12)));
                            buf_putc(&b, (char) (0x80 | ((cp >> 6) & 0x3F)));
                            buf_putc(&b, (char) (0x80 | (cp & 0x3F)));
                        }
                    }
                    break;
                default: buf_putc(&b, *p); break;
            }
            p++;
        }
        else
            buf_putc(&b, *p++);
    }
    if (p >= end)
    {
        free(b.p);
        return NULL;
    }
    *pp = p + 1;
    if (b.p == NULL)
        return xstrndup("", 0);
    return b.p;
}

/* Find "key" followed by ':' in [p, end); return pointer to the value or NULL. */
static const char *
json_find_key(const char *p, const char *end, const char *key)
{
    size_t klen = strlen(key);

    while (p < end)
    {
        const char *q = memmem(p, (size_t) (end - p), key, klen);

        if (q == NULL)
            return NULL;
        if (q > p && q[-1] == '"' && q + klen < end && q[klen] == '"')
        {
            const char *v = skip_ws(q + klen + 1, end);

            if (v < end && *v == ':')
                return skip_ws(v + 1, end);
        }
        p = q + 1;
    }
    return NULL;
}

/*
 * Look up the stream capturing subject. Returns 0 and sets *name (malloc'd),
 * EXIT_NOSTREAM if none, EXIT_ERR on error.
 */
static int
find_stream(const char *subject, char **name)
{
    natsMsg    *reply = NULL;
    natsStatus  s;
    buf_t       req = {0};
    const char *body, *end, *p;
    int         rc = EXIT_ERR;
    int         nfound = 0;

    *name = NULL;
    buf_puts(&req, "{\"subject\":");
    json_cstr(&req, subject);
    buf_putc(&req, '}');
    s = natsConnection_Request(&reply, g_nc, "$JS.API.STREAM.NAMES", req.p, (int) req.len,
                               timeout_ms);
    free(req.p);
    if (s == NATS_NO_RESPONDERS)
    {
        errmsg("JetStream is not enabled on the server (no responders for $JS.API.STREAM.NAMES)");
        return EXIT_ERR;
    }
    if (s != NATS_OK)
    {
        nats_fail("$JS.API.STREAM.NAMES request", s, 0);
        return EXIT_ERR;
    }
    body = natsMsg_GetData(reply);
    end = body + natsMsg_GetDataLength(reply);

    if ((p = json_find_key(body, end, "error")) != NULL)
    {
        const char *d = json_find_key(p, end, "description");
        char       *desc = d ? json_parse_string(&d, end) : NULL;

        errmsg("$JS.API.STREAM.NAMES failed: %s", desc ? desc : "(no description)");
        free(desc);
        goto out;
    }
    p = json_find_key(body, end, "streams");
    if (p == NULL)
    {
        errmsg("unexpected $JS.API.STREAM.NAMES reply: %.*s", (int) (end - body), body);
        goto out;
    }
    if (p < end && *p == '[')
    {
        p = skip_ws(p + 1, end);
        while (p < end && *p == '"')
        {
            char *n = json_parse_string(&p, end);

            if (n == NULL)
                break;
            if (nfound == 0)
                *name = n;
            else
            {
                errmsg("warning: several streams capture %s; using %s (also %s)",
                       subject, *name, n);
                free(n);
            }
            nfound++;
            p = skip_ws(p, end);
            if (p < end && *p == ',')
                p = skip_ws(p + 1, end);
        }
    }
    if (nfound == 0)
    {
        errmsg("no stream captures subject %s", subject);
        rc = EXIT_NOSTREAM;
    }
    else
        rc = 0;
out:
    natsMsg_Destroy(reply);
    return rc;
}

static int
get_stream_info(const char *stream, jsOptions *jo, jsStreamInfo **si)
{
    jsErrCode  jerr = 0;
    natsStatus s = js_GetStreamInfo(si, g_js, stream, jo, &jerr);

    if (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr)
    {
        errmsg("stream %s not found", stream);
        return EXIT_NOSTREAM;
    }
    if (s != NATS_OK)
    {
        char what[512];

        snprintf(what, sizeof what, "getting info of stream %s", stream);
        nats_fail(what, s, jerr);
        return EXIT_ERR;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* dump                                                                      */
/* ------------------------------------------------------------------------ */

static int
cmp_cstr(const void *a, const void *b)
{
    return strcmp(*(const char *const *) a, *(const char *const *) b);
}

static void
append_headers(buf_t *b, natsMsg *m)
{
    const char **keys = NULL;
    int          nkeys = 0, i;

    buf_puts(b, "\"headers\":{");
    if (natsMsgHeader_Keys(m, &keys, &nkeys) == NATS_OK && keys != NULL)
    {
        qsort(keys, (size_t) nkeys, sizeof(*keys), cmp_cstr);
        for (i = 0; i < nkeys; i++)
        {
            const char **vals = NULL;
            int          nvals = 0, j;

            if (i > 0)
                buf_putc(b, ',');
            json_cstr(b, keys[i]);
            buf_putc(b, ':');
            if (natsMsgHeader_Values(m, keys[i], &vals, &nvals) != NATS_OK || vals == NULL)
                buf_puts(b, "\"\"");
            else if (nvals == 1)
                json_cstr(b, vals[0]);
            else
            {
                buf_putc(b, '[');
                for (j = 0; j < nvals; j++)
                {
                    if (j > 0)
                        buf_putc(b, ',');
                    json_cstr(b, vals[j]);
                }
                buf_putc(b, ']');
            }
            free((void *) vals);
        }
    }
    free((void *) keys);
    buf_putc(b, '}');
}

/* Raw header block ("NATS/1.0\r\nName: value\r\n...\r\n\r\n") as a JSON object. */
typedef struct
{
    const char *k;
    size_t      kl;
    const char *v;
    size_t      vl;
    size_t      idx;
} rawhdr_t;

static int
cmp_rawhdr(const void *a, const void *b)
{
    const rawhdr_t *x = a, *y = b;
    size_t          l = x->kl < y->kl ? x->kl : y->kl;
    int             c = memcmp(x->k, y->k, l);

    if (c != 0)
        return c;
    if (x->kl != y->kl)
        return x->kl < y->kl ? -1 : 1;
    return x->idx < y->idx ? -1 : (x->idx > y->idx);
}

static void
append_raw_headers(buf_t *b, const char *h, size_t n)
{
    const char *p = h, *end = h + n;
    rawhdr_t   *hs = NULL;
    size_t      nh = 0, cap = 0, i;

    /* skip the status line */
    p = memchr(p, '\n', n);
    p = p ? p + 1 : end;
    while (p < end)
    {
        const char *eol = memchr(p, '\n', (size_t) (end - p));
        const char *le = eol ? eol : end;
        const char *colon;

        if (le > p && le[-1] == '\r')
            le--;
        if (le == p)
            break;              /* blank line: end of headers */
        colon = memchr(p, ':', (size_t) (le - p));
        if (colon != NULL && colon > p)
        {
            const char *vs = colon + 1, *ve = le;

            while (vs < ve && (*vs == ' ' || *vs == '\t'))
                vs++;
            while (ve > vs && (ve[-1] == ' ' || ve[-1] == '\t'))
                ve--;
            if (nh == cap)
            {
                cap = cap ? cap * 2 : 8;
                hs = xrealloc(hs, cap * sizeof(*hs));
            }
            hs[nh].k = p;
            hs[nh].kl = (size_t) (colon - p);
            hs[nh].v = vs;
            hs[nh].vl = (size_t) (ve - vs);
            hs[nh].idx = nh;
            nh++;
        }
        p = eol ? eol + 1 : end;
    }
    if (nh > 1)
        qsort(hs, nh, sizeof(*hs), cmp_rawhdr);
    buf_puts(b, "\"headers\":{");
    for (i = 0; i < nh;)
    {
        size_t j = i + 1;

        while (j < nh && hs[j].kl == hs[i].kl && memcmp(hs[j].k, hs[i].k, hs[i].kl) == 0)
            j++;
        if (i > 0)
            buf_putc(b, ',');
        json_str(b, hs[i].k, hs[i].kl);
        buf_putc(b, ':');
        if (j - i == 1)
            json_str(b, hs[i].v, hs[i].vl);
        else
        {
            size_t k;

            buf_putc(b, '[');
            for (k = i; k < j; k++)
            {
                if (k > i)
                    buf_putc(b, ',');
                json_str(b, hs[k].v, hs[k].vl);
            }
            buf_putc(b, ']');
        }
        i = j;
    }
    buf_putc(b, '}');
    free(hs);
}

/* Standard base64 (with or without padding). Returns decoded length or -1. */
static long
b64_decode(const char *s, size_t n, unsigned char *out)
{
    uint32_t acc = 0;
    int      bits = 0;
    size_t   i, o = 0;

    for (i = 0; i < n; i++)
    {
        unsigned char c = (unsigned char) s[i];
        int           v;

        if (c >= 'A' && c <= 'Z')
            v = c - 'A';
        else if (c >= 'a' && c <= 'z')
            v = c - 'a' + 26;
        else if (c >= '0' && c <= '9')
            v = c - '0' + 52;
        else if (c == '+')
            v = 62;
        else if (c == '/')
            v = 63;
        else if (c == '=')
            break;
        else
            return -1;
        acc = (acc << 6) | (uint32_t) v;
        bits += 6;
        if (bits >= 8)
        {
            bits -= 8;
            out[o++] = (unsigned char) (acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    return (long) o;
}

/*
 * Locate the base64 string value of key in [p, end). Returns false if the key
 * is absent (empty value), otherwise points *s at the raw base64 text of length *n.
 */
static bool
json_find_b64(const char *p, const char *end, const char *key, const char **s, size_t *n)
{
    const char *v = json_find_key(p, end, key);
    const char *q;

    *s = NULL;
    *n = 0;
    if (v == NULL || v >= end || *v != '"')
        return false;
    q = memchr(v + 1, '"', (size_t) (end - v - 1));
    if (q == NULL)
        return false;
    *s = v + 1;
    *n = (size_t) (q - v - 1);
    return true;
}

/* One dump output line. hdr_json is the already rendered "headers":{...}. */
static void
emit_line(buf_t *line, const char *stream, uint64_t seq, const char *subj,
          const char *hdr_json, size_t hdr_len, const void *data, size_t dlen)
{
    line->len = 0;
    buf_puts(line, "{\"stream\":");
    json_cstr(line, stream);
    buf_printf(line, ",\"seq\":%llu,\"subject\":", (unsigned long long) seq);
    json_cstr(line, subj);
    buf_putc(line, ',');
    buf_put(line, hdr_json, hdr_len);
    if (dlen == 0 || utf8_valid(data, dlen))
    {
        buf_puts(line, ",\"data\":");
        json_str(line, dlen ? data : "", dlen);
    }
    else
    {
        buf_puts(line, ",\"data_hex\":\"");
        hex_encode(line, data, dlen);
        buf_putc(line, '"');
    }
    buf_puts(line, "}\n");
    fwrite(line->p, 1, line->len, stdout);
}

/*
 * Read-back method 1 (cross-check only, NATSTOOL_DUMP_METHOD=getmsg): one
 * js_GetMsg round trip per sequence, headers via the cnats header API.
 * About 350 us per message on loopback, so ~7 s for 20,000 messages.
 */
static int
dump_getmsg(const char *stream, const char *subject, uint64_t first, uint64_t last,
            bool know_expected, uint64_t expected)
{
    jsOptions jo;
    uint64_t  seq, printed = 0;
    buf_t     line = {0}, hdr = {0};
    int       rc = 0;

    jsOptions_Init(&jo);
    jo.Wait = timeout_ms;
    for (seq = first; seq <= last && seq != 0; seq++)
    {
        natsMsg    *m = NULL;
        jsErrCode   jerr = 0;
        natsStatus  s;
        const char *subj;

        if (know_expected && printed >= expected)
            break;
        s = js_GetMsg(&m, g_js, stream, seq, &jo, &jerr);
        if (s == NATS_NOT_FOUND || jerr == JSNoMessageFoundErr)
        {
            natsMsg_Destroy(m);     /* deleted (or purged meanwhile) */
            continue;
        }
        if (s != NATS_OK)
        {
            char what[512];

            snprintf(what, sizeof what, "getting message %llu of stream %s",
                     (unsigned long long) seq, stream);
            nats_fail(what, s, jerr);
            rc = EXIT_ERR;
            break;
        }
        subj = natsMsg_GetSubject(m);
        if (subj != NULL && subject_matches(subject, subj))
        {
            hdr.len = 0;
            append_headers(&hdr, m);
            emit_line(&line, stream, natsMsg_GetSequence(m), subj, hdr.p, hdr.len,
                      natsMsg_GetData(m), (size_t) natsMsg_GetDataLength(m));
            printed++;
        }
        natsMsg_Destroy(m);
    }
    free(line.p);
    free(hdr.p);
    return rc;
}

#define DUMP_WINDOW       256
#define DUMP_WINDOW_BYTES (32u << 20)

/*
 * Read-back method 2 (default): the same $JS.API.STREAM.MSG.GET.<stream> request
 * js_GetMsg sends, but pipelined: up to DUMP_WINDOW requests in flight, each with
 * its own reply subject <inbox>.<seq>, replies reordered by sequence. The reply
 * JSON ({"message":{"subject","seq","hdrs","data"}}, base64 fields) is decoded
 * here. No consumer is created.
 */
static int
dump_pipelined(const char *stream, const char *subject, uint64_t first, uint64_t last,
               bool know_expected, uint64_t expected)
{
    natsInbox        *inbox = NULL;
    natsSubscription *sub = NULL;
    natsMsg          *slots[DUMP_WINDOW] = {0};
    natsStatus        s;
    char             *api = NULL, *wild = NULL;
    size_t            inbox_len;
    uint64_t          next_send = first, next_emit = first, printed = 0;
    uint64_t          window = DUMP_WINDOW / 4, maxreply = 1;
    buf_t             line = {0}, hdr = {0};
    unsigned char    *dec = NULL;
    size_t            deccap = 0;
    int               rc = EXIT_ERR, i;

    if (first == 0 || first > last || (know_expected && expected == 0))
        return 0;

    s = natsInbox_Create(&inbox);
    if (s == NATS_OK)
    {
        inbox_len = strlen((const char *) inbox);
        wild = xmalloc(inbox_len + 3);
        snprintf(wild, inbox_len + 3, "%s.*", (const char *) inbox);
        s = natsConnection_SubscribeSync(&sub, g_nc, wild);
    }
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(sub, -1, -1);
    if (s != NATS_OK)
    {
        nats_fail("subscribing to the reply inbox", s, 0);
        goto out;
    }
    api = xmalloc(strlen(stream) + 32);
    sprintf(api, "$JS.API.STREAM.MSG.GET.%s", stream);

    while (next_emit <= last)
    {
        natsMsg    *m;
        const char *body, *end, *p;
        const char *hs = NULL, *ds = NULL;
        size_t      hn = 0, dn = 0;
        char       *subj = NULL;
        long        hl = 0, dl = 0;
        uint64_t    seq;

        if (know_expected && printed >= expected)
            break;

        /* keep the window full */
        while (next_send <= last && next_send - next_emit < window)
        {
            char reply[256], req[64];
            int  rl;

            snprintf(reply, sizeof reply, "%s.%llu", (const char *) inbox,
                     (unsigned long long) next_send);
            rl = snprintf(req, sizeof req, "{\"seq\":%llu}", (unsigned long long) next_send);
            s = natsConnection_PublishRequest(g_nc, api, reply, req, rl);
            if (s != NATS_OK)
            {
                nats_fail("sending a message-get request", s, 0);
                goto out;
            }
            next_send++;
        }

        /* wait until the reply for next_emit is there */
        while (slots[next_emit % DUMP_WINDOW] == NULL)
        {
            const char *rs, *dot;
            uint64_t    rseq;

            m = NULL;
            s = natsSubscription_NextMsg(&m, sub, timeout_ms);
            if (s != NATS_OK)
            {
                char what[256];

                snprintf(what, sizeof what, "waiting for message %llu of stream %s",
                         (unsigned long long) next_emit, stream);
                nats_fail(what, s, 0);
                goto out;
            }
            if (natsMsg_IsNoResponders(m))
            {
                errmsg("no responders for %s (JetStream unavailable?)", api);
                natsMsg_Destroy(m);
                goto out;
            }
            rs = natsMsg_GetSubject(m);
            dot = rs ? strrchr(rs, '.') : NULL;
            rseq = dot ? strtoull(dot + 1, NULL, 10) : 0;
            if (rseq < next_emit || rseq >= next_send || slots[rseq % DUMP_WINDOW] != NULL)
            {
                natsMsg_Destroy(m);     /* stray reply */
                continue;
            }
            slots[rseq % DUMP_WINDOW] = m;
        }
        m = slots[next_emit % DUMP_WINDOW];
        slots[next_emit % DUMP_WINDOW] = NULL;
        seq = next_emit++;

        body = natsMsg_GetData(m);
        end = body + natsMsg_GetDataLength(m);
        /* size the window so that ~DUMP_WINDOW_BYTES of replies are in flight at most */
        if ((uint64_t) (end - body) > maxreply)
            maxreply = (uint64_t) (end - body);
        window = DUMP_WINDOW_BYTES / maxreply;
        if (window > DUMP_WINDOW)
            window = DUMP_WINDOW;
        if (window < 1)
            window = 1;
        if ((p = json_find_key(body, end, "error")) != NULL)
        {
            const char *c = json_find_key(p, end, "err_code");
            const char *d = json_find_key(p, end, "description");
            long        code = c ? strtol(c, NULL, 10) : 0;
            char       *desc;

            if (code == JSNoMessageFoundErr)
            {
                natsMsg_Destroy(m);     /* deleted sequence */
                continue;
            }
            desc = d ? json_parse_string(&d, end) : NULL;
            errmsg("getting message %llu of stream %s failed: %s (JetStream error %ld)",
                   (unsigned long long) seq, stream, desc ? desc : "?", code);
            free(desc);
            natsMsg_Destroy(m);
            goto out;
        }
        p = json_find_key(body, end, "message");
        if (p == NULL || *p != '{')
        {
            errmsg("unexpected reply for message %llu of stream %s: %.*s",
                   (unsigned long long) seq, stream, (int) (end - body), body);
            natsMsg_Destroy(m);
            goto out;
        }
        {
            const char *sv = json_find_key(p, end, "subject");
            const char *qv = json_find_key(p, end, "seq");

            if (sv != NULL)
                subj = json_parse_string(&sv, end);
            if (qv != NULL)
                seq = strtoull(qv, NULL, 10);
        }
        if (subj == NULL)
        {
            errmsg("reply for message %llu of stream %s has no subject",
                   (unsigned long long) seq, stream);
            natsMsg_Destroy(m);
            goto out;
        }
        if (subject_matches(subject, subj))
        {
            json_find_b64(p, end, "hdrs", &hs, &hn);
            json_find_b64(p, end, "data", &ds, &dn);
            if (deccap < (hn + dn) / 4 * 3 + 8)
            {
                deccap = (hn + dn) / 4 * 3 + 8;
                dec = xrealloc(dec, deccap);
            }
            hl = hn ? b64_decode(hs, hn, dec) : 0;
            dl = dn && hl >= 0 ? b64_decode(ds, dn, dec + hl) : 0;
            if (hl < 0 || dl < 0)
            {
                errmsg("bad base64 in reply for message %llu of stream %s",
                       (unsigned long long) seq, stream);
                free(subj);
                natsMsg_Destroy(m);
                goto out;
            }
            hdr.len = 0;
            append_raw_headers(&hdr, (const char *) dec, (size_t) hl);
            emit_line(&line, stream, seq, subj, hdr.p, hdr.len, dec + hl, (size_t) dl);
            printed++;
        }
        free(subj);
        natsMsg_Destroy(m);
    }
    rc = 0;
out:
    for (i = 0; i < DUMP_WINDOW; i++)
        natsMsg_Destroy(slots[i]);
    if (sub != NULL)
    {
        natsSubscription_Unsubscribe(sub);
        natsSubscription_Destroy(sub);
    }
    natsInbox_Destroy(inbox);
    free(api);
    free(wild);
    free(dec);
    free(line.p);
    free(hdr.p);
    return rc;
}

static int
cmd_dump(const char *subject)
{
    char         *stream = NULL;
    jsStreamInfo *si = NULL;
    jsOptions     jo;
    uint64_t      first, last, expected = 0;
    bool          know_expected = false;
    const char   *method = getenv("NATSTOOL_DUMP_METHOD");
    double        t0 = now_sec();
    int           rc;

    rc = find_stream(subject, &stream);
    if (rc != 0)
        return rc;

    /* Stream state, with the per-subject counts so the scan can stop early. */
    jsOptions_Init(&jo);
    jo.Wait = timeout_ms;
    jo.Stream.Info.SubjectsFilter = subject;
    rc = get_stream_info(stream, &jo, &si);
    if (rc != 0)
    {
        free(stream);
        return rc;
    }
    first = si->State.FirstSeq;
    last = si->State.LastSeq;
    if (si->State.Msgs == 0)
        know_expected = true;
    else if (si->State.Subjects != NULL)
    {
        int i;

        know_expected = true;
        for (i = 0; i < si->State.Subjects->Count; i++)
            if (subject_matches(subject, si->State.Subjects->List[i].Subject))
                expected += si->State.Subjects->List[i].Msgs;
    }
    jsStreamInfo_Destroy(si);

    if (method != NULL && strcmp(method, "getmsg") == 0)
        rc = dump_getmsg(stream, subject, first, last, know_expected, expected);
    else
        rc = dump_pipelined(stream, subject, first, last, know_expected, expected);
    if (getenv("NATSTOOL_VERBOSE"))
        errmsg("dump: stream %s seq %llu..%llu, %llu expected on %s, %.3f s", stream,
               (unsigned long long) first, (unsigned long long) last,
               (unsigned long long) expected, subject, now_sec() - t0);
    free(stream);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* pub                                                                       */
/* ------------------------------------------------------------------------ */

typedef struct
{
    pthread_mutex_t mu;
    uint64_t        acked;
    uint64_t        dups;
    uint64_t        failed;
    char           *first_err;
} pubstate_t;

static pubstate_t g_pub = {PTHREAD_MUTEX_INITIALIZER, 0, 0, 0, NULL};

static void
pub_ack_handler(jsCtx *js, natsMsg *msg, jsPubAck *pa, jsPubAckErr *pae, void *closure)
{
    (void) js;
    (void) closure;
    pthread_mutex_lock(&g_pub.mu);
    if (pae != NULL)
    {
        g_pub.failed++;
        if (g_pub.first_err == NULL)
        {
            char tmp[1024];

            const char *st = natsStatus_GetText(pae->Err);
            bool        extra = pae->ErrText != NULL && pae->ErrText[0] != '\0' &&
                                strcmp(pae->ErrText, st) != 0;
            char        code[64] = "";

            if (pae->ErrCode != 0)
                snprintf(code, sizeof code, " (JetStream error %d)", (int) pae->ErrCode);
            snprintf(tmp, sizeof tmp, "publish to %s not acked: %s%s%s%s",
                     msg && natsMsg_GetSubject(msg) ? natsMsg_GetSubject(msg) : "?",
                     st, extra ? ": " : "", extra ? pae->ErrText : "", code);
            g_pub.first_err = xstrndup(tmp, strlen(tmp));
        }
    }
    else if (pa != NULL)
    {
        g_pub.acked++;
        if (pa->Duplicate)
            g_pub.dups++;
    }
    pthread_mutex_unlock(&g_pub.mu);
    natsMsg_Destroy(msg);
}

/* First "event_id":"..." string value in body, or NULL (absent, empty, odd chars). */
static char *
extract_event_id(const char *body, size_t len)
{
    static const char key[] = "\"event_id\"";
    const char *p = body, *end = body + len;

    while (p < end)
    {
        const char *q = memmem(p, (size_t) (end - p), key, sizeof(key) - 1);
        const char *v;

        if (q == NULL)
            return NULL;
        v = skip_ws(q + sizeof(key) - 1, end);
        if (v < end && *v == ':')
        {
            v = skip_ws(v + 1, end);
            if (v < end && *v == '"')
            {
                buf_t b = {0};

                v++;
                while (v < end && *v != '"')
                {
                    if (*v == '\\' && v + 1 < end &&
                        (v[1] == '"' || v[1] == '\\' || v[1] == '/'))
                    {
                        buf_putc(&b, v[1]);
                        v += 2;
                    }
                    else if ((unsigned char) *v < 0x20 || *v == '\0')
                        break;
                    else
                        buf_putc(&b, *v++);
                }
                if (v < end && *v == '"' && b.len > 0)
                    return b.p;
                free(b.p);
                return NULL;
            }
        }
        p = q + 1;
    }
    return NULL;
}

typedef struct
{
    char *name;
    char *value;
} header_t;

static int
cmd_pub(const char *subject, header_t *hdrs, int nhdrs, bool msgid_from_event, bool hex,
        bool subject_tab)
{
    jsPubOptions   po;
    char          *line = NULL;
    size_t         linecap = 0;
    ssize_t        n;
    unsigned char *bin = NULL;
    size_t         bincap = 0;
    uint64_t       lineno = 0, sent = 0;
    natsStatus     s;
    int            rc = 0, i;
    double         t0 = now_sec();

    jsPubOptions_Init(&po);
    po.MaxWait = timeout_ms;

    while ((n = getline(&line, &linecap, stdin)) >= 0)
    {
        const char *subj = subject;
        const char *body = line;
        size_t      blen = (size_t) n;
        natsMsg    *m = NULL;
        char       *evid = NULL;

        lineno++;
        if (blen > 0 && line[blen - 1] == '\n')
            line[--blen] = '\0';
        if (subject_tab)
        {
            char *tab = memchr(line, '\t', blen);

            if (tab == NULL || tab == line)
            {
                errmsg("stdin line %llu: expected SUBJECT<TAB>BODY", (unsigned long long) lineno);
                rc = EXIT_ERR;
                break;
            }
            *tab = '\0';
            subj = line;
            body = tab + 1;
            blen -= (size_t) (tab + 1 - line);
        }
        if (hex)
        {
            long dl;

            if (blen > 0 && body[blen - 1] == '\r')
                blen--;
            if (bincap < blen / 2 + 1)
            {
                bincap = blen / 2 + 1;
                bin = xrealloc(bin, bincap);
            }
            dl = hex_decode(body, blen, bin);
            if (dl < 0)
            {
                errmsg("stdin line %llu: invalid hex body", (unsigned long long) lineno);
                rc = EXIT_ERR;
                break;
            }
            body = (const char *) bin;
            blen = (size_t) dl;
        }
        if (blen > INT32_MAX)
        {
            errmsg("stdin line %llu: body too large", (unsigned long long) lineno);
            rc = EXIT_ERR;
            break;
        }
        s = natsMsg_Create(&m, subj, NULL, body, (int) blen);
        for (i = 0; s == NATS_OK && i < nhdrs; i++)
            s = natsMsgHeader_Add(m, hdrs[i].name, hdrs[i].value);
        if (s == NATS_OK && msgid_from_event && (evid = extract_event_id(body, blen)) != NULL)
            s = natsMsgHeader_Set(m, "Nats-Msg-Id", evid);
        free(evid);
        if (s == NATS_OK)
            s = js_PublishMsgAsync(g_js, &m, &po);
        natsMsg_Destroy(m);     /* no-op when the library took ownership */
        if (s != NATS_OK)
        {
            char what[512];

            snprintf(what, sizeof what, "publishing stdin line %llu to %s",
                     (unsigned long long) lineno, subj);
            nats_fail(what, s, 0);
            rc = EXIT_ERR;
            break;
        }
        sent++;
    }
    if (rc == 0 && ferror(stdin))
    {
        errmsg("reading stdin: %s", strerror(errno));
        rc = EXIT_ERR;
    }
    free(line);
    free(bin);

    /* Wait for every outstanding ack (also after an input error: do not leave
     * messages in flight). */
    jsPubOptions_Init(&po);
    po.MaxWait = timeout_ms + 5000;
    s = js_PublishAsyncComplete(g_js, &po);
    if (s != NATS_OK)
    {
        natsMsgList pending = {0};

        if (js_PublishAsyncGetPendingList(&pending, g_js) == NATS_OK)
        {
            errmsg("%d message(s) still not acked", pending.Count);
            natsMsgList_Destroy(&pending);
        }
        nats_fail("waiting for publish acks", s, 0);
        rc = EXIT_ERR;
    }

    pthread_mutex_lock(&g_pub.mu);
    if (g_pub.failed > 0)
    {
        errmsg("%llu of %llu message(s) failed; first error: %s",
               (unsigned long long) g_pub.failed, (unsigned long long) sent,
               g_pub.first_err ? g_pub.first_err : "?");
        rc = EXIT_ERR;
    }
    if (rc == 0 && g_pub.acked != sent)
    {
        errmsg("sent %llu message(s) but %llu acked", (unsigned long long) sent,
               (unsigned long long) g_pub.acked);
        rc = EXIT_ERR;
    }
    if (g_pub.dups > 0)
        errmsg("%llu of the published messages were duplicates (Nats-Msg-Id seen before)",
               (unsigned long long) g_pub.dups);
    if (getenv("NATSTOOL_VERBOSE"))
        errmsg("pub: %llu acked in %.3f s", (unsigned long long) g_pub.acked, now_sec() - t0);
    if (rc == 0)
        printf("published %llu\n", (unsigned long long) g_pub.acked);
    free(g_pub.first_err);
    g_pub.first_err = NULL;
    pthread_mutex_unlock(&g_pub.mu);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* ensure-stream                                                             */
/* ------------------------------------------------------------------------ */

static bool
same_subject_set(const char **a, int na, const char **b, int nb)
{
    int i, j;

    /* every a in b and every b in a (duplicates tolerated) */
    for (i = 0; i < na; i++)
    {
        for (j = 0; j < nb && strcmp(a[i], b[j]) != 0; j++)
            ;
        if (j == nb)
            return false;
    }
    for (j = 0; j < nb; j++)
    {
        for (i = 0; i < na && strcmp(a[i], b[j]) != 0; i++)
            ;
        if (i == na)
            return false;
    }
    return true;
}

static int
cmd_ensure_stream(const char *name, const char **subjects, int nsubjects)
{
    jsStreamInfo  *si = NULL;
    jsStreamConfig cfg;
    jsErrCode      jerr = 0;
    natsStatus     s;
    int            rc = EXIT_ERR;

    s = js_GetStreamInfo(&si, g_js, name, NULL, &jerr);
    if (s == NATS_OK)
    {
        jsStreamConfig *c = si->Config;

        if (c != NULL && c->Storage == js_FileStorage &&
            same_subject_set(c->Subjects, c->SubjectsLen, subjects, nsubjects))
        {
            printf("exists %s\n", name);
            rc = 0;
        }
        else
        {
            buf_t b = {0};
            int   i;

            for (i = 0; c != NULL && i < c->SubjectsLen; i++)
            {
                if (i > 0)
                    buf_putc(&b, ' ');
                buf_puts(&b, c->Subjects[i]);
            }
            errmsg("stream %s already exists with a different configuration "
                   "(subjects: %s; storage: %s)", name, b.p ? b.p : "",
                   c && c->Storage == js_MemoryStorage ? "memory" : "file");
            free(b.p);
        }
        jsStreamInfo_Destroy(si);
        return rc;
    }
    if (s != NATS_NOT_FOUND && jerr != JSStreamNotFoundErr)
    {
        nats_fail("looking up the stream", s, jerr);
        return EXIT_ERR;
    }

    jsStreamConfig_Init(&cfg);
    cfg.Name = name;
    cfg.Subjects = subjects;
    cfg.SubjectsLen = nsubjects;
    cfg.Storage = js_FileStorage;
    jerr = 0;
    s = js_AddStream(&si, g_js, &cfg, NULL, &jerr);
    if (s != NATS_OK)
    {
        char what[512];

        snprintf(what, sizeof what, "creating stream %s", name);
        nats_fail(what, s, jerr);
        return EXIT_ERR;
    }
    jsStreamInfo_Destroy(si);
    printf("created %s\n", name);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* set-max-msg-size                                                          */
/* ------------------------------------------------------------------------ */

static int
cmd_set_limit(const char *name, const char *limit, const char *value)
{
    jsStreamInfo *si = NULL;
    jsStreamInfo *updated = NULL;
    jsErrCode     jerr = 0;
    natsStatus    s;
    char         *end;
    long          v;

    errno = 0;
    v = strtol(value, &end, 10);
    if (errno != 0 || *end != '\0' || v < -1 || v > INT32_MAX)
    {
        errmsg("invalid value '%s'", value);
        return EXIT_USAGE;
    }
    s = js_GetStreamInfo(&si, g_js, name, NULL, &jerr);
    if (s != NATS_OK)
    {
        nats_fail("looking up the stream", s, jerr);
        return (s == NATS_NOT_FOUND || jerr == JSStreamNotFoundErr) ? EXIT_NOSTREAM : EXIT_ERR;
    }
    if (strcmp(limit, "max_msgs") == 0)
        si->Config->MaxMsgs = v;
    else
        si->Config->MaxMsgSize = (int32_t) v;
    s = js_UpdateStream(&updated, g_js, si->Config, NULL, &jerr);
    jsStreamInfo_Destroy(si);
    if (s != NATS_OK)
    {
        nats_fail("updating the stream", s, jerr);
        return EXIT_ERR;
    }
    jsStreamInfo_Destroy(updated);
    printf("updated %s %s %ld\n", name, limit, v);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* stream-info                                                               */
/* ------------------------------------------------------------------------ */

static int
cmd_stream_info(const char *subject)
{
    char         *stream = NULL;
    jsStreamInfo *si = NULL;
    jsStreamConfig *c;
    buf_t         b = {0};
    int           rc, i;

    rc = find_stream(subject, &stream);
    if (rc != 0)
        return rc;
    rc = get_stream_info(stream, NULL, &si);
    if (rc != 0)
    {
        free(stream);
        return rc;
    }
    c = si->Config;
    buf_puts(&b, "{\"name\":");
    json_cstr(&b, c && c->Name ? c->Name : stream);
    buf_puts(&b, ",\"subjects\":[");
    for (i = 0; c != NULL && i < c->SubjectsLen; i++)
    {
        if (i > 0)
            buf_putc(&b, ',');
        json_cstr(&b, c->Subjects[i]);
    }
    buf_putc(&b, ']');
    if (c != NULL)
    {
        buf_printf(&b, ",\"retention\":\"%s\"",
                   c->Retention == js_InterestPolicy ? "interest" :
                   c->Retention == js_WorkQueuePolicy ? "workqueue" : "limits");
        buf_printf(&b, ",\"discard\":\"%s\"", c->Discard == js_DiscardNew ? "new" : "old");
        buf_printf(&b, ",\"max_msgs\":%lld", (long long) c->MaxMsgs);
        buf_printf(&b, ",\"max_bytes\":%lld", (long long) c->MaxBytes);
        buf_printf(&b, ",\"max_age\":%lld", (long long) c->MaxAge);
        buf_printf(&b, ",\"max_msgs_per_subject\":%lld", (long long) c->MaxMsgsPerSubject);
        buf_printf(&b, ",\"max_msg_size\":%lld", (long long) c->MaxMsgSize);
        buf_printf(&b, ",\"storage\":\"%s\"",
                   c->Storage == js_MemoryStorage ? "memory" : "file");
        buf_printf(&b, ",\"replicas\":%lld", (long long) c->Replicas);
        buf_printf(&b, ",\"duplicate_window\":%lld", (long long) c->Duplicates);
        buf_printf(&b, ",\"allow_direct\":%s", c->AllowDirect ? "true" : "false");
    }
    buf_printf(&b, ",\"messages\":%llu", (unsigned long long) si->State.Msgs);
    buf_printf(&b, ",\"bytes\":%llu", (unsigned long long) si->State.Bytes);
    buf_printf(&b, ",\"first_seq\":%llu", (unsigned long long) si->State.FirstSeq);
    buf_printf(&b, ",\"last_seq\":%llu", (unsigned long long) si->State.LastSeq);
    buf_printf(&b, ",\"num_deleted\":%llu", (unsigned long long) si->State.NumDeleted);
    buf_printf(&b, ",\"consumer_count\":%lld", (long long) si->State.Consumers);
    buf_puts(&b, "}\n");
    fwrite(b.p, 1, b.len, stdout);
    free(b.p);
    jsStreamInfo_Destroy(si);
    free(stream);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* consumers                                                                 */
/* ------------------------------------------------------------------------ */

static int
cmd_consumers(const char *stream)
{
    jsConsumerInfoList *list = NULL;
    jsErrCode           jerr = 0;
    natsStatus          s;
    const char        **names;
    int                 n = 0, i;

    s = js_Consumers(&list, g_js, stream, NULL, &jerr);
    if (s == NATS_NOT_FOUND && jerr == JSStreamNotFoundErr)
    {
        errmsg("stream %s not found", stream);
        return EXIT_NOSTREAM;
    }
    if (s == NATS_NOT_FOUND)
        return 0;               /* stream exists, no consumers */
    if (s != NATS_OK)
    {
        char what[512];

        snprintf(what, sizeof what, "listing consumers of stream %s", stream);
        nats_fail(what, s, jerr);
        return EXIT_ERR;
    }
    names = xmalloc(sizeof(*names) * (size_t) (list->Count > 0 ? list->Count : 1));
    for (i = 0; i < list->Count; i++)
    {
        jsConsumerInfo *ci = list->List[i];

        if (ci != NULL && ci->Config != NULL && ci->Config->Durable != NULL &&
            ci->Config->Durable[0] != '\0')
            names[n++] = ci->Config->Durable;
    }
    qsort(names, (size_t) n, sizeof(*names), cmp_cstr);
    for (i = 0; i < n; i++)
        printf("%s\n", names[i]);
    free(names);
    jsConsumerInfoList_Destroy(list);
    return 0;
}

static int
cmd_listen(const char *subject, const char *seconds)
{
    natsSubscription *sub = NULL;
    natsStatus        s;
    char             *endp;
    long              secs = strtol(seconds, &endp, 10);
    int64_t           deadline;

    if (*endp != '\0' || secs <= 0)
    {
        errmsg("invalid SECONDS %s", seconds);
        return EXIT_USAGE;
    }
    s = natsConnection_SubscribeSync(&sub, g_nc, subject);
    if (s == NATS_OK)
        s = natsSubscription_SetPendingLimits(sub, -1, -1);
    if (s == NATS_OK)
        s = natsConnection_Flush(g_nc);
    if (s != NATS_OK)
    {
        nats_fail("subscribing", s, 0);
        natsSubscription_Destroy(sub);
        return EXIT_ERR;
    }
    deadline = nats_Now() + secs * 1000;
    for (;;)
    {
        natsMsg *msg = NULL;
        int64_t  left = deadline - nats_Now();

        if (left <= 0)
            break;
        s = natsSubscription_NextMsg(&msg, sub, left);
        if (s == NATS_TIMEOUT)
            break;
        if (s != NATS_OK)
        {
            nats_fail("receiving", s, 0);
            natsSubscription_Destroy(sub);
            return EXIT_ERR;
        }
        printf("%s\n", natsMsg_GetSubject(msg));
        natsMsg_Destroy(msg);
    }
    natsSubscription_Destroy(sub);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* main                                                                      */
/* ------------------------------------------------------------------------ */

static void
free_headers(header_t *hdrs, int n)
{
    int i;

    for (i = 0; i < n; i++)
    {
        free(hdrs[i].name);
        free(hdrs[i].value);
    }
    free(hdrs);
}

/* Parse 'Name: value' into h. */
static bool
parse_header(const char *arg, header_t *h)
{
    const char *colon = strchr(arg, ':');
    const char *ns = arg, *ne, *vs;
    size_t      vl;

    if (colon == NULL)
        return false;
    ne = colon;
    while (ns < ne && isspace((unsigned char) *ns))
        ns++;
    while (ne > ns && isspace((unsigned char) ne[-1]))
        ne--;
    if (ne == ns)
        return false;
    vs = colon + 1;
    while (*vs == ' ' || *vs == '\t')
        vs++;
    vl = strlen(vs);
    while (vl > 0 && (vs[vl - 1] == ' ' || vs[vl - 1] == '\t'))
        vl--;
    h->name = xstrndup(ns, (size_t) (ne - ns));
    h->value = xstrndup(vs, vl);
    return true;
}

int
main(int argc, char **argv)
{
    const char *url = getenv("NATS_URL");
    const char *cmd;
    int         i = 1, rc;

    /* global options */
    while (i < argc && strncmp(argv[i], "--", 2) == 0)
    {
        if (strcmp(argv[i], "--url") == 0 && i + 1 < argc)
        {
            url = argv[i + 1];
            i += 2;
        }
        else if (strncmp(argv[i], "--url=", 6) == 0)
            url = argv[i++] + 6;
        else if (strcmp(argv[i], "--timeout") == 0 && i + 1 < argc)
        {
            char *endp;
            long  v = strtol(argv[i + 1], &endp, 10);

            if (*endp != '\0' || v <= 0)
            {
                errmsg("invalid --timeout %s (milliseconds expected)", argv[i + 1]);
                return EXIT_USAGE;
            }
            timeout_ms = v;
            i += 2;
        }
        else if (strcmp(argv[i], "--help") == 0)
        {
            usage();
            return 0;
        }
        else
        {
            errmsg("unknown or incomplete option %s", argv[i]);
            usage();
            return EXIT_USAGE;
        }
    }
    if (i >= argc)
    {
        usage();
        return EXIT_USAGE;
    }
    if (url == NULL || *url == '\0')
    {
        errmsg("--url is required (e.g. --url nats://127.0.0.1:PORT)");
        return EXIT_USAGE;
    }
    cmd = argv[i++];

    if (strcmp(cmd, "dump") == 0 || strcmp(cmd, "stream-info") == 0 ||
        strcmp(cmd, "consumers") == 0)
    {
        if (argc - i != 1 || argv[i][0] == '\0')
        {
            errmsg("%s takes exactly one non-empty argument", cmd);
            usage();
            return EXIT_USAGE;
        }
        if ((rc = nats_setup(url, NULL)) == 0)
        {
            if (strcmp(cmd, "dump") == 0)
            {
                static char obuf[1 << 16];

                setvbuf(stdout, obuf, _IOFBF, sizeof obuf);
                rc = cmd_dump(argv[i]);
            }
            else if (strcmp(cmd, "stream-info") == 0)
                rc = cmd_stream_info(argv[i]);
            else
                rc = cmd_consumers(argv[i]);
        }
    }
    else if (strcmp(cmd, "ensure-stream") == 0)
    {
        if (argc - i < 2)
        {
            errmsg("ensure-stream needs NAME and at least one SUBJECT");
            usage();
            return EXIT_USAGE;
        }
        if ((rc = nats_setup(url, NULL)) == 0)
            rc = cmd_ensure_stream(argv[i], (const char **) &argv[i + 1], argc - i - 1);
    }
    else if (strcmp(cmd, "set-max-msg-size") == 0 || strcmp(cmd, "set-max-msgs") == 0)
    {
        if (argc - i != 2)
        {
            errmsg("%s needs NAME and a number", cmd);
            usage();
            return EXIT_USAGE;
        }
        if ((rc = nats_setup(url, NULL)) == 0)
            rc = cmd_set_limit(argv[i], strcmp(cmd, "set-max-msgs") == 0 ? "max_msgs" : "max_msg_size",
                               argv[i + 1]);
    }
    else if (strcmp(cmd, "listen") == 0)
    {
        if (argc - i != 2 || argv[i][0] == '\0')
        {
            errmsg("listen needs SUBJECT and SECONDS");
            usage();
            return EXIT_USAGE;
        }
        if ((rc = nats_setup(url, NULL)) == 0)
            rc = cmd_listen(argv[i], argv[i + 1]);
    }
    else if (strcmp(cmd, "pub") == 0)
    {
        const char *subject = NULL;
        header_t   *hdrs = NULL;
        int         nhdrs = 0;
        bool        msgid = false, hex = false, tab = false;
        jsOptions   jo;

        for (; i < argc; i++)
        {
            if (strcmp(argv[i], "--header") == 0 || strcmp(argv[i], "-H") == 0)
            {
                if (i + 1 >= argc)
                {
                    errmsg("--header needs an argument 'Name: value'");
                    free_headers(hdrs, nhdrs);
                    return EXIT_USAGE;
                }
                hdrs = xrealloc(hdrs, sizeof(*hdrs) * (size_t) (nhdrs + 1));
                if (!parse_header(argv[++i], &hdrs[nhdrs]))
                {
                    errmsg("invalid --header '%s' (expected 'Name: value')", argv[i]);
                    free_headers(hdrs, nhdrs);
                    return EXIT_USAGE;
                }
                nhdrs++;
            }
            else if (strcmp(argv[i], "--msg-id-from-event-id") == 0)
                msgid = true;
            else if (strcmp(argv[i], "--hex") == 0)
                hex = true;
            else if (strcmp(argv[i], "--subject-prefix-tab") == 0)
                tab = true;
            else if (argv[i][0] == '-' && argv[i][1] == '-')
            {
                errmsg("unknown pub option %s", argv[i]);
                free_headers(hdrs, nhdrs);
                return EXIT_USAGE;
            }
            else if (subject == NULL && argv[i][0] != '\0')
                subject = argv[i];
            else
            {
                errmsg("pub takes one SUBJECT (unexpected '%s')", argv[i]);
                free_headers(hdrs, nhdrs);
                return EXIT_USAGE;
            }
        }
        if (subject == NULL && !tab)
        {
            errmsg("pub needs a SUBJECT");
            free_headers(hdrs, nhdrs);
            return EXIT_USAGE;
        }
        jsOptions_Init(&jo);
        jo.PublishAsync.MaxPending = 2048;
        jo.PublishAsync.AckHandler = pub_ack_handler;
        jo.PublishAsync.StallWait = timeout_ms;
        if ((rc = nats_setup(url, &jo)) == 0)
            rc = cmd_pub(subject, hdrs, nhdrs, msgid, hex, tab);
        free_headers(hdrs, nhdrs);
    }
    else
    {
        errmsg("unknown command %s", cmd);
        usage();
        return EXIT_USAGE;
    }

    if (fflush(stdout) != 0 || ferror(stdout))
    {
        errmsg("writing to stdout: %s", strerror(errno));
        if (rc == 0)
            rc = EXIT_ERR;
    }
    nats_teardown();
    return rc;
}

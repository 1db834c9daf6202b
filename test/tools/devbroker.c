/*
 * devbroker — a Kafka development broker built on librdkafka's mock cluster.
 *
 * There is no Apache Kafka broker on the development machines, but
 * librdkafka ships a protocol-level mock cluster (<librdkafka/rdkafka_mock.h>)
 * that real clients (kcat, librdkafka, kafka-python, ...) reach over TCP.
 * This program hosts one, prints nothing but timestamped log lines on stderr,
 * and is driven by signals:
 *
 *   SIGUSR1          every broker down (listeners closed, connections dropped)
 *   SIGUSR2          every broker up again (same ports)
 *   SIGWINCH         the next Produce request (to any broker) fails with
 *                    MSG_SIZE_TOO_LARGE for all its partitions, as a broker
 *                    whose message size limit was lowered would answer
 *   SIGURG           create the topics listed in the --topic-requests file
 *                    (one NAME[:PARTS] per line; the mock answers no
 *                    CreateTopics request, and auto-created topics always get
 *                    4 partitions), log one line per topic and then
 *                    "topic requests done: N created, M failed"
 *   SIGTERM, SIGINT  destroy the cluster, remove the pid file, exit 0
 *   SIGHUP           ignored (logged), so nohup/setsid detaching is harmless
 *
 * Clients reach the mock brokers through a proxy (devbroker_proxy.c) that
 * answers a fetch as soon as data arrives, as a real broker answers a long
 * poll; the mock itself would hold an empty fetch for the consumer's whole
 * fetch.wait.max.ms.  --direct leaves the proxy out.
 *
 * Usage:
 *   devbroker --bootstrap-file PATH [--brokers N] [--partitions P]
 *             [--topic NAME[:PARTS]]... [--pid-file PATH]
 *             [--topic-requests PATH] [--direct]
 *
 * Once the cluster accepts connections, the pid file (if any) is written and
 * then the bootstrap list ("127.0.0.1:P1,127.0.0.1:P2,...", no trailing
 * newline) is written to the bootstrap file; both are written to a temporary
 * file and renamed, so a reader never sees a partial file and the presence of
 * the bootstrap file means "ready".
 *
 * Facts about the librdkafka 2.0.2 mock worth knowing (see the source of
 * rdkafka_mock.c / rdkafka_mock_handlers.c at v2.0.2):
 *   - Brokers listen on 127.0.0.1 with kernel-chosen ports; a broker that is
 *     set down keeps its port (the socket stays bound but stops listening, so
 *     clients get "connection refused") and set up listens on it again.
 *     (With the proxy, SIGUSR1/SIGUSR2 close and reopen the proxy's
 *     listeners instead, their ports held meanwhile; the mock brokers stay
 *     up.)
 *   - Topics are auto-created on any Metadata request that names them. The
 *     mock implements Metadata only up to v2, which has no
 *     AllowAutoTopicCreation field, so this applies to consumers too
 *     (regardless of their allow.auto.create.topics setting).
 *   - Auto-created topics get 4 partitions and replication factor
 *     min(3, brokers). The partition count is hard-coded in
 *     rd_kafka_mock_cluster_new() and there is no API to change it, so
 *     --partitions only sets the default for --topic NAME without ":PARTS".
 *   - The replication factor given to rd_kafka_mock_topic_create() is
 *     logged by the mock but replicas are always assigned from the default
 *     min(3, brokers); harmless, since the mock has no real replication.
 *   - Everything is in memory: data survives SIGUSR1/SIGUSR2 but not a
 *     restart of this program, and a restart picks new ports.
 *   - The mock leaves Nagle's algorithm on for its sockets, which a real
 *     broker does not (Kafka sets TCP_NODELAY): with several requests in
 *     flight on a connection, a response held back until the client's
 *     delayed ACK adds ~40 ms.  So this program sets TCP_NODELAY on every
 *     socket of its process, every 50 ms (listening sockets pass it on to
 *     the connections they accept).
 */

#define _GNU_SOURCE

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <getopt.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "devbroker_proxy.h"

#define MAX_BROKERS    64
#define MAX_PARTITIONS 10000
#define MAX_TOPIC_LEN  249
/* Partition count the 2.0.2 mock gives auto-created topics (not settable). */
#define MOCK_AUTO_CREATE_PARTITIONS 4
/* Kafka protocol ApiKey of Produce requests (not exported by rdkafka.h). */
#define KAFKA_API_PRODUCE 0

struct topic_spec {
    char *name;
    int   partitions;   /* 0 = use --partitions */
};

static const char *progname = "devbroker";

/* ------------------------------------------------------------------------ */
/* Logging                                                                   */
/* ------------------------------------------------------------------------ */

static void
vlogmsg(const char *fmt, va_list ap)
{
    struct timespec ts;
    struct tm       tm;
    char            stamp[64];
    char            line[2048];

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    strftime(stamp, sizeof(stamp), "%Y-%m-%dT%H:%M:%S", &tm);
    vsnprintf(line, sizeof(line), fmt, ap);
    /* One fprintf per line: stdio locks the stream, so lines from librdkafka
     * threads (log_cb) and the main thread never interleave. */
    fprintf(stderr, "%s.%03ldZ %s[%ld]: %s\n", stamp, ts.tv_nsec / 1000000L,
            progname, (long) getpid(), line);
    fflush(stderr);
}

static void __attribute__((format(printf, 1, 2)))
logmsg(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vlogmsg(fmt, ap);
    va_end(ap);
}

static void
rdkafka_log_cb(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    (void) rk;
    /* The book-keeping handle deliberately has no bootstrap.servers; its
     * warning about that would only mislead whoever reads the log. */
    if (strcmp(fac, "CONFWARN") == 0 && strstr(buf, "bootstrap.servers"))
        return;
    logmsg("librdkafka level=%d %s: %s", level, fac, buf);
}

static void __attribute__((noreturn))
usage(int status)
{
    FILE *out = status == 0 ? stdout : stderr;

    fprintf(out,
            "Usage: %s --bootstrap-file PATH [--brokers N] [--partitions P]\n"
            "          [--topic NAME[:PARTS]]... [--pid-file PATH]\n"
            "          [--topic-requests PATH] [--direct]\n"
            "\n"
            "Hosts a librdkafka mock Kafka cluster on 127.0.0.1 (random ports).\n"
            "  --bootstrap-file PATH  write the bootstrap list here once ready\n"
            "  --brokers N            number of brokers, ids 1..N (default 3)\n"
            "  --partitions P         partitions for --topic without :PARTS\n"
            "                         (default 4; auto-created topics always\n"
            "                         get %d, a librdkafka 2.0.2 limitation)\n"
            "  --topic NAME[:PARTS]   pre-create a topic (replication factor 1)\n"
            "  --pid-file PATH        write the pid here; removed on exit\n"
            "  --topic-requests PATH  on SIGURG, create the topics listed\n"
            "                         there (NAME[:PARTS] per line)\n"
            "  --direct               clients reach the mock brokers directly,\n"
            "                         which hold an empty fetch for its whole\n"
            "                         wait (default: a proxy answers it as data\n"
            "                         arrives, as a real broker does)\n"
            "Signals: USR1 = all brokers down, USR2 = all up, URG = create\n"
            "the requested topics, TERM/INT = exit.\n",
            progname, MOCK_AUTO_CREATE_PARTITIONS);
    exit(status);
}

/* ------------------------------------------------------------------------ */
/* Argument parsing                                                          */
/* ------------------------------------------------------------------------ */

static bool
parse_int(const char *s, int min, int max, int *out)
{
    char *end;
    long  v;

    if (s == NULL || *s == '\0')
        return false;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno != 0 || *end != '\0' || v < min || v > max)
        return false;
    *out = (int) v;
    return true;
}

static bool
valid_topic_name(const char *name)
{
    size_t len = strlen(name);

    if (len == 0 || len > MAX_TOPIC_LEN)
        return false;
    if (strcmp(name, ".") == 0 || strcmp(name, "..") == 0)
        return false;
    for (const char *p = name; *p; p++) {
        char c = *p;

        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-'))
            return false;
    }
    return true;
}

/*
 * Parse NAME[:PARTS] into spec (name strdup'ed); on error, false with the
 * reason in err.
 */
static bool
parse_topic_spec(const char *arg, struct topic_spec *spec, char *err,
                 size_t errlen)
{
    const char *colon = strrchr(arg, ':');
    size_t      namelen = colon ? (size_t) (colon - arg) : strlen(arg);

    spec->name = strndup(arg, namelen);
    if (spec->name == NULL) {
        snprintf(err, errlen, "out of memory");
        return false;
    }
    spec->partitions = 0;
    if (!valid_topic_name(spec->name)) {
        snprintf(err, errlen, "invalid topic name in '%s' (1-%d chars of "
                 "[A-Za-z0-9._-])", arg, MAX_TOPIC_LEN);
        free(spec->name);
        spec->name = NULL;
        return false;
    }
    if (colon != NULL &&
        !parse_int(colon + 1, 1, MAX_PARTITIONS, &spec->partitions)) {
        snprintf(err, errlen, "invalid partition count in '%s' (1-%d)", arg,
                 MAX_PARTITIONS);
        free(spec->name);
        spec->name = NULL;
        return false;
    }
    return true;
}

static void
parse_topic_arg(const char *arg, struct topic_spec *spec)
{
    char err[512];

    if (!parse_topic_spec(arg, spec, err, sizeof(err))) {
        fprintf(stderr, "%s: --topic: %s\n", progname, err);
        exit(2);
    }
}

/* ------------------------------------------------------------------------ */
/* Files                                                                     */
/* ------------------------------------------------------------------------ */

/* Write contents to path via a temporary file in the same directory and
 * rename(2), so readers see either nothing or the whole file. */
static bool
write_file_atomic(const char *path, const char *contents)
{
    char    tmp[PATH_MAX];
    size_t  len = strlen(contents);
    size_t  off = 0;
    int     fd;

    if (snprintf(tmp, sizeof(tmp), "%s.tmp.%ld", path, (long) getpid()) >=
        (int) sizeof(tmp)) {
        logmsg("path too long: %s", path);
        return false;
    }
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        logmsg("cannot create %s: %s", tmp, strerror(errno));
        return false;
    }
    while (off < len) {
        ssize_t n = write(fd, contents + off, len - off);

        if (n < 0) {
            if (errno == EINTR)
                continue;
            logmsg("cannot write %s: %s", tmp, strerror(errno));
            close(fd);
            unlink(tmp);
            return false;
        }
        off += (size_t) n;
    }
    if (fsync(fd) != 0 || close(fd) != 0) {
        logmsg("cannot flush %s: %s", tmp, strerror(errno));
        unlink(tmp);
        return false;
    }
    if (rename(tmp, path) != 0) {
        logmsg("cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        return false;
    }
    return true;
}

/* If pid_file names a live devbroker other than us, return its pid. */
static pid_t
running_instance(const char *pid_file)
{
    char  buf[64];
    char  comm_path[64];
    FILE *f;
    int   pid;

    f = fopen(pid_file, "r");
    if (f == NULL)
        return 0;
    if (fgets(buf, sizeof(buf), f) == NULL) {
        fclose(f);
        return 0;
    }
    fclose(f);
    buf[strcspn(buf, "\r\n")] = '\0';
    if (!parse_int(buf, 1, INT_MAX, &pid) || pid == (int) getpid())
        return 0;
    if (kill(pid, 0) != 0 && errno == ESRCH)
        return 0;
    /* Guard against pid reuse: only a process named devbroker counts. */
    snprintf(comm_path, sizeof(comm_path), "/proc/%d/comm", pid);
    f = fopen(comm_path, "r");
    if (f == NULL)
        return 0;
    if (fgets(buf, sizeof(buf), f) == NULL)
        buf[0] = '\0';
    fclose(f);
    buf[strcspn(buf, "\r\n")] = '\0';
    return strcmp(buf, "devbroker") == 0 ? (pid_t) pid : 0;
}

/* ------------------------------------------------------------------------ */
/* Broker control                                                            */
/* ------------------------------------------------------------------------ */

/* TCP_NODELAY on every socket of this process (see the top of the file). */
static void
set_nodelay_everywhere(void)
{
    DIR           *dir = opendir("/proc/self/fd");
    struct dirent *de;
    int            on = 1;

    if (dir == NULL)
        return;
    while ((de = readdir(dir)) != NULL) {
        struct stat st;
        int         fd = atoi(de->d_name);

        if (de->d_name[0] == '.' || fd == dirfd(dir) || fstat(fd, &st) != 0 ||
            !S_ISSOCK(st.st_mode))
            continue;
        (void) setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof(on));
    }
    closedir(dir);
}

/* Every broker down or up: the proxy's listeners if clients go through it. */
static void
set_all_brokers(rd_kafka_mock_cluster_t *mcluster, int broker_cnt, bool up,
                bool proxied)
{
    int changed = 0;

    if (proxied)
        changed = devbroker_proxy_set_up(up);
    else {
        for (int32_t id = 1; id <= broker_cnt; id++) {
            rd_kafka_resp_err_t err = up
                ? rd_kafka_mock_broker_set_up(mcluster, id)
                : rd_kafka_mock_broker_set_down(mcluster, id);

            if (err == RD_KAFKA_RESP_ERR_NO_ERROR)
                changed++;
            else
                logmsg("broker %d: set %s failed: %s", (int) id,
                       up ? "up" : "down", rd_kafka_err2str(err));
        }
    }
    logmsg("kafka %s: %d of %d brokers set %s", up ? "UP" : "DOWN",
           changed, broker_cnt, up ? "up" : "down");
}

/*
 * SIGURG: create every topic listed in path (NAME[:PARTS] per line, blank
 * lines ignored), then remove the file.  A topic that exists already is
 * reported and left as it is (the mock cannot change a partition count).
 */
static void
create_requested_topics(rd_kafka_mock_cluster_t *mcluster, const char *path,
                        int default_partitions)
{
    FILE *f;
    char  line[MAX_TOPIC_LEN + 32];
    int   created = 0, failed = 0, lineno = 0;

    if (path == NULL) {
        logmsg("SIGURG ignored: no --topic-requests file configured");
        return;
    }
    f = fopen(path, "r");
    if (f == NULL) {
        logmsg("topic requests: cannot open %s: %s", path, strerror(errno));
        logmsg("topic requests done: 0 created, 1 failed");
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        struct topic_spec   spec;
        char                err[512];
        size_t              len = strcspn(line, "\r\n");
        rd_kafka_resp_err_t kerr;
        int                 parts;

        lineno++;
        if (line[len] == '\0' && !feof(f)) {
            int c;

            /* Too long for a topic name: skip the rest of the line. */
            while ((c = fgetc(f)) != EOF && c != '\n')
                ;
            logmsg("topic requests: line %d is too long", lineno);
            failed++;
            continue;
        }
        line[len] = '\0';
        if (len == 0)
            continue;
        if (!parse_topic_spec(line, &spec, err, sizeof(err))) {
            logmsg("topic requests: line %d: %s", lineno, err);
            failed++;
            continue;
        }
        parts = spec.partitions > 0 ? spec.partitions : default_partitions;
        kerr = rd_kafka_mock_topic_create(mcluster, spec.name, parts, 1);
        if (kerr == RD_KAFKA_RESP_ERR_NO_ERROR) {
            logmsg("created topic %s (%d partitions, replication factor 1)",
                   spec.name, parts);
            created++;
        } else {
            logmsg("cannot create topic %s: %s", spec.name,
                   rd_kafka_err2str(kerr));
            failed++;
        }
        free(spec.name);
    }
    fclose(f);
    if (unlink(path) != 0 && errno != ENOENT)
        logmsg("cannot remove %s: %s", path, strerror(errno));
    logmsg("topic requests done: %d created, %d failed", created, failed);
}

int
main(int argc, char **argv)
{
    static const struct option long_options[] = {
        {"bootstrap-file", required_argument, NULL, 'b'},
        {"brokers", required_argument, NULL, 'n'},
        {"partitions", required_argument, NULL, 'p'},
        {"topic", required_argument, NULL, 't'},
        {"pid-file", required_argument, NULL, 'P'},
        {"topic-requests", required_argument, NULL, 'R'},
        {"direct", no_argument, NULL, 'D'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    const char              *bootstrap_file = NULL;
    const char              *pid_file = NULL;
    const char              *topic_requests = NULL;
    int                      broker_cnt = 3;
    int                      default_partitions = 4;
    struct topic_spec       *topics = NULL;
    int                      topic_cnt = 0;
    sigset_t                 blocked;
    sigset_t                 waitset;
    rd_kafka_conf_t         *conf;
    rd_kafka_t              *rk;
    rd_kafka_mock_cluster_t *mcluster;
    const char              *bootstraps;
    char                     errstr[512];
    char                     pidbuf[32];
    bool                     down = false;
    bool                     direct = false;
    bool                     proxied = false;
    int                      opt;

    if (argc > 0 && argv[0] != NULL) {
        const char *slash = strrchr(argv[0], '/');

        progname = slash ? slash + 1 : argv[0];
    }

    while ((opt = getopt_long(argc, argv, "b:n:p:t:P:R:Dh", long_options,
                              NULL)) != -1) {
        switch (opt) {
            case 'b':
                bootstrap_file = optarg;
                break;
            case 'n':
                if (!parse_int(optarg, 1, MAX_BROKERS, &broker_cnt)) {
                    fprintf(stderr, "%s: --brokers must be 1-%d\n", progname,
                            MAX_BROKERS);
                    return 2;
                }
                break;
            case 'p':
                if (!parse_int(optarg, 1, MAX_PARTITIONS,
                               &default_partitions)) {
                    fprintf(stderr, "%s: --partitions must be 1-%d\n",
                            progname, MAX_PARTITIONS);
                    return 2;
                }
                break;
            case 't':
                topics = realloc(topics, sizeof(*topics) * (size_t) (topic_cnt + 1));
                if (topics == NULL) {
                    fprintf(stderr, "%s: out of memory\n", progname);
                    return 1;
                }
                parse_topic_arg(optarg, &topics[topic_cnt++]);
                break;
            case 'P':
                pid_file = optarg;
                break;
            case 'R':
                topic_requests = optarg;
                break;
            case 'D':
                direct = true;
                break;
            case 'h':
                usage(0);
            default:
                usage(2);
        }
    }
    if (optind < argc) {
        fprintf(stderr, "%s: unexpected argument '%s'\n", progname,
                argv[optind]);
        usage(2);
    }
    if (bootstrap_file == NULL || *bootstrap_file == '\0') {
        fprintf(stderr, "%s: --bootstrap-file is required\n", progname);
        usage(2);
    }

    /*
     * Block every asynchronous signal before any librdkafka object exists:
     * threads inherit the creating thread's mask, so all of librdkafka's
     * threads (including the mock cluster's) keep them blocked and the
     * signals are only ever consumed by sigwaitinfo() below. Synchronous
     * fault signals stay unblocked so a crash still crashes.
     */
    sigfillset(&blocked);
    sigdelset(&blocked, SIGSEGV);
    sigdelset(&blocked, SIGBUS);
    sigdelset(&blocked, SIGFPE);
    sigdelset(&blocked, SIGILL);
    sigdelset(&blocked, SIGTRAP);
    sigdelset(&blocked, SIGABRT);
    if ((errno = pthread_sigmask(SIG_BLOCK, &blocked, NULL)) != 0) {
        logmsg("pthread_sigmask: %s", strerror(errno));
        return 1;
    }
    sigemptyset(&waitset);
    sigaddset(&waitset, SIGUSR1);
    sigaddset(&waitset, SIGUSR2);
    sigaddset(&waitset, SIGTERM);
    sigaddset(&waitset, SIGINT);
    sigaddset(&waitset, SIGHUP);
    sigaddset(&waitset, SIGWINCH);
    sigaddset(&waitset, SIGURG);
    /* A background job of a non-interactive shell starts with SIGINT
     * ignored; restore the default disposition (safe: they are blocked). */
    signal(SIGUSR1, SIG_DFL);
    signal(SIGUSR2, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    signal(SIGWINCH, SIG_DFL);
    signal(SIGURG, SIG_DFL);

    if (pid_file != NULL) {
        pid_t other = running_instance(pid_file);

        if (other > 0) {
            logmsg("another devbroker (pid %ld) owns %s; not starting",
                   (long) other, pid_file);
            return 1;
        }
    }
    /* A bootstrap file left by an earlier run names dead ports: remove it
     * so that waiting for the file means waiting for this instance. */
    if (unlink(bootstrap_file) != 0 && errno != ENOENT) {
        logmsg("cannot remove stale %s: %s", bootstrap_file, strerror(errno));
        return 1;
    }

    /*
     * The handle only does the cluster's book-keeping: no bootstrap.servers,
     * so it never connects anywhere by itself.
     */
    conf = rd_kafka_conf_new();
    rd_kafka_conf_set_log_cb(conf, rdkafka_log_cb);
    if (rd_kafka_conf_set(conf, "client.id", "devbroker", errstr,
                          sizeof(errstr)) != RD_KAFKA_CONF_OK) {
        logmsg("config: %s", errstr);
        rd_kafka_conf_destroy(conf);
        return 1;
    }
    rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (rk == NULL) {
        logmsg("rd_kafka_new: %s", errstr);
        rd_kafka_conf_destroy(conf);
        return 1;
    }

    /* Unless --direct, the brokers' advertised ports are the proxy's. */
    devbroker_proxy_aliasing(!direct);
    mcluster = rd_kafka_mock_cluster_new(rk, broker_cnt);
    devbroker_proxy_aliasing(false);
    if (mcluster == NULL) {
        logmsg("rd_kafka_mock_cluster_new(%d brokers) failed", broker_cnt);
        rd_kafka_destroy(rk);
        return 1;
    }

    for (int i = 0; i < topic_cnt; i++) {
        int parts = topics[i].partitions > 0 ? topics[i].partitions
                                             : default_partitions;
        rd_kafka_resp_err_t err =
            rd_kafka_mock_topic_create(mcluster, topics[i].name, parts, 1);

        if (err != RD_KAFKA_RESP_ERR_NO_ERROR) {
            logmsg("cannot create topic %s: %s", topics[i].name,
                   rd_kafka_err2str(err));
            rd_kafka_mock_cluster_destroy(mcluster);
            rd_kafka_destroy(rk);
            return 1;
        }
        logmsg("created topic %s (%d partitions, replication factor 1)",
               topics[i].name, parts);
    }

    if (!direct) {
        proxied = devbroker_proxy_start(logmsg);
        if (!proxied) {
            logmsg("cannot start the fetch proxy");
            rd_kafka_mock_cluster_destroy(mcluster);
            rd_kafka_destroy(rk);
            return 1;
        }
    }

    bootstraps = rd_kafka_mock_cluster_bootstraps(mcluster);
    snprintf(pidbuf, sizeof(pidbuf), "%ld\n", (long) getpid());
    if ((pid_file != NULL && !write_file_atomic(pid_file, pidbuf)) ||
        !write_file_atomic(bootstrap_file, bootstraps)) {
        rd_kafka_mock_cluster_destroy(mcluster);
        rd_kafka_destroy(rk);
        if (pid_file != NULL)
            unlink(pid_file);
        return 1;
    }
    logmsg("ready: %d brokers at %s (auto-created topics get %d partitions, "
           "replication factor %d)", broker_cnt, bootstraps,
           MOCK_AUTO_CREATE_PARTITIONS, broker_cnt < 3 ? broker_cnt : 3);

    for (;;) {
        siginfo_t       info;
        struct timespec tick = {0, 50 * 1000 * 1000};
        int             sig;

        set_nodelay_everywhere();
        sig = sigtimedwait(&waitset, &info, &tick);
        if (sig < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            logmsg("sigwaitinfo: %s", strerror(errno));
            break;
        }
        logmsg("received %s from pid %ld", strsignal(sig), (long) info.si_pid);
        if (sig == SIGUSR1) {
            if (down)
                logmsg("kafka already down; setting down again");
            set_all_brokers(mcluster, broker_cnt, false, proxied);
            down = true;
        } else if (sig == SIGUSR2) {
            if (!down)
                logmsg("kafka already up; setting up again");
            set_all_brokers(mcluster, broker_cnt, true, proxied);
            down = false;
        } else if (sig == SIGWINCH) {
            rd_kafka_mock_push_request_errors(mcluster, KAFKA_API_PRODUCE, 1,
                                              RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE);
            logmsg("next Produce request will fail with MSG_SIZE_TOO_LARGE");
        } else if (sig == SIGURG) {
            create_requested_topics(mcluster, topic_requests,
                                    default_partitions);
        } else if (sig == SIGHUP) {
            logmsg("SIGHUP ignored");
        } else {
            break;
        }
    }

    logmsg("shutting down");
    devbroker_proxy_stop();
    rd_kafka_mock_cluster_destroy(mcluster);
    rd_kafka_destroy(rk);
    if (pid_file != NULL && unlink(pid_file) != 0 && errno != ENOENT)
        logmsg("cannot remove %s: %s", pid_file, strerror(errno));
    for (int i = 0; i < topic_cnt; i++)
        free(topics[i].name);
    free(topics);
    logmsg("exited cleanly");
    return 0;
}

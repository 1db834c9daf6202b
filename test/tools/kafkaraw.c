/*
 * kafkaraw.c — produce one Kafka message whose header values are arbitrary
 * bytes (kcat takes header values from its command line, so they cannot
 * hold a NUL byte).  Test tool only.
 *
 *   kafkaraw BOOTSTRAP TOPIC PARTITION VALUE_FILE [NAME=HEX ...]
 *
 * HEX is the header value as hexadecimal digits ("" = empty value).  Exits
 * 0 once the broker acknowledged the message, 1 otherwise.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <librdkafka/rdkafka.h>

static int	acked = 0;

static void
report(rd_kafka_t *rk, const rd_kafka_message_t *m, void *opaque)
{
	(void) rk;
	(void) opaque;
	if (m->err)
		fprintf(stderr, "kafkaraw: %s\n", rd_kafka_err2str(m->err));
	else
		acked = 1;
}

/* Decode hex into a new buffer; -1 on a bad digit or an odd length. */
static long
unhex(const char *hex, unsigned char **out)
{
	size_t		n = strlen(hex);

	if (n % 2 != 0)
		return -1;
	*out = malloc(n / 2 + 1);
	for (size_t i = 0; i < n; i += 2)
	{
		unsigned int b;

		if (!isxdigit((unsigned char) hex[i]) || !isxdigit((unsigned char) hex[i + 1]) ||
			sscanf(hex + i, "%2x", &b) != 1)
			return -1;
		(*out)[i / 2] = (unsigned char) b;
	}
	return (long) (n / 2);
}

int
main(int argc, char **argv)
{
	char		err[512];
	rd_kafka_conf_t *conf;
	rd_kafka_t *rk;
	rd_kafka_headers_t *hdrs;
	FILE	   *f;
	char	   *value;
	long		len;
	rd_kafka_resp_err_t e;

	if (argc < 5)
	{
		fprintf(stderr, "usage: kafkaraw BOOTSTRAP TOPIC PARTITION VALUE_FILE [NAME=HEX ...]\n");
		return 2;
	}
	if ((f = fopen(argv[4], "rb")) == NULL || fseek(f, 0, SEEK_END) != 0 ||
		(len = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0)
	{
		perror(argv[4]);
		return 1;
	}
	value = malloc(len + 1);
	if (fread(value, 1, len, f) != (size_t) len)
	{
		perror(argv[4]);
		return 1;
	}
	fclose(f);

	hdrs = rd_kafka_headers_new(argc - 5);
	for (int i = 5; i < argc; i++)
	{
		char	   *eq = strchr(argv[i], '=');
		unsigned char *bytes = NULL;
		long		n;

		if (eq == NULL || (n = unhex(eq + 1, &bytes)) < 0)
		{
			fprintf(stderr, "kafkaraw: bad header \"%s\" (NAME=HEX)\n", argv[i]);
			return 2;
		}
		rd_kafka_header_add(hdrs, argv[i], eq - argv[i], bytes, n);
		free(bytes);
	}

	conf = rd_kafka_conf_new();
	if (rd_kafka_conf_set(conf, "bootstrap.servers", argv[1], err, sizeof(err)) != RD_KAFKA_CONF_OK ||
		rd_kafka_conf_set(conf, "message.timeout.ms", "10000", err, sizeof(err)) != RD_KAFKA_CONF_OK)
	{
		fprintf(stderr, "kafkaraw: %s\n", err);
		return 1;
	}
	rd_kafka_conf_set_dr_msg_cb(conf, report);
	if ((rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, err, sizeof(err))) == NULL)
	{
		fprintf(stderr, "kafkaraw: %s\n", err);
		return 1;
	}
	e = rd_kafka_producev(rk,
						  RD_KAFKA_V_TOPIC(argv[2]),
						  RD_KAFKA_V_PARTITION(atoi(argv[3])),
						  RD_KAFKA_V_VALUE(value, (size_t) len),
						  RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY),
						  RD_KAFKA_V_HEADERS(hdrs),
						  RD_KAFKA_V_END);
	if (e != RD_KAFKA_RESP_ERR_NO_ERROR)
	{
		fprintf(stderr, "kafkaraw: %s\n", rd_kafka_err2str(e));
		rd_kafka_headers_destroy(hdrs);
		return 1;
	}
	rd_kafka_flush(rk, 15000);
	rd_kafka_destroy(rk);
	free(value);
	return acked ? 0 : 1;
}

-- bench.sql — the benchmark's database side, shared by `make bench`
-- (bench/run.sh) and its smoke level in `make test`
-- (test/integration/30_bench_smoke.sh).  bench/lib.sh replaces @S@ with the
-- schema that holds everything (one per harness run), so concurrent runs and
-- the other tests never share a table.
--
-- The workload is a shop: a business table `orders` whose AFTER INSERT
-- trigger publishes one event per row with eventbus_publish (the version is
-- eventbus's own numbering).  Publishers are several connections running
-- `load` / `steady`, a few rows per transaction.  The handler `handle`,
-- subscribed with eventbus_subscribe, writes a projection row per aggregate,
-- a record per handled event and checks the order against the last version
-- it saw for that aggregate, all in the handler's own transaction.  Every
-- figure is counted from these tables afterwards (`level_stats`).

CREATE SCHEMA @S@;

-- The planned workload: per run key (level × transport, or steady), which
-- connection inserts which row, in which position.
CREATE TABLE @S@.plan (
    run_key      text NOT NULL,
    conn         int NOT NULL,
    seq          int NOT NULL,
    transport    text NOT NULL,
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    PRIMARY KEY (run_key, conn, seq)
);

-- The business table.  created_at is taken when the row is formed, just
-- before its trigger calls eventbus_publish: min(created_at) of a run is its
-- first publish.
CREATE TABLE @S@.orders (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_key      text NOT NULL,
    transport    text NOT NULL,
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    sku          text NOT NULL,
    qty          int NOT NULL,
    amount       numeric(10,2) NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX ON @S@.orders (run_key);

CREATE FUNCTION @S@.publish_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM eventbus_publish(NEW.topic, NEW.aggregate_id, 'OrderLineAdded', to_jsonb(NEW), NEW.transport);
  RETURN NULL;
END $$;
CREATE TRIGGER orders_publish AFTER INSERT ON @S@.orders
  FOR EACH ROW EXECUTE FUNCTION @S@.publish_order();

-- Consumer side.  handled has no unique constraint, so duplicates are
-- countable; projection is the read model (one row per aggregate).
CREATE TABLE @S@.handled (
    event_id     uuid NOT NULL,
    transport    text NOT NULL,
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    version      bigint NOT NULL,
    order_id     bigint,
    occurred_at  timestamptz NOT NULL,            -- envelope: clock_timestamp() in eventbus_publish
    started_at   timestamptz NOT NULL,            -- clock_timestamp() when the handler started
    handled_at   timestamptz NOT NULL DEFAULT clock_timestamp(),  -- the handler's last statement
    received_at  timestamptz                      -- envelope: when the dispatcher took the message
);
CREATE INDEX ON @S@.handled (topic);
CREATE INDEX ON @S@.handled (event_id);

CREATE TABLE @S@.projection (
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    version      bigint NOT NULL,
    lines        int NOT NULL,
    total        numeric(12,2) NOT NULL,
    updated_at   timestamptz NOT NULL,
    PRIMARY KEY (topic, aggregate_id)
);

-- Seed rows of a topic no run uses: a running system's read model is not
-- empty.  Without them the handler's look-up by primary key was planned on
-- a near-empty table, as a sequential scan, whenever statistics were taken
-- early (the vacuum before each run), and each pool worker kept that plan
-- while the table grew: 12 % of the pool's CPU in the first runs (perf).
INSERT INTO @S@.projection
SELECT 'bench.seed', 'seed-' || g, 1, 1, 0, now() FROM generate_series(1, 10000) g;

CREATE TABLE @S@.violations (
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    event_id     uuid NOT NULL,
    got          bigint NOT NULL,
    expected     bigint NOT NULL
);

-- The handler.  Order check: a first delivery of an event must carry the
-- version after the last one seen for its aggregate.  A repeated delivery
-- (same event_id seen before) is a duplicate, counted from handled, and
-- NOT an order violation.  Never raises.  The handled row is written last,
-- so its handled_at is the end of the handler's work and started_at (taken
-- on entry) its start.  The pgbench references call this same function.
CREATE FUNCTION @S@.handle(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  started timestamptz := clock_timestamp();
  prev bigint;
  dup boolean := false;
BEGIN
  SELECT p.version INTO prev FROM @S@.projection p
   WHERE p.topic = e.topic AND p.aggregate_id = e.aggregate_id FOR UPDATE;
  IF e.event_version IS DISTINCT FROM coalesce(prev, 0) + 1 THEN
    dup := EXISTS (SELECT 1 FROM @S@.handled h WHERE h.event_id = e.event_id);
    IF NOT dup THEN
      INSERT INTO @S@.violations VALUES (e.topic, e.aggregate_id, e.event_id, e.event_version, coalesce(prev, 0) + 1);
    END IF;
  END IF;
  IF NOT dup THEN
    INSERT INTO @S@.projection AS p VALUES (e.topic, e.aggregate_id, e.event_version, 1,
                                           coalesce((e.payload->>'amount')::numeric, 0), clock_timestamp())
    ON CONFLICT (topic, aggregate_id) DO UPDATE
      SET version = greatest(p.version, EXCLUDED.version), lines = p.lines + 1,
          total = p.total + EXCLUDED.total, updated_at = EXCLUDED.updated_at;
  END IF;
  INSERT INTO @S@.handled (event_id, transport, topic, aggregate_id, version, order_id, occurred_at, started_at, received_at)
  VALUES (e.event_id, e.transport, e.topic, e.aggregate_id, e.event_version, (e.payload->>'id')::bigint, e.occurred_at, started,
          e.received_at);
END $$;

-- make_plan(run_key, prefix, label, run, events, conns, transports):
-- events / 10 aggregates with 10 events each (versions 1..10), aggregate a on
-- transport transports[a mod #transports] and topic
-- <prefix>.<label>.<transport>.<1..5>.<run>; each aggregate published by one
-- connection (a mod conns), as each pgbench client of the references owns
-- its aggregates, that connection's rows shuffled.  Dealt out row by row
-- instead, the 50 aggregates of a 500-event level were shared by all four
-- connections, which then waited on each other's version row locks (held to
-- commit), a wait the references exclude by construction.  Returns the
-- topics.
CREATE FUNCTION @S@.topic_name(prefix text, label text, tr text, n int, run text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT format('%s.%s.%s.%s.%s', prefix, label, tr, n, run) $$;

CREATE FUNCTION @S@.make_plan(p_key text, p_prefix text, p_label text, p_run text, p_events int,
                              p_conns int, p_transports text[]) RETURNS SETOF text
LANGUAGE plpgsql AS $$
DECLARE
  ntr int := array_length(p_transports, 1);
  topics text[] := ARRAY(SELECT @S@.topic_name(p_prefix, p_label, tr, n, p_run)
                           FROM unnest(p_transports) tr, generate_series(1, 5) n);
BEGIN
  IF EXISTS (SELECT 1 FROM @S@.plan WHERE run_key = p_key OR topic = ANY (topics)) THEN
    RAISE EXCEPTION 'run key % or its topics are already planned: every run needs its own topics', p_key;
  END IF;
  INSERT INTO @S@.plan
  SELECT p_key, a % p_conns, rn - 1, tr,
         @S@.topic_name(p_prefix, p_label, tr, (a / ntr) % 5 + 1, p_run), 'ord-' || a
    FROM (SELECT a, p_transports[a % ntr + 1] AS tr, row_number() OVER (PARTITION BY a % p_conns ORDER BY random()) AS rn
            FROM generate_series(1, p_events / 10) a, generate_series(1, 10) v) x;
  ANALYZE @S@.plan;
  RETURN QUERY SELECT DISTINCT topic FROM @S@.plan WHERE run_key = p_key ORDER BY 1;
END $$;

-- CPU time (ns) of the calling backend, from /proc/self/schedstat (Linux;
-- the harness runs as superuser; a backend has one thread): the publishing
-- connections record theirs, since their processes may be gone when the
-- shell looks.  NULL where it cannot be read.
CREATE FUNCTION @S@.self_cpu_ns() RETURNS bigint LANGUAGE plpgsql AS $$
BEGIN
  RETURN split_part(pg_read_file('/proc/self/schedstat'), ' ', 1)::bigint;
EXCEPTION WHEN OTHERS THEN
  RETURN NULL;
END $$;

CREATE TABLE @S@.publisher_cpu (
    run_key  text NOT NULL,
    conn     int NOT NULL,
    cpu_ns   bigint                -- CPU ns of load() / steady(), start to end
);

-- The start gate.  A publishing connection starts warm and with the others,
-- as pgbench's clients do (pgbench counts from when its connections are
-- made): before its first row it inserts one row of its plan in a
-- subtransaction that it rolls back (the trigger, eventbus_publish and the
-- tables' caches load; nothing is published), says it is ready, and waits
-- until the harness opens the gate for its run (bench/lib.sh bench_go), 120 s
-- at most.
CREATE TABLE @S@.gate_ready (
    run_key  text NOT NULL,
    conn     int NOT NULL
);
CREATE TABLE @S@.gate_open (
    run_key  text PRIMARY KEY
);

CREATE PROCEDURE @S@.await_gate(p_key text, p_conn int)
LANGUAGE plpgsql AS $$
DECLARE deadline timestamptz;
BEGIN
  BEGIN
    INSERT INTO @S@.orders (run_key, transport, topic, aggregate_id, sku, qty, amount)
    SELECT p_key, transport, topic, 'warmup-' || p_conn, 'sku-0', 1, 9.99
      FROM @S@.plan WHERE run_key = p_key AND conn = p_conn ORDER BY seq LIMIT 1;
    RAISE SQLSTATE 'BW001';
  EXCEPTION WHEN SQLSTATE 'BW001' THEN
    NULL;
  END;
  INSERT INTO @S@.gate_ready VALUES (p_key, p_conn);
  COMMIT;
  deadline := clock_timestamp() + interval '120 s';
  WHILE NOT EXISTS (SELECT 1 FROM @S@.gate_open WHERE run_key = p_key) LOOP
    IF clock_timestamp() > deadline THEN
      RAISE EXCEPTION 'the start gate of run % was not opened within 120 s', p_key;
    END IF;
    PERFORM pg_sleep(0.002);
  END LOOP;
END $$;

-- load(run_key, conn, min_rows, max_rows): once the gate opens, this
-- connection's rows of the plan, as fast as it can, in transactions of
-- min..max rows.  Rows of one transaction are inserted sorted by (topic,
-- aggregate), so concurrent publishers lock aggregate versions in one
-- global order (no deadlock).
CREATE PROCEDURE @S@.load(p_key text, p_conn int, p_min int, p_max int)
LANGUAGE plpgsql AS $$
DECLARE n int; pos int := 0; sz int; t0 bigint;
BEGIN
  SELECT count(*) INTO n FROM @S@.plan WHERE run_key = p_key AND conn = p_conn;
  CALL @S@.await_gate(p_key, p_conn);
  t0 := @S@.self_cpu_ns();
  WHILE pos < n LOOP
    sz := p_min + floor(random() * (p_max - p_min + 1))::int;
    INSERT INTO @S@.orders (run_key, transport, topic, aggregate_id, sku, qty, amount)
    SELECT p_key, transport, topic, aggregate_id, 'sku-' || (seq % 97), 1 + seq % 3, 9.99 + seq % 50
      FROM @S@.plan WHERE run_key = p_key AND conn = p_conn AND seq >= pos AND seq < pos + sz
     ORDER BY topic, aggregate_id;
    COMMIT;
    pos := pos + sz;
  END LOOP;
  INSERT INTO @S@.publisher_cpu VALUES (p_key, p_conn, @S@.self_cpu_ns() - t0);
  COMMIT;
END $$;

-- steady(run_key, conn, batch, interval_s): once the gate opens, this
-- connection's rows in transactions of `batch` rows, transaction k starting
-- at start + k * interval (sleeping until then; a late transaction is not
-- made up for by a shorter sleep later, it just starts at once).
CREATE PROCEDURE @S@.steady(p_key text, p_conn int, p_batch int, p_interval float8)
LANGUAGE plpgsql AS $$
DECLARE n int; pos int := 0; k int := 0; t0 timestamptz; wait float8; c0 bigint;
BEGIN
  SELECT count(*) INTO n FROM @S@.plan WHERE run_key = p_key AND conn = p_conn;
  CALL @S@.await_gate(p_key, p_conn);
  t0 := clock_timestamp();
  c0 := @S@.self_cpu_ns();
  WHILE pos < n LOOP
    wait := extract(epoch FROM t0 + make_interval(secs => k * p_interval) - clock_timestamp());
    IF wait > 0 THEN PERFORM pg_sleep(wait); END IF;
    INSERT INTO @S@.orders (run_key, transport, topic, aggregate_id, sku, qty, amount)
    SELECT p_key, transport, topic, aggregate_id, 'sku-' || (seq % 97), 1 + seq % 3, 9.99 + seq % 50
      FROM @S@.plan WHERE run_key = p_key AND conn = p_conn AND seq >= pos AND seq < pos + p_batch
     ORDER BY topic, aggregate_id;
    COMMIT;
    pos := pos + p_batch;
    k := k + 1;
  END LOOP;
  INSERT INTO @S@.publisher_cpu VALUES (p_key, p_conn, @S@.self_cpu_ns() - c0);
  COMMIT;
END $$;

-- When each event reached its broker, read back after a run by an
-- independent client (bench/lib.sh bench_broker_times): Kafka = the
-- message timestamp (CreateTime: the dev broker, like the librdkafka mock
-- it is, keeps the producer's timestamp, set when the relay hands the
-- message to librdkafka, millisecond resolution); NATS = the time JetStream
-- stored the message.
CREATE TABLE @S@.broker_times (
    run_key   text NOT NULL,
    event_id  uuid NOT NULL,
    broker_at timestamptz,         -- NATS
    broker_ms bigint               -- Kafka: ms since the epoch
);
CREATE INDEX ON @S@.broker_times (run_key, event_id);

-- Progress samples, one row every `every` seconds while a run is measured:
-- where the events are (outbox, broker / dispatcher, pool queues, handled).
CREATE TABLE @S@.samples (
    run_key   text NOT NULL,
    t         timestamptz NOT NULL,
    published bigint,      -- business rows committed
    outbox    bigint,      -- committed events not yet acknowledged by the broker
    pool_queued bigint,    -- items queued to the pool workers
    lag       bigint,      -- subscriptions' lag (in flight + waiting in the broker)
    handled   bigint       -- handler calls committed (this run's topics)
);

-- sample(run_key, expected, timeout_s, stall_s, every_s): sample until the
-- run's handled count reaches `expected`, stops growing for stall_s, or
-- timeout_s passes.  Only detects completion; no figure is taken from when
-- it notices (the end of a run comes from the handled rows' own commit
-- timestamps).
CREATE PROCEDURE @S@.sample(p_key text, p_expected bigint, p_timeout float8, p_stall float8, p_every float8)
LANGUAGE plpgsql AS $$
DECLARE
  topics text[] := ARRAY(SELECT DISTINCT topic FROM @S@.plan WHERE run_key = p_key);
  start timestamptz := clock_timestamp(); last_change timestamptz := clock_timestamp();
  h bigint; last_h bigint := -1; pub bigint; last_pub bigint := -1;
BEGIN
  LOOP
    SELECT count(*) INTO h FROM @S@.handled WHERE topic = ANY (topics) AND aggregate_id <> 'warmup';
    SELECT count(*) INTO pub FROM @S@.orders WHERE run_key = p_key;
    WITH st AS MATERIALIZED (SELECT * FROM eventbus_status())
    INSERT INTO @S@.samples
    SELECT p_key, clock_timestamp(), pub,
           (SELECT sum(backlog) FROM st WHERE component = 'launcher' AND transport IS NOT NULL),
           (SELECT sum(backlog) FROM st WHERE component LIKE 'worker %'),
           (SELECT sum(st.backlog) FROM st JOIN eventbus.subscriptions s
                ON st.component = 'subscription ' || s.id WHERE s.topic = ANY (topics)),
           h;
    COMMIT;
    EXIT WHEN h >= p_expected;
    IF h <> last_h OR pub <> last_pub THEN last_h := h; last_pub := pub; last_change := clock_timestamp(); END IF;
    EXIT WHEN clock_timestamp() - last_change > make_interval(secs => p_stall);
    EXIT WHEN clock_timestamp() - start > make_interval(secs => p_timeout);
    PERFORM pg_sleep(p_every);
  END LOOP;
END $$;

-- Handler commit time of a handled row: the commit timestamp of the
-- transaction that wrote it when track_commit_timestamp is on, else the
-- clock at the end of the handler (a little earlier than the commit).
CREATE FUNCTION @S@.commit_ts_on() RETURNS boolean LANGUAGE sql STABLE AS
$$ SELECT current_setting('track_commit_timestamp') = 'on' $$;

-- dist(percentiles at 0.5/0.95/0.99, max) as {"p50", "p95", "p99", "max"} in
-- ms with 2 decimals; NULL when there is nothing to measure.
CREATE FUNCTION @S@.dist(a float8[], mx float8) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT CASE WHEN a IS NOT NULL THEN jsonb_build_object(
           'p50', round(a[1]::numeric, 2), 'p95', round(a[2]::numeric, 2),
           'p99', round(a[3]::numeric, 2), 'max', round(mx::numeric, 2)) END
$$;

-- level_stats(run_key): every figure of one run, counted from the tables.
-- Latency is per event, from its first handling.  With commit timestamps:
-- latency = handler transaction commit - publishing transaction commit
-- (the business row's, which is eventbus_publish's transaction), split into
-- stages (stages_ms, per transport):
--   publish_tx        occurred_at (clock in eventbus_publish) -> publish commit (not part of the latency)
--   relay             publish commit -> broker time (broker_times, when read back)
--   broker_to_handler broker time -> handler start (consumer, dispatcher, pool queue), split into
--     broker_to_dispatcher  broker time -> the dispatcher took the message (envelope.received_at):
--                           the consumer's fetch and the client library's queue
--     dispatcher_to_handler received_at -> handler start: decoding, the scheduler, the pool queue
--   to_handler        publish commit -> handler start (= relay + broker_to_handler; always there)
--   handler           handler start -> handler end (its last statement)
--   commit            handler end -> handler transaction commit (the rest of the pool's batch)
-- Without commit timestamps, latency = handler end - occurred_at.
CREATE FUNCTION @S@.level_stats(p_key text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  topics text[] := ARRAY(SELECT DISTINCT topic FROM @S@.plan WHERE run_key = p_key);
  cts boolean := @S@.commit_ts_on();
  r jsonb;
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS lv_orders (id bigint, aggregate_id text, created_at timestamptz, committed_at timestamptz);
  CREATE TEMP TABLE IF NOT EXISTS lv_handled (event_id uuid, transport text, topic text, aggregate_id text, order_id bigint,
                                             occurred_at timestamptz, started_at timestamptz, handled_at timestamptz,
                                             done_at timestamptz, received_at timestamptz, xid text);
  CREATE TEMP TABLE IF NOT EXISTS lv_broker (event_id uuid, broker_at timestamptz);
  TRUNCATE lv_orders, lv_handled, lv_broker;
  INSERT INTO lv_orders
  SELECT id, aggregate_id, created_at, CASE WHEN cts THEN pg_xact_commit_timestamp(xmin) END
    FROM @S@.orders WHERE run_key = p_key;
  INSERT INTO lv_handled
  SELECT event_id, transport, topic, aggregate_id, order_id, occurred_at, started_at, handled_at,
         CASE WHEN cts THEN pg_xact_commit_timestamp(xmin) ELSE handled_at END, received_at, xmin::text
    FROM @S@.handled WHERE topic = ANY (topics) AND aggregate_id <> 'warmup';
  INSERT INTO lv_broker
  SELECT event_id, min(coalesce(broker_at, to_timestamp(broker_ms / 1000.0)))
    FROM @S@.broker_times WHERE run_key = p_key GROUP BY event_id;
  ANALYZE lv_orders;
  ANALYZE lv_handled;
  ANALYZE lv_broker;

  WITH o AS (SELECT count(*) AS published, min(created_at) AS first_publish, max(committed_at) AS last_publish_commit
               FROM lv_orders),
       h AS (SELECT count(*) AS calls, count(DISTINCT event_id) AS distinct_events, max(done_at) AS last_handler_commit,
                    min(started_at) AS first_handler_start, count(DISTINCT xid) AS handler_transactions
               FROM lv_handled),
       d AS (SELECT count(*) AS delivered FROM lv_orders o WHERE EXISTS (SELECT 1 FROM lv_handled h WHERE h.order_id = o.id)),
       u AS (SELECT count(*) AS unexpected FROM lv_handled h WHERE NOT EXISTS (SELECT 1 FROM lv_orders o WHERE o.id = h.order_id)),
       first AS (SELECT DISTINCT ON (event_id) * FROM lv_handled ORDER BY event_id, done_at),
       lat AS (SELECT f.transport,
                      extract(epoch FROM CASE WHEN cts THEN f.done_at - o.committed_at ELSE f.done_at - f.occurred_at END) * 1000 AS total,
                      extract(epoch FROM f.done_at - f.occurred_at) * 1000 AS from_occurred,
                      extract(epoch FROM o.committed_at - f.occurred_at) * 1000 AS publish_tx,
                      extract(epoch FROM b.broker_at - o.committed_at) * 1000 AS relay,
                      extract(epoch FROM f.started_at - b.broker_at) * 1000 AS broker_to_handler,
                      extract(epoch FROM f.received_at - b.broker_at) * 1000 AS broker_to_dispatcher,
                      extract(epoch FROM f.started_at - f.received_at) * 1000 AS dispatcher_to_handler,
                      extract(epoch FROM f.started_at - o.committed_at) * 1000 AS to_handler,
                      extract(epoch FROM f.handled_at - f.started_at) * 1000 AS handler,
                      extract(epoch FROM f.done_at - f.handled_at) * 1000 AS commit,
                      b.broker_at IS NOT NULL AS has_broker
                 FROM first f LEFT JOIN lv_orders o ON o.id = f.order_id
                      LEFT JOIN lv_broker b ON b.event_id = f.event_id),
       l AS (SELECT @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total), max(total)) AS total,
                    @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY from_occurred), max(from_occurred)) AS occ,
                    count(*) FILTER (WHERE has_broker) AS with_broker, count(*) AS firsts
               FROM lat),
       lt AS (SELECT jsonb_object_agg(transport, total) AS by_tr, jsonb_object_agg(transport, stages) AS stages
                FROM (SELECT transport,
                             @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY total), max(total)) AS total,
                             jsonb_strip_nulls(jsonb_build_object(
                               'events', count(*),
                               'events_with_broker_time', count(*) FILTER (WHERE has_broker),
                               'publish_tx', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY publish_tx), max(publish_tx)),
                               'relay', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY relay), max(relay)),
                               'broker_to_handler', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY broker_to_handler), max(broker_to_handler)),
                               'broker_to_dispatcher', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY broker_to_dispatcher), max(broker_to_dispatcher)),
                               'dispatcher_to_handler', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY dispatcher_to_handler), max(dispatcher_to_handler)),
                               'to_handler', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY to_handler), max(to_handler)),
                               'handler', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY handler), max(handler)),
                               'commit', @S@.dist(percentile_cont(ARRAY[0.5, 0.95, 0.99]) WITHIN GROUP (ORDER BY commit), max(commit)))) AS stages
                        FROM lat GROUP BY transport) x),
       v AS (SELECT count(*) AS violations FROM @S@.violations WHERE topic = ANY (topics) AND aggregate_id <> 'warmup'),
       p AS (SELECT count(*) FILTER (WHERE version = 10) AS complete, count(*) AS aggs
               FROM @S@.projection WHERE topic = ANY (topics) AND aggregate_id <> 'warmup'),
       s AS (SELECT max(outbox) AS outbox, max(pool_queued) AS pool_queued, max(lag) AS lag, count(*) AS n
               FROM @S@.samples WHERE run_key = p_key)
  SELECT jsonb_build_object(
           'run_key', p_key,
           'published', o.published,
           'delivered', d.delivered,
           'delivered_pct', CASE WHEN o.published > 0 THEN round(100.0 * d.delivered / o.published, 2) END,
           'handler_calls', h.calls,
           'handler_transactions', h.handler_transactions,
           'handler_calls_per_transaction', round(h.calls::numeric / nullif(h.handler_transactions, 0), 2),
           'duplicates', h.calls - h.distinct_events,
           'unexpected', u.unexpected,
           'order_violations', v.violations,
           'aggregates_complete', p.complete,
           'aggregates_seen', p.aggs,
           'first_publish', o.first_publish,
           'last_publish_commit', o.last_publish_commit,
           'first_handler_start', h.first_handler_start,
           'last_handler_commit', h.last_handler_commit,
           'publish_s', round(extract(epoch FROM o.last_publish_commit - o.first_publish)::numeric, 3),
           'end_to_end_s', round(extract(epoch FROM h.last_handler_commit - o.first_publish)::numeric, 3),
           'handling_s', round(extract(epoch FROM h.last_handler_commit - h.first_handler_start)::numeric, 3),
           'publish_events_per_s', round(o.published / nullif(extract(epoch FROM o.last_publish_commit - o.first_publish), 0)),
           'events_per_s', round(d.delivered / nullif(extract(epoch FROM h.last_handler_commit - o.first_publish), 0)),
           'handling_events_per_s', round(d.delivered / nullif(extract(epoch FROM h.last_handler_commit - h.first_handler_start), 0)),
           'latency_ms', l.total,
           'latency_from_occurred_ms', l.occ,
           'latency_by_transport_ms', lt.by_tr,
           'stages_ms', CASE WHEN cts THEN lt.stages END,
           'broker_times_matched', l.with_broker,
           'first_deliveries', l.firsts,
           'time_source', CASE WHEN cts THEN 'commit_timestamp' ELSE 'handler_clock' END,
           'max_outbox_backlog', s.outbox, 'max_pool_queued', s.pool_queued, 'max_subscription_lag', s.lag,
           'samples', s.n,
           'publisher_cpu_ns', (SELECT sum(cpu_ns) FROM @S@.publisher_cpu WHERE run_key = p_key))
    INTO r
    FROM o, h, d, u, l, lt, v, p, s;
  RETURN r;
END $$;

-- Results of this harness run, one document per run key (level_stats plus
-- what the shell measured from /proc).
CREATE TABLE @S@.results (
    n      int GENERATED ALWAYS AS IDENTITY,
    kind   text NOT NULL,          -- 'level' | 'steady' | 'consume' | 'idle' | 'reference' | 'lifecycle'
    doc    jsonb NOT NULL
);

-- run_summary(kind, metric, higher_is_worse): one row per (transports,
-- level) of the runs of that kind (metric: a key of the run's document, or
-- a path with '.', e.g. latency_ms.p99) — the run with the median metric among its
-- repeats (all its figures from that same run; of an even number, the worse
-- of the two middle ones: the lower, or the higher when higher_is_worse),
-- plus every repeat's metric, and loss / duplicates / order violations
-- summed over all repeats.
CREATE FUNCTION @S@.run_summary(p_kind text, p_metric text, p_higher_is_worse boolean DEFAULT false)
RETURNS TABLE (n int, kind text, doc jsonb) LANGUAGE sql AS $$
  WITH runs AS (
    SELECT r.n, r.doc, r.doc->>'transports' AS tr, (r.doc->>'level')::int AS lvl,
           (r.doc #>> string_to_array(p_metric, '.'))::numeric AS m
      FROM @S@.results r WHERE r.kind = p_kind),
  ranked AS (
    SELECT runs.*, row_number() OVER (PARTITION BY tr, lvl
                                      ORDER BY CASE WHEN p_higher_is_worse THEN -m ELSE m END, runs.n) AS rn,
           count(*) OVER (PARTITION BY tr, lvl) AS cnt
      FROM runs),
  agg AS (
    SELECT tr, lvl, min(runs.n) AS n, count(*) AS repeats, min(m) AS m_min, max(m) AS m_max,
           jsonb_agg(m ORDER BY runs.n) AS m_all,
           sum((doc->>'published')::bigint) AS published, sum((doc->>'delivered')::bigint) AS delivered,
           sum((doc->>'duplicates')::bigint) AS dups, sum((doc->>'order_violations')::bigint) AS viol,
           sum((doc->>'unexpected')::bigint) AS unexpected
      FROM runs GROUP BY tr, lvl)
  SELECT a.n::int, p_kind, m.doc || jsonb_build_object(
           'repeats', a.repeats, 'figures_from', 'the repeat with the median ' || p_metric,
           p_metric || '_min', a.m_min, p_metric || '_max', a.m_max, p_metric || '_all', a.m_all,
           'all_repeats', jsonb_build_object(
               'published', a.published, 'delivered', a.delivered,
               'delivered_pct', round(100.0 * a.delivered / nullif(a.published, 0), 2),
               'duplicates', a.dups, 'order_violations', a.viol, 'unexpected', a.unexpected))
    FROM agg a JOIN ranked m ON m.tr = a.tr AND m.lvl IS NOT DISTINCT FROM a.lvl AND m.rn = (m.cnt + 1) / 2
$$;

-- combine_bursts(transports, level, repeat): one repeat of a short level
-- from its bursts (results of kind level_burst).  A burst lasts a few tenths
-- of a second, and this VM's CPU runs at two speeds that alternate within
-- a second (see bench/run.sh), so a short level runs several bursts per
-- repeat, one after the other, each from its own gate with its own topics
-- and aggregates, and the repeat's events/s is all its events over the sum
-- of its bursts' windows, as pgbench counts its whole run.  Counts, windows
-- and CPU seconds are summed, the rates derived from the sums, memory is the
-- largest per process; latency and stages are those of the burst with the
-- median events/s (a burst's window, not pooled).
CREATE FUNCTION @S@.combine_bursts(p_tr text, p_level int, p_repeat int) RETURNS jsonb LANGUAGE sql AS $$
  WITH b AS (
    SELECT n, doc FROM @S@.results
     WHERE kind = 'level_burst' AND doc->>'transports' = p_tr
       AND (doc->>'level')::int = p_level AND (doc->>'repeat')::int = p_repeat),
  med AS (
    SELECT doc FROM b ORDER BY (doc->>'events_per_s')::numeric, n
    OFFSET (SELECT (count(*) - 1) / 2 FROM b) LIMIT 1),
  s AS (
    SELECT count(*) AS bursts,
           jsonb_agg((doc->>'events_per_s')::numeric ORDER BY n) AS eps_all,
           jsonb_agg(doc->'run_key' ORDER BY n) AS keys,
           sum((doc->>'published')::numeric) AS published, sum((doc->>'delivered')::numeric) AS delivered,
           sum((doc->>'duplicates')::numeric) AS duplicates, sum((doc->>'order_violations')::numeric) AS violations,
           sum((doc->>'unexpected')::numeric) AS unexpected, sum((doc->>'handler_calls')::numeric) AS calls,
           sum((doc->>'handler_transactions')::numeric) AS htx, sum((doc->>'first_deliveries')::numeric) AS firsts,
           sum((doc->>'relay_rounds')::numeric) AS rounds, sum((doc->>'aggregates')::numeric) AS aggregates,
           sum((doc->>'aggregates_seen')::numeric) AS aggs_seen, sum((doc->>'aggregates_complete')::numeric) AS aggs_complete,
           sum((doc->>'publisher_cpu_ns')::numeric) AS pub_ns, sum((doc->>'samples')::numeric) AS samples,
           sum((doc->>'end_to_end_s')::numeric) AS e2e_s, sum((doc->>'publish_s')::numeric) AS publish_s,
           sum((doc->>'handling_s')::numeric) AS handling_s,
           max((doc->>'max_outbox_backlog')::numeric) AS outbox, max((doc->>'max_pool_queued')::numeric) AS pool_queued,
           max((doc->>'max_subscription_lag')::numeric) AS lag
      FROM b),
  cpu AS (
    SELECT jsonb_object_agg(k, v) AS c
      FROM (SELECT e.key AS k, round(sum(e.value::numeric), 4) AS v
              FROM b, jsonb_each_text(b.doc->'cpu_s') e
             WHERE e.key <> 'steal_pct' AND jsonb_typeof(b.doc->'cpu_s'->e.key) = 'number'
             GROUP BY e.key) x),
  mem AS (
    SELECT jsonb_object_agg(k, v) AS m
      FROM (SELECT DISTINCT ON (e.key) e.key AS k, e.value AS v
              FROM b, jsonb_each(b.doc->'memory_max') e
             ORDER BY e.key, coalesce((e.value->>'own_mib')::numeric, (e.value->>'uss_mib')::numeric) DESC NULLS LAST) x)
  SELECT med.doc || jsonb_build_object(
           'run_key', p_tr || '.' || p_level || '.' || p_repeat,
           'bursts', s.bursts, 'burst_run_keys', s.keys, 'burst_events_per_s', s.eps_all,
           'pooled', 'events/s = all bursts'' events / the sum of their windows; latency and stages: the burst with the median events/s',
           'published', s.published, 'delivered', s.delivered,
           'delivered_pct', round(100.0 * s.delivered / nullif(s.published, 0), 2),
           'duplicates', s.duplicates, 'order_violations', s.violations, 'unexpected', s.unexpected,
           'handler_calls', s.calls, 'handler_transactions', s.htx,
           'handler_calls_per_transaction', round(s.calls / nullif(s.htx, 0), 2),
           'first_deliveries', s.firsts, 'relay_rounds', s.rounds,
           'events_per_relay_round', round(s.published / nullif(s.rounds, 0), 1),
           'aggregates', s.aggregates, 'aggregates_seen', s.aggs_seen, 'aggregates_complete', s.aggs_complete,
           'publisher_cpu_ns', s.pub_ns, 'samples', s.samples,
           'end_to_end_s', s.e2e_s, 'publish_s', s.publish_s, 'handling_s', s.handling_s,
           'events_per_s', round(s.delivered / nullif(s.e2e_s, 0)),
           'publish_events_per_s', round(s.published / nullif(s.publish_s, 0)),
           'handling_events_per_s', round(s.delivered / nullif(s.handling_s, 0)),
           'max_outbox_backlog', s.outbox, 'max_pool_queued', s.pool_queued, 'max_subscription_lag', s.lag,
           'cpu_s', cpu.c || jsonb_build_object('steal_pct',
                      round(100 * (cpu.c->>'steal')::numeric / nullif((cpu.c->>'machine_capacity')::numeric, 0), 1)),
           'memory_max', mem.m)
    FROM med, s, cpu, mem
$$;

CREATE FUNCTION @S@.level_summary() RETURNS TABLE (n int, kind text, doc jsonb) LANGUAGE sql AS $$
  SELECT * FROM @S@.run_summary('level', 'events_per_s')
$$;

-- cpu_per_event(run doc): CPU µs per delivered event per process group.
CREATE FUNCTION @S@.cpu_per_event(d jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $$
  SELECT jsonb_strip_nulls(jsonb_build_object(
           'publishers', round(1e6 * (c->>'publishers')::numeric / e),
           'relay', round(1e6 * (c->>'launcher')::numeric / e),
           'dispatcher', round(1e6 * (c->>'dispatcher')::numeric / e),
           'pool', round(1e6 * (c->>'workers')::numeric / e),
           'eventbus', round(1e6 * ((c->>'launcher')::numeric + (c->>'dispatcher')::numeric + (c->>'workers')::numeric) / e),
           'nats_server', round(1e6 * (c->>'nats_server')::numeric / e),
           'devbroker', round(1e6 * (c->>'devbroker')::numeric / e),
           'other_postgres', round(1e6 * (c->>'other_postgres')::numeric / e),
           'machine_busy', round(1e6 * (c->>'machine_busy')::numeric / e),
           'steal_pct', c->'steal_pct'))
    FROM (SELECT d->'cpu_s' AS c, nullif((d->>'delivered')::numeric, 0) AS e) x
$$;

-- memory_summary(): per eventbus process (launcher, dispatcher, worker N),
-- the largest own memory (USS without the pages of PostgreSQL's main shared
-- memory segment that no other live process maps), USS, shared-segment part
-- of USS, PSS and RSS sampled in any run of this harness run, and the run of
-- the largest own memory.
CREATE FUNCTION @S@.memory_summary() RETURNS jsonb LANGUAGE sql AS $$
  SELECT jsonb_object_agg(proc, jsonb_build_object('own_mib', own, 'uss_mib', uss, 'shm_private_mib', shm,
                                                   'pss_mib', pss, 'rss_mib', rss, 'own_run', run))
    FROM (SELECT DISTINCT ON (m.key) m.key AS proc,
                 coalesce((m.value->>'own_mib')::numeric, (m.value->>'uss_mib')::numeric) AS own,
                 max((m.value->>'uss_mib')::numeric) OVER (PARTITION BY m.key) AS uss,
                 max((m.value->>'shm_private_mib')::numeric) OVER (PARTITION BY m.key) AS shm,
                 max((m.value->>'pss_mib')::numeric) OVER (PARTITION BY m.key) AS pss,
                 max((m.value->>'rss_mib')::numeric) OVER (PARTITION BY m.key) AS rss,
                 r.doc->>'run_key' AS run
            FROM @S@.results r, jsonb_each(r.doc->'memory_max') m
           WHERE r.kind IN ('level', 'level_tx50', 'steady', 'consume')
           ORDER BY m.key, coalesce((m.value->>'own_mib')::numeric, (m.value->>'uss_mib')::numeric) DESC) x
$$;

-- The references (bench/lib.sh bench_ref_* run pgbench on these and on the
-- handler above): the same rows eventbus writes, without eventbus.  Publish:
-- business row + version bump + outbox row per event; relay: delete the sent
-- outbox rows; consume: inbox row + the handler (projection row, handled
-- record) per event.  ref_seq_N numbers the events of pgbench client N.
CREATE TABLE @S@.ref_orders (LIKE @S@.orders INCLUDING ALL);
CREATE TABLE @S@.ref_versions (LIKE eventbus.aggregate_versions INCLUDING ALL);
CREATE TABLE @S@.ref_outbox (LIKE eventbus.outbox INCLUDING ALL);
CREATE TABLE @S@.ref_inbox (LIKE eventbus.inbox INCLUDING ALL);

-- ref_median(kind): of the reference runs of one kind (one per repeat), the
-- one with the median events/s (of two, the faster: the stricter target),
-- with every run's events/s beside it.
CREATE FUNCTION @S@.ref_median(p_kind text) RETURNS jsonb LANGUAGE sql AS $$
  SELECT d.doc || jsonb_build_object('runs', a.cnt, 'events_per_s_all', a.vals, 'steal_pct_all', a.steal,
                                     'figure_from', 'the run with the median events_per_s')
    FROM (SELECT count(*) AS cnt, jsonb_agg((doc->>'events_per_s')::numeric ORDER BY n) AS vals,
                 jsonb_agg(doc->'steal_pct' ORDER BY n) AS steal
            FROM @S@.results WHERE kind = p_kind) a,
         LATERAL (SELECT doc FROM @S@.results WHERE kind = p_kind
                   ORDER BY (doc->>'events_per_s')::numeric, n OFFSET a.cnt / 2 LIMIT 1) d
$$;

-- ratio_met(value, reference, target): value >= target x reference, judged
-- on the exact quotient (a ratio shown rounded, 0.60, may be 0.5986).
CREATE FUNCTION @S@.ratio_met(p_value numeric, p_reference numeric, p_target numeric) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
  SELECT p_reference > 0 AND p_value >= p_target * p_reference
$$;

-- end_to_end_summary(kind, reference): the median repeat of each end-to-end
-- level of one kind, with its ratio to the reference and its CPU per event.
-- Where the runs have a paired reference (pgbench run right after each of
-- them, bench/run.sh), a run's ratio is to its own reference and the median
-- repeat is the one with the median ratio; otherwise (the 50-row runs) the
-- ratio is to the given reference and the median repeat is by events/s.
CREATE FUNCTION @S@.end_to_end_summary(p_kind text, p_ref numeric) RETURNS jsonb LANGUAGE sql AS $$
  WITH paired AS (SELECT EXISTS (SELECT 1 FROM @S@.results WHERE kind = p_kind AND doc ? 'paired_ratio') AS yes)
  SELECT coalesce(jsonb_agg(doc || jsonb_build_object(
                    'ratio_to_reference', coalesce(doc->'paired_ratio', to_jsonb(round((doc->>'events_per_s')::numeric / nullif(p_ref, 0), 3))),
                    'reference_events_per_s', coalesce(doc->'paired_reference_events_per_s', to_jsonb(p_ref)),
                    'events_per_s_min', e.mn, 'events_per_s_max', e.mx, 'events_per_s_all', e.al,
                    'cpu_us_per_event', @S@.cpu_per_event(doc)) ORDER BY n), '[]')
    FROM paired,
         LATERAL @S@.run_summary(p_kind, CASE WHEN paired.yes THEN 'paired_ratio' ELSE 'events_per_s' END) s,
         LATERAL (SELECT min((r.doc->>'events_per_s')::numeric) AS mn, max((r.doc->>'events_per_s')::numeric) AS mx,
                         jsonb_agg((r.doc->>'events_per_s')::numeric ORDER BY r.n) AS al
                    FROM @S@.results r
                   WHERE r.kind = p_kind AND r.doc->>'transports' = s.doc->>'transports'
                     AND (r.doc->>'level')::int = (s.doc->>'level')::int) e
$$;

-- report(meta): the harness run's report as one JSON document (what
-- bench/run.sh writes to bench/results/latest.json): meta (machine, config,
-- method, lifecycle...) plus every figure and each target next to its figure.
CREATE FUNCTION @S@.report(p_meta jsonb) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  c1 numeric := (@S@.ref_median('ref_consume_1')->>'events_per_s')::numeric;
  c50 numeric := (@S@.ref_median('ref_consume_50')->>'events_per_s')::numeric;
  e50 numeric := (@S@.ref_median('ref_end_to_end_50')->>'events_per_s')::numeric;
  levels jsonb; levels50 jsonb; consume jsonb; steady jsonb; mem jsonb; idle jsonb; idle_lp jsonb; integrity jsonb; cpu jsonb; targets jsonb;
  steal jsonb;
BEGIN
  levels := @S@.end_to_end_summary('level', e50);
  levels50 := @S@.end_to_end_summary('level_tx50', e50);
  SELECT jsonb_agg(doc || jsonb_build_object(
                     'ratio_to_pgbench_50_per_tx', round((doc->>'handling_events_per_s')::numeric / nullif(c50, 0), 3),
                     'ratio_to_pgbench_1_per_tx', round((doc->>'handling_events_per_s')::numeric / nullif(c1, 0), 3),
                     'cpu_us_per_event', @S@.cpu_per_event(doc)) ORDER BY n)
    INTO consume FROM @S@.run_summary('consume', 'handling_events_per_s');
  SELECT jsonb_object_agg(s.doc->>'transports', s.doc || jsonb_build_object(
           'cpu_us_per_event', @S@.cpu_per_event(s.doc),
           'latency_all', (SELECT jsonb_agg(jsonb_build_object('repeat', r.doc->'repeat', 'p50_ms', r.doc#>'{latency_ms,p50}',
                                                               'p99_ms', r.doc#>'{latency_ms,p99}', 'steal_pct', r.doc#>'{cpu_s,steal_pct}')
                                            ORDER BY r.n)
                             FROM @S@.results r WHERE r.kind = 'steady' AND r.doc->>'transports' = s.doc->>'transports')))
    INTO steady FROM @S@.run_summary('steady', 'latency_ms.p99', true) s;
  mem := @S@.memory_summary();
  SELECT doc INTO idle FROM @S@.results WHERE kind = 'idle' ORDER BY n DESC LIMIT 1;
  SELECT doc INTO idle_lp FROM @S@.results WHERE kind = 'idle_long_poll' ORDER BY n DESC LIMIT 1;
  SELECT jsonb_object_agg(tr, jsonb_build_object(
           'runs', runs, 'published', pub, 'delivered', del,
           'delivered_pct', round(100.0 * del / nullif(pub, 0), 3), 'duplicates', dups,
           'order_violations', viol, 'unexpected', unexp,
           'met', pub > 0 AND del = pub AND dups = 0 AND viol = 0 AND unexp = 0))
    INTO integrity
    FROM (SELECT doc->>'transports' AS tr, count(*) AS runs, sum((doc->>'published')::bigint) AS pub,
                 sum((doc->>'delivered')::bigint) AS del, sum((doc->>'duplicates')::bigint) AS dups,
                 sum((doc->>'order_violations')::bigint) AS viol, sum((doc->>'unexpected')::bigint) AS unexp
            FROM @S@.results WHERE kind IN ('level', 'level_tx50', 'steady', 'consume') GROUP BY 1) x;
  SELECT jsonb_agg(jsonb_build_object('run', r.k, 'transports', r.d->>'transports', 'delivered', r.d->'delivered')
                   || @S@.cpu_per_event(r.d) ORDER BY r.o)
    INTO cpu
    FROM (SELECT 0 AS o, 'steady ' || (doc->>'rate') || '/s' AS k, doc AS d FROM @S@.run_summary('steady', 'latency_ms.p99', true)
          UNION ALL SELECT 1, 'level ' || (doc->>'level'), doc FROM @S@.run_summary('level', 'events_per_s')
          UNION ALL SELECT 1, 'level ' || (doc->>'level') || ' 50/tx', doc FROM @S@.run_summary('level_tx50', 'events_per_s')
          UNION ALL SELECT 2, 'consume ' || (doc->>'level'), doc FROM @S@.run_summary('consume', 'handling_events_per_s')) r;
  -- CPU time the hypervisor gave to other guests during the measured runs:
  -- on a shared virtual machine it delays every process, so timings from
  -- runs with steal and without are not comparable.
  SELECT jsonb_build_object('runs', count(*),
           'median_pct', round((percentile_cont(0.5) WITHIN GROUP (ORDER BY (doc#>>'{cpu_s,steal_pct}')::numeric))::numeric, 1),
           'max_pct', max((doc#>>'{cpu_s,steal_pct}')::numeric),
           'latency_runs_pct', (SELECT coalesce(jsonb_object_agg(tr, pct), '{}')
                                  FROM (SELECT doc->>'transports' AS tr, jsonb_agg(doc#>'{cpu_s,steal_pct}' ORDER BY n) AS pct
                                          FROM @S@.results WHERE kind = 'steady' AND doc#>'{cpu_s,steal_pct}' IS NOT NULL
                                         GROUP BY 1) x),
           'references_max_pct', (SELECT max((doc->>'steal_pct')::numeric) FROM @S@.results
                                   WHERE kind IN ('ref_consume_1', 'ref_consume_50', 'ref_end_to_end_50')))
    INTO steal
    FROM @S@.results WHERE kind IN ('level', 'level_tx50', 'steady', 'consume') AND doc#>'{cpu_s,steal_pct}' IS NOT NULL;
  consume := coalesce(consume, '[]');
  steady := coalesce(steady, '{}');
  cpu := coalesce(cpu, '[]');
  targets := jsonb_build_object(
    'latency', (SELECT jsonb_object_agg(k, jsonb_build_object(
                   'p50_ms', v#>'{latency_ms,p50}', 'p99_ms', v#>'{latency_ms,p99}', 'p50_target_ms', 10, 'p99_target_ms', 25,
                   'met', (v#>>'{latency_ms,p50}')::numeric <= 10 AND (v#>>'{latency_ms,p99}')::numeric <= 25))
                  FROM jsonb_each(steady) e (k, v)),
    'consume', (SELECT jsonb_object_agg(c->>'transports', jsonb_build_object(
                   'events_per_s', c->'handling_events_per_s', 'pgbench_handler_50_per_tx', c50, 'pgbench_handler_1_per_tx', c1,
                   'ratio_to_50_per_tx', c->'ratio_to_pgbench_50_per_tx', 'ratio_to_1_per_tx', c->'ratio_to_pgbench_1_per_tx',
                   'target_ratio', 0.85, 'met', @S@.ratio_met((c->>'handling_events_per_s')::numeric, c50, 0.85)))
                  FROM jsonb_array_elements(consume) c),
    -- Judged on every level: the figure shown is the transport's lowest
    -- ratio (each run against its paired reference where it has one).
    'end_to_end', (SELECT jsonb_object_agg(tr, jsonb_build_object(
                   'level', w->'level', 'events_per_s', w->'events_per_s',
                   'pgbench_all_writes_50_per_tx', w->'reference_events_per_s', 'paired', w ? 'paired_ratio',
                   'ratio', w->'ratio_to_reference', 'ratios_by_level', by_level, 'target_ratio', 0.6,
                   'met', @S@.ratio_met((w->>'events_per_s')::numeric, (w->>'reference_events_per_s')::numeric, 0.6)))
                  FROM (SELECT l->>'transports' AS tr,
                               (array_agg(l ORDER BY (l->>'ratio_to_reference')::numeric, (l->>'level')::int))[1] AS w,
                               jsonb_object_agg(l->>'level', l->'ratio_to_reference') AS by_level
                          FROM jsonb_array_elements(levels) l GROUP BY 1) x),
    -- Information, not a target: the publishing transactions as large as the
    -- reference's (50 events), so that both sides do the same transactions.
    'end_to_end_50_per_tx', (SELECT jsonb_object_agg(l->>'transports', jsonb_build_object(
                   'level', l->'level', 'events_per_s', l->'events_per_s', 'pgbench_all_writes_50_per_tx', e50,
                   'ratio', l->'ratio_to_reference'))
                  FROM jsonb_array_elements(levels50) l),
    'memory', (SELECT jsonb_build_object('largest_own_mib', max((v->>'own_mib')::numeric),
                                         'largest_uss_mib', max((v->>'uss_mib')::numeric), 'largest_pss_mib', max((v->>'pss_mib')::numeric),
                                         'target_own_mib', 32, 'met', max((v->>'own_mib')::numeric) <= 32)
                 FROM jsonb_each(mem) e (k, v)),
    'idle', jsonb_build_object('eventbus_pct_core', coalesce(idle_lp, idle)->'eventbus_pct_core', 'target_pct_core', 1,
                               'measured_with', coalesce(idle_lp, idle)->'kafka_properties',
                               'dev_stack_eventbus_pct_core', idle->'eventbus_pct_core',
                               'met', (coalesce(idle_lp, idle)->>'eventbus_pct_core')::numeric < 1),
    'integrity', integrity);
  RETURN p_meta || jsonb_build_object(
    'targets', targets,
    'latency', steady,
    'levels', levels,
    'levels_50_per_tx', levels50,
    'runs', (SELECT jsonb_agg(doc ORDER BY n) FROM @S@.results WHERE kind = 'level'),
    'consume', consume,
    'consume_runs', (SELECT jsonb_agg(doc ORDER BY n) FROM @S@.results WHERE kind = 'consume'),
    'references', jsonb_build_object(
        'handler_1_per_tx', @S@.ref_median('ref_consume_1'),
        'handler_50_per_tx', @S@.ref_median('ref_consume_50'),
        'all_writes_50_per_tx', @S@.ref_median('ref_end_to_end_50')),
    'memory_max', mem,
    'idle', idle,
    'idle_long_poll', idle_lp,
    'cpu_us_per_event', cpu,
    'steal', steal);
END $$;

-- report_text(report): the tables `make bench` prints, from the report
-- document (so the printout and latest.json cannot disagree).
CREATE FUNCTION @S@.report_text(r jsonb) RETURNS SETOF text LANGUAGE plpgsql AS $$
DECLARE
  trs text[] := ARRAY(SELECT DISTINCT k FROM (SELECT jsonb_object_keys(r->'latency') AS k
                                               UNION SELECT l->>'transports' FROM jsonb_array_elements(coalesce(r->'levels', '[]')) l
                                               UNION SELECT c->>'transports' FROM jsonb_array_elements(coalesce(r->'consume', '[]')) c) x
                      WHERE k IS NOT NULL ORDER BY 1);
  t jsonb := r->'targets';
  tr text; line text; x jsonb; k text; v jsonb;
BEGIN
  -- How much CPU the hypervisor took: figures under steal are not comparable.
  IF (r#>>'{steal,runs}')::int > 0 THEN
    RETURN NEXT format('CPU stolen by the hypervisor during the measured runs: median %s %%, max %s %% (latency runs: %s; references: max %s %%)%s',
                       r#>>'{steal,median_pct}', r#>>'{steal,max_pct}',
                       coalesce((SELECT string_agg(format('%s %s %%', e.tr,
                                                          (SELECT string_agg(p, '/') FROM jsonb_array_elements_text(e.pct) p)),
                                                   ', ' ORDER BY e.tr)
                                   FROM jsonb_each(r#>'{steal,latency_runs_pct}') e (tr, pct)), '-'),
                       coalesce(r#>>'{steal,references_max_pct}', '-'),
                       CASE WHEN greatest((r#>>'{steal,max_pct}')::numeric, (r#>>'{steal,references_max_pct}')::numeric) > 5
                            THEN ' -- a shared machine: timings are not comparable with runs made without steal' ELSE '' END);
    RETURN NEXT '';
  END IF;
  -- Targets
  RETURN NEXT format('%-48s', 'TARGETS') || (SELECT string_agg(format('%-27s', tt), '') FROM unnest(trs) tt) || 'target';
  line := format('%-48s', 'latency p50 / p99 ms (' || coalesce(r#>>'{config,steady_rate}', '?') || '/s, commit->commit)');
  FOREACH tr IN ARRAY trs LOOP
    x := t#>ARRAY['latency', tr];
    line := line || format('%-27s', CASE WHEN x IS NULL THEN '-' ELSE
              format('%s / %s %s', x->>'p50_ms', x->>'p99_ms', CASE WHEN (x->>'met')::boolean THEN 'ok' ELSE 'MISSED' END) END);
  END LOOP;
  RETURN NEXT line || '<= 10 / <= 25';
  line := format('%-48s', 'consume events/s (' || coalesce(r#>>'{config,consume_events}', '?') || ' in the broker)');
  FOREACH tr IN ARRAY trs LOOP
    x := t#>ARRAY['consume', tr];
    line := line || format('%-27s', CASE WHEN x IS NULL THEN '-' ELSE
              format('%s = %sx %s', to_char((x->>'events_per_s')::numeric, 'FM999,999,990'), x->>'ratio_to_50_per_tx',
                     CASE WHEN (x->>'met')::boolean THEN 'ok' ELSE 'MISSED' END) END);
  END LOOP;
  RETURN NEXT line || format('>= 0.85 x pgbench handler 50/tx (%s/s; 1/tx: %s/s)',
                             to_char((r#>>'{references,handler_50_per_tx,events_per_s}')::numeric, 'FM999,999,990'),
                             to_char((r#>>'{references,handler_1_per_tx,events_per_s}')::numeric, 'FM999,999,990'));
  line := format('%-48s', 'end to end events/s, the lowest level (@ level)');
  FOREACH tr IN ARRAY trs LOOP
    x := t#>ARRAY['end_to_end', tr];
    line := line || format('%-27s', CASE WHEN x IS NULL THEN '-' ELSE
              format('%s = %sx %s @%s', to_char((x->>'events_per_s')::numeric, 'FM999,999,990'), x->>'ratio',
                     CASE WHEN (x->>'met')::boolean THEN 'ok' ELSE 'MISSED' END, x->>'level') END);
  END LOOP;
  RETURN NEXT line || CASE WHEN (t#>>ARRAY['end_to_end', trs[1], 'paired'])::boolean
                      THEN format('>= 0.6 x pgbench all writes 50/tx, each run against the one right after it (median %s/s)',
                                  to_char((r#>>'{references,all_writes_50_per_tx,events_per_s}')::numeric, 'FM999,999,990'))
                      ELSE format('>= 0.6 x pgbench all writes 50/tx (%s/s)',
                                  to_char((r#>>'{references,all_writes_50_per_tx,events_per_s}')::numeric, 'FM999,999,990')) END;
  IF jsonb_array_length(coalesce(r->'levels_50_per_tx', '[]')) > 0 THEN
    line := format('%-48s', '  the same, 50 rows per publishing tx (info)');
    FOREACH tr IN ARRAY trs LOOP
      x := t#>ARRAY['end_to_end_50_per_tx', tr];
      line := line || format('%-27s', CASE WHEN x IS NULL THEN '-' ELSE
                format('%s = %sx', to_char((x->>'events_per_s')::numeric, 'FM999,999,990'), x->>'ratio') END);
    END LOOP;
    RETURN NEXT line || '(publishing transactions as large as the reference''s)';
  END IF;
  line := format('%-48s', 'delivered / duplicates / order, all runs');
  FOREACH tr IN ARRAY trs LOOP
    x := t#>ARRAY['integrity', tr];
    line := line || format('%-27s', CASE WHEN x IS NULL THEN '-' ELSE
              format('%s%% / %s / %s %s', x->>'delivered_pct', x->>'duplicates', x->>'order_violations',
                     CASE WHEN (x->>'met')::boolean THEN 'ok' ELSE 'MISSED' END) END);
  END LOOP;
  RETURN NEXT line || '100 % / 0 / 0';
  RETURN NEXT format('%-48s%s', 'largest own / USS / PSS MiB of a process',
                     format('%s / %s / %s %s (per process below)', t#>>'{memory,largest_own_mib}', t#>>'{memory,largest_uss_mib}',
                            t#>>'{memory,largest_pss_mib}', CASE WHEN (t#>>'{memory,met}')::boolean THEN 'ok' ELSE 'MISSED' END))
                 || repeat(' ', greatest(2, 27 * coalesce(array_length(trs, 1), 0) - 43)) || 'own <= 32 each';
  IF jsonb_typeof(r->'idle_long_poll') = 'object' THEN
  RETURN NEXT format('%-48s%s', 'idle CPU, % of one core (fetch.wait.max.ms=500)',
                     format('eventbus %s %% %s (nats-server %s %%, devbroker %s %%; subscriptions %s)',
                            r#>>'{idle_long_poll,eventbus_pct_core}',
                            CASE WHEN (t#>>'{idle,met}')::boolean THEN 'ok' ELSE 'MISSED' END,
                            r#>>'{idle_long_poll,nats_server_pct_core}', r#>>'{idle_long_poll,devbroker_pct_core}',
                            r#>>'{idle_long_poll,subscriptions}'))
                 || '  target < 1 %';
  END IF;
  RETURN NEXT format('%-48s%s', 'idle CPU, % of one core (dev stack settings)',
                     format('eventbus %s %%%s (nats-server %s %%, devbroker %s %%; subscriptions %s)', r#>>'{idle,eventbus_pct_core}',
                            CASE WHEN jsonb_typeof(r->'idle_long_poll') = 'object' THEN ''
                                 WHEN (t#>>'{idle,met}')::boolean THEN ' ok' ELSE ' MISSED' END,
                            r#>>'{idle,nats_server_pct_core}', r#>>'{idle,devbroker_pct_core}', r#>>'{idle,subscriptions}'))
                 || CASE WHEN jsonb_typeof(r->'idle_long_poll') = 'object' THEN '  (an idle consumer''s empty fetches end after fetch.wait.max.ms)'
                         ELSE '  target < 1 %' END;
  RETURN NEXT '';

  -- Latency stages
  RETURN NEXT format('LATENCY at %s events/s for %s s, each transport alone, the repeat with the median p99 of %s; per event, ms, p50 / p99 (max):',
                     r#>>'{config,steady_rate}', r#>>'{config,steady_duration_s}', coalesce(r#>>'{config,latency_repeats}', '1'));
  RETURN NEXT format('%-10s %6s | %-22s | %-18s %-18s %-18s %-18s %-18s | %-18s %-14s %s', 'transport', 'events', 'commit -> commit',
                     'relay', 'broker -> dispatcher', 'dispatcher -> handler', 'handler', 'commit', 'occurred -> commit', 'publish tx', 'broker times');
  FOR k, v IN SELECT * FROM jsonb_each(r->'latency') ORDER BY 1 LOOP
    x := v#>ARRAY['stages_ms', k];
    RETURN NEXT format('%-10s %6s | %-22s | %-18s %-18s %-18s %-18s %-18s | %-18s %-14s %s/%s', k, v->>'delivered',
                       format('%s / %s (%s)', v#>>'{latency_ms,p50}', v#>>'{latency_ms,p99}', v#>>'{latency_ms,max}'),
                       format('%s / %s', x#>>'{relay,p50}', x#>>'{relay,p99}'),
                       format('%s / %s', x#>>'{broker_to_dispatcher,p50}', x#>>'{broker_to_dispatcher,p99}'),
                       format('%s / %s', x#>>'{dispatcher_to_handler,p50}', x#>>'{dispatcher_to_handler,p99}'),
                       format('%s / %s', x#>>'{handler,p50}', x#>>'{handler,p99}'),
                       format('%s / %s', x#>>'{commit,p50}', x#>>'{commit,p99}'),
                       format('%s / %s', v#>>'{latency_from_occurred_ms,p50}', v#>>'{latency_from_occurred_ms,p99}'),
                       format('%s / %s', x#>>'{publish_tx,p50}', x#>>'{publish_tx,p99}'),
                       v->>'broker_times_matched', v->>'first_deliveries');
  END LOOP;
  FOR k, v IN SELECT * FROM jsonb_each(r->'latency') ORDER BY 1 LOOP
    RETURN NEXT format('  %s, every repeat, p50 / p99 ms (steal %%): %s', k,
                       (SELECT string_agg(format('%s / %s (%s)', e->>'p50_ms', e->>'p99_ms', coalesce(e->>'steal_pct', '-')), ', ')
                          FROM jsonb_array_elements(coalesce(v->'latency_all', '[]')) e));
  END LOOP;
  RETURN NEXT '';

  -- End to end
  RETURN NEXT 'END TO END (trigger publish -> handler commit), median of the repeats; 1-5 rows per publishing transaction, * 50 rows;';
  RETURN NEXT '  RxBxN: R repeats of B bursts of N events, a repeat''s events/s = its events / the sum of its bursts'' windows;';
  RETURN NEXT '  ref/s: pgbench all writes 50/tx run right after the repeat (x ref = events/s / ref/s; the median repeat by x ref);';
  RETURN NEXT '  50-row runs (*) against the median reference:';
  RETURN NEXT format('%-6s %-10s %10s %9s %4s %5s %9s %13s %6s %6s %9s %7s %8s %7s %7s %7s %7s', 'level', 'transport', 'events',
                     'delivered', 'dup', 'order', 'events/s', '(min-max)', 'ref/s', 'x ref', 'publish/s', 'pool tx', 'relay rd', 'p50 ms', 'p95 ms', 'p99 ms', 'max ms');
  FOR x IN SELECT l FROM jsonb_array_elements(coalesce(r->'levels', '[]') || coalesce(r->'levels_50_per_tx', '[]')) l LOOP
    RETURN NEXT format('%-6s %-10s %10s %8s%% %4s %5s %9s %13s %6s %6s %9s %7s %8s %7s %7s %7s %7s',
                       (x->>'level') || CASE WHEN x->>'rows_per_tx' = '50-50' THEN '*' ELSE '' END, x->>'transports',
                       (x->>'repeats') || 'x' || CASE WHEN x ? 'bursts' THEN (x->>'bursts') || 'x' || (x->>'level') ELSE x->>'published' END,
                       x#>>'{all_repeats,delivered_pct}', x#>>'{all_repeats,duplicates}', x#>>'{all_repeats,order_violations}',
                       x->>'events_per_s', '(' || (x->>'events_per_s_min') || '-' || (x->>'events_per_s_max') || ')',
                       x->>'reference_events_per_s', x->>'ratio_to_reference', x->>'publish_events_per_s', x->>'handler_calls_per_transaction',
                       coalesce(x->>'events_per_relay_round', '-'), x#>>'{latency_ms,p50}', x#>>'{latency_ms,p95}', x#>>'{latency_ms,p99}', x#>>'{latency_ms,max}');
  END LOOP;
  RETURN NEXT '';

  -- Consume
  RETURN NEXT 'CONSUME SIDE (events in the broker before subscribing; first handler start -> last handler commit), median of the repeats:';
  RETURN NEXT format('%-10s %10s %5s %9s %4s %5s %9s %13s %8s %8s %9s', 'transport', 'events', 'parts', 'delivered', 'dup', 'order',
                     'events/s', '(min-max)', 'x 50/tx', 'x 1/tx', 'startup s');
  FOR x IN SELECT c FROM jsonb_array_elements(coalesce(r->'consume', '[]')) c LOOP
    RETURN NEXT format('%-10s %10s %5s %8s%% %4s %5s %9s %13s %8s %8s %9s', x->>'transports', (x->>'repeats') || 'x' || (x->>'published'),
                       CASE WHEN x->>'transports' = 'kafka' THEN x->>'kafka_partitions' ELSE '-' END,
                       x#>>'{all_repeats,delivered_pct}', x#>>'{all_repeats,duplicates}', x#>>'{all_repeats,order_violations}',
                       x->>'handling_events_per_s',
                       '(' || (x->>'handling_events_per_s_min') || '-' || (x->>'handling_events_per_s_max') || ')',
                       x->>'ratio_to_pgbench_50_per_tx', x->>'ratio_to_pgbench_1_per_tx', x->>'startup_s');
  END LOOP;
  RETURN NEXT format('references (pgbench, %s clients, %s s each, median of the runs %s): handler alone 1/tx %s events/s %s, 50/tx %s events/s %s; all writes 50/tx %s events/s %s',
                     r#>>'{references,handler_50_per_tx,clients}', r#>>'{references,handler_50_per_tx,seconds}', '(all runs in brackets)',
                     r#>>'{references,handler_1_per_tx,events_per_s}', r#>>'{references,handler_1_per_tx,events_per_s_all}',
                     r#>>'{references,handler_50_per_tx,events_per_s}', r#>>'{references,handler_50_per_tx,events_per_s_all}',
                     r#>>'{references,all_writes_50_per_tx,events_per_s}', r#>>'{references,all_writes_50_per_tx,events_per_s_all}');
  RETURN NEXT format('  steal during the references, %%: handler alone 1/tx %s, 50/tx %s; all writes 50/tx %s',
                     coalesce(r#>>'{references,handler_1_per_tx,steal_pct_all}', '-'),
                     coalesce(r#>>'{references,handler_50_per_tx,steal_pct_all}', '-'),
                     coalesce(r#>>'{references,all_writes_50_per_tx,steal_pct_all}', '-'));
  RETURN NEXT '';

  -- CPU per event
  RETURN NEXT 'CPU PER EVENT, us (CPU time of the group during the run / delivered events; eventbus = relay + dispatcher + pool;';
  RETURN NEXT '  machine = all the machine ran, without steal; steal = % of the CPU time the hypervisor took during the run):';
  RETURN NEXT format('%-16s %-10s %10s %7s %10s %6s %9s %12s %10s %9s %9s %7s', 'run', 'transport', 'publishers', 'relay',
                     'dispatcher', 'pool', 'eventbus', 'nats-server', 'devbroker', 'other pg', 'machine', 'steal');
  FOR x IN SELECT c FROM jsonb_array_elements(coalesce(r->'cpu_us_per_event', '[]')) c LOOP
    RETURN NEXT format('%-16s %-10s %10s %7s %10s %6s %9s %12s %10s %9s %9s %7s', x->>'run', x->>'transports',
                       coalesce(x->>'publishers', '-'), x->>'relay', x->>'dispatcher', x->>'pool', x->>'eventbus',
                       x->>'nats_server', x->>'devbroker', x->>'other_postgres', x->>'machine_busy',
                       coalesce((x->>'steal_pct') || ' %', '-'));
  END LOOP;
  RETURN NEXT '';

  -- Memory
  RETURN NEXT 'MEMORY per eventbus process, MiB, largest sample over all runs (/proc/PID/smaps; USS = Private_Clean + Private_Dirty;';
  RETURN NEXT '  shm = the part of USS in PostgreSQL''s shared memory segment (shared buffers no other live process maps); own = USS - shm):';
  RETURN NEXT format('%-12s %8s %8s %8s %8s %8s  %s', 'process', 'own', 'USS', 'shm', 'PSS', 'RSS', 'run of the largest own');
  FOR k, v IN SELECT * FROM jsonb_each(coalesce(r->'memory_max', '{}')) ORDER BY 1 LOOP
    RETURN NEXT format('%-12s %8s %8s %8s %8s %8s  %s', k, v->>'own_mib', v->>'uss_mib', coalesce(v->>'shm_private_mib', '-'),
                       v->>'pss_mib', v->>'rss_mib', coalesce(v->>'own_run', v->>'uss_run'));
  END LOOP;
END $$;

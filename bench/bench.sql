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
    handled_at   timestamptz NOT NULL DEFAULT clock_timestamp()  -- end of the handler
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
-- NOT an order violation.  Never raises.
CREATE FUNCTION @S@.handle(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
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
  INSERT INTO @S@.handled (event_id, transport, topic, aggregate_id, version, order_id, occurred_at)
  VALUES (e.event_id, e.transport, e.topic, e.aggregate_id, e.event_version, (e.payload->>'id')::bigint, e.occurred_at);
  IF NOT dup THEN
    INSERT INTO @S@.projection AS p VALUES (e.topic, e.aggregate_id, e.event_version, 1,
                                           coalesce((e.payload->>'amount')::numeric, 0), clock_timestamp())
    ON CONFLICT (topic, aggregate_id) DO UPDATE
      SET version = greatest(p.version, EXCLUDED.version), lines = p.lines + 1,
          total = p.total + EXCLUDED.total, updated_at = EXCLUDED.updated_at;
  END IF;
END $$;

-- make_plan(run_key, prefix, label, run, events, conns, transports):
-- events / 10 aggregates with 10 events each (versions 1..10), aggregate a on
-- transport transports[a mod #transports] and topic
-- <prefix>.<label>.<transport>.<1..5>.<run>; rows shuffled and dealt to the
-- connections.  Returns the topics.
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
  SELECT p_key, (rn - 1) % p_conns, (rn - 1) / p_conns, tr,
         @S@.topic_name(p_prefix, p_label, tr, (a / ntr) % 5 + 1, p_run), 'ord-' || a
    FROM (SELECT a, p_transports[a % ntr + 1] AS tr, row_number() OVER (ORDER BY random()) AS rn
            FROM generate_series(1, p_events / 10) a, generate_series(1, 10) v) x;
  ANALYZE @S@.plan;
  RETURN QUERY SELECT DISTINCT topic FROM @S@.plan WHERE run_key = p_key ORDER BY 1;
END $$;

-- load(run_key, conn, min_rows, max_rows): this connection's rows of the
-- plan, as fast as it can, in transactions of min..max rows.  Rows of one
-- transaction are inserted sorted by (topic, aggregate), so concurrent
-- publishers lock aggregate versions in one global order (no deadlock).
CREATE PROCEDURE @S@.load(p_key text, p_conn int, p_min int, p_max int)
LANGUAGE plpgsql AS $$
DECLARE n int; pos int := 0; sz int;
BEGIN
  SELECT count(*) INTO n FROM @S@.plan WHERE run_key = p_key AND conn = p_conn;
  WHILE pos < n LOOP
    sz := p_min + floor(random() * (p_max - p_min + 1))::int;
    INSERT INTO @S@.orders (run_key, transport, topic, aggregate_id, sku, qty, amount)
    SELECT p_key, transport, topic, aggregate_id, 'sku-' || (seq % 97), 1 + seq % 3, 9.99 + seq % 50
      FROM @S@.plan WHERE run_key = p_key AND conn = p_conn AND seq >= pos AND seq < pos + sz
     ORDER BY topic, aggregate_id;
    COMMIT;
    pos := pos + sz;
  END LOOP;
END $$;

-- steady(run_key, conn, batch, interval_s): this connection's rows in
-- transactions of `batch` rows, transaction k starting at start + k *
-- interval (sleeping until then; a late transaction is not made up for by
-- a shorter sleep later, it just starts at once).
CREATE PROCEDURE @S@.steady(p_key text, p_conn int, p_batch int, p_interval float8)
LANGUAGE plpgsql AS $$
DECLARE n int; pos int := 0; k int := 0; t0 timestamptz := clock_timestamp(); wait float8;
BEGIN
  SELECT count(*) INTO n FROM @S@.plan WHERE run_key = p_key AND conn = p_conn;
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
END $$;

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

-- level_stats(run_key): every figure of one run, counted from the tables.
-- Latency is per event, from its first handling.  With commit timestamps it
-- is split in three: the publishing transaction (occurred_at → business row
-- commit), relay + broker + dispatch (→ end of the handler call) and the
-- pool's batch (end of the handler call → its transaction's commit).
CREATE FUNCTION @S@.level_stats(p_key text) RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  topics text[] := ARRAY(SELECT DISTINCT topic FROM @S@.plan WHERE run_key = p_key);
  cts boolean := @S@.commit_ts_on();
  r jsonb;
BEGIN
  CREATE TEMP TABLE IF NOT EXISTS lv_orders (id bigint, aggregate_id text, created_at timestamptz, committed_at timestamptz);
  CREATE TEMP TABLE IF NOT EXISTS lv_handled (event_id uuid, transport text, topic text, aggregate_id text, order_id bigint,
                                             occurred_at timestamptz, handled_at timestamptz, done_at timestamptz);
  TRUNCATE lv_orders, lv_handled;
  INSERT INTO lv_orders
  SELECT id, aggregate_id, created_at, CASE WHEN cts THEN pg_xact_commit_timestamp(xmin) END
    FROM @S@.orders WHERE run_key = p_key;
  INSERT INTO lv_handled
  SELECT event_id, transport, topic, aggregate_id, order_id, occurred_at, handled_at,
         CASE WHEN cts THEN pg_xact_commit_timestamp(xmin) ELSE handled_at END
    FROM @S@.handled WHERE topic = ANY (topics) AND aggregate_id <> 'warmup';
  ANALYZE lv_orders;
  ANALYZE lv_handled;

  WITH o AS (SELECT count(*) AS published, min(created_at) AS first_publish, max(committed_at) AS last_publish_commit
               FROM lv_orders),
       h AS (SELECT count(*) AS calls, count(DISTINCT event_id) AS distinct_events, max(done_at) AS last_handler_commit
               FROM lv_handled),
       d AS (SELECT count(*) AS delivered FROM lv_orders o WHERE EXISTS (SELECT 1 FROM lv_handled h WHERE h.order_id = o.id)),
       u AS (SELECT count(*) AS unexpected FROM lv_handled h WHERE NOT EXISTS (SELECT 1 FROM lv_orders o WHERE o.id = h.order_id)),
       first AS (SELECT DISTINCT ON (event_id) * FROM lv_handled ORDER BY event_id, done_at),
       lat AS (SELECT f.transport,
                      extract(epoch FROM f.done_at - f.occurred_at) * 1000 AS ms,
                      extract(epoch FROM o.committed_at - f.occurred_at) * 1000 AS pub_ms,
                      extract(epoch FROM f.handled_at - o.committed_at) * 1000 AS mid_ms,
                      extract(epoch FROM f.done_at - f.handled_at) * 1000 AS batch_ms
                 FROM first f LEFT JOIN lv_orders o ON o.id = f.order_id),
       l AS (SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95,
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99,
                    max(ms) AS max,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY pub_ms) AS pub50,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY mid_ms) AS mid50,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY batch_ms) AS batch50,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY pub_ms) AS pub95,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY mid_ms) AS mid95,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY batch_ms) AS batch95 FROM lat),
       lt AS (SELECT jsonb_object_agg(transport, jsonb_build_object(
                       'p50', round(p50::numeric, 1), 'p95', round(p95::numeric, 1), 'p99', round(p99::numeric, 1))) AS by_tr
                FROM (SELECT transport, percentile_cont(0.5) WITHIN GROUP (ORDER BY ms) AS p50,
                             percentile_cont(0.95) WITHIN GROUP (ORDER BY ms) AS p95,
                             percentile_cont(0.99) WITHIN GROUP (ORDER BY ms) AS p99
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
           'duplicates', h.calls - h.distinct_events,
           'unexpected', u.unexpected,
           'order_violations', v.violations,
           'aggregates_complete', p.complete,
           'aggregates_seen', p.aggs,
           'first_publish', o.first_publish,
           'last_publish_commit', o.last_publish_commit,
           'last_handler_commit', h.last_handler_commit,
           'publish_s', round(extract(epoch FROM o.last_publish_commit - o.first_publish)::numeric, 3),
           'end_to_end_s', round(extract(epoch FROM h.last_handler_commit - o.first_publish)::numeric, 3),
           'publish_events_per_s', round(o.published / nullif(extract(epoch FROM o.last_publish_commit - o.first_publish), 0)),
           'events_per_s', round(d.delivered / nullif(extract(epoch FROM h.last_handler_commit - o.first_publish), 0)),
           'latency_ms', jsonb_build_object('p50', round(l.p50::numeric, 1), 'p95', round(l.p95::numeric, 1),
                                            'p99', round(l.p99::numeric, 1), 'max', round(l.max::numeric, 1)),
           'latency_by_transport_ms', lt.by_tr,
           'latency_split_ms', CASE WHEN cts THEN jsonb_build_object(
               'publish_tx_p50', round(l.pub50::numeric, 1), 'relay_broker_dispatch_handler_p50', round(l.mid50::numeric, 1),
               'pool_batch_commit_p50', round(l.batch50::numeric, 1),
               'publish_tx_p95', round(l.pub95::numeric, 1), 'relay_broker_dispatch_handler_p95', round(l.mid95::numeric, 1),
               'pool_batch_commit_p95', round(l.batch95::numeric, 1)) END,
           'time_source', CASE WHEN cts THEN 'commit_timestamp' ELSE 'handler_clock' END,
           'max_outbox_backlog', s.outbox, 'max_pool_queued', s.pool_queued, 'max_subscription_lag', s.lag,
           'samples', s.n)
    INTO r
    FROM o, h, d, u, l, lt, v, p, s;
  RETURN r;
END $$;

-- Results of this harness run, one document per run key (level_stats plus
-- what the shell measured from /proc).
CREATE TABLE @S@.results (
    n      int GENERATED ALWAYS AS IDENTITY,
    kind   text NOT NULL,          -- 'level' | 'steady' | 'reference'
    doc    jsonb NOT NULL
);

-- level_summary(): one row per (transport, level) — the run with the median
-- events/s among its repeats (all its figures from that same run), plus
-- every repeat's events/s, and loss / duplicates / order violations summed
-- over all repeats — and the steady run as it is.
CREATE FUNCTION @S@.level_summary() RETURNS TABLE (n int, kind text, doc jsonb) LANGUAGE sql AS $$
  WITH runs AS (
    SELECT r.n, r.doc, r.doc->>'transports' AS tr, (r.doc->>'level')::int AS lvl,
           (r.doc->>'events_per_s')::numeric AS eps
      FROM @S@.results r WHERE r.kind = 'level'),
  ranked AS (
    SELECT runs.*, row_number() OVER (PARTITION BY tr, lvl ORDER BY eps, runs.n) AS rn,
           count(*) OVER (PARTITION BY tr, lvl) AS cnt
      FROM runs),
  agg AS (
    SELECT tr, lvl, min(runs.n) AS n, count(*) AS repeats, min(eps) AS eps_min, max(eps) AS eps_max,
           jsonb_agg(eps ORDER BY runs.n) AS eps_all,
           sum((doc->>'published')::bigint) AS published, sum((doc->>'delivered')::bigint) AS delivered,
           sum((doc->>'duplicates')::bigint) AS dups, sum((doc->>'order_violations')::bigint) AS viol,
           sum((doc->>'unexpected')::bigint) AS unexpected,
           max((doc#>>'{rss_peak_mib,launcher}')::numeric) AS rss_l,
           max((doc#>>'{rss_peak_mib,dispatcher}')::numeric) AS rss_d,
           max((doc#>>'{rss_peak_mib,worker_max}')::numeric) AS rss_w
      FROM runs GROUP BY tr, lvl)
  SELECT a.n::int, 'level', m.doc || jsonb_build_object(
           'repeats', a.repeats, 'figures_from', 'the repeat with the median events/s',
           'events_per_s_min', a.eps_min, 'events_per_s_max', a.eps_max, 'events_per_s_all', a.eps_all,
           'all_repeats', jsonb_build_object(
               'published', a.published, 'delivered', a.delivered,
               'delivered_pct', round(100.0 * a.delivered / nullif(a.published, 0), 2),
               'duplicates', a.dups, 'order_violations', a.viol, 'unexpected', a.unexpected),
           'rss_peak_mib_max_over_repeats', jsonb_build_object('launcher', a.rss_l, 'dispatcher', a.rss_d, 'worker_max', a.rss_w))
    FROM agg a JOIN ranked m ON m.tr = a.tr AND m.lvl = a.lvl AND m.rn = (m.cnt + 1) / 2
  UNION ALL
  SELECT r.n, r.kind, r.doc FROM @S@.results r WHERE r.kind = 'steady'
$$;

-- The reference limit (bench/lib.sh bench_reference runs pgbench on these):
-- the same rows eventbus and the handler write, without eventbus.  Publish:
-- business row + version bump + outbox row per event; relay: delete sent
-- outbox rows; consume: inbox row + projection upsert + handled row per event.
CREATE TABLE @S@.ref_orders (LIKE @S@.orders INCLUDING ALL);
CREATE TABLE @S@.ref_versions (LIKE eventbus.aggregate_versions INCLUDING ALL);
CREATE TABLE @S@.ref_outbox (LIKE eventbus.outbox INCLUDING ALL);
CREATE TABLE @S@.ref_inbox (LIKE eventbus.inbox INCLUDING ALL);
CREATE TABLE @S@.ref_projection (LIKE @S@.projection INCLUDING ALL);
CREATE TABLE @S@.ref_handled (LIKE @S@.handled INCLUDING ALL);

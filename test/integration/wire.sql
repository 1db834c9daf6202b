-- wire.sql — test-side functions that check what the brokers hold against
-- what the database committed.  Loaded into the eventbus database by the
-- integration tests; independent of the extension's code.

-- Sarama's hash partitioner: FNV-1a 32-bit, as int32, absolute value mod n.
CREATE OR REPLACE FUNCTION t_fnv1a_partition(key text, n int) RETURNS int
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  h bigint := 2166136261;
  b bytea := convert_to(key, 'UTF8');
BEGIN
  FOR i IN 0 .. octet_length(b) - 1 LOOP
    h := ((h # get_byte(b, i)) * 16777619) % 4294967296;
  END LOOP;
  IF h >= 2147483648 THEN h := h - 4294967296; END IF;
  RETURN abs(h) % n;
END $$;

-- Normalize a kcat -J dump (table of jsonb lines) into wire rows.
CREATE OR REPLACE FUNCTION t_wire_kafka(raw regclass, dest text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('DROP TABLE IF EXISTS %I', dest);
  EXECUTE format($q$CREATE TABLE %I AS
    SELECT (line->>'partition')::int AS part, (line->>'offset')::bigint AS pos,
           line->>'key' AS key, (line->>'payload')::jsonb AS env,
           jsonb_object(ARRAY(SELECT jsonb_array_elements_text(coalesce(line->'headers', '[]')))) AS hdrs
      FROM %s$q$, dest, raw);
END $$;

-- Normalize a natstool dump into wire rows (one partition: the stream).
CREATE OR REPLACE FUNCTION t_wire_nats(raw regclass, dest text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('DROP TABLE IF EXISTS %I', dest);
  EXECUTE format($q$CREATE TABLE %I AS
    SELECT 0 AS part, (line->>'seq')::bigint AS pos,
           (line->>'data')::jsonb->>'aggregate_id' AS key, (line->>'data')::jsonb AS env,
           line->'headers' AS hdrs
      FROM %s$q$, dest, raw);
END $$;

-- Compare the wire rows with the committed log (event_id, aggregate_id,
-- payload, ...): every figure separately.  nparts = 0 skips the partition
-- check (NATS).
CREATE OR REPLACE FUNCTION t_check(wire regclass, pub regclass, nparts int) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE r jsonb;
BEGIN
  EXECUTE format($q$
    WITH w AS (SELECT *, env->>'event_id' AS eid FROM %1$s),
    first AS (SELECT DISTINCT ON (eid) * FROM w ORDER BY eid, part, pos),
    ordered AS (SELECT key, (env->>'event_version')::bigint AS v,
                       row_number() OVER (PARTITION BY key ORDER BY part, pos) AS rn
                  FROM first)
    SELECT jsonb_build_object(
      'published',   (SELECT count(*) FROM %2$s),
      'received',    (SELECT count(*) FROM w),
      'distinct',    (SELECT count(DISTINCT eid) FROM w),
      'missing',     (SELECT count(*) FROM %2$s p WHERE NOT EXISTS (SELECT 1 FROM w WHERE w.eid = p.event_id::text)),
      'duplicates',  (SELECT count(*) - count(DISTINCT eid) FROM w),
      'unexpected',  (SELECT count(DISTINCT eid) FROM w WHERE NOT EXISTS (SELECT 1 FROM %2$s p WHERE p.event_id::text = w.eid)),
      'order_violations', (SELECT count(*) FROM ordered WHERE v <> rn),
      'version_gaps', (SELECT count(*) FROM (SELECT key, max(v) m, count(*) c FROM ordered GROUP BY key) g WHERE m <> c),
      'aggregates',  (SELECT count(DISTINCT key) FROM w),
      'duplicate_mismatches', (SELECT count(*) FROM w JOIN first f ON f.eid = w.eid
                                WHERE (w.part, w.pos) <> (f.part, f.pos) AND (w.env <> f.env OR w.key <> f.key)),
      'partition_violations', CASE WHEN %3$s > 0 THEN (SELECT count(*) FROM w WHERE part <> t_fnv1a_partition(key, %3$s)) ELSE 0 END,
      'split_aggregates', (SELECT count(*) FROM (SELECT key FROM w GROUP BY key HAVING count(DISTINCT part) > 1) s),
      'envelope_violations', (SELECT count(*) FROM w WHERE NOT (
            env ?& ARRAY['event_id','aggregate_id','event_type','event_version','timestamp','payload']
        AND (SELECT bool_and(k IN ('event_id','aggregate_id','event_type','event_version','timestamp',
                                   'trace_id','correlation_id','tenant_id','payload')) FROM jsonb_object_keys(env) k)
        AND jsonb_typeof(env->'event_id') = 'string' AND jsonb_typeof(env->'aggregate_id') = 'string'
        AND jsonb_typeof(env->'event_type') = 'string' AND jsonb_typeof(env->'event_version') = 'number'
        AND (env->>'timestamp') ~ '^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{1,9}(Z|[+-]\d\d:\d\d)$'
        AND (env->>'aggregate_id') = key
        AND (NOT env ? 'tenant_id' OR jsonb_typeof(env->'tenant_id') = 'number'))),
      'payload_mismatches', (SELECT count(*) FROM first f JOIN %2$s p ON p.event_id::text = f.eid WHERE f.env->'payload' IS DISTINCT FROM p.payload),
      'header_violations', (SELECT count(*) FROM w WHERE
            hdrs->>'X-Event-ID' IS DISTINCT FROM env->>'event_id'
         OR hdrs->>'X-Aggregate-ID' IS DISTINCT FROM env->>'aggregate_id'
         OR hdrs->>'X-Event-Version' IS DISTINCT FROM env->>'event_version'
         OR hdrs->>'X-Event-Type' IS DISTINCT FROM env->>'event_type'
         OR hdrs->>'X-Trace-ID' IS DISTINCT FROM env->>'trace_id'
         OR hdrs->>'X-Correlation-ID' IS DISTINCT FROM env->>'correlation_id'
         OR hdrs->>'X-Tenant-ID' IS DISTINCT FROM env->>'tenant_id'
         OR (%3$s = 0 AND hdrs->>'Nats-Msg-Id' IS DISTINCT FROM env->>'event_id')))
    $q$, wire, pub, nparts) INTO r;
  RETURN r;
END $$;

-- fuzz.sql — a fuzz harness for the inbound envelope decoder.
--
-- Installs schema eb_fuzz in the current database (where eventbus is
-- installed): a generator of hostile inbound messages (value, Kafka key,
-- headers) and eb_fuzz.run(n, seed), which feeds n of them, in this one
-- backend, through eventbus_check_message() — the consumer's own decoder,
-- work item round trip and envelope building — and records in
-- eb_fuzz.results:
--   errors      calls that raised an ERROR (must be 0; a crash ends the session)
--   internal    reasons from the decoder's safety net (must be 0: every
--               failure is caught by a check before the call that would throw)
--   mismatches  accepted messages whose decoded envelope
--               (eventbus_decode_message) differs from PostgreSQL's own
--               reading of the JSON (must be 0)
-- Inputs: generated envelopes with hostile field values (bad ids, versions,
-- timestamps, tenant ids, aggregate ids, numbers at numeric's limits,
-- escapes, duplicate fields), byte-level mutations of them (bit flips,
-- random bytes, truncation, duplication, deletion, inserted tokens: NUL,
-- invalid UTF-8, surrogates, brackets, huge numbers), splices of two,
-- deep nesting around the limit and far beyond, huge strings, random bytes
-- and token soup; random keys and headers (counts and sizes around the
-- limits, non-ASCII).  Deterministic for a given seed.
\set ON_ERROR_STOP 1
SET client_min_messages = warning;
DROP SCHEMA IF EXISTS eb_fuzz CASCADE;
CREATE SCHEMA eb_fuzz;
CREATE TABLE eb_fuzz.failures (n bigserial, kind text, value bytea, key bytea, headers jsonb, detail text);
CREATE TABLE eb_fuzz.results (db text, seed float8, inputs int, accepted int, rejected int, errors int,
                              internal int, mismatches int, seconds numeric, reasons jsonb);

CREATE FUNCTION eb_fuzz.r(n int) RETURNS int LANGUAGE sql AS $$ SELECT floor(random() * n)::int $$;
CREATE FUNCTION eb_fuzz.pick(a text[]) RETURNS text LANGUAGE sql AS
  $$ SELECT a[1 + floor(random() * cardinality(a))::int] $$;
CREATE FUNCTION eb_fuzz.uuid() RETURNS text LANGUAGE sql AS $$ SELECT md5(random()::text)::uuid::text $$;

CREATE FUNCTION eb_fuzz.numbers() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY[
  '0', '-0', '1', '-1', '1.5', '1e999', '1E+2', '1e-5', '123456789012345678901234567890', '1e131071',
  '9999e131068', '99999e131067', '1e131072', '0.1e131072', '1e-16383', '1e-16384', '0e-16383', '0e-16384',
  '0.0', '2147483648', '9223372036854775807', '9223372036854775808', '1.7976931348623157e308', '5e-324',
  '1e1000000', '1e1000001', '-1e-1000000', '0e99999999999', '1' || repeat('0', 131071),
  '1' || repeat('0', 131072), '0.' || repeat('0', 16382) || '1', '0.' || repeat('0', 16383) || '1']
$$;
CREATE FUNCTION eb_fuzz.strings() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY[
  '"a"', '""', '"\u00e9"', '"\u00E9t\u00e9"', '"\u20ac"', '"\ud83d\ude00"', '"\ud800"', '"\udc00x"',
  '"\ud800\u0041"', '"\u0000"', '"\\"', '"\""', '"\/"', '"\b\f\n\r\t"', '"\u001f"', '"\x"', '"\u12"',
  '"\uD83D\uDE00"', '"\u007f"', '"\u0080"', '"\uffff"', '"plain text"']
$$;
CREATE FUNCTION eb_fuzz.timestamps() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY[
  '"2026-01-02T03:04:05.123456Z"', '"2026-01-02T03:04:05Z"', '"2026-01-02 03:04:05+01:00"',
  '"2026-01-02t03:04:05.5z"', '"2024-02-29T00:00:00Z"', '"0001-01-01T00:00:00Z"',
  '"9999-12-31T23:59:59.999999-23:59"', '"2026-01-02T03:04:05.1234567890123456789+05:30"',
  '"2026-01-02T03:04:05.9999995Z"', '"2026-06-30T23:59:60Z"', '"\u0032026-01-02T03:04:05Z"']
$$;
CREATE FUNCTION eb_fuzz.bad_timestamps() RETURNS text[] LANGUAGE sql IMMUTABLE AS $$ SELECT ARRAY[
  '"2023-02-29T00:00:00Z"', '"0000-01-01T00:00:00Z"', '"2026-01-02T03:04:05."', '"2026-01-02T24:00:00Z"',
  '"now"', '"2026-01-02T03:04:05+05"', '"2026-1-2T3:4:5Z"', '"2026-01-02T03:04:05"', '"2026-13-01T00:00:00Z"',
  '"2026-01-32T00:00:00Z"', '"2026-01-02T03:60:00Z"', '"2026-01-02T03:04:61Z"', '"2026-01-02T03:04:05+24:00"',
  '"2026-01-02T03:04:05+01:60"', '"99999-01-02T03:04:05Z"', '"2026-01-02T03:04:05Z "', '""', '1', 'null',
  '"2026-01-02T03:04:05\u0000Z"', '"epoch"', '"infinity"', '"2026-01-02X03:04:05Z"']
$$;

-- A random JSON value text, nested at most depth levels.
CREATE FUNCTION eb_fuzz.value(depth int) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  s text := '';
  n int;
BEGIN
  CASE eb_fuzz.r(CASE WHEN depth <= 0 THEN 4 ELSE 6 END)
  WHEN 0 THEN RETURN eb_fuzz.pick(eb_fuzz.numbers());
  WHEN 1 THEN RETURN eb_fuzz.pick(eb_fuzz.strings());
  WHEN 2 THEN RETURN eb_fuzz.pick(ARRAY['true', 'false', 'null']);
  WHEN 3 THEN RETURN round((random() * 2e6 - 1e6)::numeric, eb_fuzz.r(8))::text;
  WHEN 4 THEN
    n := eb_fuzz.r(5);
    FOR i IN 1..n LOOP
      s := s || CASE WHEN i > 1 THEN ',' ELSE '' END || eb_fuzz.value(depth - 1);
    END LOOP;
    RETURN '[' || s || ']';
  ELSE
    n := eb_fuzz.r(5);
    FOR i IN 1..n LOOP
      s := s || CASE WHEN i > 1 THEN ',' ELSE '' END
             || eb_fuzz.pick(ARRAY['"a"', '"b"', '"a"', '""', '"\u00e9"', '"k\"q"', '"\u0041"'])
             || ':' || eb_fuzz.value(depth - 1);
    END LOOP;
    RETURN '{' || s || '}';
  END CASE;
END $$;

-- A hostile value for an envelope field.
CREATE FUNCTION eb_fuzz.bad_value(field text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
  IF random() < 0.2 THEN
    RETURN eb_fuzz.value(2);
  END IF;
  CASE field
  WHEN 'event_id' THEN RETURN eb_fuzz.pick(ARRAY['""', '"not-a-uuid"', '"0190A0A0-0000-7000-8000-00000000000G"',
    '"0190a0a0000070008000000000000001"', '12345', 'null', '"{0190a0a0-0000-7000-8000-000000000001}"',
    '"0190a0a0-0000-7000-8000-000000000001 "', '"0190A0A0-0000-7000-8000-000000000001"',
    '"\u0030190a0a0-0000-7000-8000-000000000001"', '"0190a0a0-0000-7000-8000-00000000000\u00e9"']);
  WHEN 'aggregate_id' THEN RETURN eb_fuzz.pick(ARRAY['""', '"bad agg"', '"' || repeat('a', 256) || '"',
    '"' || repeat('a', 257) || '"', '42', 'null', '"\u00e9"', '"a/b:c.d_e-f"', '"x\u0000"', '"x\u0041"', '["a"]']);
  WHEN 'event_type' THEN RETURN eb_fuzz.pick(ARRAY['""', '1', 'null', '"\u20ac"', '"' || repeat('t', 40000) || '"',
    '"\u00e9v\u00e9nement"', '{}']);
  WHEN 'event_version' THEN RETURN eb_fuzz.pick(ARRAY['0', '-1', '1e400', '"abc"', '9223372036854775807',
    '9223372036854775808', '-9223372036854775808', '1.5', '1.0', '1e2', '1e999999', 'true', 'null', '-0', '01',
    '"1"', '1e18', '0.5e1', '10e-1']);
  WHEN 'timestamp' THEN RETURN eb_fuzz.pick(eb_fuzz.bad_timestamps() || eb_fuzz.timestamps());
  WHEN 'tenant_id' THEN RETURN eb_fuzz.pick(ARRAY['1', '-2147483648', '2147483647', '2147483648', '1.0', '"1"',
    'null', '1e2', '-2147483649', '1e-2']);
  WHEN 'payload' THEN RETURN eb_fuzz.pick(ARRAY[eb_fuzz.value(4), 'null', '"x"', '1e131072',
    repeat('[', 255) || repeat(']', 255), repeat('[', 256) || repeat(']', 256)]);
  ELSE RETURN eb_fuzz.value(2);
  END CASE;
END $$;

-- An envelope text, valid or with 0-2 hostile fields, a field missing,
-- duplicated or extra, in random order.
CREATE FUNCTION eb_fuzz.envelope() RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  names text[] := ARRAY['event_id', 'aggregate_id', 'event_type', 'event_version', 'timestamp', 'payload'];
  vals text[];
  i int;
  j int;
  t text;
  s text := '';
BEGIN
  vals := ARRAY['"' || eb_fuzz.uuid() || '"', '"agg-' || eb_fuzz.r(50) || '"', '"T' || eb_fuzz.r(5) || '"',
                (1 + eb_fuzz.r(1000))::text, eb_fuzz.pick(eb_fuzz.timestamps()), eb_fuzz.value(3)];
  IF random() < 0.3 THEN
    names := names || 'trace_id'::text; vals := vals || eb_fuzz.pick(ARRAY['"t-1"', 'null', '"\u00e9"', '""', '7']);
  END IF;
  IF random() < 0.3 THEN
    names := names || 'correlation_id'::text; vals := vals || eb_fuzz.pick(ARRAY['"c-1"', 'null', '[]']);
  END IF;
  IF random() < 0.3 THEN
    names := names || 'tenant_id'::text; vals := vals || eb_fuzz.pick(ARRAY['1', '-5', '2147483647', 'null']);
  END IF;
  IF random() < 0.1 THEN
    names := names || eb_fuzz.pick(ARRAY['extra', 'Event_ID', 'payload2', '', 'event\u005fid']);
    vals := vals || eb_fuzz.value(2);
  END IF;
  FOR k IN 1..eb_fuzz.r(3) LOOP
    i := 1 + eb_fuzz.r(cardinality(vals));
    vals[i] := eb_fuzz.bad_value(names[i]);
  END LOOP;
  IF random() < 0.05 THEN
    i := 1 + eb_fuzz.r(cardinality(vals));
    names := names[1:i - 1] || names[i + 1:]; vals := vals[1:i - 1] || vals[i + 1:];
  END IF;
  IF random() < 0.03 THEN
    i := 1 + eb_fuzz.r(cardinality(vals));
    names := names || names[i]; vals := vals || eb_fuzz.value(1);
  END IF;
  IF random() < 0.5 THEN
    FOR k IN 1..3 LOOP
      i := 1 + eb_fuzz.r(cardinality(vals)); j := 1 + eb_fuzz.r(cardinality(vals));
      t := names[i]; names[i] := names[j]; names[j] := t;
      t := vals[i]; vals[i] := vals[j]; vals[j] := t;
    END LOOP;
  END IF;
  FOR i IN 1..cardinality(names) LOOP
    s := s || CASE WHEN i > 1 THEN ',' ELSE '' END || '"' || names[i] || '":' || vals[i];
  END LOOP;
  RETURN CASE WHEN random() < 0.1 THEN E' \n{' || s || E'}\t' ELSE '{' || s || '}' END;
END $$;

-- A token to splice into a message: JSON syntax, escapes, numbers at
-- numeric's limits, or raw bytes (NUL, invalid UTF-8, surrogates, BOM).
CREATE FUNCTION eb_fuzz.token() RETURNS bytea LANGUAGE plpgsql AS $$
BEGIN
  IF random() < 0.7 THEN
    RETURN convert_to(eb_fuzz.pick(ARRAY['[', '{', ']', '}', '"', '\', ',', ':', ' ', '\u0000', '\ud800',
      '\udc00', '\ud83d\ude00', '\u00e9', '\u20ac', '\uffff', '\u', '\u12', '1e999', '1e131071', '1e131072',
      '1e-16383', '1e-16384', '0e-16384', '-0', '01', '1.', '.5', '1e', '-', 'true', 'nul', 'null',
      '9223372036854775807', '9223372036854775808', '2147483648', '"event_id":', '"payload":',
      '"aggregate_id":"x",', '"timestamp":"2024-02-29T00:00:00Z",', '{"a":[1,{"b":null}]}',
      '[[[[[[[[[[', ']]]]]]]]]]', '"\u00e9"']), 'UTF8');
  END IF;
  RETURN decode(eb_fuzz.pick(ARRAY['00', 'ff', 'c0af', 'eda080', 'e282ac', 'c3a9', 'f4908080', 'efbbbf', '01',
    '0a', '7f', 'c3', 'e282', 'f09f9880', 'fe', '80', 'c2a0', 'e2808b']), 'hex');
END $$;

-- 1 to 3 byte-level mutations.
CREATE FUNCTION eb_fuzz.mutate(b bytea) RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
  len int;
  p int;
  l int;
BEGIN
  FOR m IN 0..eb_fuzz.r(3) LOOP
    len := length(b);
    p := eb_fuzz.r(len + 1);
    CASE eb_fuzz.r(8)
    WHEN 0 THEN   -- flip a bit
      IF len > 0 THEN p := eb_fuzz.r(len); b := set_byte(b, p, get_byte(b, p) # (1 << eb_fuzz.r(8))); END IF;
    WHEN 1 THEN   -- random byte
      IF len > 0 THEN p := eb_fuzz.r(len); b := set_byte(b, p, eb_fuzz.r(256)); END IF;
    WHEN 2 THEN   -- truncate
      b := substring(b FROM 1 FOR p);
    WHEN 3 THEN   -- duplicate a slice
      l := eb_fuzz.r(least(len - p, 64) + 1);
      b := substring(b FROM 1 FOR p + l) || substring(b FROM p + 1 FOR l) || substring(b FROM p + l + 1);
    WHEN 4 THEN   -- delete a slice
      l := eb_fuzz.r(least(len - p, 16) + 1);
      b := substring(b FROM 1 FOR p) || substring(b FROM p + l + 1);
    WHEN 5, 6 THEN  -- insert a token
      b := substring(b FROM 1 FOR p) || eb_fuzz.token() || substring(b FROM p + 1);
    ELSE          -- replace a slice by a token
      l := eb_fuzz.r(least(len - p, 8) + 1);
      b := substring(b FROM 1 FOR p) || eb_fuzz.token() || substring(b FROM p + l + 1);
    END CASE;
  END LOOP;
  RETURN b;
END $$;

-- e with x inserted as the payload's value, the old value moved to field "x".
CREATE FUNCTION eb_fuzz.inject(e text, x text) RETURNS text LANGUAGE sql AS $$
  SELECT CASE WHEN position('"payload":' IN e) = 0 THEN e
              ELSE overlay(e PLACING x || ',"x":' FROM position('"payload":' IN e) + 10 FOR 0) END
$$;

-- The value of the next input (the seed was set by run()).
CREATE FUNCTION eb_fuzz.message() RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
  x float8 := random();
  e text;
  n int;
BEGIN
  IF x < 0.45 THEN                          -- a generated envelope, sometimes mutated
    RETURN CASE WHEN random() < 0.3 THEN eb_fuzz.mutate(convert_to(eb_fuzz.envelope(), 'UTF8'))
                ELSE convert_to(eb_fuzz.envelope(), 'UTF8') END;
  ELSIF x < 0.70 THEN                       -- byte mutations
    RETURN eb_fuzz.mutate(eb_fuzz.mutate(convert_to(eb_fuzz.envelope(), 'UTF8')));
  ELSIF x < 0.78 THEN                       -- a splice of two
    RETURN substring(convert_to(eb_fuzz.envelope(), 'UTF8') FROM 1 FOR 10 + eb_fuzz.r(200))
        || substring(convert_to(eb_fuzz.envelope(), 'UTF8') FROM 1 + eb_fuzz.r(200));
  ELSIF x < 0.86 THEN                       -- random bytes or token soup
    IF random() < 0.5 THEN
      RETURN (SELECT coalesce(decode(string_agg(lpad(to_hex(eb_fuzz.r(256)), 2, '0'), ''), 'hex'), ''::bytea)
                FROM generate_series(1, eb_fuzz.r(200)));
    END IF;
    RETURN (SELECT coalesce(string_agg(eb_fuzz.token(), ''::bytea), ''::bytea) FROM generate_series(1, eb_fuzz.r(30)));
  ELSIF x < 0.94 THEN                       -- nesting around the limit and far beyond
    n := (ARRAY[250, 254, 255, 256, 257, 1000, 60000])[1 + eb_fuzz.r(7)];
    e := eb_fuzz.envelope();
    CASE eb_fuzz.r(4)
    WHEN 0 THEN RETURN convert_to(repeat('[', n), 'UTF8');
    WHEN 1 THEN RETURN convert_to(eb_fuzz.inject(e, repeat('[', n) || '1' || repeat(']', n)), 'UTF8');
    WHEN 2 THEN RETURN convert_to(eb_fuzz.inject(e, repeat('{"a":', n) || '1' || repeat('}', n)), 'UTF8');
    ELSE RETURN convert_to(eb_fuzz.inject(e, repeat('["\"[{",', n) || '1' || repeat(']', n)), 'UTF8');
    END CASE;
  ELSIF x < 0.995 THEN                      -- empty, and JSON that is not an object
    RETURN convert_to(eb_fuzz.pick(ARRAY['', ' ', '[]', '{}', 'null', '"x"', '1', 'true', '[{}]', '{"a":1}{}']), 'UTF8');
  ELSE                                      -- sizes around eventbus.max_payload_bytes + 64 kB
    n := (ARRAY[1065536 - 400, 1065536 + 1, 2000000, 150000])[1 + eb_fuzz.r(4)];
    e := eb_fuzz.envelope();
    RETURN convert_to(eb_fuzz.inject(e, '"' || repeat('x', n - length(e)) || '"'), 'UTF8');
  END IF;
END $$;

CREATE FUNCTION eb_fuzz.key() RETURNS bytea LANGUAGE plpgsql AS $$
DECLARE
  x float8 := random();
BEGIN
  IF x < 0.5 THEN RETURN NULL; END IF;
  IF x < 0.85 THEN RETURN convert_to('agg-' || eb_fuzz.r(50), 'UTF8'); END IF;
  RETURN decode(eb_fuzz.pick(ARRAY['00', '6100', 'ff', '', '6b2d31', encode(convert_to(repeat('k', 256), 'UTF8'), 'hex'),
                                   encode(convert_to(repeat('k', 257), 'UTF8'), 'hex'), 'c3a9', '61206220']), 'hex');
END $$;

CREATE FUNCTION eb_fuzz.headers() RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
  x float8 := random();
BEGIN
  IF x < 0.85 THEN RETURN NULL; END IF;
  CASE eb_fuzz.r(12)
  WHEN 0 THEN RETURN '{"X-Aggregate-ID":"agg-hdr"}';
  WHEN 1 THEN RETURN '{"X-Aggregate-ID":"bad agg"}';
  WHEN 2 THEN RETURN '{"X-Aggregate-ID":"","other":"y"}';
  WHEN 3 THEN RETURN (SELECT jsonb_object_agg('h' || g, 'v') FROM generate_series(1, (ARRAY[999, 1000, 1001, 20000])[1 + eb_fuzz.r(4)]) g);
  WHEN 4 THEN RETURN jsonb_build_object('big', repeat('x', 32768 + eb_fuzz.r(2)));
  WHEN 5 THEN RETURN jsonb_build_object(repeat('n', 256 + eb_fuzz.r(2)), 'v');
  WHEN 6 THEN RETURN (SELECT jsonb_object_agg('h' || g, repeat('v', 30000)) FROM generate_series(1, 35) g);
  WHEN 7 THEN RETURN '{"h\u00e9":"v\u00e9","n":1.50,"b":true,"z":null}';
  WHEN 8 THEN RETURN '{"X-Event-Type":"\u0001\u001f","":""}';
  WHEN 9 THEN RETURN jsonb_build_object('X-Aggregate-ID', 'agg-' || eb_fuzz.r(50), 'traceparent', '00-abc-def-01');
  ELSE RETURN '{"a":"b"}';
  END CASE;
END $$;

-- Why the decoded envelope of an accepted message differs from what
-- PostgreSQL itself reads in its JSON, or NULL.
CREATE FUNCTION eb_fuzz.disagreement(v bytea, k bytea, h jsonb, e eventbus.envelope) RETURNS text LANGUAGE plpgsql AS $$
DECLARE
  j jsonb;
  ts text;
  expect timestamptz;
BEGIN
  IF e IS NULL THEN
    RETURN 'accepted, but eventbus_decode_message returned NULL';
  END IF;
  j := convert_from(v, 'UTF8')::jsonb;
  IF jsonb_typeof(j) <> 'object' THEN RETURN 'not an object'; END IF;
  IF e.event_id IS DISTINCT FROM (j->>'event_id')::uuid THEN RETURN 'event_id'; END IF;
  IF e.aggregate_id IS DISTINCT FROM coalesce(j->>'aggregate_id', h->>'X-Aggregate-ID', convert_from(nullif(k, ''::bytea), 'UTF8')) THEN
    RETURN 'aggregate_id';
  END IF;
  IF e.event_type IS DISTINCT FROM j->>'event_type' THEN RETURN 'event_type'; END IF;
  IF e.event_version::numeric IS DISTINCT FROM (j->>'event_version')::numeric THEN RETURN 'event_version'; END IF;
  IF jsonb_typeof(j->'timestamp') = 'string' THEN
    -- PostgreSQL takes offsets up to 15:59 only; RFC 3339 up to 23:59
    ts := j->>'timestamp';
    IF ts ~ '[+-]\d\d:\d\d$' THEN
      expect := (left(ts, -6) || 'Z')::timestamptz
                - (CASE WHEN substr(ts, length(ts) - 5, 1) = '-' THEN -1 ELSE 1 END)
                  * make_interval(hours => substr(ts, length(ts) - 4, 2)::int, mins => substr(ts, length(ts) - 1, 2)::int);
    ELSE
      expect := ts::timestamptz;
    END IF;
    IF abs(extract(epoch FROM e.occurred_at - expect)) > 0.000001 THEN
      RETURN 'timestamp: ' || ts || ' read as ' || e.occurred_at;
    END IF;
  END IF;
  IF e.trace_id IS DISTINCT FROM j->>'trace_id' OR e.correlation_id IS DISTINCT FROM j->>'correlation_id' THEN
    RETURN 'trace_id/correlation_id';
  END IF;
  IF e.tenant_id::numeric IS DISTINCT FROM (j->>'tenant_id')::numeric THEN RETURN 'tenant_id'; END IF;
  IF e.payload IS DISTINCT FROM j->'payload' THEN RETURN 'payload'; END IF;
  IF e.headers IS DISTINCT FROM (SELECT jsonb_object_agg(key, coalesce(value #>> '{}', '')) FROM jsonb_each(h)) THEN
    RETURN 'headers';
  END IF;
  RETURN NULL;
EXCEPTION WHEN OTHERS THEN
  RETURN 'PostgreSQL cannot read what the decoder accepted: ' || SQLERRM;
END $$;

-- Feed n inputs through the decoder; one row in eb_fuzz.results.
CREATE FUNCTION eb_fuzz.run(n int, seed float8) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v bytea;
  k bytea;
  h jsonb;
  reason text;
  why text;
  accepted int := 0;
  rejected int := 0;
  errors int := 0;
  internal int := 0;
  mismatches int := 0;
  t0 timestamptz := clock_timestamp();
  reasons jsonb := '{}';
  r text;
BEGIN
  PERFORM setseed(seed);
  FOR i IN 1..n LOOP
    v := eb_fuzz.message(); k := eb_fuzz.key(); h := eb_fuzz.headers();
    BEGIN
      reason := eventbus_check_message(v, k, h);
      IF reason IS NULL THEN
        accepted := accepted + 1;
        why := eb_fuzz.disagreement(v, k, h, eventbus_decode_message(v, k, h));
        IF why IS NOT NULL THEN
          mismatches := mismatches + 1;
          INSERT INTO eb_fuzz.failures (kind, value, key, headers, detail) VALUES ('mismatch', v, k, h, why);
        END IF;
      ELSE
        rejected := rejected + 1;
        r := left(regexp_replace(reason, '[0-9]+|".*"|:.*', '', 'g'), 60);
        reasons := jsonb_set(reasons, ARRAY[r], to_jsonb(coalesce((reasons->>r)::int, 0) + 1));
        IF reason LIKE 'internal error%' OR btrim(reason) = '' THEN
          internal := internal + 1;
          INSERT INTO eb_fuzz.failures (kind, value, key, headers, detail) VALUES ('internal', v, k, h, reason);
        END IF;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      errors := errors + 1;
      INSERT INTO eb_fuzz.failures (kind, value, key, headers, detail) VALUES ('error', v, k, h, SQLSTATE || ' ' || SQLERRM);
    END;
  END LOOP;
  INSERT INTO eb_fuzz.results VALUES (current_database(), seed, n, accepted, rejected, errors, internal, mismatches,
    round(extract(epoch FROM clock_timestamp() - t0)::numeric, 1), reasons);
END $$;

-- eventbus 0.2.0: transactional outbox for Kafka and NATS JetStream.
\echo Use "CREATE EXTENSION eventbus" to load this file. \quit

CREATE SCHEMA eventbus;
COMMENT ON SCHEMA eventbus IS 'eventbus internal tables and types';
-- Roles that write handlers need the eventbus.envelope type; the tables
-- themselves grant nothing, so they stay private.
GRANT USAGE ON SCHEMA eventbus TO PUBLIC;

-- No CHECK constraints: eventbus_publish validates the transport and the
-- version before it inserts, and a CHECK costs every insert a fresh read of
-- its expression from the catalog (measured: 28 µs of ~95 per
-- eventbus_publish call for the two this table had).
CREATE TABLE eventbus.outbox (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id       uuid NOT NULL,
    transport      text NOT NULL,
    topic          text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    event_version  bigint NOT NULL,
    occurred_at    timestamptz NOT NULL,
    trace_id       text,
    correlation_id text,
    tenant_id      integer,
    payload        jsonb NOT NULL,
    headers        jsonb,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text
);
CREATE INDEX outbox_transport_id ON eventbus.outbox (transport, id);
COMMENT ON TABLE eventbus.outbox IS
  'Committed events not yet acknowledged by their broker; the relay sends them in id order and deletes each row once acknowledged';
COMMENT ON COLUMN eventbus.outbox.id IS 'Send order: per (topic, aggregate) it follows commit order';
COMMENT ON COLUMN eventbus.outbox.attempts IS 'Failed delivery attempts so far';
COMMENT ON COLUMN eventbus.outbox.last_error IS 'Error of the last failed delivery attempt';
COMMENT ON SEQUENCE eventbus.outbox_id_seq IS 'Generates outbox ids (send order)';
SELECT pg_catalog.pg_extension_config_dump('eventbus.outbox', '');

CREATE TABLE eventbus.undeliverable (
    id             bigint PRIMARY KEY,
    event_id       uuid NOT NULL,
    transport      text NOT NULL CHECK (transport IN ('kafka', 'nats')),
    topic          text NOT NULL,
    aggregate_id   text NOT NULL,
    event_type     text NOT NULL,
    event_version  bigint NOT NULL CHECK (event_version > 0),
    occurred_at    timestamptz NOT NULL,
    trace_id       text,
    correlation_id text,
    tenant_id      integer,
    payload        jsonb NOT NULL,
    headers        jsonb,
    attempts       integer NOT NULL DEFAULT 0,
    last_error     text,
    error          text NOT NULL,
    failed_at      timestamptz NOT NULL,
    held_behind    bigint
);
CREATE INDEX undeliverable_key ON eventbus.undeliverable (transport, topic, aggregate_id, id);
COMMENT ON INDEX eventbus.undeliverable_key IS 'Finds the undeliverable events of an aggregate (the relay holds its later events behind them)';
COMMENT ON TABLE eventbus.undeliverable IS
  'Outbox rows the broker refused for good, and the later rows of their (transport, topic, aggregate), which wait behind them; eventbus_retry_undeliverable moves them back to the outbox, eventbus_discard_undeliverable deletes them';
COMMENT ON COLUMN eventbus.undeliverable.id IS 'The row''s outbox id (its place in the send order, kept when it moves back)';
COMMENT ON COLUMN eventbus.undeliverable.event_id IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.transport IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.topic IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.aggregate_id IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.event_type IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.event_version IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.occurred_at IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.trace_id IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.correlation_id IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.tenant_id IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.payload IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.headers IS 'As in eventbus.outbox';
COMMENT ON COLUMN eventbus.undeliverable.attempts IS 'Delivery attempts, the failed one included';
COMMENT ON COLUMN eventbus.undeliverable.last_error IS 'Error of the last transient delivery failure while in the outbox';
COMMENT ON COLUMN eventbus.undeliverable.error IS 'Why it is here: the broker''s or client''s permanent error, or the event it waits behind';
COMMENT ON COLUMN eventbus.undeliverable.failed_at IS 'When it was moved here';
COMMENT ON COLUMN eventbus.undeliverable.held_behind IS 'NULL: this event failed; else the id of the failed event of its aggregate it waits behind';
SELECT pg_catalog.pg_extension_config_dump('eventbus.undeliverable', '');

-- Half of each page is left free, so that an aggregate's next version is
-- written to the same page (a HOT update) without a new index entry.
CREATE TABLE eventbus.aggregate_versions (
    topic        text NOT NULL,
    aggregate_id text NOT NULL,
    version      bigint NOT NULL,
    PRIMARY KEY (topic, aggregate_id)
) WITH (fillfactor = 50);
COMMENT ON TABLE eventbus.aggregate_versions IS
  'Last event_version published per (topic, aggregate); its row lock orders concurrent publishers of one aggregate';
SELECT pg_catalog.pg_extension_config_dump('eventbus.aggregate_versions', '');

CREATE TYPE eventbus.envelope AS (
    event_id       uuid,
    topic          text,
    aggregate_id   text,
    event_type     text,
    event_version  bigint,
    occurred_at    timestamptz,
    trace_id       text,
    correlation_id text,
    tenant_id      integer,
    payload        jsonb,
    headers        jsonb,
    transport      text,
    received_at    timestamptz
);
COMMENT ON TYPE eventbus.envelope IS 'An event as a handler receives it (received_at: when eventbus took the message from the broker client; NULL where no message was received)';

CREATE FUNCTION eventbus_publish(
    topic          text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    transport      text DEFAULT NULL,
    event_version  bigint DEFAULT NULL,
    trace_id       text DEFAULT NULL,
    correlation_id text DEFAULT NULL,
    tenant_id      integer DEFAULT NULL,
    headers        jsonb DEFAULT NULL)
RETURNS uuid
AS 'MODULE_PATHNAME', 'eventbus_publish'
LANGUAGE C VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_publish(text, text, text, jsonb, text, bigint, text, text, integer, jsonb) IS
  'Publish an event when the calling transaction commits; returns its event_id (UUIDv7)';
REVOKE ALL ON FUNCTION eventbus_publish(text, text, text, jsonb, text, bigint, text, text, integer, jsonb) FROM PUBLIC;

CREATE FUNCTION eventbus_retry_undeliverable(id bigint DEFAULT NULL)
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventbus_retry_undeliverable'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_retry_undeliverable(bigint) IS
  'Move an undeliverable event and every other undeliverable event of its (transport, topic, aggregate) back to the outbox in their original order (NULL: every undeliverable event); returns how many';
REVOKE ALL ON FUNCTION eventbus_retry_undeliverable(bigint) FROM PUBLIC;

CREATE FUNCTION eventbus_discard_undeliverable(id bigint, include_later boolean DEFAULT false)
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventbus_discard_undeliverable'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_discard_undeliverable(bigint, boolean) IS
  'Delete an undeliverable event (with include_later also the later undeliverable events of its aggregate); events that waited only behind it go back to the outbox; returns how many were deleted';
REVOKE ALL ON FUNCTION eventbus_discard_undeliverable(bigint, boolean) FROM PUBLIC;

CREATE FUNCTION eventbus_undeliverable(
    OUT id            bigint,
    OUT transport     text,
    OUT topic         text,
    OUT aggregate_id  text,
    OUT event_id      uuid,
    OUT event_type    text,
    OUT event_version bigint,
    OUT occurred_at   timestamptz,
    OUT attempts      integer,
    OUT error         text,
    OUT failed_at     timestamptz,
    OUT held_behind   bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_undeliverable'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_undeliverable() IS
  'The events in eventbus.undeliverable in send order (without payloads): why each is there and which failed event it waits behind';
REVOKE ALL ON FUNCTION eventbus_undeliverable() FROM PUBLIC;

CREATE FUNCTION eventbus_status(
    OUT component text,
    OUT pid       integer,
    OUT transport text,
    OUT state     text,
    OUT since     timestamptz,
    OUT detail    text,
    OUT backlog   bigint,
    OUT processed bigint,
    OUT failed    bigint)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_status'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_status() IS
  'eventbus processes, broker connection states, outbox backlog and counters; a non-superuser sees the subscriptions of roles it is a member of';
REVOKE ALL ON FUNCTION eventbus_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventbus_status() TO pg_monitor;

-- Consuming -----------------------------------------------------------------

CREATE TABLE eventbus.subscriptions (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    topic        text NOT NULL,
    transport    text NOT NULL CHECK (transport IN ('kafka', 'nats')),
    handler      regprocedure NOT NULL,
    role_id      oid NOT NULL,
    max_attempts integer NOT NULL CHECK (max_attempts >= 1),
    created_at   timestamptz NOT NULL DEFAULT pg_catalog.now(),
    UNIQUE (topic, transport, handler)
);
COMMENT ON TABLE eventbus.subscriptions IS
  'Handlers subscribed to topics; each runs with the privileges of role_id, the role that subscribed it and owns the subscription';
COMMENT ON SEQUENCE eventbus.subscriptions_id_seq IS 'Generates subscription ids';
SELECT pg_catalog.pg_extension_config_dump('eventbus.subscriptions', '');

-- No foreign key to eventbus.subscriptions and no CHECK on outcome: the pool
-- writes a row per handled event, and the foreign key's check (a row lock on
-- the subscription, shared by every pool transaction: multixacts) and the
-- CHECK (re-read from the catalog at every statement) cost a tenth of the
-- pool's CPU.  Only eventbus writes this table; the trigger below does what
-- ON DELETE CASCADE did.
CREATE TABLE eventbus.inbox (
    subscription_id bigint NOT NULL,
    event_id        uuid NOT NULL,
    outcome         text NOT NULL,
    handled_at      timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    PRIMARY KEY (subscription_id, event_id)
);
CREATE INDEX inbox_handled_at ON eventbus.inbox (handled_at);
COMMENT ON TABLE eventbus.inbox IS
  'Events already handled (or dead-lettered) per subscription, committed with the handler''s effects; redeliveries are skipped. Kept for eventbus.inbox_retention';
SELECT pg_catalog.pg_extension_config_dump('eventbus.inbox', '');

CREATE FUNCTION eventbus.forget_inbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
  DELETE FROM eventbus.inbox i USING old_rows o WHERE i.subscription_id OPERATOR(pg_catalog.=) o.id;
  RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION eventbus.forget_inbox() FROM PUBLIC;
COMMENT ON FUNCTION eventbus.forget_inbox() IS
  'Trigger: deletes the inbox records of deleted subscriptions';
CREATE TRIGGER subscriptions_forget_inbox AFTER DELETE ON eventbus.subscriptions
  REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION eventbus.forget_inbox();
COMMENT ON TRIGGER subscriptions_forget_inbox ON eventbus.subscriptions IS
  'Deleting a subscription deletes its inbox records';

CREATE TABLE eventbus.dead_letters (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    subscription_id bigint NOT NULL REFERENCES eventbus.subscriptions ON DELETE CASCADE,
    envelope        eventbus.envelope NOT NULL,
    error_message   text NOT NULL,
    error_sqlstate  text NOT NULL,
    attempts        integer NOT NULL,
    failed_at       timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    replayed_at     timestamptz
);
COMMENT ON TABLE eventbus.dead_letters IS
  'Events whose handler failed max_attempts times; the aggregate moved on. Replay with eventbus_replay_dead_letter(id)';
COMMENT ON SEQUENCE eventbus.dead_letters_id_seq IS 'Generates dead letter ids';
SELECT pg_catalog.pg_extension_config_dump('eventbus.dead_letters', '');

CREATE TABLE eventbus.quarantine (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transport       text NOT NULL,
    topic           text NOT NULL,
    kafka_partition integer,
    kafka_offset    bigint,
    stream_sequence bigint,
    message_key     bytea,
    headers         jsonb,
    raw             bytea NOT NULL,
    reason          text NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
COMMENT ON TABLE eventbus.quarantine IS
  'Inbound messages that are not valid envelopes, kept with their raw bytes and the reason; consumption continued past them';
COMMENT ON SEQUENCE eventbus.quarantine_id_seq IS 'Generates quarantine ids';
SELECT pg_catalog.pg_extension_config_dump('eventbus.quarantine', '');

CREATE FUNCTION eventbus_check_message(
    value   bytea,
    key     bytea DEFAULT NULL,
    headers jsonb DEFAULT NULL)
RETURNS text
AS 'MODULE_PATHNAME', 'eventbus_check_message'
LANGUAGE C VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_check_message(bytea, bytea, jsonb) IS
  'Why the consumer would quarantine this inbound message (value, Kafka key, headers as a JSON object), or NULL when it would accept it; runs the consumer''s own decoder';
REVOKE ALL ON FUNCTION eventbus_check_message(bytea, bytea, jsonb) FROM PUBLIC;

CREATE FUNCTION eventbus_decode_message(
    value   bytea,
    key     bytea DEFAULT NULL,
    headers jsonb DEFAULT NULL)
RETURNS eventbus.envelope
AS 'MODULE_PATHNAME', 'eventbus_decode_message'
LANGUAGE C VOLATILE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_decode_message(bytea, bytea, jsonb) IS
  'The envelope a handler would receive for this inbound message (topic empty; transport kafka when a key is given, else nats), or NULL when the consumer would quarantine it (eventbus_check_message says why)';
REVOKE ALL ON FUNCTION eventbus_decode_message(bytea, bytea, jsonb) FROM PUBLIC;

CREATE FUNCTION eventbus_subscribe(
    topic        text,
    handler      regprocedure,
    transport    text DEFAULT NULL,
    max_attempts integer DEFAULT 5)
RETURNS bigint
AS 'MODULE_PATHNAME', 'eventbus_subscribe'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) IS
  'Run handler(eventbus.envelope) for every event of topic, as the calling role; returns the subscription id';
REVOKE ALL ON FUNCTION eventbus_subscribe(text, regprocedure, text, integer) FROM PUBLIC;

CREATE FUNCTION eventbus_unsubscribe(
    topic     text,
    handler   regprocedure,
    transport text DEFAULT NULL)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventbus_unsubscribe'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_unsubscribe(text, regprocedure, text) IS
  'Remove a subscription (with its inbox and dead letters); true if it existed; needs membership in the owning role';
REVOKE ALL ON FUNCTION eventbus_unsubscribe(text, regprocedure, text) FROM PUBLIC;

CREATE FUNCTION eventbus_replay_dead_letter(id bigint)
RETURNS boolean
AS 'MODULE_PATHNAME', 'eventbus_replay_dead_letter'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_replay_dead_letter(bigint) IS
  'Run the handler of a dead letter again, now, in the calling transaction, as the subscribing role isolated as in the pool; true if it succeeded; a dead letter replays successfully at most once; needs membership in the owning role';
REVOKE ALL ON FUNCTION eventbus_replay_dead_letter(bigint) FROM PUBLIC;

CREATE FUNCTION eventbus_dead_letters(
    subscription_id bigint DEFAULT NULL,
    OUT id            bigint,
    OUT subscription  bigint,
    OUT topic         text,
    OUT handler       regprocedure,
    OUT envelope      eventbus.envelope,
    OUT error_message text,
    OUT error_sqlstate text,
    OUT attempts      integer,
    OUT failed_at     timestamptz,
    OUT replayed_at   timestamptz)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_dead_letters'
LANGUAGE C VOLATILE PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_dead_letters(bigint) IS
  'Dead letters of a subscription (needs membership in its owning role), or with NULL of every subscription the caller may act for';
REVOKE ALL ON FUNCTION eventbus_dead_letters(bigint) FROM PUBLIC;

-- Monitoring ------------------------------------------------------------------

CREATE FUNCTION eventbus_metrics(
    OUT name            text,
    OUT kind            text,
    OUT transport       text,
    OUT subscription_id bigint,
    OUT worker          integer,
    OUT value           double precision)
RETURNS SETOF record
AS 'MODULE_PATHNAME', 'eventbus_metrics'
LANGUAGE C VOLATILE
SET search_path = pg_catalog, pg_temp;
COMMENT ON FUNCTION eventbus_metrics() IS
  'Counters (from server start) and gauges of eventbus, one row per metric and label set; read through the eventbus.metrics view';
REVOKE ALL ON FUNCTION eventbus_metrics() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION eventbus_metrics() TO pg_monitor;

CREATE VIEW eventbus.metrics AS
  SELECT m.name, m.kind, m.transport, m.subscription_id, m.worker, m.value
    FROM @extschema@.eventbus_metrics() m;
COMMENT ON VIEW eventbus.metrics IS
  'eventbus counters and gauges for monitoring (readable by pg_monitor): name, kind (counter or gauge), labels (transport, subscription_id, worker) and value; docs/monitoring.md lists them';
GRANT SELECT ON eventbus.metrics TO pg_monitor;

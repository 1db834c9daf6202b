#!/usr/bin/env bash
# demo.sh — what `make demo` runs after building and installing: start the
# local stack, install the extension, run a small shop end to end on both
# transports, and show what each broker received.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
STACK="$REPO/scripts/stack.sh"

"$STACK" start
# shellcheck disable=SC1090
source "$("$STACK" env)"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
sql() { PGOPTIONS="-c client_min_messages=warning" psql -X -q -v ON_ERROR_STOP=1 "$@"; }

step "Install the extension; the launcher (relay) and dispatcher (consumers) reach both brokers"
sql -c "CREATE EXTENSION IF NOT EXISTS eventbus"
for _ in $(seq 1 100); do
	n=$(psql -X -A -t -c "SELECT count(*) FROM eventbus_status() WHERE transport IS NOT NULL AND state = 'connected'")
	[ "$n" = 4 ] && break
	sleep 0.2
done
sql -c "SELECT component, pid, transport, state, detail FROM eventbus_status()"

step "A shop: orders publish to Kafka, payments to NATS JetStream, from AFTER triggers"
sql <<'SQL'
CREATE TABLE IF NOT EXISTS demo_orders (
    id       bigint PRIMARY KEY,
    customer text NOT NULL,
    status   text NOT NULL DEFAULT 'placed',
    total    numeric(10,2) NOT NULL);
CREATE TABLE IF NOT EXISTS demo_payments (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES demo_orders,
    amount   numeric(10,2) NOT NULL);

CREATE OR REPLACE FUNCTION demo_publish_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM eventbus_publish('shop.orders', 'order-' || NEW.id,
                           CASE TG_OP WHEN 'INSERT' THEN 'OrderPlaced' ELSE 'OrderStatusChanged' END,
                           to_jsonb(NEW), 'kafka');
  RETURN NEW;
END $$;
CREATE OR REPLACE FUNCTION demo_publish_payment() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM eventbus_publish('shop.payments', 'order-' || NEW.order_id, 'PaymentReceived',
                           to_jsonb(NEW), 'nats', correlation_id => 'order-' || NEW.order_id);
  RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS demo_orders_events ON demo_orders;
CREATE TRIGGER demo_orders_events AFTER INSERT OR UPDATE ON demo_orders
  FOR EACH ROW EXECUTE FUNCTION demo_publish_order();
DROP TRIGGER IF EXISTS demo_payments_events ON demo_payments;
CREATE TRIGGER demo_payments_events AFTER INSERT ON demo_payments
  FOR EACH ROW EXECUTE FUNCTION demo_publish_payment();
SQL

step "Handlers: projections built from the events (run by the keyed worker pool)"
sql <<'SQL'
CREATE TABLE IF NOT EXISTS demo_order_view (
    order_id text PRIMARY KEY, status text, total numeric, version bigint,
    published_at timestamptz, handled_at timestamptz);
CREATE TABLE IF NOT EXISTS demo_payment_log (
    event_id uuid PRIMARY KEY, order_id text, amount numeric,
    published_at timestamptz, handled_at timestamptz);
CREATE TABLE IF NOT EXISTS demo_order_violations (order_id text, expected bigint, got bigint);

-- Kafka handler: keep the latest state per order; check order as it goes.
CREATE OR REPLACE FUNCTION demo_project_order(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
DECLARE last bigint;
BEGIN
  SELECT version INTO last FROM demo_order_view WHERE order_id = e.aggregate_id;
  IF coalesce(last, 0) + 1 <> e.event_version THEN
    INSERT INTO demo_order_violations VALUES (e.aggregate_id, coalesce(last, 0) + 1, e.event_version);
  END IF;
  INSERT INTO demo_order_view VALUES (e.aggregate_id, e.payload->>'status', (e.payload->>'total')::numeric,
                                      e.event_version, e.occurred_at, clock_timestamp())
  ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status, total = EXCLUDED.total,
      version = EXCLUDED.version, published_at = EXCLUDED.published_at, handled_at = EXCLUDED.handled_at;
END $$;

-- NATS handler: a payment ledger.
CREATE OR REPLACE FUNCTION demo_record_payment(e eventbus.envelope) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO demo_payment_log VALUES (e.event_id, e.aggregate_id, (e.payload->>'amount')::numeric,
                                       e.occurred_at, clock_timestamp());
END $$;

SELECT eventbus_subscribe('shop.orders', 'demo_project_order(eventbus.envelope)', 'kafka') AS kafka_subscription,
       eventbus_subscribe('shop.payments', 'demo_record_payment(eventbus.envelope)', 'nats') AS nats_subscription;
SQL

step "Business as usual: 200 orders placed, paid (NATS) and shipped, one cancellation rolled back"
# Each run adds new orders (ids after the last run's), so runs never collide.
base=$(psql -X -A -t -c "SELECT coalesce(max(id), 0) FROM demo_orders")
start=$(psql -X -A -t -c "SELECT clock_timestamp()")
t0=$(date +%s%3N)
sql -v base="$base" <<'SQL'
INSERT INTO demo_orders (id, customer, total)
  SELECT :base + g, 'customer-' || g, 10 + g % 90 FROM generate_series(1, 200) g;
INSERT INTO demo_payments (order_id, amount) SELECT id, total FROM demo_orders WHERE id > :base AND id % 4 <> 0;
UPDATE demo_orders SET status = 'paid' WHERE id > :base AND id % 4 <> 0;
UPDATE demo_orders SET status = 'shipped' WHERE id > :base AND id % 2 = 1;
BEGIN;
UPDATE demo_orders SET status = 'cancelled' WHERE id = :base + 3;
ROLLBACK;
SQL

step "Wait until every event is handled"
expect_orders=200
expect_paid=$(psql -X -A -t -c "SELECT count(*) FROM demo_payments WHERE order_id > $base")
for _ in $(seq 1 300); do
	done_o=$(psql -X -A -t -c "SELECT count(*) FROM demo_order_view v JOIN demo_orders o ON v.order_id = 'order-' || o.id WHERE o.id > $base AND v.status = o.status")
	done_p=$(psql -X -A -t -c "SELECT count(*) FROM demo_payment_log WHERE handled_at >= '$start'")
	[ "$done_o" = "$expect_orders" ] && [ "$done_p" = "$expect_paid" ] && break
	sleep 0.2
done
t1=$(date +%s%3N)

step "What Kafka holds for shop.orders (kcat: partition, key, headers, envelope), last 2"
kcat -b "$EVENTBUS_KAFKA_BROKERS" -C -t shop.orders -o beginning -e -q \
	-f 'partition %p offset %o  key %k  headers %h\n  %s\n' | tail -n 4

step "What JetStream holds for shop.payments (natstool), last 1"
"$REPO/test/tools/natstool" --url "$EVENTBUS_NATS_URL" dump shop.payments | tail -n 1

step "Projections and processes"
sql -c "SELECT v.status, count(*) AS orders FROM demo_order_view v JOIN demo_orders o ON v.order_id = 'order-' || o.id WHERE o.id > $base GROUP BY 1 ORDER BY 1"
sql -c "SELECT component, pid, transport, state, backlog, processed, failed FROM eventbus_status()"

step "Summary"
sql <<SQL
WITH o AS (SELECT * FROM demo_orders WHERE id > $base),
     h AS (SELECT s.topic, i.outcome FROM eventbus.inbox i JOIN eventbus.subscriptions s ON s.id = i.subscription_id
            WHERE i.handled_at >= '$start')
SELECT 'kafka  shop.orders' AS flow,
       (SELECT count(*) FROM o) + (SELECT count(*) FROM o WHERE status <> 'placed')
         + (SELECT count(*) FROM o WHERE status = 'shipped') AS published,
       (SELECT count(*) FROM h WHERE topic = 'shop.orders' AND outcome = 'handled') AS handled,
       (SELECT count(*) FROM demo_order_violations) AS order_violations_ever,
       (SELECT round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY handled_at - published_at)) * 1000)
          FROM demo_order_view WHERE handled_at >= '$start') AS latency_p50_ms
UNION ALL
SELECT 'nats   shop.payments', (SELECT count(*) FROM demo_payments WHERE order_id > $base),
       (SELECT count(*) FROM h WHERE topic = 'shop.payments' AND outcome = 'handled'), 0,
       (SELECT round(extract(epoch FROM percentile_cont(0.5) WITHIN GROUP (ORDER BY handled_at - published_at)) * 1000)
          FROM demo_payment_log WHERE handled_at >= '$start');
SQL
echo "all handled $((t1 - t0)) ms after the first business transaction began"

cat <<EOF2

The rolled-back cancellation of order 3 was never published (no order is 'cancelled').
Every event carries event_id (UUIDv7), aggregate_id, event_type, event_version
(consecutive per topic and aggregate) and an RFC 3339 timestamp; Kafka messages are keyed by
aggregate_id and partitioned with fnv1a, NATS messages carry Nats-Msg-Id.

Connect:  psql -h $PGHOST -p $PGPORT -U postgres eventbus
          (try: SELECT * FROM eventbus_status();)
Brokers:  Kafka (dev broker) $EVENTBUS_KAFKA_BROKERS, NATS $EVENTBUS_NATS_URL
Stop:     make stop
EOF2

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
sql() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }

step "Install the extension and wait for the launcher to reach both brokers"
sql -c "CREATE EXTENSION IF NOT EXISTS eventbus"
for _ in $(seq 1 50); do
	n=$(psql -X -A -t -c "SELECT count(*) FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL AND state = 'connected'")
	[ "$n" = 2 ] && break
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
TRUNCATE demo_payments, demo_orders;
SQL

step "Business as usual (each statement its own transaction)"
sql -e <<'SQL'
INSERT INTO demo_orders (id, customer, total) VALUES (1, 'ada', 42.00), (2, 'grace', 17.50), (3, 'linus', 99.90);
INSERT INTO demo_payments (order_id, amount) VALUES (1, 42.00), (2, 17.50);
UPDATE demo_orders SET status = 'paid' WHERE id IN (1, 2);
UPDATE demo_orders SET status = 'shipped' WHERE id = 1;
BEGIN;
UPDATE demo_orders SET status = 'cancelled' WHERE id = 3;
ROLLBACK;
SQL

step "Wait for the relay to have every event acknowledged"
for _ in $(seq 1 100); do
	[ "$(psql -X -A -t -c 'SELECT count(*) FROM eventbus.outbox')" = 0 ] && break
	sleep 0.1
done
sql -c "SELECT transport, state, backlog, processed AS acknowledged FROM eventbus_status() WHERE component = 'launcher' AND transport IS NOT NULL"

step "What Kafka holds for shop.orders (read with kcat: partition, key, version, type, status)"
kcat -b "$EVENTBUS_KAFKA_BROKERS" -C -t shop.orders -o beginning -e -q \
	-f 'partition %p offset %o  key %k  headers %h\n  %s\n' | tail -n 14

step "What JetStream holds for shop.payments (read with natstool)"
"$REPO/test/tools/natstool" --url "$EVENTBUS_NATS_URL" dump shop.payments | tail -n 2

cat <<EOF2

The rolled-back cancellation of order 3 was never published.
Every event carries event_id (UUIDv7), aggregate_id, event_type, event_version
(consecutive per topic and aggregate) and an RFC 3339 timestamp; Kafka messages are keyed by
aggregate_id and partitioned with fnv1a, NATS messages carry Nats-Msg-Id.

Connect:  psql -h $PGHOST -p $PGPORT -U postgres eventbus
          (try: SELECT * FROM eventbus_status();)
Brokers:  Kafka (dev broker) $EVENTBUS_KAFKA_BROKERS, NATS $EVENTBUS_NATS_URL
Stop:     make stop
EOF2

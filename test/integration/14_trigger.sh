#!/usr/bin/env bash
# Publishing from an AFTER INSERT/UPDATE trigger (the README example):
# each order's changes arrive on both transports, in order.  (Versions are
# per (topic, aggregate), so each transport gets its own topic here.)
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
load_wire_functions
wait_until 20 both_connected || bail "brokers not connected"
q >/dev/null <<SQL
DROP TABLE IF EXISTS t14_orders CASCADE;
CREATE TABLE t14_orders (id bigint PRIMARY KEY, customer text NOT NULL, status text NOT NULL, total numeric(10,2) NOT NULL);
CREATE OR REPLACE FUNCTION t14_publish_order() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
  PERFORM eventbus_publish(TG_ARGV[0], 'order-' || NEW.id,
                           CASE TG_OP WHEN 'INSERT' THEN 'OrderCreated' ELSE 'OrderUpdated' END,
                           to_jsonb(NEW), TG_ARGV[1]);
  RETURN NEW;
END \$\$;
CREATE TRIGGER t14_orders_kafka AFTER INSERT OR UPDATE ON t14_orders
  FOR EACH ROW EXECUTE FUNCTION t14_publish_order('t14.orders.kafka.$run', 'kafka');
CREATE TRIGGER t14_orders_nats AFTER INSERT OR UPDATE ON t14_orders
  FOR EACH ROW EXECUTE FUNCTION t14_publish_order('t14.orders.nats.$run', 'nats');
SQL
q -c "INSERT INTO t14_orders SELECT g, 'customer-' || g, 'new', g * 1.5 FROM generate_series(1, 50) g" >/dev/null
for s in paid shipped delivered; do
	q -c "UPDATE t14_orders SET status = '$s'" >/dev/null
done
q -c "BEGIN; UPDATE t14_orders SET status = 'cancelled' WHERE id <= 10; ROLLBACK" >/dev/null
wait_outbox_empty 60
ok $? "trigger events relayed"

wire_kafka "t14.orders.kafka.$run" t14_wire_kafka
wire_nats "t14.orders.nats.$run" t14_wire_nats
for tr in kafka nats; do
	is "$(q -c "SELECT count(*) FROM t14_wire_$tr")" "200" "$tr: 50 orders x (1 insert + 3 updates) = 200 events"
	is "$(q -c "SELECT count(*) FROM (SELECT key, array_agg(env->'payload'->>'status' ORDER BY part, pos) s FROM t14_wire_$tr GROUP BY key) x WHERE s <> ARRAY['new','paid','shipped','delivered']")" \
		"0" "$tr: every order's changes in order (new, paid, shipped, delivered)"
	is "$(q -c "SELECT count(*) FROM (SELECT key, array_agg((env->>'event_version')::int ORDER BY part, pos) v, array_agg(env->>'event_type' ORDER BY part, pos) t FROM t14_wire_$tr GROUP BY key) x WHERE v <> ARRAY[1,2,3,4] OR t <> ARRAY['OrderCreated','OrderUpdated','OrderUpdated','OrderUpdated']")" \
		"0" "$tr: versions 1..4 and event types per order"
	is "$(q -c "SELECT count(*) FROM t14_wire_$tr w JOIN t14_orders o ON w.key = 'order-' || o.id WHERE (w.env->>'event_version')::int = 4 AND w.env->'payload' <> to_jsonb(o)")" \
		"0" "$tr: last event's payload is the row as committed"
	is "$(q -c "SELECT count(*) FROM t14_wire_$tr WHERE env->'payload'->>'status' = 'cancelled'")" "0" "$tr: rolled-back update not published"
done

done_testing

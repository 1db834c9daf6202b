#!/usr/bin/env bash
# End to end through eventbus on both sides: a business table whose AFTER
# INSERT/UPDATE trigger publishes with eventbus_publish (one topic per
# transport), and a subscribed handler that maintains a projection of it.
# Accounts are opened before the subscription exists, changed afterwards.
# Asserted: the projection equals the business table; per account the handler
# saw versions 1..k in order, the event types in order, each event once;
# exactly the committed events arrived (a rolled-back update did not).
source "$(dirname "$0")/lib.sh"

run=$(date +%s)$RANDOM
TK="t26.accounts.kafka.$run"; TN="t26.accounts.nats.$run"
NACC=100

consumer_setup
CONSUMER_CLEANUP="unsubscribe_like 't26.%.$run'"

q >/dev/null <<SQL
DROP TABLE IF EXISTS t26_accounts, t26_published, t26_projection, t26_log CASCADE;
CREATE TABLE t26_accounts (id bigint PRIMARY KEY, owner text NOT NULL, balance numeric(12,2) NOT NULL, status text NOT NULL);
CREATE TABLE t26_published (event_id uuid PRIMARY KEY, transport text, aggregate_id text);
CREATE TABLE t26_projection (transport text, id bigint, owner text, balance numeric(12,2), status text, version bigint,
                             PRIMARY KEY (transport, id));
CREATE TABLE t26_log (n bigserial, transport text, topic text, aggregate_id text, version bigint, event_type text, event_id uuid,
                      status text, in_order boolean);

CREATE OR REPLACE FUNCTION t26_publish() RETURNS trigger LANGUAGE plpgsql AS \$\$
DECLARE eid uuid;
BEGIN
  eid := eventbus_publish(TG_ARGV[0], 'account-' || NEW.id,
                         CASE TG_OP WHEN 'INSERT' THEN 'AccountOpened' ELSE 'AccountChanged' END,
                         to_jsonb(NEW), TG_ARGV[1]);
  INSERT INTO t26_published VALUES (eid, TG_ARGV[1], 'account-' || NEW.id);
  RETURN NEW;
END \$\$;
CREATE TRIGGER t26_kafka AFTER INSERT OR UPDATE ON t26_accounts FOR EACH ROW EXECUTE FUNCTION t26_publish('$TK', 'kafka');
CREATE TRIGGER t26_nats  AFTER INSERT OR UPDATE ON t26_accounts FOR EACH ROW EXECUTE FUNCTION t26_publish('$TN', 'nats');

-- The projection: upsert from the payload; an event whose version is not
-- the projection's + 1 is logged as out of order (and still applied).
CREATE OR REPLACE FUNCTION t26_project(e eventbus.envelope) RETURNS void
LANGUAGE plpgsql AS \$\$
DECLARE cur bigint;
BEGIN
  SELECT p.version INTO cur FROM public.t26_projection p WHERE p.transport = e.transport AND p.id = (e.payload->>'id')::bigint FOR UPDATE;
  INSERT INTO public.t26_log (transport, topic, aggregate_id, version, event_type, event_id, status, in_order)
  VALUES (e.transport, e.topic, e.aggregate_id, e.event_version, e.event_type, e.event_id, e.payload->>'status',
          e.event_version = coalesce(cur, 0) + 1);
  INSERT INTO public.t26_projection VALUES (e.transport, (e.payload->>'id')::bigint, e.payload->>'owner',
                                            (e.payload->>'balance')::numeric, e.payload->>'status', e.event_version)
  ON CONFLICT (transport, id) DO UPDATE
    SET owner = EXCLUDED.owner, balance = EXCLUDED.balance, status = EXCLUDED.status, version = EXCLUDED.version;
END \$\$;
SQL

# Before subscribing: accounts opened (the topics/stream come into being
# through the relay, as in production).
q -c "INSERT INTO t26_accounts SELECT g, 'owner-' || g, 0, 'open' FROM generate_series(1, $NACC) g" >/dev/null
wait_outbox_empty 60
ok $? "AccountOpened events relayed"
subs=$(q -c "SELECT eventbus_subscribe('$TK', 't26_project(eventbus.envelope)', 'kafka'), eventbus_subscribe('$TN', 't26_project(eventbus.envelope)', 'nats')")
ok "$([[ $subs =~ ^[0-9]+\|[0-9]+$ ]]; echo $?)" "projection subscribed on both transports ($subs)"

# After subscribing: business as usual, from several transactions and
# connections; one update rolled back.
for r in 1 2 3; do
	q -c "UPDATE t26_accounts SET balance = balance + id * $r, status = 'active-$r' WHERE id % 2 = 0" >/dev/null &
	q -c "UPDATE t26_accounts SET balance = balance + id * $r, status = 'active-$r' WHERE id % 2 = 1" >/dev/null &
	wait
done
q -c "BEGIN" -c "UPDATE t26_accounts SET status = 'cancelled' WHERE id <= 10" -c "ROLLBACK" >/dev/null
q >/dev/null <<SQL
BEGIN;
UPDATE t26_accounts SET balance = balance - 1, status = 'frozen' WHERE id <= 20;
UPDATE t26_accounts SET status = 'closed' WHERE id <= 5;
COMMIT;
SQL
expected=$(q -c "SELECT count(*) FROM t26_published")
diag "$expected events published ($((expected / 2)) per transport)"

wait_count 120 "$expected" "SELECT count(*) FROM t26_log WHERE topic IN ('$TK', '$TN')" 60
ok $? "all $expected events reached the handler ($COUNT)"
sleep 2

for tr in kafka nats; do
	is "$(q -c "SELECT count(*) FROM (SELECT id, owner, balance, status FROM t26_accounts
	                                   EXCEPT SELECT id, owner, balance, status FROM t26_projection WHERE transport = '$tr') x")" \
		"0" "$tr: every business row is in the projection as committed"
	is "$(q -c "SELECT count(*) FROM t26_projection WHERE transport = '$tr'")" "$NACC" "$tr: the projection has exactly the $NACC accounts"
	is "$(q -c "SELECT count(*) FROM t26_log WHERE transport = '$tr' AND NOT in_order")" "0" "$tr: no event out of order (checked by the handler)"
	is "$(q -c "SELECT count(*) FROM (SELECT aggregate_id, array_agg(version ORDER BY n) vs, array_agg(event_type ORDER BY n) ts
	                                  FROM t26_log WHERE transport = '$tr' GROUP BY 1) x
	             WHERE vs <> ARRAY(SELECT generate_series(1, array_length(vs, 1))::bigint)
	                OR ts[1] <> 'AccountOpened' OR 'AccountOpened' = ANY (ts[2:])")" "0" \
		"$tr: per account versions 1..k in handler order, AccountOpened first"
	is "$(q -c "SELECT count(*) FROM t26_log l JOIN t26_projection p ON p.transport = l.transport AND 'account-' || p.id = l.aggregate_id
	             WHERE l.transport = '$tr' AND p.version <> (SELECT count(*) FROM t26_log l2 WHERE l2.transport = '$tr' AND l2.aggregate_id = l.aggregate_id)")" \
		"0" "$tr: projection version = number of events of the account"
	is "$(q -c "SELECT count(*) FROM t26_published p WHERE transport = '$tr' AND NOT EXISTS (SELECT 1 FROM t26_log l WHERE l.event_id = p.event_id)")" \
		"0" "$tr: zero missing"
	is "$(q -c "SELECT count(*) - count(DISTINCT event_id) FROM t26_log WHERE transport = '$tr'")" "0" "$tr: zero duplicates"
	is "$(q -c "SELECT count(*) FROM t26_log l WHERE transport = '$tr' AND NOT EXISTS (SELECT 1 FROM t26_published p WHERE p.event_id = l.event_id)")" \
		"0" "$tr: nothing that did not commit"
	is "$(q -c "SELECT count(*) FROM t26_log WHERE transport = '$tr' AND status = 'cancelled'")" "0" "$tr: the rolled-back update was not handled"
	is "$(q -c "SELECT string_agg(status, ',' ORDER BY n) FROM t26_log WHERE transport = '$tr' AND aggregate_id = 'account-4'")" \
		"open,active-1,active-2,active-3,frozen,closed" "$tr: account-4's history in order"
done

done_testing

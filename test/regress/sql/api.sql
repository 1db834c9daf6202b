-- API shape: functions, volatility, comments, privileges, GUCs.
CREATE EXTENSION IF NOT EXISTS eventbus;

-- Every API function is VOLATILE (never IMMUTABLE/STABLE).
SELECT p.proname, p.provolatile, p.prosecdef
  FROM pg_proc p JOIN pg_depend d ON d.objid = p.oid
  JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'eventbus'
 ORDER BY 1;

-- eventbus_publish signature and defaults as in the design.
SELECT pg_get_function_arguments('eventbus_publish'::regproc);
SELECT pg_get_function_result('eventbus_publish'::regproc);

-- Every object of the extension carries a comment.
SELECT pg_describe_object(d.classid, d.objid, d.objsubid) AS object_without_comment
  FROM pg_depend d JOIN pg_extension e ON e.oid = d.refobjid AND e.extname = 'eventbus'
 WHERE d.deptype = 'e'
   AND obj_description(d.objid, (SELECT relname FROM pg_class WHERE oid = d.classid)::name) IS NULL
 ORDER BY 1;

-- The envelope type handlers receive.
SELECT attname, format_type(atttypid, atttypmod)
  FROM pg_attribute WHERE attrelid = 'eventbus.envelope'::regclass AND attnum > 0 ORDER BY attnum;

-- Publishing is granted explicitly: PUBLIC may not execute it.
SELECT has_function_privilege('public', 'eventbus_publish(text,text,text,jsonb,text,bigint,text,text,integer,jsonb)', 'EXECUTE') AS public_can_publish;

-- Every API function is granted explicitly (status: to pg_monitor), and every
-- one runs its statements with search_path pinned.
SELECT p.proname, has_function_privilege('public', p.oid, 'EXECUTE') AS public_can_execute,
       has_function_privilege('pg_monitor', p.oid, 'EXECUTE') AS monitor_can_execute, p.proconfig
  FROM pg_proc p WHERE p.proname LIKE 'eventbus\_%' ORDER BY 1;

-- GUCs: the contract names exist; credentials are hidden from other roles.
SELECT name, context, vartype FROM pg_settings WHERE name LIKE 'eventbus.%' ORDER BY name;
CREATE ROLE eventbus_regress_user;
SET ROLE eventbus_regress_user;
SELECT name FROM pg_settings WHERE name LIKE 'eventbus.%' ORDER BY name;
SHOW eventbus.kafka_properties;
SHOW eventbus.nats_url;
SELECT current_setting('eventbus.nats_token');
SHOW eventbus.default_transport;
SET eventbus.default_transport = 'nats';
SHOW eventbus.default_transport;
SET eventbus.default_transport = 'rabbitmq';
RESET ROLE;
DROP ROLE eventbus_regress_user;

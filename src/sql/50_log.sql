-- The delivery log: every message ever sent, failed, pending or suppressed,
-- and every event whose processing failed, in one place.
-- next_attempt_at: when a queued message is tried next (for a message held
-- while its channel fails, the channel's next probe).
CREATE VIEW notify.delivery_log AS
    SELECT m.id AS message_id, m.event_id, m.event_type, m.rule_name AS rule,
           m.recipient_key, m.address, m.channel, m.status, m.attempts, m.subject,
           m.created_at, m.sent_at,
           CASE WHEN m.status = 'queued' AND h.state = 'failing'
                THEN pg_catalog.format('waiting for channel %s, which is failing since %s: %s',
                                       m.channel, h.failing_since, h.last_error)
                ELSE m.last_error END AS last_error,
           m.smtp_response,
           CASE WHEN m.status = 'queued' THEN
               CASE WHEN m.next_attempt_at = 'infinity' OR h.state = 'failing'
                    THEN GREATEST(COALESCE(h.next_probe_at, pg_catalog.now()),
                                  NULLIF(m.next_attempt_at, 'infinity'))
                    ELSE m.next_attempt_at END
           END AS next_attempt_at
      FROM notify.message m
      LEFT JOIN notify.channel_health h ON h.channel = m.channel
    UNION ALL
    SELECT NULL::bigint, e.id, e.event_type, NULL::text,
           NULL::text, NULL::text, NULL::text, 'failed'::text, 0, NULL::text,
           e.occurred_at, NULL::timestamptz, e.last_error, NULL::text, NULL::timestamptz
      FROM notify.event e
     WHERE e.status = 'failed';

-- Least privilege: nothing for PUBLIC; notify_admin manages and reads.
REVOKE ALL ON ALL TABLES IN SCHEMA notify FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA notify FROM PUBLIC;
GRANT USAGE ON SCHEMA notify TO notify_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON notify.recipient, notify.template, notify.rule, notify.watch
    TO notify_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON notify.recipient_group, notify.group_member, notify.supervisor,
    notify.preference, notify.directory TO notify_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON notify.schedule TO notify_admin;
GRANT SELECT ON notify.event, notify.event_cursor, notify.message, notify.attempt, notify.channel,
    notify.channel_health, notify.channels, notify.delivery_log, notify.schedule_run, notify.schedules, notify.dedupe
    TO notify_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA notify TO notify_admin;
REVOKE EXECUTE ON FUNCTION notify._stamp_owner() FROM notify_admin;

-- Configuration survives pg_dump; the queues are data, dumped with the tables' contents too.
SELECT pg_catalog.pg_extension_config_dump('notify.recipient', '');
SELECT pg_catalog.pg_extension_config_dump('notify.template', '');
SELECT pg_catalog.pg_extension_config_dump('notify.rule', '');
SELECT pg_catalog.pg_extension_config_dump('notify.channel', '');
SELECT pg_catalog.pg_extension_config_dump('notify.channel_secret', '');
SELECT pg_catalog.pg_extension_config_dump('notify.watch', '');
SELECT pg_catalog.pg_extension_config_dump('notify.recipient_group', '');
SELECT pg_catalog.pg_extension_config_dump('notify.group_member', '');
SELECT pg_catalog.pg_extension_config_dump('notify.supervisor', '');
SELECT pg_catalog.pg_extension_config_dump('notify.preference', '');
SELECT pg_catalog.pg_extension_config_dump('notify.directory', '');
SELECT pg_catalog.pg_extension_config_dump('notify.schedule', '');
-- what reminders went out already: a restored database must not send them again
SELECT pg_catalog.pg_extension_config_dump('notify.dedupe', '');
-- the queue and the log: a restored database neither loses nor repeats a message
SELECT pg_catalog.pg_extension_config_dump('notify.event', '');
SELECT pg_catalog.pg_extension_config_dump('notify.message', '');
SELECT pg_catalog.pg_extension_config_dump('notify.attachment', '');
SELECT pg_catalog.pg_extension_config_dump('notify.attempt', '');
SELECT pg_catalog.pg_extension_config_dump('notify.schedule_run', '');
-- ... with their identity sequences, or a restored database would hand out ids already taken
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.recipient', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.rule', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.schedule', 'id')::pg_catalog.regclass, '');
-- (one call per statement: each updates the extension's catalog row)
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.event', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.message', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.attachment', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.attempt', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.schedule_run', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.watch', 'id')::pg_catalog.regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('notify.recipient_group', 'id')::pg_catalog.regclass, '');

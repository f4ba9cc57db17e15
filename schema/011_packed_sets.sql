-- Schema version 5 (issue #22, single-event requests packed): the first
-- event of a request whose `Idempotency-Key` ends in a sequence number,
-- id `<p><m>/0` with `<m>` 1 to 18 digits, is kept in the set
-- `<p> 0x01 <m div 1024>` instead of its request's own set
-- `<p><m> 0x00 0`, so the ids of a thousand consecutive single-event
-- requests share a row instead of taking one each. Every other id keeps
-- its set. The rows are the same (`010_id_sets.sql`); only where a flush
-- looks changes.
--
-- `packed_at` is when this file first ran on a database that already held
-- sets (0 on one that held none): sets written before it may hold such
-- ids at their old key. Until the idempotency window has passed since
-- (retention then sets it to 0), a flush also looks a moved id up at its
-- old key, so a retry across the upgrade is still a duplicate. NULL only
-- between the two statements below.
ALTER TABLE id_sets_state
    ADD COLUMN IF NOT EXISTS packed_at BIGINT NULL
    COMMENT 'unix seconds of the change to packed sets (0: none pending)';
UPDATE id_sets_state
    SET packed_at = IF(EXISTS (SELECT 1 FROM applied_id_sets), UNIX_TIMESTAMP(), 0)
    WHERE id = 1 AND packed_at IS NULL;
INSERT INTO schema_version (id, version) VALUES (1, 5)
    ON DUPLICATE KEY UPDATE version = GREATEST(version, 5);

-- Idempotent increments (issue #22): one row per event id counted on this
-- group, per counter. Since schema version 4 (`010_id_sets.sql`) ids are
-- kept as sets; only the ids of a closed set (and those an older release
-- counted) are rows here, decided as described below. The flush transaction that applies a batch inserts
-- its events' ids here (`INSERT IGNORE`, in primary-key order) right after
-- its dedup row, and counts only the events whose row it inserted (`src` is
-- a 64-bit FNV-1a tag of the batch's label, "batch <writer_id>/<seq>" or
-- "wal <wal_id>/<group>/<lsn>"; read back by primary key, so it needs no
-- index).
-- An id already here, or inserted by a concurrent transaction of another
-- proxy (the insert waits for that one to commit or roll back), is a
-- duplicate: its delta is left out. The row and the counter's upsert commit
-- together, so an id counts at most once per (ns, ckey, id) whichever proxy,
-- retry, replay or failover brings it.
--
-- `ring_pos` is the counter's ring position, so a reshard moves id rows with
-- their counter's hash range; `at` (unix seconds, when counted) lets retention
-- expire them after `idempotency.window` in chunked deletes.
CREATE TABLE IF NOT EXISTS applied_ids (
    ns       VARBINARY(64)   NOT NULL,
    ckey     VARBINARY(256)  NOT NULL,
    id       VARBINARY(160)  NOT NULL,
    ring_pos BIGINT UNSIGNED NOT NULL,
    at       BIGINT          NOT NULL COMMENT 'unix seconds when counted',
    src      BIGINT UNSIGNED NOT NULL COMMENT 'tag of the batch that counted it',
    PRIMARY KEY (ns, ckey, id),
    KEY by_ring (ring_pos),
    KEY by_age (at)
) ENGINE = InnoDB;

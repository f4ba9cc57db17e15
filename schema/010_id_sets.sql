-- Schema version 4 (issue #22, ids packed): the event ids a group counted,
-- kept as sets instead of a row each. One row per *set key*: an id of the
-- form `<prefix>/<n>` (n decimal, as an `Idempotency-Key` header gives the
-- events of a request: `<key>/<index>`) belongs to the set
-- `<prefix> 0x00 <n div 1024>`; any other id is its own set key. So the
-- ids of one request land in one row per group instead of one row per
-- event, and a batch of requests costs a row per request, not per event.
--
-- `segs` is a list of segments, one per batch that added to the row: the
-- batch's tag (8 bytes, the FNV-1a `src` tag of `007_applied_ids.sql`),
-- the entry count (4 bytes) and the entries, each the first 16 bytes of
-- SHA-256 over `routing key 0x00 id` (`ns 0x00 key 0x00 id`); all
-- integers little-endian. An event counts when its entry is in no segment
-- of its set's row; the flush appends its segment in the transaction that
-- upserts the counters (`storage::ids`). `n` is the number of entries;
-- past `idempotency.max_set_entries` a set takes no more and its new ids
-- go to `applied_ids` (a row each), while its row's `at` keeps being
-- renewed so the set outlives them.
--
-- `at` (unix seconds) is when a batch last wrote to the row (an entry, a
-- retry found to be a duplicate, or an id of a closed set): retention
-- expires a set `idempotency.window` after that, in chunked deletes, so
-- every entry is kept at least the window. A
-- reshard copies every set of its sources to the targets (a set mixes
-- counters of every range; an entry says "this event was counted", which
-- stays true wherever its counter moves).
CREATE TABLE IF NOT EXISTS applied_id_sets (
    skey VARBINARY(192)  NOT NULL,
    n    INT UNSIGNED    NOT NULL,
    at   BIGINT          NOT NULL COMMENT 'unix seconds of the last entry added',
    segs MEDIUMBLOB      NOT NULL,
    PRIMARY KEY (skey),
    KEY by_age (at)
) ENGINE = InnoDB;
-- Ids counted by a release before this one are rows in `applied_ids`.
-- `legacy_at` is the newest of them when this file first ran (0 on a new
-- database): while `applied_ids` still holds a row that old (retention
-- deletes them after the window), a flush also looks its ids up there,
-- so a retry across the upgrade is still a duplicate.
CREATE TABLE IF NOT EXISTS id_sets_state (
    id        TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    legacy_at BIGINT           NOT NULL COMMENT 'newest applied_ids.at at the upgrade'
) ENGINE = InnoDB;
INSERT IGNORE INTO id_sets_state (id, legacy_at)
    SELECT 1, COALESCE(MAX(at), 0) FROM applied_ids;
INSERT INTO schema_version (id, version) VALUES (1, 4)
    ON DUPLICATE KEY UPDATE version = GREATEST(version, 4);

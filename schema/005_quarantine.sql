-- Deltas the database refused deterministically, kept instead of counted.
--
-- A counter whose upsert fails the same way on every retry (its total would
-- pass the BIGINT range, error 1690; a value too long or incorrect) would
-- otherwise fail its whole batch forever and stall the group. The flush
-- isolates such counters and writes their deltas here, one row per counter
-- and minute, in the same transaction as the rest of the batch, so they are
-- kept exactly once and nothing else waits for them. None of the held
-- counter's tiers (minute, hour, day, total) is touched by that batch, so
-- they keep agreeing with each other.
--
-- `delta` is DECIMAL so that an in-memory sum past the 64-bit range is kept
-- exactly. `source` names the batch ("batch <writer_id>/<seq>") or the
-- write-ahead-log replay ("wal <wal_id>/<group>/<lsn>"). See
-- docs/operations.md, "Quarantined deltas", for inspecting and re-applying.
CREATE TABLE IF NOT EXISTS quarantine (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT,
    ns             VARBINARY(255)  NOT NULL,
    ckey           VARBINARY(1024) NOT NULL,
    bucket         BIGINT          NOT NULL COMMENT 'unix seconds of the minute',
    ring_pos       BIGINT UNSIGNED NOT NULL,
    delta          DECIMAL(39, 0)  NOT NULL,
    source         VARBINARY(255)  NOT NULL,
    reason         VARCHAR(255)    NOT NULL,
    quarantined_at TIMESTAMP       NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (id),
    KEY by_counter (ns, ckey),
    KEY by_ring (ring_pos)
) ENGINE = InnoDB;

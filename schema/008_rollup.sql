-- Schema version 2 (issue #21): a flush writes a counter's minute rows and
-- its total only; hour and day rows are rolled up from minute rows later,
-- over closed hours, by a per-group rollup task.
--
-- `rollup_state` holds the group's watermark (one row, id 1): every minute
-- below it is in `counter_hour` and `counter_day`, none at or above it is.
-- So an hour row (bucket h) exists only for h < watermark and holds the
-- whole hour; a day row (bucket d) holds the minutes of [d, min(d + 1 day,
-- watermark)). Reads take hour and day rows below the watermark and minute
-- rows at or above it, in one statement (one snapshot), so they are exact at
-- every moment. The rollup adds one closed hour's minute sums to the hour
-- and day rows and raises the watermark in one transaction, holding the
-- watermark row exclusively (a writer holding its shared lock commits
-- before; one that comes later waits and sees the new watermark), so an
-- hour is rolled up exactly once however
-- often the task is interrupted or run by several proxies. A flush reads the
-- watermark with a shared lock before it writes: its minutes below it
-- ("late" events) also go to the hour and day rows, in the flush's
-- transaction. Retention never
-- deletes minute rows at or above the watermark.
--
-- `rollup_touch` (one row) counts writes into the hour at the watermark: a
-- writer holding its shared lock on the watermark bumps it when it writes a
-- minute of that hour. The rollup sums the hour from a snapshot without
-- locking the minute rows (flushes go on meanwhile), then, holding the
-- watermark row exclusively, commits only if the count did not move since
-- that snapshot; otherwise it sums again (and after a few tries sums under
-- the lock).
--
-- A database created by schema version 1 (every flush wrote all four tiers)
-- starts with the watermark two hours ahead of the current hour, so every
-- existing minute is below it, and a version-1 proxy still running during a
-- rolling upgrade (it writes all four tiers) agrees with the late path for
-- that time. An empty database starts at 0: nothing is rolled up yet.
CREATE TABLE IF NOT EXISTS rollup_state (
    id         TINYINT UNSIGNED NOT NULL,
    watermark  BIGINT           NOT NULL COMMENT 'unix seconds, hour-aligned',
    updated_at TIMESTAMP(3)     NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (id)
) ENGINE = InnoDB;
INSERT IGNORE INTO rollup_state (id, watermark)
SELECT 1, IF(EXISTS (SELECT 1 FROM counter_hour LIMIT 1)
             OR EXISTS (SELECT 1 FROM counter_minute LIMIT 1),
             UNIX_TIMESTAMP() - MOD(UNIX_TIMESTAMP(), 3600) + 7200, 0);
CREATE TABLE IF NOT EXISTS rollup_touch (
    id  TINYINT UNSIGNED NOT NULL,
    seq BIGINT UNSIGNED  NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;
INSERT IGNORE INTO rollup_touch (id, seq) VALUES (1, 0);
-- The layout version of this database, raised (never lowered) by every proxy
-- at start; a proxy refuses a database newer than its own layout.
CREATE TABLE IF NOT EXISTS schema_version (
    id      TINYINT UNSIGNED NOT NULL,
    version INT UNSIGNED     NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;
INSERT INTO schema_version (id, version) VALUES (1, 2)
    ON DUPLICATE KEY UPDATE version = GREATEST(version, 2);

-- tally shard schema, version 1. Applied idempotently to every master at start
-- (and to masters that join later); replicas receive it by replication.
--
-- Every counter table stores `ring_pos`, the counter's position on the
-- consistent-hash ring (FNV-1a of the routing key `ns 0x00 key`), so that a
-- future reshard can select exactly the rows of a moved hash range with
-- `WHERE ring_pos BETWEEN a AND b`.
--
-- `ckey` is VARBINARY: keys compare and sort bytewise, which is what "ties
-- broken by key ascending" means for UTF-8 text, and no collation can fold
-- two distinct keys into one row.

-- The minute table has no `by_ring` (since schema version 3, see
-- 009_lean_minute.sql): a reshard finds a range's minute rows through the
-- counters' total rows, which every counter with a minute row has.
CREATE TABLE IF NOT EXISTS counter_minute (
    ns       VARBINARY(64)   NOT NULL,
    ckey     VARBINARY(256)  NOT NULL,
    bucket   BIGINT          NOT NULL COMMENT 'unix seconds of the bucket start',
    ring_pos BIGINT UNSIGNED NOT NULL,
    count    BIGINT          NOT NULL,
    PRIMARY KEY (ns, ckey, bucket),
    KEY by_bucket (ns, bucket, ckey)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS counter_hour (
    ns       VARBINARY(64)   NOT NULL,
    ckey     VARBINARY(256)  NOT NULL,
    bucket   BIGINT          NOT NULL COMMENT 'unix seconds of the bucket start',
    ring_pos BIGINT UNSIGNED NOT NULL,
    count    BIGINT          NOT NULL,
    PRIMARY KEY (ns, ckey, bucket),
    KEY by_ring (ring_pos),
    KEY by_bucket (ns, bucket, ckey)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS counter_day (
    ns       VARBINARY(64)   NOT NULL,
    ckey     VARBINARY(256)  NOT NULL,
    bucket   BIGINT          NOT NULL COMMENT 'unix seconds of the bucket start',
    ring_pos BIGINT UNSIGNED NOT NULL,
    count    BIGINT          NOT NULL,
    PRIMARY KEY (ns, ckey, bucket),
    KEY by_ring (ring_pos),
    KEY by_bucket (ns, bucket, ckey)
) ENGINE = InnoDB;

CREATE TABLE IF NOT EXISTS counter_total (
    ns       VARBINARY(64)   NOT NULL,
    ckey     VARBINARY(256)  NOT NULL,
    ring_pos BIGINT UNSIGNED NOT NULL,
    count    BIGINT          NOT NULL,
    PRIMARY KEY (ns, ckey),
    KEY by_ring (ring_pos)
) ENGINE = InnoDB;

-- Exactly-once flushes: one row per applied batch, inserted in the same
-- transaction as the batch's upserts. A retried batch whose row already exists
-- was applied before and is not applied again.
CREATE TABLE IF NOT EXISTS applied_batches (
    writer_id  VARBINARY(64)   NOT NULL,
    seq        BIGINT UNSIGNED NOT NULL,
    row_count  INT UNSIGNED    NOT NULL,
    applied_at TIMESTAMP       NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (writer_id, seq),
    KEY by_time (applied_at)
) ENGINE = InnoDB;

-- Online resharding: one row per copied chunk of a moved hash range, written
-- on the *target* master in the same transaction as the chunk's rows. A read
-- of a moved key checks, in the same snapshot as the target's rows, whether
-- its position is covered here: if so the target holds everything and the
-- source is not read; if not, the source's rows are added. A retried copy
-- whose marker exists was applied before and is skipped.
CREATE TABLE IF NOT EXISTS reshard_chunks (
    reshard_id     VARBINARY(64)   NOT NULL,
    range_start    BIGINT UNSIGNED NOT NULL,
    range_end      BIGINT UNSIGNED NOT NULL,
    source         VARBINARY(64)   NOT NULL,
    row_count      INT UNSIGNED    NOT NULL COMMENT 'rows of every tier copied',
    counters       INT UNSIGNED    NOT NULL COMMENT 'counter_total rows copied',
    total_sum      BIGINT          NOT NULL COMMENT 'sum of the copied totals',
    created_at     TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (reshard_id, range_start)
) ENGINE = InnoDB;

-- Durable buffered acks (`durability: wal`): per proxy life (`wal_id`, the
-- proxy's writer id) and group, the highest write-ahead-log LSN whose events
-- are all in this database. A flush upserts it in the same transaction as its
-- batch; a replay after a crash reads it with a locking read, applies only
-- records above it and raises it, again in one transaction, so a record is
-- applied exactly once however often replay runs.
CREATE TABLE IF NOT EXISTS wal_applied (
    wal_id     VARBINARY(64)   NOT NULL,
    grp        VARBINARY(64)   NOT NULL,
    lsn        BIGINT UNSIGNED NOT NULL,
    updated_at TIMESTAMP       NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
    PRIMARY KEY (wal_id, grp)
) ENGINE = InnoDB;

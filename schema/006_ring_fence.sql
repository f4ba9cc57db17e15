-- The routing fence of a reshard source (issue #19): the first topology
-- version whose ring moved keys away from this master. The reshard driver
-- raises it on every source before it copies anything; every flush
-- transaction reads it with a shared lock after its dedup row and refuses
-- a batch whose deltas were routed by an older topology, so a proxy that
-- missed the reshard (cut off from the topology store, a wrong clock)
-- cannot commit moved keys to the source after the copy, into rows no read
-- consults and cleanup deletes. The raise waits for flushes that already
-- read it (their shared lock), so every older batch commits before the copy
-- starts or is refused after. One row, id 1; absent means 0.
CREATE TABLE IF NOT EXISTS ring_fence (
    id      TINYINT UNSIGNED NOT NULL,
    version BIGINT UNSIGNED  NOT NULL,
    PRIMARY KEY (id)
) ENGINE = InnoDB;

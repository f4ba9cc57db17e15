-- The shared topology store (`topology.store` in proxy.yaml): a database on
-- any MariaDB server that every proxy of a deployment can reach.

-- Every accepted topology, by version. A change is a compare-and-set: the
-- proxy inserts version = current + 1, and the primary key lets exactly one
-- of two concurrent changes win.
CREATE TABLE IF NOT EXISTS topology_versions (
    version    BIGINT UNSIGNED NOT NULL PRIMARY KEY,
    doc        MEDIUMTEXT      NOT NULL,
    source     VARBINARY(32)   NOT NULL,
    proxy_id   VARBINARY(64)   NOT NULL,
    created_at TIMESTAMP(3)    NOT NULL DEFAULT CURRENT_TIMESTAMP(3)
) ENGINE = InnoDB;

-- One row per proxy, refreshed by its heartbeat.
CREATE TABLE IF NOT EXISTS proxies (
    id        VARBINARY(64)   NOT NULL PRIMARY KEY,
    http      VARBINARY(255)  NOT NULL,
    admin     VARBINARY(255)  NOT NULL,
    version   BIGINT UNSIGNED NOT NULL,
    pending   BIGINT UNSIGNED NOT NULL,
    last_seen TIMESTAMP(3)    NOT NULL
) ENGINE = InnoDB;

-- Leases, e.g. `failover:g0`: at most one proxy holds one at a time.
CREATE TABLE IF NOT EXISTS leases (
    name       VARBINARY(128) NOT NULL PRIMARY KEY,
    holder     VARBINARY(64)  NOT NULL,
    expires_at TIMESTAMP(3)   NOT NULL
) ENGINE = InnoDB;

-- Optional physical layout for large fleets: hash-partition the tables by key before the first
-- `hydra migrate` (the migration creates tables only if they do not exist). Partitions can later be
-- spread over machines (e.g. Citus: SELECT create_distributed_table('providers', 'key');).
--   psql "$DATABASE_URL" -f deploy/postgres/partitioned.sql && hydra migrate --database-url "$DATABASE_URL"
-- Tested by tests/postgres.rs (partitioned_schema_works).
BEGIN;
CREATE TABLE providers (
    key        bytea       NOT NULL,
    provider   bytea       NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, provider)
) PARTITION BY HASH (key);
CREATE TABLE providers_p0 PARTITION OF providers FOR VALUES WITH (MODULUS 4, REMAINDER 0) WITH (fillfactor = 85);
CREATE TABLE providers_p1 PARTITION OF providers FOR VALUES WITH (MODULUS 4, REMAINDER 1) WITH (fillfactor = 85);
CREATE TABLE providers_p2 PARTITION OF providers FOR VALUES WITH (MODULUS 4, REMAINDER 2) WITH (fillfactor = 85);
CREATE TABLE providers_p3 PARTITION OF providers FOR VALUES WITH (MODULUS 4, REMAINDER 3) WITH (fillfactor = 85);

CREATE TABLE peer_addrs (
    peer       bytea       NOT NULL PRIMARY KEY,
    addrs      bytea       NOT NULL,
    expires_at timestamptz NOT NULL
) PARTITION BY HASH (peer);
CREATE TABLE peer_addrs_p0 PARTITION OF peer_addrs FOR VALUES WITH (MODULUS 4, REMAINDER 0) WITH (fillfactor = 85);
CREATE TABLE peer_addrs_p1 PARTITION OF peer_addrs FOR VALUES WITH (MODULUS 4, REMAINDER 1) WITH (fillfactor = 85);
CREATE TABLE peer_addrs_p2 PARTITION OF peer_addrs FOR VALUES WITH (MODULUS 4, REMAINDER 2) WITH (fillfactor = 85);
CREATE TABLE peer_addrs_p3 PARTITION OF peer_addrs FOR VALUES WITH (MODULUS 4, REMAINDER 3) WITH (fillfactor = 85);
COMMIT;

-- Fleet store schema (PostgreSQL 15). See docs/decisions/2026-11-23-postgres-schema.md.
--
-- Tables are created only if absent, so an operator may create them beforehand with another
-- physical layout (deploy/postgres/partitioned.sql: hash partitions by key) and then migrate.

-- One row per (key, provider). No index on expires_at: refreshes stay HOT updates (fillfactor
-- leaves room on each page) and garbage collection sweeps heap-page ranges instead.
CREATE TABLE IF NOT EXISTS providers (
    key        bytea       NOT NULL,
    provider   bytea       NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (key, provider)
) WITH (fillfactor = 85);

-- Provider addresses: one row per peer, shared by all of its records, with their own expiry.
CREATE TABLE IF NOT EXISTS peer_addrs (
    peer       bytea       NOT NULL PRIMARY KEY,
    addrs      bytea       NOT NULL,
    expires_at timestamptz NOT NULL
) WITH (fillfactor = 85);

-- PUT_VALUE records (/pk/ and /ipns/).
CREATE TABLE IF NOT EXISTS value_records (
    key           bytea       NOT NULL PRIMARY KEY,
    value         bytea       NOT NULL,
    time_received text        NOT NULL,
    expires_at    timestamptz NOT NULL
);

-- Delete expired rows of one heap relation in the page range [first_page, end_page).
-- A TID range scan touches only those pages: no expiry index, no rescans between chunks.
-- Rows a writer holds are skipped (SKIP LOCKED), so the collector never waits on a writer: it
-- takes row locks in page order while writers take them in key order, and waiting would let the
-- two deadlock. A skipped row is collected by a later round, if it is still expired then.
-- The relation comes in as regclass, so the dynamic statement names a real table.
CREATE OR REPLACE FUNCTION hydra_gc_pages(rel regclass, first_page bigint, end_page bigint, now_ts timestamptz)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    deleted bigint;
BEGIN
    EXECUTE format(
        'DELETE FROM %s WHERE ctid = ANY (ARRAY('
        '  SELECT ctid FROM %s WHERE ctid >= $1 AND ctid < $2 AND expires_at <= $3'
        '  FOR UPDATE SKIP LOCKED))', rel, rel)
        USING format('(%s,0)', first_page)::tid, format('(%s,0)', end_page)::tid, now_ts;
    GET DIAGNOSTICS deleted = ROW_COUNT;
    RETURN deleted;
END
$$;

-- The heap relations holding a table's rows: its leaf partitions, or the table itself.
CREATE OR REPLACE FUNCTION hydra_heap_relations(tbl regclass)
RETURNS TABLE (rel regclass, pages bigint) LANGUAGE sql STABLE AS $$
    SELECT r, pg_relation_size(r) / current_setting('block_size')::bigint
    FROM (
        SELECT c.oid::regclass AS r FROM pg_class c WHERE c.oid = tbl AND c.relkind = 'r'
        UNION ALL
        SELECT t.relid::regclass FROM pg_partition_tree(tbl) t WHERE t.isleaf
    ) s
$$;

-- Row-count estimate from the catalogue (never count(*)): reltuples scaled by current size.
CREATE OR REPLACE FUNCTION hydra_estimate_rows(tbl regclass)
RETURNS double precision LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(
        CASE WHEN c.relpages > 0 AND c.reltuples > 0
             THEN c.reltuples / c.relpages * (pg_relation_size(c.oid) / current_setting('block_size')::bigint)
             ELSE 0 END), 0)
    FROM hydra_heap_relations(tbl) h JOIN pg_class c ON c.oid = h.rel
$$;

-- Embedded store schema. Times are milliseconds since the Unix epoch.

-- One row per (key, provider). Refreshes move expires_at forward; reads filter expired rows.
CREATE TABLE providers (
    key        BLOB    NOT NULL,
    provider   BLOB    NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (key, provider)
) WITHOUT ROWID;

-- The embedded store has one writer and no concurrent-write contention, so an expiry index
-- (which keeps garbage collection a cheap range scan) costs little here.
CREATE INDEX providers_expires_at ON providers (expires_at);

-- Provider addresses, one row per peer, not duplicated per record; they expire on their own.
CREATE TABLE peer_addrs (
    peer       BLOB    NOT NULL PRIMARY KEY,
    addrs      BLOB    NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX peer_addrs_expires_at ON peer_addrs (expires_at);

-- PUT_VALUE records (/pk/ and /ipns/ namespaces).
CREATE TABLE value_records (
    key           BLOB    NOT NULL PRIMARY KEY,
    value         BLOB    NOT NULL,
    time_received TEXT    NOT NULL,
    expires_at    INTEGER NOT NULL
) WITHOUT ROWID;

CREATE INDEX value_records_expires_at ON value_records (expires_at);

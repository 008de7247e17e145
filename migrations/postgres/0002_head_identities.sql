-- Head identities and their leases, shared by the whole fleet. Private keys are never stored:
-- every process re-derives them from the fleet's seed. All changes happen under the advisory
-- transaction lock taken by `acquire_heads`.

-- Facts about this database's fleet (e.g. the identity seed's fingerprint).
CREATE TABLE IF NOT EXISTS hydra_meta (
    key   text  NOT NULL PRIMARY KEY,
    value bytea NOT NULL
);

-- The balanced sequence: identity idx uses candidate `choice` of the seed's derivation.
CREATE TABLE IF NOT EXISTS head_identities (
    idx     integer  NOT NULL PRIMARY KEY,
    choice  smallint NOT NULL,
    kad_key bytea    NOT NULL,
    peer_id text     NOT NULL
);

-- Which process (node_name) runs identity idx in which slot (port_base + slot), until when.
CREATE TABLE IF NOT EXISTS head_leases (
    idx        integer     NOT NULL PRIMARY KEY REFERENCES head_identities (idx),
    node_name  text        NOT NULL,
    slot       integer     NOT NULL,
    addrs      text        NOT NULL DEFAULT '',
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS head_leases_node ON head_leases (node_name);

-- Head identities and their leases. Private keys are never stored: they derive from the seed.

-- Facts about this datastore's fleet (e.g. the identity seed's fingerprint).
CREATE TABLE hydra_meta (
    key   TEXT NOT NULL PRIMARY KEY,
    value BLOB NOT NULL
);

-- The balanced sequence: identity idx uses candidate `choice` of the seed's derivation.
CREATE TABLE head_identities (
    idx     INTEGER NOT NULL PRIMARY KEY,
    choice  INTEGER NOT NULL,
    kad_key BLOB    NOT NULL,
    peer_id TEXT    NOT NULL
);

-- Which process (node_name) runs identity idx in which slot (port_base + slot), until when.
CREATE TABLE head_leases (
    idx        INTEGER NOT NULL PRIMARY KEY REFERENCES head_identities (idx),
    node_name  TEXT    NOT NULL,
    slot       INTEGER NOT NULL,
    addrs      TEXT    NOT NULL DEFAULT '',
    expires_at INTEGER NOT NULL
);
CREATE INDEX head_leases_node ON head_leases (node_name);

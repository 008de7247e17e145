#![allow(dead_code)] // each fuzz target uses one of these
//! What each fuzz target does with one input — shared by the libFuzzer targets
//! (`fuzz/fuzz_targets/`) and the corpus replay in `tests/fuzz_corpus.rs`, so CI replays exactly
//! what was fuzzed. Each must return (never panic, never hang) whatever the bytes.

use libp2p::PeerId;

/// A fixed sender: the decoder keeps ADD_PROVIDER entries of the authenticated sender only.
fn sender() -> PeerId {
    "12D3KooWC6HMwTpSanKmpCLPPd21GxqTG1YjCC9Kj3B6Jfj1njXL".parse().expect("a valid peer ID")
}

/// An inbound `/ipfs/kad/1.0.0` message body; a decoded request's reply is encoded too.
pub fn wire(data: &[u8]) {
    use hydra::net::wire::{decode_request, encode_response, Request, Response};
    if let Ok(req) = decode_request(data, &sender()) {
        let resp = match req {
            Request::FindNode { key } => Response::FindNode { key, closer: Vec::new() },
            Request::GetProviders { key } => {
                Response::GetProviders { key, providers: Vec::new(), closer: Vec::new() }
            }
            Request::AddProvider { key, providers, .. } => {
                Response::GetProviders { key, providers, closer: Vec::new() }
            }
            Request::GetValue { key } => Response::GetValue { key, record: None, closer: Vec::new() },
            Request::PutValue { key, record } => Response::PutValue { key, record },
            Request::Ping => Response::Ping,
        };
        let _ = encode_response(&resp);
    }
}

/// A PUT_VALUE record: the first byte splits key from value (`/pk/` and `/ipns/` validation).
pub fn records(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = (split as usize).min(rest.len());
    let (key, value) = rest.split_at(at);
    let mut key = key.to_vec();
    if split & 1 == 0 {
        key = [b"/ipns/".as_slice(), &key].concat();
    }
    let r = hydra::types::ValueRecord { key, value: value.to_vec(), time_received: String::new() };
    let _ = hydra::providers::records::validate(&r, 1_700_000_000_000);
}

/// CIDs, multihashes and peer IDs as people and HTTP clients write them.
pub fn keys(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(k) = hydra::keys::parse_provider_key(text) {
        let _ = hydra::keys::key_to_cid(&k);
    }
    if let Ok(p) = hydra::keys::parse_peer_id(text) {
        let _ = hydra::keys::ipns_name(&p);
    }
}

/// A config file: parsed, then validated.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(f) = hydra::config::ConfigFile::from_toml(text) {
        let _ = f.validate();
    }
}

//! The `/ipfs/kad/1.0.0` wire format: protobuf messages framed by an unsigned-varint length.
//!
//! This module owns the protobuf structs (declared here with prost because libp2p-kad's generated
//! types are private), the length-prefixed framing with its size limit, and the one conversion
//! between wire messages and the domain [`Request`] / [`Response`] types. Nothing outside this
//! module sees a protobuf struct.
//!
//! Field numbers follow go-libp2p-kad-dht's `dht.proto`: `Message` {type=1, key=2, record=3,
//! closerPeers=8, providerPeers=9, clusterLevelRaw=10}; `Peer` {id=1, addrs=2, connection=3};
//! `Record` {key=1, value=2, timeReceived=5}.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::{Multiaddr, PeerId};
use prost::Message as _;

pub use crate::types::{MessageType, MAX_MESSAGE_SIZE};
use crate::types::{PeerRecord, ProviderKey, ValueRecord};

/// Protobuf `Message` of the DHT protocol.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbMessage {
    #[prost(int32, tag = "1")]
    pub r#type: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub key: Vec<u8>,
    #[prost(message, optional, tag = "3")]
    pub record: Option<PbRecord>,
    #[prost(message, repeated, tag = "8")]
    pub closer_peers: Vec<PbPeer>,
    #[prost(message, repeated, tag = "9")]
    pub provider_peers: Vec<PbPeer>,
    #[prost(int32, tag = "10")]
    pub cluster_level_raw: i32,
}

/// Protobuf `Message.Peer`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbPeer {
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    #[prost(bytes = "vec", repeated, tag = "2")]
    pub addrs: Vec<Vec<u8>>,
    #[prost(int32, tag = "3")]
    pub connection: i32,
}

/// Protobuf `Record` (from go-libp2p-record).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PbRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
    #[prost(string, tag = "5")]
    pub time_received: String,
}

/// A decoded inbound request.
#[derive(Debug, Clone)]
pub enum Request {
    FindNode {
        key: Vec<u8>,
    },
    GetProviders {
        key: ProviderKey,
    },
    /// Provider entries are already filtered: only those whose id is the authenticated sender
    /// and that carry at least one address remain. May be empty (then nothing is stored).
    AddProvider {
        key: ProviderKey,
        providers: Vec<PeerRecord>,
        rejected: usize,
    },
    GetValue {
        key: Vec<u8>,
    },
    PutValue {
        key: Vec<u8>,
        record: ValueRecord,
    },
    Ping,
}

impl Request {
    pub fn message_type(&self) -> MessageType {
        match self {
            Request::FindNode { .. } => MessageType::FindNode,
            Request::GetProviders { .. } => MessageType::GetProviders,
            Request::AddProvider { .. } => MessageType::AddProvider,
            Request::GetValue { .. } => MessageType::GetValue,
            Request::PutValue { .. } => MessageType::PutValue,
            Request::Ping => MessageType::Ping,
        }
    }
}

/// A reply to send back on the stream.
#[derive(Debug, Clone)]
pub enum Response {
    FindNode { key: Vec<u8>, closer: Vec<PeerRecord> },
    GetProviders { key: ProviderKey, providers: Vec<PeerRecord>, closer: Vec<PeerRecord> },
    GetValue { key: Vec<u8>, record: Option<ValueRecord>, closer: Vec<PeerRecord> },
    PutValue { key: Vec<u8>, record: ValueRecord },
    Ping,
}

/// Why an inbound message could not be turned into a [`Request`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed protobuf: {0}")]
    Protobuf(#[from] prost::DecodeError),
    #[error("unknown message type {0}")]
    UnknownType(i32),
    #[error("invalid key: {0}")]
    InvalidKey(&'static str),
    #[error("PUT_VALUE without a record, or record key differs from message key")]
    BadRecord,
    #[error("more than {MAX_ENTRIES_PER_MESSAGE} peers and addresses in one message")]
    TooManyEntries,
}

/// Peers and addresses one inbound message may carry. A request needs a handful (ADD_PROVIDER:
/// the sender and its addresses); the bound keeps decoding from expanding a message: a 4 MiB
/// body of empty address fields would otherwise decode into 2 M vectors (about 50 MiB).
pub const MAX_ENTRIES_PER_MESSAGE: usize = 1024;

/// Count the peers (fields 8 and 9) and their addresses (field 2 of each) of a `Message` on the
/// wire, without decoding it: a pass over the bytes, no allocation. `Err` when there are more
/// than [`MAX_ENTRIES_PER_MESSAGE`]; malformed bytes are left for the decoder to report.
fn check_entries(bytes: &[u8]) -> Result<(), DecodeError> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    /// Visit each field of a message: (field number, length-delimited payload if any).
    fn fields(mut b: &[u8], mut f: impl FnMut(u64, Option<&[u8]>) -> bool) -> Option<()> {
        while !b.is_empty() {
            let tag = varint(&mut b)?;
            let payload = match tag & 7 {
                0 => {
                    varint(&mut b)?;
                    None
                }
                1 => {
                    b = b.get(8..)?;
                    None
                }
                2 => {
                    let len = usize::try_from(varint(&mut b)?).ok()?;
                    let (p, rest) = (b.get(..len)?, &b[len..]);
                    b = rest;
                    Some(p)
                }
                5 => {
                    b = b.get(4..)?;
                    None
                }
                _ => return None,
            };
            if !f(tag >> 3, payload) {
                return Some(());
            }
        }
        Some(())
    }
    let mut entries = 0usize;
    let _ = fields(bytes, |field, payload| {
        if let (8 | 9, Some(peer)) = (field, payload) {
            entries += 1;
            let _ = fields(peer, |f, _| {
                if f == 2 {
                    entries += 1;
                }
                entries <= MAX_ENTRIES_PER_MESSAGE
            });
        }
        entries <= MAX_ENTRIES_PER_MESSAGE
    });
    if entries > MAX_ENTRIES_PER_MESSAGE {
        return Err(DecodeError::TooManyEntries);
    }
    Ok(())
}

/// Decode one message body received from `sender`.
pub fn decode_request(bytes: &[u8], sender: &PeerId) -> Result<Request, DecodeError> {
    check_entries(bytes)?;
    let msg = PbMessage::decode(bytes)?;
    let ty = MessageType::from_i32(msg.r#type).ok_or(DecodeError::UnknownType(msg.r#type))?;
    Ok(match ty {
        MessageType::Ping => Request::Ping,
        MessageType::FindNode => Request::FindNode { key: msg.key },
        MessageType::GetProviders => {
            Request::GetProviders { key: ProviderKey::new(msg.key).map_err(DecodeError::InvalidKey)? }
        }
        MessageType::AddProvider => {
            let key = ProviderKey::new(msg.key).map_err(DecodeError::InvalidKey)?;
            let total = msg.provider_peers.len();
            let providers: Vec<PeerRecord> = msg
                .provider_peers
                .into_iter()
                .filter_map(|p| peer_from_pb(p).ok())
                .filter(|p| &p.peer == sender && !p.addrs.is_empty())
                .collect();
            let rejected = total - providers.len();
            Request::AddProvider { key, providers, rejected }
        }
        MessageType::GetValue => {
            if msg.key.is_empty() {
                return Err(DecodeError::InvalidKey("empty"));
            }
            Request::GetValue { key: msg.key }
        }
        MessageType::PutValue => {
            let record = msg.record.ok_or(DecodeError::BadRecord)?;
            if record.key != msg.key || msg.key.is_empty() {
                return Err(DecodeError::BadRecord);
            }
            Request::PutValue {
                key: msg.key,
                record: ValueRecord {
                    key: record.key,
                    value: record.value,
                    time_received: record.time_received,
                },
            }
        }
    })
}

/// Encode a reply into a protobuf body (without the length prefix).
pub fn encode_response(resp: &Response) -> Vec<u8> {
    let msg = match resp {
        Response::Ping => PbMessage { r#type: MessageType::Ping as i32, ..Default::default() },
        Response::FindNode { key, closer } => PbMessage {
            r#type: MessageType::FindNode as i32,
            key: key.clone(),
            closer_peers: closer.iter().map(peer_to_pb).collect(),
            ..Default::default()
        },
        Response::GetProviders { key, providers, closer } => PbMessage {
            r#type: MessageType::GetProviders as i32,
            key: key.as_bytes().to_vec(),
            provider_peers: providers.iter().map(peer_to_pb).collect(),
            closer_peers: closer.iter().map(peer_to_pb).collect(),
            ..Default::default()
        },
        Response::GetValue { key, record, closer } => PbMessage {
            r#type: MessageType::GetValue as i32,
            key: key.clone(),
            record: record.as_ref().map(record_to_pb),
            closer_peers: closer.iter().map(peer_to_pb).collect(),
            ..Default::default()
        },
        Response::PutValue { key, record } => PbMessage {
            r#type: MessageType::PutValue as i32,
            key: key.clone(),
            record: Some(record_to_pb(record)),
            ..Default::default()
        },
    };
    msg.encode_to_vec()
}

fn record_to_pb(r: &ValueRecord) -> PbRecord {
    PbRecord { key: r.key.clone(), value: r.value.clone(), time_received: r.time_received.clone() }
}

/// Wire `connection` value for peers we report: go uses CAN_CONNECT (2) for peers it knows
/// addresses of; clients ignore it in practice.
const CONNECTION_CAN_CONNECT: i32 = 2;

pub fn peer_to_pb(p: &PeerRecord) -> PbPeer {
    PbPeer {
        id: p.peer.to_bytes(),
        addrs: p.addrs.iter().map(|a| a.to_vec()).collect(),
        connection: CONNECTION_CAN_CONNECT,
    }
}

/// Addresses kept per peer record; more are dropped (go-libp2p keeps a similar handful).
pub const MAX_ADDRS_PER_PEER: usize = 32;
/// Longest binary multiaddr kept.
pub const MAX_ADDR_LEN: usize = 1024;

/// Decode a wire peer. Unparseable, oversized and surplus addresses are skipped, so one record
/// can never make replies (or cached answers) large.
pub fn peer_from_pb(p: PbPeer) -> Result<PeerRecord, &'static str> {
    let peer = PeerId::from_bytes(&p.id).map_err(|_| "invalid peer id")?;
    let addrs = p
        .addrs
        .into_iter()
        .filter(|a| a.len() <= MAX_ADDR_LEN)
        .filter_map(|a| Multiaddr::try_from(a).ok())
        .take(MAX_ADDRS_PER_PEER)
        .collect();
    Ok(PeerRecord { peer, addrs })
}

/// Outcome of reading one frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed length prefix")]
    BadPrefix,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Read the varint length prefix. `Ok(None)` means a clean EOF before any byte of a new frame.
pub async fn read_length<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<usize>, FrameError> {
    let mut value: u64 = 0;
    for i in 0..10 {
        let mut b = [0u8; 1];
        match r.read(&mut b).await? {
            0 if i == 0 => return Ok(None),
            0 => return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into())),
            _ => {}
        }
        value |= u64::from(b[0] & 0x7f) << (7 * i);
        if b[0] & 0x80 == 0 {
            return usize::try_from(value).map(Some).map_err(|_| FrameError::BadPrefix);
        }
    }
    Err(FrameError::BadPrefix)
}

/// Read a frame body of `len` bytes (the caller has checked `len` against its limits).
pub async fn read_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Write one length-prefixed frame and flush it.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> std::io::Result<()> {
    let mut prefix = Vec::with_capacity(10 + body.len());
    let mut n = body.len() as u64;
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            prefix.push(byte);
            break;
        }
        prefix.push(byte | 0x80);
    }
    prefix.extend_from_slice(body);
    w.write_all(&prefix).await?;
    w.flush().await
}

/// Encode a request (used by the load generator and tests acting as a raw client).
pub fn encode_request(ty: MessageType, key: &[u8], providers: &[PeerRecord]) -> Vec<u8> {
    PbMessage {
        r#type: ty as i32,
        key: key.to_vec(),
        provider_peers: providers.iter().map(peer_to_pb).collect(),
        ..Default::default()
    }
    .encode_to_vec()
}

/// Decode a reply body (raw clients).
pub fn decode_message(bytes: &[u8]) -> Result<PbMessage, prost::DecodeError> {
    PbMessage::decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn varint_frames_round_trip() {
        for len in [0usize, 1, 127, 128, 300, 70_000] {
            let body = vec![7u8; len];
            let mut out = Vec::new();
            write_frame(&mut futures::io::Cursor::new(&mut out), &body).await.unwrap();
            let mut cur = futures::io::Cursor::new(out);
            let n = read_length(&mut cur).await.unwrap().unwrap();
            assert_eq!(n, len);
            assert_eq!(read_body(&mut cur, n).await.unwrap(), body);
            assert!(read_length(&mut cur).await.unwrap().is_none(), "clean EOF after frame");
        }
    }

    #[test]
    fn a_message_of_many_tiny_entries_is_refused_before_it_is_decoded() {
        let me = PeerId::random();
        let key = vec![0x12, 0x20, 1, 2, 3];
        // One provider with 2 M empty addresses: 4 MiB on the wire, ~50 MiB decoded.
        let peer = PbPeer { id: me.to_bytes(), addrs: vec![Vec::new(); 2_000_000], connection: 0 };
        let msg = PbMessage {
            r#type: MessageType::AddProvider as i32,
            key: key.clone(),
            provider_peers: vec![peer],
            ..Default::default()
        };
        let bytes = msg.encode_to_vec();
        assert!(bytes.len() <= MAX_MESSAGE_SIZE, "{} bytes", bytes.len());
        assert!(matches!(decode_request(&bytes, &me), Err(DecodeError::TooManyEntries)));
        // So are many peers; an ordinary announcement, even with many addresses, is not.
        let many = PbMessage {
            r#type: MessageType::AddProvider as i32,
            key: key.clone(),
            provider_peers: vec![PbPeer::default(); 2000],
            ..Default::default()
        };
        assert!(matches!(decode_request(&many.encode_to_vec(), &me), Err(DecodeError::TooManyEntries)));
        let addrs =
            (0..200).map(|i| format!("/ip4/127.0.0.1/tcp/{i}").parse::<Multiaddr>().unwrap().to_vec());
        let ok = PbMessage {
            r#type: MessageType::AddProvider as i32,
            key,
            provider_peers: vec![PbPeer { id: me.to_bytes(), addrs: addrs.collect(), connection: 0 }],
            ..Default::default()
        };
        let Ok(Request::AddProvider { providers, .. }) = decode_request(&ok.encode_to_vec(), &me) else {
            panic!("an ordinary announcement decodes")
        };
        assert_eq!(providers[0].addrs.len(), MAX_ADDRS_PER_PEER);
        // Truncated bytes are still the decoder's to report.
        let cut = &ok.encode_to_vec()[..20];
        assert!(matches!(decode_request(cut, &me), Err(DecodeError::Protobuf(_))));
    }

    #[test]
    fn add_provider_keeps_only_sender_with_addresses() {
        let me = PeerId::random();
        let other = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let body = encode_request(
            MessageType::AddProvider,
            b"key",
            &[
                PeerRecord { peer: other, addrs: vec![addr.clone()] },
                PeerRecord { peer: me, addrs: vec![] },
                PeerRecord { peer: me, addrs: vec![addr.clone()] },
            ],
        );
        match decode_request(&body, &me).unwrap() {
            Request::AddProvider { providers, rejected, .. } => {
                assert_eq!(providers, vec![PeerRecord { peer: me, addrs: vec![addr] }]);
                assert_eq!(rejected, 2);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn addresses_per_provider_are_capped() {
        let me = PeerId::random();
        let addr: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let mut pb = peer_to_pb(&PeerRecord { peer: me, addrs: vec![addr; 1000] });
        pb.addrs.push(vec![0u8; 5000]);
        assert_eq!(peer_from_pb(pb).unwrap().addrs.len(), MAX_ADDRS_PER_PEER);
    }

    #[test]
    fn provider_key_length_is_checked() {
        let me = PeerId::random();
        for bad in [vec![], vec![1u8; 81]] {
            let body = encode_request(MessageType::GetProviders, &bad, &[]);
            assert!(matches!(decode_request(&body, &me), Err(DecodeError::InvalidKey(_))));
        }
        let body = encode_request(MessageType::GetProviders, &[1u8; 80], &[]);
        assert!(decode_request(&body, &me).is_ok());
    }

    #[test]
    fn put_value_record_key_must_match() {
        let me = PeerId::random();
        let msg = PbMessage {
            r#type: MessageType::PutValue as i32,
            key: b"/pk/a".to_vec(),
            record: Some(PbRecord { key: b"/pk/b".to_vec(), value: vec![1], time_received: String::new() }),
            ..Default::default()
        };
        assert!(matches!(decode_request(&msg.encode_to_vec(), &me), Err(DecodeError::BadRecord)));
    }
}

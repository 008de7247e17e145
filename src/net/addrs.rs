//! The address filter: which peer addresses may enter a routing table or a reply.

use std::net::{Ipv4Addr, Ipv6Addr};

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use crate::config::AddressFilter;
use crate::net::wire::{MAX_ADDRS_PER_PEER, MAX_ADDR_LEN};

/// Whether `ip` is globally routable: not loopback, private, shared (CGNAT 100.64/10),
/// link-local, "this network" (0/8), benchmarking (198.18/15), documentation, multicast,
/// reserved (240/4) or broadcast.
fn public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || a == 0
        || ip.is_broadcast()
        || ip.is_documentation()
        || ip.is_multicast()
        || a >= 240
        || (a == 100 && (b & 0xc0) == 64)
        || (a == 198 && (b & 0xfe) == 18))
}

/// Whether `ip` is globally routable; an IPv4-mapped or -compatible address is judged as IPv4.
fn public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return public_v4(v4);
    }
    let seg0 = ip.segments()[0];
    !(ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg0 & 0xfe00) == 0xfc00 // unique local
        || (seg0 & 0xffc0) == 0xfe80 // link-local
        || (seg0 == 0x2001 && ip.segments()[1] == 0x0db8) // documentation
        || ip.segments()[..6] == [0; 6]) // IPv4-compatible (deprecated) and the rest of ::/96
}

/// Whether an address learned from a peer may enter the routing table under `filter`.
pub fn admit(filter: AddressFilter, a: &Multiaddr) -> bool {
    match filter {
        AddressFilter::Any => true,
        AddressFilter::Public => match a.iter().next() {
            Some(Protocol::Ip4(ip)) => public_v4(ip),
            Some(Protocol::Ip6(ip)) => public_v6(ip),
            Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => true,
            _ => false,
        },
    }
}

/// The addresses of a peer that may enter a routing table: admitted by `filter`, at most
/// [`MAX_ADDRS_PER_PEER`] of them, each at most [`MAX_ADDR_LEN`] bytes — whatever the peer sent
/// (an identify push may carry any number).
pub fn admitted(filter: AddressFilter, addrs: impl IntoIterator<Item = Multiaddr>) -> Vec<Multiaddr> {
    addrs
        .into_iter()
        .filter(|a| a.len() <= MAX_ADDR_LEN && admit(filter, a))
        .take(MAX_ADDRS_PER_PEER)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_closes_its_gaps() {
        // Parsed and classified only; nothing is dialled.
        for a in [
            "/ip6/::ffff:10.0.0.1/tcp/1",
            "/ip6/::ffff:127.0.0.1/tcp/1",
            "/ip4/224.0.0.1/tcp/1",
            "/ip4/0.1.2.3/tcp/1",
            "/ip4/198.18.0.1/tcp/1",
            "/ip4/198.19.255.1/tcp/1",
            "/ip4/240.0.0.1/tcp/1",
            "/ip6/ff02::1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/ip6/::/tcp/1",
        ] {
            assert!(!admit(AddressFilter::Public, &a.parse().unwrap()), "{a}");
        }
        for a in ["/ip4/198.20.0.1/tcp/1", "/ip6/::ffff:8.8.8.8/tcp/1", "/ip4/223.255.0.1/tcp/1"] {
            assert!(admit(AddressFilter::Public, &a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn a_peer_cannot_push_unbounded_addresses() {
        let many: Vec<Multiaddr> =
            (0..1000).map(|i| format!("/dns4/h{i}.example.org/tcp/1").parse().unwrap()).collect();
        assert_eq!(admitted(AddressFilter::Any, many).len(), MAX_ADDRS_PER_PEER);
        let long: Multiaddr = format!("/dns4/{}.org/tcp/1", "a".repeat(MAX_ADDR_LEN)).parse().unwrap();
        assert!(admitted(AddressFilter::Any, [long]).is_empty(), "an address over the size cap");
    }

    // Addresses below are only parsed and classified; nothing is dialled. The filter's job is to
    // tell private from globally routable ranges, so the test needs one of each.
    #[test]
    fn public_filter_drops_local_ranges() {
        for a in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/10.1.2.3/tcp/1",
            "/ip4/192.168.1.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
        ] {
            assert!(!admit(AddressFilter::Public, &a.parse().unwrap()), "{a}");
            assert!(admit(AddressFilter::Any, &a.parse().unwrap()), "{a}");
        }
        for a in ["/ip4/8.8.8.8/tcp/4001", "/ip6/2001:4860::1/udp/4001/quic-v1", "/dns4/example.com/tcp/4001"]
        {
            assert!(admit(AddressFilter::Public, &a.parse().unwrap()), "{a}");
        }
    }
}

//! The address filter: which peer addresses may enter a routing table or a reply.

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;

use crate::config::AddressFilter;

/// Whether an address learned from a peer may enter the routing table under `filter`.
pub fn admit(filter: AddressFilter, a: &Multiaddr) -> bool {
    match filter {
        AddressFilter::Any => true,
        AddressFilter::Public => match a.iter().next() {
            Some(Protocol::Ip4(ip)) => {
                !(ip.is_loopback()
                    || ip.is_private()
                    || ip.is_link_local()
                    || ip.is_unspecified()
                    || ip.is_broadcast()
                    || ip.is_documentation()
                    || (ip.octets()[0] == 100 && (ip.octets()[1] & 0xc0) == 64))
            }
            Some(Protocol::Ip6(ip)) => {
                let seg0 = ip.segments()[0];
                !(ip.is_loopback()
                    || ip.is_unspecified()
                    || (seg0 & 0xfe00) == 0xfc00
                    || (seg0 & 0xffc0) == 0xfe80)
            }
            Some(Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_) | Protocol::Dnsaddr(_)) => true,
            _ => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

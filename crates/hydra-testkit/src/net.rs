//! Clients on distinct loopback source addresses, as separate hosts would have: per-IP limits
//! can be tested on one machine (a TCP socket may bind any of 127.0.0.0/8 before connecting).

use std::net::Ipv4Addr;
use std::time::Duration;

use futures::future::BoxFuture;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{Multiaddr, Swarm};

/// A dial-only client swarm (TCP, Noise, Yamux) whose connections all come from `src`.
pub fn bound_swarm<B: NetworkBehaviour>(
    src: Ipv4Addr,
    behaviour: impl FnOnce(&libp2p::identity::Keypair) -> B,
) -> Swarm<B> {
    libp2p::SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_other_transport(|key| {
            use libp2p::core::upgrade::Version;
            use libp2p::Transport as _;
            Ok(BoundTcp(src)
                .upgrade(Version::V1)
                .authenticate(libp2p::noise::Config::new(key)?)
                .multiplex(libp2p::yamux::Config::default()))
        })
        .expect("a TCP + Noise + Yamux transport")
        .with_behaviour(|k| behaviour(k))
        .expect("the behaviour")
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(3600)))
        .build()
}

/// A dial-only TCP transport whose sockets are bound to one source address before connecting.
pub struct BoundTcp(pub Ipv4Addr);

impl libp2p::Transport for BoundTcp {
    type Output = libp2p::tcp::tokio::TcpStream;
    type Error = std::io::Error;
    type ListenerUpgrade = futures::future::Pending<Result<Self::Output, Self::Error>>;
    type Dial = BoxFuture<'static, Result<Self::Output, Self::Error>>;

    fn listen_on(
        &mut self,
        _: libp2p::core::transport::ListenerId,
        addr: Multiaddr,
    ) -> Result<(), libp2p::core::transport::TransportError<Self::Error>> {
        Err(libp2p::core::transport::TransportError::MultiaddrNotSupported(addr))
    }

    fn remove_listener(&mut self, _: libp2p::core::transport::ListenerId) -> bool {
        false
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        _: libp2p::core::transport::DialOpts,
    ) -> Result<Self::Dial, libp2p::core::transport::TransportError<Self::Error>> {
        let mut it = addr.iter();
        let (Some(Protocol::Ip4(ip)), Some(Protocol::Tcp(port))) = (it.next(), it.next()) else {
            return Err(libp2p::core::transport::TransportError::MultiaddrNotSupported(addr));
        };
        let src = self.0;
        Ok(Box::pin(async move {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind((src, 0).into())?;
            let stream = socket.connect((ip, port).into()).await?;
            stream.set_nodelay(true)?;
            Ok(libp2p::tcp::tokio::TcpStream(stream))
        }))
    }

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<libp2p::core::transport::TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        std::task::Poll::Pending
    }
}

//! Silent and slow peers (`--silent-peers`): identities that open streams to every head and then
//! misbehave the ways the bitswap stream-close incident (`shared/seeds/`) showed — never write,
//! stop in the middle of a message, or send a request and never read the reply. Each keeps
//! `streams` such streams per head open, reopening one as soon as the node ends it. What they
//! cost the node must be memory and a deadline, not service to everyone else.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use hydra::net::wire::{self, MessageType};
use hydra::net::KAD_PROTOCOL;
use libp2p::{Multiaddr, PeerId};
use tokio_util::sync::CancellationToken;

use super::client::{connect, random_key, source};

/// Running silent peers; dropping them (or `stop`) ends their streams.
pub(crate) struct Silent {
    cancel: CancellationToken,
    /// Streams the node ended (reset or closed) and the peers reopened.
    pub(crate) ended: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Silent {
    pub(crate) fn stop(self) {
        self.cancel.cancel();
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Start `peers` silent identities (source addresses after the first `first` clients'), each
/// holding `streams` misbehaving streams on every head.
pub(crate) async fn start(
    first: usize,
    peers: usize,
    streams: usize,
    heads: &[(PeerId, Multiaddr)],
) -> anyhow::Result<Silent> {
    let cancel = CancellationToken::new();
    let ended = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..peers {
        let (_, control, _, driver) = connect(source(first + i), heads).await?;
        tasks.push(driver);
        for (head, _) in heads {
            for s in 0..streams {
                let (mut control, head, cancel, ended) =
                    (control.clone(), *head, cancel.clone(), ended.clone());
                tasks.push(tokio::spawn(async move {
                    while !cancel.is_cancelled() {
                        let Ok(mut stream) = control.open_stream(head, KAD_PROTOCOL).await else {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        };
                        let _ = match s % 3 {
                            // Opens and never writes.
                            0 => Ok(()),
                            // Stops in the middle of a message: a length prefix of 200, 10 bytes.
                            1 => stream.write_all(&[200, 1, 8, 4, 18, 34, 0x12, 0x20, 1, 2, 3]).await,
                            // Sends a request and never reads the reply.
                            _ => {
                                let req = wire::encode_request(MessageType::FindNode, &random_key(), &[]);
                                wire::write_frame(&mut stream, &req).await
                            }
                        };
                        // Hold the stream until the node ends it (we never read a reply ourselves:
                        // a read returning means the stream is gone).
                        let mut buf = [0u8; 1];
                        let gone = async {
                            loop {
                                match stream.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(_) if s % 3 == 2 => {
                                        // "never reads": stop reading once the reply starts.
                                        std::future::pending::<()>().await
                                    }
                                    Ok(_) => {}
                                }
                            }
                        };
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = gone => { ended.fetch_add(1, Ordering::Relaxed); }
                        }
                    }
                }));
            }
        }
    }
    Ok(Silent { cancel, ended, tasks })
}

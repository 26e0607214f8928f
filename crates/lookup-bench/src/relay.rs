//! A counting TCP relay on 127.0.0.1, put between a client and Postgres to count the round
//! trips an operation costs (`invalidate_round_trips`).
//!
//! Bytes go through unchanged. Two things make the count robust:
//!
//! - **Flights.** A write from the client counts as a new flight when the client has been
//!   handed server data since its previous write: a pipelined batch (however many TCP writes
//!   and protocol messages it takes) is one flight; a statement sent after reading a reply is
//!   another.
//! - **A delay line.** The server's bytes can be held back by a fixed delay (each chunk leaves
//!   `delay` after it arrived, in order, so chunks do not add up). Under a delay far longer than
//!   the time it takes a client to write a pipelined batch, a batch can never be split by a
//!   reply arriving in the middle of it, so the flight count is exact; and the call's duration
//!   grows by `delay` for each round trip it waits on, which gives a second, independent count
//!   to check the first against.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What every connection of a relay shares: the flight counter and the current delay.
#[derive(Debug, Default)]
struct Shared {
    flights: AtomicU64,
    delay_us: AtomicU64,
}

/// A running relay; stops accepting when dropped (open connections end when their peers close).
#[derive(Debug)]
pub(crate) struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Listens on a free loopback port and relays each connection to `upstream`.
    pub(crate) async fn start(upstream: SocketAddr) -> Result<Relay> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .context("cannot open the counting relay's port")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accepting = Arc::clone(&shared);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let shared = Arc::clone(&accepting);
                tokio::spawn(async move {
                    // A relay error ends the connection, which the client then reports.
                    let _ = relay(client, upstream, shared).await;
                });
            }
        });
        Ok(Relay { addr, shared, accept })
    }

    /// The relay's port on 127.0.0.1.
    pub(crate) fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Client flights counted so far, over every connection.
    pub(crate) fn flights(&self) -> u64 {
        self.shared.flights.load(Ordering::SeqCst)
    }

    /// Holds every chunk of server data back by `delay` from now on.
    pub(crate) fn set_delay(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.shared.delay_us.store(micros, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Relays one connection until either side closes it.
async fn relay(client: TcpStream, upstream: SocketAddr, shared: Arc<Shared>) -> Result<()> {
    let server = TcpStream::connect(upstream).await?;
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    // Whether the client has been handed server data since its last write (true at the start:
    // its first write is a flight).
    let answered = Arc::new(AtomicBool::new(true));

    let up = {
        let (answered, shared) = (Arc::clone(&answered), Arc::clone(&shared));
        async move {
            let mut buf = vec![0_u8; 64 * 1024];
            loop {
                let n = client_rd.read(&mut buf).await?;
                if n == 0 {
                    server_wr.shutdown().await?;
                    return anyhow::Ok(());
                }
                if answered.swap(false, Ordering::SeqCst) {
                    shared.flights.fetch_add(1, Ordering::SeqCst);
                }
                server_wr.write_all(&buf[..n]).await?;
            }
        }
    };
    let (chunks_tx, mut chunks) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let down_read = async move {
        let mut buf = vec![0_u8; 64 * 1024];
        loop {
            let n = server_rd.read(&mut buf).await?;
            if n == 0 {
                return anyhow::Ok(());
            }
            let delay = Duration::from_micros(shared.delay_us.load(Ordering::SeqCst));
            if chunks_tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                return Ok(());
            }
        }
    };
    let down_write = async move {
        while let Some((due, bytes)) = chunks.recv().await {
            tokio::time::sleep_until(due).await;
            // Marked before the bytes leave: the client cannot answer data it has not got,
            // and under a delay nothing it writes meanwhile belongs to an earlier flight.
            answered.store(true, Ordering::SeqCst);
            client_wr.write_all(&bytes).await?;
        }
        client_wr.shutdown().await?;
        anyhow::Ok(())
    };
    // The client closing ends the relay; the server closing ends it once its last bytes
    // (its error message, say) have been delivered.
    let down = async {
        let (read, write) = tokio::join!(down_read, down_write);
        read.and(write)
    };
    tokio::select! {
        result = up => result,
        result = down => result,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: every read is written back at once.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0_u8; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn pipelined_writes_are_one_flight_and_each_wait_is_another() {
        let relay = Relay::start(echo_server().await).await.expect("relay");
        relay.set_delay(Duration::from_millis(20));
        let mut client = TcpStream::connect(("127.0.0.1", relay.port())).await.expect("connect");
        // As tokio-postgres does: without it, Nagle's algorithm holds the second write back
        // until the first is acknowledged, which a delayed ACK puts after the delayed reply.
        client.set_nodelay(true).expect("nodelay");
        let mut buf = [0_u8; 6];
        for round in 1..=3_u64 {
            // Three writes before any read: one flight.
            for part in [b"ab", b"cd", b"ef"] {
                client.write_all(part).await.expect("write");
            }
            client.read_exact(&mut buf).await.expect("read");
            assert_eq!(&buf, b"abcdef");
            assert_eq!(relay.flights(), round);
        }
    }

    #[tokio::test]
    async fn the_delay_holds_back_each_reply_once() {
        let relay = Relay::start(echo_server().await).await.expect("relay");
        let delay = Duration::from_millis(30);
        relay.set_delay(delay);
        let mut client = TcpStream::connect(("127.0.0.1", relay.port())).await.expect("connect");
        let started = std::time::Instant::now();
        let mut buf = [0_u8; 1];
        for _ in 0..2 {
            client.write_all(b"x").await.expect("write");
            client.read_exact(&mut buf).await.expect("read");
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= 2 * delay && elapsed < 3 * delay, "{elapsed:?}");
    }
}

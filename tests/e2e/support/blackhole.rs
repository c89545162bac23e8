//! A TCP relay that can be cut silently: while cut, it moves no byte in either direction and
//! completes no new connection towards its upstream, but closes nothing and refuses nothing,
//! as a network that drops packets does (not one that refuses them). Healed, it moves what
//! waited. One replica's traffic to PostgreSQL goes through it while the others' does not.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct Blackhole {
    pub addr: SocketAddr,
    cut: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Blackhole {
    /// Relays 127.0.0.1:<port> to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Blackhole {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding");
        let addr = listener.local_addr().expect("address");
        let (cut, watching) = watch::channel(false);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let watching = watching.clone();
                tokio::spawn(async move {
                    let mut healed = watching.clone();
                    // A new connection waits, unanswered, for as long as the cut lasts.
                    if healed.wait_for(|cut| !cut).await.is_err() {
                        return;
                    }
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    tokio::spawn(pump(client_read, server_write, watching.clone()));
                    tokio::spawn(pump(server_read, client_write, watching));
                });
            }
        });
        Blackhole { addr, cut, accept }
    }

    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    pub fn heal(&self) {
        self.cut.send_replace(false);
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding still (reading nothing more, writing nothing) while cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if cut.wait_for(|cut| !cut).await.is_err() {
            return;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        // Read just before a cut: held until it heals, as a dropped packet is resent then.
        if cut.wait_for(|cut| !cut).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

//! TCP relays across a network namespace's boundary: the local cluster's
//! agents and operator, in namespaces, reach the API server on the host
//! through one ([`Forwarder::start`]); the host reaches the operator's
//! `/metrics` and console API in the client namespace through others
//! ([`Forwarder::into_ns`]).

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use godwit_testkit::netns::Netns;

/// Relays connections from the fabric to the API server on the host.
pub struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    /// Listens on `listen` inside namespace `ns` and relays every
    /// connection to `upstream` (outside it).
    pub fn start(
        ns: &Netns,
        listen: (&'static str, u16),
        upstream: std::net::SocketAddr,
    ) -> std::io::Result<Forwarder> {
        // The listening socket belongs to the namespace of the thread that
        // creates it; accept() works on it from any thread.
        let listener = ns
            .run_in(move || TcpListener::bind(listen))
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("api-forwarder".into())
            .spawn(move || accept_loop(&listener, upstream, &s))?;
        Ok(Forwarder {
            stop,
            thread: Some(thread),
        })
    }

    /// Listens on the host's loopback (a free port) and relays every
    /// connection to `upstream` inside namespace `ns`; the forwarder and
    /// the host address it listens on.
    pub fn into_ns(
        ns: &Netns,
        upstream: std::net::SocketAddr,
    ) -> std::io::Result<(Forwarder, std::net::SocketAddr)> {
        // Made here, on the host; the accepting thread joins `ns`, so the
        // sockets it connects are the namespace's.
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let inner = ns
            .spawn_in(move || accept_loop(&listener, upstream, &s))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let thread = std::thread::Builder::new()
            .name("ns-forwarder".into())
            .spawn(move || {
                let _ = inner.join();
            })?;
        Ok((
            Forwarder {
                stop,
                thread: Some(thread),
            },
            addr,
        ))
    }

    /// Stops accepting (relays under way end with their connections).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts on `listener` until `stop`, relaying each connection to `upstream`.
fn accept_loop(listener: &TcpListener, upstream: std::net::SocketAddr, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((down, _)) => {
                let _ = down.set_nonblocking(false);
                if let Ok(up) = TcpStream::connect(upstream) {
                    relay(down, up);
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Copies both ways until either side closes.
fn relay(a: TcpStream, b: TcpStream) {
    let pipe = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 16 << 10];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Write);
            let _ = from.shutdown(Shutdown::Read);
        });
    };
    if let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) {
        pipe(a, b2);
        pipe(b, a2);
    }
}

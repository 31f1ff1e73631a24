//! A TCP relay from a network namespace to an address outside it: the
//! local cluster's agents, in node namespaces, reach the API server on the
//! host through it.

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
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
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
            })?;
        Ok(Forwarder {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting (relays under way end with their connections).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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

//! Post-copy recovery: what each end does when the link is lost while the
//! guest's memory is split between the two VMMs (the outcomes are in
//! [`super`]'s docs).
//!
//! - Which failures count as a lost link: `connection_lost` (the source
//!   decides on it) and `link_quiet` (the target waits only for a quiet
//!   link, never for a source that closed its end).
//! - The source dials the target again and sends `Resume`
//!   (`reconnect_source`); the target takes the newest connection,
//!   answers `ResumeAck` with what it still lacks and asks again for the
//!   pages its vCPUs wait for (`reconnect_target`).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::needed::Needed;
use crate::migration::error::MigrationError;
use crate::migration::guest::SourceVm;
use crate::migration::progress::{ProgressHandle, Stage};
use crate::migration::protocol::{self, Command};
use crate::migration::session::{Rejoin, Source};
use crate::migration::tls::SessionError;
use crate::migration::transport::Conn;

/// Whether `e` means the connection is gone (it broke, closed, or went
/// quiet for the stall timeout) rather than that the peer refused
/// something (an `Abort`, a malformed frame, a failed TLS record). With a
/// way to reconnect, post-copy then tries to carry on over a new
/// connection: a lost link looks, from either end, like a quiet
/// connection and, once it is back, like one the other end has closed.
/// The source decides on this (its dial is refused when the target VMM is
/// gone) and keeps the connections it gives up open, so that no FIN
/// reaches the target; the target waits only for a quiet link
/// ([`link_quiet`]).
pub(crate) fn connection_lost(e: &MigrationError) -> bool {
    match e {
        MigrationError::StreamClosed => true,
        MigrationError::Protocol(protocol::ProtocolError::Io(io)) => {
            !io.get_ref().is_some_and(|inner| inner.is::<SessionError>())
        }
        _ => false,
    }
}

/// Whether `e` is a quiet or unreachable link (nothing heard or
/// acknowledged for the stall timeout), as opposed to a connection the peer
/// closed or reset. The target waits for the source only after this: a
/// source that closed its end has exited, and waiting for it would keep a
/// half-run guest alive next to the VM's restart.
pub(crate) fn link_quiet(e: &MigrationError) -> bool {
    use std::io::ErrorKind::*;
    let MigrationError::Protocol(protocol::ProtocolError::Io(io)) = e else {
        return false;
    };
    matches!(
        io.kind(),
        WouldBlock | TimedOut | HostUnreachable | NetworkUnreachable
    ) || matches!(
        io.raw_os_error(),
        Some(libc::ETIMEDOUT | libc::EHOSTUNREACH | libc::ENETUNREACH)
    )
}

/// The source after a lost link: drops the old connection and dials the target until
/// the recovery timeout, then sends `Resume` and returns what the target
/// answers (whether the guest runs there, the runs of pages it still needs).
/// A target that refuses the connection outright (its VMM is gone), or
/// answers with anything but `ResumeAck` (an `Abort`, say), ends the
/// attempt for good; a connection that breaks or stays silent is dialled
/// again.
pub(crate) fn reconnect_source<V: SourceVm>(
    src: &mut Source<'_, V>,
    why: &MigrationError,
) -> Result<(bool, Vec<(u64, u32)>), MigrationError> {
    let reconnect = src
        .opts
        .reconnect
        .clone()
        .expect("reconnect_source is only called with a way to reconnect");
    let deadline = Instant::now() + src.opts.recover_timeout;
    tracing::warn!(
        timeout = ?src.opts.recover_timeout,
        "post-copy link lost ({}); dialling the target again",
        godwit_crds::error_chain(why)
    );
    src.progress.update(|p| {
        p.reconnecting = true;
        p.reconnects += 1;
        p.stage = Stage::PostCopy;
    });
    let mut last = clone_io(why);
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        match (reconnect.0)(left.min(Duration::from_secs(2))) {
            Ok(conn) => {
                src.replace_stream(conn)?;
                let resume = protocol::Resume {
                    vm_name: src.opts.vm_name.clone(),
                };
                let answer = src
                    .writer
                    .send(Command::Resume, &protocol::encode_json(&resume))
                    .map_err(MigrationError::from)
                    .and_then(|()| src.expect(Command::ResumeAck, src.opts.stall_timeout));
                match answer {
                    Ok(payload) => {
                        let (activated, runs) = protocol::parse_resume_ack(&payload)?;
                        tracing::info!(
                            activated,
                            pages = runs.iter().map(|r| u64::from(r.1)).sum::<u64>(),
                            "post-copy resumed on a new connection"
                        );
                        src.progress.update(|p| p.reconnecting = false);
                        return Ok((activated, runs));
                    }
                    // This connection broke or went quiet (the target
                    // may have taken a newer one): dial again.
                    Err(
                        e @ (MigrationError::Protocol(protocol::ProtocolError::Io(_))
                        | MigrationError::StreamClosed),
                    ) => last = e,
                    Err(e) => return Err(e),
                }
            }
            Err(MigrationError::Connect(addr, io))
                if io.kind() == std::io::ErrorKind::ConnectionRefused =>
            {
                return Err(MigrationError::Connect(addr, io));
            }
            Err(e) => last = e,
        }
        std::thread::sleep(
            Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    Err(MigrationError::LinkNotBack(
        src.opts.recover_timeout,
        Box::new(last),
    ))
}

/// What the target needs to resume post-copy on a new connection.
pub(crate) struct Recovery<'a> {
    /// Takes the source's next connection.
    pub rejoin: &'a Rejoin<'a>,
    /// The VM being received (a `Resume` for another is refused).
    pub vm_name: &'a str,
    /// How long to wait for the source to come back.
    pub timeout: Duration,
    /// Read timeout of the new connection.
    pub stall_timeout: Duration,
}

/// The target after a lost link: drops the old connection and waits for the source's
/// `Resume` on a new one until `deadline`; answers `ResumeAck`
/// with whether the guest runs here and what is still missing, then asks
/// again for the pages faulting vCPUs wait for, and makes the new
/// connection the one the fault thread writes to. Returns its read half.
pub(crate) fn reconnect_target(
    rec: &Recovery<'_>,
    why: &MigrationError,
    old: &Conn,
    deadline: Instant,
    (needed, running, writer, failed): (&Needed, &AtomicBool, &Mutex<Conn>, &AtomicBool),
    progress: &ProgressHandle,
) -> Result<Conn, MigrationError> {
    tracing::warn!(
        timeout = ?rec.timeout,
        "post-copy link lost ({}); waiting for the source to reconnect",
        godwit_crds::error_chain(why)
    );
    let _ = old.socket().shutdown(std::net::Shutdown::Both);
    progress.update(|p| {
        p.reconnecting = true;
        p.reconnects += 1;
    });
    loop {
        if failed.load(Ordering::Acquire) {
            return Err(MigrationError::StreamClosed);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(MigrationError::LinkNotBack(
                rec.timeout,
                Box::new(clone_io(why)),
            ));
        }
        let Some(conn) = (rec.rejoin)(deadline.min(now + Duration::from_secs(1)))? else {
            continue;
        };
        let attempt = (|| -> Result<Conn, MigrationError> {
            conn.socket()
                .set_read_timeout(Some(rec.stall_timeout))
                .and_then(|()| conn.socket().set_nodelay(true))
                .map_err(MigrationError::Socket)?;
            let mut reader = conn.try_clone().map_err(MigrationError::Socket)?;
            let mut payload = Vec::new();
            let header = protocol::read_frame(&mut reader, &mut payload)?;
            if header.command != Command::Resume {
                return Err(protocol::ProtocolError::Unexpected {
                    got: header.command,
                    expected: "Resume",
                }
                .into());
            }
            let resume: protocol::Resume = protocol::parse_json(Command::Resume, &payload)?;
            if resume.vm_name != rec.vm_name {
                return Err(MigrationError::WrongVm {
                    got: resume.vm_name,
                    expected: rec.vm_name.to_string(),
                });
            }
            // Under the writer's lock: the fault thread's next request goes
            // out on the new connection, after these.
            let mut w = writer.lock().unwrap();
            *w = conn.try_clone().map_err(MigrationError::Socket)?;
            let runs = needed.runs();
            protocol::write_frame(
                &mut *w,
                Command::ResumeAck,
                &protocol::encode_resume_ack(running.load(Ordering::Acquire), &runs),
            )?;
            let outstanding = needed.outstanding();
            if !outstanding.is_empty() {
                protocol::write_frame(
                    &mut *w,
                    Command::PageRequest,
                    &protocol::encode_page_request(&outstanding),
                )?;
            }
            w.flush()
                .map_err(|e| MigrationError::Protocol(protocol::ProtocolError::Io(e)))?;
            tracing::info!(
                missing = runs.iter().map(|r| u64::from(r.1)).sum::<u64>(),
                asked = outstanding.len(),
                "post-copy resumed on a new connection"
            );
            Ok(reader)
        })();
        match attempt {
            Ok(reader) => {
                progress.update(|p| p.reconnecting = false);
                return Ok(reader);
            }
            Err(e) => {
                tracing::warn!(
                    "refused a connection to resume post-copy: {}",
                    godwit_crds::error_chain(&e)
                );
                let _ = conn.socket().shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

/// A copy of a lost-link error for the report (I/O errors do not clone).
pub(crate) fn clone_io(e: &MigrationError) -> MigrationError {
    match e {
        MigrationError::Protocol(protocol::ProtocolError::Io(io)) => MigrationError::Protocol(
            protocol::ProtocolError::Io(std::io::Error::new(io.kind(), io.to_string())),
        ),
        _ => MigrationError::StreamClosed,
    }
}

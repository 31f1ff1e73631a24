//! Unix sockets only their owner can use.
//!
//! The VMM's control socket can stop, snapshot and migrate the VM, and its
//! console socket types into the guest: only the node daemon (root, the
//! VMM's owner) may connect. Connecting to a Unix socket needs write
//! permission on it, so each is created mode `0600`: the socket is
//! `fchmod`ed before `bind`, and Linux gives the file the socket's own mode
//! (less the umask), so there is no moment when it is open to others and the
//! sandboxed VMM needs no `chmod` by path. The agent also keeps every VM
//! directory `0700` (see `agent::vm_dir`).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a listening socket at `path` (replacing a stale one) that only
/// its owner can connect to. It is bound and listening under a temporary
/// name first and then renamed into place, so a client that sees `path`
/// never meets a socket that refuses connections.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = std::path::PathBuf::from(tmp);
    let listener = bind_at(&tmp)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(listener)
}

fn bind_at(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "socket path too long (at most 103 bytes) or holds a NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: plain syscalls on a descriptor this function owns, with a
    // sockaddr_un that lives across the call.
    unsafe {
        let raw = check(libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let fd = OwnedFd::from_raw_fd(raw);
        check(libc::fchmod(fd.as_raw_fd(), 0o600))?;
        check(libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        ))?;
        check(libc::listen(fd.as_raw_fd(), 128))?;
        Ok(UnixListener::from(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    /// Tries to connect to `path` as user `nobody` (uid 65534): in a child
    /// that has switched user, before it would exec `true`. Returns the
    /// connect error, or `None` when it connected.
    fn connect_as_nobody(path: &Path) -> Option<std::io::Error> {
        let bytes = path.as_os_str().as_bytes().to_vec();
        // SAFETY: an all-zero sockaddr_un is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(&bytes) {
            *d = *s as libc::c_char;
        }
        let mut cmd = Command::new("/bin/true");
        cmd.uid(65534).gid(65534);
        // SAFETY: only socket and connect (async-signal-safe) between fork
        // and exec; std runs this after it has switched the user.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::connect(
                    fd,
                    (&addr as *const libc::sockaddr_un).cast(),
                    std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                );
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.status().err()
    }

    #[test]
    fn only_the_owner_can_connect() {
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "this test needs root (as the node daemon runs)"
        );
        // A directory anyone may enter: only the socket's own mode can refuse.
        let dir = std::env::temp_dir().join(format!("godwit-private-sock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("api.sock");
        let _listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let nobody = connect_as_nobody(&path);
        let owner = std::os::unix::net::UnixStream::connect(&path);
        // The check itself can tell: with the socket opened to all, nobody
        // connects.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let opened = connect_as_nobody(&path);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(mode, 0o600);
        assert_eq!(
            nobody.as_ref().map(std::io::Error::kind),
            Some(std::io::ErrorKind::PermissionDenied),
            "another user: {nobody:?}"
        );
        assert!(owner.is_ok(), "the owner cannot connect: {owner:?}");
        assert!(opened.is_none(), "the check itself fails: {opened:?}");
    }
}

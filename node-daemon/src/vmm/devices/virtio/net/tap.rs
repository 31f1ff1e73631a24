//! Tap devices: create (or open) a tap, bring it up, attach it to a bridge.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use super::super::VirtioError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: i16 = 0x0002;
const IFF_NO_PI: i16 = 0x1000;
const SIOCGIFINDEX: libc::c_ulong = 0x8933;
const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const ARPHRD_ETHER: u16 = 1;

#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    data: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut r = IfReq::default();
        let n = name.len().min(15);
        r.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        r
    }
    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(16);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open tap device; it disappears with the fd unless it was persistent.
pub struct Tap {
    /// The tap fd (non-blocking).
    pub file: File,
    /// Interface name.
    pub name: String,
    /// The node agent created it, brought it up and attached it to its
    /// bridge ([`crate::vmm::handover`]): [`Tap::up`] and [`Tap::attach`]
    /// have nothing left to do.
    pub handed: bool,
}

/// Whether `bridge` exists and is a bridge.
pub fn bridge_exists(bridge: &str) -> bool {
    Path::new("/sys/class/net")
        .join(bridge)
        .join("bridge")
        .exists()
}

fn ctl_socket() -> std::io::Result<File> {
    // SAFETY: plain socket(2) call; the fd is owned by the returned File.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket we own.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn ioctl(fd: &File, req: libc::c_ulong, ifr: &mut IfReq) -> std::io::Result<()> {
    // SAFETY: `ifr` is a valid, writable 40-byte ifreq for the whole call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req as _, ifr as *mut IfReq) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Creates the tap `name` (or opens it if it exists as a persistent
    /// tap); an empty name lets the kernel pick `tapN`.
    pub fn open(name: &str) -> Result<Tap, VirtioError> {
        let err = |e| VirtioError::CreateTap(name.to_string(), e);
        if let Some(fd) = crate::vmm::handover::take_tap(name) {
            let file = File::from(fd);
            set_nonblocking(&file).map_err(err)?;
            return Ok(Tap {
                file,
                name: name.to_string(),
                handed: true,
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags_nonblock()
            .open("/dev/net/tun")
            .map_err(err)?;
        let mut ifr = IfReq::new(name);
        ifr.data[..2].copy_from_slice(&(IFF_TAP | IFF_NO_PI).to_ne_bytes());
        ioctl(&file, TUNSETIFF, &mut ifr).map_err(err)?;
        Ok(Tap {
            file,
            name: ifr.name(),
            handed: false,
        })
    }

    /// Creates tap `name` (as [`Tap::open`] does without a handed one),
    /// adds it to `bridge` and brings it up: what the node agent does
    /// before it hands the tap to an unprivileged VMM.
    pub fn create_for_vmm(name: &str, bridge: Option<&str>) -> Result<Tap, VirtioError> {
        let tap = Tap::open(name)?;
        if let Some(b) = bridge {
            tap.attach(b)?;
        }
        tap.up()?;
        Ok(tap)
    }

    /// Sets the interface up.
    pub fn up(&self) -> Result<(), VirtioError> {
        if self.handed {
            return Ok(());
        }
        let err = |e| VirtioError::TapUp(self.name.clone(), e);
        let sock = ctl_socket().map_err(err)?;
        let mut ifr = IfReq::new(&self.name);
        ioctl(&sock, SIOCGIFFLAGS, &mut ifr).map_err(err)?;
        let flags = i16::from_ne_bytes([ifr.data[0], ifr.data[1]]) | libc::IFF_UP as i16;
        ifr.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(&sock, SIOCSIFFLAGS, &mut ifr).map_err(err)
    }

    /// Adds the tap to `bridge`, after giving it [`host_mac`]: a Linux
    /// bridge whose address was never set takes the lowest of its ports'
    /// addresses, so a tap with a random one could change the address of
    /// a bridge that carries the node's IP, and the neighbours' ARP caches
    /// would send the node's traffic to an address nobody answers (seen as
    /// migration connections timing out after a VMM on the node came or
    /// went). `fe:` sorts above any address the kernel picks at random
    /// except its 1/64 that start with `fe` themselves, as libvirt's taps do.
    pub fn attach(&self, bridge: &str) -> Result<(), VirtioError> {
        if self.handed {
            return Ok(());
        }
        if !bridge_exists(bridge) {
            return Err(VirtioError::NoBridge(bridge.to_string()));
        }
        let err = |e| VirtioError::AttachBridge(self.name.clone(), bridge.to_string(), e);
        let sock = ctl_socket().map_err(err)?;
        let mut hw = IfReq::new(&self.name);
        hw.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
        hw.data[2..8].copy_from_slice(&host_mac(&self.name));
        ioctl(&sock, SIOCSIFHWADDR, &mut hw).map_err(err)?;
        let mut ifr = IfReq::new(&self.name);
        ioctl(&sock, SIOCGIFINDEX, &mut ifr).map_err(err)?;
        let index = i32::from_ne_bytes([ifr.data[0], ifr.data[1], ifr.data[2], ifr.data[3]]);
        let mut br = IfReq::new(bridge);
        br.data[..4].copy_from_slice(&index.to_ne_bytes());
        ioctl(&sock, SIOCBRADDIF, &mut br).map_err(err)
    }
}

/// The host-side address of tap `name`: `fe:` and five bytes of a hash
/// of the name (distinct taps, distinct addresses; see [`Tap::attach`]).
pub fn host_mac(name: &str) -> [u8; 6] {
    // FNV-1a: stable across builds, unlike std's hasher.
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = h.to_be_bytes();
    [0xfe, b[0], b[1], b[2], b[3], b[4]]
}

fn set_nonblocking(file: &File) -> std::io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL only read and set the file's status flags.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0
        || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for std::fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
    }
}

//! The directories a node serves images from (`--image-dir`, the chart's
//! `node.imageDirs`), and the one way the agent opens a file that a VM's
//! author named: beneath one of them, never as a plain path.
//!
//! A VM's spec (and its resolved machine, an annotation its author can
//! write) names kernels, initrds, disk images and template images by path.
//! The agent runs as root; were it to open such a path as given, a VM
//! author could load any file of the node into their guest (the migration
//! CA key, kubelet's credentials, another VM's disk). So every such path
//! must be absolute, free of `.` and `..`, and under an image directory,
//! and the agent opens the rest of it from that directory with `openat2`
//! and `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: a
//! symlink anywhere below the image directory is refused, whoever planted
//! it. The file must be a regular file. A kernel without `openat2` (before
//! Linux 5.6) refuses every such path.
//!
//! The one exception: for a machine made from a `ClusterVMTemplate`, a
//! path that this template names exactly (its image source, kernel or
//! initrd; see [`TrustedPaths`]). Only cluster administrators make those,
//! and the agent learns their paths from the API server itself
//! ([`super::cluster_templates`]), never from the VM: a machine that claims
//! a template can only get that template's files, which its author could
//! use anyway. Such a file is opened read-only, not following a symbolic
//! link in its last component.
//!
//! What a VMM is handed: the kernel and initrd as the descriptor opened
//! here (`/proc/self/fd/N`); disk and template images by the path checked
//! here, which names the same file as long as nobody but the node's
//! administrators can write the image directories (they are the
//! administrators' by definition).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, RwLock};

use godwit_crds::contract::{Machine, MachineDiskSource};

/// The node's image directories.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImageDirs {
    dirs: Vec<PathBuf>,
    trusted: TrustedPaths,
}

/// The exact paths each of the cluster's `ClusterVMTemplate`s names (by
/// template name), allowed outside the image directories for a machine made
/// from that template; shared by every clone of an [`ImageDirs`] and kept
/// current by [`super::cluster_templates::keep_current`].
#[derive(Clone, Debug, Default)]
pub struct TrustedPaths(Arc<RwLock<BTreeMap<String, BTreeSet<PathBuf>>>>);

impl PartialEq for TrustedPaths {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for TrustedPaths {}

impl TrustedPaths {
    /// Replaces what is known: template name to the paths it names.
    pub fn set(&self, templates: BTreeMap<String, BTreeSet<PathBuf>>) {
        *self.0.write().expect("trusted paths lock") = templates;
    }

    fn names(&self, template: &str, path: &Path) -> bool {
        self.0
            .read()
            .expect("trusted paths lock")
            .get(template)
            .is_some_and(|paths| paths.contains(path))
    }
}

/// The default image directories (the examples' and the chart's).
pub const DEFAULT_IMAGE_DIRS: [&str; 2] = ["/var/lib/godwit/images", "/var/lib/godwit/kernels"];

/// Why a path a VM named is refused. The message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum PathRefused {
    /// Not absolute, or with `.`/`..` components.
    #[error("{what} {path:?} is refused: name an absolute path without `.` or `..` components under one of the node's image directories ({dirs})")]
    NotPlain {
        /// What the path is for (`boot.kernel`, `disk root`).
        what: String,
        /// The path.
        path: String,
        /// The image directories.
        dirs: String,
    },
    /// Under none of the image directories.
    #[error("{what} {path:?} is refused: it is not under any of the node's image directories ({dirs}); put the image there, or ask an administrator to add its directory to the node daemon's imageDirs or to name it in a ClusterVMTemplate")]
    Outside {
        /// What the path is for.
        what: String,
        /// The path.
        path: String,
        /// The image directories.
        dirs: String,
    },
    /// A symlink on the way, or a path that leaves its directory.
    #[error("{what} {path:?} is refused: a symbolic link on its way below {dir} (image paths are opened without following links)")]
    Symlink {
        /// What the path is for.
        what: String,
        /// The path.
        path: String,
        /// Its image directory.
        dir: String,
    },
    /// Not a regular file.
    #[error("{what} {path:?} is refused: not a regular file")]
    NotFile {
        /// What the path is for.
        what: String,
        /// The path.
        path: String,
    },
    /// Opening it failed otherwise (missing, permissions, no openat2).
    #[error("{what} {path:?} cannot be opened beneath {dir}")]
    Open {
        /// What the path is for.
        what: String,
        /// The path.
        path: String,
        /// Its image directory.
        dir: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

impl ImageDirs {
    /// The directories `dirs` (absolute; `.` and `..` are refused).
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Result<ImageDirs, String> {
        let dirs: Vec<PathBuf> = dirs.into_iter().collect();
        for d in &dirs {
            if !plain_absolute(d) {
                return Err(format!(
                    "image directory {} must be an absolute path without `.` or `..`",
                    d.display()
                ));
            }
        }
        Ok(ImageDirs {
            dirs,
            trusted: TrustedPaths::default(),
        })
    }

    /// The paths allowed outside the directories (shared with every clone).
    pub fn trusted(&self) -> &TrustedPaths {
        &self.trusted
    }

    /// Refuses image directories that hold, or lie inside, one of the
    /// node's `private` directories (the VMs' directories, the shared
    /// directory, the migration CA): serving images from there would hand
    /// other VMs' disks and the CA key to any VM author.
    pub fn keep_clear_of(&self, private: &[&Path]) -> Result<(), String> {
        for d in &self.dirs {
            if let Some(p) = private
                .iter()
                .find(|p| p.starts_with(d) || d.starts_with(p))
            {
                return Err(format!(
                    "image directory {} overlaps {}, which holds VMs' disks or keys; serve images from a directory of their own",
                    d.display(),
                    p.display()
                ));
            }
        }
        Ok(())
    }

    /// The directories.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    fn listed(&self) -> String {
        if self.dirs.is_empty() {
            return "none configured".into();
        }
        self.dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Opens `path` (named by a VM as `what`) beneath its image directory,
    /// read-only or, with `write`, read-write.
    pub fn open(&self, what: &str, path: &str, write: bool) -> Result<File, PathRefused> {
        self.open_for(None, what, path, write)
    }

    /// [`ImageDirs::open`] for a machine made from the `ClusterVMTemplate`
    /// `template`: a path that template names is opened read-only wherever
    /// it is.
    pub fn open_for(
        &self,
        template: Option<&str>,
        what: &str,
        path: &str,
        write: bool,
    ) -> Result<File, PathRefused> {
        let p = Path::new(path);
        if !plain_absolute(p) {
            return Err(PathRefused::NotPlain {
                what: what.into(),
                path: path.into(),
                dirs: self.listed(),
            });
        }
        let Some((dir, rest)) = self
            .dirs
            .iter()
            .find_map(|d| p.strip_prefix(d).ok().map(|r| (d, r)))
            .filter(|(_, r)| !r.as_os_str().is_empty())
        else {
            if !write && template.is_some_and(|t| self.trusted.names(t, p)) {
                return open_trusted(what, path);
            }
            return Err(PathRefused::Outside {
                what: what.into(),
                path: path.into(),
                dirs: self.listed(),
            });
        };
        let open_err = |source| PathRefused::Open {
            what: what.into(),
            path: path.into(),
            dir: dir.display().to_string(),
            source,
        };
        let base = File::open(dir).map_err(open_err)?;
        let rel = CString::new(rest.as_os_str().as_bytes()).map_err(|_| PathRefused::NotPlain {
            what: what.into(),
            path: path.into(),
            dirs: self.listed(),
        })?;
        let how = OpenHow {
            flags: (if write { libc::O_RDWR } else { libc::O_RDONLY }
                | libc::O_CLOEXEC
                | libc::O_NOCTTY
                | libc::O_NONBLOCK) as u64,
            mode: 0,
            resolve: libc::RESOLVE_BENEATH
                | libc::RESOLVE_NO_SYMLINKS
                | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: openat2 reads `rel` (NUL-terminated) and `how` (its size
        // passed) and returns a new descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                base.as_raw_fd(),
                rel.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if fd < 0 {
            let e = std::io::Error::last_os_error();
            return Err(match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => PathRefused::Symlink {
                    what: what.into(),
                    path: path.into(),
                    dir: dir.display().to_string(),
                },
                _ => open_err(e),
            });
        }
        // SAFETY: a fresh descriptor that only this File owns.
        let file = unsafe { File::from_raw_fd(fd as i32) };
        regular_file(file, what, path, open_err)
    }

    /// Checks every path `machine` names (boot files, disk images, template
    /// images given as paths or `file://` URLs) by opening it as
    /// [`ImageDirs::open`] does.
    pub fn check_machine(&self, machine: &Machine) -> Result<(), PathRefused> {
        let template = machine.cluster_template.as_deref();
        if !machine.kernel.is_empty() {
            self.open_for(template, "boot.kernel", &machine.kernel, false)?;
        }
        if let Some(initrd) = &machine.initrd {
            self.open_for(template, "boot.initrd", initrd, false)?;
        }
        if let Some(image) = &machine.boot_image {
            if let Some(path) = local_path(&image.path) {
                self.open_for(template, "the boot image", path, false)?;
            }
        }
        for disk in &machine.disks {
            match &disk.source {
                MachineDiskSource::Image { path, .. } => {
                    self.open_for(template, &format!("disk {}", disk.name), path, false)?;
                }
                MachineDiskSource::Clone { path, .. } => {
                    if let Some(path) = local_path(path) {
                        self.open_for(
                            template,
                            &format!("the template image of disk {}", disk.name),
                            path,
                            false,
                        )?;
                    }
                }
                MachineDiskSource::Blank { .. } => {}
            }
        }
        Ok(())
    }
}

/// `file` as a blocking regular file, or why not.
fn regular_file(
    file: File,
    what: &str,
    path: &str,
    open_err: impl Fn(std::io::Error) -> PathRefused,
) -> Result<File, PathRefused> {
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(PathRefused::NotFile {
            what: what.into(),
            path: path.into(),
        });
    }
    // Reads and writes block as usual from here.
    // SAFETY: F_GETFL/F_SETFL only change the file's status flags.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

/// Opens a path a `ClusterVMTemplate` names, read-only, without following
/// a symbolic link in its last component.
fn open_trusted(what: &str, path: &str) -> Result<File, PathRefused> {
    let open_err = |source| PathRefused::Open {
        what: what.into(),
        path: path.into(),
        dir: "a ClusterVMTemplate's path".into(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOCTTY | libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err)?;
    regular_file(file, what, path, open_err)
}

/// The file path of a template source (a path or a `file://` URL); `None`
/// for a download (`http://`, `https://`), which lands in the node's cache.
fn local_path(source: &str) -> Option<&str> {
    if source.starts_with("http://") || source.starts_with("https://") {
        return None;
    }
    Some(source.strip_prefix("file://").unwrap_or(source))
}

/// Absolute, with only normal components after the root.
fn plain_absolute(p: &Path) -> bool {
    let mut parts = p.components();
    parts.next() == Some(Component::RootDir)
        && parts.all(|c| matches!(c, Component::Normal(_)))
        && !p.as_os_str().as_bytes().windows(2).any(|w| w == b"//")
        && !p.as_os_str().as_bytes().ends_with(b"/.")
        && !p.as_os_str().as_bytes().windows(3).any(|w| w == b"/./")
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("godwit-imgdirs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("images/sub")).unwrap();
        std::fs::create_dir_all(d.join("secret")).unwrap();
        std::fs::write(d.join("images/sub/ok.raw"), b"image").unwrap();
        std::fs::write(d.join("secret/key.pem"), b"KEY").unwrap();
        Scratch(d)
    }

    #[test]
    fn a_cluster_templates_path_opens_only_for_its_machines() {
        let s = scratch("trusted");
        let dirs = ImageDirs::new([s.0.join("images")]).unwrap();
        let key = s.0.join("secret/key.pem");
        let path = key.display().to_string();
        dirs.trusted().set(BTreeMap::from([(
            "golden".to_string(),
            BTreeSet::from([key.clone()]),
        )]));
        // Shared by clones, as the agent's runner holds one.
        let runner = dirs.clone();
        assert!(runner
            .open_for(Some("golden"), "boot.initrd", &path, false)
            .is_ok());
        for (template, write) in [
            (None, false),
            (Some("other"), false),
            (Some("golden"), true),
        ] {
            let e = runner
                .open_for(template, "boot.initrd", &path, write)
                .unwrap_err();
            assert!(
                matches!(e, PathRefused::Outside { .. }),
                "{template:?} {write}: {e}"
            );
        }
        let machine = |template: Option<&str>| Machine {
            cluster_template: template.map(str::to_string),
            initrd: Some(path.clone()),
            ..Default::default()
        };
        assert!(runner.check_machine(&machine(Some("golden"))).is_ok());
        assert!(runner.check_machine(&machine(None)).is_err());
        dirs.trusted().set(BTreeMap::new());
        assert!(runner.check_machine(&machine(Some("golden"))).is_err());
    }

    #[test]
    fn a_file_beneath_an_image_dir_opens_and_nothing_else_does() {
        let s = scratch("open");
        let dirs = ImageDirs::new([s.0.join("images")]).unwrap();
        let ok = s.0.join("images/sub/ok.raw").display().to_string();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut dirs.open("disk", &ok, false).unwrap(), &mut text)
            .unwrap();
        assert_eq!(text, "image");

        let key = s.0.join("secret/key.pem").display().to_string();
        let e = dirs.open("boot.initrd", &key, false).unwrap_err();
        assert!(matches!(e, PathRefused::Outside { .. }), "{e}");
        assert!(e.to_string().contains("imageDirs"), "{e}");

        // `..` is refused before anything is opened.
        let dotdot = format!("{}/images/../secret/key.pem", s.0.display());
        let e = dirs.open("boot.initrd", &dotdot, false).unwrap_err();
        assert!(matches!(e, PathRefused::NotPlain { .. }), "{e}");
        assert!(matches!(
            dirs.open("x", "images/sub/ok.raw", false),
            Err(PathRefused::NotPlain { .. })
        ));

        // A symlink planted inside the image directory: refused, to a file
        // outside as to one inside.
        std::os::unix::fs::symlink(s.0.join("secret/key.pem"), s.0.join("images/link")).unwrap();
        std::os::unix::fs::symlink("sub/ok.raw", s.0.join("images/inner")).unwrap();
        for name in ["link", "inner"] {
            let p = s.0.join("images").join(name).display().to_string();
            let e = dirs.open("disk", &p, false).unwrap_err();
            assert!(matches!(e, PathRefused::Symlink { .. }), "{name}: {e}");
        }
        // A linked directory on the way, too.
        std::os::unix::fs::symlink(s.0.join("secret"), s.0.join("images/dir")).unwrap();
        let p = s.0.join("images/dir/key.pem").display().to_string();
        assert!(matches!(
            dirs.open("disk", &p, false),
            Err(PathRefused::Symlink { .. })
        ));
        // A directory is not an image.
        let p = s.0.join("images/sub").display().to_string();
        assert!(matches!(
            dirs.open("disk", &p, false),
            Err(PathRefused::NotFile { .. })
        ));
        // The image directory itself is not a file in it.
        let p = s.0.join("images").display().to_string();
        assert!(matches!(
            dirs.open("disk", &p, false),
            Err(PathRefused::Outside { .. })
        ));
    }

    #[test]
    fn image_dirs_keep_clear_of_vm_disks_and_keys() {
        let dirs = ImageDirs::new([PathBuf::from("/var/lib/godwit/images")]).unwrap();
        let vms = Path::new("/var/lib/godwit/vms");
        assert!(dirs
            .keep_clear_of(&[vms, Path::new("/etc/godwit/ca")])
            .is_ok());
        let whole = ImageDirs::new([PathBuf::from("/var/lib/godwit")]).unwrap();
        assert!(whole.keep_clear_of(&[vms]).is_err());
        let inside = ImageDirs::new([PathBuf::from("/var/lib/godwit/vms/ns")]).unwrap();
        assert!(inside.keep_clear_of(&[vms]).is_err());
    }

    #[test]
    fn plain_paths_only() {
        for ok in ["/a", "/a/b.raw", "/var/lib/godwit/images/x.qcow2"] {
            assert!(plain_absolute(Path::new(ok)), "{ok}");
        }
        for bad in ["", "a", "/a/../b", "/a/./b", "/a//b", "/a/.", "./a", "/.."] {
            assert!(!plain_absolute(Path::new(bad)), "{bad}");
        }
        assert!(ImageDirs::new([PathBuf::from("rel")]).is_err());
    }

    #[test]
    fn downloads_are_not_paths() {
        assert_eq!(local_path("https://example.org/a.raw"), None);
        assert_eq!(local_path("file:///srv/a.raw"), Some("/srv/a.raw"));
        assert_eq!(local_path("/srv/a.raw"), Some("/srv/a.raw"));
    }
}

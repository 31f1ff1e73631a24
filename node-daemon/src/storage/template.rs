//! The per-node template cache and provisioning from it.
//!
//! A template's image is stored once per node, under its content digest:
//! `<cache>/sha256-<hex>.<raw|qcow2>`. Every VM made from it gets a qcow2
//! copy-on-write overlay on that file ([`provision`]), so provisioning
//! writes a few hundred KiB of metadata whatever the image's size, and many
//! VMs share one base. The cached file is never written after it is in
//! place (VMMs open it read-only, under a shared lock).
//!
//! Sources: a local path (or `file://` URL), copied sparsely into the cache;
//! an `http://` or `https://` URL, downloaded with a blocking client (ureq,
//! rustls with the webpki roots). While a download runs it goes to
//! `<cache>/sha256-<hex>.partial` (or, when no digest was given,
//! `download-<url hash>.partial`); the finished name appears only once the
//! whole file is there and its sha256 matched, by an atomic rename. So a
//! file named like a finished entry is always complete and verified.
//!
//! Failures: a checksum mismatch, an HTTP error status, a full disk or an
//! image we refuse (a qcow2 with a backing file, a corrupt header) delete
//! the partial file. A transfer cut in the middle keeps
//! `sha256-<hex>.partial` when the digest is known, and the next fetch
//! resumes it with an HTTP `Range` request (the bytes already there are
//! hashed again; the final digest check covers the joined file). Without a
//! known digest nothing could check a joined file, so such a download starts
//! over and its partial file is removed on any failure.
//!
//! Downloads and local copies skip runs of zeroes (64 KiB at a time), so a
//! sparse raw image stays sparse in the cache.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::digest::{Context, SHA256};
use serde::{Deserialize, Serialize};

use super::image::{self, ImageFormat};
use super::lock::{ImageLock, LockMode};
use super::{io_error, StorageError};

/// Chunk size for copying, hashing and hole detection.
const CHUNK: usize = 64 * 1024;

/// How far a fetch has got, for the progress callback.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes of the image in place so far (including resumed ones).
    pub bytes: u64,
    /// Total size, when known.
    pub total: Option<u64>,
    /// Bytes that were already there from an earlier, interrupted download.
    pub resumed_from: u64,
    /// True on the last call, once the image is verified and cached.
    pub done: bool,
}

/// A verified image in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedTemplate {
    /// sha256 of the file, lower-case hex.
    pub digest: String,
    /// Where it is.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Size of the disk it holds, in bytes.
    pub virtual_size: u64,
}

impl CachedTemplate {
    /// The digest as the API writes it: `sha256:<hex>`.
    pub fn digest_ref(&self) -> String {
        format!("sha256:{}", self.digest)
    }
}

/// Parses `sha256:<hex>` or `<hex>` into lower-case hex.
pub fn parse_digest(d: &str) -> Result<String, StorageError> {
    let hex = d.strip_prefix("sha256:").unwrap_or(d).to_ascii_lowercase();
    if hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(StorageError::BadDigest(d.to_string()))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A template cache in one directory.
#[derive(Clone, Debug)]
pub struct TemplateCache {
    dir: PathBuf,
}

/// Hashes and writes a stream into a partial file, keeping zero runs as
/// holes.
struct Sink<'a> {
    file: &'a File,
    path: &'a Path,
    pos: u64,
    hash: Context,
}

impl Sink<'_> {
    fn put(&mut self, buf: &[u8]) -> Result<(), StorageError> {
        self.hash.update(buf);
        if buf.iter().any(|b| *b != 0) {
            self.file
                .write_all_at(buf, self.pos)
                .map_err(|e| io_error(self.path, "write", e))?;
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    /// Sets the file's length (trailing zeroes were never written) and
    /// makes it durable; returns the hex digest.
    fn finish(self) -> Result<String, StorageError> {
        self.file
            .set_len(self.pos)
            .and_then(|_| self.file.sync_all())
            .map_err(|e| io_error(self.path, "write", e))?;
        Ok(hex(self.hash.finish().as_ref()))
    }
}

/// Where a template comes from.
enum Source {
    File(PathBuf),
    Http(String),
}

fn parse_source(s: &str) -> Result<Source, StorageError> {
    if let Some(p) = s.strip_prefix("file://") {
        Ok(Source::File(p.into()))
    } else if s.starts_with("http://") || s.starts_with("https://") {
        Ok(Source::Http(s.to_string()))
    } else if s.contains("://") || s.is_empty() {
        Err(StorageError::BadSource(s.to_string()))
    } else {
        Ok(Source::File(s.into()))
    }
}

impl TemplateCache {
    /// The cache in `dir` (created if missing).
    pub fn new(dir: impl AsRef<Path>) -> Result<TemplateCache, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io_error(&dir, "create", e))?;
        Ok(TemplateCache { dir })
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn entry_path(&self, digest: &str, format: ImageFormat) -> PathBuf {
        self.dir.join(format!("sha256-{digest}.{}", format.name()))
    }

    /// The cached image with this digest (`sha256:<hex>` or `<hex>`), if
    /// the node has it.
    pub fn get(&self, digest: &str) -> Result<Option<CachedTemplate>, StorageError> {
        let digest = parse_digest(digest)?;
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let path = self.entry_path(&digest, format);
            if path.exists() {
                let info = image::info(&path)?;
                return Ok(Some(CachedTemplate {
                    digest,
                    path,
                    format,
                    virtual_size: info.virtual_size,
                }));
            }
        }
        Ok(None)
    }

    /// Every cached image.
    pub fn list(&self) -> Result<Vec<CachedTemplate>, StorageError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| io_error(&self.dir, "read", e))?;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("sha256-") else {
                continue;
            };
            let Some((digest, ext)) = rest.split_once('.') else {
                continue;
            };
            if ext.parse::<ImageFormat>().is_ok() {
                if let Some(t) = self.get(digest)? {
                    out.push(t);
                }
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    }

    /// Removes a cached image. Refused while a VMM has it open (as a base
    /// image it holds a shared lock). Overlays made from it become unusable,
    /// so the agent removes a template only when no VM on the node uses it.
    pub fn remove(&self, digest: &str) -> Result<(), StorageError> {
        if let Some(t) = self.get(digest)? {
            super::lock::remove(&t.path)?;
        }
        Ok(())
    }

    /// Brings the image at `source` (a local path, `file://`, `http://` or
    /// `https://` URL) into the cache and returns the entry. With
    /// `expected` (`sha256:<hex>` or `<hex>`) an entry already cached under
    /// that digest is returned at once, without touching the source, and the
    /// fetched file must have that digest. `progress` is called as bytes
    /// arrive (about every MiB) and once more with `done` at the end.
    pub fn fetch(
        &self,
        source: &str,
        expected: Option<&str>,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<CachedTemplate, StorageError> {
        let expected = expected.map(parse_digest).transpose()?;
        if let Some(d) = &expected {
            if let Some(t) = self.get(d)? {
                progress(Progress {
                    bytes: std::fs::metadata(&t.path).map(|m| m.len()).unwrap_or(0),
                    total: None,
                    resumed_from: 0,
                    done: true,
                });
                return Ok(t);
            }
        }
        let src = parse_source(source)?;
        let partial = match (&expected, &src) {
            (Some(d), _) => self.dir.join(format!("sha256-{d}.partial")),
            (None, Source::File(p)) => self.dir.join(format!(
                "import-{}.partial",
                short_hash(&p.to_string_lossy())
            )),
            (None, Source::Http(u)) => self.dir.join(format!("download-{}.partial", short_hash(u))),
        };
        // One fetch per partial file at a time (a second agent thread or
        // process asking for the same image gets Locked).
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&partial)
            .map_err(|e| io_error(&partial, "create", e))?;
        let _busy = acquire_briefly(&partial)?;
        let resumable = expected.is_some() && matches!(src, Source::Http(_));
        let result = match &src {
            Source::File(p) => self.copy_in(p, &file, &partial, progress),
            Source::Http(u) => self.download(u, &file, &partial, resumable, progress),
        };
        let keep_partial = resumable
            && matches!(result, Err(StorageError::Download(..)))
            && file.metadata().map(|m| m.len() > 0).unwrap_or(false);
        let digest = match result {
            Ok(d) => d,
            Err(e) => {
                if !keep_partial {
                    let _ = std::fs::remove_file(&partial);
                }
                return Err(e);
            }
        };
        match self.finish(source, &partial, &digest, expected.as_deref()) {
            Ok(t) => {
                progress(Progress {
                    bytes: file.metadata().map(|m| m.len()).unwrap_or(0),
                    total: None,
                    resumed_from: 0,
                    done: true,
                });
                Ok(t)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&partial);
                Err(e)
            }
        }
    }

    /// Moves the image file `path` into the cache (a rename: no copy, so
    /// `path` must be on the cache's file system; otherwise it is copied and
    /// then removed). For images staged next to the cache by other means
    /// (a registry pull, a benchmark). It is hashed (and checked against
    /// `expected`) first; on any error `path` is left as it was.
    pub fn adopt(
        &self,
        path: &Path,
        expected: Option<&str>,
    ) -> Result<CachedTemplate, StorageError> {
        let expected = expected.map(parse_digest).transpose()?;
        let digest = sha256_file(path)?;
        let name = path.display().to_string();
        if let Some(exp) = &expected {
            if *exp != digest {
                return Err(StorageError::ChecksumMismatch {
                    source_name: name,
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        if let Some(t) = self.get(&digest)? {
            std::fs::remove_file(path).map_err(|e| io_error(path, "write", e))?;
            return Ok(t);
        }
        let info = image::info(path)?;
        if info.backing.is_some() {
            return Err(StorageError::TemplateHasBacking(name));
        }
        let dst = self.entry_path(&digest, info.format);
        match std::fs::rename(path, &dst) {
            Ok(()) => {
                if let Ok(d) = File::open(&self.dir) {
                    let _ = d.sync_all();
                }
                Ok(CachedTemplate {
                    digest,
                    path: dst,
                    format: info.format,
                    virtual_size: info.virtual_size,
                })
            }
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let t = self.fetch(&name, Some(&digest), &mut |_| {})?;
                let _ = std::fs::remove_file(path);
                Ok(t)
            }
            Err(e) => Err(io_error(&dst, "create", e)),
        }
    }

    /// Checks a complete partial file (digest, format) and renames it into
    /// place.
    fn finish(
        &self,
        source: &str,
        partial: &Path,
        digest: &str,
        expected: Option<&str>,
    ) -> Result<CachedTemplate, StorageError> {
        if let Some(exp) = expected {
            if exp != digest {
                return Err(StorageError::ChecksumMismatch {
                    source_name: source.to_string(),
                    expected: exp.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let info = image::info(partial)?;
        if info.backing.is_some() {
            return Err(StorageError::TemplateHasBacking(source.to_string()));
        }
        let path = self.entry_path(digest, info.format);
        std::fs::rename(partial, &path).map_err(|e| io_error(&path, "create", e))?;
        // Make the rename durable.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(CachedTemplate {
            digest: digest.to_string(),
            path,
            format: info.format,
            virtual_size: info.virtual_size,
        })
    }

    /// Copies a local file into `file`, hashing every byte (holes read as
    /// zeroes) and writing only the data.
    fn copy_in(
        &self,
        src: &Path,
        file: &File,
        partial: &Path,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, StorageError> {
        let input = File::open(src).map_err(|e| io_error(src, "open", e))?;
        let len = input
            .metadata()
            .map_err(|e| io_error(src, "open", e))?
            .len();
        file.set_len(0).map_err(|e| io_error(partial, "write", e))?;
        let ranges = image::data_ranges(&input).map_err(|e| io_error(src, "read", e))?;
        let mut sink = Sink {
            file,
            path: partial,
            pos: 0,
            hash: Context::new(&SHA256),
        };
        let zeros = vec![0u8; CHUNK * 16];
        let mut buf = vec![0u8; CHUNK * 16];
        let mut last_report = 0u64;
        let mut report = |pos: u64, force: bool| {
            if force || pos - last_report >= 1 << 20 {
                last_report = pos;
                progress(Progress {
                    bytes: pos,
                    total: Some(len),
                    resumed_from: 0,
                    done: false,
                });
            }
        };
        let hash_zeros = |sink: &mut Sink, upto: u64| {
            while sink.pos < upto {
                let n = (upto - sink.pos).min(zeros.len() as u64) as usize;
                sink.hash.update(&zeros[..n]);
                sink.pos += n as u64;
            }
        };
        for (start, rlen) in ranges {
            hash_zeros(&mut sink, start);
            let end = start + rlen;
            while sink.pos < end {
                let n = (end - sink.pos).min(buf.len() as u64) as usize;
                input
                    .read_exact_at(&mut buf[..n], sink.pos)
                    .map_err(|e| io_error(src, "read", e))?;
                for chunk in buf[..n].chunks(CHUNK) {
                    sink.put(chunk)?;
                }
                report(sink.pos, false);
            }
        }
        hash_zeros(&mut sink, len);
        report(len, true);
        sink.finish()
    }

    /// Downloads `url` into `file`, resuming from its current length when
    /// `resumable`.
    fn download(
        &self,
        url: &str,
        file: &File,
        partial: &Path,
        resumable: bool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<String, StorageError> {
        let dl_err = |e: ureq::Error| StorageError::Download(url.to_string(), Box::new(e));
        let mut have = file
            .metadata()
            .map_err(|e| io_error(partial, "open", e))?
            .len();
        if !resumable {
            have = 0;
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_connect(Some(Duration::from_secs(15)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut req = agent.get(url);
        if have > 0 {
            req = req.header("Range", format!("bytes={have}-"));
        }
        let resp = match req.call() {
            Ok(r) => r,
            // The partial file is already whole (or longer than the file):
            // start over rather than guess.
            Err(ureq::Error::StatusCode(416)) if have > 0 => {
                file.set_len(0).map_err(|e| io_error(partial, "write", e))?;
                return self.download(url, file, partial, false, progress);
            }
            Err(ureq::Error::StatusCode(code)) => {
                return Err(StorageError::HttpStatus(url.to_string(), code))
            }
            Err(e) => return Err(dl_err(e)),
        };
        let status = resp.status().as_u16();
        let content_len: Option<u64> = resp
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let mut hash = Context::new(&SHA256);
        if status == 206 && have > 0 {
            // Hash what is already there.
            let mut buf = vec![0u8; CHUNK * 16];
            let mut pos = 0u64;
            while pos < have {
                let n = (have - pos).min(buf.len() as u64) as usize;
                file.read_exact_at(&mut buf[..n], pos)
                    .map_err(|e| io_error(partial, "read", e))?;
                hash.update(&buf[..n]);
                pos += n as u64;
            }
        } else {
            // A full answer (the server ignored Range): start over.
            have = 0;
            file.set_len(0).map_err(|e| io_error(partial, "write", e))?;
        }
        let total = content_len.map(|l| l + have);
        let resumed_from = have;
        let mut sink = Sink {
            file,
            path: partial,
            pos: have,
            hash,
        };
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; CHUNK];
        let mut last_report = have;
        progress(Progress {
            bytes: have,
            total,
            resumed_from,
            done: false,
        });
        loop {
            // Fill a whole chunk (or reach the end) so zero runs are found
            // at chunk granularity.
            let mut n = 0;
            while n < CHUNK {
                match reader.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        // Keep what arrived for a resume.
                        if n > 0 {
                            sink.put(&buf[..n])?;
                        }
                        let _ = file.set_len(sink.pos);
                        let _ = file.sync_all();
                        return Err(dl_err(ureq::Error::Io(e)));
                    }
                }
            }
            if n == 0 {
                break;
            }
            sink.put(&buf[..n])?;
            if sink.pos - last_report >= 1 << 20 {
                last_report = sink.pos;
                progress(Progress {
                    bytes: sink.pos,
                    total,
                    resumed_from,
                    done: false,
                });
            }
        }
        if let Some(t) = total {
            if sink.pos != t {
                let _ = file.set_len(sink.pos);
                return Err(dl_err(ureq::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("got {} of {t} bytes", sink.pos),
                ))));
            }
        }
        sink.finish()
    }
}

fn short_hash(s: &str) -> String {
    hex(&ring::digest::digest(&SHA256, s.as_bytes()).as_ref()[..8])
}

/// Provisions a VM disk at `dst` (which must not exist) from a cached
/// template: a qcow2 overlay whose backing file is the cached base. Takes
/// the same time whatever the image's size (only qcow2 metadata is
/// written). The VM then writes only to its overlay.
pub fn provision(template: &CachedTemplate, dst: &Path) -> Result<(), StorageError> {
    image::create_overlay(dst, &template.path)?;
    Ok(())
}

/// The sha256 of a file, lower-case hex (every byte read; holes hash as
/// zeroes).
pub fn sha256_file(path: &Path) -> Result<String, StorageError> {
    let mut f = File::open(path).map_err(|e| io_error(path, "open", e))?;
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| io_error(path, "read", e))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex(ctx.finish().as_ref()))
}

/// How long a fetch waits for the lock on its partial file before it says
/// Locked.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// The exclusive lock on a partial download, waiting up to [`LOCK_PATIENCE`]:
/// a process forked by this one (any `Command` spawned by another thread)
/// shares its open files, and so its locks, until it execs, so a lock just
/// released can look held for a moment. A fetch that really runs elsewhere
/// still holds it after the wait, and that is reported as Locked.
fn acquire_briefly(partial: &Path) -> Result<ImageLock, StorageError> {
    let deadline = std::time::Instant::now() + LOCK_PATIENCE;
    loop {
        match ImageLock::acquire(partial, LockMode::Exclusive) {
            Err(StorageError::Locked { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("godwit-tpl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn local_import_is_cached_once_under_its_digest() {
        let d = tmpdir("local");
        let src = d.join("src.raw");
        let f = File::create(&src).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"hello", 3 << 20).unwrap();
        drop(f);
        let digest = sha256_file(&src).unwrap();
        let cache = TemplateCache::new(d.join("cache")).unwrap();
        let mut calls = 0;
        let t = cache
            .fetch(src.to_str().unwrap(), None, &mut |_| calls += 1)
            .unwrap();
        assert!(calls >= 2);
        assert_eq!(t.digest, digest);
        assert_eq!(t.format, ImageFormat::Raw);
        assert_eq!(t.virtual_size, 8 << 20);
        assert_eq!(
            std::fs::read(&t.path).unwrap(),
            std::fs::read(&src).unwrap()
        );
        assert_eq!(names(cache.dir()), vec![format!("sha256-{digest}.raw")]);
        // Known digest: served from the cache without reading the source.
        std::fs::remove_file(&src).unwrap();
        let again = cache
            .fetch(
                "/nonexistent",
                Some(&format!("sha256:{digest}")),
                &mut |_| {},
            )
            .unwrap();
        assert_eq!(again, t);
        let vm = d.join("vm.qcow2");
        provision(&t, &vm).unwrap();
        assert_eq!(
            image::info(&vm).unwrap().backing.as_deref(),
            Some(t.path.as_path())
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn checksum_mismatch_and_bad_sources_leave_nothing() {
        let d = tmpdir("mismatch");
        let src = d.join("src.raw");
        std::fs::write(&src, vec![1u8; 4096]).unwrap();
        let cache = TemplateCache::new(d.join("cache")).unwrap();
        let wrong = "0".repeat(64);
        let e = cache
            .fetch(src.to_str().unwrap(), Some(&wrong), &mut |_| {})
            .unwrap_err();
        assert!(matches!(e, StorageError::ChecksumMismatch { .. }), "{e}");
        assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));
        assert!(matches!(
            cache.fetch("ftp://x/y", None, &mut |_| {}),
            Err(StorageError::BadSource(_))
        ));
        assert!(matches!(
            cache.fetch(src.to_str().unwrap(), Some("sha256:12"), &mut |_| {}),
            Err(StorageError::BadDigest(_))
        ));
        assert!(cache
            .fetch("/nonexistent/x.raw", None, &mut |_| {})
            .is_err());
        assert!(names(cache.dir()).is_empty(), "{:?}", names(cache.dir()));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn overlay_templates_are_refused() {
        let d = tmpdir("backing");
        let base = d.join("base.raw");
        image::create_blank(&base, 1 << 20, ImageFormat::Raw).unwrap();
        let top = d.join("top.qcow2");
        image::create_overlay(&top, &base).unwrap();
        let cache = TemplateCache::new(d.join("cache")).unwrap();
        let e = cache
            .fetch(top.to_str().unwrap(), None, &mut |_| {})
            .unwrap_err();
        assert!(matches!(e, StorageError::TemplateHasBacking(_)), "{e}");
        assert!(names(cache.dir()).is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }
}

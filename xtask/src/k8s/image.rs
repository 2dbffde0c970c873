//! The cluster's two images, built without any registry: one-layer OCI image
//! layouts packed as tar archives, which `ctr -n k8s.io images import` names through
//! the `io.containerd.image.name` annotation.
//!
//! - `k8s.gcr.io/pause:3.2`: `build/pause/linux/pause.c` from the Kubernetes source,
//!   compiled with `gcc -static`. containerd's CRI starts every pod's sandbox from it.
//! - `localhost/icmp-guard-testbox:1`: busybox-static with its applets (so `/bin/ping`
//!   is busybox's ping), `/usr/bin/ping` (iputils, a different executable: tests rely
//!   on telling the two apart), `/usr/sbin/hping3`, `/bin/bash`, the libraries `ldd`
//!   lists for them and the loader, and a minimal /etc.
//!
//! The layer is deterministic (sorted entries, uid/gid 0, fixed mtime), so the same
//! host files always give the same image digest.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Layout, PAUSE_IMAGE, TESTBOX_IMAGE, run_checked};
use crate::vm::initramfs::ldd;

/// mtime of every entry in the layers (2023-11-14): fixed for reproducible digests.
const MTIME: u64 = 1_700_000_000;
const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const BUSYBOX: &str = "/bin/busybox";

/// One image: where its archive is cached and what it is called.
pub struct ImageFile {
    pub name: &'static str,
    pub archive: PathBuf,
}

pub fn image_files(layout: &Layout) -> [ImageFile; 2] {
    [
        ImageFile {
            name: PAUSE_IMAGE,
            archive: layout.images.join("pause.tar"),
        },
        ImageFile {
            name: TESTBOX_IMAGE,
            archive: layout.images.join("testbox.tar"),
        },
    ]
}

pub fn images_present(layout: &Layout) -> bool {
    image_files(layout).iter().all(|i| i.archive.is_file())
}

pub fn build_images(layout: &Layout, pause_c: &Path) -> Result<()> {
    fs::create_dir_all(&layout.images)?;
    let [pause, testbox] = image_files(layout);

    let pause_bin = layout.images.join("pause");
    run_checked(
        Command::new("gcc")
            .args([
                "-Os",
                "-Wall",
                "-Werror",
                "-static",
                "-DVERSION=v3.2-icmp-guard",
            ])
            .arg("-o")
            .arg(&pause_bin)
            .arg(pause_c),
    )
    .context("compiling the pause container (apt-get install -y gcc libc6-dev)")?;
    let mut root = Rootfs::default();
    root.file_from_host(&pause_bin, "/pause", 0o755)?;
    write_archive(
        &root,
        pause.name,
        json!({"Env": [PATH_ENV], "Entrypoint": ["/pause"]}),
        &pause.archive,
    )?;

    let root = testbox_rootfs()?;
    write_archive(
        &root,
        testbox.name,
        json!({"Env": [PATH_ENV], "Cmd": ["/bin/sh"]}),
        &testbox.archive,
    )?;
    eprintln!(
        "k8s build: images {} and {} in {}",
        pause.name,
        testbox.name,
        layout.images.display()
    );
    Ok(())
}

fn testbox_rootfs() -> Result<Rootfs> {
    let mut root = Rootfs::default();
    for d in ["/proc", "/sys", "/dev", "/etc", "/run", "/var", "/root"] {
        root.dir(d, 0o755);
    }
    root.dir("/root", 0o700);
    root.dir("/tmp", 0o1777);

    // busybox and its applets first, so that the real executables below replace
    // any applet of the same path.
    root.file_from_host(Path::new(BUSYBOX), BUSYBOX, 0o755)?;
    let out = run_checked(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        root.symlink(&format!("/{applet}"), BUSYBOX);
    }
    for need in ["/bin/sh", "/bin/sleep", "/bin/ping"] {
        if !root.entries.contains_key(&rel(need)) {
            bail!("{BUSYBOX} --list-full has no {need}; is busybox-static installed?");
        }
    }

    let host_exes = [
        ("/usr/bin/ping", "/usr/bin/ping", "iputils-ping"),
        ("/usr/sbin/hping3", "/usr/sbin/hping3", "hping3"),
        ("/bin/bash", "/bin/bash", "bash"),
    ];
    for (host, image_path, pkg) in host_exes {
        let host = Path::new(host);
        if !host.is_file() {
            bail!("{} is missing: apt-get install -y {pkg}", host.display());
        }
        root.file_from_host(host, image_path, 0o755)?;
        for lib in ldd(host)? {
            let dest = lib.to_string_lossy().into_owned();
            root.file_from_host(&lib, &dest, 0o755)?;
        }
    }

    root.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
        0o644,
    );
    root.bytes("/etc/group", b"root:x:0:\nnogroup:x:65534:\n", 0o644);
    root.bytes(
        "/etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    );
    root.bytes(
        "/etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nhosts: files dns\n",
        0o644,
    );
    // hping3 and busybox look protocol and service names up here.
    for f in ["/etc/protocols", "/etc/services"] {
        if Path::new(f).is_file() {
            root.file_from_host(Path::new(f), f, 0o644)?;
        }
    }
    Ok(root)
}

#[derive(Debug)]
enum Entry {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// A root filesystem in memory, keyed by path relative to `/` ("bin/sh"); sorted,
/// so every directory comes before its contents in the tar.
#[derive(Debug, Default)]
struct Rootfs {
    entries: BTreeMap<String, Entry>,
}

fn rel(path: &str) -> String {
    path.trim_start_matches('/')
        .trim_end_matches('/')
        .to_string()
}

impl Rootfs {
    fn parents(&mut self, rel_path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = rel_path.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries
                .entry(acc.clone())
                .or_insert(Entry::Dir { mode: 0o755 });
        }
    }

    fn dir(&mut self, path: &str, mode: u32) {
        let r = rel(path);
        self.parents(&r);
        self.entries.insert(r, Entry::Dir { mode });
    }

    fn bytes(&mut self, path: &str, data: &[u8], mode: u32) {
        let r = rel(path);
        self.parents(&r);
        self.entries.insert(
            r,
            Entry::File {
                data: data.to_vec(),
                mode,
            },
        );
    }

    /// Copies a host file's content (symlinks followed) to `path`.
    fn file_from_host(&mut self, host: &Path, path: &str, mode: u32) -> Result<()> {
        let data = fs::read(host).with_context(|| format!("reading {}", host.display()))?;
        self.bytes(path, &data, mode);
        Ok(())
    }

    fn symlink(&mut self, path: &str, target: &str) {
        let r = rel(path);
        self.parents(&r);
        self.entries.insert(
            r,
            Entry::Symlink {
                target: target.to_string(),
            },
        );
    }

    /// The layer as an uncompressed tar (its sha256 is the image's diff_id).
    fn layer_tar(&self) -> Result<Vec<u8>> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, entry) in &self.entries {
            let mut h = tar::Header::new_ustar();
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(MTIME);
            match entry {
                Entry::Dir { mode } => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, format!("{path}/"), std::io::empty())?;
                }
                Entry::File { data, mode } => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, path, data.as_slice())?;
                }
                Entry::Symlink { target } => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    b.append_link(&mut h, path, target)?;
                }
            }
        }
        Ok(b.into_inner()?)
    }
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the OCI image layout (oci-layout, index.json, blobs/sha256/*) as a tar.
fn write_archive(root: &Rootfs, name: &str, config: serde_json::Value, out: &Path) -> Result<()> {
    let layer = root.layer_tar()?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&layer)?;
    let layer_gz = gz.finish()?;
    let layer_digest = format!("sha256:{}", sha256_hex(&layer_gz));

    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "cargo xtask k8s build"}],
    }))?;
    let config_digest = format!("sha256:{}", sha256_hex(&config));
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": layer_digest,
            "size": layer_gz.len(),
        }],
    }))?;
    let manifest_digest = format!("sha256:{}", sha256_hex(&manifest));
    let tag = name.rsplit_once(':').map(|(_, t)| t).unwrap_or("latest");
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    }))?;

    let tmp = out.with_extension("tar.tmp");
    let file = fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut b = tar::Builder::new(file);
    let mut add = |path: &str, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, path, data)?;
        Ok(())
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    add("index.json", &index)?;
    for (digest, data) in [
        (&layer_digest, &layer_gz),
        (&config_digest, &config),
        (&manifest_digest, &manifest),
    ] {
        add(
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            data,
        )?;
    }
    b.into_inner()?.sync_all()?;
    fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    // The manifest digest is what containerd lists for the image: `start` compares
    // it to decide whether the imported image is this one.
    fs::write(out.with_extension("digest"), format!("{manifest_digest}\n"))?;
    Ok(())
}

/// The manifest digest recorded next to an archive by `write_archive`.
pub fn recorded_digest(archive: &Path) -> Option<String> {
    fs::read_to_string(archive.with_extension("digest"))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| s.starts_with("sha256:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parents_come_first_and_real_files_replace_applets() {
        let mut r = Rootfs::default();
        r.symlink("/usr/bin/ping", BUSYBOX);
        r.bytes("/usr/bin/ping", b"\x7fELF", 0o755);
        r.dir("/tmp", 0o1777);
        let keys: Vec<&str> = r.entries.keys().map(String::as_str).collect();
        assert_eq!(keys, ["tmp", "usr", "usr/bin", "usr/bin/ping"]);
        assert!(matches!(r.entries["usr/bin/ping"], Entry::File { .. }));
        let a = r.layer_tar().unwrap();
        let b = r.layer_tar().unwrap();
        assert_eq!(sha256_hex(&a), sha256_hex(&b));
    }
}

//! An OCI image archive written byte for byte by us, so that the same inputs always give the
//! same digests: one layer (a tar of a [`Tree`]), its config, its manifest, and an OCI image
//! layout (`oci-layout`, `index.json`, `blobs/sha256/…`) packed as a tar, with a docker-style
//! `manifest.json` beside it for loaders that read names from `RepoTags`.
//!
//! Every tar header is built here: owner 0:0, no user or group names, one fixed mtime, modes
//! chosen by the caller, entries in sorted order. Nothing from the host's metadata (mtimes,
//! owners, inode order) reaches the output.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use flate2::{Compression, GzBuilder};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::vm::initramfs::normal_components;

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// containerd names an image by this annotation on its index entry (`ctr images import`).
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";
/// The OCI image-layout name of an index entry: the tag, as buildkit and skopeo write it.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// One entry of the image's filesystem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { data: Vec<u8>, mode: u32 },
    Symlink { target: String },
}

/// The image's filesystem: paths relative to `/` (no leading slash), sorted, so that a parent
/// (a prefix) always comes before its children.
#[derive(Debug, Default)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

impl Tree {
    pub fn nodes(&self) -> impl Iterator<Item = (&String, &Node)> {
        self.nodes.iter()
    }

    /// Adds `node` at the absolute image path `path`, with 0755 directories for its missing
    /// ancestors. Adding the same node twice is fine; two different nodes at one path is an
    /// error (e.g. a host symlink where the image already has a directory).
    pub fn insert(&mut self, path: &str, node: Node) -> Result<()> {
        let rel = relative(path)?;
        let mut prefix = String::new();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            match self.nodes.get(&prefix) {
                None => {
                    self.nodes.insert(prefix.clone(), Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(other) => bail!(
                    "/{prefix} is {other:?} in the image, but /{rel} needs it to be a directory"
                ),
            }
        }
        match self.nodes.get(&rel) {
            None => {
                self.nodes.insert(rel, node);
                Ok(())
            }
            Some(existing) if *existing == node => Ok(()),
            // An implicit parent directory given its explicit mode.
            Some(Node::Dir { .. }) if matches!(node, Node::Dir { .. }) => {
                self.nodes.insert(rel, node);
                Ok(())
            }
            Some(existing) => bail!(
                "/{rel} would be added twice with different contents ({} and {})",
                kind(existing),
                kind(&node)
            ),
        }
    }

    pub fn add_file(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(path, Node::File { data, mode })
    }

    /// Adds the host file `host` at the same path, reproducing every symlink on the way (in its
    /// ancestors, such as Debian's `/lib -> usr/lib`, and at its end, such as
    /// `/lib64/ld-linux-x86-64.so.2 -> /lib/x86_64-linux-gnu/…`) as a symlink with the same
    /// target, so the image resolves the path exactly as the host does. The file keeps its
    /// permission bits and nothing else of its metadata.
    pub fn add_host(&mut self, host: &Path) -> Result<()> {
        if !host.is_absolute() {
            bail!("{}: host paths must be absolute", host.display());
        }
        let mut cur = PathBuf::from("/");
        let mut queue: VecDeque<OsString> = normal_components(host);
        let mut hops = 0;
        while let Some(name) = queue.pop_front() {
            if name == ".." {
                cur.pop();
                continue;
            }
            let cand = cur.join(&name);
            let meta = fs::symlink_metadata(&cand).with_context(|| {
                format!("inspecting {} (for {})", cand.display(), host.display())
            })?;
            let image_path = path_str(&cand)?;
            if meta.file_type().is_symlink() {
                hops += 1;
                if hops > 40 {
                    bail!("symlink loop resolving {}", host.display());
                }
                let target = fs::read_link(&cand)?;
                let target_str = target
                    .to_str()
                    .with_context(|| format!("{} points to a non-UTF-8 path", cand.display()))?
                    .to_string();
                self.insert(&image_path, Node::Symlink { target: target_str })?;
                if target.is_absolute() {
                    cur = PathBuf::from("/");
                }
                let mut rest = normal_components(&target);
                rest.extend(queue);
                queue = rest;
            } else if meta.is_dir() {
                if queue.is_empty() {
                    bail!(
                        "{} is a directory; only files are copied from the host",
                        host.display()
                    );
                }
                cur = cand;
            } else if meta.is_file() {
                if !queue.is_empty() {
                    bail!(
                        "{} is a file but {} goes through it",
                        cand.display(),
                        host.display()
                    );
                }
                let data =
                    fs::read(&cand).with_context(|| format!("reading {}", cand.display()))?;
                self.add_file(&image_path, data, meta.permissions().mode() & 0o777)?;
                cur = cand;
            } else {
                bail!(
                    "{} is neither a file, a directory nor a symlink",
                    cand.display()
                );
            }
        }
        Ok(())
    }
}

fn kind(n: &Node) -> &'static str {
    match n {
        Node::Dir { .. } => "a directory",
        Node::File { .. } => "a file",
        Node::Symlink { .. } => "a symlink",
    }
}

fn path_str(p: &Path) -> Result<String> {
    p.to_str()
        .map(str::to_string)
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

/// `/usr/bin/x` → `usr/bin/x`; rejects relative paths, `..` and the root itself.
fn relative(path: &str) -> Result<String> {
    let Some(rel) = path.strip_prefix('/') else {
        bail!("image path {path:?} must be absolute");
    };
    let rel = rel.trim_end_matches('/');
    if rel.is_empty()
        || rel
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        bail!("image path {path:?} is not a plain absolute path");
    }
    Ok(rel.to_string())
}

/// A tar header with everything fixed except what the caller sets.
fn header(
    path: &str,
    entry: tar::EntryType,
    size: u64,
    mode: u32,
    mtime: u64,
) -> Result<tar::Header> {
    let mut h = tar::Header::new_ustar();
    h.set_path(path)
        .with_context(|| format!("{path}: not representable in a ustar header"))?;
    h.set_entry_type(entry);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h)
}

/// The layer: a tar of `tree`. Directories are named with a trailing slash, as docker and
/// buildkit write them.
pub fn layer_tar(tree: &Tree, mtime: u64) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, node) in tree.nodes() {
        match node {
            Node::Dir { mode } => {
                let h = header(
                    &format!("{path}/"),
                    tar::EntryType::Directory,
                    0,
                    *mode,
                    mtime,
                )?;
                b.append(&h, std::io::empty())?;
            }
            Node::File { data, mode } => {
                let h = header(
                    path,
                    tar::EntryType::Regular,
                    data.len() as u64,
                    *mode,
                    mtime,
                )?;
                b.append(&h, data.as_slice())?;
            }
            Node::Symlink { target } => {
                let mut h = header(path, tar::EntryType::Symlink, 0, 0o777, mtime)?;
                h.set_link_name(target)
                    .with_context(|| format!("{path} -> {target}: target too long"))?;
                h.set_cksum();
                b.append(&h, std::io::empty())?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// gzip with a fixed header (no file name, mtime 0), so equal input gives equal bytes.
pub fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::best());
    enc.write_all(data)?;
    Ok(enc.finish()?)
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the image runs and how it is named.
pub struct ImageSpec {
    /// e.g. `icmp-guard`
    pub repository: String,
    /// e.g. `["0.1.0", "latest"]`; the first is the version.
    pub tags: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Seconds since the epoch for every mtime and the config's `created`.
    pub epoch: u64,
}

/// An archive and the figures worth reporting about it.
pub struct Archive {
    pub bytes: Vec<u8>,
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
    pub layer_size: u64,
    pub layer_uncompressed_size: u64,
    /// Full names, as containerd and the kubelet spell them: `docker.io/library/icmp-guard:latest`.
    pub names: Vec<String>,
}

/// `icmp-guard:latest` as the kubelet resolves it for `image: icmp-guard:latest`.
pub fn containerd_name(repository: &str, tag: &str) -> String {
    if repository.contains('/') {
        format!("{repository}:{tag}")
    } else {
        format!("docker.io/library/{repository}:{tag}")
    }
}

pub fn build(tree: &Tree, spec: &ImageSpec) -> Result<Archive> {
    if spec.tags.is_empty() {
        bail!("an image needs at least one tag");
    }
    let layer = layer_tar(tree, spec.epoch)?;
    let layer_gz = gzip(&layer)?;
    let diff_id = format!("sha256:{}", sha256_hex(&layer));
    let layer_hex = sha256_hex(&layer_gz);
    let created = rfc3339(spec.epoch);

    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "config": {
            "Entrypoint": spec.entrypoint,
            "Cmd": spec.cmd,
            "Env": spec.env,
            "WorkingDir": "/",
            "Labels": spec.labels,
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    });
    let config_bytes = to_json(&config)?;
    let config_hex = sha256_hex(&config_bytes);

    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {
            "mediaType": MEDIA_CONFIG,
            "digest": format!("sha256:{config_hex}"),
            "size": config_bytes.len(),
        },
        "layers": [{
            "mediaType": MEDIA_LAYER_GZIP,
            "digest": format!("sha256:{layer_hex}"),
            "size": layer_gz.len(),
        }],
    });
    let manifest_bytes = to_json(&manifest)?;
    let manifest_hex = sha256_hex(&manifest_bytes);

    let names: Vec<String> = spec
        .tags
        .iter()
        .map(|t| containerd_name(&spec.repository, t))
        .collect();
    // One index entry per tag: containerd makes one image per entry, named by its annotation.
    let manifests: Vec<Value> = spec
        .tags
        .iter()
        .zip(&names)
        .map(|(tag, name)| {
            json!({
                "mediaType": MEDIA_MANIFEST,
                "digest": format!("sha256:{manifest_hex}"),
                "size": manifest_bytes.len(),
                "platform": {"architecture": "amd64", "os": "linux"},
                "annotations": {
                    ANNOTATION_CONTAINERD_NAME: name,
                    ANNOTATION_REF_NAME: tag,
                },
            })
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
    });
    // docker-archive form of the same image: podman reads names from here, because its OCI
    // archive path takes exactly one index entry and we have one per tag.
    let docker_manifest = json!([{
        "Config": format!("blobs/sha256/{config_hex}"),
        "RepoTags": spec.tags.iter().map(|t| format!("{}:{t}", spec.repository)).collect::<Vec<_>>(),
        "Layers": [format!("blobs/sha256/{layer_hex}")],
    }]);

    let mut blobs: BTreeMap<&str, &[u8]> = BTreeMap::new();
    blobs.insert(&config_hex, &config_bytes);
    blobs.insert(&manifest_hex, &manifest_bytes);
    blobs.insert(&layer_hex, &layer_gz);

    let mut b = tar::Builder::new(Vec::new());
    for dir in ["blobs/", "blobs/sha256/"] {
        b.append(
            &header(dir, tar::EntryType::Directory, 0, 0o755, spec.epoch)?,
            std::io::empty(),
        )?;
    }
    for (hex, data) in &blobs {
        let h = header(
            &format!("blobs/sha256/{hex}"),
            tar::EntryType::Regular,
            data.len() as u64,
            0o644,
            spec.epoch,
        )?;
        b.append(&h, *data)?;
    }
    let index_bytes = to_json(&index)?;
    let docker_bytes = to_json(&docker_manifest)?;
    let layout_bytes = to_json(&json!({"imageLayoutVersion": "1.0.0"}))?;
    for (name, data) in [
        ("index.json", &index_bytes),
        ("manifest.json", &docker_bytes),
        ("oci-layout", &layout_bytes),
    ] {
        let h = header(
            name,
            tar::EntryType::Regular,
            data.len() as u64,
            0o644,
            spec.epoch,
        )?;
        b.append(&h, data.as_slice())?;
    }
    let bytes = b.into_inner()?;
    Ok(Archive {
        bytes,
        manifest_digest: format!("sha256:{manifest_hex}"),
        config_digest: format!("sha256:{config_hex}"),
        layer_digest: format!("sha256:{layer_hex}"),
        layer_size: layer_gz.len() as u64,
        layer_uncompressed_size: layer.len() as u64,
        names,
    })
}

/// Compact JSON; serde_json's maps are sorted by key, so the bytes are stable.
fn to_json(v: &Value) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(v)?)
}

/// `YYYY-MM-DDTHH:MM:SSZ` for the config's `created`.
fn rfc3339(secs: u64) -> String {
    let t = crate::vm::format_utc(secs);
    // format_utc gives YYYYMMDDTHHMMSSZ.
    format!(
        "{}-{}-{}T{}:{}:{}Z",
        &t[0..4],
        &t[4..6],
        &t[6..8],
        &t[9..11],
        &t[11..13],
        &t[13..15]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ImageSpec {
        ImageSpec {
            repository: "icmp-guard".into(),
            tags: vec!["0.1.0".into(), "latest".into()],
            entrypoint: vec!["/usr/bin/icmp-guard".into()],
            cmd: vec!["run".into()],
            env: vec!["PATH=/usr/bin".into()],
            labels: BTreeMap::new(),
            epoch: 0,
        }
    }

    fn sample_tree(agent: &Path) -> Tree {
        let mut t = Tree::default();
        t.insert("/tmp", Node::Dir { mode: 0o1777 }).unwrap();
        t.add_file("/usr/bin/icmp-guard", fs::read(agent).unwrap(), 0o755)
            .unwrap();
        for lib in crate::vm::initramfs::ldd(agent).unwrap() {
            t.add_host(&lib).unwrap();
        }
        t.add_file(
            "/etc/passwd",
            b"root:x:0:0::/:/nonexistent\n".to_vec(),
            0o644,
        )
        .unwrap();
        t
    }

    #[test]
    fn same_input_same_digest() {
        // /bin/true stands in for the agent: a dynamic ELF every Debian machine has.
        let a = build(&sample_tree(Path::new("/bin/true")), &spec()).unwrap();
        let b = build(&sample_tree(Path::new("/bin/true")), &spec()).unwrap();
        assert_eq!(a.manifest_digest, b.manifest_digest);
        assert_eq!(a.bytes, b.bytes);
        // A different binary is a different image.
        let c = build(&sample_tree(Path::new("/bin/false")), &spec()).unwrap();
        assert_ne!(a.manifest_digest, c.manifest_digest);
        assert_ne!(a.layer_digest, c.layer_digest);
        // So is another creation time.
        let d = build(
            &sample_tree(Path::new("/bin/true")),
            &ImageSpec { epoch: 1, ..spec() },
        )
        .unwrap();
        assert_ne!(a.manifest_digest, d.manifest_digest);
    }

    #[test]
    fn archive_layout() {
        let a = build(&sample_tree(Path::new("/bin/true")), &spec()).unwrap();
        let mut ar = tar::Archive::new(a.bytes.as_slice());
        let mut names = Vec::new();
        let mut index = None;
        let mut docker = None;
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            assert_eq!(e.header().mtime().unwrap(), 0);
            assert_eq!(e.header().uid().unwrap(), 0);
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            if let Some(hex) = name.strip_prefix("blobs/sha256/")
                && !hex.is_empty()
            {
                // Every blob is stored under its own digest.
                assert_eq!(sha256_hex(&data), hex, "blob {name}");
            }
            match name.as_str() {
                "index.json" => index = Some(serde_json::from_slice::<Value>(&data).unwrap()),
                "manifest.json" => docker = Some(serde_json::from_slice::<Value>(&data).unwrap()),
                "oci-layout" => assert_eq!(data, br#"{"imageLayoutVersion":"1.0.0"}"#),
                _ => {}
            }
            names.push(name);
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "entries are sorted");
        let index = index.expect("index.json");
        let entries = index["manifests"].as_array().unwrap();
        let got: Vec<(&str, &str)> = entries
            .iter()
            .map(|m| {
                (
                    m["annotations"][ANNOTATION_CONTAINERD_NAME]
                        .as_str()
                        .unwrap(),
                    m["annotations"][ANNOTATION_REF_NAME].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("docker.io/library/icmp-guard:0.1.0", "0.1.0"),
                ("docker.io/library/icmp-guard:latest", "latest")
            ]
        );
        assert!(
            entries
                .iter()
                .all(|m| m["digest"] == a.manifest_digest.as_str())
        );
        let docker = docker.expect("manifest.json");
        assert_eq!(
            docker[0]["RepoTags"],
            json!(["icmp-guard:0.1.0", "icmp-guard:latest"])
        );
    }

    #[test]
    fn layer_has_the_files_and_the_loader() {
        let tree = sample_tree(Path::new("/bin/true"));
        let layer = layer_tar(&tree, 0).unwrap();
        let mut ar = tar::Archive::new(layer.as_slice());
        let mut seen = BTreeMap::new();
        for e in ar.entries().unwrap() {
            let e = e.unwrap();
            let h = e.header();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            seen.insert(name, (h.entry_type(), h.mode().unwrap(), link));
        }
        assert_eq!(seen["tmp/"].1, 0o1777);
        assert_eq!(seen["usr/bin/icmp-guard"].1, 0o755);
        // Debian's merged /usr: /lib64 is a symlink, and the loader is reachable through it.
        let lib64 = &seen["lib64"];
        assert!(lib64.0.is_symlink(), "{lib64:?}");
        assert!(
            seen.keys()
                .any(|k| k.ends_with("ld-linux-x86-64.so.2") && seen[k].0.is_file()),
            "the dynamic loader is in the layer: {:?}",
            seen.keys().collect::<Vec<_>>()
        );
        assert!(seen.keys().any(|k| k.ends_with("libc.so.6")));
    }

    #[test]
    fn conflicting_nodes_are_refused() {
        let mut t = Tree::default();
        t.add_file("/a/b", b"x".to_vec(), 0o644).unwrap();
        t.add_file("/a/b", b"x".to_vec(), 0o644).unwrap();
        assert!(t.add_file("/a/b", b"y".to_vec(), 0o644).is_err());
        assert!(t.add_file("/a/b/c", b"y".to_vec(), 0o644).is_err());
        assert!(t.add_file("a/b", b"y".to_vec(), 0o644).is_err());
        assert!(t.add_file("/a/../b", b"y".to_vec(), 0o644).is_err());
    }

    #[test]
    fn created_is_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }
}

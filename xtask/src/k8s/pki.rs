//! Keys, certificates, tokens and kubeconfigs, in `<state>/pki` and `<state>/*.kubeconfig`.
//!
//! - A CA of our own (`ca.crt`) signs the apiserver's serving certificate. The CA is
//!   what every kubeconfig trusts and what the controller-manager hands to pods as
//!   the service account `ca.crt`, so in-cluster clients (Go, rustls) verify
//!   `https://10.96.0.1:443` like on a real cluster. rustls/webpki insists on a real
//!   CA (basicConstraints CA:TRUE) above an end-entity certificate with SANs and the
//!   serverAuth usage; the apiserver's own `--cert-dir` self-signing is not needed.
//! - The serving certificate's SANs: 127.0.0.1 (kubeconfigs), 10.250.0.1 (the node
//!   address the Service points at), 10.96.0.1 (the Service), and the `kubernetes*`
//!   DNS names. A change of that list regenerates it.
//! - Token authentication: one random token per component, in `tokens.csv`; the
//!   apiserver listens on 0.0.0.0 (for the Service path), so no token is a constant.
//! - The service-account key pair (`sa.key`, `sa.pub`).

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::{APISERVER_PORT, KUBERNETES_SERVICE_IP, Layout, NODE_IP, run_checked};

/// (kubeconfig name, user, uid, groups) of every identity the cluster knows.
pub const USERS: [(&str, &str, &str, &str); 5] = [
    ("admin", "admin", "1", "system:masters"),
    (
        "controller-manager",
        "system:kube-controller-manager",
        "2",
        "",
    ),
    ("scheduler", "system:kube-scheduler", "3", ""),
    ("kubelet", "system:node:{node}", "4", "system:nodes"),
    ("kube-proxy", "system:kube-proxy", "5", ""),
];

fn sans() -> String {
    let mut s = String::new();
    for (i, ip) in ["127.0.0.1", NODE_IP, KUBERNETES_SERVICE_IP]
        .iter()
        .enumerate()
    {
        s.push_str(&format!("IP.{} = {ip}\n", i + 1));
    }
    for (i, dns) in [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .iter()
    .enumerate()
    {
        s.push_str(&format!("DNS.{} = {dns}\n", i + 1));
    }
    s
}

fn openssl_config() -> String {
    format!(
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = icmp-guard-k8s\n\
         [ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server_ext]\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = serverAuth\n\
         subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid\nsubjectAltName = @alt\n\
         [alt]\n{}",
        sans()
    )
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    run_checked(Command::new("openssl").args(args).current_dir(dir))
        .context("openssl (apt-get install -y openssl)")?;
    Ok(())
}

/// Creates whatever is missing; kubeconfigs are rewritten every time (cheap, and
/// they carry the node name).
pub fn ensure(layout: &Layout, node: &str) -> Result<()> {
    let dir = layout.pki();
    fs::create_dir_all(&dir)?;
    let cnf = dir.join("openssl.cnf");
    let cnf_text = openssl_config();
    let config_changed = fs::read_to_string(&cnf).ok().as_deref() != Some(cnf_text.as_str());
    fs::write(&cnf, &cnf_text)?;

    if !dir.join("ca.crt").exists() || !dir.join("ca.key").exists() {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3650",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca_ext",
                "-subj",
                "/CN=icmp-guard-k8s-ca",
            ],
        )?;
        // a new CA invalidates the old serving certificate
        let _ = fs::remove_file(dir.join("apiserver.crt"));
    }
    if config_changed || !dir.join("apiserver.crt").exists() {
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "apiserver.key",
                "-out",
                "apiserver.csr",
                "-config",
                "openssl.cnf",
                "-subj",
                "/CN=kube-apiserver",
            ],
        )?;
        let serial = format!("0x{}", random_hex(16)?);
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-set_serial",
                &serial,
                "-days",
                "3650",
                "-out",
                "apiserver.crt",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                "server_ext",
            ],
        )?;
    }
    if !dir.join("sa.key").exists() || !dir.join("sa.pub").exists() {
        openssl(&dir, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(&dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
    }

    let tokens_path = dir.join("tokens.csv");
    let tokens = match fs::read_to_string(&tokens_path) {
        Ok(t) if t.contains(&format!("system:node:{node},")) => t,
        _ => {
            // New tokens (first start, or the node name changed).
            let mut csv = String::new();
            for (_, user, uid, groups) in USERS {
                let user = user.replace("{node}", node);
                let tok = random_hex(24)?;
                if groups.is_empty() {
                    csv.push_str(&format!("{tok},{user},{uid}\n"));
                } else {
                    csv.push_str(&format!("{tok},{user},{uid},\"{groups}\"\n"));
                }
            }
            fs::write(&tokens_path, &csv)?;
            csv
        }
    };
    let ca = dir.join("ca.crt");
    for ((name, _, _, _), line) in USERS.iter().zip(tokens.lines()) {
        let token = line.split(',').next().unwrap_or_default();
        let kc = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: icmp-guard\n  cluster:\n    server: https://127.0.0.1:{APISERVER_PORT}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: icmp-guard\n  context:\n    cluster: icmp-guard\n    user: {name}\ncurrent-context: icmp-guard\n",
            ca.display()
        );
        let path = layout.kubeconfig(name);
        fs::write(&path, kc).with_context(|| format!("writing {}", path.display()))?;
    }
    // Tokens and keys: root only.
    for f in fs::read_dir(&dir)? {
        use std::os::unix::fs::PermissionsExt;
        let p = f?.path();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

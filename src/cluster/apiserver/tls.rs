//! Cluster CA, serving certificate and bearer token: generated at first start, reused afterwards.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub struct Credentials {
    pub ca_pem: String,
    /// Signs the serving certificates of node agents.
    pub ca_key_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
    /// The administrator's token (the kubeconfig's).
    pub token: String,
    /// Nodes' token: reads, and writes only where node agents write (see `node_may_write`).
    pub node_token: String,
}

fn write_private(path: &Path, data: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// The CA's parameters. Also rebuilt to sign with a stored CA key: the issuer's name must match byte for byte.
fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name.push(DnType::CommonName, "podvisor-ca");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(ca)
}

/// A server certificate for `names` (DNS names or IP addresses) and its key, as PEM.
fn serving_cert(
    issuer: &Issuer<'_, KeyPair>,
    common_name: &str,
    names: Vec<String>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut srv = CertificateParams::new(names)?;
    srv.distinguished_name.push(DnType::CommonName, common_name);
    srv.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    srv.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let cert = srv.signed_by(&key, issuer)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// (CA cert, CA key, API server cert, API server key) as PEM.
fn generate() -> anyhow::Result<(String, String, String, String)> {
    let ca_key = KeyPair::generate()?;
    let ca = ca_params()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    // The machine's address and name too, for nodes joining from elsewhere.
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "kubernetes".to_string(),
        crate::cluster::agent::primary_ipv4().to_string(),
    ];
    names.extend(
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')),
    );
    let (cert_pem, key_pem) = serving_cert(&issuer, "podvisor-apiserver", names)?;
    Ok((ca_cert.pem(), ca_key_pem, cert_pem, key_pem))
}

/// A serving certificate signed by the cluster CA, e.g. for a node agent: (cert, key) as PEM.
pub fn issue_serving_cert(
    creds: &Credentials,
    common_name: &str,
    names: &[String],
) -> anyhow::Result<(String, String)> {
    let ca_key = KeyPair::from_pem(&creds.ca_key_pem).context("cluster CA key")?;
    let issuer = Issuer::new(ca_params()?, ca_key);
    serving_cert(&issuer, common_name, names.to_vec())
}

/// Loads `ca.crt`, `apiserver.crt`, `apiserver.key`, `token` and `node-token` from `dir`, creating them if missing.
pub fn load_or_create(dir: &Path) -> anyhow::Result<Credentials> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, ca_key, crt, key, tok) = (
        dir.join("ca.crt"),
        dir.join("ca.key"),
        dir.join("apiserver.crt"),
        dir.join("apiserver.key"),
        dir.join("token"),
    );
    // A CA without its key (older state dirs) cannot sign agent certificates: start over.
    if !(ca.exists() && ca_key.exists() && crt.exists() && key.exists()) {
        let (ca_pem, ca_key_pem, cert_pem, key_pem) = generate()?;
        write_private(&key, &key_pem)?;
        write_private(&crt, &cert_pem)?;
        write_private(&ca_key, &ca_key_pem)?;
        write_private(&ca, &ca_pem)?;
    }
    let node_tok = dir.join("node-token");
    for path in [&tok, &node_tok] {
        if !path.exists() {
            let bytes: [u8; 24] = rand::random();
            write_private(path, &bytes.iter().map(|b| format!("{b:02x}")).collect::<String>())?;
        }
    }
    Ok(Credentials {
        ca_pem: std::fs::read_to_string(&ca)?,
        ca_key_pem: std::fs::read_to_string(&ca_key)?,
        cert_pem: std::fs::read_to_string(&crt)?,
        key_pem: std::fs::read_to_string(&key)?,
        token: std::fs::read_to_string(&tok)?.trim().to_string(),
        node_token: std::fs::read_to_string(&node_tok)?.trim().to_string(),
    })
}

pub fn server_config(c: &Credentials) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    server_config_from_pem(&c.cert_pem, &c.key_pem)
}

/// An HTTP/1.1 TLS server configuration from a PEM certificate chain and key.
pub fn server_config_from_pem(cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .context("serving cert")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("serving key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// An HTTP/1.1 TLS client configuration trusting only the cluster CA.
pub fn client_config(ca_pem: &str) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("cluster CA")?).context("cluster CA")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The hash a joining node checks the CA against: `sha256:<hex of the CA certificate's DER>`.
pub fn ca_cert_hash(ca_pem: &str) -> anyhow::Result<String> {
    use sha2::Digest;
    let der = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .next()
        .context("no certificate in the CA PEM")?
        .context("CA PEM")?;
    Ok(format!("sha256:{}", hex::encode(sha2::Sha256::digest(der.as_ref()))))
}

/// A kubeconfig (YAML) for this server: cluster with CA data, token user, context with namespace default.
pub fn kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: podvisor\n  cluster:\n    server: {server}\n    \
         certificate-authority-data: {ca}\nusers:\n- name: podvisor\n  user:\n    token: {token}\ncontexts:\n- name: \
         podvisor\n  context:\n    cluster: podvisor\n    user: podvisor\n    namespace: default\n\
         current-context: podvisor\npreferences: {{}}\n"
    )
}

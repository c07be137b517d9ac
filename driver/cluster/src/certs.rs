//! `ferrovol certs generate`: creates a private CA and the controller's and node agents'
//! mutual-TLS certificates (see [`crate::tls`]), writes them as files, and renders them as
//! Kubernetes Secret manifests.
//!
//! Layout written by [`generate`] into its output directory:
//!
//! ```text
//! ca.crt  ca.key                      the CA (ca.key is needed only to issue more)
//! controller/ca.crt tls.crt tls.key   the controller's Secret (DNS SAN ferrovol-controller)
//! node/ca.crt tls.crt tls.key         the node agents' Secret (DNS SAN ferrovol-node)
//! ```

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::DnsName;
use time::OffsetDateTime;

use crate::tls::{Role, TlsError, TlsMaterial, CA_FILE, CERT_FILE, KEY_FILE};

/// The CA's private key, next to its certificate ([`CA_FILE`]) in the output directory.
pub const CA_KEY_FILE: &str = "ca.key";
/// The controller's certificate directory within the output directory.
pub const CONTROLLER_DIR: &str = "controller";
/// The node agents' certificate directory within the output directory.
pub const NODE_DIR: &str = "node";
/// Default validity of generated certificates, in days.
pub const DEFAULT_DAYS: u32 = 365;

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// What [`generate`] creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Validity of the CA and both certificates, in days from now (default 365).
    pub days: u32,
    /// Extra subject alternative names of the controller certificate: DNS names, or IP
    /// addresses (anything that parses as one).
    pub controller_sans: Vec<String>,
    /// Extra subject alternative names of the node certificate.
    pub node_sans: Vec<String>,
    /// Replace existing files instead of refusing to.
    pub force: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions { days: DEFAULT_DAYS, controller_sans: Vec::new(), node_sans: Vec::new(), force: false }
    }
}

/// Where [`generate`] put things.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The CA certificate (`<out>/ca.crt`).
    pub ca_cert: PathBuf,
    /// The controller's directory (`<out>/controller`), loadable by [`TlsMaterial::load`].
    pub controller_dir: PathBuf,
    /// The node agents' directory (`<out>/node`).
    pub node_dir: PathBuf,
}

/// Why certificates could not be generated or rendered.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// An output file exists and `force` was not given.
    #[error("{} already exists; refusing to overwrite it without --force", path.display())]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// A directory could not be created.
    #[error("cannot create directory {}: {source}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// An extra subject alternative name is unusable.
    #[error("invalid extra subject alternative name {name:?} for the {role} certificate: {reason}")]
    BadSan {
        /// The role whose certificate it was meant for.
        role: Role,
        /// The name as given.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// The validity period is zero or too long to represent.
    #[error("invalid validity of {days} days: {reason}")]
    BadValidity {
        /// The requested number of days.
        days: u32,
        /// Why it is refused.
        reason: &'static str,
    },
    /// rcgen failed to create a key or certificate.
    #[error("cannot generate the {what}: {source}")]
    Generate {
        /// Which key or certificate.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A generated certificate failed the checks made on it before anything is written.
    #[error("the generated {role} certificate is unusable: {problem}")]
    SelfCheck {
        /// The role it was generated for.
        role: Role,
        /// What is wrong with it.
        problem: String,
    },
    /// A namespace or name prefix for the Secret manifests is not a valid Kubernetes name.
    #[error("invalid {what} {value:?}: {reason}")]
    BadName {
        /// "namespace" or "name prefix".
        what: &'static str,
        /// The value as given.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// Generated or stored material failed its role check.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One role's generated certificate and key, PEM-encoded.
struct Leaf {
    cert_pem: String,
    key_pem: String,
}

/// Generates a fresh CA plus a controller and a node certificate (ECDSA P-256), and writes
/// them into `out`: `ca.crt`, `ca.key`, `controller/{ca.crt,tls.crt,tls.key}`,
/// `node/{ca.crt,tls.crt,tls.key}`. Keys are written with mode 0600, certificates 0644.
///
/// Without `opts.force`, nothing is written if any of those files exists (the error names
/// the first one found). Directories are created as needed; each file is written to a
/// temporary file in its directory, synced, and renamed into place. The written role
/// directories are then loaded back and checked with [`TlsMaterial::check_role`].
pub fn generate(out: &Path, opts: &GenerateOptions) -> Result<Generated, CertError> {
    let controller_dir = out.join(CONTROLLER_DIR);
    let node_dir = out.join(NODE_DIR);
    let ca_cert_path = out.join(CA_FILE);

    let mut files: Vec<(PathBuf, u32)> = vec![(ca_cert_path.clone(), CERT_MODE), (out.join(CA_KEY_FILE), KEY_MODE)];
    for dir in [&controller_dir, &node_dir] {
        files.push((dir.join(CA_FILE), CERT_MODE));
        files.push((dir.join(CERT_FILE), CERT_MODE));
        files.push((dir.join(KEY_FILE), KEY_MODE));
    }
    if !opts.force {
        if let Some((path, _)) = files.iter().find(|(path, _)| path.symlink_metadata().is_ok()) {
            return Err(CertError::Exists { path: path.clone() });
        }
    }

    let controller_sans = subject_alt_names(Role::Controller, &opts.controller_sans)?;
    let node_sans = subject_alt_names(Role::Node, &opts.node_sans)?;

    let days = opts.days;
    if days == 0 {
        return Err(CertError::BadValidity { days, reason: "it must be at least one day" });
    }
    let now = OffsetDateTime::now_utc();
    let not_before = now - time::Duration::hours(1);
    let not_after = now
        .checked_add(time::Duration::days(i64::from(days)))
        .filter(|t| t.year() <= 9999)
        .ok_or(CertError::BadValidity { days, reason: "it ends after the year 9999" })?;

    let ca_key = new_key("CA key")?;
    let ca_key_pem = ca_key.serialize_pem();
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = common_name("ferrovol CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = not_before;
    ca_params.not_after = not_after;
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
        .map_err(|source| CertError::Generate { what: "CA certificate", source })?;
    let ca_pem = ca.pem();

    let controller = leaf(Role::Controller, controller_sans, not_before, not_after, &ca)?;
    let node = leaf(Role::Node, node_sans, not_before, not_after, &ca)?;

    let contents: Vec<&[u8]> = vec![
        ca_pem.as_bytes(),
        ca_key_pem.as_bytes(),
        ca_pem.as_bytes(),
        controller.cert_pem.as_bytes(),
        controller.key_pem.as_bytes(),
        ca_pem.as_bytes(),
        node.cert_pem.as_bytes(),
        node.key_pem.as_bytes(),
    ];
    for dir in [out, &controller_dir, &node_dir] {
        fs::create_dir_all(dir).map_err(|source| CertError::CreateDir { path: dir.to_path_buf(), source })?;
    }
    for ((path, mode), data) in files.iter().zip(contents) {
        write_atomic(path, data, *mode)?;
    }

    TlsMaterial::load(&controller_dir)?.check_role(Role::Controller)?;
    TlsMaterial::load(&node_dir)?.check_role(Role::Node)?;

    Ok(Generated { ca_cert: ca_cert_path, controller_dir, node_dir })
}

/// Renders two Kubernetes Secrets of type `kubernetes.io/tls` (`ca.crt`, `tls.crt`,
/// `tls.key`), `{prefix}-controller-tls` and `{prefix}-node-tls` in `namespace`, from the
/// role directories of a directory written by [`generate`]. Both role directories are
/// checked with [`TlsMaterial::check_role`] first. The CA key is never included.
pub fn secret_manifests(out: &Path, namespace: &str, prefix: &str) -> Result<String, CertError> {
    check_dns_label("namespace", namespace)?;
    check_name_prefix(prefix)?;

    let mut manifests = Vec::with_capacity(2);
    for (role, dir) in [(Role::Controller, CONTROLLER_DIR), (Role::Node, NODE_DIR)] {
        let material = TlsMaterial::load(&out.join(dir))?;
        material.check_role(role)?;
        manifests.push(secret_manifest(&material, role, namespace, prefix));
    }
    Ok(manifests.join("---\n"))
}

fn secret_manifest(material: &TlsMaterial, role: Role, namespace: &str, prefix: &str) -> String {
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    format!(
        "apiVersion: v1\n\
         kind: Secret\n\
         metadata:\n  \
           name: {prefix}-{role}-tls\n  \
           namespace: {namespace}\n  \
           labels:\n    \
             app.kubernetes.io/name: ferrovol\n    \
             app.kubernetes.io/component: {role}\n\
         type: kubernetes.io/tls\n\
         data:\n  \
           {CA_FILE}: {}\n  \
           {CERT_FILE}: {}\n  \
           {KEY_FILE}: {}\n",
        b64(&material.ca_pem),
        b64(&material.cert_pem),
        b64(&material.key_pem),
    )
}

/// The subject alternative names of `role`'s certificate: its role name first, then the
/// extras (IP addresses where they parse as such, DNS names otherwise), without duplicates.
fn subject_alt_names(role: Role, extra: &[String]) -> Result<Vec<SanType>, CertError> {
    let bad = |name: &str, reason: String| CertError::BadSan { role, name: name.to_owned(), reason };
    let mut sans = vec![dns_san(role.dns_name()).map_err(|r| bad(role.dns_name(), r))?];
    for name in extra {
        let trimmed = name.trim();
        let san = match trimmed.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let normalized = trimmed.trim_end_matches('.').to_ascii_lowercase();
                for other in [Role::Controller, Role::Node] {
                    if other != role && normalized == other.dns_name() {
                        return Err(bad(
                            name,
                            format!(
                                "it is the {other} role's name; a {role} certificate carrying it \
                                 could act as the {other}"
                            ),
                        ));
                    }
                }
                dns_san(&normalized).map_err(|r| bad(name, r))?
            }
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn dns_san(name: &str) -> Result<SanType, String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    DnsName::try_from(name).map_err(|_| "it is neither a valid DNS name nor an IP address".to_owned())?;
    let ia5 = name.to_owned().try_into().map_err(|e: rcgen::Error| e.to_string())?;
    Ok(SanType::DnsName(ia5))
}

fn common_name(name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "ferrovol");
    dn.push(DnType::CommonName, name);
    dn
}

fn new_key(what: &'static str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Generate { what, source })
}

fn leaf(
    role: Role,
    sans: Vec<SanType>,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    ca: &Issuer<'_, KeyPair>,
) -> Result<Leaf, CertError> {
    let (key_what, cert_what) = match role {
        Role::Controller => ("controller key", "controller certificate"),
        Role::Node => ("node key", "node certificate"),
    };
    let key = new_key(key_what)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&format!("ferrovol {role}"));
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, ca).map_err(|source| CertError::Generate { what: cert_what, source })?;
    // The role separation must hold whatever the extra names were: refuse a certificate
    // that the other role's name would also match (e.g. through a wildcard).
    let self_check = |problem: String| CertError::SelfCheck { role, problem };
    let end_entity = webpki::EndEntityCert::try_from(cert.der())
        .map_err(|e| self_check(format!("it cannot be parsed back: {e}")))?;
    let other = role.other();
    if end_entity.verify_is_valid_for_subject_name(&other.server_name()).is_ok() {
        return Err(self_check(format!("the extra names make it valid for {} as well", other.dns_name())));
    }
    Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Writes `data` to `path` with `mode` via a synced temporary file in the same directory
/// renamed over it, then syncs the directory.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), CertError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |source: std::io::Error| CertError::Write { path: path.to_path_buf(), source };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have narrowed `mode`; make it exact.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(data)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(err(e));
    }
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)
}

/// A Kubernetes namespace must be a DNS-1123 label.
fn check_dns_label(what: &'static str, value: &str) -> Result<(), CertError> {
    let bad = |reason: &str| CertError::BadName { what, value: value.to_owned(), reason: reason.to_owned() };
    if value.is_empty() || value.len() > 63 {
        return Err(bad("it must be 1 to 63 characters long"));
    }
    check_name_chars(value).map_err(|r| bad(&r))
}

/// The prefix must keep `{prefix}-controller-tls` a valid Secret name (DNS-1123 subdomain);
/// dots are not allowed so that it is a plain label.
fn check_name_prefix(prefix: &str) -> Result<(), CertError> {
    let bad =
        |reason: &str| CertError::BadName { what: "name prefix", value: prefix.to_owned(), reason: reason.to_owned() };
    let longest_suffix = "-controller-tls".len();
    if prefix.is_empty() || prefix.len() + longest_suffix > 253 {
        return Err(bad("it must be 1 to 238 characters long"));
    }
    check_name_chars(prefix).map_err(|r| bad(&r))
}

fn check_name_chars(value: &str) -> Result<(), String> {
    if !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("only lowercase letters, digits and '-' are allowed".to_owned());
    }
    if value.starts_with('-') || value.ends_with('-') {
        return Err("it must start and end with a letter or digit".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName};

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn generate_writes_checked_role_material() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("certs");
        let opts = GenerateOptions {
            controller_sans: vec!["ferrovol-controller.kube-system.svc".to_owned(), "10.0.0.1".to_owned()],
            node_sans: vec!["::1".to_owned()],
            ..GenerateOptions::default()
        };
        let generated = generate(&out, &opts).unwrap();
        assert_eq!(generated.ca_cert, out.join("ca.crt"));
        assert_eq!(generated.controller_dir, out.join("controller"));
        assert_eq!(generated.node_dir, out.join("node"));

        for file in ["ca.crt", "controller/ca.crt", "controller/tls.crt", "node/ca.crt", "node/tls.crt"] {
            assert_eq!(mode(&out.join(file)), 0o644, "{file}");
        }
        for file in ["ca.key", "controller/tls.key", "node/tls.key"] {
            assert_eq!(mode(&out.join(file)), 0o600, "{file}");
        }
        let ca = fs::read(out.join("ca.crt")).unwrap();
        assert_eq!(fs::read(out.join("controller/ca.crt")).unwrap(), ca);
        assert_eq!(fs::read(out.join("node/ca.crt")).unwrap(), ca);
        // No temporary files left behind.
        for dir in [&out, &generated.controller_dir, &generated.node_dir] {
            for entry in fs::read_dir(dir).unwrap() {
                let name = entry.unwrap().file_name();
                assert!(!name.to_string_lossy().starts_with('.'), "{name:?}");
            }
        }

        let controller = TlsMaterial::load(&generated.controller_dir).unwrap();
        let node = TlsMaterial::load(&generated.node_dir).unwrap();
        controller.check_role(Role::Controller).unwrap();
        node.check_role(Role::Node).unwrap();
        let err = controller.check_role(Role::Node).unwrap_err().to_string();
        assert!(err.contains("is not a ferrovol node certificate (no DNS name ferrovol-node)"), "{err}");
        let err = node.check_role(Role::Controller).unwrap_err().to_string();
        assert!(err.contains("is not a ferrovol controller certificate"), "{err}");

        // The extra names are there.
        let der = CertificateDer::from_pem_slice(&controller.cert_pem).unwrap();
        let cert = webpki::EndEntityCert::try_from(&der).unwrap();
        for name in ["ferrovol-controller.kube-system.svc", "10.0.0.1"] {
            cert.verify_is_valid_for_subject_name(&ServerName::try_from(name).unwrap()).unwrap();
        }

        // A second run refuses, naming the file, and changes nothing.
        let err = generate(&out, &GenerateOptions::default()).unwrap_err();
        assert!(matches!(&err, CertError::Exists { path } if *path == out.join("ca.crt")), "{err}");
        assert!(err.to_string().contains(&out.join("ca.crt").display().to_string()));
        assert_eq!(fs::read(out.join("ca.crt")).unwrap(), ca);

        // Any single existing file blocks it.
        let partial = tmp.path().join("partial");
        fs::create_dir_all(partial.join("node")).unwrap();
        fs::write(partial.join("node/tls.key"), b"keep me").unwrap();
        let err = generate(&partial, &GenerateOptions::default()).unwrap_err();
        assert!(matches!(&err, CertError::Exists { path } if *path == partial.join("node/tls.key")), "{err}");
        assert!(!partial.join("ca.crt").exists());

        // With force it replaces everything, with a new CA.
        let forced = GenerateOptions { force: true, ..GenerateOptions::default() };
        generate(&out, &forced).unwrap();
        assert_ne!(fs::read(out.join("ca.crt")).unwrap(), ca);
        assert_eq!(mode(&out.join("node/tls.key")), 0o600);
        TlsMaterial::load(&generated.node_dir).unwrap().check_role(Role::Node).unwrap();
    }

    #[test]
    fn secret_manifests_carry_both_roles() {
        let tmp = tempfile::tempdir().unwrap();
        let generated = generate(tmp.path(), &GenerateOptions::default()).unwrap();
        let yaml = secret_manifests(tmp.path(), "kube-system", "ferrovol").unwrap();

        let docs: Vec<&str> = yaml.split("---\n").collect();
        assert_eq!(docs.len(), 2, "{yaml}");
        for (doc, name, dir) in [
            (docs[0], "ferrovol-controller-tls", &generated.controller_dir),
            (docs[1], "ferrovol-node-tls", &generated.node_dir),
        ] {
            assert!(doc.contains(&format!("  name: {name}\n")), "{doc}");
            assert!(doc.contains("  namespace: kube-system\n"), "{doc}");
            assert!(doc.contains("\ntype: kubernetes.io/tls\n"), "{doc}");
            for file in [CA_FILE, CERT_FILE, KEY_FILE] {
                let prefix = format!("  {file}: ");
                let line =
                    doc.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{file} missing in {doc}"));
                let decoded = base64::engine::general_purpose::STANDARD.decode(&line[prefix.len()..]).unwrap();
                assert_eq!(decoded, fs::read(dir.join(file)).unwrap(), "{name}/{file}");
            }
        }
        // The CA key never leaves the output directory.
        let ca_key = fs::read(tmp.path().join(CA_KEY_FILE)).unwrap();
        let ca_key_b64 = base64::engine::general_purpose::STANDARD.encode(ca_key);
        assert!(!yaml.contains(&ca_key_b64));

        assert!(matches!(
            secret_manifests(tmp.path(), "Kube System", "ferrovol"),
            Err(CertError::BadName { what: "namespace", .. })
        ));
        assert!(matches!(secret_manifests(tmp.path(), "default", "x\n  evil: 1"), Err(CertError::BadName { .. })));
        let empty = tempfile::tempdir().unwrap();
        let err = secret_manifests(empty.path(), "default", "ferrovol").unwrap_err();
        assert!(err.to_string().contains("controller/ca.crt"), "{err}");
    }

    #[test]
    fn extra_names_cannot_cross_roles() {
        let tmp = tempfile::tempdir().unwrap();
        let opts = GenerateOptions { node_sans: vec!["ferrovol-controller".to_owned()], ..GenerateOptions::default() };
        let err = generate(tmp.path(), &opts).unwrap_err();
        assert!(matches!(&err, CertError::BadSan { role: Role::Node, .. }), "{err}");
        let opts = GenerateOptions { controller_sans: vec!["not a name!".to_owned()], ..GenerateOptions::default() };
        assert!(matches!(generate(tmp.path(), &opts), Err(CertError::BadSan { .. })));
        let opts = GenerateOptions { days: 0, ..GenerateOptions::default() };
        assert!(matches!(generate(tmp.path(), &opts), Err(CertError::BadValidity { .. })));
        let opts = GenerateOptions { days: u32::MAX, ..GenerateOptions::default() };
        assert!(matches!(generate(tmp.path(), &opts), Err(CertError::BadValidity { .. })));
        // Nothing was written by the refused runs.
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 0);
    }
}

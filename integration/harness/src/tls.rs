//! Throwaway certificates (rcgen): a test CA and server certificates it
//! signs, for MariaDB servers that serve TLS ([`ClusterSpec::tls`](crate::ClusterSpec::tls))
//! and for the proxy's HTTPS listeners in tests and `cargo dev --tls`.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::HarnessError;

/// The names every server certificate of the harness is valid for: the
/// servers listen on 127.0.0.1, and `localhost` for clients that use it.
pub const LOCAL_NAMES: [&str; 2] = ["127.0.0.1", "localhost"];

/// A certificate authority that exists for one cluster or test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TestCa")
    }
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The files of a TLS server: the CA that signed it, its certificate and
/// its private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn tls_error(what: &str, e: rcgen::Error) -> HarnessError {
    HarnessError::io(
        format!("generating {what}"),
        std::io::Error::other(e.to_string()),
    )
}

impl TestCa {
    /// A new CA named `name` (its common name), with a fresh key.
    pub fn new(name: &str) -> Result<TestCa, HarnessError> {
        let key = KeyPair::generate().map_err(|e| tls_error("a CA key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params
            .self_signed(&key)
            .map_err(|e| tls_error("a CA certificate", e))?;
        Ok(TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate, PEM (what clients trust).
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A server certificate for `names` (IP addresses or DNS names), with
    /// a fresh key.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, HarnessError> {
        let key = KeyPair::generate().map_err(|e| tls_error("a server key", e))?;
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(names.clone()).map_err(|e| tls_error("server names", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| tls_error("a server certificate", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, `<stem>.pem` and `<stem>-key.pem` (mode 0600) into
    /// `dir` (created if missing): a server certificate for `names`.
    pub fn write_server(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
    ) -> Result<TlsFiles, HarnessError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| HarnessError::io(format!("creating {}", dir.display()), e))?;
        let issued = self.issue(names)?;
        let files = TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}-key.pem")),
        };
        write(&files.ca, &self.pem, 0o644)?;
        write(&files.cert, &issued.cert_pem, 0o644)?;
        write(&files.key, &issued.key_pem, 0o600)?;
        Ok(files)
    }
}

/// Writes `text` to `path` through a temporary file and a rename, so a
/// reader (a reloading server) never sees half a file.
pub fn write(path: &Path, text: &str, mode: u32) -> Result<(), HarnessError> {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = path.with_extension("tmp");
    let io = |e| HarnessError::io(format!("writing {}", path.display()), e);
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

/// The `mariadbd` arguments serving TLS with `files`.
pub fn server_args(files: &TlsFiles) -> Vec<String> {
    vec![
        format!("--ssl-ca={}", files.ca.display()),
        format!("--ssl-cert={}", files.cert.display()),
        format!("--ssl-key={}", files.key.display()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_issues_server_certificates_into_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new("tally test CA").expect("ca");
        let files = ca
            .write_server(dir.path(), "server", &LOCAL_NAMES)
            .expect("files");
        let ca_pem = std::fs::read_to_string(&files.ca).expect("ca");
        assert!(ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(ca_pem, ca.cert_pem());
        let key = std::fs::read_to_string(&files.key).expect("key");
        assert!(key.contains("PRIVATE KEY"));
        assert_eq!(
            server_args(&files)[0],
            format!("--ssl-ca={}", files.ca.display())
        );
    }
}

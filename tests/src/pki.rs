//! A throwaway PKI for TLS tests: a CA, a server certificate for `localhost` and `127.0.0.1`,
//! and client certificates, all as PEM files in a temporary directory (rcgen, no openssl).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tempfile::TempDir;

/// Why the PKI could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {0}: {1}")]
    Write(PathBuf, std::io::Error),
}

/// A CA and the files it issued; see the module doc.
pub struct TestPki {
    dir: TempDir,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, as files.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (PEM).
    pub cert: PathBuf,
    /// The private key (PEM, PKCS#8).
    pub key: PathBuf,
}

impl TestPki {
    /// A new CA named `name`, its certificate written to [`Self::ca_path`].
    pub fn new(name: &str) -> Result<Self, PkiError> {
        let dir = tempfile::tempdir().map_err(|e| PkiError::Write(PathBuf::from("tempdir"), e))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let pki = Self { dir, ca };
        pki.write("ca.pem", &pki.ca.pem())?;
        Ok(pki)
    }

    /// The directory of the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn write(&self, name: &str, pem: &str) -> Result<PathBuf, PkiError> {
        let path = self.dir.path().join(name);
        std::fs::write(&path, pem).map_err(|e| PkiError::Write(path.clone(), e))?;
        Ok(path)
    }

    fn issue(
        &self,
        file_stem: &str,
        names: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<CertFiles, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, file_stem.to_string());
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(CertFiles {
            cert: self.write(&format!("{file_stem}.pem"), &cert.pem())?,
            key: self.write(&format!("{file_stem}-key.pem"), &key.serialize_pem())?,
        })
    }

    /// A server certificate for `localhost` and `127.0.0.1`, written as `<stem>.pem` and
    /// `<stem>-key.pem` (an existing pair is replaced: a rotation).
    pub fn server(&self, stem: &str) -> Result<CertFiles, PkiError> {
        self.issue(
            stem,
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate named `stem`.
    pub fn client(&self, stem: &str) -> Result<CertFiles, PkiError> {
        self.issue(stem, vec![stem.into()], ExtendedKeyUsagePurpose::ClientAuth)
    }
}

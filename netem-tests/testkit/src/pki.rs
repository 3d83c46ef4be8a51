//! Certificates for a set of sites from one CA, made by the gateway's own `certs` code, in a
//! temporary directory that lives as long as the [`Pki`].

use std::path::Path;

use ferry_gateway::certs;

use crate::KitError;

/// A CA plus one certificate and key per site (`ca.pem`, `SITE.pem`, `SITE.key`), in a
/// temporary directory deleted on drop. Gateway configs are written next to them.
#[derive(Debug)]
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Generates certificates for `sites` in a fresh temporary directory.
    pub fn generate(sites: &[&str]) -> Result<Self, KitError> {
        let dir = tempfile::tempdir().map_err(|source| KitError::File {
            what: "creating a temporary directory in",
            path: std::env::temp_dir(),
            source,
        })?;
        let names: Vec<String> = sites.iter().map(|s| s.to_string()).collect();
        certs::generate(dir.path(), &names, &certs::Issue::default())
            .map_err(|e| KitError::Certificates { dir: dir.path().to_owned(), message: e.to_string() })?;
        Ok(Self { dir })
    }

    /// [`Pki::generate`] for a test: panics when the certificates cannot be made.
    pub fn new(sites: &[&str]) -> Self {
        Self::generate(sites).unwrap_or_else(|e| panic!("test PKI: {e}"))
    }

    /// The directory holding the certificates.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_site_gets_a_certificate_and_key() {
        let pki = Pki::generate(&["site-a", "site-b"]).expect("pki");
        for file in ["ca.pem", "site-a.pem", "site-a.key", "site-b.pem", "site-b.key"] {
            assert!(pki.path().join(file).is_file(), "{file} missing");
        }
    }
}

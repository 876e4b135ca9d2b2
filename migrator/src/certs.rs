//! `migrator certs`: a fresh CA and, signed by it, one credentials directory per host and
//! one for command-line clients, in the layout `tls` loads (`ca.pem`, `cert.pem`, `key.pem`).

use std::{
    fs,
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use thiserror::Error;

use crate::tls::{CA_FILE, CERT_FILE, KEY_FILE};

/// The directory `migrator certs` writes for command-line clients.
pub const CLIENT_DIR: &str = "client";

#[derive(Debug, Error)]
pub enum CertsError {
    #[error("{dir} already holds a CA; choose an empty directory")]
    Exists { dir: PathBuf },
    #[error("cannot generate {what}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Writes a fresh CA and, for every host and for command-line clients, a credentials
/// directory signed by it. Returns the directories written.
///
/// Every host certificate also names the loopback addresses, so the CLI can reach a daemon on
/// its own machine with the same files.
pub fn generate(out: &Path, hosts: &[String]) -> Result<Vec<PathBuf>, CertsError> {
    if out.join(CA_FILE).exists() {
        return Err(CertsError::Exists {
            dir: out.to_path_buf(),
        });
    }
    let generate = |what: &str| {
        let what = what.to_string();
        move |source| CertsError::Generate { what, source }
    };
    let ca_key = KeyPair::generate().map_err(generate("the CA key"))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(generate("the CA"))?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "migrator CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).map_err(generate("the CA"))?;
    let issuer = Issuer::new(ca_params, ca_key);

    // Each leaf is made before anything is written, so a bad host name changes nothing.
    let loopback = [
        IpAddr::V4(Ipv4Addr::LOCALHOST).to_string(),
        IpAddr::V6(Ipv6Addr::LOCALHOST).to_string(),
        "localhost".to_string(),
    ];
    let mut leaves = Vec::new();
    for name in hosts.iter().map(String::as_str).chain([CLIENT_DIR]) {
        let sans: Vec<String> = if name == CLIENT_DIR {
            Vec::new()
        } else {
            std::iter::once(name.to_string())
                .chain(loopback.iter().filter(|l| *l != name).cloned())
                .collect()
        };
        let what = format!("the certificate for {name}");
        let key = KeyPair::generate().map_err(generate(&what))?;
        let mut params = CertificateParams::new(sans).map_err(generate(&what))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).map_err(generate(&what))?;
        leaves.push((out.join(name), cert.pem(), key.serialize_pem()));
    }

    write_file(&out.join(CA_FILE), &ca_cert.pem(), 0o644)?;
    write_file(
        &out.join("ca-key.pem"),
        &issuer.key().serialize_pem(),
        0o600,
    )?;
    let mut dirs = Vec::new();
    for (dir, cert, key) in leaves {
        fs::create_dir_all(&dir).map_err(|source| CertsError::Write {
            path: dir.clone(),
            source,
        })?;
        write_file(&dir.join(CA_FILE), &ca_cert.pem(), 0o644)?;
        write_file(&dir.join(CERT_FILE), &cert, 0o644)?;
        write_file(&dir.join(KEY_FILE), &key, 0o600)?;
        dirs.push(dir);
    }
    Ok(dirs)
}

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CertsError> {
    let write = |source| CertsError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(write)?;
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(write)?;
    // The mode above applies only to a file created here: tighten one that existed.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write)?;
    file.write_all(contents.as_bytes()).map_err(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("migrator-certs-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn keys_are_private_even_over_an_existing_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("modes");
        fs::create_dir_all(dir.join(CLIENT_DIR)).unwrap();
        fs::write(dir.join(CLIENT_DIR).join(KEY_FILE), "old").unwrap();
        fs::set_permissions(
            dir.join(CLIENT_DIR).join(KEY_FILE),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        generate(&dir, &[]).unwrap();
        for key in [dir.join("ca-key.pem"), dir.join(CLIENT_DIR).join(KEY_FILE)] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn generate_refuses_to_overwrite_a_ca() {
        let dir = temp_dir("twice");
        generate(&dir, &[]).unwrap();
        let before = fs::read(dir.join(CA_FILE)).unwrap();
        assert!(matches!(
            generate(&dir, &["10.0.0.1".into()]),
            Err(CertsError::Exists { .. })
        ));
        assert_eq!(fs::read(dir.join(CA_FILE)).unwrap(), before);
        assert!(!dir.join("10.0.0.1").exists());
        let _ = fs::remove_dir_all(&dir);
    }
}

//! Mutual TLS between daemons and their clients, for the API and the migration data stream.
//!
//! A node's credentials are one directory holding `ca.pem` (the authority it trusts),
//! `cert.pem` (its own chain) and `key.pem`. The same identity serves (daemons) and connects
//! (daemons calling peers, the CLI and the dashboard): every certificate `migrator certs`
//! (`crate::certs`) makes is valid for both. Servers require a client certificate signed by the CA, so a peer without
//! one is refused in the handshake, before a single request byte is decoded.
//!
//! The data connection's TLS tunnel is `migration::link`'s.

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use thiserror::Error;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// File names inside a credentials directory.
pub const CA_FILE: &str = "ca.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the CA certificate in {path} is not usable")]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the certificate and key in {dir} do not make a usable identity")]
    Identity {
        dir: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the client-certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the TLS handshake with {peer} failed (wrong or missing certificate?)")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("the TLS handshake with {peer} did not finish in {HANDSHAKE_TIMEOUT:?}")]
    HandshakeTimeout { peer: SocketAddr },
}

/// A byte stream the API or a data tunnel can run over: plain TCP or TLS over TCP.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}
pub type Stream = Box<dyn Io>;

/// One node's TLS configuration, loaded from its credentials directory.
pub struct Identity {
    dir: PathBuf,
    acceptor: TlsAcceptor,
    connector: TlsConnector,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("dir", &self.dir).finish()
    }
}

impl Identity {
    /// Loads `ca.pem`, `cert.pem` and `key.pem` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let ca_path = dir.join(CA_FILE);
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&ca_path)? {
            roots.add(ca).map_err(|source| TlsError::BadCa {
                path: ca_path.clone(),
                source,
            })?;
        }
        let roots = Arc::new(roots);
        let chain = read_certs(&cert_path)?;
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| TlsError::Read {
            path: key_path.clone(),
            source,
        })?;
        let identity = |source| TlsError::Identity {
            dir: dir.to_path_buf(),
            source,
        };

        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(TlsError::Verifier)?;
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(identity)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(identity)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(identity)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(identity)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let read = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Whether connections are plain TCP (loopback only) or mutually authenticated TLS.
#[derive(Clone, Debug, Default)]
pub enum Security {
    #[default]
    Plain,
    MutualTls(Arc<Identity>),
}

impl Security {
    /// Plain without a directory; mutual TLS with the credentials in `dir`.
    pub fn from_dir(dir: Option<&Path>) -> Result<Self, TlsError> {
        Ok(match dir {
            None => Self::Plain,
            Some(dir) => Self::MutualTls(Arc::new(Identity::load(dir)?)),
        })
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Self::MutualTls(_))
    }

    /// Connects to `addr`, and completes the handshake when TLS is on.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Stream, TlsError> {
        self.connect_tuned(addr, |_| {}).await
    }

    /// As `connect`, with `tune` applied to the TCP socket before the handshake.
    pub async fn connect_tuned(
        &self,
        addr: SocketAddr,
        tune: impl FnOnce(&TcpStream),
    ) -> Result<Stream, TlsError> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| TlsError::Connect { addr, source })?;
        let _ = tcp.set_nodelay(true);
        tune(&tcp);
        self.client_handshake(tcp, addr).await
    }

    /// The client side of the handshake on an already connected socket.
    pub async fn client_handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<Stream, TlsError> {
        match self {
            Self::Plain => Ok(Box::new(tcp)),
            Self::MutualTls(identity) => {
                // Daemons are dialled by address; their certificates carry it as a SAN.
                let name = ServerName::IpAddress(peer.ip().into());
                let handshake = identity.connector.connect(name, tcp);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => Ok(Box::new(tls)),
                    Ok(Err(source)) => Err(TlsError::Handshake { peer, source }),
                    Err(_) => Err(TlsError::HandshakeTimeout { peer }),
                }
            }
        }
    }

    /// The server side: with TLS on, a peer without a certificate from our CA is refused here.
    pub async fn accept(&self, tcp: TcpStream, peer: SocketAddr) -> Result<Stream, TlsError> {
        let _ = tcp.set_nodelay(true);
        match self {
            Self::Plain => Ok(Box::new(tcp)),
            Self::MutualTls(identity) => {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, identity.acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Ok(Box::new(tls)),
                    Ok(Err(source)) => Err(TlsError::Handshake { peer, source }),
                    Err(_) => Err(TlsError::HandshakeTimeout { peer }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::certs::{CLIENT_DIR, generate};

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("migrator-tls-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    async fn handshake(server: &Security, client: &Security) -> (bool, bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = server.clone();
        let accepted = tokio::spawn(async move {
            let (tcp, peer) = listener.accept().await.unwrap();
            match server.accept(tcp, peer).await {
                Ok(mut stream) => {
                    let mut byte = [0u8; 1];
                    stream.read_exact(&mut byte).await.is_ok() && byte[0] == 7
                }
                Err(_) => false,
            }
        });
        let sent = match client.connect(addr).await {
            Ok(mut stream) => stream.write_all(&[7]).await.is_ok() && stream.flush().await.is_ok(),
            Err(_) => false,
        };
        (sent, accepted.await.unwrap())
    }

    #[tokio::test]
    async fn only_peers_of_the_same_ca_get_through() {
        let ours = temp_dir("ours");
        let theirs = temp_dir("theirs");
        generate(&ours, &["127.0.0.1".into()]).unwrap();
        generate(&theirs, &["127.0.0.1".into()]).unwrap();
        let server = Security::from_dir(Some(&ours.join("127.0.0.1"))).unwrap();
        let client = Security::from_dir(Some(&ours.join(CLIENT_DIR))).unwrap();
        let stranger = Security::from_dir(Some(&theirs.join(CLIENT_DIR))).unwrap();

        assert_eq!(handshake(&server, &client).await, (true, true));
        assert!(!handshake(&server, &stranger).await.1);
        assert!(!handshake(&server, &Security::Plain).await.1);
        let _ = fs::remove_dir_all(&ours);
        let _ = fs::remove_dir_all(&theirs);
    }

    #[test]
    fn missing_or_bad_files_are_one_clear_error() {
        let dir = temp_dir("bad");
        let error = Identity::load(&dir).unwrap_err();
        assert!(error.to_string().contains("ca.pem"), "{error}");
        generate(&dir, &[]).unwrap();
        fs::write(dir.join(CLIENT_DIR).join(CERT_FILE), "not a certificate").unwrap();
        let error = Identity::load(&dir.join(CLIENT_DIR)).unwrap_err();
        assert!(error.to_string().contains("cert.pem"), "{error}");
        let _ = fs::remove_dir_all(&dir);
    }
}

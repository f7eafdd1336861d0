//! The cluster's own certificate authority: node server certificates, escale's client
//! certificate, node bundles, and the verification of what a node presents.
//!
//! - [`Ca`]: an ECDSA P-256 CA made with rcgen (CA:true, pathlen 0, key usage
//!   keyCertSign/cRLSign, subject naming the installation, 10 years). It issues node server
//!   certificates ([`Ca::issue_server`]: SAN = the node's host, an IP SAN for an IP and a DNS
//!   SAN otherwise, EKU serverAuth only, [`NODE_CERT_VALIDITY_DAYS`]) and escale's client
//!   certificate ([`Ca::issue_client`]: EKU clientAuth only).
//! - [`Pki`]: the CA and escale's client certificate as the registry keeps them (keys sealed by
//!   the master key, bound to `cluster-ca` and `cluster-client`), made on first use and reused
//!   across restarts; the client certificate is reissued when fewer than
//!   [`RENEW_BEFORE_DAYS`] days are left or when it was not issued by the stored CA.
//!   [`Pki::issue_node`] issues a node's [`NodeBundle`] and records what was issued.
//! - [`NodeBundle`]: what an operator installs on a node (`ca.pem`, `server-cert.pem`,
//!   `server-key.pem`, `daemon.json`, a systemd drop-in, `install.sh`, `README`), written by
//!   [`NodeBundle::write_to`]. escale only writes files; nothing here runs a shell.
//! - Verification: [`Ca::verify_node`] says why a node's certificate chain is refused (another
//!   CA, expired or not yet valid and when, the address not in its SAN and what it names, not a
//!   server certificate), through a rustls `WebPkiServerVerifier` whose only root is this CA
//!   (never the system roots). [`NodeVerifier`] is the same check inside a TLS handshake, and
//!   [`refusal`] finds its reason in a failed connection's error.
//! - Connecting: [`Pki::client_config`] is the rustls client configuration for nodes (our CA
//!   only, escale's client certificate); [`Pki::connect`] opens a [`Node`] with it.
//!   [`Pki::write_client_files`] writes the PEMs for path-based clients (`Node::connect_tls`,
//!   the `docker` CLI) into a private directory.
//! - [`expiry`]: days left and whether the 30-day warning is due.
//!
//! Private keys are never logged: the types holding them print without them.

use std::fmt;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, SignatureScheme};
use time::OffsetDateTime;

use crate::node::{Node, NodeError};
use crate::registry::{NodeCertRecord, Registry, RegistryError, StoredClientCert, StoredClusterCa};

/// Lifetime of the CA certificate.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// Lifetime of a node server certificate.
pub const NODE_CERT_VALIDITY_DAYS: i64 = 365;
/// Lifetime of escale's client certificate.
pub const CLIENT_CERT_VALIDITY_DAYS: i64 = 365;
/// A certificate with fewer days left than this is renewed (client) or warned about (nodes).
pub const RENEW_BEFORE_DAYS: i64 = 30;
/// The port of a node's Docker engine over TLS when an address names none.
pub const DEFAULT_NODE_PORT: u16 = 2376;
/// The directory under the data dir for [`Pki::write_client_files`].
pub const CLIENT_FILES_DIR: &str = "cluster-client";

/// Where a bundle's files live on the node.
pub const NODE_CONFIG_DIR: &str = "/etc/docker/escale";

const DAY_MS: i64 = 86_400_000;

/// What can go wrong with the cluster CA, a node's certificate or a connection to a node.
/// `ForeignCa`, `Expired`, `NotYetValid`, `AddressNotInSan`, `WrongUsage` and `NoCertificate`
/// are refusals of what a node presented ([`PkiError::is_refusal`]).
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("node name `{0}` is invalid: use 1 to 63 lowercase letters, digits and `-`, starting with a letter or digit and not ending with `-`")]
    InvalidNodeName(String),
    #[error("node address `{address}` is invalid: {reason}; expected HOST:PORT such as 10.0.0.2:2376, [fd00::2]:2376 or n2.example.eu:2376")]
    InvalidAddress { address: String, reason: String },
    #[error("making {what}: {reason}")]
    Generate { what: &'static str, reason: String },
    #[error("the stored cluster {what} cannot be used: {reason}")]
    Stored { what: &'static str, reason: String },
    #[error("the node's certificate is not signed by this installation's cluster CA (`{ours}`): it was issued by `{issuer}`")]
    ForeignCa { issuer: String, ours: String },
    #[error("the node's certificate expired at {not_after} (it is now {now})")]
    Expired { not_after: String, now: String },
    #[error("the node's certificate is not valid before {not_before} (it is now {now})")]
    NotYetValid { not_before: String, now: String },
    #[error("the node's certificate is not valid for {expected}: it names {presented}")]
    AddressNotInSan { expected: String, presented: String },
    #[error("the node's certificate is not a server certificate: its extended key usage is {presented}, escale needs serverAuth")]
    WrongUsage { presented: String },
    #[error("the node presented no certificate")]
    NoCertificate,
    #[error("the node's certificate was refused: {0}")]
    Refused(String),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("building the node certificate verifier: {0}")]
    Verifier(String),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Node(#[from] NodeError),
}

impl PkiError {
    /// True when the error says why a node's certificate was refused.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            PkiError::ForeignCa { .. }
                | PkiError::Expired { .. }
                | PkiError::NotYetValid { .. }
                | PkiError::AddressNotInSan { .. }
                | PkiError::WrongUsage { .. }
                | PkiError::NoCertificate
                | PkiError::Refused(_)
        )
    }
}

type Result<T, E = PkiError> = std::result::Result<T, E>;

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |e| PkiError::Generate {
        what,
        reason: e.to_string(),
    }
}

/// A node's host: an IP address or a DNS name (lowercase ASCII).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NodeHost {
    Ip(IpAddr),
    Dns(String),
}

impl fmt::Display for NodeHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NodeHost::Ip(ip) => write!(f, "{ip}"),
            NodeHost::Dns(name) => f.write_str(name),
        }
    }
}

/// Where a node's Docker engine listens for TLS: `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeAddress {
    pub host: NodeHost,
    pub port: u16,
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            NodeHost::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            host => write!(f, "{host}:{}", self.port),
        }
    }
}

impl std::str::FromStr for NodeAddress {
    type Err = PkiError;
    fn from_str(s: &str) -> Result<NodeAddress> {
        NodeAddress::parse(s)
    }
}

impl NodeAddress {
    /// Parses `HOST:PORT`, `[IPv6]:PORT`, or a host alone (port [`DEFAULT_NODE_PORT`]). A DNS
    /// name is checked and lowercased; `tcp://` in front is accepted.
    pub fn parse(input: &str) -> Result<NodeAddress> {
        let bad = |reason: &str| PkiError::InvalidAddress {
            address: crate::validate::printable(input),
            reason: reason.to_string(),
        };
        let s = input.strip_prefix("tcp://").unwrap_or(input);
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (ip, after) = rest.split_once(']').ok_or_else(|| bad("`[` without `]`"))?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| bad("junk after `]`"))?),
            };
            let ip: std::net::Ipv6Addr = ip.parse().map_err(|_| bad("not an IPv6 address"))?;
            (NodeHost::Ip(IpAddr::V6(ip)), port)
        } else {
            let (host, port) = match s.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                Some(_) => return Err(bad("write an IPv6 address in brackets")),
                None => (s, None),
            };
            let host = match host.parse::<IpAddr>() {
                Ok(ip) => NodeHost::Ip(ip),
                Err(_) => {
                    NodeHost::Dns(crate::validate::domain(host).map_err(|e| bad(&e.to_string()))?)
                }
            };
            (host, port)
        };
        let port = match port {
            None => DEFAULT_NODE_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        Ok(NodeAddress { host, port })
    }

    /// The name a TLS client checks the node's certificate against.
    pub fn server_name(&self) -> Result<ServerName<'static>> {
        match &self.host {
            NodeHost::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
            NodeHost::Dns(name) => {
                ServerName::try_from(name.clone()).map_err(|e| PkiError::InvalidAddress {
                    address: self.to_string(),
                    reason: e.to_string(),
                })
            }
        }
    }

    /// The Docker host URL, `tcp://HOST:PORT`.
    pub fn docker_host(&self) -> String {
        format!("tcp://{self}")
    }

    fn san(&self) -> Result<SanType> {
        Ok(match &self.host {
            NodeHost::Ip(ip) => SanType::IpAddress(*ip),
            NodeHost::Dns(name) => SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(gen_err("the node certificate's DNS name"))?,
            ),
        })
    }
}

/// Checks a node name: a DNS label, 1 to 63 lowercase letters, digits and `-`.
pub fn validate_node_name(name: &str) -> Result<()> {
    if crate::validate::node_name(name) {
        Ok(())
    } else {
        Err(PkiError::InvalidNodeName(crate::validate::printable(name)))
    }
}

/// A certificate the CA issued, with its private key.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub cert_der: CertificateDer<'static>,
    key_pem: String,
    key_der: Vec<u8>,
    /// Serial number, hex.
    pub serial: String,
    /// Unix milliseconds.
    pub not_before: i64,
    /// Unix milliseconds.
    pub not_after: i64,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl IssuedCert {
    /// The private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The private key for rustls.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    fn from_pems(cert_pem: &str, key_pem: &str, what: &'static str) -> Result<IssuedCert> {
        let stored = |reason: String| PkiError::Stored { what, reason };
        let cert_der = first_cert(cert_pem).map_err(stored)?;
        let (not_before, not_after, serial) = validity(&cert_der).map_err(stored)?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| stored(e.to_string()))?;
        Ok(IssuedCert {
            cert_pem: cert_pem.to_string(),
            cert_der,
            key_pem: key_pem.to_string(),
            key_der: key.serialize_der(),
            serial,
            not_before,
            not_after,
        })
    }
}

fn first_cert(pem: &str) -> Result<CertificateDer<'static>, String> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| "no CERTIFICATE block".to_string())?
        .map_err(|e| e.to_string())
}

/// (not_before ms, not_after ms, serial hex) of a DER certificate.
fn validity(der: &[u8]) -> Result<(i64, i64, String), String> {
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| e.to_string())?;
    let v = x.validity();
    Ok((
        v.not_before.timestamp() * 1000,
        v.not_after.timestamp() * 1000,
        hex::encode(x.raw_serial()),
    ))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and 16 bytes long
    SerialNumber::from_slice(&bytes)
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn dn(common_name: &str, organization: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, organization);
    dn.push(DnType::CommonName, common_name);
    dn
}

/// The CA certificate's subject common name for an installation.
pub fn ca_common_name(installation_id: &str) -> String {
    format!("escale cluster CA {installation_id}")
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name = dn(common_name, "escale");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

/// A validity window: from an hour ago (clock skew between hosts) to `days` from now.
fn window(now: OffsetDateTime, days: i64) -> (OffsetDateTime, OffsetDateTime) {
    (
        now - time::Duration::hours(1),
        now + time::Duration::days(days),
    )
}

/// The cluster certificate authority: its certificate and key.
pub struct Ca {
    common_name: String,
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    key: KeyPair,
    not_after: i64,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("common_name", &self.common_name)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA for `installation_id`, valid [`CA_VALIDITY_DAYS`] from `now`.
    pub fn generate(installation_id: &str, now: OffsetDateTime) -> Result<Ca> {
        let common_name = ca_common_name(installation_id);
        let key =
            KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err("the CA key"))?;
        let mut params = ca_params(&common_name);
        (params.not_before, params.not_after) = window(now, CA_VALIDITY_DAYS);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("the CA certificate"))?;
        Ok(Ca {
            common_name,
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key,
            not_after: ms(params.not_after),
        })
    }

    /// The CA from its stored certificate and key.
    pub fn from_stored(stored: &StoredClusterCa) -> Result<Ca> {
        let bad = |reason: String| PkiError::Stored { what: "CA", reason };
        let cert_der = first_cert(&stored.cert_pem).map_err(bad)?;
        let key = KeyPair::from_pem(&stored.key_pem).map_err(|e| bad(e.to_string()))?;
        let (_, not_after, _) = validity(&cert_der).map_err(bad)?;
        let matches = x509_parser::parse_x509_certificate(&cert_der)
            .map(|(_, c)| {
                c.public_key().subject_public_key.data.as_ref()
                    == rcgen::PublicKeyData::der_bytes(&key)
            })
            .unwrap_or(false);
        if !matches {
            return Err(bad(
                "the CA certificate does not belong to the stored CA key".into(),
            ));
        }
        Ok(Ca {
            common_name: stored.common_name.clone(),
            cert_pem: stored.cert_pem.clone(),
            cert_der,
            key,
            not_after,
        })
    }

    /// What the registry keeps of this CA (the key opened; the registry seals it).
    pub fn to_stored(&self, created_at: i64) -> StoredClusterCa {
        StoredClusterCa {
            common_name: self.common_name.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key.serialize_pem(),
            not_after: self.not_after,
            created_at,
        }
    }

    /// The CA certificate's subject common name.
    pub fn common_name(&self) -> &str {
        &self.common_name
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Expiry of the CA certificate, unix milliseconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        days: i64,
        now: OffsetDateTime,
        what: &'static str,
    ) -> Result<IssuedCert> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen_err(what))?;
        (params.not_before, params.not_after) = window(now, days);
        self.sign(params, key, what)
    }

    /// Signs `params` (validity included) for `key`.
    fn sign(
        &self,
        mut params: CertificateParams,
        key: KeyPair,
        what: &'static str,
    ) -> Result<IssuedCert> {
        let serial = random_serial();
        params.serial_number = Some(serial.clone());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let issuer = Issuer::new(ca_params(&self.common_name), &self.key);
        let cert = params.signed_by(&key, &issuer).map_err(gen_err(what))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
            serial: hex::encode(serial.to_bytes()),
            not_before: ms(params.not_before),
            not_after: ms(params.not_after),
        })
    }

    /// A server certificate for node `name` at `address`: SAN = the address's host (IP SAN or
    /// DNS SAN), EKU serverAuth only, valid `days` from `now`.
    pub fn issue_server(
        &self,
        name: &str,
        address: &NodeAddress,
        days: i64,
        now: OffsetDateTime,
    ) -> Result<IssuedCert> {
        validate_node_name(name)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(name, "escale node");
        params.subject_alt_names = vec![address.san()?];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, days, now, "a node server certificate")
    }

    /// escale's client certificate for `installation_id`: EKU clientAuth only, valid `days`
    /// from `now`.
    pub fn issue_client(
        &self,
        installation_id: &str,
        days: i64,
        now: OffsetDateTime,
    ) -> Result<IssuedCert> {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(&format!("escale {installation_id}"), "escale");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, days, now, "escale's client certificate")
    }

    /// Issues a certificate from explicit parameters (validity included), for tests that
    /// need what escale never issues (a past validity, a client certificate at a server).
    #[doc(hidden)]
    pub fn issue_with(&self, params: CertificateParams) -> Result<IssuedCert> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(gen_err("a certificate"))?;
        self.sign(params, key, "a certificate")
    }

    /// Whether `cert_der` is a client certificate of this CA valid at `now` (what a node
    /// with this CA's bundle accepts).
    pub fn accepts_client(&self, cert_der: &CertificateDer<'_>, now: UnixTime) -> bool {
        let mut roots = rustls::RootCertStore::empty();
        if roots.add(self.cert_der.clone()).is_err() {
            return false;
        }
        match rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        {
            Ok(v) => v.verify_client_cert(cert_der, &[], now).is_ok(),
            Err(_) => false,
        }
    }

    /// The webpki verifier whose only root is this CA.
    fn webpki_verifier(&self) -> Result<Arc<WebPkiServerVerifier>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der.clone()).map_err(PkiError::Tls)?;
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| PkiError::Verifier(e.to_string()))
    }

    /// The verifier for TLS handshakes with nodes: this CA only, refusals with reasons.
    pub fn verifier(&self) -> Result<NodeVerifier> {
        Ok(NodeVerifier {
            inner: self.webpki_verifier()?,
            ca_name: self.common_name.clone(),
        })
    }

    /// Checks the chain a node presented (leaf first) for `address` at `now`: `Ok` when it
    /// would be accepted, else why not.
    pub fn verify_node(
        &self,
        chain: &[CertificateDer<'_>],
        address: &NodeAddress,
        now: UnixTime,
    ) -> Result<()> {
        let verifier = self.verifier()?;
        let name = address.server_name()?;
        let (leaf, rest) = chain.split_first().ok_or(PkiError::NoCertificate)?;
        verifier.check(leaf, rest, &name, now)
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A server certificate verifier for nodes: a `WebPkiServerVerifier` whose only root is the
/// cluster CA, whose refusals carry a [`PkiError`] (find it with [`refusal`]).
#[derive(Debug, Clone)]
pub struct NodeVerifier {
    inner: Arc<WebPkiServerVerifier>,
    ca_name: String,
}

impl NodeVerifier {
    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<()> {
        self.inner
            .verify_server_cert(leaf, intermediates, name, &[], now)
            .map(|_| ())
            .map_err(|e| explain(&e, leaf, &self.ca_name, name, now))
    }
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.check(end_entity, intermediates, server_name, now) {
            Ok(()) => Ok(ServerCertVerified::assertion()),
            Err(e) => {
                tracing::warn!(node = %server_name.to_str(), "node certificate refused: {e}");
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(e)),
                )))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The refusal reason inside a failed connection's error (an `io::Error`, a bollard or hyper
/// error, a rustls error), if escale's verifier refused the node's certificate.
pub fn refusal<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a PkiError> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(p) = e.downcast_ref::<PkiError>() {
            return Some(p);
        }
        if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(o))) =
            e.downcast_ref::<rustls::Error>()
        {
            return o.0.downcast_ref::<PkiError>();
        }
        // bollard's I/O error is transparent: its source skips the io::Error itself.
        if let Some(bollard::errors::Error::IOError { err }) =
            e.downcast_ref::<bollard::errors::Error>()
        {
            if let Some(found) = refusal(err) {
                return Some(found);
            }
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                let inner: &(dyn std::error::Error + 'static) = inner;
                if let Some(found) = refusal(inner) {
                    return Some(found);
                }
            }
        }
        cur = e.source();
    }
    None
}

fn rfc3339(t: UnixTime) -> String {
    humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()),
    )
    .to_string()
}

fn rfc3339_ms(ms: i64) -> String {
    rfc3339(UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        (ms / 1000).max(0) as u64,
    )))
}

/// Maps a webpki refusal of `leaf` to the reason escale gives.
fn explain(
    e: &rustls::Error,
    leaf: &CertificateDer<'_>,
    ca_name: &str,
    name: &ServerName<'_>,
    now: UnixTime,
) -> PkiError {
    let parsed = x509_parser::parse_x509_certificate(leaf)
        .ok()
        .map(|(_, c)| c);
    let ce = match e {
        rustls::Error::InvalidCertificate(ce) => ce,
        other => return PkiError::Refused(other.to_string()),
    };
    match ce {
        CertificateError::UnknownIssuer | CertificateError::BadSignature => PkiError::ForeignCa {
            issuer: parsed
                .as_ref()
                .map(|c| c.issuer().to_string())
                .unwrap_or_else(|| "an unreadable issuer".into()),
            ours: ca_name.to_string(),
        },
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            let not_after = match ce {
                CertificateError::ExpiredContext { not_after, .. } => rfc3339(*not_after),
                _ => parsed
                    .as_ref()
                    .map(|c| rfc3339_ms(c.validity().not_after.timestamp() * 1000))
                    .unwrap_or_else(|| "an unknown time".into()),
            };
            PkiError::Expired {
                not_after,
                now: rfc3339(now),
            }
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            let not_before = match ce {
                CertificateError::NotValidYetContext { not_before, .. } => rfc3339(*not_before),
                _ => parsed
                    .as_ref()
                    .map(|c| rfc3339_ms(c.validity().not_before.timestamp() * 1000))
                    .unwrap_or_else(|| "an unknown time".into()),
            };
            PkiError::NotYetValid {
                not_before,
                now: rfc3339(now),
            }
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            let names = parsed.as_ref().map(subject_alt_names).unwrap_or_default();
            PkiError::AddressNotInSan {
                expected: name.to_str().into_owned(),
                presented: if names.is_empty() {
                    "no subject alternative name".into()
                } else {
                    names.join(", ")
                },
            }
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            PkiError::WrongUsage {
                presented: parsed
                    .as_ref()
                    .map(extended_key_usages)
                    .unwrap_or_else(|| "unreadable".into()),
            }
        }
        other => PkiError::Refused(rustls::Error::InvalidCertificate(other.clone()).to_string()),
    }
}

/// The SANs of a certificate, as `DNS:name` / `IP:addr`.
fn subject_alt_names(c: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let mut out = Vec::new();
    if let Ok(Some(san)) = c.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => out.push(format!("DNS:{d}")),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    out.push(match ip {
                        Some(ip) => format!("IP:{ip}"),
                        None => format!("IP:{}", hex::encode(b)),
                    });
                }
                other => out.push(other.to_string()),
            }
        }
    }
    out
}

/// The extended key usages of a certificate, e.g. `clientAuth`, or `none`.
fn extended_key_usages(c: &x509_parser::certificate::X509Certificate<'_>) -> String {
    let mut out = Vec::new();
    if let Ok(Some(eku)) = c.extended_key_usage() {
        let e = eku.value;
        for (on, label) in [
            (e.any, "any"),
            (e.server_auth, "serverAuth"),
            (e.client_auth, "clientAuth"),
            (e.code_signing, "codeSigning"),
            (e.email_protection, "emailProtection"),
            (e.time_stamping, "timeStamping"),
            (e.ocsp_signing, "OCSPSigning"),
        ] {
            if on {
                out.push(label.to_string());
            }
        }
        out.extend(e.other.iter().map(|o| o.to_id_string()));
    }
    if out.is_empty() {
        "none".into()
    } else {
        out.join(", ")
    }
}

/// How long a certificate has left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    /// Whole days left (negative once expired).
    pub days_left: i64,
    /// Fewer than [`RENEW_BEFORE_DAYS`] days are left (or it expired).
    pub warn: bool,
    /// It has expired.
    pub expired: bool,
}

/// The expiry of a certificate valid until `not_after_ms`, at `now_ms` (unix milliseconds).
pub fn expiry(not_after_ms: i64, now_ms: i64) -> Expiry {
    let left = not_after_ms - now_ms;
    Expiry {
        days_left: left.div_euclid(DAY_MS),
        warn: left < RENEW_BEFORE_DAYS * DAY_MS,
        expired: left <= 0,
    }
}

/// A client configuration for nodes: only `ca` is trusted (through [`NodeVerifier`]), and
/// `client` is presented. The ring provider, TLS 1.2 and 1.3.
pub fn node_client_config(ca: &Ca, client: &IssuedCert) -> Result<ClientConfig> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ca.verifier()?))
        .with_client_auth_cert(vec![client.cert_der.clone()], client.private_key())?)
}

/// Paths of the PEM files a path-based client uses (see [`Pki::write_client_files`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The cluster CA and escale's client certificate, as kept in the registry.
pub struct Pki {
    registry: Registry,
    ca: Ca,
    client: IssuedCert,
    /// Lifetime of node server certificates issued from now on.
    pub node_validity_days: i64,
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("ca", &self.ca)
            .field("client", &self.client)
            .field("node_validity_days", &self.node_validity_days)
            .finish()
    }
}

/// escale's stored client certificate if the CA accepts it and it has
/// [`RENEW_BEFORE_DAYS`] days or more left, else a new one, stored.
async fn current_client(registry: &Registry, ca: &Ca, now: OffsetDateTime) -> Result<IssuedCert> {
    if let Some(c) = registry.cluster_client_cert().await? {
        let issued = IssuedCert::from_pems(&c.cert_pem, &c.key_pem, "client certificate")?;
        if ca.accepts_client(&issued.cert_der, UnixTime::now())
            && !expiry(issued.not_after, ms(now)).warn
        {
            return Ok(issued);
        }
    }
    let c = ca.issue_client(registry.installation_id(), CLIENT_CERT_VALIDITY_DAYS, now)?;
    registry
        .store_cluster_client_cert(&StoredClientCert {
            cert_pem: c.cert_pem.clone(),
            key_pem: c.key_pem.clone(),
            serial: c.serial.clone(),
            not_after: c.not_after,
            issued_at: ms(now),
        })
        .await?;
    tracing::info!(serial = %c.serial, "issued escale's cluster client certificate");
    Ok(c)
}

impl Pki {
    /// The stored CA (made and stored on first use) and escale's client certificate (issued
    /// when absent, when fewer than [`RENEW_BEFORE_DAYS`] days are left, or when the stored
    /// CA did not issue it).
    pub async fn load_or_create(registry: &Registry) -> Result<Pki> {
        let now = OffsetDateTime::now_utc();
        let stored = match registry.cluster_ca().await? {
            Some(s) => s,
            None => {
                let ca = Ca::generate(registry.installation_id(), now)?;
                let created = ca.to_stored(ms(now));
                registry.store_cluster_ca_if_absent(&created).await?
            }
        };
        let ca = Ca::from_stored(&stored)?;
        let client = current_client(registry, &ca, now).await?;
        Ok(Pki {
            registry: registry.clone(),
            ca,
            client,
            node_validity_days: NODE_CERT_VALIDITY_DAYS,
        })
    }

    /// The CA.
    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    /// escale's client certificate.
    pub fn client_cert(&self) -> &IssuedCert {
        &self.client
    }

    /// Reissues escale's client certificate when fewer than [`RENEW_BEFORE_DAYS`] days are
    /// left (for a daily check in the daemon); returns whether it did. Connections opened
    /// before keep the old one until they are made again.
    pub async fn renew_client_if_due(&mut self) -> Result<bool> {
        let now = OffsetDateTime::now_utc();
        if !expiry(self.client.not_after, ms(now)).warn {
            return Ok(false);
        }
        self.client = current_client(&self.registry, &self.ca, now).await?;
        Ok(true)
    }

    /// Every recorded node server certificate with its [`Expiry`] at `now_ms`.
    pub async fn node_cert_expiries(&self, now_ms: i64) -> Result<Vec<(NodeCertRecord, Expiry)>> {
        Ok(self
            .registry
            .node_certs()
            .await?
            .into_iter()
            .map(|r| {
                let e = expiry(r.not_after, now_ms);
                (r, e)
            })
            .collect())
    }

    /// Issues a server certificate for node `name` at `address` (`HOST:PORT`), records it
    /// (by `actor`), and returns the node's bundle.
    pub async fn issue_node(&self, actor: &str, name: &str, address: &str) -> Result<NodeBundle> {
        let (bundle, record) = self.issue_bundle(name, address)?;
        self.registry.record_node_cert(actor, &record).await?;
        Ok(bundle)
    }

    /// Issues a server certificate for node `name` at `address` (`HOST:PORT`) and returns
    /// the node's bundle with what the registry keeps of it; records nothing (the caller
    /// writes the record with the node, in one transaction).
    pub fn issue_bundle(&self, name: &str, address: &str) -> Result<(NodeBundle, NodeCertRecord)> {
        let address = NodeAddress::parse(address)?;
        let now = OffsetDateTime::now_utc();
        let cert = self
            .ca
            .issue_server(name, &address, self.node_validity_days, now)?;
        let record = NodeCertRecord {
            node: name.to_string(),
            address: address.to_string(),
            serial: cert.serial.clone(),
            cert_pem: cert.cert_pem.clone(),
            not_after: cert.not_after,
            issued_at: ms(now),
        };
        Ok((
            NodeBundle {
                node: name.to_string(),
                address,
                ca_pem: self.ca.cert_pem.clone(),
                cert,
            },
            record,
        ))
    }

    /// The rustls client configuration for nodes: only the cluster CA is trusted, escale's
    /// client certificate is presented.
    pub fn client_config(&self) -> Result<ClientConfig> {
        node_client_config(&self.ca, &self.client)
    }

    /// Connects to node `name` at `address` over mutual TLS with [`Pki::client_config`]. A
    /// refused node certificate is a [`PkiError`] refusal naming the reason.
    pub async fn connect(&self, name: &str, address: &NodeAddress) -> Result<Node> {
        connect_with(name, address, self.client_config()?).await
    }

    /// Connects to node `name` at `address` with bollard's path-based TLS client
    /// (`Node::connect_tls`) after writing the PEMs into `dir` ([`Pki::write_client_files`]).
    /// Prefer [`Pki::connect`]: this one also trusts the system roots and gives no reason
    /// when the node's certificate is refused.
    pub async fn connect_with_files(
        &self,
        name: &str,
        address: &NodeAddress,
        dir: &Path,
    ) -> Result<Node> {
        let files = self.write_client_files(dir)?;
        Ok(Node::connect_tls(
            name,
            &address.docker_host(),
            &files.ca,
            &files.cert,
            &files.key,
        )
        .await?)
    }

    /// Writes `ca.pem`, `cert.pem` and `key.pem` (escale's client certificate) into `dir`
    /// (`data_dir/`[`CLIENT_FILES_DIR`] in the daemon),
    /// created 0700, files 0600, replacing what is there; for path-based clients
    /// (`Node::connect_tls`, `docker --tlsverify`). Note that `Node::connect_tls` (bollard's
    /// `connect_with_ssl`) also trusts the system roots; [`Pki::connect`] trusts only the CA.
    pub fn write_client_files(&self, dir: &Path) -> Result<ClientFiles> {
        private_dir(dir)?;
        let files = ClientFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        for (path, contents) in [
            (&files.ca, self.ca.cert_pem.as_str()),
            (&files.cert, self.client.cert_pem.as_str()),
            (&files.key, self.client.key_pem.as_str()),
        ] {
            replace_file(path, contents.as_bytes(), 0o600)?;
        }
        Ok(files)
    }
}

/// Connects to node `name` at `address` with `config` (see [`Pki::connect`]); a refused
/// certificate comes back as its reason.
pub async fn connect_with(name: &str, address: &NodeAddress, config: ClientConfig) -> Result<Node> {
    let server_name = address.server_name()?;
    let host = match &address.host {
        NodeHost::Ip(ip) => ip.to_string(),
        NodeHost::Dns(d) => d.clone(),
    };
    match Node::connect_mtls(name, &host, address.port, server_name, Arc::new(config)).await {
        Ok(node) => Ok(node),
        Err(e) => match refusal(&e) {
            Some(r) => Err(copy_refusal(r)),
            None => Err(e.into()),
        },
    }
}

fn copy_refusal(r: &PkiError) -> PkiError {
    match r {
        PkiError::ForeignCa { issuer, ours } => PkiError::ForeignCa {
            issuer: issuer.clone(),
            ours: ours.clone(),
        },
        PkiError::Expired { not_after, now } => PkiError::Expired {
            not_after: not_after.clone(),
            now: now.clone(),
        },
        PkiError::NotYetValid { not_before, now } => PkiError::NotYetValid {
            not_before: not_before.clone(),
            now: now.clone(),
        },
        PkiError::AddressNotInSan {
            expected,
            presented,
        } => PkiError::AddressNotInSan {
            expected: expected.clone(),
            presented: presented.clone(),
        },
        PkiError::WrongUsage { presented } => PkiError::WrongUsage {
            presented: presented.clone(),
        },
        PkiError::NoCertificate => PkiError::NoCertificate,
        other => PkiError::Refused(other.to_string()),
    }
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Write {
        path: path.display().to_string(),
        source,
    }
}

/// Creates `dir` (and parents) and makes it 0700.
fn private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    set_mode(dir, 0o700)
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(write_err(path))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

/// Writes `contents` to `path` with `mode`: a new file created with that mode, renamed over
/// any old one (a key never exists with wider permissions, even for a moment).
fn replace_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp-escale");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(mode);
    }
    let mut f = opts.open(&tmp).map_err(write_err(&tmp))?;
    f.write_all(contents).map_err(write_err(&tmp))?;
    f.sync_all().map_err(write_err(&tmp))?;
    drop(f);
    set_mode(&tmp, mode)?;
    std::fs::rename(&tmp, path).map_err(write_err(path))
}

/// One file of a node bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct BundleFile {
    /// The file name in the bundle.
    pub name: &'static str,
    pub contents: String,
    /// Unix permissions (0600 for the key).
    pub mode: u32,
}

impl fmt::Debug for BundleFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BundleFile")
            .field("name", &self.name)
            .field("mode", &format_args!("{:o}", self.mode))
            .finish_non_exhaustive()
    }
}

/// What a node needs to serve its Docker engine over mutual TLS to escale.
#[derive(Clone)]
pub struct NodeBundle {
    pub node: String,
    pub address: NodeAddress,
    /// The cluster CA certificate, PEM.
    pub ca_pem: String,
    /// The node's server certificate and key.
    pub cert: IssuedCert,
}

impl fmt::Debug for NodeBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeBundle")
            .field("node", &self.node)
            .field("address", &self.address.to_string())
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl NodeBundle {
    /// `daemon.json` for the node: TLS with client verification, the engine on
    /// `tcp://0.0.0.0:PORT` (all addresses; `tcp://[::]:PORT` for an IPv6 node) and the local
    /// unix socket, files under [`NODE_CONFIG_DIR`].
    pub fn daemon_json(&self) -> serde_json::Value {
        let listen = match self.address.host {
            NodeHost::Ip(IpAddr::V6(_)) => format!("tcp://[::]:{}", self.address.port),
            _ => format!("tcp://0.0.0.0:{}", self.address.port),
        };
        serde_json::json!({
            "tls": true,
            "tlsverify": true,
            "tlscacert": format!("{NODE_CONFIG_DIR}/ca.pem"),
            "tlscert": format!("{NODE_CONFIG_DIR}/server-cert.pem"),
            "tlskey": format!("{NODE_CONFIG_DIR}/server-key.pem"),
            "hosts": ["unix:///var/run/docker.sock", listen],
        })
    }

    /// The systemd drop-in that starts dockerd with the bundle's `daemon.json` (the stock unit
    /// passes `-H fd://`, which conflicts with `hosts` in a config file).
    pub fn systemd_dropin(&self) -> String {
        format!(
            "# /etc/systemd/system/docker.service.d/escale.conf, written by escale for node `{node}`.\n\
             # Starts dockerd with escale's TLS settings; the empty ExecStart= clears the stock one.\n\
             [Service]\n\
             ExecStart=\n\
             ExecStart=/usr/bin/env dockerd --config-file {NODE_CONFIG_DIR}/daemon.json\n",
            node = self.node
        )
    }

    fn install_sh(&self) -> String {
        format!(
            r#"#!/bin/sh
# Installs escale's TLS bundle for node `{node}` ({address}). Run as root on the node, from
# this directory: sudo sh install.sh
# It copies the certificates to {dir}, writes {dir}/daemon.json (merged with
# /etc/docker/daemon.json when that exists, which needs jq), installs the systemd drop-in and
# restarts Docker.
set -eu
cd "$(dirname "$0")"
install -d -m 0700 {dir}
install -m 0644 ca.pem server-cert.pem {dir}/
install -m 0600 server-key.pem {dir}/
if [ -s /etc/docker/daemon.json ]; then
    if ! command -v jq >/dev/null 2>&1; then
        echo "install.sh: /etc/docker/daemon.json exists; install jq to merge it, or merge daemon.json into it by hand" >&2
        exit 1
    fi
    jq -s '.[0] * .[1]' /etc/docker/daemon.json daemon.json > {dir}/daemon.json.new
    mv {dir}/daemon.json.new {dir}/daemon.json
else
    install -m 0644 daemon.json {dir}/daemon.json
fi
chmod 0644 {dir}/daemon.json
install -d -m 0755 /etc/systemd/system/docker.service.d
install -m 0644 escale.conf /etc/systemd/system/docker.service.d/escale.conf
systemctl daemon-reload
systemctl restart docker
echo "node {node}: Docker now listens on port {port} with TLS; add the node to escale"
"#,
            node = self.node,
            address = self.address,
            dir = NODE_CONFIG_DIR,
            port = self.address.port,
        )
    }

    fn readme(&self) -> String {
        let e = expiry(self.cert.not_after, crate::registry::now_ms());
        format!(
            "escale node bundle for `{node}` at {address}\n\
             \n\
             Install on the node, as root, from this directory:\n\
             \n    sudo sh install.sh\n\n\
             Files:\n\
             - ca.pem            the cluster CA of this escale installation (trusted for clients)\n\
             - server-cert.pem   the node's server certificate (SAN {host}, serverAuth, serial {serial},\n\
             \x20                   valid {days} more days)\n\
             - server-key.pem    its private key (0600; keep it on the node only)\n\
             - daemon.json       dockerd settings: tlsverify on port {port} and the local socket\n\
             - escale.conf       systemd drop-in for docker.service starting dockerd with\n\
             \x20                   --config-file {dir}/daemon.json\n\
             - install.sh        copies the files to {dir} and restarts Docker\n\
             \n\
             Only clients holding a certificate of this CA (escale) can reach the engine.\n\
             Without systemd, start dockerd with:\n\
             \n    dockerd --config-file {dir}/daemon.json\n",
            node = self.node,
            address = self.address,
            host = self.address.host,
            serial = self.cert.serial,
            days = e.days_left,
            port = self.address.port,
            dir = NODE_CONFIG_DIR,
        )
    }

    /// The bundle's files, with their modes.
    pub fn files(&self) -> Vec<BundleFile> {
        let daemon = serde_json::to_string_pretty(&self.daemon_json()).unwrap_or_default() + "\n";
        vec![
            BundleFile {
                name: "ca.pem",
                contents: self.ca_pem.clone(),
                mode: 0o644,
            },
            BundleFile {
                name: "server-cert.pem",
                contents: self.cert.cert_pem.clone(),
                mode: 0o644,
            },
            BundleFile {
                name: "server-key.pem",
                contents: self.cert.key_pem.clone(),
                mode: 0o600,
            },
            BundleFile {
                name: "daemon.json",
                contents: daemon,
                mode: 0o644,
            },
            BundleFile {
                name: "escale.conf",
                contents: self.systemd_dropin(),
                mode: 0o644,
            },
            BundleFile {
                name: "install.sh",
                contents: self.install_sh(),
                mode: 0o755,
            },
            BundleFile {
                name: "README",
                contents: self.readme(),
                mode: 0o644,
            },
        ]
    }

    /// Writes the bundle into `dir` (created 0700; the key 0600), replacing its files.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        private_dir(dir)?;
        for f in self.files() {
            replace_file(&dir.join(f.name), f.contents.as_bytes(), f.mode)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::X509Certificate;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    fn parse(der: &[u8]) -> X509Certificate<'_> {
        x509_parser::parse_x509_certificate(der).unwrap().1
    }

    fn addr(s: &str) -> NodeAddress {
        NodeAddress::parse(s).unwrap()
    }

    #[test]
    fn ca_is_a_p256_ca_with_pathlen_0_naming_the_installation_for_10_years() {
        let ca = Ca::generate("inst42", now()).unwrap();
        let c = parse(ca.cert_der());
        let bc = c.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = c.key_usage().unwrap().unwrap();
        assert!(ku.critical);
        assert!(ku.value.key_cert_sign() && ku.value.crl_sign());
        assert!(!ku.value.digital_signature());
        assert!(
            c.subject().to_string().contains("inst42"),
            "{}",
            c.subject()
        );
        assert_eq!(c.subject(), c.issuer());
        let days =
            (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86400;
        assert!((3650..=3651).contains(&days), "{days}");
        // id-ecPublicKey with the prime256v1 curve
        let spki = &c.public_key().algorithm;
        assert_eq!(spki.algorithm.to_id_string(), "1.2.840.10045.2.1");
        assert_eq!(
            spki.parameters
                .as_ref()
                .unwrap()
                .as_oid()
                .unwrap()
                .to_id_string(),
            "1.2.840.10045.3.1.7"
        );
        assert!(c.extended_key_usage().unwrap().is_none());
    }

    #[test]
    fn node_certificates_name_their_host_and_serve_only() {
        let ca = Ca::generate("i", now()).unwrap();
        let ip = ca
            .issue_server("n2", &addr("127.0.0.2:2376"), 365, now())
            .unwrap();
        let c = parse(&ip.cert_der);
        assert_eq!(subject_alt_names(&c), vec!["IP:127.0.0.2"]);
        assert_eq!(extended_key_usages(&c), "serverAuth");
        assert!(!c.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(c.issuer(), parse(ca.cert_der()).subject());
        let days = (ip.not_after - ip.not_before) / DAY_MS;
        assert_eq!(days, 365, "one year (and the hour of skew)");
        assert!(c.subject().to_string().contains("n2"));

        let dns = ca
            .issue_server("n3", &addr("N3.Example.eu:2376"), 30, now())
            .unwrap();
        assert_eq!(
            subject_alt_names(&parse(&dns.cert_der)),
            vec!["DNS:n3.example.eu"]
        );
        let v6 = ca
            .issue_server("n4", &addr("[fd00::4]:2376"), 30, now())
            .unwrap();
        assert_eq!(subject_alt_names(&parse(&v6.cert_der)), vec!["IP:fd00::4"]);

        let t = UnixTime::now();
        ca.verify_node(
            std::slice::from_ref(&ip.cert_der),
            &addr("127.0.0.2:2376"),
            t,
        )
        .unwrap();
        ca.verify_node(
            std::slice::from_ref(&dns.cert_der),
            &addr("n3.example.eu"),
            t,
        )
        .unwrap();
        ca.verify_node(std::slice::from_ref(&v6.cert_der), &addr("[fd00::4]:1"), t)
            .unwrap();
        assert!(matches!(
            ca.issue_server("Bad Name", &addr("127.0.0.2"), 1, now()),
            Err(PkiError::InvalidNodeName(_))
        ));
    }

    #[test]
    fn client_certificate_is_client_only_and_refused_as_a_server_certificate() {
        let ca = Ca::generate("i", now()).unwrap();
        let client = ca.issue_client("i", 365, now()).unwrap();
        let c = parse(&client.cert_der);
        assert_eq!(extended_key_usages(&c), "clientAuth");
        assert!(subject_alt_names(&c).is_empty());
        assert!(ca.accepts_client(&client.cert_der, UnixTime::now()));
        let server = ca.issue_server("n2", &addr("127.0.0.2"), 1, now()).unwrap();
        assert!(
            !ca.accepts_client(&server.cert_der, UnixTime::now()),
            "serverAuth only"
        );
        let other = Ca::generate("other", now()).unwrap();
        assert!(!other.accepts_client(&client.cert_der, UnixTime::now()));

        // A client certificate with the node's address presented by a node.
        let mut params = CertificateParams::new(vec!["127.0.0.2".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        (params.not_before, params.not_after) = window(now(), 10);
        let as_server = ca.issue_with(params).unwrap();
        let e = ca
            .verify_node(
                &[as_server.cert_der],
                &addr("127.0.0.2:2376"),
                UnixTime::now(),
            )
            .unwrap_err();
        assert!(matches!(e, PkiError::WrongUsage { .. }), "{e:?}");
        assert!(
            e.to_string().contains("clientAuth") && e.to_string().contains("serverAuth"),
            "{e}"
        );
    }

    #[test]
    fn refusals_say_why() {
        let ca = Ca::generate("ours", now()).unwrap();
        let foreign = Ca::generate("theirs", now()).unwrap();
        let a = addr("127.0.0.2:2376");
        let t = UnixTime::now();

        let theirs = foreign.issue_server("n2", &a, 30, now()).unwrap();
        let e = ca
            .verify_node(std::slice::from_ref(&theirs.cert_der), &a, t)
            .unwrap_err();
        assert!(matches!(e, PkiError::ForeignCa { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("escale cluster CA theirs") && msg.contains("escale cluster CA ours"),
            "{msg}"
        );
        // Even with the foreign CA sent along as an intermediate.
        let e = ca
            .verify_node(&[theirs.cert_der, foreign.cert_der().clone()], &a, t)
            .unwrap_err();
        assert!(
            e.is_refusal() && !matches!(e, PkiError::AddressNotInSan { .. }),
            "{e:?}"
        );

        let mut params = CertificateParams::new(vec!["127.0.0.2".to_string()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 6, 30);
        let expired = ca.issue_with(params.clone()).unwrap();
        let e = ca.verify_node(&[expired.cert_der], &a, t).unwrap_err();
        assert!(matches!(e, PkiError::Expired { .. }), "{e:?}");
        assert!(e.to_string().contains("2021-06-30T00:00:00Z"), "{e}");

        let mut later = params.clone();
        later.not_before = now() + time::Duration::days(3);
        later.not_after = now() + time::Duration::days(30);
        let early = ca.issue_with(later.clone()).unwrap();
        let e = ca.verify_node(&[early.cert_der], &a, t).unwrap_err();
        assert!(matches!(e, PkiError::NotYetValid { .. }), "{e:?}");
        let when = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(later.not_before.unix_timestamp() as u64),
        )
        .to_string();
        assert!(e.to_string().contains(&when), "{e} / {when}");

        let n2 = ca.issue_server("n2", &a, 30, now()).unwrap();
        let e = ca
            .verify_node(
                std::slice::from_ref(&n2.cert_der),
                &addr("127.0.0.3:2376"),
                t,
            )
            .unwrap_err();
        assert!(matches!(e, PkiError::AddressNotInSan { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("127.0.0.3") && msg.contains("IP:127.0.0.2"),
            "{msg}"
        );
        let e = ca
            .verify_node(&[n2.cert_der], &addr("n2.example.eu"), t)
            .unwrap_err();
        assert!(e.to_string().contains("n2.example.eu"), "{e}");

        assert!(matches!(
            ca.verify_node(&[], &a, t),
            Err(PkiError::NoCertificate)
        ));
    }

    #[test]
    fn refusal_is_found_through_io_and_rustls_errors() {
        let inner = PkiError::WrongUsage {
            presented: "clientAuth".into(),
        };
        let tls =
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(inner))));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        let found = refusal(&io).unwrap();
        assert!(matches!(found, PkiError::WrongUsage { .. }));
        let node = NodeError::Connect {
            node: "n2".into(),
            host: "tcp://x".into(),
            source: bollard::errors::Error::IOError { err: io },
        };
        assert!(refusal(&node).is_some());
        assert!(refusal(&std::io::Error::other("plain")).is_none());
    }

    #[test]
    fn addresses_parse_with_a_default_port() {
        assert_eq!(addr("127.0.0.2:2376").to_string(), "127.0.0.2:2376");
        assert_eq!(addr("tcp://10.0.0.5").to_string(), "10.0.0.5:2376");
        assert_eq!(addr("[::1]:99").to_string(), "[::1]:99");
        assert_eq!(addr("[::1]").docker_host(), "tcp://[::1]:2376");
        assert_eq!(
            addr("Node.Example.EU:1234").host,
            NodeHost::Dns("node.example.eu".into())
        );
        for bad in [
            "",
            "::1:2376",
            "a b:1",
            "h:0",
            "h:70000",
            "[::1",
            "[::1]x",
            "-x.eu:1",
            "h;rm -rf:1",
        ] {
            assert!(
                matches!(
                    NodeAddress::parse(bad),
                    Err(PkiError::InvalidAddress { .. })
                ),
                "{bad:?}"
            );
        }
        validate_node_name("n2").unwrap();
        for bad in ["", "N2", "-a", "a-", "a_b", &"a".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expiry_counts_days_and_warns_under_30() {
        let now = 1_000_000_000_000;
        assert_eq!(
            expiry(now + 31 * DAY_MS, now),
            Expiry {
                days_left: 31,
                warn: false,
                expired: false
            }
        );
        assert_eq!(
            expiry(now + 30 * DAY_MS, now),
            Expiry {
                days_left: 30,
                warn: false,
                expired: false
            }
        );
        assert_eq!(
            expiry(now + 30 * DAY_MS - 1, now),
            Expiry {
                days_left: 29,
                warn: true,
                expired: false
            }
        );
        assert_eq!(
            expiry(now + 1, now),
            Expiry {
                days_left: 0,
                warn: true,
                expired: false
            }
        );
        assert_eq!(
            expiry(now - 1, now),
            Expiry {
                days_left: -1,
                warn: true,
                expired: true
            }
        );
    }

    #[test]
    fn bundle_files_point_at_etc_docker_escale_and_keep_the_key_private() {
        let ca = Ca::generate("i", now()).unwrap();
        let a = addr("127.0.0.2:2377");
        let bundle = NodeBundle {
            node: "n2".into(),
            address: a.clone(),
            ca_pem: ca.cert_pem().to_string(),
            cert: ca.issue_server("n2", &a, 365, now()).unwrap(),
        };
        let d = bundle.daemon_json();
        assert_eq!(d["tls"], true);
        assert_eq!(d["tlsverify"], true);
        assert_eq!(d["tlscacert"], "/etc/docker/escale/ca.pem");
        assert_eq!(d["tlscert"], "/etc/docker/escale/server-cert.pem");
        assert_eq!(d["tlskey"], "/etc/docker/escale/server-key.pem");
        assert_eq!(
            d["hosts"],
            serde_json::json!(["unix:///var/run/docker.sock", "tcp://0.0.0.0:2377"])
        );
        let dropin = bundle.systemd_dropin();
        assert!(dropin.contains("[Service]\nExecStart=\nExecStart=/usr/bin/env dockerd --config-file /etc/docker/escale/daemon.json\n"), "{dropin}");
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));

        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bundle-n2");
        bundle.write_to(&out).unwrap();
        bundle.write_to(&out).unwrap(); // replacing works
        use std::os::unix::fs::PermissionsExt;
        let mode = |n: &str| std::fs::metadata(out.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("."), 0o700);
        assert_eq!(mode("server-key.pem"), 0o600);
        assert_eq!(mode("install.sh"), 0o755);
        let mut names: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "README",
                "ca.pem",
                "daemon.json",
                "escale.conf",
                "install.sh",
                "server-cert.pem",
                "server-key.pem"
            ]
        );
        let key = std::fs::read_to_string(out.join("server-key.pem")).unwrap();
        assert_eq!(key, bundle.cert.key_pem());
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("daemon.json")).unwrap())
                .unwrap();
        assert_eq!(json, d);
        let script = std::fs::read_to_string(out.join("install.sh")).unwrap();
        assert!(
            script.starts_with("#!/bin/sh\n")
                && script.contains("install -m 0600 server-key.pem /etc/docker/escale/")
        );
        let readme = std::fs::read_to_string(out.join("README")).unwrap();
        assert!(readme.contains("sudo sh install.sh"), "{readme}");
    }

    async fn registry(dir: &Path) -> Registry {
        Registry::open(&dir.join("escale.db"), crate::secrets::MasterKey::random())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn pki_is_made_once_sealed_and_reused_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = crate::secrets::MasterKey::random();
        let db = dir.path().join("escale.db");
        let reg = Registry::open(&db, key.clone()).await.unwrap();
        let pki = Pki::load_or_create(&reg).await.unwrap();
        assert!(pki.ca().common_name().contains(reg.installation_id()));
        let ca_pem = pki.ca().cert_pem().to_string();
        let client_serial = pki.client_cert().serial.clone();
        let ca_key = reg.cluster_ca().await.unwrap().unwrap().key_pem;
        let client_key = pki.client_cert().key_pem().to_string();

        let bundle = pki
            .issue_node("tester", "n2", "127.0.0.2:2376")
            .await
            .unwrap();
        pki.ca()
            .verify_node(
                std::slice::from_ref(&bundle.cert.cert_der),
                &bundle.address,
                UnixTime::now(),
            )
            .unwrap();
        let rec = reg.node_cert("n2").await.unwrap().unwrap();
        assert_eq!(rec.serial, bundle.cert.serial);
        assert_eq!(rec.address, "127.0.0.2:2376");
        assert_eq!(reg.node_certs().await.unwrap().len(), 1);
        pki.client_config().unwrap();
        reg.pool().close().await;

        // A restart reuses both.
        let reg = Registry::open(&db, key.clone()).await.unwrap();
        let again = Pki::load_or_create(&reg).await.unwrap();
        assert_eq!(again.ca().cert_pem(), ca_pem);
        assert_eq!(again.client_cert().serial, client_serial);
        // The old CA still verifies what it issued before the restart.
        again
            .ca()
            .verify_node(
                std::slice::from_ref(&bundle.cert.cert_der),
                &bundle.address,
                UnixTime::now(),
            )
            .unwrap();
        // Nodes issued after the restart chain to the same CA.
        let b2 = again.issue_node("tester", "n3", "127.0.0.3").await.unwrap();
        Ca::from_stored(&reg.cluster_ca().await.unwrap().unwrap())
            .unwrap()
            .verify_node(&[b2.cert.cert_der], &b2.address, UnixTime::now())
            .unwrap();

        // A stored CA certificate that is not the stored key's is refused.
        let mut swapped = reg.cluster_ca().await.unwrap().unwrap();
        swapped.cert_pem = Ca::generate("x", now()).unwrap().cert_pem().to_string();
        assert!(matches!(
            Ca::from_stored(&swapped),
            Err(PkiError::Stored { what: "CA", .. })
        ));

        // A client certificate with fewer than 30 days left is replaced.
        let short = again
            .ca()
            .issue_client(reg.installation_id(), 10, now())
            .unwrap();
        reg.store_cluster_client_cert(&StoredClientCert {
            cert_pem: short.cert_pem.clone(),
            key_pem: short.key_pem().to_string(),
            serial: short.serial.clone(),
            not_after: short.not_after,
            issued_at: ms(now()),
        })
        .await
        .unwrap();
        let renewed = Pki::load_or_create(&reg).await.unwrap();
        assert_ne!(renewed.client_cert().serial, short.serial);
        assert!(
            expiry(renewed.client_cert().not_after, crate::registry::now_ms()).days_left >= 364
        );
        assert_eq!(
            reg.cluster_client_cert().await.unwrap().unwrap().serial,
            renewed.client_cert().serial
        );

        // Keys are sealed: not in the database files in clear, and not under another master key.
        reg.pool().close().await;
        for f in std::fs::read_dir(dir.path()).unwrap() {
            let text =
                String::from_utf8_lossy(&std::fs::read(f.unwrap().path()).unwrap()).into_owned();
            for k in [&ca_key, &client_key] {
                let body = k.lines().nth(1).unwrap();
                assert!(!text.contains(body), "a private key is stored in clear");
            }
        }
        let other = Registry::open(&db, crate::secrets::MasterKey::random()).await;
        if let Ok(r) = other {
            assert!(Pki::load_or_create(&r).await.is_err())
        }
    }

    #[tokio::test]
    async fn client_renewal_when_due_and_node_expiries() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let mut pki = Pki::load_or_create(&reg).await.unwrap();
        assert!(!pki.renew_client_if_due().await.unwrap());
        let serial = pki.client_cert().serial.clone();
        let short = pki.ca.issue_client("x", 5, now()).unwrap();
        reg.store_cluster_client_cert(&StoredClientCert {
            cert_pem: short.cert_pem.clone(),
            key_pem: short.key_pem().to_string(),
            serial: short.serial.clone(),
            not_after: short.not_after,
            issued_at: ms(now()),
        })
        .await
        .unwrap();
        pki.client = short;
        assert!(pki.renew_client_if_due().await.unwrap());
        assert_ne!(pki.client_cert().serial, serial);
        assert_eq!(
            reg.cluster_client_cert().await.unwrap().unwrap().serial,
            pki.client_cert().serial
        );

        pki.node_validity_days = 20;
        pki.issue_node("tester", "n2", "127.0.0.2").await.unwrap();
        pki.node_validity_days = NODE_CERT_VALIDITY_DAYS;
        pki.issue_node("tester", "n3", "n3.example.eu:2376")
            .await
            .unwrap();
        let e = pki
            .node_cert_expiries(crate::registry::now_ms())
            .await
            .unwrap();
        let by: Vec<(&str, i64, bool)> = e
            .iter()
            .map(|(r, e)| (r.node.as_str(), e.days_left, e.warn))
            .collect();
        // Whole days left, give or take the day boundary the seconds of issuance fall on.
        assert_eq!(by.len(), 2, "{by:?}");
        assert!(
            by[0].0 == "n2" && (19..=20).contains(&by[0].1) && by[0].2,
            "{by:?}"
        );
        assert!(
            by[1].0 == "n3" && (364..=365).contains(&by[1].1) && !by[1].2,
            "{by:?}"
        );
        assert!(matches!(
            pki.issue_node("tester", "n4", "n4 example").await,
            Err(PkiError::InvalidAddress { .. })
        ));
    }

    #[tokio::test]
    async fn concurrent_first_starts_agree_on_one_ca_and_audit_what_was_issued() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let (a, b) = tokio::join!(Pki::load_or_create(&reg), Pki::load_or_create(&reg));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.ca().cert_pem(), b.ca().cert_pem());
        let stored = reg.cluster_ca().await.unwrap().unwrap();
        assert_eq!(stored.cert_pem, a.ca().cert_pem());
        // Both client certificates are the CA's; the stored one is one of them.
        let client = reg.cluster_client_cert().await.unwrap().unwrap();
        assert!([&a.client_cert().serial, &b.client_cert().serial].contains(&&client.serial));
        a.issue_node("tester", "n2", "127.0.0.2").await.unwrap();
        let actions: Vec<(String, String)> = sqlx::query_as(
            "SELECT actor, action FROM events WHERE action LIKE 'cluster.%' ORDER BY id",
        )
        .fetch_all(reg.pool())
        .await
        .unwrap();
        assert_eq!(
            actions
                .iter()
                .filter(|(_, a)| a == "cluster.ca.create")
                .count(),
            1
        );
        assert!(actions.iter().any(|(_, a)| a == "cluster.client_cert"));
        assert_eq!(
            actions.last().unwrap(),
            &("tester".to_string(), "cluster.node_cert".to_string())
        );
        let detail: String =
            sqlx::query_scalar("SELECT detail FROM events WHERE action = 'cluster.node_cert'")
                .fetch_one(reg.pool())
                .await
                .unwrap();
        assert!(
            detail.contains("n2") && detail.contains("127.0.0.2:2376"),
            "{detail}"
        );
        assert!(!detail.contains("PRIVATE"));
    }

    #[tokio::test]
    async fn client_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path()).await;
        let pki = Pki::load_or_create(&reg).await.unwrap();
        let files = pki
            .write_client_files(&dir.path().join("cluster-client"))
            .unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.path().join("cluster-client")), 0o700);
        for p in [&files.ca, &files.cert, &files.key] {
            assert_eq!(mode(p), 0o600, "{}", p.display());
        }
        assert_eq!(
            std::fs::read_to_string(&files.key).unwrap(),
            pki.client_cert().key_pem()
        );
        pki.write_client_files(&dir.path().join("cluster-client"))
            .unwrap();
    }
}

//! Creating the cluster CA and issuing leaf certificates (rcgen).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::ServerName;
use time::{Duration, OffsetDateTime};

use crate::files::{self, CertPaths};
use crate::{CertError, Result, Role};

/// Common name of the cluster CA, followed by a short key identifier.
const CA_COMMON_NAME: &str = "ringkv cluster CA";
/// Validity of the cluster CA.
const CA_VALIDITY: Duration = Duration::days(10 * 365);
/// Default validity of a leaf.
const LEAF_VALIDITY: Duration = Duration::days(365);
/// Backdating of `not_before`, so peers with slightly slow clocks accept fresh certificates.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// Creates the cluster CA in `dir` (`ca.pem`, `ca.key`), creating `dir` if missing.
///
/// Without `force`, refuses with [`CertError::AlreadyExists`] if either file exists, and
/// writes nothing. The CA is valid from one hour ago for ten years, may sign certificates
/// (and CRLs), and has an unconstrained path length.
pub fn init_ca(dir: &Path, force: bool) -> Result<CertPaths> {
    let paths = files::ca_paths(dir);
    files::ensure_dir(dir)?;
    files::check_absent(&paths, force)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    // A per-CA suffix keeps subjects of different clusters' CAs distinct. Otherwise webpki
    // matches a foreign leaf to our CA by name and reports a confusing `BadSignature`
    // instead of `UnknownIssuer`.
    let key_id: String = params.key_identifier(&key)[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    params.distinguished_name = common_name(&format!("{CA_COMMON_NAME} {key_id}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + CA_VALIDITY;
    let cert = params.self_signed(&key)?;

    files::write_pair(&paths, &cert.pem(), &key.serialize_pem(), force)?;
    tracing::info!(cert = %paths.cert.display(), key = %paths.key.display(), "created cluster CA");
    Ok(paths)
}

/// What [`issue`] should put into a leaf certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueOptions {
    /// Role carried as the URI SAN `ringkv:role:<role>`.
    pub role: Role,
    /// Common name and file stem (`<name>.pem`, `<name>.key`); see [`issue`] for the rules.
    pub name: String,
    /// Extra SANs: each one that parses as an IP address becomes an IP SAN, anything else
    /// must be a valid DNS name and becomes a DNS SAN. Node certificates need the names and
    /// addresses clients dial, since clients verify them.
    pub sans: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
    /// Overwrite an existing `<name>.pem` / `<name>.key`.
    pub force: bool,
}

impl IssueOptions {
    /// Options for a leaf valid from one hour ago for 365 days, with no extra SANs.
    pub fn new(role: Role, name: impl Into<String>) -> Self {
        let now = OffsetDateTime::now_utc();
        IssueOptions {
            role,
            name: name.into(),
            sans: Vec::new(),
            not_before: now - CLOCK_SKEW,
            not_after: now + LEAF_VALIDITY,
            force: false,
        }
    }
}

/// Issues a leaf certificate signed by the CA in `dir`, writing `<name>.pem` and `<name>.key`.
///
/// The leaf has CN = `name`, the role URI SAN plus `opts.sans`, key usage digitalSignature
/// and extended key usages serverAuth + clientAuth for every role (node certificates act as
/// both server and client; the role SAN, not the EKU, decides what a peer may do).
///
/// `name` must be 1..=64 characters of `[A-Za-z0-9._-]`, not start with `.`, and not be `ca`.
/// Without `opts.force`, refuses with [`CertError::AlreadyExists`] if either file exists.
/// All checks (name, SANs, validity, CA key matches CA cert) run before anything is written.
pub fn issue(dir: &Path, opts: &IssueOptions) -> Result<CertPaths> {
    files::validate_name(&opts.name)?;
    if opts.not_before >= opts.not_after {
        return Err(CertError::InvalidValidity {
            not_before: opts.not_before,
            not_after: opts.not_after,
        });
    }
    let mut sans = vec![SanType::URI(opts.role.san_uri().try_into()?)];
    for san in &opts.sans {
        sans.push(parse_san(san)?);
    }
    let paths = files::leaf_paths(dir, &opts.name);
    files::check_absent(&paths, opts.force)?;

    let ca = load_issuer(dir)?;
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name(&opts.name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = opts.not_before;
    params.not_after = opts.not_after;
    let cert = params.signed_by(&key, &ca)?;

    files::write_pair(&paths, &cert.pem(), &key.serialize_pem(), opts.force)?;
    tracing::info!(
        role = %opts.role,
        name = %opts.name,
        cert = %paths.cert.display(),
        key = %paths.key.display(),
        "issued certificate"
    );
    Ok(paths)
}

fn common_name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// IP address → IP SAN; otherwise it must be a DNS name webpki accepts as a server name
/// (so a SAN we write is always one a client can match).
fn parse_san(san: &str) -> Result<SanType> {
    let invalid = || CertError::InvalidSan {
        san: san.to_owned(),
    };
    match ServerName::try_from(san).map_err(|_| invalid())? {
        ServerName::IpAddress(ip) => Ok(SanType::IpAddress(std::net::IpAddr::from(ip))),
        ServerName::DnsName(dns) => Ok(SanType::DnsName(
            dns.as_ref().to_owned().try_into().map_err(|_| invalid())?,
        )),
        _ => Err(invalid()),
    }
}

/// Rebuilds the rcgen issuer from `ca.pem` + `ca.key` in `dir`, checking that they belong
/// together.
fn load_issuer(dir: &Path) -> Result<Issuer<'static, KeyPair>> {
    let paths = files::ca_paths(dir);
    let cert_pem = read_utf8(&paths.cert)?;
    let key_pem = read_utf8(&paths.key)?;
    let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::BadPem {
        path: paths.key.clone(),
        reason: e.to_string(),
    })?;
    let cert_der = crate::identity::parse_pem_certs(&paths.cert, cert_pem.as_bytes())?
        .into_iter()
        .next()
        .ok_or_else(|| CertError::BadPem {
            path: paths.cert.clone(),
            reason: "no certificate".into(),
        })?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(crate::identity::x509_error)?;
    if x509.public_key().subject_public_key.as_ref() != key.public_key_raw() {
        return Err(CertError::KeyMismatch {
            cert: paths.cert,
            key: paths.key,
        });
    }
    Ok(Issuer::from_ca_cert_der(&cert_der, key)?)
}

fn read_utf8(path: &Path) -> Result<String> {
    String::from_utf8(files::read(path)?).map_err(|_| CertError::BadPem {
        path: path.to_owned(),
        reason: "not UTF-8".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn san_parsing() {
        assert!(matches!(
            parse_san("127.0.0.1").unwrap(),
            SanType::IpAddress(ip) if ip.to_string() == "127.0.0.1"
        ));
        assert!(matches!(parse_san("::1").unwrap(), SanType::IpAddress(_)));
        assert!(matches!(
            parse_san("node1.example.com").unwrap(),
            SanType::DnsName(_)
        ));
        assert!(matches!(
            parse_san("localhost").unwrap(),
            SanType::DnsName(_)
        ));
        for bad in ["", "a b", "exa mple.com", "-x..y", "ünïcode"] {
            assert!(
                matches!(parse_san(bad), Err(CertError::InvalidSan { .. })),
                "{bad:?} accepted"
            );
        }
    }

    #[test]
    fn default_options() {
        let opts = IssueOptions::new(Role::Node, "n1");
        assert_eq!(opts.name, "n1");
        assert!(opts.sans.is_empty());
        assert!(!opts.force);
        let now = OffsetDateTime::now_utc();
        assert!(opts.not_before < now && opts.not_after > now + Duration::days(364));
    }
}

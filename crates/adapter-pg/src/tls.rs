//! TLS for every connection (the pool's and the listener's), with rustls and libpq's settings:
//!
//! | `sslmode` | encrypted | certificate chain checked | host name checked |
//! |---|---|---|---|
//! | `disable` | no | – | – |
//! | `prefer` (default) | if the server offers it | no | no |
//! | `require` | yes | no (see below) | no |
//! | `verify-ca` | yes | yes | no |
//! | `verify-full` | yes | yes | yes |
//!
//! `sslrootcert` names a PEM file of trusted certificates, or `system` for the platform's
//! store. As in libpq: without it, the verifying modes use `~/.postgresql/root.crt`; with
//! `sslrootcert=system` the mode defaults to (and must be) `verify-full`; and `require` with
//! an explicit `sslrootcert` file behaves as `verify-ca`.
//!
//! `prefer` and `require` without a root certificate encrypt but accept any certificate: they
//! protect against eavesdropping, not against someone impersonating the server.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use rustls_pki_types::pem::PemObject as _;
use tokio_postgres::config::SslMode as DriverSslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it, without verifying the certificate (libpq's default).
    #[default]
    Prefer,
    /// TLS or no connection; the certificate is not verified.
    Require,
    /// TLS; the certificate must chain to a trusted root (any host name).
    VerifyCa,
    /// TLS; the certificate must chain to a trusted root and name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// Reads libpq's spelling.
    pub fn parse(text: &str) -> Option<SslMode> {
        Some(match text {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    /// libpq's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    pub(crate) fn driver(self) -> DriverSslMode {
        match self {
            SslMode::Disable => DriverSslMode::Disable,
            SslMode::Prefer => DriverSslMode::Prefer,
            _ => DriverSslMode::Require,
        }
    }
}

/// Where trusted root certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Roots {
    /// A PEM file.
    File(PathBuf),
    /// The platform's store.
    System,
}

/// The TLS settings of one connection string, checked for consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    /// `None`: certificates are not verified.
    pub(crate) roots: Option<Roots>,
}

impl TlsSettings {
    /// From the raw `sslmode` and `sslrootcert` values, as libpq combines them.
    pub(crate) fn new(sslmode: Option<&str>, sslrootcert: Option<&str>) -> Result<Self, String> {
        let explicit = match sslmode {
            Some(text) => Some(SslMode::parse(text).ok_or_else(|| {
                format!(
                    "sslmode {text:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )
            })?),
            None => None,
        };
        let roots = match sslrootcert {
            Some("system") => Some(Roots::System),
            Some("") | None => None,
            Some(path) => Some(Roots::File(PathBuf::from(path))),
        };
        let mode = match (explicit, &roots) {
            (None, Some(Roots::System)) => SslMode::VerifyFull,
            (Some(mode), Some(Roots::System)) if mode != SslMode::VerifyFull => {
                return Err(format!(
                    "sslmode={} may not be used with sslrootcert=system (use verify-full)",
                    mode.as_str()
                ));
            }
            (Some(SslMode::Require), Some(Roots::File(_))) => SslMode::VerifyCa,
            (mode, _) => mode.unwrap_or_default(),
        };
        let roots = match mode {
            SslMode::VerifyCa | SslMode::VerifyFull => Some(match roots {
                Some(roots) => roots,
                None => Roots::File(default_root_file().ok_or_else(|| {
                    format!(
                        "sslmode={} needs trusted roots: set sslrootcert to a PEM file or to \
                         `system` (~/.postgresql/root.crt does not exist)",
                        mode.as_str()
                    )
                })?),
            }),
            _ => None,
        };
        Ok(TlsSettings { mode, roots })
    }

    /// The connector for tokio-postgres (used only when the mode asks for TLS).
    pub(crate) fn connector(&self) -> Result<MakeRustlsConnect, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = match &self.roots {
            None => Arc::new(AnyCertificate(provider.signature_verification_algorithms)),
            Some(roots) => {
                let store = Arc::new(load_roots(roots)?);
                let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                    .build()
                    .map_err(|e| format!("cannot use the trusted roots: {e}"))?;
                if self.mode == SslMode::VerifyFull { webpki } else { Arc::new(ChainOnly(webpki)) }
            }
        };
        let config =
            builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }
}

/// libpq's default root file, when it exists.
fn default_root_file() -> Option<PathBuf> {
    let home = std::env::var_os("HOME")?;
    let path = Path::new(&home).join(".postgresql").join("root.crt");
    path.is_file().then_some(path)
}

fn load_roots(roots: &Roots) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect())
                .map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
            }
            for cert in certs {
                store.add(cert).map_err(|e| {
                    format!("sslrootcert {} holds an unusable certificate: {e}", path.display())
                })?;
            }
        }
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found.errors.first().map(ToString::to_string).unwrap_or_default();
                return Err(format!(
                    "sslrootcert=system: the platform has no usable root certificates {why}"
                ));
            }
        }
    }
    Ok(store)
}

/// `verify-ca`: the full check of the chain, but any host name.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // The chain is checked before the name, so a name error means the chain was good.
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer` and `require`: any certificate, but the handshake's signatures are still checked
/// against it (the session key really belongs to whoever presented that certificate).
#[derive(Debug)]
struct AnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

/// A plain-words account of a TLS failure found in an error's chain, if there is one.
pub(crate) fn describe_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(describe_rustls(tls));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(describe_rustls(tls));
        }
        current = e.source();
    }
    None
}

fn describe_rustls(error: &rustls::Error) -> String {
    use CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            "the server's certificate is not trusted: it does not chain to a certificate of \
             sslrootcert (unknown issuer)"
                .to_owned()
        }
        rustls::Error::InvalidCertificate(C::NotValidForName)
        | rustls::Error::InvalidCertificate(C::NotValidForNameContext { .. }) => format!(
            "the server's certificate does not match the host name connected to ({error}); \
             connect by a name the certificate lists, or use sslmode=verify-ca"
        ),
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            format!("the server's certificate has expired ({error})")
        }
        rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. }) => {
            format!("the server's certificate is not valid yet ({error})")
        }
        other => format!("the TLS handshake failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_combinations_of_mode_and_roots() {
        let settings = |mode, root| TlsSettings::new(mode, root);
        assert_eq!(settings(None, None).unwrap().mode, SslMode::Prefer);
        assert_eq!(
            settings(Some("disable"), None).unwrap(),
            TlsSettings { mode: SslMode::Disable, roots: None }
        );
        assert_eq!(settings(None, Some("system")).unwrap().mode, SslMode::VerifyFull);
        assert!(settings(Some("verify-ca"), Some("system")).unwrap_err().contains("verify-full"));
        assert_eq!(
            settings(Some("require"), Some("/ca.pem")).unwrap(),
            TlsSettings { mode: SslMode::VerifyCa, roots: Some(Roots::File("/ca.pem".into())) }
        );
        assert!(settings(Some("verify_full"), None).unwrap_err().contains("verify-full"));
    }

    #[test]
    fn unreadable_roots_are_clear_errors() {
        let settings = TlsSettings::new(Some("verify-full"), Some("/nonexistent/ca.pem")).unwrap();
        let err = settings.connector().err().expect("no such file");
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        let empty = tempfile::NamedTempFile::new().expect("a temporary file");
        std::fs::write(empty.path(), "not a certificate\n").unwrap();
        let settings = TlsSettings::new(Some("verify-ca"), empty.path().to_str()).unwrap();
        let err = settings.connector().err().expect("no certificate");
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}

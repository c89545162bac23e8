//! How a connection reaches PostgreSQL: in plain text, or over TLS when the URL asks for it.
//!
//! - `sslmode=require` (and libpq's `verify-ca` / `verify-full`) connect over TLS and always
//!   verify the server's certificate and name: against the file named by `sslrootcert` when the
//!   URL has one, else against the Mozilla root store. (libpq's `require` alone would not
//!   verify; a service that moves stock should not talk to a server it cannot authenticate.)
//! - No `sslmode`, `prefer` or `disable` connect in plain text: a TLS attempt failing
//!   verification must not stop a deployment that never asked for TLS.

use std::path::PathBuf;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio_postgres::config::SslMode;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::Failure;

/// A parsed `database.url` and the TLS connector it calls for.
pub struct Target {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustlsConnect,
}

pub fn target(url: &str) -> Result<Target, Failure> {
    let (config, root_cert) = parse(url).map_err(|e| Failure::fatal_from("database.url", e))?;
    let tls = MakeRustlsConnect::new(
        client_config(root_cert).map_err(|e| Failure::fatal_from("database.url", e))?,
    );
    Ok(Target { config, tls })
}

/// Checks `url` as [`target`] will use it (the libpq parameters, the root certificates it
/// names): the configuration's check at start-up, so that no command joins anything first.
pub fn check(url: &str) -> Result<(), String> {
    let (_, root_cert) = parse(url)?;
    client_config(root_cert).map(drop)
}

/// The connection settings of `url`, and the root certificates' file it names, if any.
pub fn parse(url: &str) -> Result<(tokio_postgres::Config, Option<PathBuf>), String> {
    let (url, root_cert) = libpq_only_parameters(url);
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
    if config.get_ssl_mode() == SslMode::Prefer {
        config.ssl_mode(SslMode::Disable);
    }
    Ok((config, root_cert))
}

/// Takes out of a database URL what libpq understands and tokio-postgres does not:
/// `sslrootcert=FILE`, and the `verify-ca` / `verify-full` modes (both become `require`, which
/// verifies here anyway). Both forms: a `postgres://` URL's query (every other parameter kept
/// byte for byte, as tokio-postgres decodes them; several hosts allowed), or `key=value`
/// words (unquoted values). Anything else is returned unchanged.
fn libpq_only_parameters(url: &str) -> (String, Option<PathBuf>) {
    let mut root_cert = None;
    let mut changed = false;
    let mut take = |key: &str, value: &str| -> Option<Option<String>> {
        let taken = match (key, value) {
            ("sslrootcert", file) => {
                root_cert = Some(PathBuf::from(file));
                Some(None)
            }
            ("sslmode", "verify-ca" | "verify-full") => Some(Some("require".to_owned())),
            _ => None,
        };
        changed |= taken.is_some();
        taken
    };
    let rewritten = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // The query starts after the credentials (a password may hold a `?`).
        let after = url.rfind('@').map_or(0, |at| at + 1);
        let Some(q) = url[after..].find('?').map(|q| after + q) else {
            return (url.to_owned(), None);
        };
        let (base, query) = (&url[..q], &url[q + 1..]);
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let kept: Vec<String> = query
            .split('&')
            .filter_map(|segment| {
                let (k, v) = segment.split_once('=').unwrap_or((segment, ""));
                match take(&decode(k), &decode(v)) {
                    None => Some(segment.to_owned()),
                    Some(None) => None,
                    Some(Some(v)) => Some(format!("{k}={v}")),
                }
            })
            .collect();
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        url.split_whitespace()
            .filter_map(|word| match word.split_once('=') {
                Some((k, v)) => match take(k, v) {
                    None => Some(word.to_owned()),
                    Some(None) => None,
                    Some(Some(v)) => Some(format!("{k}={v}")),
                },
                None => Some(word.to_owned()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !changed {
        return (url.to_owned(), None);
    }
    (rewritten, root_cert)
}

fn client_config(root_cert: Option<PathBuf>) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(file) => {
            let certs = CertificateDer::pem_file_iter(&file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("sslrootcert {}: {e}", file.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(format!(
                    "sslrootcert {} holds no usable certificate",
                    file.display()
                ));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_urls_pass_through_unchanged() {
        for url in [
            "postgres://u:p%40ss@db:5432/inventory",
            "postgres://u@h1,h2/db?sslmode=require&application_name=x",
            "host=db user=u sslmode=require",
        ] {
            assert_eq!(libpq_only_parameters(url), (url.to_owned(), None));
        }
    }

    #[test]
    fn libpq_parameters_are_taken_out() {
        let (url, root) = libpq_only_parameters(
            "postgres://u:p@db/inv?sslmode=verify-full&sslrootcert=/etc/ca.pem&connect_timeout=5",
        );
        assert_eq!(
            url,
            "postgres://u:p@db/inv?sslmode=require&connect_timeout=5"
        );
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let (url, _) = libpq_only_parameters("postgres://u@db/inv?sslrootcert=ca.pem");
        assert_eq!(url, "postgres://u@db/inv");
        // Several hosts, and other parameters kept exactly as written.
        let (url, root) = libpq_only_parameters(
            "postgres://u:p@h1:5432,h2:5432/inv?options=-c%20search_path%3Dx&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem",
        );
        assert_eq!(
            url,
            "postgres://u:p@h1:5432,h2:5432/inv?options=-c%20search_path%3Dx&sslmode=require"
        );
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
        let (url, root) =
            libpq_only_parameters("host=db user=u sslmode=verify-full sslrootcert=/etc/ca.pem");
        assert_eq!(url, "host=db user=u sslmode=require");
        assert_eq!(root, Some(PathBuf::from("/etc/ca.pem")));
    }

    #[test]
    fn modes_map_to_plain_or_verified_tls() {
        let mode = |url: &str| target(url).map(|t| t.config.get_ssl_mode()).ok();
        assert_eq!(mode("postgres://u@db/inv"), Some(SslMode::Disable));
        assert_eq!(
            mode("postgres://u@db/inv?sslmode=prefer"),
            Some(SslMode::Disable)
        );
        assert_eq!(
            mode("postgres://u@db/inv?sslmode=require"),
            Some(SslMode::Require)
        );
        assert_eq!(
            mode("postgres://u@db/inv?sslmode=verify-full"),
            Some(SslMode::Require)
        );
        let missing = target("postgres://u@db/inv?sslmode=require&sslrootcert=/nonexistent.pem");
        assert!(
            matches!(missing, Err(ref f @ Failure::Fatal(_)) if crate::logs::chain(f).contains("/nonexistent.pem")),
            "a missing root certificate is a clear start-up error"
        );
    }
}

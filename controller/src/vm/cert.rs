//! The webhook's TLS certificate, kept by the controller itself in a Secret the install ships
//! empty: the first replica to start generates a CA and a serving certificate (rcgen, ring) and
//! writes them with the Secret's resourceVersion; every replica then serves the Secret's pair
//! and puts the CA into the MutatingWebhookConfiguration's `caBundle`. So the chart and the
//! plain manifests carry no key material, and an upgrade keeps the certificate.

use crate::error::{Error, Result, with_timeout};
use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use std::collections::BTreeMap;
use std::time::Duration;

pub const CA_KEY: &str = "ca.crt";
pub const CERT_KEY: &str = "tls.crt";
pub const KEY_KEY: &str = "tls.key";
/// The Secret annotation listing the names the certificate was made for: a change of names
/// (another Service name) makes a new certificate.
pub const NAMES_ANNOTATION: &str = "twosite.dev/webhook-names";

/// A CA and a serving certificate signed by it, PEM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookCert {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn cert_err(e: rcgen::Error) -> Error {
    Error::Webhook(format!("could not make the webhook certificate: {e}"))
}

/// A new CA and a serving certificate for `names` (DNS names or IP addresses), with rcgen's
/// long default validity: the CA key is dropped, so a rotation is a new pair (empty the
/// Secret's data and restart the controller).
pub fn generate(names: &[String]) -> Result<WebhookCert> {
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "twosite webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(cert_err)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(cert_err)?;
    let issuer = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(names.to_vec()).map_err(cert_err)?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        names
            .first()
            .cloned()
            .unwrap_or_else(|| "twosite-webhook".into()),
    );
    let leaf_key = KeyPair::generate().map_err(cert_err)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &issuer).map_err(cert_err)?;
    Ok(WebhookCert {
        ca_pem: ca_cert.pem(),
        cert_pem: leaf_cert.pem(),
        key_pem: leaf_key.serialize_pem(),
    })
}

fn get(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
        .filter(|s| !s.trim().is_empty())
}

/// The certificate in `secret`, if it has all three parts and was made for `names`.
pub fn from_secret(secret: &Secret, names: &[String]) -> Option<WebhookCert> {
    let made_for = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NAMES_ANNOTATION))?;
    if *made_for != names.join(",") {
        return None;
    }
    let data = secret.data.as_ref()?;
    Some(WebhookCert {
        ca_pem: get(data, CA_KEY)?,
        cert_pem: get(data, CERT_KEY)?,
        key_pem: get(data, KEY_KEY)?,
    })
}

/// Reads the certificate from the Secret `name`, or makes one and writes it (precondition: the
/// resourceVersion read; a replica that loses the race reads the winner's).
pub async fn ensure(
    client: &Client,
    namespace: &str,
    name: &str,
    names: &[String],
    api_timeout: Duration,
) -> Result<WebhookCert> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..5 {
        let secret = with_timeout("read webhook Secret", api_timeout, api.get(name)).await?;
        if let Some(c) = from_secret(&secret, names) {
            return Ok(c);
        }
        let cert = generate(names)?;
        let mut next = secret.clone();
        next.metadata.managed_fields = None;
        next.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(NAMES_ANNOTATION.to_string(), names.join(","));
        next.data = Some(
            [
                (CA_KEY, &cert.ca_pem),
                (CERT_KEY, &cert.cert_pem),
                (KEY_KEY, &cert.key_pem),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect(),
        );
        next.string_data = None;
        match with_timeout(
            "write webhook Secret",
            api_timeout,
            api.replace(name, &PostParams::default(), &next),
        )
        .await
        {
            Ok(_) => {
                tracing::info!(secret = name, "webhook certificate made and stored");
                return Ok(cert);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Error::Webhook(format!(
        "the Secret {namespace}/{name} kept changing while the certificate was written"
    )))
}

/// Puts `ca_pem` into every webhook of the MutatingWebhookConfiguration `name` whose
/// `caBundle` differs. Returns whether it wrote.
pub async fn patch_ca_bundle(
    client: &Client,
    name: &str,
    ca_pem: &str,
    api_timeout: Duration,
) -> Result<bool> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let config = with_timeout("read webhook configuration", api_timeout, api.get(name)).await?;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem.as_bytes());
    let mut ops = vec![serde_json::json!({
        "op": "test", "path": "/metadata/resourceVersion",
        "value": config.metadata.resource_version,
    })];
    for (i, w) in config.webhooks.iter().flatten().enumerate() {
        if w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(ca_pem.as_bytes()) {
            ops.push(serde_json::json!({
                "op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"), "value": bundle,
            }));
        }
    }
    if ops.len() == 1 {
        return Ok(false);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).map_err(Error::Json)?;
    with_timeout(
        "patch webhook caBundle",
        api_timeout,
        api.patch(name, &PatchParams::default(), &Patch::<()>::Json(patch)),
    )
    .await?;
    Ok(true)
}

/// The rustls server configuration for `cert`.
pub fn server_config(cert: &WebhookCert) -> Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Webhook(format!("the serving certificate is not PEM: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
        .map_err(|e| Error::Webhook(format!("the serving key is not PEM: {e}")))?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Webhook(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Webhook(format!("the serving certificate is unusable: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_pair_reads_back_from_its_secret_and_serves() {
        let names = vec![
            "twosite-webhook.ts.svc".to_string(),
            "127.0.0.1".to_string(),
        ];
        let cert = generate(&names).expect("generated");
        assert!(cert.ca_pem.contains("BEGIN CERTIFICATE"));
        let secret = Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some([(NAMES_ANNOTATION.to_string(), names.join(","))].into()),
                ..Default::default()
            },
            data: Some(
                [
                    (CA_KEY, &cert.ca_pem),
                    (CERT_KEY, &cert.cert_pem),
                    (KEY_KEY, &cert.key_pem),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
            ),
            ..Default::default()
        };
        assert_eq!(from_secret(&secret, &names), Some(cert.clone()));
        // Other names (another Service): not reused.
        assert_eq!(from_secret(&secret, &names[..1]), None);
        // The empty Secret the install ships: nothing to reuse.
        assert_eq!(from_secret(&Secret::default(), &names), None);
        server_config(&cert).expect("rustls takes it");
    }
}

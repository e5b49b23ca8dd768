//! The SHA-256 of a public key (its whole SubjectPublicKeyInfo, DER), which names the
//! key a lease belongs to, and hex, the form such hashes and serials are shown in.

#[cfg(test)]
use crate::csr::{csr_der, parse_request};
#[cfg(test)]
use crate::error::CertError;

/// The hash a request's and a certificate's key are compared by: the one the
/// controller's [`twill_common::tls::Identity`] computes from a client certificate.
pub use twill_common::tls::spki_sha256;

/// SHA-256 of the public key (SubjectPublicKeyInfo) of a certificate in DER form: the
/// tests' cross-check of [`crate::SignedNode::key_sha256`].
#[cfg(test)]
pub(crate) fn key_sha256_of_cert_der(der: &[u8]) -> Result<[u8; 32], CertError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CertError::BadCert(e.to_string()))?;
    Ok(spki_sha256(cert.public_key().raw))
}

/// SHA-256 of the public key of a certificate signing request (PEM), read without the
/// other checks of [`crate::parse_node_csr`]: the tests' cross-check of
/// [`crate::NodeCsr::key_sha256`].
#[cfg(test)]
pub(crate) fn key_sha256_of_csr(csr_pem: &str) -> Result<[u8; 32], CertError> {
    let der = csr_der(csr_pem)?;
    let req = parse_request(&der)?;
    Ok(spki_sha256(req.certification_request_info.subject_pki.raw))
}

pub use twill_common::{hex, unhex};

#[cfg(test)]
mod tests {
    use rcgen::PublicKeyData;

    use super::*;
    use crate::ca::{new_ca, Ca, Validity};
    use crate::csr::{generate_key, node_csr_pem};

    #[test]
    fn hex_round_trips() {
        assert_eq!(hex(&[]), "");
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(unhex("000fa5ff"), Some(vec![0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(unhex("000FA5Ff"), Some(vec![0x00, 0x0f, 0xa5, 0xff]));
        assert_eq!(unhex(""), Some(vec![]));
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&all)), Some(all));
        for bad in [
            "0", "abc", "0g", "+f", "-1", " 0f", "0x0f", "0f ", "é0", "0f:00",
        ] {
            assert_eq!(unhex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_certificate_and_its_request_hash_to_the_same_key() {
        let root = new_ca(Validity::days(1).unwrap()).unwrap();
        let ca = Ca::from_pem(&root.cert_pem, &root.key_pem).unwrap();
        let key = generate_key().unwrap();
        let csr = node_csr_pem("node-a", &key).unwrap();
        let from_csr = key_sha256_of_csr(&csr).unwrap();
        assert_eq!(from_csr, spki_sha256(&key.subject_public_key_info()));
        let signed = ca
            .sign_node(
                &crate::parse_node_csr(&csr).unwrap(),
                Validity::days(1).unwrap(),
            )
            .unwrap();
        assert_eq!(key_sha256_of_cert_der(&signed.cert_der).unwrap(), from_csr);
        assert_eq!(signed.key_sha256, from_csr);
        // The hash of a well-known value, so that other tools can compute it too
        // (`openssl x509 -pubkey -noout | openssl pkey -pubin -outform der | sha256sum`).
        assert_eq!(
            hex(&spki_sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // Another key, another hash.
        let other = node_csr_pem("node-a", &generate_key().unwrap()).unwrap();
        assert_ne!(key_sha256_of_csr(&other).unwrap(), from_csr);
        assert!(matches!(
            key_sha256_of_cert_der(b"not a certificate"),
            Err(CertError::BadCert(_))
        ));
    }
}

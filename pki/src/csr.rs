//! Certificate signing requests: made by nodes ([`node_csr_pem`]), checked once by the
//! controller ([`parse_node_csr`]) and signed from what that returns
//! ([`crate::Ca::sign_node`]).

use std::fmt;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData, SignatureAlgorithm,
    PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519, PKCS_RSA_SHA256,
};
use twill_common::tls::NODES_GROUP;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::error::X509Error;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::{AlgorithmIdentifier, SubjectPublicKeyInfo, X509Name};

use crate::error::{CertError, CsrFault};
use crate::keys::spki_sha256;

/// The smallest RSA key signed, in bits.
pub const MIN_RSA_BITS: usize = 2048;
/// The largest RSA key signed, in bits: verifying a signature costs more the larger the
/// key, so a huge one (16384 bits) would let anyone make the controller burn CPU.
pub const MAX_RSA_BITS: usize = 4096;
/// The longest request text accepted, in bytes (an RSA-4096 request is under 2 KiB).
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;
/// The PEM labels a request may carry (`NEW CERTIFICATE REQUEST` is an old spelling
/// some tools still write).
pub const CSR_LABELS: [&str; 2] = ["CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"];

/// The kind of key a request carries: the kinds Twill signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyKind {
    /// RSA, [`MIN_RSA_BITS`] to [`MAX_RSA_BITS`] bits.
    Rsa {
        /// The modulus's size in bits.
        bits: usize,
    },
    /// ECDSA on P-256 (what `twill-agent` makes).
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::Ed25519 => f.write_str("Ed25519"),
        }
    }
}

/// A node's certificate signing request that [`parse_node_csr`] accepted: everything a
/// signer needs, so that nobody parses it twice.
#[derive(Debug, Clone)]
pub struct NodeCsr {
    /// The subject's CN: the node name the request is for (a valid node name).
    pub common_name: String,
    /// SHA-256 of the request's SubjectPublicKeyInfo, equal to that of the certificate
    /// signed for it.
    pub key_sha256: [u8; 32],
    /// The kind of key.
    pub key: KeyKind,
    /// The key, as rcgen signs it.
    pub(crate) public_key: CsrKey,
}

/// A request's public key, written into the certificate exactly as the request holds
/// it (checked by [`parse_node_csr`]).
#[derive(Debug, Clone)]
pub(crate) struct CsrKey {
    raw: Vec<u8>,
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for CsrKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

/// Parses and checks a node's certificate signing request (PKCS#10, PEM), cheapest
/// checks first, the signature last. Refused with [`CertError::Csr`] and its fault:
///
/// * [`CsrFault::Malformed`]: longer than [`MAX_CSR_PEM_LEN`]; not exactly one PEM block
///   labelled as in [`CSR_LABELS`] with only whitespace around it (other text, a second
///   block, PEM headers); bytes after the request inside the block; a request that does
///   not parse, or whose key is not in its usual DER form.
/// * [`CsrFault::WeakKey`]: an RSA key under [`MIN_RSA_BITS`] or over [`MAX_RSA_BITS`]
///   bits, or a key other than RSA, ECDSA P-256 / P-384 and Ed25519.
/// * [`CsrFault::Subject`]: a subject without exactly one CN, or a CN that is no valid
///   node name.
/// * [`CsrFault::BadSignature`]: a signature algorithm other than RSA PKCS#1 v1.5 or PSS
///   with SHA-256/384/512, ECDSA with SHA-256/384 and Ed25519 (or one that does not fit
///   the key), or a signature that does not verify with the request's key.
pub fn parse_node_csr(csr_pem: &str) -> Result<NodeCsr, CertError> {
    let der = csr_der(csr_pem)?;
    let req = parse_request(&der)?;
    let info = &req.certification_request_info;
    let spki = &info.subject_pki;
    let (key, alg) = key_kind(spki)?;
    let common_name = subject_cn(&info.subject)?;
    check_signature_algorithm(key, &req.signature_algorithm)?;
    let public_key = CsrKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg,
    };
    // The certificate carries the key as rcgen encodes it: it must be byte for byte the
    // request's, so that the key hash of the request is that of the certificate.
    if public_key.subject_public_key_info() != spki.raw {
        return Err(CertError::csr(
            CsrFault::Malformed,
            format!(
                "the request's {key} public key is not in its usual DER form \
                 (SubjectPublicKeyInfo with unusual parameters): make the request with \
                 openssl, rcgen or Go's crypto/x509"
            ),
        ));
    }
    req.verify_signature().map_err(|e| {
        let msg = match e {
            X509Error::SignatureUnsupportedAlgorithm => {
                format!("the request's signature algorithm cannot be used with its {key} key")
            }
            _ => "the request's signature does not verify with the key it carries (was it \
                  altered, or signed with another key?)"
                .to_string(),
        };
        CertError::csr(CsrFault::BadSignature, msg)
    })?;
    Ok(NodeCsr {
        common_name,
        key_sha256: spki_sha256(spki.raw),
        key,
        public_key,
    })
}

/// A new ECDSA P-256 key pair, the kind `twill-agent` makes for itself.
pub fn generate_key() -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Generate {
        what: "key".into(),
        source,
    })
}

/// A PKCS#10 request (PEM) for `CN=<node>, O=twill:nodes`, signed with `key`: what a
/// node sends to get its certificate. [`CertError::Invalid`] when `node` is no valid
/// node name.
pub fn node_csr_pem(node: &str, key: &KeyPair) -> Result<String, CertError> {
    twill_common::model::validate_node_name(node)
        .map_err(|e| CertError::Invalid(format!("node name: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    dn.push(DnType::OrganizationName, NODES_GROUP);
    params.distinguished_name = dn;
    params
        .serialize_request(key)
        .and_then(|csr| csr.pem())
        .map_err(|source| CertError::Generate {
            what: format!("certificate signing request for {node}"),
            source,
        })
}

fn malformed(msg: impl Into<String>) -> CertError {
    CertError::csr(CsrFault::Malformed, msg)
}

/// The DER inside the request's one PEM block, refusing anything around it.
pub(crate) fn csr_der(csr_pem: &str) -> Result<Vec<u8>, CertError> {
    const HOW: &str = "give the request's one \"-----BEGIN CERTIFICATE REQUEST-----\" block alone";
    if csr_pem.len() > MAX_CSR_PEM_LEN {
        return Err(malformed(format!(
            "the request is {} bytes long, more than the {MAX_CSR_PEM_LEN} a certificate \
             request needs: {HOW}",
            csr_pem.len()
        )));
    }
    let text = csr_pem.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() {
        return Err(malformed(format!("the request is empty: {HOW}")));
    }
    let mut lines = text
        .lines()
        .map(|l| l.trim_matches(|c: char| c.is_ascii_whitespace()));
    let first = lines.next().unwrap_or_default();
    let label = first
        .strip_prefix("-----BEGIN ")
        .and_then(|l| l.strip_suffix("-----"));
    let Some(label) = label.filter(|l| CSR_LABELS.contains(l)) else {
        let msg = match label {
            Some(other) => format!(
                "the PEM block is a {other:?}, not a \"CERTIFICATE REQUEST\" (PKCS#10): {HOW}"
            ),
            None if first.starts_with("-----") => format!(
                "the first line {first:?} is no \"-----BEGIN CERTIFICATE REQUEST-----\" \
                 line: {HOW}"
            ),
            None if text.contains("-----BEGIN ") => {
                format!("there is text before the PEM block: {HOW}")
            }
            None => format!(
                "no PEM block: the request must be PKCS#10 in PEM (as `openssl req -new` \
                 writes it): {HOW}"
            ),
        };
        return Err(malformed(msg));
    };
    let end = format!("-----END {label}-----");
    let mut base64 = String::new();
    let mut ended = false;
    let mut numbered = lines.zip(2..);
    for (line, n) in numbered.by_ref() {
        if line == end {
            ended = true;
            break;
        } else if line.starts_with("-----") {
            return Err(malformed(format!(
                "line {n} is {line:?} where the request's base64 or its {end:?} line belongs: \
                 {HOW}"
            )));
        } else if line
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'='))
        {
            base64.push_str(line);
        } else {
            return Err(malformed(format!(
                "line {n} of the PEM block is not base64 (PEM headers are not accepted): {HOW}"
            )));
        }
    }
    if !ended {
        return Err(malformed(format!(
            "the PEM block has no {end:?} line: the request is cut short"
        )));
    }
    let mut after = numbered.filter(|(line, _)| !line.is_empty()).peekable();
    if let Some((_, n)) = after.peek().copied() {
        let msg = match after.find(|(line, _)| line.starts_with("-----BEGIN ")) {
            Some((_, m)) => format!("a second PEM block follows the request (line {m}): {HOW}"),
            None => format!("there is text after the PEM block (line {n}): {HOW}"),
        };
        return Err(malformed(msg));
    }
    let der = data_encoding::BASE64
        .decode(base64.as_bytes())
        .map_err(|e| malformed(format!("the PEM block's base64 does not decode: {e}")))?;
    if der.is_empty() {
        return Err(malformed(format!("the PEM block is empty: {HOW}")));
    }
    Ok(der)
}

/// The one PKCS#10 request `der` holds, with nothing after it.
pub(crate) fn parse_request(der: &[u8]) -> Result<X509CertificationRequest<'_>, CertError> {
    let (rest, req) = X509CertificationRequest::from_der(der).map_err(|e| {
        malformed(format!(
            "the PEM block holds no PKCS#10 certificate request: {e}"
        ))
    })?;
    if !rest.is_empty() {
        return Err(malformed(format!(
            "{} bytes follow the request inside the PEM block: send the request alone",
            rest.len()
        )));
    }
    Ok(req)
}

const KEYS_SIGNED: &str = "use ECDSA P-256 (or P-384, Ed25519, RSA of 2048 to 4096 bits)";

/// The kind of key, and the rcgen algorithm that writes its SubjectPublicKeyInfo.
fn key_kind(
    spki: &SubjectPublicKeyInfo<'_>,
) -> Result<(KeyKind, &'static SignatureAlgorithm), CertError> {
    let weak = |msg: String| CertError::csr(CsrFault::WeakKey, msg);
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_PKCS1_RSAENCRYPTION {
        let Ok(PublicKey::RSA(rsa)) = spki.parsed() else {
            return Err(malformed("the request's RSA public key does not parse"));
        };
        let bits = rsa_bits(rsa.modulus)?;
        if bits < MIN_RSA_BITS {
            return Err(weak(format!(
                "an RSA key of {bits} bits is too weak: {KEYS_SIGNED}"
            )));
        }
        if bits > MAX_RSA_BITS {
            return Err(weak(format!(
                "an RSA key of {bits} bits is larger than the {MAX_RSA_BITS} accepted \
                 (checking it costs too much): {KEYS_SIGNED}"
            )));
        }
        Ok((KeyKind::Rsa { bits }, &PKCS_RSA_SHA256))
    } else if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        match curve {
            Some(c) if c == OID_EC_P256 => Ok((KeyKind::EcdsaP256, &PKCS_ECDSA_P256_SHA256)),
            Some(c) if c == OID_NIST_EC_P384 => Ok((KeyKind::EcdsaP384, &PKCS_ECDSA_P384_SHA384)),
            Some(c) => Err(weak(format!(
                "an EC key on the curve {} is not accepted: {KEYS_SIGNED}",
                oid_name(&c)
            ))),
            None => Err(weak(format!(
                "an EC key without a named curve is not accepted: {KEYS_SIGNED}"
            ))),
        }
    } else if *alg == OID_SIG_ED25519 {
        Ok((KeyKind::Ed25519, &PKCS_ED25519))
    } else {
        Err(weak(format!(
            "a key of type {} is not accepted: {KEYS_SIGNED}",
            oid_name(alg)
        )))
    }
}

/// The size in bits of an RSA modulus (a DER INTEGER's content: big-endian, maybe a
/// leading zero byte).
fn rsa_bits(modulus: &[u8]) -> Result<usize, CertError> {
    if modulus.first().is_none_or(|b| b & 0x80 != 0) {
        return Err(malformed("the request's RSA modulus is empty or negative"));
    }
    let skip = modulus.iter().take_while(|b| **b == 0).count();
    Ok(match modulus.get(skip..) {
        Some([top, rest @ ..]) => rest.len() * 8 + (8 - top.leading_zeros() as usize),
        _ => 0,
    })
}

/// Refuses signature algorithms other than those [`parse_node_csr`] names, and those
/// that do not fit the key.
fn check_signature_algorithm(key: KeyKind, alg: &AlgorithmIdentifier<'_>) -> Result<(), CertError> {
    let oid = &alg.algorithm;
    let fits = match key {
        KeyKind::Rsa { .. } => [
            OID_PKCS1_SHA256WITHRSA,
            OID_PKCS1_SHA384WITHRSA,
            OID_PKCS1_SHA512WITHRSA,
            OID_PKCS1_RSASSAPSS,
        ]
        .contains(oid),
        KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => {
            [OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384].contains(oid)
        }
        KeyKind::Ed25519 => *oid == OID_SIG_ED25519,
    };
    if fits {
        return Ok(());
    }
    Err(CertError::csr(
        CsrFault::BadSignature,
        format!(
            "the request is signed with {}, which is not accepted for its {key} key: sign it \
             with SHA-256 (e.g. `openssl req -new -sha256`)",
            oid_name(oid)
        ),
    ))
}

/// An OID's short name when x509-parser knows it (`sha1WithRSAEncryption`), else its
/// dotted form.
fn oid_name(oid: &Oid<'_>) -> String {
    x509_parser::objects::oid2sn(oid, x509_parser::objects::oid_registry())
        .map(str::to_string)
        .unwrap_or_else(|_| oid.to_id_string())
}

/// The subject's one CN, a valid node name.
fn subject_cn(subject: &X509Name<'_>) -> Result<String, CertError> {
    let bad = |msg: String| CertError::csr(CsrFault::Subject, msg);
    let cns: Vec<_> = subject.iter_common_name().collect();
    let cn = match cns.as_slice() {
        [cn] => cn,
        [] => return Err(bad("the subject has no CN (the node name)".into())),
        more => {
            return Err(bad(format!(
                "the subject has {} CNs: give exactly one, the node name",
                more.len()
            )))
        }
    };
    let name = cn
        .as_str()
        .map_err(|e| bad(format!("the subject CN is not a string: {e}")))?;
    twill_common::model::validate_node_name(name).map_err(|e| bad(format!("subject CN: {e}")))?;
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::X509Certificate;

    use super::*;
    use crate::ca::{new_ca, Ca, Validity};
    use crate::keys::{hex, key_sha256_of_cert_der, key_sha256_of_csr};

    /// `openssl req -new -newkey rsa:2048 -subj "/O=twill:nodes/CN=node-rsa" -sha256`;
    /// its key's SHA-256 from `openssl req -pubkey | openssl pkey -pubin -outform der`.
    const OPENSSL_RSA_2048: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIICbjCCAVYCAQAwKTEUMBIGA1UECgwLdHdpbGw6bm9kZXMxETAPBgNVBAMMCG5v
ZGUtcnNhMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA08XHN4T0C/af
zn4JrSLYZ2+R00DdaFSZmuI49L4eu9VgQbRU6rQIkx37tvMfBysXI1cFZNA16qnN
eKdUuN8A9D8jkgevvEfQuM9eRNaH6XotGuCEq0WBFGPm8/KfZos90JA2iot2Wdy/
fQj39gAH7GfWjt2PsFcAFdDQ5IQDkAGTu+bnKN+XJSw449VeED6btl9aCopAKG+Q
k1qYJt45y0ErcgAwjtgjplXMEHUb/DmpATaV9Xn18vRHAHyyFGjnGq/N+3unT4k+
CpvyNrfaaMiUSqxJ+d6e9oJdzKuz3DnEcw0pSd9N5oe0s0Iapp5IAJeasKE4mgPr
LJAcFAYjlwIDAQABoAAwDQYJKoZIhvcNAQELBQADggEBAK9NGqts4fKMK58ePmf3
No2BE45oPmJ4rFW6JeVWZ+Y23G6rPNmEOQOiF6LV4HPe2DE++JRD7Ytz2IR/TEbw
vI7vVbZowfAGzw4Fmi+2cfOPU/kCbuWLRrMRDUglthqLYCtXPV49LMgZ3OokAoqJ
DYLsP3UjGr8YGQprwZR33m25xC1hAGZusY0n55b/R/1JncakQisvSJxAdu3WAJkn
VKWB1c9QEEMXJhk+hTIzHcaGz7aKnaIvR/4Twh2cbbDfEzUhx5x84FOclwQTHjou
kS1xKxmoMP8ZHoi/xxtBq2gjYBbN5SNegvaTl7gbFz2qOqrpXxEHrBUnq5O19tzN
Stw=
-----END CERTIFICATE REQUEST-----
";
    const OPENSSL_RSA_2048_KEY_SHA256: &str =
        "2d5daf46033bf6595e4c12269602541565cde5d1d1cdcb50f23c73b34235b722";

    /// A P-256 key signed with SHA-384 (`openssl req -newkey ec -pkeyopt
    /// ec_paramgen_curve:P-256 -subj /CN=node-ec -sha384`): the curve comes from the key,
    /// not from the signature algorithm.
    const OPENSSL_P256_SHA384: &str = "-----BEGIN CERTIFICATE REQUEST-----
MIHLMHQCAQAwEjEQMA4GA1UEAwwHbm9kZS1lYzBZMBMGByqGSM49AgEGCCqGSM49
AwEHA0IABMhPEjII+DyCxVUptXycYptBJu2Da2eCJUhyGoEHkzVnBGFJWZDWY42e
dFzoUxKdI5vOVBVNpkjhPoJyfllC8UugADAKBggqhkjOPQQDAwNHADBEAiB3LPBa
dyGSSTiRpaVj1KX+dp6OUb4R5kbxkGukZgmXEAIgdD58fhiLGy7ju50we0+IW6/d
ocVOiXK0Xa/pYfJTCzM=
-----END CERTIFICATE REQUEST-----
";
    const OPENSSL_P256_SHA384_KEY_SHA256: &str =
        "de2b06867ba47f2511321f85a475e8b50664463f8dcc19a05ca4b6b452dc9446";

    fn test_ca() -> Ca {
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap()
    }

    fn agent_csr(node: &str) -> String {
        node_csr_pem(node, &generate_key().unwrap()).unwrap()
    }

    /// The fault and message of a refusal.
    fn refused(csr_pem: &str) -> (CsrFault, String) {
        match parse_node_csr(csr_pem) {
            Err(CertError::Csr { fault, msg }) => (fault, msg),
            other => panic!("not refused as a bad request: {other:?}"),
        }
    }

    fn assert_refused(csr_pem: &str, fault: CsrFault, words: &str) {
        let (f, msg) = refused(csr_pem);
        assert_eq!(f, fault, "{msg}");
        assert!(msg.contains(words), "{msg:?} does not say {words:?}");
    }

    fn pem(label: &str, der: &[u8]) -> String {
        let b64 = data_encoding::BASE64.encode(der);
        let mut out = format!("-----BEGIN {label}-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).unwrap());
            out.push('\n');
        }
        out.push_str(&format!("-----END {label}-----\n"));
        out
    }

    fn der_of(csr_pem: &str) -> Vec<u8> {
        csr_der(csr_pem).unwrap()
    }

    // A little DER, to make requests no tool would.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let n = content.len();
        if n < 0x80 {
            out.push(n as u8);
        } else {
            let len: Vec<u8> = n
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | len.len() as u8);
            out.extend(len);
        }
        out.extend_from_slice(content);
        out
    }
    fn seq(parts: &[Vec<u8>]) -> Vec<u8> {
        tlv(0x30, &parts.concat())
    }
    fn oid(arcs: &[u64]) -> Vec<u8> {
        let mut body = vec![(arcs[0] * 40 + arcs[1]) as u8];
        for &arc in &arcs[2..] {
            let mut groups = vec![(arc & 0x7f) as u8];
            let mut rest = arc >> 7;
            while rest > 0 {
                groups.push(0x80 | (rest & 0x7f) as u8);
                rest >>= 7;
            }
            body.extend(groups.iter().rev());
        }
        tlv(0x06, &body)
    }
    fn bits(content: &[u8]) -> Vec<u8> {
        tlv(0x03, &[&[0u8][..], content].concat())
    }
    const NULL: [u8; 2] = [0x05, 0x00];
    const RSA: &[u64] = &[1, 2, 840, 113_549, 1, 1, 1];
    const SHA256_RSA: &[u64] = &[1, 2, 840, 113_549, 1, 1, 11];
    const SHA1_RSA: &[u64] = &[1, 2, 840, 113_549, 1, 1, 5];
    const EC: &[u64] = &[1, 2, 840, 10_045, 2, 1];
    const ECDSA_SHA256: &[u64] = &[1, 2, 840, 10_045, 4, 3, 2];
    const P521: &[u64] = &[1, 3, 132, 0, 35];
    const DSA: &[u64] = &[1, 2, 840, 10_040, 4, 1];

    /// The SubjectPublicKeyInfo of an RSA key of `n` bits (not a real key).
    fn rsa_spki(n: usize, params: bool) -> Vec<u8> {
        let mut modulus = vec![0u8; n.div_ceil(8)];
        modulus[0] = 1 << ((n - 1) % 8);
        *modulus.last_mut().unwrap() |= 1;
        if modulus[0] & 0x80 != 0 {
            modulus.insert(0, 0);
        }
        let key = seq(&[tlv(0x02, &modulus), tlv(0x02, &[1, 0, 1])]);
        let alg = if params {
            seq(&[oid(RSA), NULL.to_vec()])
        } else {
            seq(&[oid(RSA)])
        };
        seq(&[alg, bits(&key)])
    }

    fn ec_spki(curve: &[u64]) -> Vec<u8> {
        let mut point = vec![4u8];
        point.extend([7u8; 64]);
        seq(&[seq(&[oid(EC), oid(curve)]), bits(&point)])
    }

    /// A request with these CNs, key and signature algorithm, and a signature of zeros.
    fn crafted(spki: Vec<u8>, cns: &[&str], sig_alg: Vec<u8>) -> String {
        let rdns: Vec<Vec<u8>> = cns
            .iter()
            .map(|cn| tlv(0x31, &seq(&[oid(&[2, 5, 4, 3]), tlv(0x0c, cn.as_bytes())])))
            .collect();
        let info = seq(&[tlv(0x02, &[0]), seq(&rdns), spki, vec![0xa0, 0x00]]);
        pem(
            "CERTIFICATE REQUEST",
            &seq(&[info, sig_alg, bits(&[0u8; 64])]),
        )
    }

    fn sha256_rsa() -> Vec<u8> {
        seq(&[oid(SHA256_RSA), NULL.to_vec()])
    }

    #[test]
    fn an_agents_request_is_parsed_once_and_signed_for_its_key() {
        let ca = test_ca();
        let key = generate_key().unwrap();
        let csr_pem = node_csr_pem("node-a", &key).unwrap();
        let csr = parse_node_csr(&csr_pem).unwrap();
        assert_eq!(csr.common_name, "node-a");
        assert_eq!(csr.key, KeyKind::EcdsaP256);
        assert_eq!(csr.key_sha256, spki_sha256(&key.subject_public_key_info()));
        let signed = ca.sign_node(&csr, Validity::days(1).unwrap()).unwrap();
        assert_eq!(signed.node, "node-a");
        assert_eq!(signed.key_sha256, csr.key_sha256);
        assert_eq!(
            key_sha256_of_cert_der(&signed.cert_der).unwrap(),
            csr.key_sha256
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&signed.cert_der).unwrap();
        assert_eq!(cert.raw_serial_as_string().replace(':', ""), signed.serial);
        assert!(node_csr_pem("bad name", &key).is_err());
    }

    #[test]
    fn only_the_cn_of_a_request_is_taken() {
        let ca = test_ca();
        let key = generate_key().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example.com".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "node-a");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "twill:admins");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let csr_pem = params.serialize_request(&key).unwrap().pem().unwrap();
        let signed = ca
            .sign_node(
                &parse_node_csr(&csr_pem).unwrap(),
                Validity::days(1).unwrap(),
            )
            .unwrap();
        let (_, cert) = X509Certificate::from_der(&signed.cert_der).unwrap();
        let orgs: Vec<&str> = cert
            .subject()
            .iter_organization()
            .map(|o| o.as_str().unwrap())
            .collect();
        assert_eq!(orgs, [NODES_GROUP]);
        assert!(cert.subject_alternative_name().unwrap().is_none());
        assert!(!cert.is_ca());
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
    }

    #[test]
    fn requests_from_other_tools_and_key_kinds_are_signed() {
        let ca = test_ca();
        let v = Validity::days(1).unwrap();
        for (text, kind, node, key_sha256) in [
            (
                OPENSSL_RSA_2048,
                KeyKind::Rsa { bits: 2048 },
                "node-rsa",
                OPENSSL_RSA_2048_KEY_SHA256,
            ),
            (
                OPENSSL_P256_SHA384,
                KeyKind::EcdsaP256,
                "node-ec",
                OPENSSL_P256_SHA384_KEY_SHA256,
            ),
        ] {
            let csr = parse_node_csr(text).unwrap();
            assert_eq!((csr.key, csr.common_name.as_str()), (kind, node));
            assert_eq!(hex(&csr.key_sha256), key_sha256);
            assert_eq!(hex(&key_sha256_of_csr(text).unwrap()), key_sha256);
            let signed = ca.sign_node(&csr, v).unwrap();
            assert_eq!(
                hex(&key_sha256_of_cert_der(&signed.cert_der).unwrap()),
                key_sha256
            );
        }
        for (alg, kind) in [
            (&PKCS_ECDSA_P384_SHA384, KeyKind::EcdsaP384),
            (&PKCS_ED25519, KeyKind::Ed25519),
        ] {
            let key = KeyPair::generate_for(alg).unwrap();
            let text = node_csr_pem("node-b", &key).unwrap();
            let csr = parse_node_csr(&text).unwrap();
            assert_eq!(csr.key, kind);
            let signed = ca.sign_node(&csr, v).unwrap();
            assert_eq!(
                key_sha256_of_cert_der(&signed.cert_der).unwrap(),
                spki_sha256(&key.subject_public_key_info())
            );
        }
    }

    #[test]
    fn whitespace_around_the_block_and_the_old_label_are_fine() {
        let text = agent_csr("node-a");
        for ok in [
            format!("\n\n  {text}\n\t\n"),
            text.replace('\n', "\r\n"),
            text.replace("CERTIFICATE REQUEST", "NEW CERTIFICATE REQUEST"),
            text.trim_end().to_string(),
        ] {
            assert_eq!(parse_node_csr(&ok).unwrap().common_name, "node-a", "{ok:?}");
        }
    }

    #[test]
    fn anything_but_one_request_block_is_refused() {
        use CsrFault::Malformed;
        let text = agent_csr("node-a");
        let other = agent_csr("node-b");
        let der = der_of(&text);
        assert_refused("", Malformed, "empty");
        assert_refused(" \n\t", Malformed, "empty");
        assert_refused("node-a", Malformed, "no PEM block");
        assert_refused(
            &format!("hello\n{text}"),
            Malformed,
            "text before the PEM block",
        );
        assert_refused(
            &text.replacen("REQUEST-----", "REQUEST", 1),
            Malformed,
            "is no \"-----BEGIN CERTIFICATE REQUEST-----\" line",
        );
        assert_refused(
            &format!("{text}bye\n"),
            Malformed,
            "text after the PEM block",
        );
        assert_refused(&format!("{text}{other}"), Malformed, "a second PEM block");
        assert_refused(&format!("{text}\n{text}"), Malformed, "a second PEM block");
        assert_refused(
            &pem("CERTIFICATE", &der),
            Malformed,
            "\"CERTIFICATE\", not a \"CERTIFICATE REQUEST\"",
        );
        assert_refused(
            &text.replace(
                "-----END CERTIFICATE REQUEST-----",
                "-----END CERTIFICATE-----",
            ),
            Malformed,
            "\"-----END CERTIFICATE REQUEST-----\" line belongs",
        );
        let cut: String = text.lines().take(3).map(|l| format!("{l}\n")).collect();
        assert_refused(
            &cut,
            Malformed,
            "no \"-----END CERTIFICATE REQUEST-----\" line",
        );
        let headers = text.replacen('\n', "\nProc-Type: 4,ENCRYPTED\n\n", 1);
        assert_refused(&headers, Malformed, "line 2 of the PEM block is not base64");
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines[1].insert(10, ' ');
        assert_refused(&lines.join("\n"), Malformed, "not base64");
        lines[1].remove(10);
        lines[1].pop();
        assert_refused(&lines.join("\n"), Malformed, "base64 does not decode");
        assert_refused(&pem("CERTIFICATE REQUEST", &[]), Malformed, "empty");
        assert_refused(
            &pem("CERTIFICATE REQUEST", b"not DER at all"),
            Malformed,
            "no PKCS#10 certificate request",
        );
        let long = format!("{text}{}", " ".repeat(MAX_CSR_PEM_LEN));
        assert_refused(&long, Malformed, "more than the 16384");
    }

    #[test]
    fn bytes_after_the_request_inside_the_block_are_refused() {
        let der = der_of(&agent_csr("node-a"));
        for tail in [&[0u8][..], &[0, 0], b"garbage", &der] {
            let padded = pem("CERTIFICATE REQUEST", &[&der[..], tail].concat());
            assert_refused(
                &padded,
                CsrFault::Malformed,
                &format!("{} bytes follow the request", tail.len()),
            );
            assert!(matches!(
                key_sha256_of_csr(&padded),
                Err(CertError::Csr {
                    fault: CsrFault::Malformed,
                    ..
                })
            ));
        }
    }

    #[test]
    fn rsa_keys_must_be_2048_to_4096_bits() {
        use CsrFault::{BadSignature, WeakKey};
        for n in [512, 1024, 2047] {
            let csr = crafted(rsa_spki(n, true), &["node-a"], sha256_rsa());
            assert_refused(
                &csr,
                WeakKey,
                &format!("an RSA key of {n} bits is too weak"),
            );
        }
        for n in [4097, 8192, 16384] {
            let csr = crafted(rsa_spki(n, true), &["node-a"], sha256_rsa());
            assert_refused(&csr, WeakKey, &format!("an RSA key of {n} bits is larger"));
        }
        // In range: refused only for the signature of zeros, checked last.
        for n in [2048, 3072, 4096] {
            let csr = crafted(rsa_spki(n, true), &["node-a"], sha256_rsa());
            assert_refused(&csr, BadSignature, "does not verify");
        }
    }

    #[test]
    fn other_kinds_of_key_are_refused() {
        use CsrFault::{Malformed, WeakKey};
        let dsa = seq(&[seq(&[oid(DSA)]), bits(&tlv(0x02, &[1; 128]))]);
        assert_refused(
            &crafted(dsa, &["n"], sha256_rsa()),
            WeakKey,
            "a key of type",
        );
        let ecdsa = seq(&[oid(ECDSA_SHA256)]);
        assert_refused(
            &crafted(ec_spki(P521), &["n"], ecdsa.clone()),
            WeakKey,
            "secp521r1 is not accepted",
        );
        let unnamed = seq(&[seq(&[oid(EC)]), bits(&[4u8; 65])]);
        assert_refused(
            &crafted(unnamed, &["n"], ecdsa),
            WeakKey,
            "without a named curve",
        );
        // rsaEncryption without its NULL parameters: the certificate would carry the key
        // in another form, under another hash.
        assert_refused(
            &crafted(rsa_spki(2048, false), &["n"], sha256_rsa()),
            Malformed,
            "not in its usual DER form",
        );
    }

    #[test]
    fn the_subject_must_have_one_cn_that_is_a_node_name() {
        use CsrFault::Subject;
        let spki = || rsa_spki(2048, true);
        assert_refused(&crafted(spki(), &[], sha256_rsa()), Subject, "no CN");
        assert_refused(
            &crafted(spki(), &["node-a", "node-b"], sha256_rsa()),
            Subject,
            "2 CNs",
        );
        assert_refused(
            &crafted(spki(), &["bad name"], sha256_rsa()),
            Subject,
            "subject CN",
        );
        assert_refused(&crafted(spki(), &[""], sha256_rsa()), Subject, "subject CN");
        let key = generate_key().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, NODES_GROUP);
        let no_cn = params.serialize_request(&key).unwrap().pem().unwrap();
        assert_refused(&no_cn, Subject, "no CN");
    }

    #[test]
    fn signatures_must_verify_with_an_accepted_algorithm() {
        use CsrFault::BadSignature;
        let sha1 = seq(&[oid(SHA1_RSA), NULL.to_vec()]);
        assert_refused(
            &crafted(rsa_spki(2048, true), &["n"], sha1),
            BadSignature,
            "signed with sha1WithRSAEncryption, which is not accepted for its RSA 2048 key",
        );
        assert_refused(
            &crafted(rsa_spki(2048, true), &["n"], seq(&[oid(ECDSA_SHA256)])),
            BadSignature,
            "not accepted for its RSA 2048 key",
        );
        // A real request with one bit of its signature flipped.
        let mut flipped = der_of(&agent_csr("node-a"));
        *flipped.last_mut().unwrap() ^= 1;
        assert_refused(
            &pem("CERTIFICATE REQUEST", &flipped),
            BadSignature,
            "does not verify",
        );
        // Or its subject changed after signing.
        let mut der = der_of(&agent_csr("node-a"));
        let at = der.windows(6).position(|w| w == b"node-a").unwrap();
        der[at + 5] = b'b';
        let text = pem("CERTIFICATE REQUEST", &der);
        assert_refused(&text, BadSignature, "does not verify");
        // The message is what the controller's client sees.
        let err = parse_node_csr(&pem("CERTIFICATE REQUEST", &flipped)).unwrap_err();
        assert!(err.to_string().starts_with("csr_pem: "), "{err}");
    }
}

//! Twill's certificates, laid out as docs/compatibility.md (Certificates and roles) says:
//! the CA, the controller's certificate and node / admin client certificates
//! (`twillctl certs`), certificate signing requests checked and signed for nodes (the
//! controller's `IdentityService`), and the SHA-256 of a certificate's or a request's
//! public key, which ties a lease to the key that took it.
//!
//! * CA: `CN=twill-ca`, basic constraints `CA:TRUE`, key usages keyCertSign + cRLSign.
//! * controller: `CN=twill-controller, O=twill:controllers`, subjectAltName with the DNS
//!   names / IPs agents dial, extended key usage serverAuth; a replica's certificate
//!   (several controllers on etcd) also clientAuth, since replicas call each other.
//! * node: `CN=<node name>, O=twill:nodes`, extended key usage clientAuth.
//! * admin: `CN=<user>, O=twill:admins`, extended key usage clientAuth.
//!
//! Keys made here are ECDSA P-256 in PKCS#8 PEM (`PRIVATE KEY`), which rustls, openssl
//! and Go all read. Key files are created with mode 0600, certificates with 0644; the
//! crate does no other I/O.
//!
//! A request is checked before anything costly is done with it ([`parse_node_csr`]):
//! one PEM block and nothing else, one PKCS#10 request and nothing after it, a key Twill
//! signs (RSA of 2048 to 4096 bits, ECDSA P-256 or P-384, Ed25519), one CN that is a
//! valid node name, and only then its signature.

mod ca;
mod csr;
mod error;
mod files;
mod keys;

pub use ca::{
    chains_to, new_ca, pem_blocks, rfc3339, Ca, Issued, Role, SignedNode, Validity, BACKDATE,
    CA_COMMON_NAME, CONTROLLER_COMMON_NAME, DEFAULT_CA_DAYS, DEFAULT_LEAF_DAYS,
};
pub use csr::{
    generate_key, node_csr_pem, parse_node_csr, KeyKind, NodeCsr, CSR_LABELS, MAX_CSR_PEM_LEN,
    MAX_RSA_BITS, MIN_RSA_BITS,
};
pub use error::{CertError, CsrFault};
pub use files::{write_file, write_pair, Written, CA_CERT_FILE, CA_KEY_FILE, CERT_MODE, KEY_MODE};
pub use keys::{hex, spki_sha256, unhex};

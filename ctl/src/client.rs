//! Connecting to the controller's admin API over mutual TLS.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use thiserror::Error;
use tonic::transport::{Channel, Endpoint};
use twill_common::networks::NetworkName;
use twill_common::tls::ClientPem;
use twill_proto::admin_service_client::AdminServiceClient;
use twill_proto::{
    BootstrapToken, CheckAddressesRequest, CreateTokenRequest, CreateTokenResponse,
    DeleteTokenRequest, GetConfigRequest, GetConfigResponse, GetLeaseRequest, IssuedCertificate,
    Lease, ListAddressUsageRequest, ListAdminNetworksRequest, ListIssuedCertificatesRequest,
    ListLeasesRequest, ListLeasesResponse, ListPodsRequest, ListReservationsRequest,
    ListTokensRequest, NetworkInfo, PodAddressFinding, PodAddressUsage, PodAttachment,
    ReleaseLeakedRequest, Reservation, ReserveRequest, RevokeLeaseRequest, StatusRequest,
    StatusResponse, UnreserveRequest, WatchRequest, WatchResponse,
};

/// Leases asked for per ListLeases call when listing the whole table.
pub const PAGE_SIZE: u32 = 500;

/// The longest lifetime `twillctl token create --ttl` accepts: a year (humantime's
/// `1y`, 365.25 days). Bootstrap tokens are meant to live hours or days.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(31_557_600);

/// Parses `--ttl` of `token create`: a humantime duration of at least one second and at
/// most [`MAX_TOKEN_TTL`] (zero would mean the controller's default, which the flag's
/// default states explicitly instead). Sub-second parts are dropped.
pub fn parse_token_ttl(s: &str) -> Result<Duration, String> {
    let d = twill_common::parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero: a token must live at least 1s (the default is 24h)"
        ));
    }
    if d < Duration::from_secs(1) {
        return Err(format!(
            "{s:?} is under a second: a token must live at least 1s (the default is 24h)"
        ));
    }
    if d > MAX_TOKEN_TTL {
        return Err(format!(
            "{s:?} is longer than a year: bootstrap tokens are meant to be short-lived \
             (at most 1y; e.g. 1h, 24h, 7d)"
        ));
    }
    Ok(Duration::from_secs(d.as_secs()))
}

/// Parses `--node` of `token create`: a node name the token may bootstrap, checked as
/// the controller will (letters, digits, '-', '.', '_'; at most 253 characters).
pub fn parse_token_node(s: &str) -> Result<String, String> {
    twill_common::model::validate_node_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Parses `--node-prefix` of `token create`: the start of the node names the token may
/// bootstrap, made of the characters of a node name; empty is refused (leave the flag
/// out to allow any name).
pub fn parse_token_node_prefix(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err(
            "the prefix is empty: leave --node-prefix out to let the token bootstrap any name"
                .to_string(),
        );
    }
    twill_common::model::validate_node_name(s)
        .map_err(|e| e.to_string().replacen("node name", "prefix", 1))?;
    Ok(s.to_string())
}

/// Parses `--uses` of `token create`: how many certificates the token may be exchanged
/// for, at least 1 (leaving the flag out means no limit).
pub fn parse_token_uses(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err(
            "0 uses would make a token that can never be used: give 1 or more, or leave \
             --uses out for no limit"
                .to_string(),
        ),
        Ok(n) => Ok(n),
        Err(_) => Err(format!(
            "{s:?} is not a number of uses (1 to {}); leave --uses out for no limit",
            u32::MAX
        )),
    }
}

/// Why a call to the controller failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The flags do not describe a usable connection (bad URL, unreadable PEM file).
    #[error("{0}")]
    Config(String),
    /// No connection could be made (refused, TLS handshake failed, timeout).
    #[error("cannot connect to {url}: {}", error_chain(.cause))]
    Connect {
        /// The controller URL.
        url: String,
        /// The transport error (its chain of causes is part of the message).
        cause: tonic::transport::Error,
    },
    /// The controller answered with a gRPC error.
    #[error("{}", status_message(.0))]
    Status(tonic::Status),
    /// The controller answers calls without a network name only: it predates several
    /// networks, and would act on the default network whatever `--network` says.
    #[error(
        "the controller at {url} does not know several networks (ListNetworks is \
         UNIMPLEMENTED): it serves only the default network; upgrade it, or leave \
         --network out"
    )]
    NetworksUnsupported {
        /// The controller URL.
        url: String,
    },
    /// The controller serves no network of that name.
    #[error(
        "NOT_FOUND: the controller serves no network {name:?} (it serves: {}); see \
         `twillctl networks`",
        .known.join(", ")
    )]
    UnknownNetwork {
        /// The name asked for.
        name: String,
        /// The networks the controller serves.
        known: Vec<String>,
    },
    /// The connection broke during the call, which with TLS 1.3 is how a refused client
    /// certificate shows: the client finishes its handshake before the server has
    /// checked the certificate.
    #[error("{}: the controller closed the connection: {hint}", status_message(.status))]
    Refused {
        /// The transport failure.
        status: tonic::Status,
        /// What is probably wrong, from a look at the client certificate.
        hint: String,
    },
}

/// How to reach and authenticate to the controller.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The controller's URL, `https://HOST:PORT` (HOST may be an IP address).
    pub controller: String,
    /// Client certificate (PEM).
    pub tls_cert: PathBuf,
    /// Client certificate's private key (PEM).
    pub tls_key: PathBuf,
    /// CA certificate (PEM) the controller's certificate must chain to.
    pub tls_ca: PathBuf,
    /// Name to check the controller's certificate against instead of the URL's host.
    pub tls_server_name: Option<String>,
    /// Time limit for connecting and for each call.
    pub timeout: Duration,
}

/// An error and its causes joined by `: `, skipping causes already quoted by their parent.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `out` followed by the causes from `cur` on, those it does not quote already.
fn with_causes(mut out: String, mut cur: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(s) = cur {
        let msg = s.to_string();
        if !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cur = s.source();
    }
    out
}

/// `CODE_NAME: message`, followed by the status's causes (transport failures carry the
/// TLS alert that explains them there).
///
/// With TLS 1.3 the client finishes its handshake before the controller has checked the
/// client certificate, so a refused certificate shows up as a connection torn down
/// during the first call; such errors get a hint saying so.
pub fn status_message(s: &tonic::Status) -> String {
    with_causes(
        format!("{}: {}", code_name(s.code()), s.message()),
        std::error::Error::source(s),
    )
}

/// True for a status made on our side because the connection broke (it carries a
/// transport error as its source), as opposed to one the controller sent.
pub fn is_transport_failure(s: &tonic::Status) -> bool {
    std::error::Error::source(s).is_some()
        && matches!(
            s.code(),
            tonic::Code::Unknown | tonic::Code::Unavailable | tonic::Code::Cancelled
        )
}

/// Why the controller probably refused the client certificate in `pem`, judged locally.
pub fn diagnose_client_cert(pem: &[u8], path: &Path, now: SystemTime) -> String {
    use x509_parser::prelude::*;
    let cert = format!("the client certificate --tls-cert {}", path.display());
    let generic = format!(
        "it probably refused {cert}; check that it was signed by the CA the controller trusts \
         (its --tls-client-ca)"
    );
    let der = twill_pki::pem_blocks(pem, "CERTIFICATE").unwrap_or_default();
    let Some(Ok((_, parsed))) = der.first().map(|d| X509Certificate::from_der(d)) else {
        return generic;
    };
    let now = twill_common::unix_secs(now);
    let v = parsed.validity();
    if v.not_after.timestamp() < now {
        return format!("{cert} expired at {}", v.not_after);
    }
    if v.not_before.timestamp() > now {
        return format!("{cert} is not valid before {}", v.not_before);
    }
    if let Ok(Some(eku)) = parsed.extended_key_usage() {
        if !eku.value.client_auth && !eku.value.any {
            return format!("{cert} lacks extended key usage clientAuth");
        }
    }
    generic
}

/// A connection to the admin API. Every call's failure goes through [`Admin::fail`], so a
/// connection torn down by the controller is reported as a probable refusal of the client
/// certificate, with a diagnosis.
pub struct Admin {
    client: AdminServiceClient<Channel>,
    opts: ConnectOptions,
}

impl Admin {
    /// Checks the URL and reads the PEM files, then connects (TLS handshake included).
    pub async fn connect(opts: &ConnectOptions) -> Result<Admin, ClientError> {
        let url = opts.controller.trim();
        if !url.contains("://") {
            return Err(ClientError::Config(format!(
                "--controller {url:?} has no scheme: use https://{url}"
            )));
        }
        if !url.starts_with("https://") {
            return Err(ClientError::Config(format!(
                "--controller {url:?} must be an https:// URL: the controller only speaks mutual TLS"
            )));
        }
        let pem = ClientPem::read(&opts.tls_cert, &opts.tls_key, &opts.tls_ca)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        let mut tls = pem.client_tls().timeout(opts.timeout);
        if let Some(name) = &opts.tls_server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| {
                ClientError::Config(format!("--controller {url:?} is not a valid URL: {e}"))
            })?
            .tls_config(tls)
            .map_err(|e| ClientError::Config(format!("TLS configuration: {}", error_chain(&e))))?
            .connect_timeout(opts.timeout)
            .timeout(opts.timeout);
        let channel = endpoint
            .connect()
            .await
            .map_err(|cause| ClientError::Connect {
                url: url.to_string(),
                cause,
            })?;
        Ok(Admin {
            client: AdminServiceClient::new(channel),
            opts: opts.clone(),
        })
    }

    /// Turns a failed call's status into the error to report.
    pub fn fail(&self, status: tonic::Status) -> ClientError {
        failure(&self.opts, status)
    }

    /// Every lease of `network` matching `prefix` and `subnet` (empty: all), fetched
    /// `page_size` at a time until the controller returns an empty `next_page_token`.
    /// The revision returned is the one of the first page.
    pub async fn list_all_leases(
        &mut self,
        network: &NetworkName,
        prefix: &str,
        subnet: &str,
        page_size: u32,
    ) -> Result<ListLeasesResponse, ClientError> {
        let mut all = ListLeasesResponse::default();
        let mut token = String::new();
        for page in 0.. {
            let req = ListLeasesRequest {
                node_prefix: prefix.to_string(),
                subnet: subnet.to_string(),
                page_size,
                page_token: token.clone(),
                network: network.wire().to_string(),
            };
            let resp = answer(&self.opts, self.client.list_leases(req).await)?;
            if page == 0 {
                all.revision = resp.revision;
            }
            all.leases.extend(resp.leases);
            match next_page(&token, resp.next_page_token)? {
                Some(next) => token = next,
                None => return Ok(all),
            }
        }
        Ok(all)
    }

    /// `AdminService/GetLease`: `node`'s lease in `network`.
    pub async fn get_lease(
        &mut self,
        network: &NetworkName,
        node: &str,
    ) -> Result<Lease, ClientError> {
        let req = GetLeaseRequest {
            node_name: node.to_string(),
            network: network.wire().to_string(),
        };
        answer(&self.opts, self.client.get_lease(req).await)
    }

    /// `AdminService/RevokeLease`: `node`'s lease in `network` as it was before it was
    /// removed.
    pub async fn revoke_lease(
        &mut self,
        network: &NetworkName,
        node: &str,
    ) -> Result<Lease, ClientError> {
        let req = RevokeLeaseRequest {
            node_name: node.to_string(),
            network: network.wire().to_string(),
        };
        let r = answer(&self.opts, self.client.revoke_lease(req).await)?;
        Ok(r.lease.unwrap_or_else(|| Lease {
            node_name: node.to_string(),
            network: network.wire().to_string(),
            ..Default::default()
        }))
    }

    /// `AdminService/Reserve`: `subnet` (IPv4) and `ipv6_subnet` of `network`, either
    /// may be empty.
    pub async fn reserve(
        &mut self,
        network: &NetworkName,
        node: &str,
        subnet: &str,
        ipv6_subnet: &str,
    ) -> Result<Reservation, ClientError> {
        let req = ReserveRequest {
            node_name: node.to_string(),
            subnet: subnet.to_string(),
            ipv6_subnet: ipv6_subnet.to_string(),
            network: network.wire().to_string(),
        };
        let r = answer(&self.opts, self.client.reserve(req).await)?;
        Ok(r.reservation.unwrap_or_else(|| Reservation {
            node_name: node.to_string(),
            subnet: subnet.to_string(),
            ipv6_subnet: ipv6_subnet.to_string(),
            network: network.wire().to_string(),
            ..Default::default()
        }))
    }

    /// `AdminService/Unreserve`: `node`'s reservation in `network`, which was dropped.
    pub async fn unreserve(
        &mut self,
        network: &NetworkName,
        node: &str,
    ) -> Result<Reservation, ClientError> {
        let req = UnreserveRequest {
            node_name: node.to_string(),
            network: network.wire().to_string(),
        };
        let r = answer(&self.opts, self.client.unreserve(req).await)?;
        Ok(r.reservation.unwrap_or_else(|| Reservation {
            node_name: node.to_string(),
            network: network.wire().to_string(),
            ..Default::default()
        }))
    }

    /// `AdminService/ListReservations`: those of `network`.
    pub async fn list_reservations(
        &mut self,
        network: &NetworkName,
    ) -> Result<Vec<Reservation>, ClientError> {
        let req = ListReservationsRequest {
            network: network.wire().to_string(),
        };
        answer(&self.opts, self.client.list_reservations(req).await).map(|r| r.reservations)
    }

    /// `AdminService/GetConfig`: `network`'s configuration.
    pub async fn get_config(
        &mut self,
        network: &NetworkName,
    ) -> Result<GetConfigResponse, ClientError> {
        let req = GetConfigRequest {
            network: network.wire().to_string(),
        };
        answer(&self.opts, self.client.get_config(req).await)
    }

    /// `AdminService/ListPods`: the pods of `node` (empty: every node) in `network`
    /// (empty: every network).
    pub async fn list_pods(
        &mut self,
        node: &str,
        network: &str,
    ) -> Result<Vec<PodAttachment>, ClientError> {
        let req = ListPodsRequest {
            node_name: node.to_string(),
            network: network.to_string(),
        };
        answer(&self.opts, self.client.list_pods(req).await).map(|r| r.pods)
    }

    /// `AdminService/CheckAddresses`: leaks, conflicts and duplicates of `node` (empty:
    /// every node) in `network` (empty: every network).
    pub async fn check_addresses(
        &mut self,
        node: &str,
        network: &str,
    ) -> Result<Vec<PodAddressFinding>, ClientError> {
        let req = CheckAddressesRequest {
            node_name: node.to_string(),
            network: network.to_string(),
        };
        answer(&self.opts, self.client.check_addresses(req).await).map(|r| r.findings)
    }

    /// `AdminService/ReleaseLeaked`: asks the agents of `node` (empty: every node) to
    /// release the addresses they reported leaked in `network` (empty: every network);
    /// what was asked.
    pub async fn release_leaked(
        &mut self,
        node: &str,
        network: &str,
    ) -> Result<Vec<PodAddressFinding>, ClientError> {
        let req = ReleaseLeakedRequest {
            node_name: node.to_string(),
            network: network.to_string(),
        };
        answer(&self.opts, self.client.release_leaked(req).await).map(|r| r.asked)
    }

    /// `AdminService/ListAddressUsage`: per subnet of `node` (empty: every node) in
    /// `network` (empty: every network), the addresses used and usable, fullest first.
    pub async fn list_address_usage(
        &mut self,
        node: &str,
        network: &str,
    ) -> Result<Vec<PodAddressUsage>, ClientError> {
        let req = ListAddressUsageRequest {
            node_name: node.to_string(),
            network: network.to_string(),
        };
        answer(&self.opts, self.client.list_address_usage(req).await).map(|r| r.usage)
    }

    /// `AdminService/ListNetworks`: every network the controller serves, by name. A
    /// controller that predates several networks is [`ClientError::NetworksUnsupported`].
    pub async fn list_networks(&mut self) -> Result<Vec<NetworkInfo>, ClientError> {
        match self.client.list_networks(ListAdminNetworksRequest {}).await {
            Ok(r) => Ok(r.into_inner().networks),
            Err(s) if s.code() == tonic::Code::Unimplemented => {
                Err(ClientError::NetworksUnsupported {
                    url: self.opts.controller.clone(),
                })
            }
            Err(s) => Err(self.fail(s)),
        }
    }

    /// Makes sure the controller serves each of `networks` before a call names them.
    /// A controller that predates several networks ignores the network field and would
    /// answer for (or change) the default network instead, so any other name is checked
    /// first; naming only `default` costs no call and works with every controller.
    pub async fn ensure_networks(&mut self, networks: &[NetworkName]) -> Result<(), ClientError> {
        if networks.iter().all(NetworkName::is_default) {
            return Ok(());
        }
        let served = self.list_networks().await?;
        for n in networks {
            if !served.iter().any(|s| s.name == n.as_str()) {
                return Err(ClientError::UnknownNetwork {
                    name: n.to_string(),
                    known: served.iter().map(|s| s.name.clone()).collect(),
                });
            }
        }
        Ok(())
    }

    /// `AdminService/Status`.
    pub async fn status(&mut self, network: &NetworkName) -> Result<StatusResponse, ClientError> {
        let req = StatusRequest {
            network: network.wire().to_string(),
            ..Default::default()
        };
        answer(&self.opts, self.client.status(req).await)
    }

    /// `AdminService/CreateToken`: a bootstrap token living `req.ttl_seconds` (0: the
    /// controller's default, 24 hours), for the node names `req.nodes` and those
    /// starting with `req.node_prefix` (neither: any name), `req.max_uses` times (0: no
    /// limit). The response's `token` is the only copy of the secret; the controller
    /// keeps a hash of it.
    pub async fn create_token(
        &mut self,
        req: CreateTokenRequest,
    ) -> Result<CreateTokenResponse, ClientError> {
        answer(&self.opts, self.client.create_token(req).await)
    }

    /// `AdminService/ListTokens`: the bootstrap tokens that have not expired, ordered by
    /// id (never their secrets).
    pub async fn list_tokens(&mut self) -> Result<Vec<BootstrapToken>, ClientError> {
        answer(
            &self.opts,
            self.client.list_tokens(ListTokensRequest {}).await,
        )
        .map(|r| r.tokens)
    }

    /// `AdminService/DeleteToken`: `id` is the token's id (a whole `id.secret` token is
    /// accepted too). NOT_FOUND when the controller knows no such token.
    pub async fn delete_token(&mut self, id: &str) -> Result<(), ClientError> {
        let req = DeleteTokenRequest { id: id.to_string() };
        answer(&self.opts, self.client.delete_token(req).await).map(drop)
    }

    /// `AdminService/RevokeNodeCertificates` for `name`'s certificates of `role`
    /// (`"node"` or `"admin"`): when the revocation took effect (Unix).
    pub async fn revoke_node_certificates(
        &mut self,
        name: &str,
        role: &str,
    ) -> Result<i64, ClientError> {
        let req = twill_proto::RevokeNodeCertificatesRequest {
            node_name: name.to_string(),
            role: role.to_string(),
        };
        answer(&self.opts, self.client.revoke_node_certificates(req).await)
            .map(|r| r.revoked_at_unix)
    }

    /// `AdminService/ListIssuedCertificates`: every node certificate the controller has
    /// signed and still keeps a record of, oldest first, fetched `page_size` at a time
    /// (0: the controller's default) until it returns an empty `next_page_token`.
    pub async fn list_issued_certificates(
        &mut self,
        page_size: u32,
    ) -> Result<Vec<IssuedCertificate>, ClientError> {
        let mut all = Vec::new();
        let mut token = String::new();
        loop {
            let req = ListIssuedCertificatesRequest {
                page_size,
                page_token: token.clone(),
            };
            let resp = answer(&self.opts, self.client.list_issued_certificates(req).await)?;
            all.extend(resp.certificates);
            match next_page(&token, resp.next_page_token)? {
                Some(next) => token = next,
                None => return Ok(all),
            }
        }
    }

    /// `AdminService/Watch` of `networks` after `from_revision` (0: the full table
    /// first). Read the stream with [`tonic::Streaming::message`]; pass its errors to
    /// [`Admin::fail`].
    pub async fn watch(
        &mut self,
        networks: &[NetworkName],
        from_revision: u64,
    ) -> Result<tonic::Streaming<WatchResponse>, ClientError> {
        let req = WatchRequest {
            from_revision,
            epoch: String::new(),
            networks: watch_networks(networks),
        };
        answer(&self.opts, self.client.watch(req).await)
    }
}

/// See [`Admin::fail`] (a function of the options, so that a call on the client can be
/// passed to [`answer`] beside them).
fn failure(opts: &ConnectOptions, status: tonic::Status) -> ClientError {
    if is_transport_failure(&status) {
        let pem = std::fs::read(&opts.tls_cert).unwrap_or_default();
        ClientError::Refused {
            status,
            hint: diagnose_client_cert(&pem, &opts.tls_cert, SystemTime::now()),
        }
    } else {
        ClientError::Status(status)
    }
}

/// A call's answer, or its failure as [`Admin::fail`] reports it.
fn answer<T>(
    opts: &ConnectOptions,
    r: Result<tonic::Response<T>, tonic::Status>,
) -> Result<T, ClientError> {
    r.map(tonic::Response::into_inner)
        .map_err(|s| failure(opts, s))
}

/// The page token to ask with next, `None` after the last page; a controller handing back
/// the token just used would have the listing loop forever.
fn next_page(used: &str, next: String) -> Result<Option<String>, ClientError> {
    if next == used && !next.is_empty() {
        return Err(ClientError::Config(format!(
            "the controller returned the same page token {used:?} twice"
        )));
    }
    Ok(Some(next).filter(|t| !t.is_empty()))
}

/// `WatchRequest.networks` for `networks`: empty when only `default` is asked for, so
/// the request is the one controllers before several networks understand; otherwise
/// every name spelled out (an empty entry beside others would be ambiguous).
pub fn watch_networks(networks: &[NetworkName]) -> Vec<String> {
    if networks.iter().all(NetworkName::is_default) {
        return Vec::new();
    }
    let names: std::collections::BTreeSet<_> = networks.iter().map(|n| n.to_string()).collect();
    names.into_iter().collect()
}

/// The canonical name of a gRPC status code, e.g. `PERMISSION_DENIED`.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diagnosis_names_expiry() {
        use crate::certs::{new_ca, Ca, Role, Validity};
        let ca = new_ca(Validity::days(1).unwrap()).unwrap();
        let ca = Ca::from_pem(&ca.cert_pem, &ca.key_pem).unwrap();
        let now = SystemTime::now();
        let old = ca
            .issue(
                &Role::Admin("a".into()),
                Validity {
                    not_before: now - Duration::from_secs(7200),
                    not_after: now - Duration::from_secs(3600),
                },
            )
            .unwrap();
        let p = Path::new("a.crt");
        let d = diagnose_client_cert(old.cert_pem.as_bytes(), p, now);
        assert!(d.contains("a.crt expired at"), "{d}");
        let good = ca
            .issue(&Role::Admin("a".into()), Validity::days(1).unwrap())
            .unwrap();
        let d = diagnose_client_cert(good.cert_pem.as_bytes(), p, now);
        assert!(d.contains("signed by the CA the controller trusts"), "{d}");
        // A certificate for serving only: a single controller's (`certs issue
        // controller` without --replica).
        let server = ca
            .issue(
                &Role::Controller {
                    dns: vec!["x".into()],
                    ips: vec![],
                    replica: false,
                },
                Validity::days(1).unwrap(),
            )
            .unwrap();
        let d = diagnose_client_cert(server.cert_pem.as_bytes(), p, now);
        assert!(d.contains("lacks extended key usage clientAuth"), "{d}");
    }

    #[test]
    fn token_ttl_bounds() {
        assert_eq!(parse_token_ttl("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_token_ttl("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_token_ttl("1y"), Ok(MAX_TOKEN_TTL));
        assert_eq!(
            parse_token_ttl("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(parse_token_ttl("90s 500ms"), Ok(Duration::from_secs(90)));
        let zero = parse_token_ttl("0s").unwrap_err();
        assert!(zero.contains("is zero"), "{zero}");
        let tiny = parse_token_ttl("500ms").unwrap_err();
        assert!(tiny.contains("under a second"), "{tiny}");
        let long = parse_token_ttl("2y").unwrap_err();
        assert!(long.contains("longer than a year"), "{long}");
        assert!(parse_token_ttl("366d").is_err());
        let bad = parse_token_ttl("soon").unwrap_err();
        assert!(bad.contains("invalid duration"), "{bad}");
    }

    #[test]
    fn token_bindings_are_checked_before_the_call() {
        assert_eq!(parse_token_node("worker-1"), Ok("worker-1".to_string()));
        for bad in ["", "a/b", "two words"] {
            assert!(parse_token_node(bad).is_err(), "{bad:?}");
        }
        assert!(parse_token_node(&"n".repeat(254)).is_err());
        assert_eq!(
            parse_token_node_prefix("worker-"),
            Ok("worker-".to_string())
        );
        let empty = parse_token_node_prefix("").unwrap_err();
        assert!(empty.contains("leave --node-prefix out"), "{empty}");
        let slash = parse_token_node_prefix("rack/7").unwrap_err();
        assert!(
            slash.starts_with("prefix \"rack/7\" contains '/'"),
            "{slash}"
        );
        assert_eq!(parse_token_uses("50"), Ok(50));
        assert_eq!(parse_token_uses("1"), Ok(1));
        let zero = parse_token_uses("0").unwrap_err();
        assert!(zero.contains("never be used"), "{zero}");
        for bad in ["-1", "many", "", "4294967296"] {
            let e = parse_token_uses(bad).unwrap_err();
            assert!(e.contains("not a number of uses"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn watch_asks_for_default_the_way_older_controllers_understand() {
        let n = |s: &str| NetworkName::new(s).unwrap();
        assert!(watch_networks(&[n("default")]).is_empty());
        assert!(watch_networks(&[n("default"), n("default")]).is_empty());
        assert_eq!(watch_networks(&[n("blue")]), ["blue"]);
        assert_eq!(
            watch_networks(&[n("green"), n("default"), n("green")]),
            ["default", "green"]
        );
    }

    #[test]
    fn network_errors_name_the_way_out() {
        let e = ClientError::UnknownNetwork {
            name: "blue".into(),
            known: vec!["default".into(), "green".into()],
        };
        assert_eq!(
            e.to_string(),
            "NOT_FOUND: the controller serves no network \"blue\" (it serves: default, \
             green); see `twillctl networks`"
        );
        let e = ClientError::NetworksUnsupported {
            url: "https://c:8474".into(),
        };
        let e = e.to_string();
        assert!(
            e.contains("https://c:8474") && e.contains("leave --network out"),
            "{e}"
        );
    }

    #[test]
    fn status_display() {
        let e = ClientError::Status(tonic::Status::permission_denied("admins only"));
        assert_eq!(e.to_string(), "PERMISSION_DENIED: admins only");
    }
}

//! Mutual TLS between the ferrovol controller and its node agents: loading a role's PEM
//! files, checking that they really are that role's, building tonic's server and client TLS
//! configurations, and refusing calls from peers whose certificate belongs to the wrong role.
//!
//! Both roles hold a certificate signed by one CA, each carrying the serverAuth and
//! clientAuth extended key usages, and they are told apart only by a DNS subject alternative
//! name: [`Role::Controller`] certificates are valid for `ferrovol-controller`,
//! [`Role::Node`] certificates for `ferrovol-node`. The TLS handshake proves that a peer
//! holds *some* certificate of ours; [`require_peer`] (or [`role_interceptor`]) then checks
//! that it holds the *right* one, so that a node certificate can never act as the
//! controller.
//!
//! No explicit rustls `CryptoProvider` setup is needed: the build enables only rustls'
//! `ring` backend (through tonic's `tls-ring` feature), so rustls installs it as the process
//! default on first use, and tonic's client falls back to it as well. Should another
//! dependency ever also enable rustls' `aws-lc-rs` backend, building a server TLS config
//! will panic with rustls' "Could not automatically determine the process-level
//! CryptoProvider" message, and the TLS tests here will catch it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, DnsName, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};
use webpki::{EndEntityCert, KeyUsage};

/// The CA certificate (PEM) in a role's certificate directory.
pub const CA_FILE: &str = "ca.crt";
/// The role's certificate chain (PEM, end-entity certificate first).
pub const CERT_FILE: &str = "tls.crt";
/// The role's private key (PEM).
pub const KEY_FILE: &str = "tls.key";

/// The DNS name that makes a certificate a controller certificate.
pub const CONTROLLER_DNS_NAME: &str = "ferrovol-controller";
/// The DNS name that makes a certificate a node agent certificate.
pub const NODE_DNS_NAME: &str = "ferrovol-node";

/// How long a server waits for a client to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The two kinds of ferrovol process that talk to each other over mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The cluster-wide controller: calls the node agents, serves their registry.
    Controller,
    /// A node agent: serves the controller, registers with it.
    Node,
}

impl Role {
    /// The DNS subject alternative name a certificate of this role carries, and the server
    /// name a client expects when it connects to a peer of this role.
    pub fn dns_name(self) -> &'static str {
        match self {
            Role::Controller => CONTROLLER_DNS_NAME,
            Role::Node => NODE_DNS_NAME,
        }
    }

    /// `"controller"` or `"node"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Controller => "controller",
            Role::Node => "node",
        }
    }

    /// The other role.
    pub(crate) fn other(self) -> Role {
        match self {
            Role::Controller => Role::Node,
            Role::Node => Role::Controller,
        }
    }

    /// [`Role::dns_name`] as the server name webpki checks certificates against.
    pub(crate) fn server_name(self) -> ServerName<'static> {
        // Both names are constants checked by the `role_names` test; this cannot fail.
        ServerName::DnsName(DnsName::try_from(self.dns_name()).expect("a role's DNS name is a valid DNS name"))
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a role's TLS material cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A file's content is unusable (bad PEM, unparsable certificate or key, a certificate
    /// not signed by the CA, expired, lacking a usage, or not matching the key).
    #[error("{file} in {} {problem}", dir.display())]
    Invalid {
        /// The file's name within `dir` (one of [`CA_FILE`], [`CERT_FILE`], [`KEY_FILE`]).
        file: &'static str,
        /// The directory the material was loaded from.
        dir: PathBuf,
        /// What is wrong with it, as a predicate ("is not ...", "holds no ...").
        problem: String,
    },
    /// The certificate is fine but belongs to another role (or to both).
    #[error("{CERT_FILE} in {} is not a ferrovol {role} certificate ({problem})", dir.display())]
    WrongRole {
        /// The role the certificate was checked for.
        role: Role,
        /// The directory the material was loaded from.
        dir: PathBuf,
        /// Why it is not that role's certificate.
        problem: String,
    },
}

/// The three PEM files of one role, as read from its certificate directory (typically a
/// mounted Kubernetes Secret of type `kubernetes.io/tls`).
#[derive(Clone)]
pub struct TlsMaterial {
    /// The CA certificate(s) that sign every ferrovol certificate ([`CA_FILE`]).
    pub ca_pem: Vec<u8>,
    /// This process's certificate chain, end-entity first ([`CERT_FILE`]).
    pub cert_pem: Vec<u8>,
    /// This process's private key ([`KEY_FILE`]).
    pub key_pem: Vec<u8>,
    /// The directory the files were read from; only used in messages.
    pub dir: PathBuf,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("dir", &self.dir)
            .field("ca_pem_len", &self.ca_pem.len())
            .field("cert_pem_len", &self.cert_pem.len())
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Reads [`CA_FILE`], [`CERT_FILE`] and [`KEY_FILE`] from `dir`. Nothing is parsed here;
    /// see [`TlsMaterial::check_role`].
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |file: &str| {
            let path = dir.join(file);
            std::fs::read(&path).map_err(|source| TlsError::Read { path, source })
        };
        Ok(TlsMaterial {
            ca_pem: read(CA_FILE)?,
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
            dir: dir.to_path_buf(),
        })
    }

    /// Checks that the material is usable by a process of `role`: the CA file holds at
    /// least one certificate; the certificate parses, chains to the CA, is currently valid
    /// and carries both the serverAuth and clientAuth usages; it is valid for
    /// `role.dns_name()` and *not* for the other role's name; the key parses and (when its
    /// public half can be derived, as for PKCS#8 keys) belongs to the certificate.
    pub fn check_role(&self, role: Role) -> Result<(), TlsError> {
        let invalid = |file: &'static str, problem: String| TlsError::Invalid { file, dir: self.dir.clone(), problem };

        let ca_certs = parse_certificates(&self.ca_pem).map_err(|p| invalid(CA_FILE, p))?;
        let anchors = ca_certs
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map_err(|e| invalid(CA_FILE, format!("holds a certificate that cannot be used as a CA: {e}")))
            })
            .collect::<Result<Vec<TrustAnchor<'_>>, TlsError>>()?;

        let chain = parse_certificates(&self.cert_pem).map_err(|p| invalid(CERT_FILE, p))?;
        let (end_entity_der, intermediates) =
            chain.split_first().ok_or_else(|| invalid(CERT_FILE, "holds no certificate".to_owned()))?;
        let end_entity = EndEntityCert::try_from(end_entity_der)
            .map_err(|e| invalid(CERT_FILE, format!("holds a certificate that cannot be parsed: {e}")))?;

        let now = UnixTime::now();
        for (usage, usage_name) in [(KeyUsage::server_auth(), "serverAuth"), (KeyUsage::client_auth(), "clientAuth")] {
            end_entity
                .verify_for_usage(webpki::ALL_VERIFICATION_ALGS, &anchors, intermediates, now, usage, None, None)
                .map_err(|e| invalid(CERT_FILE, chain_problem(&e, usage_name)))?;
        }

        let wrong_role = |problem: String| TlsError::WrongRole { role, dir: self.dir.clone(), problem };
        if !valid_for(&end_entity, role) {
            return Err(wrong_role(format!("no DNS name {}", role.dns_name())));
        }
        if valid_for(&end_entity, role.other()) {
            return Err(wrong_role(format!(
                "it is also valid for {}, and a certificate must hold exactly one role",
                role.other().dns_name()
            )));
        }

        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| invalid(KEY_FILE, format!("holds no usable PEM private key: {e}")))?;
        // rcgen (ring backend) derives the public key of PKCS#8 keys only; for other
        // encodings the match is left to rustls, which checks it when the config is built.
        if let PrivateKeyDer::Pkcs8(_) = &key {
            let key_pair = rcgen::KeyPair::try_from(&key)
                .map_err(|e| invalid(KEY_FILE, format!("holds a private key that cannot be parsed: {e}")))?;
            let key_spki = rcgen::PublicKeyData::subject_public_key_info(&key_pair);
            if key_spki.as_slice() != end_entity.subject_public_key_info().as_ref() {
                return Err(invalid(KEY_FILE, format!("is not the private key of the certificate in {CERT_FILE}")));
            }
        }
        Ok(())
    }

    /// tonic's server TLS configuration: this material's certificate and key as the
    /// server identity, and client certificates **required** and verified against the CA.
    /// Which role a verified client holds is checked per call by [`role_interceptor`].
    ///
    /// The peer certificates reach requests (`Request::peer_certs`, hence [`require_peer`])
    /// when tonic itself terminates TLS over TCP: `Server::builder().tls_config(..)` with
    /// `serve`, `serve_with_shutdown`, or `serve_with_incoming(_shutdown)` fed a stream of
    /// `tokio::net::TcpStream` (e.g. `tokio_stream::wrappers::TcpListenerStream` or
    /// `tonic::transport::server::TcpIncoming`). tonic looks them up as
    /// `TlsConnectInfo<TcpConnectInfo>`, so an incoming stream of any other IO type (a
    /// wrapper around the stream, a Unix socket) leaves them absent and every call is
    /// refused as unauthenticated.
    pub fn server_config(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
            .client_auth_optional(false)
            .timeout(HANDSHAKE_TIMEOUT)
    }

    /// tonic's client TLS configuration for calling a server of role `peer`: the CA as the
    /// only trust root, this material as the client identity, and `peer.dns_name()` as the
    /// name the server's certificate must be valid for (whatever address is dialled).
    pub fn client_config(&self, peer: Role) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .domain_name(peer.dns_name())
    }
}

/// Every certificate in a PEM buffer, or a problem phrased as a predicate.
fn parse_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("is not valid PEM: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".to_owned());
    }
    Ok(certs)
}

/// Phrases a chain verification failure as a predicate about the certificate.
#[allow(deprecated)] // webpki 0.103 still has the context-free RequiredEkuNotFound
fn chain_problem(error: &webpki::Error, usage_name: &str) -> String {
    match error {
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            format!("is not signed by the CA in {CA_FILE}")
        }
        webpki::Error::CertExpired { .. } => "holds an expired certificate".to_owned(),
        webpki::Error::CertNotValidYet { .. } => "holds a certificate not valid yet".to_owned(),
        webpki::Error::RequiredEkuNotFound | webpki::Error::RequiredEkuNotFoundContext(_) => {
            format!("holds a certificate without the {usage_name} extended key usage")
        }
        other => format!("holds a certificate that does not verify against {CA_FILE}: {other}"),
    }
}

fn valid_for(cert: &EndEntityCert<'_>, role: Role) -> bool {
    cert.verify_is_valid_for_subject_name(&role.server_name()).is_ok()
}

/// Checks, on a server, that the calling peer's certificate belongs to `role`.
///
/// The TLS handshake has already verified the certificate chain (see
/// [`TlsMaterial::server_config`]); this only checks the role: the end-entity certificate
/// must be valid for `role.dns_name()` and not for the other role's name.
///
/// Returns `UNAUTHENTICATED` when the connection carries no client certificate (plain-text
/// connections, or a server whose peer certificates are not recorded) and
/// `PERMISSION_DENIED` when the certificate belongs to another role.
pub fn require_peer<T>(req: &Request<T>, role: Role) -> Result<(), Status> {
    let certs = req.peer_certs();
    let Some(end_entity_der) = certs.as_deref().and_then(|certs| certs.first()) else {
        tracing::debug!(peer = ?req.remote_addr(), required = %role, "call without a client certificate");
        return Err(Status::unauthenticated("no client certificate: ferrovol's gRPC services require mutual TLS"));
    };
    let cert = EndEntityCert::try_from(end_entity_der)
        .map_err(|e| Status::unauthenticated(format!("the peer's certificate cannot be parsed: {e}")))?;
    let holds_role = valid_for(&cert, role);
    let holds_other = valid_for(&cert, role.other());
    if holds_role && !holds_other {
        return Ok(());
    }
    tracing::debug!(peer = ?req.remote_addr(), required = %role, "call from a peer of the wrong role");
    let who = match role {
        Role::Controller => "only the ferrovol controller may call the node agent",
        Role::Node => "only ferrovol node agents may call the controller's registry",
    };
    let why = if holds_role {
        format!(
            "the peer's certificate is valid for both {} and {}, and ferrovol accepts \
             single-role certificates only",
            role.dns_name(),
            role.other().dns_name()
        )
    } else {
        format!("the peer's certificate is not a {role} certificate")
    };
    Err(Status::permission_denied(format!("{who}; {why}")))
}

/// A tonic interceptor that lets through only calls whose peer holds a certificate of
/// `role` (see [`require_peer`]); use it with the generated `XxxServer::with_interceptor`.
pub fn role_interceptor(
    role: Role,
) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone + Send + Sync + 'static {
    move |req: Request<()>| {
        require_peer(&req, role)?;
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::net::SocketAddr;

    use ferrovol_proto::csi::v1::identity_client::IdentityClient;
    use ferrovol_proto::csi::v1::identity_server::{Identity as IdentityService, IdentityServer};
    use ferrovol_proto::csi::v1::{
        GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
        ProbeRequest, ProbeResponse,
    };
    use tokio::net::TcpListener;
    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Code, Response};

    use super::*;
    use crate::certs::{generate, GenerateOptions, CONTROLLER_DIR, NODE_DIR};

    const PLUGIN_NAME: &str = "tls-test.ferrovol.io";

    struct TestIdentity;

    #[tonic::async_trait]
    impl IdentityService for TestIdentity {
        async fn get_plugin_info(
            &self,
            _request: Request<GetPluginInfoRequest>,
        ) -> Result<Response<GetPluginInfoResponse>, Status> {
            Ok(Response::new(GetPluginInfoResponse { name: PLUGIN_NAME.to_owned(), ..Default::default() }))
        }

        async fn get_plugin_capabilities(
            &self,
            _request: Request<GetPluginCapabilitiesRequest>,
        ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
            Ok(Response::new(GetPluginCapabilitiesResponse::default()))
        }

        async fn probe(&self, _request: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
            Ok(Response::new(ProbeResponse::default()))
        }
    }

    /// A generated certificate set: the CA directory plus both roles' material.
    struct Pki {
        _dir: tempfile::TempDir,
        controller: TlsMaterial,
        node: TlsMaterial,
    }

    fn new_pki() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &GenerateOptions::default()).unwrap();
        let controller = TlsMaterial::load(&dir.path().join(CONTROLLER_DIR)).unwrap();
        let node = TlsMaterial::load(&dir.path().join(NODE_DIR)).unwrap();
        Pki { _dir: dir, controller, node }
    }

    /// A running TLS server; shut down on drop of the sender.
    struct TestServer {
        addr: SocketAddr,
        shutdown: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<(), tonic::transport::Error>>,
    }

    impl TestServer {
        async fn stop(mut self) {
            if let Some(tx) = self.shutdown.take() {
                let _ = tx.send(());
            }
            self.task.await.unwrap().unwrap();
        }
    }

    /// Serves the CSI Identity service over TLS with `material` as the server identity,
    /// accepting only peers of `accept`, exactly as the real servers are started:
    /// `tls_config` + `serve_with_incoming_shutdown` over a `TcpListenerStream`.
    async fn serve_tls(material: &TlsMaterial, accept: Role) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let router = Server::builder()
            .tls_config(material.server_config())
            .unwrap()
            .add_service(IdentityServer::with_interceptor(TestIdentity, role_interceptor(accept)));
        let task = tokio::spawn(router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = rx.await;
        }));
        TestServer { addr, shutdown: Some(tx), task }
    }

    /// The outcome of one GetPluginInfo call.
    #[derive(Debug)]
    enum Outcome {
        Ok(String),
        Refused(Code, String),
        ConnectFailed(String),
    }

    async fn call(url: String, tls: Option<ClientTlsConfig>) -> Outcome {
        let mut endpoint =
            Endpoint::from_shared(url).unwrap().connect_timeout(Duration::from_secs(2)).timeout(Duration::from_secs(2));
        if let Some(tls) = tls {
            endpoint = endpoint.tls_config(tls).unwrap();
        }
        let channel = match endpoint.connect().await {
            Ok(channel) => channel,
            Err(e) => return Outcome::ConnectFailed(format!("{e:?}")),
        };
        match IdentityClient::new(channel).get_plugin_info(GetPluginInfoRequest {}).await {
            Ok(resp) => Outcome::Ok(resp.into_inner().name),
            Err(status) => Outcome::Refused(status.code(), status.message().to_owned()),
        }
    }

    async fn call_tls(addr: SocketAddr, tls: ClientTlsConfig) -> Outcome {
        call(format!("https://{addr}"), Some(tls)).await
    }

    /// Asserts the call failed below the service: the TLS handshake (or the transport it
    /// tore down) refused it, so neither the interceptor nor the service ever ran.
    fn assert_refused_by_tls(outcome: &Outcome, case: &str) {
        match outcome {
            // With TLS 1.3 the client completes its side of the handshake before the
            // server has judged the client certificate, so a refusal usually shows up as the
            // connection being torn down under the first call.
            Outcome::ConnectFailed(_) | Outcome::Refused(Code::Unknown | Code::Unavailable, _) => {}
            other => panic!("{case}: expected a TLS/transport failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn registry_like_server_accepts_only_node_certificates() {
        let pki = new_pki();
        let foreign = new_pki();
        // The controller's Registry: controller identity, node callers only.
        let server = serve_tls(&pki.controller, Role::Node).await;

        // A node agent registering: allowed.
        let outcome = call_tls(server.addr, pki.node.client_config(Role::Controller)).await;
        match &outcome {
            Outcome::Ok(name) => assert_eq!(name, PLUGIN_NAME),
            other => panic!("node certificate: expected OK, got {other:?}"),
        }

        // Another controller (a valid certificate of the wrong role): denied by the role.
        let outcome = call_tls(server.addr, pki.controller.client_config(Role::Controller)).await;
        match &outcome {
            Outcome::Refused(Code::PermissionDenied, message) => {
                assert!(message.contains("not a node certificate"), "{message}");
            }
            other => panic!("controller certificate: expected PERMISSION_DENIED, got {other:?}"),
        }

        // A node certificate from another CA (the client still trusts our CA, so only the
        // server's verification of the client certificate can fail).
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.node.ca_pem))
            .identity(Identity::from_pem(&foreign.node.cert_pem, &foreign.node.key_pem))
            .domain_name(Role::Controller.dns_name());
        let outcome = call_tls(server.addr, tls).await;
        assert_refused_by_tls(&outcome, "certificate from another CA");

        // No client certificate at all.
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&pki.node.ca_pem))
            .domain_name(Role::Controller.dns_name());
        let outcome = call_tls(server.addr, tls).await;
        assert_refused_by_tls(&outcome, "no client certificate");

        // Plain text.
        let outcome = call(format!("http://{}", server.addr), None).await;
        assert_refused_by_tls(&outcome, "plain text");

        // The server still works after all that.
        let outcome = call_tls(server.addr, pki.node.client_config(Role::Controller)).await;
        assert!(matches!(outcome, Outcome::Ok(_)), "{outcome:?}");

        server.stop().await;
    }

    #[tokio::test]
    async fn agent_like_server_accepts_only_the_controller_and_cannot_pose_as_it() {
        let pki = new_pki();
        // A node agent's server: node identity, controller callers only.
        let server = serve_tls(&pki.node, Role::Controller).await;

        // The controller calling the agent: allowed.
        let outcome = call_tls(server.addr, pki.controller.client_config(Role::Node)).await;
        assert!(matches!(&outcome, Outcome::Ok(name) if name == PLUGIN_NAME), "{outcome:?}");

        // Another node calling the agent: denied.
        let outcome = call_tls(server.addr, pki.node.client_config(Role::Node)).await;
        match &outcome {
            Outcome::Refused(Code::PermissionDenied, message) => {
                assert!(message.contains("only the ferrovol controller may call the node agent"), "{message}");
            }
            other => panic!("node certificate: expected PERMISSION_DENIED, got {other:?}"),
        }

        // A client looking for the controller reaches this node's server: the node's
        // certificate is not valid for ferrovol-controller, so the client refuses it.
        for material in [&pki.node, &pki.controller] {
            let outcome = call_tls(server.addr, material.client_config(Role::Controller)).await;
            match &outcome {
                Outcome::ConnectFailed(e) => {
                    assert!(e.contains("NotValidForName"), "{e}");
                }
                other => panic!("node posing as the controller: expected a connect error, got {other:?}"),
            }
        }

        server.stop().await;
    }

    #[tokio::test]
    async fn plain_text_server_refuses_calls_as_unauthenticated() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(
            Server::builder()
                .add_service(IdentityServer::with_interceptor(TestIdentity, role_interceptor(Role::Node)))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = rx.await;
                }),
        );
        let outcome = call(format!("http://{addr}"), None).await;
        match &outcome {
            Outcome::Refused(Code::Unauthenticated, message) => {
                assert!(message.contains("no client certificate"), "{message}");
            }
            other => panic!("expected UNAUTHENTICATED, got {other:?}"),
        }
        let _ = tx.send(());
        task.await.unwrap().unwrap();
    }

    #[test]
    fn require_peer_without_tls_is_unauthenticated() {
        let status = require_peer(&Request::new(()), Role::Controller).unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    #[test]
    fn role_names() {
        assert_eq!(Role::Controller.dns_name(), "ferrovol-controller");
        assert_eq!(Role::Node.dns_name(), "ferrovol-node");
        assert_eq!(Role::Controller.as_str(), "controller");
        assert_eq!(Role::Node.to_string(), "node");
        assert_eq!(Role::Node.other(), Role::Controller);
        for role in [Role::Controller, Role::Node] {
            assert_eq!(role.server_name().to_str(), role.dns_name());
        }
    }

    #[test]
    fn check_role_reports_the_file_and_the_cause() {
        let pki = new_pki();
        let foreign = new_pki();

        pki.controller.check_role(Role::Controller).unwrap();
        pki.node.check_role(Role::Node).unwrap();

        let err = pki.node.check_role(Role::Controller).unwrap_err().to_string();
        let dir = pki.node.dir.display().to_string();
        assert_eq!(
            err,
            format!("tls.crt in {dir} is not a ferrovol controller certificate (no DNS name ferrovol-controller)")
        );

        // Signed by another CA.
        let mut mixed = pki.node.clone();
        mixed.ca_pem = foreign.node.ca_pem.clone();
        let err = mixed.check_role(Role::Node).unwrap_err().to_string();
        assert!(err.starts_with("tls.crt in ") && err.contains("is not signed by the CA"), "{err}");

        // Someone else's key.
        let mut mixed = pki.node.clone();
        mixed.key_pem = pki.controller.key_pem.clone();
        let err = mixed.check_role(Role::Node).unwrap_err().to_string();
        assert!(err.starts_with("tls.key in ") && err.contains("is not the private key"), "{err}");

        // Garbage.
        let mut broken = pki.node.clone();
        broken.key_pem = b"not a key".to_vec();
        let err = broken.check_role(Role::Node).unwrap_err().to_string();
        assert!(err.starts_with("tls.key in "), "{err}");
        let mut broken = pki.node.clone();
        broken.ca_pem = Vec::new();
        let err = broken.check_role(Role::Node).unwrap_err().to_string();
        assert_eq!(err, format!("ca.crt in {dir} holds no PEM certificate"));
    }

    #[test]
    fn load_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CA_FILE), b"x").unwrap();
        let err = TlsMaterial::load(dir.path()).unwrap_err().to_string();
        let expected = dir.path().join(CERT_FILE).display().to_string();
        assert!(err.starts_with(&format!("cannot read {expected}: ")), "{err}");
    }

    #[test]
    fn debug_hides_the_key() {
        let pki = new_pki();
        let shown = format!("{:?}", pki.node);
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}

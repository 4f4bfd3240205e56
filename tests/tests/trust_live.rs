//! Who may talk to an agent, and what it accepts, with the real agent in
//! the lab: a relay between two TLS sessions, hostile sources that hold
//! the token, unsafe token files and state directories, certificates from
//! the right CA and from another.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::SocketAddr, os::unix::fs::PermissionsExt as _, path::Path, process::Command,
    time::Duration,
};

use migrator::channel::{
    self, Credentials, Message, TlsChannel,
    message::{PreflightRequest, ServiceAddress},
    token::Token,
};
use migrator_tests::{
    lab::{self, DST, SERVICE_V4, SERVICE_V6, SRC},
    migration::{LabAuth, MigrationLab},
    migrator_bin,
    wire::in_netns,
};

fn agent_address(host: &str) -> SocketAddr {
    format!("{}:{}", lab::host_addresses(host).0, lab::AGENT_PORT)
        .parse()
        .unwrap()
}

/// Nothing of a session is left on the destination.
fn assert_untouched(lab: &MigrationLab) {
    assert!(!lab.pins_left(DST), "a lock was left on the destination");
    assert!(!lab.has_address(DST, SERVICE_V4) && !lab.has_address(DST, SERVICE_V6));
}

/// A relay that terminates TLS towards the source and towards the agent
/// (it can: token mode accepts any certificate) and passes the plaintext
/// between them, proofs included. The proofs are bound to each session,
/// so both ends refuse, and nothing is frozen.
#[test]
fn a_relay_passing_proofs_between_two_sessions_fails() {
    let mut lab = MigrationLab::new("relay");
    let pid = lab.start_workload(true, 0);
    let listen: SocketAddr = "198.18.0.2:7272".parse().unwrap();
    let agent = agent_address(DST);
    let relay_token = lab.dir.0.join("relay-token");
    lab::write_token(&relay_token).unwrap();
    let credentials = Credentials::Token(Token::from_file(&relay_token).unwrap());
    let server = channel::tls::server_config(&credentials).unwrap();
    let client = channel::tls::client_config(&credentials).unwrap();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _relay = in_netns(&lab.lab.netns_path(SRC), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await.unwrap();
            let _ = ready_tx.send(());
            let (tcp, _) = listener.accept().await.unwrap();
            let mut from_source = tokio_rustls::TlsAcceptor::from(server)
                .accept(tcp)
                .await
                .unwrap();
            let upstream = tokio::net::TcpStream::connect(agent).await.unwrap();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from("migrator").unwrap();
            let mut to_agent = tokio_rustls::TlsConnector::from(client)
                .connect(name, upstream)
                .await
                .unwrap();
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                tokio::io::copy_bidirectional(&mut from_source, &mut to_agent),
            )
            .await;
        });
    });
    ready_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let run = lab.migrate_via(SRC, &listen.to_string(), pid, &[]);
    assert!(!run.success);
    assert!(
        run.stderr.contains("did not prove our token") && run.stderr.contains("relay"),
        "{}",
        run.stderr
    );
    assert!(!lab.pins_left(SRC), "the source froze something");
    assert_untouched(&lab);
}

/// Drive the agent on `host` as a source holding the lab's token would,
/// from the source's namespace, and return what `script` returns.
fn as_source<T: Send + 'static>(
    lab: &MigrationLab,
    script: impl AsyncFnOnce(TlsChannel) -> T + Send + 'static,
) -> T {
    let token = lab.token.clone();
    in_netns(&lab.lab.netns_path(SRC), move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let credentials = Credentials::Token(Token::from_file(&token).unwrap());
            let channel = channel::connect(
                agent_address(DST),
                None,
                &credentials,
                Duration::from_secs(5),
            )
            .await
            .unwrap();
            script(channel).await
        })
    })
    .join()
    .unwrap()
}

fn preflight(addresses: &[&str], flows: &[&str], deadline_ms: u64) -> Message {
    let identity = migrator::system::pid_namespace_identity();
    Message::Preflight(PreflightRequest {
        pids: vec![999_999],
        own_pid_namespace: true,
        service_addresses: addresses
            .iter()
            .map(|a| a.parse::<ServiceAddress>().unwrap())
            .collect(),
        flows: flows.iter().map(|f| (*f).to_owned()).collect(),
        deadline_ms,
        hold: true,
        page_stream: true,
        lazy_restore: false,
        post_copy: false,
        boot_id: identity.0,
        pid_namespace: identity.1,
        image_bytes: 0,
        echo_peers: Vec::new(),
        takeover: Default::default(),
    })
}

/// A page stream with no pages: CRIU's closing record (FORCE_CLOSE, 32
/// bytes), its 4-byte answer, then the end. Returns the agent's last word.
async fn empty_page_stream(channel: &mut TlsChannel) -> String {
    page_stream(channel, &page_record(0x1024)).await
}

/// One page-server record: command, padding, nr_pages, vaddr, dst_id.
fn page_record(cmd: u32) -> Vec<u8> {
    let mut record = cmd.to_ne_bytes().to_vec();
    record.extend_from_slice(&[0u8; 28]);
    record
}

async fn page_stream(channel: &mut TlsChannel, bytes: &[u8]) -> String {
    channel.send_data(bytes).await.unwrap();
    channel
        .send(&Message::PagesEnd {
            bytes: bytes.len() as u64,
        })
        .await
        .unwrap();
    loop {
        match channel.receive_data().await {
            Ok(_answer) => continue,
            Err(migrator::channel::ChannelError::Refused(reason)) => {
                return format!("refused: {reason}");
            }
            Err(migrator::channel::ChannelError::Frame(_)) => break,
            Err(err) => return format!("error: {err}"),
        }
    }
    "pages-done".to_owned()
}

/// Send `message`, return the agent's answer as text.
async fn answer(channel: &mut TlsChannel, message: Message) -> String {
    channel.send(&message).await.unwrap();
    match channel.receive().await {
        Ok(Message::Refused { reason }) => format!("refused: {reason}"),
        Ok(other) => other.name(),
        Err(err) => format!("error: {err}"),
    }
}

/// A source that holds the token but asks for what it must not: each
/// request is refused with a reason, and the destination is left as it
/// was.
#[test]
fn hostile_requests_are_refused_with_nothing_changed() {
    let mut lab = MigrationLab::new("hostile");
    assert!(
        lab.stop_agent(DST).is_some_and(|s| s.success()),
        "SIGTERM must end the agent with 0"
    );
    lab.start_agent_with(
        DST,
        &["--allow-ip", "198.18.0.0/24", "--max-deadline", "60s"],
    );
    let flow = "198.18.0.100:40000=198.18.0.1:9000";
    let cases: [(Message, &str); 4] = [
        (
            preflight(&["198.19.0.5"], &[], 30_000),
            "outside this agent's --allow-ip",
        ),
        (
            preflight(&[SERVICE_V4], &[flow], u64::MAX),
            "--max-deadline",
        ),
        (
            preflight(&[SERVICE_V4], &["198.18.0.3:22=198.18.0.1:9000"], 30_000),
            "not on a service address that moves",
        ),
        (preflight(&[SERVICE_V4], &["not a flow"], 30_000), "refused"),
    ];
    for (message, expected) in cases {
        let got = as_source(&lab, async move |mut channel| {
            answer(&mut channel, message).await
        });
        assert!(got.contains("refused") && got.contains(expected), "{got}");
        assert_untouched(&lab);
    }
    // Accepted, then held packets beyond what a session may send: a batch
    // too large, a second batch, a packet of another flow.
    let held_cases: [(Vec<Message>, &str); 2] = [
        (
            vec![Message::Held { count: 1_000_000 }],
            "one batch of at most",
        ),
        (
            vec![Message::Held { count: 0 }, Message::Held { count: 0 }],
            "one batch of at most",
        ),
    ];
    for (messages, expected) in held_cases {
        let got = as_source(&lab, async move |mut channel| {
            let ok = answer(&mut channel, preflight(&[SERVICE_V4], &[flow], 30_000)).await;
            assert_eq!(ok, "preflight-ok");
            assert_eq!(empty_page_stream(&mut channel).await, "pages-done");
            let done = answer(&mut channel, Message::FilesDone { files: 0, bytes: 0 }).await;
            assert_eq!(done, "files-ok");
            let mut last = String::new();
            for message in messages {
                channel.send(&message).await.unwrap();
            }
            if let Ok(Message::Refused { reason }) = channel.receive().await {
                last = reason;
            }
            last
        });
        assert!(got.contains(expected), "{got:?}");
        // The agent undid its lock when it refused.
        std::thread::sleep(Duration::from_millis(200));
        assert_untouched(&lab);
    }
    let got = as_source(&lab, async move |mut channel| {
        answer(&mut channel, preflight(&[SERVICE_V4], &[flow], 30_000)).await;
        empty_page_stream(&mut channel).await;
        answer(&mut channel, Message::FilesDone { files: 0, bytes: 0 }).await;
        channel.send(&Message::Held { count: 1 }).await.unwrap();
        channel.send_data(&[0u8; 60]).await.unwrap();
        match channel.receive().await {
            Ok(Message::Refused { reason }) => reason,
            other => format!("{other:?}"),
        }
    });
    assert!(got.contains("not TCP over IP"), "{got}");
    std::thread::sleep(Duration::from_millis(200));
    assert_untouched(&lab);
    // A page stream asking for what a dump never sends here (pages from
    // the destination: GET) is refused.
    let got = as_source(&lab, async move |mut channel| {
        answer(&mut channel, preflight(&[SERVICE_V4], &[flow], 30_000)).await;
        page_stream(&mut channel, &page_record(7)).await
    });
    assert!(got.contains("unsupported command 0x7"), "{got}");
    std::thread::sleep(Duration::from_millis(200));
    assert_untouched(&lab);
}

/// A token file others can read, or not owned by root, a world-writable
/// state directory, a symlink planted as the state directory: the agent
/// refuses to start and says what to fix.
#[test]
fn unsafe_files_are_refused_at_start() {
    let scratch = migrator_tests::TempDir::new("unsafe");
    let token = scratch.0.join("token");
    lab::write_token(&token).unwrap();
    let agent = |token: &Path, state: &Path| {
        let out = Command::new(migrator_bin())
            .args([
                "agent",
                "--listen",
                "127.0.0.1:7979",
                "--iface",
                "lo",
                "--token-file",
            ])
            .arg(token)
            .arg("--work-dir")
            .arg(state)
            .output()
            .unwrap();
        assert!(!out.status.success(), "the agent started");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let state = scratch.0.join("state");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = agent(&token, &state);
    assert!(
        err.contains("mode 644") && err.contains("chmod 600"),
        "{err}"
    );
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();

    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = agent(&token, &state);
    assert!(
        err.contains("mode 777") && err.contains("chmod 700"),
        "{err}"
    );

    let planted = scratch.0.join("planted");
    std::os::unix::fs::symlink("/etc", &planted).unwrap();
    let err = agent(&token, &planted);
    assert!(err.contains("symlink"), "{err}");
    assert!(!Path::new("/etc/incoming").exists());
}

/// A migration refused in the TLS handshake, with nothing frozen on the
/// source and nothing changed on the destination.
fn refused_at_handshake(lab: &MigrationLab, run: migrator_tests::migration::MigrateRun) {
    assert!(!run.success);
    assert!(run.stderr.contains("TLS handshake"), "{}", run.stderr);
    assert!(!lab.pins_left(SRC));
    assert_untouched(lab);
}

/// Write a CA and, for each of `hosts`, a certificate naming its lab
/// address and its key, as `DIR/ca.crt`, `DIR/HOST.crt`, `DIR/HOST.key`.
fn make_pki(dir: &Path, ca_name: &str, hosts: &[&str]) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    std::fs::create_dir_all(dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, ca_name);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.crt"), ca.pem()).unwrap();
    for host in hosts {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec![lab::host_addresses(host).0.to_owned()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        std::fs::write(dir.join(format!("{host}.crt")), cert.pem()).unwrap();
        let key_path = dir.join(format!("{host}.key"));
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
}

/// Certificates from one CA: a migration there and back. A source whose
/// certificate comes from another CA, and a source that expects another
/// name on the agent's certificate, are refused before anything freezes.
#[test]
fn certificates_end_to_end_and_strangers_refused() {
    let mut lab = MigrationLab::new_with("pki", |dir| {
        let pki = dir.join("pki");
        make_pki(&pki, "migrator lab CA", &[SRC, DST]);
        LabAuth::Certificates(pki)
    });
    let pid = lab.start_workload(true, 0);
    let there = lab.migrate(SRC, DST, pid, &[]);
    assert!(there.success, "{}", there.stderr);
    let pid = there.report.unwrap()["destination_pid"].as_i64().unwrap() as i32;
    let back = lab.migrate(DST, SRC, pid, &[]);
    assert!(back.success, "{}", back.stderr);
    let pid = back.report.unwrap()["destination_pid"].as_i64().unwrap() as i32;

    // The agent's certificate names 198.18.0.3, not this.
    refused_at_handshake(
        &lab,
        lab.migrate(SRC, DST, pid, &["--server-name", "agent.invalid"]),
    );

    // A source certificate from another CA.
    let LabAuth::Certificates(pki) = lab.auth.clone() else {
        unreachable!()
    };
    let rogue = lab.dir.0.join("rogue");
    make_pki(&rogue, "someone else's CA", &[SRC]);
    std::fs::copy(pki.join("ca.crt"), rogue.join("ca.crt")).unwrap();
    lab.auth = LabAuth::Certificates(rogue);
    refused_at_handshake(&lab, lab.migrate(SRC, DST, pid, &[]));
}

/// As a systemd `Type=notify` service: READY=1 once it listens,
/// STOPPING=1 on SIGTERM, then exit 0.
#[test]
fn the_agent_tells_its_service_manager_when_ready_and_stopping() {
    let lab = MigrationLab::new("notify");
    let socket_path = lab.dir.0.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let listen = format!("{}:7171", lab::host_addresses(DST).0);
    let mut agent = Command::new("nsenter")
        .arg(format!("--net={}", lab.lab.netns_path(DST).display()))
        .arg(migrator_bin())
        .args(["agent", "--listen", &listen, "--token-file"])
        .arg(&lab.token)
        .arg("--work-dir")
        .arg(lab.dir.0.join("agent-notify"))
        .env("NOTIFY_SOCKET", &socket_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 64];
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1");
    // SAFETY: kill has no memory preconditions.
    unsafe { libc::kill(agent.id() as i32, libc::SIGTERM) };
    let n = socket.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"STOPPING=1");
    assert!(
        agent.wait().unwrap().success(),
        "SIGTERM must end the agent with 0"
    );
}

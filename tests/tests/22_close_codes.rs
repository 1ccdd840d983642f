//! The server's QUIC close codes reach the client library typed: a revoked session (code 2)
//! and a clean shutdown (code 1), as `qpq_core::client::net::Connection` reports them.

use std::future::Future;
use std::time::Duration;

use qpq_core::client::net::{CloseCode, Connection, ConnectionLost, IDLE_TIMEOUT, NetError};
use qpq_proto::{method, v1};
use qpq_tests::{ServerProcess, identity};

const STEP: Duration = Duration::from_secs(10);

async fn bounded<F: Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(STEP, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {STEP:?}"))
}

/// The client library's connection to `server`, pinning its certificate.
async fn connect(server: &ServerProcess) -> Connection {
    let (pushes, _) = tokio::sync::mpsc::channel(16);
    let dial = Connection::connect(
        server.addr,
        "localhost",
        Some(server.fingerprint.as_str()),
        pushes,
        IDLE_TIMEOUT,
    );
    bounded("connect", dial).await.unwrap_or_else(|e| panic!("connect: {e}"))
}

async fn health(conn: &Connection) -> Result<v1::HealthResponse, NetError> {
    conn.call(method::HEALTH, &v1::HealthRequest {}, Duration::ZERO).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_session_is_close_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let raw = server.client().await.unwrap();
    let key = identity();
    raw.register("alice", "pw alice", &key, "").await.unwrap();
    let token = raw.login("alice", "pw alice", &key).await.unwrap();

    let conn = connect(&server).await;
    let resumed: v1::ResumeResponse = conn
        .call(method::RESUME, &v1::ResumeRequest { session_token: token }, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(resumed.username, "alice");
    assert_eq!(conn.close_reason(), None, "open");

    // Logging out on another connection ends the session there too.
    let _: v1::LogoutResponse = raw.call(method::LOGOUT, &v1::LogoutRequest {}).await.unwrap();
    bounded("the revoked connection closing", conn.closed()).await;
    assert_eq!(
        conn.close_reason(),
        Some(ConnectionLost::ClosedByServer {
            code: Some(CloseCode::Revoked),
            raw: 2,
            reason: "logged out".into(),
        })
    );

    let e = bounded("a call after revocation", health(&conn)).await.unwrap_err();
    assert_eq!(e.close_code(), Some(CloseCode::Revoked), "{e:?}");
    assert!(!e.is_transient(), "a revoked session needs a new login: {e:?}");
    assert_eq!(
        e.to_string(),
        "the server closed the connection: session revoked (code 2: logged out)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_is_close_code_1() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let conn = connect(&server).await;
    assert_eq!(bounded("health", health(&conn)).await.unwrap().status, "ok");

    let (status, server) = tokio::task::spawn_blocking(move || {
        let mut server = server;
        (server.terminate(Duration::from_secs(30)), server)
    })
    .await
    .unwrap();
    let log = server.stderr.lock().unwrap().clone();
    let status = status.unwrap_or_else(|e| panic!("{e}\n{log}"));
    assert!(status.success(), "exit status {status:?} after SIGTERM\n{log}");

    bounded("the connection closing", conn.closed()).await;
    let reason = conn.close_reason().expect("closed");
    assert_eq!(reason.close_code(), Some(CloseCode::Shutdown), "{reason:?}");
    let e = bounded("a call after shutdown", health(&conn)).await.unwrap_err();
    assert_eq!(e.close_code(), Some(CloseCode::Shutdown), "{e:?}");
    assert!(e.is_transient(), "a restarted server takes the session back: {e:?}");
    assert_eq!(e.to_string(), "the server closed the connection: server shutting down (code 1)");
}

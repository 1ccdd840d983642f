//! Registration, login, resume, logout and registration policies against the real binary.

use std::process::Command;

use qpq_proto::{Status, method, v1};
use qpq_tests::{CallError, ServerProcess, identity, workspace_bin};

fn status(r: Result<impl std::fmt::Debug, CallError>) -> Status {
    match r {
        Err(CallError::Status(s, _)) => s,
        other => panic!("expected an error status, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_login_resume_logout() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let c = server.client().await.unwrap();

    let health: v1::HealthResponse = c.call(method::HEALTH, &v1::HealthRequest {}).await.unwrap();
    assert_eq!(health.status, "ok");
    assert_eq!(health.registration, "open");

    let alice = identity();
    c.register("alice", "correct horse", &alice, "").await.unwrap();
    assert_eq!(status(c.register("alice", "other", &identity(), "").await), Status::Conflict);
    assert_eq!(status(c.register("alice2", "other", &alice, "").await), Status::Conflict);
    assert_eq!(status(c.register("Bad Name", "x", &identity(), "").await), Status::BadRequest);

    // Unauthenticated calls are refused until login.
    assert_eq!(status(c.fetch(10).await), Status::Unauthorized);
    let token = c.login("alice", "correct horse", &alice).await.unwrap();
    assert_eq!(token.len(), 32);
    assert!(c.fetch(10).await.unwrap().is_empty());

    // A second connection resumes with the token.
    let c2 = server.client().await.unwrap();
    let r = c2.resume(&token).await.unwrap();
    assert_eq!(r.username, "alice");
    assert_eq!(r.identity_key, alice.to_vec());
    assert!(c2.fetch(1).await.is_ok());
    assert_eq!(status(c2.resume(&[7u8; 32]).await), Status::Unauthorized);
    assert_eq!(status(c2.resume(&[7u8; 5]).await), Status::BadRequest);

    // Logout ends the session everywhere.
    let _: v1::LogoutResponse = c.call(method::LOGOUT, &v1::LogoutRequest {}).await.unwrap();
    assert_eq!(status(c.fetch(1).await), Status::Unauthorized);
    let c3 = server.client().await.unwrap();
    assert_eq!(status(c3.resume(&token).await), Status::Unauthorized);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_user_and_wrong_identity() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    let c = server.client().await.unwrap();
    let bob = identity();
    c.register("bob", "hunter2", &bob, "").await.unwrap();

    // OPAQUE: a wrong password fails in the client's finish step; nothing reaches the server.
    let e = c.login("bob", "hunter3", &bob).await.unwrap_err();
    assert!(matches!(e, CallError::Transport(ref m) if m.contains("login failed")), "{e}");

    // An unknown user gets a login response of the same shape as a real one.
    let real = qpq_core::opaque::login_start(b"pw").unwrap();
    let r1: v1::OpaqueLoginStartResponse = c
        .call(
            method::OPAQUE_LOGIN_START,
            &v1::OpaqueLoginStartRequest { username: "bob".into(), request: real.request.clone() },
        )
        .await
        .unwrap();
    let r2: v1::OpaqueLoginStartResponse = c
        .call(
            method::OPAQUE_LOGIN_START,
            &v1::OpaqueLoginStartRequest { username: "nobody".into(), request: real.request },
        )
        .await
        .unwrap();
    assert_eq!(r1.response.len(), r2.response.len());
    assert_ne!(r1.response, r2.response);
    let e = c.login("nobody", "pw", &identity()).await.unwrap_err();
    assert!(matches!(e, CallError::Transport(ref m) if m.contains("login failed")), "{e}");

    // Right password, wrong identity key.
    assert_eq!(status(c.login("bob", "hunter2", &identity()).await), Status::Unauthorized);
    // Finish without start.
    let e = c
        .call::<_, v1::OpaqueLoginFinishResponse>(
            method::OPAQUE_LOGIN_FINISH,
            &v1::OpaqueLoginFinishRequest {
                username: "bob".into(),
                identity_key: bob.to_vec(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(status(e), Status::BadRequest);
    c.login("bob", "hunter2", &bob).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_survives_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]).unwrap();
    let c = server.client().await.unwrap();
    let id = identity();
    c.register("carol", "pw", &id, "").await.unwrap();
    let token = c.login("carol", "pw", &id).await.unwrap();
    let fingerprint = server.fingerprint.clone();
    server.kill();
    let server = ServerProcess::start(dir.path(), &[]).unwrap();
    assert_eq!(server.fingerprint, fingerprint, "the generated certificate is reused");
    let c = server.client().await.unwrap();
    assert_eq!(c.resume(&token).await.unwrap().username, "carol");
    // The OPAQUE server setup persisted too: the password still works.
    c.login("carol", "pw", &id).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invite_only_registration_with_codes_made_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--registration", "invite"]).unwrap();
    let c = server.client().await.unwrap();
    assert_eq!(status(c.register("dave", "pw", &identity(), "").await), Status::Forbidden);
    assert_eq!(status(c.register("dave", "pw", &identity(), "qpq-nope").await), Status::Forbidden);

    let bin = workspace_bin("qpq-server-lite");
    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["invite", "create", "--uses", "1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(code.starts_with("qpq-"), "{code}");

    let list = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["invite", "list"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&list.stdout).contains(&code));

    c.register("dave", "pw", &identity(), &code).await.unwrap();
    assert_eq!(
        status(c.register("erin", "pw", &identity(), &code).await),
        Status::Forbidden,
        "single use"
    );

    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["invite", "create"])
        .output()
        .unwrap();
    let code2 = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["invite", "revoke", &code2])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        status(c.register("erin", "pw", &identity(), &code2).await),
        Status::Forbidden,
        "revoked"
    );
    let out = Command::new(&bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args(["invite", "revoke", &code2])
        .output()
        .unwrap();
    assert!(!out.status.success(), "revoking twice is an error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_registration() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--registration", "closed"]).unwrap();
    let c = server.client().await.unwrap();
    assert_eq!(status(c.register("frank", "pw", &identity(), "").await), Status::Forbidden);
}

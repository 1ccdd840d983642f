//! `qpq-demo`: runs the real `qpq-server-lite` on this machine with its built-in default
//! configuration (in a temporary data directory, on a free loopback port) and walks two users
//! through an exchange with the headless protocol client, printing each step.
//!
//! The terminal client `qpq` replaces this walk-through once it exists; the server side is
//! exactly what a router runs.

use std::process::Command;
use std::time::Duration;

use qpq_proto::{Message, method, v1};
use qpq_tests::{ServerProcess, identity, message_id, workspace_bin};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!("== starting qpq-server-lite (default config, data in {})", dir.path().display());
    let server = ServerProcess::start(dir.path(), &["--registration", "invite"])?;
    println!("   listening on {}, certificate sha256:{}", server.addr, server.fingerprint);

    let invite = |uses: &str| -> anyhow::Result<String> {
        let out = Command::new(workspace_bin("qpq-server-lite"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(["invite", "create", "--uses", uses])
            .output()?;
        anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    };
    let code = invite("2")?;
    println!("== operator: qpq-server-lite invite create --uses 2  ->  {code}");

    let alice = server.client().await?;
    let bob = server.client().await?;
    let (alice_id, bob_id) = (identity(), identity());
    alice.register("alice", "alice's long passphrase", &alice_id, &code).await?;
    bob.register("bob", "bob's long passphrase", &bob_id, &code).await?;
    println!("== alice and bob registered with OPAQUE (the server never saw a password)");
    alice.login("alice", "alice's long passphrase", &alice_id).await?;
    let bob_token = bob.login("bob", "bob's long passphrase", &bob_id).await?;
    println!("== both logged in; connections are bound to their identities");
    println!(
        "   (this walk-through sends raw test bytes; the qpq client seals them with MLS first)"
    );

    for text in ["hello bob", "payloads are opaque bytes to the relay", "bye"] {
        let r = alice.enqueue(&bob_id, text.as_bytes(), message_id()).await?;
        println!("   alice -> bob  seq {}  {text:?}", r.seq);
        if let Some(push) = bob.next_push(Duration::from_secs(2)).await
            && push.event == method::PUSH_NEW_MESSAGE
        {
            let nm = v1::NewMessage::decode(push.payload.as_slice())?;
            let env = nm.envelope.unwrap_or_default();
            println!(
                "   bob got a push: seq {}  {:?}",
                env.seq,
                String::from_utf8_lossy(&env.data)
            );
        }
    }
    let queued = bob.fetch(0).await?;
    let last = queued.last().map_or(0, |e| e.seq);
    println!("== bob fetches {} queued messages and acks up to seq {last}", queued.len());
    bob.ack(last).await?;

    let again = server.client().await?;
    let r = again.resume(&bob_token).await?;
    println!(
        "== a new connection resumes bob's session as {:?}; queue now {} messages",
        r.username,
        again.fetch(0).await?.len()
    );
    println!("== done: the server keeps running until this demo exits");
    Ok(())
}

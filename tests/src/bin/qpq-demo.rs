//! `qpq-demo`: runs the real `qpq-server-lite` on this machine with its built-in default
//! configuration (in a temporary data directory, on a free loopback port) and drives three real
//! clients through it: registration with an invite code, an end-to-end encrypted DM and group
//! (MLS with the X-Wing post-quantum ciphersuite), a file transfer, and safety numbers.

use std::process::Command;
use std::time::Duration;

use qpq_core::client::{Client, RegisterOptions};
use qpq_core::identity::hex;
use qpq_core::ids::GroupId;
use qpq_core::vault::KdfParams;
use qpq_tests::{ServerProcess, workspace_bin};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    println!(
        "== starting qpq-server-lite (default config, data in {})",
        dir.path().join("server").display()
    );
    let server = ServerProcess::start(&dir.path().join("server"), &["--registration", "invite"])?;
    println!("   listening on {}, certificate sha256:{}", server.addr, server.fingerprint);

    let out = Command::new(workspace_bin("qpq-server-lite"))
        .arg("--data-dir")
        .arg(server.data_dir.as_path())
        .args(["invite", "create", "--uses", "3"])
        .output()?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let code = String::from_utf8(out.stdout)?.trim().to_string();
    println!("== operator: qpq-server-lite invite create --uses 3  ->  {code}");

    let register = |name: &str| RegisterOptions {
        store: dir.path().join(name).join("account.qpq"),
        passphrase: format!("{name}'s local passphrase"),
        server: server.addr,
        pin: Some(server.fingerprint.clone()),
        username: name.to_string(),
        password: format!("{name}'s password"),
        invite: code.clone(),
        kdf: KdfParams::default(),
    };
    let mut alice = Client::register(register("alice")).await?;
    let mut bob = Client::register(register("bob")).await?;
    let mut carol = Client::register(register("carol")).await?;
    println!("== alice, bob and carol registered (OPAQUE: the server never saw a password)");
    println!("   each has an encrypted local store and uploaded 10 post-quantum KeyPackages");

    let dm = alice.dm("bob").await?;
    alice.send_text(&dm, "hi bob, this is end-to-end encrypted").await?;
    bob.sync().await?;
    print_history(&bob, &dm, "bob's DM with alice");
    bob.send_text(&dm, "hi alice! safety numbers next?").await?;
    alice.sync().await?;
    println!("== safety numbers (compare out of band):");
    println!("   alice sees {}", alice.safety_number("bob").await?);
    println!("   bob sees   {}", bob.safety_number("alice").await?);

    let team = alice.create_group("team").await?;
    alice.add_members(&team, &["bob".into(), "carol".into()]).await?;
    bob.sync().await?;
    carol.sync().await?;
    alice.send_text(&team, "welcome to the team").await?;
    carol.sync().await?;
    carol.send_text(&team, "glad to be here").await?;
    bob.sync().await?;
    print_history(&bob, &team, "bob's view of #team");
    let info = bob.group_info(&team).await?;
    println!("   epoch {}, verification code {}", info.epoch, info.verification_code);
    for (id, name, admin) in &info.members {
        println!("   member {name}{} {}", if *admin { " (admin)" } else { "" }, hex(&id[..6]));
    }

    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "meeting at 10, bring the router\n")?;
    let offer = alice.send_file(&team, &file).await?;
    println!(
        "== alice sent {} ({} bytes, {} encrypted)",
        offer.name, offer.size, offer.ciphertext_size
    );
    carol.sync().await?;
    let entry = carol.history(&team, 10)?.into_iter().rev().find(|e| e.file.is_some());
    if let Some(offer) = entry.as_ref().and_then(Client::offer_of) {
        let saved = carol.download(&offer, &dir.path().join("carol-downloads")).await?;
        println!(
            "   carol downloaded and verified it: {:?}",
            std::fs::read_to_string(saved)?.trim()
        );
    }

    alice.remove_member(&team, "carol").await?;
    alice.send_text(&team, "carol has left the building").await?;
    bob.sync().await?;
    carol.sync().await?;
    println!(
        "== alice removed carol; bob has {} messages in #team, carol still {}",
        bob.history(&team, 100)?.iter().filter(|e| !e.system).count(),
        carol.history(&team, 100)?.iter().filter(|e| !e.system).count()
    );

    let db = std::fs::read(server.data_dir.join("qpq.redb"))?;
    let leaked = ["end-to-end encrypted", "welcome to the team", "meeting at 10"]
        .iter()
        .any(|p| db.windows(p.len()).any(|w| w == p.as_bytes()));
    println!(
        "== plaintext in the server's database: {}",
        if leaked { "FOUND (bug!)" } else { "none" }
    );
    for c in [&mut alice, &mut bob, &mut carol] {
        c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    println!("== done");
    anyhow::ensure!(!leaked, "plaintext found in the server database");
    Ok(())
}

fn print_history(c: &Client, conv: &GroupId, title: &str) {
    println!("== {title}:");
    for e in c.history(conv, 20).unwrap_or_default() {
        if e.system {
            println!("   * {}", e.text);
        } else {
            let who = c.cached_name(&e.sender).unwrap_or_else(|| hex(&e.sender[..6]));
            println!("   [{who}] {}", e.text);
        }
    }
}

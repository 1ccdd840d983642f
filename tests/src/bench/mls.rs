//! `mls`: MLS costs with our ciphersuite (0x004F, X-Wing) through `qpq_core::mls::Mls`, each
//! operation one vault transaction as in the client (vaults are redb files in a temp dir).

use std::sync::Arc;
use std::time::{Duration, Instant};

use qpq_core::identity::Identity;
use qpq_core::mls::{CIPHERSUITE, Incoming, Kind, Mls};
use qpq_core::vault::{KdfParams, Vault};

use super::common::{self, Opts, Summary, Table, dur};

/// Runs the benchmark and prints its table.
pub fn run(opts: &Opts) -> anyhow::Result<()> {
    let sizes: &[usize] = if opts.quick { &[10, 50] } else { &[10, 100, 1000] };
    let reps = if opts.quick { 1 } else { 3 };
    let dir = tempfile::tempdir()?;
    let kdf = KdfParams { memory_kib: 8, iterations: 1, parallelism: 1 };
    let mut vaults = 0;
    let mut vault = || -> anyhow::Result<Arc<Vault>> {
        vaults += 1;
        Ok(Arc::new(Vault::create(&dir.path().join(format!("v{vaults}.qpq")), b"bench", kdf)?))
    };
    let mut t = Table::new(format!(
        "mls: suite 0x{:04X} (X-Wing, AES-128-GCM, SHA-256, Ed25519), qpq_core::mls::Mls",
        u16::from(CIPHERSUITE)
    ));

    let a0 = Mls::new(vault()?, Identity::generate());
    let mut create = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        a0.create(Kind::Group)?;
        create.push(t0.elapsed());
    }
    let c = Summary::of(&mut create);
    t.info("create group", format!("p50 {} (n={})", dur(c.p50), c.n));
    let mut kp = Vec::new();
    for _ in 0..5 {
        let t0 = Instant::now();
        a0.key_package()?;
        kp.push(t0.elapsed());
    }
    t.info("new KeyPackage", format!("p50 {}", dur(common::median(&mut kp))));

    for &n in sizes {
        let adder = Mls::new(vault()?, Identity::generate());
        let member = Mls::new(vault()?, Identity::generate());
        let group = adder.create(Kind::Group)?;
        // Setup, untimed: n - 2 stand-in members (one vault, one transaction) and `member`,
        // added in one commit.
        let others = vault()?;
        let mut kps = vec![member.key_package()?];
        others.atomic(|| -> anyhow::Result<()> {
            for _ in 0..n - 2 {
                kps.push(Mls::new(others.clone(), Identity::generate()).key_package()?);
            }
            Ok(())
        })?;
        let t0 = Instant::now();
        let out = adder.add(&group, &kps)?;
        adder.confirm(&group)?;
        let setup_add = t0.elapsed();
        let welcome = out.welcome.ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
        let t0 = Instant::now();
        common::ensure(
            matches!(member.process(&welcome)?, Incoming::Joined { .. }),
            "member did not join",
        )?;
        let setup_join = t0.elapsed();
        common::ensure(adder.members(&group)?.len() == n, "group has the wrong size")?;

        let (mut add, mut confirm, mut process, mut join) = (vec![], vec![], vec![], vec![]);
        let (mut enc, mut dec) = (vec![], vec![]);
        let (mut commit_len, mut welcome_len) = (0, 0);
        for _ in 0..reps {
            let joiner = Mls::new(vault()?, Identity::generate());
            let kp = joiner.key_package()?;
            let t0 = Instant::now();
            let out = adder.add(&group, &[kp])?;
            add.push(t0.elapsed());
            let t0 = Instant::now();
            adder.confirm(&group)?;
            confirm.push(t0.elapsed());
            let t0 = Instant::now();
            common::ensure(
                matches!(member.process(&out.commit)?, Incoming::Commit { .. }),
                "commit not processed",
            )?;
            process.push(t0.elapsed());
            let w = out.welcome.ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
            let t0 = Instant::now();
            common::ensure(
                matches!(joiner.process(&w)?, Incoming::Joined { .. }),
                "joiner did not join",
            )?;
            join.push(t0.elapsed());
            (commit_len, welcome_len) = (out.commit.len(), w.len());
            let t0 = Instant::now();
            let (ct, _) = adder.encrypt(&group, &[0x42; 128])?;
            enc.push(t0.elapsed());
            let t0 = Instant::now();
            common::ensure(
                matches!(member.process(&ct)?, Incoming::Application { .. }),
                "not decrypted",
            )?;
            dec.push(t0.elapsed());
        }
        let med = |v: &mut Vec<Duration>| common::median(v);
        let (a, c) = (med(&mut add), med(&mut confirm));
        t.info(
            format!("n={n}: setup, add {} members in one commit / first join", n - 1),
            format!("{} / {}", dur(setup_add), dur(setup_join)),
        );
        let label = format!("n={n}: add 1 member, adder (commit + merge)");
        let value = format!("{} ({} + {})", dur(a + c), dur(a), dur(c));
        if n >= 1000 {
            t.goal(label, value, "<= 250 ms", a + c <= Duration::from_millis(250));
        } else {
            t.info(label, value);
        }
        t.info(format!("n={n}: process that commit, existing member"), dur(med(&mut process)));
        t.info(format!("n={n}: join from the Welcome"), dur(med(&mut join)));
        t.info(format!("n={n}: commit / Welcome bytes"), format!("{commit_len} / {welcome_len}"));
        t.info(
            format!("n={n}: encrypt / decrypt 128 B application message"),
            format!("{} / {}", dur(med(&mut enc)), dur(med(&mut dec))),
        );
    }
    t.note(format!(
        "medians of {reps} (group grows by one each); every operation includes its vault \
         commit (redb, fsync) on this machine's disk"
    ));
    t.print();
    Ok(())
}

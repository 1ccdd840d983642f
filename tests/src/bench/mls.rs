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
        for filled in [false, true] {
            let mut g = Group::build(n, filled, &mut vault)?;
            let r = g.measure(reps, &mut vault)?;
            let shape = if filled { "tree filled by commits" } else { "fresh bulk-added tree" };
            t.info(
                format!("n={n} ({shape}): setup, add {} members in one commit / first join", n - 1),
                format!("{} / {}", dur(g.setup_add), dur(g.setup_join)),
            );
            if filled {
                t.info(
                    format!(
                        "n={n} ({shape}): setup, {} members commit an update",
                        g.updaters.len()
                    ),
                    dur(g.setup_fill),
                );
            }
            let label = format!("n={n} ({shape}): add 1 member, adder (commit + merge)");
            let value = format!("{} ({} + {})", dur(r.add + r.confirm), dur(r.add), dur(r.confirm));
            if n >= 1000 && filled {
                t.goal(label, value, "<= 250 ms", r.add + r.confirm <= Duration::from_millis(250));
            } else {
                t.info(label, value);
            }
            t.info(
                format!("n={n} ({shape}): process that commit, existing member"),
                dur(r.process),
            );
            t.info(format!("n={n} ({shape}): join from the Welcome"), dur(r.join));
            t.info(
                format!("n={n} ({shape}): commit / Welcome bytes"),
                format!("{} / {}", r.commit_len, r.welcome_len),
            );
            t.info(
                format!("n={n} ({shape}): encrypt / decrypt 128 B application message"),
                format!("{} / {}", dur(r.encrypt), dur(r.decrypt)),
            );
        }
    }
    t.note(format!(
        "medians of {reps} (group grows by one each); every operation includes its vault \
         commit (redb, fsync) on this machine's disk"
    ));
    t.note(
        "fresh bulk-added tree: right after one commit added everyone, the parent nodes are \
         blank, so a commit encrypts its path secrets to nearly every leaf (the worst case)",
    );
    t.note(
        "tree filled by commits: one member in each subtree beside the adder's path has \
         committed an update since (as happens in a group in use), so a commit encrypts to \
         about log2(n) nodes; the 250 ms goal is checked here",
    );
    t.print();
    Ok(())
}

/// A group of `n` built for measuring: the adder, an existing member, and (when `filled`) the
/// members whose update commits filled the subtrees beside the adder's path.
struct Group {
    adder: Mls,
    member: Mls,
    updaters: Vec<Mls>,
    id: Vec<u8>,
    setup_add: Duration,
    setup_join: Duration,
    setup_fill: Duration,
}

/// Medians of one measurement.
struct Row {
    add: Duration,
    confirm: Duration,
    process: Duration,
    join: Duration,
    encrypt: Duration,
    decrypt: Duration,
    commit_len: usize,
    welcome_len: usize,
}

impl Group {
    fn build(
        n: usize,
        filled: bool,
        vault: &mut impl FnMut() -> anyhow::Result<Arc<Vault>>,
    ) -> anyhow::Result<Self> {
        let adder = Mls::new(vault()?, Identity::generate());
        let member = Mls::new(vault()?, Identity::generate());
        let id = adder.create(Kind::Group)?;
        // The adder is leaf 0, `member` leaf 1, stand-in i leaf i + 2. The subtrees beside the
        // adder's path start at leaves 2, 4, 8, ...: their first leaves get their own vault (a
        // vault holds one member of a group) so that they can join and commit later.
        let others = vault()?;
        let mut kps = vec![member.key_package()?];
        let mut updaters = Vec::new();
        for leaf in 2..n {
            if filled && leaf.is_power_of_two() {
                let u = Mls::new(vault()?, Identity::generate());
                kps.push(u.key_package()?);
                updaters.push(u);
            }
        }
        others.atomic(|| -> anyhow::Result<()> {
            for leaf in 2..n {
                if !(filled && leaf.is_power_of_two()) {
                    kps.push(Mls::new(others.clone(), Identity::generate()).key_package()?);
                }
            }
            Ok(())
        })?;
        // Leaves follow the KeyPackage order: put each updater's at its leaf.
        let mut ordered = vec![kps[0].clone()];
        let (mut next_updater, mut next_other) = (1, 1 + updaters.len());
        for leaf in 2..n {
            if filled && leaf.is_power_of_two() {
                ordered.push(kps[next_updater].clone());
                next_updater += 1;
            } else {
                ordered.push(kps[next_other].clone());
                next_other += 1;
            }
        }
        let accounts = ordered
            .iter()
            .map(|kp| adder.key_package_account(kp))
            .collect::<Result<Vec<_>, _>>()?;
        let t0 = Instant::now();
        let out = adder.add(&id, &ordered, &accounts)?;
        adder.confirm(&id)?;
        let setup_add = t0.elapsed();
        let welcome = out.welcome.ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
        let t0 = Instant::now();
        common::ensure(
            matches!(member.process(&welcome)?, Incoming::Joined { .. }),
            "member did not join",
        )?;
        let setup_join = t0.elapsed();
        common::ensure(adder.members(&id)?.len() == n, "group has the wrong size")?;
        let mut g =
            Self { adder, member, updaters, id, setup_add, setup_join, setup_fill: Duration::ZERO };
        let t0 = Instant::now();
        for u in &g.updaters {
            common::ensure(matches!(u.process(&welcome)?, Incoming::Joined { .. }), "no join")?;
        }
        // Only admins commit: the updaters become admins first (one more commit of the setup).
        if !g.updaters.is_empty() {
            let mut admins = vec![g.adder.identity_key()];
            admins.extend(g.updaters.iter().map(|u| u.identity_key()));
            let out = g.adder.set_admins(&g.id, admins)?;
            g.adder.confirm(&g.id)?;
            for m in std::iter::once(&g.member).chain(&g.updaters) {
                let done = matches!(m.process(&out.commit)?, Incoming::Commit { .. });
                common::ensure(done, "promotion lost")?;
            }
        }
        for i in 0..g.updaters.len() {
            let out = g.updaters[i].self_update(&g.id)?;
            g.updaters[i].confirm(&g.id)?;
            g.deliver(&out.commit, Some(i))?;
        }
        g.setup_fill = t0.elapsed();
        Ok(g)
    }

    /// Has everyone but the committer (`g.adder` and updater `skip`) process a commit.
    fn deliver(&self, commit: &[u8], skip: Option<usize>) -> anyhow::Result<()> {
        let mut all = vec![&self.adder, &self.member];
        all.extend(
            self.updaters.iter().enumerate().filter(|(j, _)| Some(*j) != skip).map(|(_, u)| u),
        );
        for m in all {
            common::ensure(matches!(m.process(commit)?, Incoming::Commit { .. }), "commit lost")?;
        }
        Ok(())
    }

    fn measure(
        &mut self,
        reps: usize,
        vault: &mut impl FnMut() -> anyhow::Result<Arc<Vault>>,
    ) -> anyhow::Result<Row> {
        let (mut add, mut confirm, mut process, mut join) = (vec![], vec![], vec![], vec![]);
        let (mut enc, mut dec) = (vec![], vec![]);
        let (mut commit_len, mut welcome_len) = (0, 0);
        for _ in 0..reps {
            let joiner = Mls::new(vault()?, Identity::generate());
            let kp = joiner.key_package()?;
            let t0 = Instant::now();
            let out = self.adder.add(&self.id, &[kp], &[joiner.identity_key()])?;
            add.push(t0.elapsed());
            let t0 = Instant::now();
            self.adder.confirm(&self.id)?;
            confirm.push(t0.elapsed());
            let t0 = Instant::now();
            common::ensure(
                matches!(self.member.process(&out.commit)?, Incoming::Commit { .. }),
                "commit not processed",
            )?;
            process.push(t0.elapsed());
            for u in &self.updaters {
                common::ensure(matches!(u.process(&out.commit)?, Incoming::Commit { .. }), "lost")?;
            }
            let w = out.welcome.ok_or_else(|| anyhow::anyhow!("no Welcome"))?;
            let t0 = Instant::now();
            common::ensure(
                matches!(joiner.process(&w)?, Incoming::Joined { .. }),
                "joiner did not join",
            )?;
            join.push(t0.elapsed());
            (commit_len, welcome_len) = (out.commit.len(), w.len());
            let t0 = Instant::now();
            let (ct, _) = self.adder.encrypt(&self.id, &[0x42; 128])?;
            enc.push(t0.elapsed());
            let t0 = Instant::now();
            common::ensure(
                matches!(self.member.process(&ct)?, Incoming::Application { .. }),
                "not decrypted",
            )?;
            dec.push(t0.elapsed());
            for u in &self.updaters {
                u.process(&ct)?;
            }
        }
        let med = |v: &mut Vec<Duration>| common::median(v);
        Ok(Row {
            add: med(&mut add),
            confirm: med(&mut confirm),
            process: med(&mut process),
            join: med(&mut join),
            encrypt: med(&mut enc),
            decrypt: med(&mut dec),
            commit_len,
            welcome_len,
        })
    }
}

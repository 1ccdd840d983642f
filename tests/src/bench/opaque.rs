//! `opaque`: the cost of one OPAQUE login on the client and on the server (the
//! `qpq_core::opaque` client functions and opaque-ke's server side with our suite, in this
//! process), then full logins per second against the real server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use opaque_ke::{
    CredentialFinalization, CredentialRequest, RegistrationRequest, RegistrationUpload,
    ServerLogin, ServerLoginParameters, ServerRegistration, ServerSetup,
};
use qpq_core::opaque::{self, Suite};
use qpq_proto::{method, v1};
use qpq_tests::Client;

use super::common::{self, Opts, Summary, Table, dur};

/// Concurrent login loops against the real server (each on its own connections).
const CONCURRENCY: usize = 4;

/// Runs the benchmark and prints its table.
pub async fn run(opts: &Opts) -> anyhow::Result<()> {
    let rounds = if opts.quick { 3 } else { 20 };
    let secs = Duration::from_secs(if opts.quick { 1 } else { 10 });
    let steps = in_process(rounds)?;

    let dir = tempfile::tempdir()?;
    let args = common::limits(common::NO_AUTH_LIMITS);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = common::start_server(opts, dir.path(), &args)?;
    let pid = server.pid();
    let endpoint = Client::endpoint(&server.fingerprint)?;
    let mut names = Vec::new();
    for i in 0..CONCURRENCY {
        let name = format!("login{i}");
        let acct = common::account(&endpoint, &server, &name).await?;
        acct.client.conn.close(0u32.into(), b"");
        names.push((name, acct.identity));
    }

    // Full logins: a new connection each time, LoginStart, the client's KSF, LoginFinish.
    let logins = Arc::new(AtomicU64::new(0));
    let cpu0 = common::cpu_time(pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (name, identity) in names.clone() {
        let (endpoint, addr, logins) = (endpoint.clone(), server.addr, logins.clone());
        tasks.push(tokio::spawn(async move {
            while t0.elapsed() < secs {
                let c = Client::connect_on(&endpoint, addr).await?;
                login(&c, &name, identity).await?;
                c.conn.close(0u32.into(), b"");
                logins.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let full_elapsed = t0.elapsed();
    let full_cpu = common::cpu_time(pid)? - cpu0;
    let full = logins.load(Ordering::Relaxed);

    // LoginStart only (the server's expensive half), on open connections.
    let starts = Arc::new(AtomicU64::new(0));
    let cpu0 = common::cpu_time(pid)?;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for (name, _) in names {
        let c = Arc::new(Client::connect_on(&endpoint, server.addr).await?);
        for _ in 0..4 {
            let (c, starts, name) = (c.clone(), starts.clone(), name.clone());
            tasks.push(tokio::spawn(async move {
                while t0.elapsed() < secs / 2 {
                    let start = opaque::login_start(b"x")?;
                    let _: v1::OpaqueLoginStartResponse = c
                        .call(
                            method::OPAQUE_LOGIN_START,
                            &v1::OpaqueLoginStartRequest {
                                username: name.clone(),
                                request: start.request,
                            },
                        )
                        .await?;
                    starts.fetch_add(1, Ordering::Relaxed);
                }
                anyhow::Ok(())
            }));
        }
    }
    for t in tasks {
        t.await??;
    }
    let start_elapsed = t0.elapsed();
    let start_cpu = common::cpu_time(pid)? - cpu0;
    let start_n = starts.load(Ordering::Relaxed);

    let mut t = Table::new("opaque: login cost (ristretto255, 3DH/SHA-512, Argon2id 19 MiB x 2)");
    for (name, s) in [
        ("client login_start", &steps[0]),
        ("server ServerLogin::start", &steps[1]),
        ("client login_finish (Argon2id KSF)", &steps[2]),
        ("server ServerLogin::finish", &steps[3]),
    ] {
        t.info(
            format!("{name}, in process"),
            format!("p50 {} / max {} (n={})", dur(s.p50), dur(s.max), s.n),
        );
    }
    t.info(
        format!("full logins/s, real server, {CONCURRENCY} concurrent"),
        format!(
            "{:.1} ({full} in {:.1} s; server CPU {} per login)",
            full as f64 / full_elapsed.as_secs_f64(),
            full_elapsed.as_secs_f64(),
            dur(full_cpu / full.max(1) as u32)
        ),
    );
    t.info(
        format!("LoginStart RPCs/s, real server, {} in flight", CONCURRENCY * 4),
        format!(
            "{:.0} ({start_n} in {:.1} s; server CPU {} per call)",
            start_n as f64 / start_elapsed.as_secs_f64(),
            start_elapsed.as_secs_f64(),
            dur(start_cpu / start_n.max(1) as u32)
        ),
    );
    let per_login = full_cpu.as_secs_f64() / full.max(1) as f64;
    t.info(
        "server capacity estimate (1 core / server CPU per login)",
        format!("{:.0} logins/s", 1.0 / per_login.max(1e-9)),
    );
    t.note(
        "the bench client runs the Argon2id KSF on the same 2 cores, so full logins/s is bound \
         by the client; auth rate limits raised to 1,000,000 (burst and per minute) for this run",
    );
    t.print();
    Ok(())
}

/// One full login with the client's KSF off the async workers.
async fn login(c: &Client, name: &str, identity: [u8; 32]) -> anyhow::Result<()> {
    let password = format!("{name} password");
    let start = opaque::login_start(password.as_bytes())?;
    let resp: v1::OpaqueLoginStartResponse = c
        .call(
            method::OPAQUE_LOGIN_START,
            &v1::OpaqueLoginStartRequest { username: name.into(), request: start.request.clone() },
        )
        .await?;
    let finish = tokio::task::spawn_blocking(move || {
        opaque::login_finish(start, password.as_bytes(), &resp.response)
    })
    .await??;
    let _: v1::OpaqueLoginFinishResponse = c
        .call(
            method::OPAQUE_LOGIN_FINISH,
            &v1::OpaqueLoginFinishRequest {
                username: name.into(),
                finalization: finish.finalization,
                identity_key: identity.to_vec(),
                device_id: Vec::new(),
            },
        )
        .await?;
    Ok(())
}

/// Times each step of `rounds` logins in this process: client start, server start, client
/// finish, server finish.
fn in_process(rounds: usize) -> anyhow::Result<Vec<Summary>> {
    let mut rng = rand::rngs::OsRng;
    let setup = ServerSetup::<Suite>::new(&mut rng);
    let (user, password) = (b"bench".as_slice(), b"bench password".as_slice());
    let reg = opaque::register_start(password)?;
    let resp = ServerRegistration::<Suite>::start(
        &setup,
        RegistrationRequest::deserialize(&reg.request).map_err(|e| anyhow::anyhow!("{e:?}"))?,
        user,
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let upload = opaque::register_finish(reg, password, &resp.message.serialize())?;
    let record = ServerRegistration::<Suite>::finish(
        RegistrationUpload::deserialize(&upload).map_err(|e| anyhow::anyhow!("{e:?}"))?,
    );
    let mut times = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for _ in 0..rounds {
        let t = Instant::now();
        let start = opaque::login_start(password)?;
        times[0].push(t.elapsed());
        let t = Instant::now();
        let request =
            CredentialRequest::deserialize(&start.request).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let server = ServerLogin::start(
            &mut rng,
            &setup,
            Some(record.clone()),
            request,
            user,
            ServerLoginParameters::default(),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let response = server.message.serialize().to_vec();
        times[1].push(t.elapsed());
        let t = Instant::now();
        let finish = opaque::login_finish(start, password, &response)?;
        times[2].push(t.elapsed());
        let t = Instant::now();
        let fin = CredentialFinalization::deserialize(&finish.finalization)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        server
            .state
            .finish(fin, ServerLoginParameters::default())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        times[3].push(t.elapsed());
    }
    Ok(times.iter_mut().map(|s| Summary::of(s)).collect())
}

//! ldapsync-bench: the project's own load generator for `make bench`.
//!
//! Each subcommand runs one scenario against one LDAP URL and prints one JSON
//! object on stdout (bench/run.sh collects them). Latencies are recorded per
//! operation in an HDR histogram (nanoseconds, 3 significant digits).
//!
//! The data is bench/gen-data.sh's: people `uid=userNNNNNN,ou=bulk,…`
//! (N = 1..=users, password `bulk-secret`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, Mod, Scope};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Barrier;

const PEOPLE_BASE: &str = "ou=bulk,dc=example,dc=com";
const ROOT_DN: &str = "cn=admin,dc=example,dc=com";
const ROOT_PW: &str = "secret";
const USER_PW: &str = "bulk-secret";

#[derive(Parser)]
#[command(about = "LDAP load generator for ldapsync's benchmarks; prints one JSON object")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Target, e.g. ldap://127.0.0.1:3389
    #[arg(long)]
    url: String,
    /// People in the directory (uid=user000001 … userNNNNNN under ou=bulk)
    #[arg(long, default_value_t = 100_000)]
    users: u32,
    /// Seed for the uid sequence (the same for every target)
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Search by uid, one connection, one operation at a time: per-op latency.
    Latency {
        #[command(flatten)]
        c: Common,
        /// Operations measured (after a warm-up of ops/10)
        #[arg(long, default_value_t = 20_000)]
        ops: u64,
    },
    /// Search by uid on N connections, each sequential: throughput.
    Search {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 32)]
        conns: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Server processes whose CPU time (user + system, /proc/PID/stat)
        /// is reported per operation, as NAME=PID (repeatable)
        #[arg(long)]
        cpu: Vec<String>,
        /// A shell command run as the timed period starts and again once
        /// its last operation has ended, the operations waiting for it
        /// (`callgrind_control --dump PID`: a profile of the timed period
        /// alone, without the connections' set-up)
        #[arg(long)]
        at_edges: Option<String>,
    },
    /// Search by uid with DEPTH operations in flight on each of N
    /// connections (pipelining): throughput.
    Pipelined {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 4)]
        conns: usize,
        #[arg(long, default_value_t = 32)]
        depth: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Connection churn: connect, bind as a person, search, unbind; N at once.
    Churn {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 32)]
        conns: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
    },
    /// Modify (replace description) on people 1..=range as the root DN, N connections.
    Modify {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 8)]
        conns: usize,
        #[arg(long, default_value_t = 10.0)]
        secs: f64,
        /// Modify people user000001 … user<range>
        #[arg(long, default_value_t = 999)]
        range: u32,
    },
    /// Capture latency: modify through the proxy, then poll the local store
    /// (SQLite, read-only) until the new value is there.
    Capture {
        #[command(flatten)]
        c: Common,
        /// ldapsync's store: store.path, or store.url (postgresql://…)
        #[arg(long)]
        db: String,
        #[arg(long, default_value_t = 300)]
        ops: u64,
        #[arg(long, default_value_t = 999)]
        range: u32,
        /// Gap between writes, milliseconds (one write in flight at a time)
        #[arg(long, default_value_t = 5)]
        gap_ms: u64,
        /// Give up on one write after this many milliseconds
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Idle connections: open N TCP connections, optionally send one
    /// anonymous bind on each, then report the RSS growth of process PID.
    Idle {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 10_000)]
        conns: usize,
        /// The server's process id (its /proc/PID/status is read)
        #[arg(long)]
        pid: u32,
        /// Send an anonymous bind on each connection first (ldapsync then
        /// opens its upstream connection)
        #[arg(long)]
        bind: bool,
        /// Seconds to let the server settle before measuring
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
    },
    /// Connection storm: N clients released at once, each connecting,
    /// binding anonymously, searching once and unbinding; failed clients
    /// are counted, the run goes on.
    Storm {
        #[command(flatten)]
        c: Common,
        #[arg(long, default_value_t = 1_000)]
        conns: usize,
        /// Give up on one client after this many seconds (a timeout)
        #[arg(long, default_value_t = 30.0)]
        timeout_secs: f64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let out = match cli.cmd {
        // The sequential scenario runs on one thread: the least client
        // overhead per operation.
        Cmd::Latency { c, ops } => runtime(false)?.block_on(latency(c, ops))?,
        Cmd::Search {
            c,
            conns,
            secs,
            cpu,
            at_edges,
        } => runtime(true)?.block_on(search(c, conns, secs, cpu, at_edges))?,
        Cmd::Pipelined { c, conns, depth, secs } => runtime(true)?.block_on(pipelined(c, conns, depth, secs))?,
        Cmd::Churn { c, conns, secs } => runtime(true)?.block_on(churn(c, conns, secs))?,
        Cmd::Modify { c, conns, secs, range } => runtime(true)?.block_on(modify(c, conns, secs, range))?,
        Cmd::Capture {
            c,
            db,
            ops,
            range,
            gap_ms,
            timeout_ms,
        } => runtime(false)?.block_on(capture(c, db, ops, range, gap_ms, timeout_ms))?,
        Cmd::Idle {
            c,
            conns,
            pid,
            bind,
            settle,
        } => runtime(true)?.block_on(idle(c, conns, pid, bind, settle))?,
        Cmd::Storm { c, conns, timeout_secs } => runtime(true)?.block_on(storm(c, conns, timeout_secs))?,
    };
    println!("{out}");
    Ok(())
}

fn runtime(multi: bool) -> Result<tokio::runtime::Runtime> {
    let mut b = if multi {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    Ok(b.enable_all().build()?)
}

/// xorshift64*: a deterministic uid sequence without a dependency.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn user(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32 + 1
    }
}

fn uid(n: u32) -> String {
    format!("user{n:06}")
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1_000, 60_000_000_000, 3).expect("histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let _ = h.record((d.as_nanos() as u64).clamp(1_000, 60_000_000_000));
}

fn us(ns: u64) -> f64 {
    (ns as f64 / 1_000.0 * 10.0).round() / 10.0
}

fn percentiles(h: &Histogram<u64>) -> Value {
    json!({
        "count": h.len(),
        "mean_us": us(h.mean() as u64),
        "p50_us": us(h.value_at_quantile(0.50)),
        "p90_us": us(h.value_at_quantile(0.90)),
        "p99_us": us(h.value_at_quantile(0.99)),
        "p999_us": us(h.value_at_quantile(0.999)),
        "max_us": us(h.max()),
    })
}

async fn connect(url: &str) -> Result<Ldap> {
    let settings = LdapConnSettings::new().set_conn_timeout(Duration::from_secs(10));
    let (conn, ldap) = LdapConnAsync::with_settings(settings, url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    ldap3::drive!(conn);
    Ok(ldap)
}

async fn search_one(ldap: &mut Ldap, n: u32) -> Result<()> {
    let filter = format!("(uid={})", uid(n));
    let (entries, _res) = ldap
        .search(PEOPLE_BASE, Scope::Subtree, &filter, vec!["uid", "cn", "mail"])
        .await?
        .success()?;
    if entries.len() != 1 {
        bail!("{filter}: {} entries", entries.len());
    }
    Ok(())
}

async fn latency(c: Common, ops: u64) -> Result<Value> {
    let mut ldap = connect(&c.url).await?;
    let mut rng = Rng::new(c.seed);
    for _ in 0..ops / 10 {
        search_one(&mut ldap, rng.user(c.users)).await?;
    }
    let mut h = hist();
    let start = Instant::now();
    for _ in 0..ops {
        let n = rng.user(c.users);
        let t = Instant::now();
        search_one(&mut ldap, n).await?;
        record(&mut h, t.elapsed());
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = ldap.unbind().await;
    Ok(json!({"scenario": "latency", "url": c.url, "ops": ops, "secs": secs,
              "ops_per_s": ops as f64 / secs, "latency": percentiles(&h)}))
}

/// Runs `conns` workers that each loop `op` until the deadline, after all
/// have prepared (connected) and met at a barrier. Counts successful ops and
/// errors, merges the per-worker latency histograms.
async fn closed_loop<S, P, PF, O, OF>(
    conns: usize,
    secs: f64,
    seed: u64,
    prepare: P,
    op: O,
) -> Result<(u64, u64, f64, Histogram<u64>)>
where
    S: Send + 'static,
    P: Fn(usize) -> PF + Send + Sync + 'static,
    PF: std::future::Future<Output = Result<S>> + Send,
    O: Fn(S, u32) -> OF + Send + Sync + 'static,
    OF: std::future::Future<Output = (S, Result<()>)> + Send,
{
    let (ok, errors, elapsed, h, _) = closed_loop_cpu(conns, secs, seed, &Watch::default(), prepare, op).await?;
    Ok((ok, errors, elapsed, h))
}

/// What a closed loop watches besides its own operations.
#[derive(Default)]
struct Watch {
    /// Processes whose CPU time during the timed part is measured.
    cpu: Vec<(String, u32)>,
    /// Run at both edges of the timed part (`--at-edges`).
    at_edges: Option<String>,
}

impl Watch {
    fn edge(&self) -> Result<()> {
        let Some(command) = &self.at_edges else { return Ok(()) };
        let status = std::process::Command::new("sh").arg("-c").arg(command).status()?;
        anyhow::ensure!(status.success(), "--at-edges command failed: {status}");
        Ok(())
    }
}

/// [`closed_loop`], also measuring the CPU time the processes `watch.cpu`
/// spend during the timed part (microseconds each).
async fn closed_loop_cpu<S, P, PF, O, OF>(
    conns: usize,
    secs: f64,
    seed: u64,
    watch: &Watch,
    prepare: P,
    op: O,
) -> Result<(u64, u64, f64, Histogram<u64>, Vec<(String, f64)>)>
where
    S: Send + 'static,
    P: Fn(usize) -> PF + Send + Sync + 'static,
    PF: std::future::Future<Output = Result<S>> + Send,
    O: Fn(S, u32) -> OF + Send + Sync + 'static,
    OF: std::future::Future<Output = (S, Result<()>)> + Send,
{
    let prepare = Arc::new(prepare);
    let op = Arc::new(op);
    let barrier = Arc::new(Barrier::new(conns + 1));
    // Past the first edge: the timed part begins.
    let go = Arc::new(Barrier::new(conns + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::with_capacity(conns);
    for i in 0..conns {
        let (prepare, op, barrier, go, stop, errors) = (
            prepare.clone(),
            op.clone(),
            barrier.clone(),
            go.clone(),
            stop.clone(),
            errors.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let state = prepare(i).await;
            barrier.wait().await;
            go.wait().await;
            let mut state = state?;
            let mut h = hist();
            let mut rng = Rng::new(seed.wrapping_add(i as u64 * 7919));
            let mut ok = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let (s, r) = op(state, rng.user(u32::MAX)).await;
                state = s;
                match r {
                    Ok(()) => {
                        ok += 1;
                        record(&mut h, t.elapsed());
                    }
                    Err(e) => {
                        if errors.fetch_add(1, Ordering::Relaxed) < 3 {
                            eprintln!("ldapsync-bench: {e:#}");
                        }
                    }
                }
            }
            anyhow::Ok((ok, h))
        }));
    }
    barrier.wait().await;
    watch.edge()?;
    go.wait().await;
    let start = Instant::now();
    let cpu_start = watch
        .cpu
        .iter()
        .map(|(_, pid)| cpu_us(*pid))
        .collect::<Result<Vec<_>>>()?;
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let cpu_used = watch
        .cpu
        .iter()
        .zip(cpu_start)
        .map(|((name, pid), t0)| Ok((name.clone(), cpu_us(*pid)? - t0)))
        .collect::<Result<Vec<_>>>()?;
    let mut total = 0;
    let mut all = hist();
    let mut failed_workers = 0;
    for t in tasks {
        match t.await? {
            Ok((ok, h)) => {
                total += ok;
                all.add(&h).ok();
            }
            Err(e) => {
                failed_workers += 1;
                if failed_workers <= 3 {
                    eprintln!("ldapsync-bench: worker: {e:#}");
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    watch.edge()?;
    if failed_workers > 0 {
        eprintln!("ldapsync-bench: {failed_workers} of {conns} workers failed to start");
    }
    Ok((total, errors.load(Ordering::Relaxed), elapsed, all, cpu_used))
}

/// CPU time (user + system) of a process so far, in microseconds.
fn cpu_us(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).with_context(|| format!("process {pid}"))?;
    // Fields after the command name (which may hold spaces) end with ')'.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = 100.0; // USER_HZ, 100 on Linux
    Ok(ticks / hz * 1e6)
}

fn parse_cpu(cpu: &[String]) -> Result<Vec<(String, u32)>> {
    cpu.iter()
        .map(|s| {
            let (name, pid) = s.split_once('=').context("--cpu NAME=PID")?;
            Ok((name.to_owned(), pid.parse()?))
        })
        .collect()
}

async fn search(c: Common, conns: usize, secs: f64, cpu: Vec<String>, at_edges: Option<String>) -> Result<Value> {
    let watch = Watch {
        cpu: parse_cpu(&cpu)?,
        at_edges,
    };
    let users = c.users;
    let url = c.url.clone();
    let (ok, errors, elapsed, h, cpu_used) = closed_loop_cpu(
        conns,
        secs,
        c.seed,
        &watch,
        // A first search before the timed part: a relay that connects to
        // the directory at a session's first request does so untimed, as
        // one that connects at accept does.
        move |_| {
            let url = url.clone();
            async move {
                let mut ldap = connect(&url).await?;
                search_one(&mut ldap, 1).await?;
                Ok(ldap)
            }
        },
        move |mut ldap: Ldap, r| async move {
            let res = search_one(&mut ldap, r % users + 1).await;
            (ldap, res)
        },
    )
    .await?;
    let cpu_per_op: serde_json::Map<String, Value> = cpu_used
        .iter()
        .map(|(name, us)| (name.clone(), json!((us / ok.max(1) as f64 * 10.0).round() / 10.0)))
        .collect();
    Ok(
        json!({"scenario": "search", "url": c.url, "conns": conns, "secs": elapsed, "ops": ok,
              "errors": errors, "ops_per_s": ok as f64 / elapsed, "latency": percentiles(&h),
              "cpu_us_per_op": cpu_per_op}),
    )
}

/// `depth` workers share each of `conns` connections (an `Ldap` handle is
/// multiplexed), so each connection has up to `depth` searches in flight.
async fn pipelined(c: Common, conns: usize, depth: usize, secs: f64) -> Result<Value> {
    let users = c.users;
    let mut shared = Vec::with_capacity(conns);
    for _ in 0..conns {
        shared.push(connect(&c.url).await?);
    }
    let shared = Arc::new(shared);
    let (ok, errors, elapsed, h) = closed_loop(
        conns * depth,
        secs,
        c.seed,
        move |i| {
            let ldap = shared[i % shared.len()].clone();
            async move { Ok(ldap) }
        },
        move |mut ldap: Ldap, r| async move {
            let res = search_one(&mut ldap, r % users + 1).await;
            (ldap, res)
        },
    )
    .await?;
    Ok(
        json!({"scenario": "pipelined", "url": c.url, "conns": conns, "depth": depth, "secs": elapsed, "ops": ok,
              "errors": errors, "ops_per_s": ok as f64 / elapsed, "latency": percentiles(&h)}),
    )
}

async fn churn(c: Common, conns: usize, secs: f64) -> Result<Value> {
    let users = c.users;
    let url = Arc::new(c.url.clone());
    let (ok, errors, elapsed, h) = closed_loop(
        conns,
        secs,
        c.seed,
        |_| async { Ok(()) },
        move |(), r| {
            let url = url.clone();
            async move {
                let res = async {
                    let n = r % users + 1;
                    let mut ldap = connect(&url).await?;
                    ldap.simple_bind(&format!("uid={},{PEOPLE_BASE}", uid(n)), USER_PW)
                        .await?
                        .success()?;
                    search_one(&mut ldap, n).await?;
                    ldap.unbind().await?;
                    anyhow::Ok(())
                }
                .await;
                ((), res)
            }
        },
    )
    .await?;
    Ok(
        json!({"scenario": "churn", "url": c.url, "conns": conns, "secs": elapsed, "cycles": ok,
              "errors": errors, "cycles_per_s": ok as f64 / elapsed, "latency": percentiles(&h)}),
    )
}

async fn admin(url: &str) -> Result<Ldap> {
    let mut ldap = connect(url).await?;
    ldap.simple_bind(ROOT_DN, ROOT_PW).await?.success()?;
    Ok(ldap)
}

async fn modify_one(ldap: &mut Ldap, n: u32, value: &str) -> Result<()> {
    let dn = format!("uid={},{PEOPLE_BASE}", uid(n));
    ldap.modify(&dn, vec![Mod::Replace("description", HashSet::from([value]))])
        .await?
        .success()?;
    Ok(())
}

async fn modify(c: Common, conns: usize, secs: f64, range: u32) -> Result<Value> {
    let url = c.url.clone();
    let tag = format!("bench-{}", std::process::id());
    let (ok, errors, elapsed, h) = closed_loop(
        conns,
        secs,
        c.seed,
        move |_| {
            let url = url.clone();
            async move { admin(&url).await }
        },
        move |mut ldap: Ldap, r| {
            let value = format!("{tag}-{r}");
            async move {
                let res = modify_one(&mut ldap, r % range + 1, &value).await;
                (ldap, res)
            }
        },
    )
    .await?;
    Ok(
        json!({"scenario": "modify", "url": c.url, "conns": conns, "secs": elapsed, "ops": ok,
              "errors": errors, "ops_per_s": ok as f64 / elapsed, "latency": percentiles(&h)}),
    )
}

/// Where the capture scenario looks for a write: ldapsync's SQLite file,
/// or its PostgreSQL database.
enum Store {
    Sqlite(rusqlite::Connection),
    Postgres(tokio_postgres::Client),
}

const VISIBLE: &str = r#"SELECT count(*) FROM objects WHERE category = 'account' AND name = $1 AND "values" LIKE $2"#;

impl Store {
    async fn open(db: &str) -> Result<Store> {
        if db.starts_with("postgresql://") {
            let (client, connection) = tokio_postgres::connect(db, tokio_postgres::NoTls)
                .await
                .with_context(|| format!("connecting to {db}"))?;
            tokio::spawn(connection);
            return Ok(Store::Postgres(client));
        }
        let store = rusqlite::Connection::open_with_flags(
            db,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(|| format!("opening {db}"))?;
        store.busy_timeout(Duration::from_secs(5))?;
        Ok(Store::Sqlite(store))
    }

    async fn visible(&self, name: &str, pattern: &str) -> Result<bool> {
        Ok(match self {
            Store::Sqlite(c) => {
                let n: i64 = c
                    .prepare_cached(&VISIBLE.replace('$', "?"))?
                    .query_row(rusqlite::params![name, pattern], |r| r.get(0))?;
                n > 0
            }
            Store::Postgres(c) => c.query_one(VISIBLE, &[&name, &pattern]).await?.get::<_, i64>(0) > 0,
        })
    }
}

async fn capture(c: Common, db: String, ops: u64, range: u32, gap_ms: u64, timeout_ms: u64) -> Result<Value> {
    let store = Store::open(&db).await?;
    let mut ldap = admin(&c.url).await?;
    let mut rng = Rng::new(c.seed);
    let mut h = hist();
    let mut write = hist();
    let mut missed = 0u64;
    let tag = format!("cap{}x{}", std::process::id(), Instant::now().elapsed().as_nanos());
    let start = Instant::now();
    for i in 0..ops {
        let n = rng.user(range);
        let value = format!("{tag}-{i}");
        let pattern = format!("%{value}%");
        let t = Instant::now();
        modify_one(&mut ldap, n, &value).await?;
        record(&mut write, t.elapsed());
        let deadline = t + Duration::from_millis(timeout_ms);
        loop {
            if store.visible(&uid(n), &pattern).await? {
                record(&mut h, t.elapsed());
                break;
            }
            if Instant::now() > deadline {
                missed += 1;
                break;
            }
            tokio::time::sleep(Duration::from_micros(250)).await;
        }
        tokio::time::sleep(Duration::from_millis(gap_ms)).await;
    }
    Ok(
        json!({"scenario": "capture", "url": c.url, "ops": ops, "missed": missed,
              "secs": start.elapsed().as_secs_f64(),
              "visible": percentiles(&h), "write": percentiles(&write)}),
    )
}

fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// An anonymous simple bind, message id 1: 30 0c 02 01 01 60 07 02 01 03 04 00 80 00.
const ANON_BIND: [u8; 14] = [
    0x30, 0x0c, 0x02, 0x01, 0x01, 0x60, 0x07, 0x02, 0x01, 0x03, 0x04, 0x00, 0x80, 0x00,
];

async fn idle(c: Common, conns: usize, pid: u32, bind: bool, settle: f64) -> Result<Value> {
    let hostport = c
        .url
        .strip_prefix("ldap://")
        .context("idle: an ldap:// URL")?
        .trim_end_matches('/')
        .to_owned();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid)?;
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (sem, hostport) = (sem.clone(), hostport.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await?;
            let mut s = TcpStream::connect(&hostport).await?;
            if bind {
                s.write_all(&ANON_BIND).await?;
                let mut buf = [0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await??;
                // 30 LL 02 01 01 61 …: a bindResponse to message 1 (a Notice
                // of Disconnection, 78, means the server refused the connection).
                if n < 6 || buf[0] != 0x30 || buf[2..5] != [0x02, 0x01, 0x01] || buf[5] != 0x61 {
                    bail!("no bind response");
                }
            }
            anyhow::Ok(s)
        }));
    }
    let mut streams = Vec::with_capacity(conns);
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(s) => streams.push(s),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("ldapsync-bench: idle connection: {e:#}");
                }
            }
        }
    }
    tokio::time::sleep(Duration::from_secs_f64(settle)).await;
    // Alive: no data (a Notice of Disconnection) and no EOF waiting.
    let mut alive = 0usize;
    let mut buf = [0u8; 64];
    for s in &streams {
        if let Err(e) = s.try_read(&mut buf)
            && e.kind() == std::io::ErrorKind::WouldBlock
        {
            alive += 1;
        }
    }
    let after = rss_kib(pid)?;
    let per_conn = if alive > 0 {
        (after.saturating_sub(before)) as f64 * 1024.0 / alive as f64
    } else {
        0.0
    };
    drop(streams);
    Ok(
        json!({"scenario": "idle", "url": c.url, "bind": bind, "requested": conns, "opened": conns - failed,
              "alive": alive, "rss_before_kib": before, "rss_after_kib": after,
              "bytes_per_conn": per_conn.round()}),
    )
}

/// All clients wait at a barrier, so their connection attempts reach the
/// server's accept queue together: what is measured is how the listener
/// copes with a burst (backlog, accept rate, upstream connections opened at
/// once), which the churn scenario's steady 32 never shows. A client that
/// fails is counted by kind and the others go on.
async fn storm(c: Common, conns: usize, timeout_secs: f64) -> Result<Value> {
    let barrier = Arc::new(Barrier::new(conns + 1));
    let limit = Duration::from_secs_f64(timeout_secs);
    let mut rng = Rng::new(c.seed);
    let mut tasks = Vec::with_capacity(conns);
    for _ in 0..conns {
        let (barrier, url, n) = (barrier.clone(), c.url.clone(), rng.user(c.users));
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            match tokio::time::timeout(limit, storm_client(&url, n)).await {
                Ok(r) => r,
                Err(elapsed) => Err(elapsed.into()),
            }
        }));
    }
    barrier.wait().await;
    let start = Instant::now();
    let mut h = hist();
    let mut kinds = BTreeMap::from([("refused", 0u64), ("reset", 0), ("timeout", 0), ("other", 0)]);
    for t in tasks {
        match t.await? {
            Ok(first) => record(&mut h, first),
            Err(e) => {
                let kind = failure_kind(&e);
                *kinds.entry(kind).or_default() += 1;
                let failures: u64 = kinds.values().sum();
                if failures <= 3 {
                    eprintln!("ldapsync-bench: storm client ({kind}): {e:#}");
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let failures: u64 = kinds.values().sum();
    Ok(
        json!({"scenario": "storm", "url": c.url, "conns": conns, "secs": secs, "ok": h.len(),
              "failures": failures, "failure_kinds": kinds, "latency": percentiles(&h)}),
    )
}

/// One storm client; returns the time from the start of its connect to the
/// search's result, all a client waits for (an unbind has no response).
async fn storm_client(url: &str, n: u32) -> Result<Duration> {
    let t = Instant::now();
    let mut ldap = connect(url).await?;
    ldap.simple_bind("", "").await?.success()?;
    search_one(&mut ldap, n).await?;
    let first = t.elapsed();
    ldap.unbind().await?;
    Ok(first)
}

/// The ways a server overwhelmed by a burst turns clients away. ldap3 hides
/// the socket error of an established connection in its driver task: an
/// operation on a connection the server closed or reset fails as a closed
/// channel or a cut-off stream, which is counted as a reset.
fn failure_kind(e: &anyhow::Error) -> &'static str {
    for cause in e.chain() {
        if cause.is::<tokio::time::error::Elapsed>() {
            return "timeout";
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io_failure_kind(io);
        }
        if let Some(le) = cause.downcast_ref::<LdapError>() {
            return match le {
                LdapError::Io { source } => io_failure_kind(source),
                LdapError::Timeout { .. } => "timeout",
                LdapError::ResultRecv { .. } | LdapError::OpSend { .. } | LdapError::EndOfStream => "reset",
                _ => "other",
            };
        }
    }
    "other"
}

fn io_failure_kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused => "refused",
        ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof => "reset",
        TimedOut => "timeout",
        _ => "other",
    }
}

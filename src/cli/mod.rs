//! The command line: parses arguments, sets up logging and the runtime, and
//! runs the chosen command. The binary's `main` only calls [`main`].

mod admin;
mod check;
mod generate;
mod output;
mod status;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LdapUrl, LogConfig, LogFormat};
use crate::model::Category;
use crate::monitor::{self, Running};
use crate::proxy::{CaptureSink, LogSink, Proxy, Reloader};
use crate::tls::ServerTls;
use crate::worker;
use tokio_util::task::TaskTracker;

/// The version and the commit it was built from (build.rs).
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("LDAPSYNC_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(
    name = "ldapsync",
    version = VERSION,
    about = "LDAP proxy with a synchronization core",
    after_help = "Exit codes: 0 done; 1 failed; 2 bad usage; 3 done, but it needs an operator \
                  (a pass left disputes or held deletes, a connector is degraded); 4 no instance \
                  is running (status)."
)]
struct Cli {
    /// TOML configuration file (docs/configuration.md has every key). The
    /// administrative commands read ./ldapsync.toml when this is not given.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Print JSON instead of text, for scripts (every command that prints).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay LDAP clients to the directory.
    Serve(ServeArgs),
    /// Local accounts.
    #[command(subcommand)]
    Account(admin::ObjectCommand),
    /// Local groups (members in the `members` field).
    #[command(subcommand)]
    Group(admin::ObjectCommand),
    /// Set an account's password in the directory, read from standard input
    /// (over TLS only; never stored or logged).
    Password {
        /// The local account.
        name: String,
        #[arg(long)]
        connector: String,
    },
    /// Associations between local objects and directory entries.
    #[command(subcommand)]
    Association(admin::AssociationCommand),
    /// Sync passes.
    #[command(subcommand)]
    Sync(admin::SyncCommand),
    /// The running instance and each connector's state. Exits 3 when a
    /// connector is degraded (deletes held, out of sync, polls failing)
    /// and 4 when no instance is running.
    Status {
        /// Print nothing: only the exit code tells (for cron and monitoring).
        #[arg(long, short)]
        quiet: bool,
    },
    /// The audit trail of sync decisions and local edits.
    Journal(admin::JournalArgs),
    /// API tokens for scripts calling the admin API.
    #[command(subcommand)]
    Token(admin::TokenCommand),
    /// The store itself: copy an installation between SQLite and PostgreSQL.
    #[command(subcommand)]
    Store(admin::StoreCommand),
    /// Check a configuration file: every problem, with its key and a hint,
    /// and each connector's mapping against the directory's schema.
    CheckConfig {
        /// The file to check (default: --config, then ./ldapsync.toml).
        file: Option<PathBuf>,
    },
    /// Print the shell completion script for SHELL, e.g.
    /// `ldapsync completions bash > /etc/bash_completion.d/ldapsync`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (ldapsync.1 and one per subcommand) into DIR.
    #[command(hide = true)]
    ManPages { dir: PathBuf },
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Listen URL, e.g. ldap://127.0.0.1:3389; repeat for several. Replaces proxy.listen.
    #[arg(long)]
    listen: Vec<LdapUrl>,
    /// Directory URL, tried in order; repeat for several. Replaces proxy.upstream.
    #[arg(long)]
    upstream: Vec<LdapUrl>,
    /// Log filter, e.g. `debug` or `ldapsync=trace`. Replaces log.level; RUST_LOG wins over both.
    #[arg(long)]
    log_level: Option<String>,
    /// Serve /metrics, /healthz and /readyz over HTTP here, e.g.
    /// 127.0.0.1:9389. Replaces metrics.listen.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Log line format. Replaces log.format.
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Conformance mode: write RFC 4511 violations seen in either direction
    /// to this file (JSON lines). Replaces conformance.report.
    #[arg(long)]
    conformance_report: Option<PathBuf>,
}

impl ServeArgs {
    /// The file's settings with the flags laid over them.
    fn config(&self, file: Option<&PathBuf>) -> anyhow::Result<Config> {
        let mut config = match file {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if !self.listen.is_empty() {
            config.proxy.listen = self.listen.iter().cloned().map(Into::into).collect();
        }
        if !self.upstream.is_empty() {
            config.proxy.upstream = self.upstream.clone();
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
        if let Some(addr) = &self.metrics_listen {
            config.metrics.listen = Some(addr.clone());
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        if let Some(report) = &self.conformance_report {
            config.conformance.report = Some(report.clone());
        }
        config.proxy.conformance_report = config.conformance.report.clone();
        config.validate()?;
        config.validate_connectors()?;
        Ok(config)
    }
}

/// Outcomes that are not plain failures, with exit codes of their own
/// (listed in `--help`), for scripts.
#[derive(Debug, thiserror::Error)]
pub enum Exit {
    /// Done, but something needs an operator.
    #[error("needs attention: {0}")]
    NeedsAttention(String),
    #[error("ldapsync is not running (no answer on its admin socket)")]
    NotRunning,
}

impl Exit {
    fn code(&self) -> u8 {
        match self {
            Exit::NeedsAttention(_) => 3,
            Exit::NotRunning => 4,
        }
    }
}

/// Runs the command line; errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // A health check's answer is its exit code alone.
    let quiet = matches!(cli.command, Command::Status { quiet: true });
    match run(cli).and_then(|()| output::finish().map_err(anyhow::Error::msg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let exit = e.downcast_ref::<Exit>();
            if !(quiet && exit.is_some()) {
                // Not eprintln!, which panics when stderr is gone.
                let _ = writeln!(std::io::stderr(), "ldapsync: {e:#}");
            }
            match exit {
                Some(exit) => ExitCode::from(exit.code()),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let admin_config = || -> anyhow::Result<Config> {
        let path = cli.config.clone().unwrap_or_else(|| PathBuf::from("ldapsync.toml"));
        let config = Config::load(&path)?;
        config.validate_connectors()?;
        Ok(config)
    };
    match cli.command {
        Command::Serve(ref args) => serve(args.config(cli.config.as_ref())?, args.clone(), cli.config.clone()),
        Command::CheckConfig { ref file } => {
            let path = file
                .clone()
                .or(cli.config.clone())
                .unwrap_or_else(|| "ldapsync.toml".into());
            if check::check(&path) {
                Ok(())
            } else {
                anyhow::bail!("{} has problems", path.display())
            }
        }
        Command::Account(command) => admin::object(&admin_config()?, Category::Account, command, cli.json),
        Command::Group(command) => admin::object(&admin_config()?, Category::Group, command, cli.json),
        Command::Association(command) => admin::association(&admin_config()?, command, cli.json),
        Command::Password { name, connector } => admin::password(&admin_config()?, &name, &connector),
        Command::Sync(command) => admin::sync(&admin_config()?, command, cli.json),
        Command::Status { quiet } => status::status(&admin_config()?, cli.json, quiet),
        Command::Journal(args) => admin::journal(&admin_config()?, args, cli.json),
        Command::Token(command) => admin::token(&admin_config()?, command, cli.json),
        Command::Store(command) => admin::store_command(&admin_config()?, command, cli.json),
        Command::Completions { shell } => generate::completions(shell),
        Command::ManPages { ref dir } => generate::man_pages(dir),
    }
}

/// Changes the log filter of a running ldapsync (on SIGHUP).
type SetLogLevel = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// Starts logging; returns how to change the level later, unless RUST_LOG
/// fixes it. A log line that cannot be written is dropped: with internal
/// errors on, tracing reports the failed write with `eprintln!`, which
/// panics when stderr is gone, and took down whichever task was logging
/// (the signal watcher among them, so that ldapsync could not be stopped).
fn init_logging(log: &LogConfig) -> anyhow::Result<Option<SetLogLevel>> {
    let level = &log.level;
    let from_env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let filter = match &from_env {
        Some(from_env) => EnvFilter::try_new(from_env).context("RUST_LOG")?,
        None => EnvFilter::try_new(level).with_context(|| format!("log.level {level:?} is not a log filter"))?,
    };
    let set: SetLogLevel = match log.format {
        LogFormat::Text => {
            let builder = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .log_internal_errors(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| Ok(handle.reload(EnvFilter::try_new(level)?)?))
        }
        LogFormat::Json => {
            let builder = tracing_subscriber::fmt()
                .json()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .log_internal_errors(false)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| Ok(handle.reload(EnvFilter::try_new(level)?)?))
        }
    };
    Ok(from_env.is_none().then_some(set))
}

fn serve(config: Config, args: ServeArgs, file: Option<PathBuf>) -> anyhow::Result<()> {
    // What serve creates (the database, its admin socket, a conformance
    // report) holds directory data: owner-only from the first instant,
    // rather than chmod'ed after creation.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let set_log_level = init_logging(&config.log)?;
    // What check-config checks, serve refuses to start without.
    let problems = check::startup_problems(&config, true);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("; "));
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let workers = TaskTracker::new();
        // With connectors, captured writes feed their sync workers.
        let (sink, connectors): (Arc<dyn CaptureSink>, _) = if config.connectors.is_empty() {
            (Arc::new(LogSink), None)
        } else {
            let (router, reloader) = worker::start(&config, shutdown.clone(), &workers);
            (Arc::new(router), Some(reloader))
        };
        if !config.connectors.is_empty() {
            crate::admin::webhooks::start(&config, &shutdown, &workers);
        }
        // Bound first, so that a taken port fails the start, not later.
        let metrics = match &config.metrics.listen {
            Some(addr) => Some(monitor::bind(addr).await?),
            None => None,
        };
        let admin_api = crate::admin::http::bind(&config.admin).await?;
        let running = Running::new(&config.proxy)?;
        if let Some(reloader) = &connectors {
            running.set_connectors(running_connectors(reloader));
        }
        // The API works on the whole configuration; the proxy takes its part.
        let admin_config = admin_api.as_ref().map(|_| config.clone());
        let proxy = Proxy::new(config.proxy, sink)?;
        // Bound before the proxy's listeners, which say "listening".
        let admin_socket = monitor::bind_socket(config.store.admin_socket());
        let listeners = proxy.bind().await?;
        running.set_listening(listeners.iter().map(|l| l.state()).collect());
        if let Some(listener) = metrics {
            workers.spawn(monitor::serve(listener, Arc::clone(&running), shutdown.clone()));
        }
        if let (Some(listener), Some(config)) = (admin_api, admin_config) {
            workers.spawn(crate::admin::http::serve(listener, config, shutdown.clone()));
        }
        if let Some(socket) = admin_socket {
            workers.spawn(monitor::serve_socket(socket, Arc::clone(&running), shutdown.clone()));
        }
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        tokio::spawn(reload_on_sighup(Reload {
            args,
            file,
            proxy: proxy.reloader(),
            tls: proxy.server_tls(),
            set_log_level,
            connectors,
            running,
        }));
        proxy.serve(listeners, shutdown).await;
        workers.close();
        workers.wait().await;
        Ok(())
    })
}

/// What SIGHUP reloads without dropping sessions.
struct Reload {
    /// The command line's settings, laid over the file's again.
    args: ServeArgs,
    file: Option<PathBuf>,
    /// The relay's settings for new sessions.
    proxy: Reloader,
    /// The listeners' certificate and key.
    tls: Option<Arc<ServerTls>>,
    set_log_level: Option<SetLogLevel>,
    /// The connectors' running workers.
    connectors: Option<worker::ConnectorReloader>,
    /// What `status` reads of the running instance.
    running: Arc<Running>,
}

impl Reload {
    fn apply(&self) {
        if let Some(tls) = &self.tls {
            match tls.reload() {
                Ok(()) => tracing::info!("SIGHUP: certificate reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: certificate not reloaded; the previous one stays in use")
                }
            }
        }
        let Some(file) = &self.file else {
            return tracing::info!("SIGHUP: no config file to re-read");
        };
        // A configuration with any problem changes nothing.
        let config = match self.args.config(Some(file)) {
            Ok(config) => config,
            Err(e) => return tracing::error!(error = %e, "SIGHUP: config not reloaded; the running one stays"),
        };
        if let Some(set) = &self.set_log_level {
            match set(&config.log.level) {
                Ok(()) => tracing::info!(level = %config.log.level, "SIGHUP: log level reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: log level not reloaded"),
            }
        }
        if let Err(e) = self.running.set_upstream(&config.proxy) {
            tracing::error!(error = %e, "SIGHUP: readiness keeps probing the previous directory URLs");
        }
        match self.proxy.reload(config.proxy.clone()) {
            Ok(at_restart) => {
                tracing::info!(
                    "SIGHUP: directory URLs, TLS to the directory, timeouts and limits reloaded; \
                     new sessions use them, open ones keep theirs"
                );
                if !at_restart.is_empty() {
                    tracing::warn!(keys = at_restart.join(", "), "SIGHUP: changed, but applied at restart");
                }
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: relay settings not reloaded"),
        }
        if let Some(reloader) = &self.connectors {
            for change in reloader.reload(&config) {
                tracing::info!("SIGHUP: {change}");
            }
            self.running.set_connectors(running_connectors(reloader));
        }
    }
}

/// The policy each worker runs with, for `status`.
fn running_connectors(reloader: &worker::ConnectorReloader) -> Vec<monitor::RunningConnector> {
    reloader.running().iter().map(monitor::RunningConnector::from).collect()
}

/// SIGHUP re-reads the certificate and the config file; open sessions keep
/// going with what they started with.
async fn reload_on_sighup(reload: Reload) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => hup,
        Err(e) => return tracing::error!(error = %e, "cannot watch SIGHUP; reloads need a restart"),
    };
    while hup.recv().await.is_some() {
        reload.apply();
    }
}

/// SIGTERM or Ctrl-C starts a graceful shutdown.
async fn cancel_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops ldapsync gracefully");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    // The shutdown starts before it is logged: nothing about logging may
    // keep ldapsync from stopping.
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "interrupt",
    };
    shutdown.cancel();
    tracing::info!("{signal} received");
}

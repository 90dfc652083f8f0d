//! The `portcullis` command: parse the command line, validate the config before binding any
//! port, run, handle signals, map errors to exit codes.

use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use portcullis::auth::api_key;
use portcullis::config::{LogFormat, LogLevel};
use portcullis::{Config, Server};

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "An authenticating reverse-proxy sidecar"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        short,
        global = true,
        env = "PORTCULLIS_CONFIG",
        default_value = "proxy.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config and every file it names; print `ok`, or every problem as
    /// file:line:col: message.
    Check,
    /// Print a new API key and its keys-file `sha256` entry.
    Keygen {
        /// A user key (`mau_…`) instead of a server key (`mas_…`).
        #[arg(long)]
        user: bool,
    },
    /// Read a key from standard input and print its keys-file `sha256` entry.
    HashKey,
    /// Run an echo backend behind the proxy on loopback, with a fresh key, and print curl
    /// lines to try.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(cli.config),
        Command::Check => check(cli.config),
        Command::Keygen { user } => keygen(user),
        Command::HashKey => hash_key(),
        Command::Demo => {
            init_tracing(LogLevel::Info, LogFormat::Text);
            runtime()
                .and_then(|rt| rt.block_on(portcullis::demo::run()))
                .map_or_else(
                    |e| fail(&format!("demo failed: {e:#}")),
                    |_| ExitCode::SUCCESS,
                )
        }
    }
}

/// Write to stdout; a reader that went away (`| head -1`) is not an error worth a panic.
fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

fn fail(message: &str) -> ExitCode {
    eprintln!("portcullis: {message}");
    ExitCode::FAILURE
}

/// The runtime: one worker thread per CPU this process may run on. Pinned to one CPU
/// (`taskset`, a cgroup cpuset, a sidecar with one core), a single-threaded runtime does the
/// same work without cross-thread wake-ups.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    Ok(builder.enable_all().build()?)
}

fn init_tracing(level: LogLevel, format: LogFormat) {
    use tracing_subscriber::filter::LevelFilter;
    let level = match level {
        LogLevel::Error => LevelFilter::ERROR,
        LogLevel::Warn => LevelFilter::WARN,
        LogLevel::Info => LevelFilter::INFO,
        LogLevel::Debug => LevelFilter::DEBUG,
        LogLevel::Trace => LevelFilter::TRACE,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(path: PathBuf) -> ExitCode {
    // Validate everything before binding any port.
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(diags) => {
            eprintln!("{diags}");
            return fail(&format!(
                "{} problem(s) in the configuration; nothing was started",
                diags.0.len()
            ));
        }
    };
    init_tracing(config.log.level, config.log.format);
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => return fail(&format!("cannot start the runtime: {e}")),
    };
    rt.block_on(async {
        // Before any port is bound: a SIGHUP or SIGUSR1 sent as soon as the proxy answers
        // (systemctl reload, logrotate) is handled, never the default action (exit).
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
        };
        let server = match Server::bind(config).await {
            Ok(s) => s,
            Err(e) => return fail(&format!("{e:#}")),
        };
        #[cfg(unix)]
        portcullis::sdnotify::notify(&format!(
            "READY=1\nSTATUS=listening on {}",
            server.local_addr()
        ));
        match signals.wait(&server).await {
            Ok(name) => tracing::info!(signal = name, "shutting down"),
            Err(e) => tracing::error!(error = %e, "cannot wait for signals; shutting down"),
        }
        #[cfg(unix)]
        portcullis::sdnotify::notify("STOPPING=1");
        server.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// The signals portcullis handles: reload on SIGHUP, reopen the access log on SIGUSR1
/// (logrotate), stop on SIGTERM or SIGINT.
struct Signals {
    #[cfg(unix)]
    streams: [tokio::signal::unix::Signal; 4],
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Signals {
                streams: [
                    signal(SignalKind::terminate())?,
                    signal(SignalKind::interrupt())?,
                    signal(SignalKind::hangup())?,
                    signal(SignalKind::user_defined1())?,
                ],
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// Handle signals until one says stop; its name.
    async fn wait(&mut self, server: &Server) -> std::io::Result<&'static str> {
        #[cfg(unix)]
        {
            let [term, int, hup, usr1] = &mut self.streams;
            loop {
                tokio::select! {
                    _ = term.recv() => return Ok("SIGTERM"),
                    _ = int.recv() => return Ok("SIGINT"),
                    _ = hup.recv() => {
                        tracing::info!(signal = "SIGHUP", "reloading");
                        portcullis::sdnotify::notify("RELOADING=1");
                        server.reload().await;
                        portcullis::sdnotify::notify("READY=1");
                    }
                    _ = usr1.recv() => {
                        tracing::info!(signal = "SIGUSR1", "reopening the access log");
                        server.reopen_logs();
                    }
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = server;
            tokio::signal::ctrl_c().await?;
            Ok("ctrl-c")
        }
    }
}

fn check(path: PathBuf) -> ExitCode {
    match Config::load(&path) {
        Ok(config) => {
            for warning in &config.warnings {
                eprintln!("warning: {warning}");
            }
            print_out("ok\n");
            ExitCode::SUCCESS
        }
        Err(diags) => {
            print_out(&format!("{diags}\n"));
            eprintln!("portcullis: {} problem(s) found", diags.0.len());
            ExitCode::FAILURE
        }
    }
}

fn keygen(user: bool) -> ExitCode {
    match api_key::generate(if user { "mau_" } else { "mas_" }) {
        Ok(key) => {
            print_out(&format!("{key}\n{}\n", api_key::sha256_entry(&key)));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!("the OS random number generator failed: {e}")),
    }
}

fn hash_key() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        return fail(&format!("cannot read standard input: {e}"));
    }
    let key = input.trim();
    if key.is_empty() {
        return fail("no key on standard input; e.g. `printf %s \"$KEY\" | portcullis hash-key`");
    }
    if key.contains(char::is_whitespace) {
        return fail("the key contains white space; give one key");
    }
    print_out(&format!("{}\n", api_key::sha256_entry(key)));
    ExitCode::SUCCESS
}

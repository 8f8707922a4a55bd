//! `herd`: one binary for the node daemon and the operator's commands. The logic lives in the
//! `herd` library (src/lib.rs); this file only parses the command line and hands over.

use std::process::ExitCode;

use clap::Parser;
use herd::cli::{self, Command, NodeCommand};
use herd::{config, run};

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match args.command {
        Command::Daemon { ref config, log_format } => run_daemon(config, log_format),
        Command::Release { ref config } => release(config),
        Command::Completions { shell } => {
            let mut cmd = <cli::Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "herd", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Man => {
            let cmd = <cli::Cli as clap::CommandFactory>::command();
            match clap_mangen::Man::new(cmd).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("herd: man: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        _ => match run_client(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("herd: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_daemon(path: &std::path::Path, log_format: Option<config::LogFormat>) -> ExitCode {
    let config = match config::Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("herd: {e}");
            return ExitCode::from(2);
        }
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=error,sled=warn")),
        )
        .with_target(false)
        // Colours only on a terminal (journald and files get plain text).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    match log_format.unwrap_or(config.log_format) {
        config::LogFormat::Text => fmt.init(),
        config::LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
    // Every line carries the node name: a span entered for good on every runtime thread.
    let name = config.name.clone();
    let node_span = move || tracing::info_span!("herd", node = %name);
    std::mem::forget(node_span().entered());
    // Crash, don't limp: a panic outside the third-party panic boundaries aborts the daemon.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if herd::boundary::inside() {
            // A third-party library behind the panic boundary: that call's failure, not ours.
            tracing::error!("panic inside a third-party call (contained): {info}");
            return;
        }
        tracing::error!("panic: {info}");
        default_hook(info);
        std::process::abort();
    }));
    let on_start = node_span.clone();
    // Real-time scheduling for the runtime's threads and locked memory (issue 19, `sched`).
    herd::sched::init(config.scheduling.settings());
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::try_from(config.scheduling.workers).unwrap_or(1))
        .enable_all()
        .on_thread_start(move || std::mem::forget(on_start().entered()))
        .on_thread_park(herd::sched::on_worker_park)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(config)) {
        Ok(run::Exit::Stopped | run::Exit::HostShutdown) => ExitCode::SUCCESS,
        Ok(run::Exit::Restart) => {
            drop(runtime);
            restart()
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("herd: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Replaces this process with a fresh `herd` run with the same arguments (same pid: systemd
/// and the operator see the same service). Returns only if that fails.
fn restart() -> ExitCode {
    use std::os::unix::process::CommandExt;
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("cannot restart: {e}");
            return ExitCode::FAILURE;
        }
    };
    let e = std::process::Command::new(exe).args(std::env::args_os().skip(1)).exec();
    tracing::error!("cannot restart: {e}");
    eprintln!("herd: cannot restart: {e}");
    ExitCode::FAILURE
}

/// `herd release`: removes the floating addresses of this node's config, daemon or not.
fn release(path: &std::path::Path) -> ExitCode {
    let result = config::Config::load(path).map_err(|e| e.to_string()).and_then(|c| {
        let duties = c.primary.duties().map_err(|(k, e)| format!("{k}: {e}"))?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
        let errors = rt.block_on(duties.remove_ips());
        if errors.is_empty() {
            Ok(duties.ips.len())
        } else {
            Err(errors.join("; "))
        }
    });
    match result {
        Ok(n) => {
            println!("released {n} floating address(es)");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herd: release: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_client(args: &cli::Cli) -> Result<(), cli::CliError> {
    let (req, timeout) = cli::request(&args.command)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| cli::CliError::Usage(format!("cannot start the async runtime: {e}")))?;
    // Long waits show a spinner on a terminal; nothing otherwise (scripts, --json).
    let waiting = match &args.command {
        Command::JoinCluster(j) => Some(format!("joining the cluster through {}", j.peer)),
        Command::Node(NodeCommand::Primary { name, wait: true }) => Some(format!("moving the primary role to {name}")),
        Command::Node(NodeCommand::Flush { name, wait: true }) => Some(format!("moving every VM away from {name}")),
        Command::Node(NodeCommand::Ready { name, wait: true }) => Some(format!("bringing {name}'s VMs back")),
        Command::Node(NodeCommand::Secondary { name, wait: true }) => {
            Some(format!("moving the primary role away from {name}"))
        }
        Command::InitCluster => Some("creating the cluster".to_string()),
        _ => None,
    };
    let spinner = cli::spinner(waiting.filter(|_| !args.json));
    let value = runtime.block_on(cli::call(&args.socket, &req, timeout));
    spinner.finish_and_clear();
    let value = value?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        println!("{}", cli::render(&args.command, &value));
    }
    Ok(())
}

//! `herd`: one binary for the node daemon and the operator's commands. The logic lives in the
//! `herd` library (src/lib.rs); this file only parses the command line and hands over.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use herd::admin::AdminRequest;
use herd::cli::{self, CertCommand, ClusterCommand, Command, NodeCommand, TokenCommand, VmCommand};
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || std::mem::forget(on_start().entered()))
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("herd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("herd: {e}");
            ExitCode::FAILURE
        }
    }
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
    let (req, timeout) = match &args.command {
        Command::Daemon { .. } | Command::Release { .. } | Command::Completions { .. } | Command::Man => {
            return Err(cli::CliError::Usage("unreachable".into()))
        }
        Command::Node(NodeCommand::Flush { name, wait }) => {
            (AdminRequest::NodeFlush { name: name.clone(), ready: false, wait: *wait }, Duration::from_secs(600))
        }
        Command::Node(NodeCommand::Fence { name, yes }) => {
            (AdminRequest::NodeFence { name: name.clone(), yes: *yes }, Duration::from_secs(15))
        }
        Command::Node(NodeCommand::Ready { name, wait }) => {
            (AdminRequest::NodeFlush { name: name.clone(), ready: true, wait: *wait }, Duration::from_secs(600))
        }
        Command::Node(NodeCommand::Primary { name, wait }) => {
            (AdminRequest::NodePrimary { name: name.clone(), secondary: false, wait: *wait }, Duration::from_secs(45))
        }
        Command::Node(NodeCommand::Secondary { name, wait }) => {
            (AdminRequest::NodePrimary { name: name.clone(), secondary: true, wait: *wait }, Duration::from_secs(45))
        }
        Command::InitCluster => (AdminRequest::InitCluster {}, Duration::from_secs(30)),
        Command::JoinCluster(j) => {
            let token = cli::read_token(j)?;
            (AdminRequest::JoinCluster { peer: j.peer.clone(), token, role: j.role }, Duration::from_secs(150))
        }
        Command::Status => (AdminRequest::Status {}, Duration::from_secs(10)),
        Command::Node(NodeCommand::List) => (AdminRequest::NodeList {}, Duration::from_secs(10)),
        Command::Node(NodeCommand::Info { name, local }) => {
            (AdminRequest::NodeInfo { name: name.clone(), local: *local }, Duration::from_secs(10))
        }
        Command::Node(NodeCommand::Remove { name, force }) => {
            (AdminRequest::NodeRemove { name: name.clone(), force: *force }, Duration::from_secs(60))
        }
        Command::Heartbeat => (AdminRequest::Heartbeat {}, Duration::from_secs(10)),
        Command::Vm(VmCommand::Define { file, node, selector, limit, autostart, method }) => {
            let xml = std::fs::read_to_string(file)
                .map_err(|e| cli::CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let selector = selector.as_deref().map(str::parse).transpose().map_err(cli::CliError::Usage)?;
            let method = method.as_deref().map(str::parse).transpose().map_err(cli::CliError::Usage)?;
            let req = AdminRequest::VmDefine {
                xml,
                node: node.clone(),
                selector,
                limit: limit.clone(),
                autostart: *autostart,
                method,
            };
            (req, Duration::from_secs(20))
        }
        Command::Vm(VmCommand::List) => (AdminRequest::VmList {}, Duration::from_secs(10)),
        Command::Vm(VmCommand::Info { name, local }) => {
            (AdminRequest::VmInfo { name: name.clone(), local: *local }, Duration::from_secs(10))
        }
        Command::Vm(VmCommand::Modify { name, file }) => {
            let xml = std::fs::read_to_string(file)
                .map_err(|e| cli::CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            (AdminRequest::VmModify { name: name.clone(), xml }, Duration::from_secs(20))
        }
        Command::Vm(VmCommand::Undefine { name }) => {
            (AdminRequest::VmUndefine { name: name.clone() }, Duration::from_secs(20))
        }
        Command::Vm(VmCommand::Migrate { name, to, force_live }) => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: to.clone(),
                live: *force_live,
                permanent: false,
                unmigrate: false,
            };
            (req, Duration::from_secs(20))
        }
        Command::Vm(VmCommand::Unmigrate { name }) => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: None,
                live: false,
                permanent: false,
                unmigrate: true,
            };
            (req, Duration::from_secs(20))
        }
        Command::Vm(VmCommand::Move { name, to }) => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: Some(to.clone()),
                live: false,
                permanent: true,
                unmigrate: false,
            };
            (req, Duration::from_secs(20))
        }
        Command::Vm(c) => {
            use herd_storage::model::VmState;
            let (name, state) = match c {
                VmCommand::Start { name } => (name, VmState::Start),
                VmCommand::Stop { name } => (name, VmState::Stop),
                VmCommand::Shutdown { name } => (name, VmState::Shutdown),
                VmCommand::Restart { name } => (name, VmState::Restart),
                _ => match c {
                    VmCommand::Disable { name } => (name, VmState::Disable),
                    _ => return Err(cli::CliError::Usage("unreachable".into())),
                },
            };
            (AdminRequest::VmState { name: name.clone(), state }, Duration::from_secs(20))
        }
        Command::Events { limit } => (AdminRequest::Events { limit: Some(*limit) }, Duration::from_secs(10)),
        Command::Cluster(ClusterCommand::Info { local }) => {
            (AdminRequest::ClusterInfo { local: *local }, Duration::from_secs(10))
        }
        Command::Cluster(ClusterCommand::Maintenance { state }) => {
            (AdminRequest::Maintenance { on: state == "on" }, Duration::from_secs(20))
        }
        Command::Token(TokenCommand::Create { ttl, uses }) => {
            (AdminRequest::TokenCreate { ttl_ms: *ttl, uses: *uses }, Duration::from_secs(20))
        }
        Command::Token(TokenCommand::List) => (AdminRequest::TokenList {}, Duration::from_secs(10)),
        Command::Cert(CertCommand::Rotate) => (AdminRequest::CertRotate {}, Duration::from_secs(20)),
        Command::Token(TokenCommand::Revoke { id }) => {
            (AdminRequest::TokenRevoke { id: id.clone() }, Duration::from_secs(20))
        }
    };
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

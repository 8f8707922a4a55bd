//! The admin request each subcommand sends, and how long the CLI waits for its answer.

use std::time::Duration;

use super::{read_token, CertCommand, CliError, ClusterCommand, Command, NodeCommand, TokenCommand, VmCommand};
use crate::admin::AdminRequest;

/// The request for `command` and the CLI's deadline for it.
pub fn request(command: &Command) -> Result<(AdminRequest, Duration), CliError> {
    Ok(match command {
        Command::Daemon { .. } | Command::Release { .. } | Command::Completions { .. } | Command::Man => {
            return Err(CliError::Usage("unreachable".into()))
        }
        Command::InitCluster => (AdminRequest::InitCluster {}, Duration::from_secs(30)),
        Command::JoinCluster(j) => {
            let token = read_token(j)?;
            (AdminRequest::JoinCluster { peer: j.peer.clone(), token, role: j.role }, Duration::from_secs(150))
        }
        Command::Status => (AdminRequest::Status {}, Duration::from_secs(10)),
        Command::Heartbeat => (AdminRequest::Heartbeat {}, Duration::from_secs(10)),
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

        Command::Node(c) => node(c)?,
        Command::Vm(c) => vm(c)?,
    })
}

fn node(c: &NodeCommand) -> Result<(AdminRequest, Duration), CliError> {
    Ok(match c {
        NodeCommand::Flush { name, wait } => {
            (AdminRequest::NodeFlush { name: name.clone(), ready: false, wait: *wait }, Duration::from_secs(600))
        }
        NodeCommand::Shutdown { name, timeout } => (
            AdminRequest::NodeShutdown { name: name.clone().unwrap_or_default(), timeout_ms: Some(*timeout) },
            Duration::from_millis(*timeout) + Duration::from_secs(60),
        ),
        NodeCommand::Fence { name, yes } => {
            (AdminRequest::NodeFence { name: name.clone(), yes: *yes }, Duration::from_secs(15))
        }
        NodeCommand::Ready { name, wait } => {
            (AdminRequest::NodeFlush { name: name.clone(), ready: true, wait: *wait }, Duration::from_secs(600))
        }
        NodeCommand::Primary { name, wait } => {
            (AdminRequest::NodePrimary { name: name.clone(), secondary: false, wait: *wait }, Duration::from_secs(45))
        }
        NodeCommand::Secondary { name, wait } => {
            (AdminRequest::NodePrimary { name: name.clone(), secondary: true, wait: *wait }, Duration::from_secs(45))
        }
        NodeCommand::List => (AdminRequest::NodeList {}, Duration::from_secs(10)),
        NodeCommand::Info { name, local } => {
            (AdminRequest::NodeInfo { name: name.clone(), local: *local }, Duration::from_secs(10))
        }
        NodeCommand::Remove { name, force } => {
            (AdminRequest::NodeRemove { name: name.clone(), force: *force }, Duration::from_secs(60))
        }
    })
}

fn vm(c: &VmCommand) -> Result<(AdminRequest, Duration), CliError> {
    Ok(match c {
        VmCommand::Define { file, node, selector, limit, autostart, method } => {
            let xml = std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let selector = selector.as_deref().map(str::parse).transpose().map_err(CliError::Usage)?;
            let method = method.as_deref().map(str::parse).transpose().map_err(CliError::Usage)?;
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
        VmCommand::List => (AdminRequest::VmList {}, Duration::from_secs(10)),
        VmCommand::Info { name, local } => {
            (AdminRequest::VmInfo { name: name.clone(), local: *local }, Duration::from_secs(10))
        }
        VmCommand::Modify { name, file } => {
            let xml = std::fs::read_to_string(file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            (AdminRequest::VmModify { name: name.clone(), xml }, Duration::from_secs(20))
        }
        VmCommand::Undefine { name } => (AdminRequest::VmUndefine { name: name.clone() }, Duration::from_secs(20)),
        VmCommand::Migrate { name, to, force_live } => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: to.clone(),
                live: *force_live,
                permanent: false,
                unmigrate: false,
            };
            (req, Duration::from_secs(20))
        }
        VmCommand::Unmigrate { name } => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: None,
                live: false,
                permanent: false,
                unmigrate: true,
            };
            (req, Duration::from_secs(20))
        }
        VmCommand::Move { name, to } => {
            let req = AdminRequest::VmMigrate {
                name: name.clone(),
                to: Some(to.clone()),
                live: false,
                permanent: true,
                unmigrate: false,
            };
            (req, Duration::from_secs(20))
        }
        c => {
            use herd_storage::model::VmState;
            let (name, state) = match c {
                VmCommand::Start { name } => (name, VmState::Start),
                VmCommand::Stop { name } => (name, VmState::Stop),
                VmCommand::Shutdown { name } => (name, VmState::Shutdown),
                VmCommand::Restart { name } => (name, VmState::Restart),
                _ => match c {
                    VmCommand::Disable { name } => (name, VmState::Disable),
                    _ => return Err(CliError::Usage("unreachable".into())),
                },
            };
            (AdminRequest::VmState { name: name.clone(), state }, Duration::from_secs(20))
        }
    })
}

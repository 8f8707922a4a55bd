//! The built-in IPMI-over-LAN fence agent (RMCP+ through `ipmi-rs`).
//!
//! `ipmi-rs` 0.6 has traps that were seen live (`notes/hw-stack.md` §3), each handled here:
//! - it activates sessions at USER privilege: Set Session Privilege Level (admin) follows every
//!   activation, or Chassis Control is refused;
//! - it never sends Close Session (the session id is private): one session per BMC is kept and
//!   reused, new ones are rate-limited ([`MAX_NEW_SESSIONS`] per [`SESSION_WINDOW`]) so herd never
//!   fills a BMC's session slots, and a session idle long enough to have expired is replaced;
//! - it does not match replies to requests: after **any** error the session is thrown away
//!   (a fresh activation binds a fresh socket), so a late reply can never be taken for the
//!   answer to a later request;
//! - it is blocking with one receive timeout per reply and no retry: calls run on a blocking
//!   thread behind the panic boundary (it unwraps a socket send), the receive timeout a fraction
//!   of the call's deadline because one call makes several receives;
//! - it speaks cipher suite 3 only, as an Administrator: other BMCs use the external agent.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use ipmi_rs::connection::{IpmiCommand, Message, NetFn, NotEnoughData};
use ipmi_rs::rmcp::Rmcp;
use ipmi_rs::Ipmi;

use super::agent::{Action, FenceAgent, FenceError, Power, Purpose};

/// At most this many sessions are opened per BMC within [`SESSION_WINDOW`]: abandoned ones
/// (ipmi-rs cannot close them) expire on the BMC before the window lets new ones in.
pub const MAX_NEW_SESSIONS: usize = 4;
/// Of those, readiness checks may open at most this many: the rest is kept for fences.
pub const MAX_CHECK_SESSIONS: usize = MAX_NEW_SESSIONS - 1;
pub const SESSION_WINDOW: Duration = Duration::from_secs(30);
/// A session idle this long may have been expired by the BMC (≈30 s on ipmi_sim; 60 s is the
/// spec's default): it is replaced rather than risking a timeout on a fence.
const SESSION_IDLE_MAX: Duration = Duration::from_secs(20);
/// Receives one call may make (activation: ping, auth caps, open session, RAKP 1 and 3,
/// privilege; then the command): the per-receive timeout is the deadline divided by this.
const RECEIVES_PER_CALL: u32 = 7;

/// Get Chassis Status (NetFn Chassis, 0x01): bit 0 of the first byte is "power is on".
pub struct GetChassisStatus;

impl From<GetChassisStatus> for Message {
    fn from(_: GetChassisStatus) -> Message {
        Message::new_request(NetFn::Chassis, 0x01, vec![])
    }
}

impl IpmiCommand for GetChassisStatus {
    type Output = Power;
    type Error = NotEnoughData;
    fn parse_success_response(data: &[u8]) -> Result<Power, NotEnoughData> {
        data.first().map(|b| if b & 1 == 1 { Power::On } else { Power::Off }).ok_or(NotEnoughData)
    }
}

/// Chassis Control (NetFn Chassis, 0x02) with its one data byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChassisControl {
    PowerDown = 0,
    PowerUp = 1,
    PowerCycle = 2,
    HardReset = 3,
    SoftShutdown = 5,
}

impl From<ChassisControl> for Message {
    fn from(c: ChassisControl) -> Message {
        Message::new_request(NetFn::Chassis, 0x02, vec![c as u8])
    }
}

impl IpmiCommand for ChassisControl {
    type Output = ();
    type Error = NotEnoughData;
    fn parse_success_response(_: &[u8]) -> Result<(), NotEnoughData> {
        Ok(())
    }
}

/// Set Session Privilege Level (NetFn App, 0x3B); 4 = Administrator. The reply's one byte is
/// the new level.
pub struct SetSessionPrivilegeLevel(pub u8);

pub const PRIVILEGE_ADMIN: u8 = 0x04;

impl From<SetSessionPrivilegeLevel> for Message {
    fn from(p: SetSessionPrivilegeLevel) -> Message {
        Message::new_request(NetFn::App, 0x3B, vec![p.0])
    }
}

impl IpmiCommand for SetSessionPrivilegeLevel {
    type Output = u8;
    type Error = NotEnoughData;
    fn parse_success_response(data: &[u8]) -> Result<u8, NotEnoughData> {
        data.first().map(|b| b & 0x0f).ok_or(NotEnoughData)
    }
}

struct Session {
    ipmi: Ipmi<Rmcp>,
    last_used: Instant,
}

#[derive(Default)]
struct State {
    session: Option<Session>,
    /// When the recent sessions were opened (within [`SESSION_WINDOW`]).
    opened: VecDeque<Instant>,
    /// What the last failed call met (said when the session budget refuses the next one).
    last_failure: Option<String>,
}

/// One BMC: its address and credentials, and at most one session to it.
pub struct IpmiBmc {
    addr: String,
    user: String,
    password: String,
    state: Arc<Mutex<State>>,
}

impl IpmiBmc {
    pub fn new(addr: &str, user: &str, password: &str) -> IpmiBmc {
        IpmiBmc { addr: addr.into(), user: user.into(), password: password.into(), state: Arc::default() }
    }

    /// Sessions opened within the window (for tests and `herd status`).
    pub fn recent_sessions(&self) -> usize {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        prune(&mut g.opened);
        g.opened.len()
    }
}

fn prune(opened: &mut VecDeque<Instant>) {
    while opened.front().is_some_and(|t| t.elapsed() >= SESSION_WINDOW) {
        opened.pop_front();
    }
}

/// Maps an ipmi-rs error (by its Debug form: the crate's error enums are deep and unstable)
/// to what an operator can act on.
fn classify(bmc: &str, what: &str, debug: String, timeout: Duration) -> FenceError {
    let bmc = bmc.to_string();
    if debug.contains("ServerAuthenticationFailed") || debug.contains("Authcode") || debug.contains("Unauthorized") {
        FenceError::Auth { bmc }
    } else if debug.contains("WouldBlock") || debug.contains("TimedOut") {
        FenceError::Timeout { bmc, timeout }
    } else if debug.contains("ConnectionRefused") {
        FenceError::Refused { bmc }
    } else if debug.contains("InsufficientResources") {
        FenceError::Bmc { bmc, message: format!("{what}: the BMC has no free session slot") }
    } else {
        FenceError::Bmc { bmc, message: format!("{what}: {}", debug.chars().take(300).collect::<String>()) }
    }
}

/// A call for `purpose`, remembering what a failure met so that a later budget refusal can
/// say what actually failed.
fn blocking_call(
    addr: &str,
    user: &str,
    password: &str,
    state: &Mutex<State>,
    action: Action,
    recv_timeout: Duration,
    purpose: Purpose,
) -> Result<Power, FenceError> {
    // One session call; every early return is that call's outcome.
    let call = || -> Result<Power, FenceError> {
        let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
        // Taken out for the call: an error or a panic leaves no session behind (G3).
        let mut session = g.session.take().filter(|s| s.last_used.elapsed() < SESSION_IDLE_MAX);
        if session.is_none() {
            prune(&mut g.opened);
            let budget = match purpose {
                Purpose::Fence => MAX_NEW_SESSIONS,
                Purpose::Check => MAX_CHECK_SESSIONS,
            };
            if g.opened.len() >= budget {
                return Err(FenceError::RateLimited {
                    bmc: addr.into(),
                    count: g.opened.len(),
                    window: SESSION_WINDOW,
                    purpose,
                    last: g.last_failure.clone().unwrap_or_else(|| "nothing (no failure seen)".into()),
                });
            }
            let mut rmcp = Rmcp::new(addr, recv_timeout)
                .map_err(|e| FenceError::Bmc { bmc: addr.into(), message: format!("address: {e}") })?;
            g.opened.push_back(Instant::now());
            rmcp.activate(true, Some(user), Some(password.as_bytes()))
                .map_err(|e| classify(addr, "open session", format!("{e:?}"), recv_timeout))?;
            let mut ipmi = Ipmi::new(rmcp);
            let level = ipmi
                .send_recv(SetSessionPrivilegeLevel(PRIVILEGE_ADMIN))
                .map_err(|e| classify(addr, "raise privilege to admin", format!("{e:?}"), recv_timeout))?;
            if level != PRIVILEGE_ADMIN {
                return Err(FenceError::Bmc {
                    bmc: addr.into(),
                    message: format!("session privilege is {level}, not admin"),
                });
            }
            session = Some(Session { ipmi, last_used: Instant::now() });
        }
        let Some(mut s) = session else {
            return Err(FenceError::Bmc { bmc: addr.into(), message: "no session".into() });
        };
        let result = match action {
            Action::Status => s.ipmi.send_recv(GetChassisStatus).map_err(|e| format!("{e:?}")),
            Action::Off => {
                s.ipmi.send_recv(ChassisControl::PowerDown).map(|_| Power::Off).map_err(|e| format!("{e:?}"))
            }
            Action::On => s.ipmi.send_recv(ChassisControl::PowerUp).map(|_| Power::On).map_err(|e| format!("{e:?}")),
        };
        match result {
            Ok(p) => {
                s.last_used = Instant::now();
                g.session = Some(s);
                Ok(p)
            }
            Err(debug) => Err(classify(addr, &format!("chassis {}", action.as_str()), debug, recv_timeout)),
        }
    };
    let result = call();
    if let Err(e) = &result {
        if !matches!(e, FenceError::RateLimited { .. }) {
            state.lock().unwrap_or_else(|p| p.into_inner()).last_failure = Some(e.to_string());
        }
    }
    result
}

impl FenceAgent for IpmiBmc {
    fn call(&self, action: Action, deadline: Duration) -> BoxFuture<'_, Result<Power, FenceError>> {
        self.call_for(action, deadline, Purpose::Fence)
    }

    fn call_for(
        &self,
        action: Action,
        deadline: Duration,
        purpose: Purpose,
    ) -> BoxFuture<'_, Result<Power, FenceError>> {
        Box::pin(async move {
            let recv_timeout = (deadline / RECEIVES_PER_CALL).max(Duration::from_millis(20));
            let (addr, user, password, state) =
                (self.addr.clone(), self.user.clone(), self.password.clone(), self.state.clone());
            crate::boundary::run(crate::boundary::Library::Ipmi, "ipmi", deadline, move || {
                blocking_call(&addr, &user, &password, &state, action, recv_timeout, purpose)
            })
            .await
            .map_err(|e| FenceError::Boundary(format!("BMC {}: {e}", self.addr)))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(m: impl Into<Message>) -> (NetFn, u8, Vec<u8>) {
        let m = m.into();
        (m.netfn(), m.cmd(), m.data().to_vec())
    }

    #[test]
    fn command_encodings() {
        assert_eq!(encoded(GetChassisStatus), (NetFn::Chassis, 0x01, vec![]));
        assert_eq!(encoded(ChassisControl::PowerDown), (NetFn::Chassis, 0x02, vec![0]));
        assert_eq!(encoded(ChassisControl::PowerUp), (NetFn::Chassis, 0x02, vec![1]));
        assert_eq!(encoded(ChassisControl::PowerCycle), (NetFn::Chassis, 0x02, vec![2]));
        assert_eq!(encoded(ChassisControl::HardReset), (NetFn::Chassis, 0x02, vec![3]));
        assert_eq!(encoded(ChassisControl::SoftShutdown), (NetFn::Chassis, 0x02, vec![5]));
        assert_eq!(encoded(SetSessionPrivilegeLevel(PRIVILEGE_ADMIN)), (NetFn::App, 0x3B, vec![4]));
        assert_eq!(NetFn::Chassis.request_value(), 0x00);
        assert_eq!(NetFn::App.request_value(), 0x06);
    }

    #[test]
    fn response_parsing() {
        // Chassis status: byte 1 bit 0 = power on; the other bits are faults and policy.
        assert_eq!(GetChassisStatus::parse_success_response(&[0x01, 0, 0]), Ok(Power::On));
        assert_eq!(GetChassisStatus::parse_success_response(&[0x60, 0, 0]), Ok(Power::Off));
        assert_eq!(GetChassisStatus::parse_success_response(&[]), Err(NotEnoughData));
        assert_eq!(SetSessionPrivilegeLevel::parse_success_response(&[0x04]), Ok(4));
        assert_eq!(SetSessionPrivilegeLevel::parse_success_response(&[]), Err(NotEnoughData));
    }

    #[test]
    fn errors_are_classified_for_operators() {
        let t = Duration::from_millis(100);
        let e = |d: &str| classify("b:623", "x", d.to_string(), t);
        assert_eq!(e("V2_0(ServerAuthenticationFailed)"), FenceError::Auth { bmc: "b:623".into() });
        assert_eq!(
            e("PongReceive(Os { code: 11, kind: WouldBlock })"),
            FenceError::Timeout { bmc: "b:623".into(), timeout: t }
        );
        assert_eq!(
            e("PongReceive(Os { code: 111, kind: ConnectionRefused })"),
            FenceError::Refused { bmc: "b:623".into() }
        );
        assert!(e("CommonRakp(InsufficientResourcesForSessionCreation)").to_string().contains("no free session slot"));
    }

    #[test]
    fn new_sessions_are_rate_limited() {
        // Nothing listens on this port (refused at once): every call opens, fails, throws away.
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let addr = sock.local_addr().expect("addr").to_string();
        drop(sock);
        let state = Mutex::new(State::default());
        let t = Duration::from_millis(50);
        for _ in 0..MAX_CHECK_SESSIONS {
            let r = blocking_call(&addr, "admin", "pw", &state, Action::Status, t, Purpose::Check);
            assert!(matches!(r, Err(FenceError::Refused { .. } | FenceError::Timeout { .. })), "{r:?}");
        }
        // Checks have used theirs; a fence still gets the session kept for it.
        let r = blocking_call(&addr, "admin", "pw", &state, Action::Status, t, Purpose::Check);
        assert!(matches!(r, Err(FenceError::RateLimited { count: MAX_CHECK_SESSIONS, .. })), "{r:?}");
        let r = blocking_call(&addr, "admin", "pw", &state, Action::Off, t, Purpose::Fence);
        assert!(
            matches!(r, Err(FenceError::Refused { .. } | FenceError::Timeout { .. })),
            "the fence's own try: {r:?}"
        );
        let r = blocking_call(&addr, "admin", "pw", &state, Action::Off, t, Purpose::Fence);
        let Err(e @ FenceError::RateLimited { count: MAX_NEW_SESSIONS, .. }) = r else { panic!("{r:?}") };
        // The refusal says what actually failed before it.
        let text = e.to_string();
        assert!(text.contains("connection refused") || text.contains("no answer"), "{text}");
    }
}

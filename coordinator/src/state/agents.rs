//! Agents: registration, sessions, and whether a target can be reached.

use super::*;

/// How long an agent's session stays live after its last committed heartbeat. Heartbeats are
/// committed at least every `grpc::agent::LAST_SEEN_EVERY_MS` (10 s), so a running agent is
/// never taken for dead; a process that died without ending its session (SIGKILL, a crash, a
/// lost host) frees its identity for another process after this long.
pub const SESSION_TIMEOUT_MS: u64 = 30_000;

/// An agent the cluster knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    /// Name, as in its certificate.
    pub name: String,
    /// Its QUIC data endpoint (`host:port`), empty if it cannot receive.
    pub data_addr: String,
    /// When it first registered (unix ms, leader's clock).
    pub registered_ms: u64,
    /// When its session last registered or sent a committed heartbeat.
    pub last_seen_ms: u64,
    /// The session of the process that runs as this agent (random, chosen by the process at
    /// start); 0 once that process ended its session (a clean shutdown). Only the current
    /// session's calls are accepted.
    pub session: u64,
    /// The last registration refused because this session was live (empty: none): another
    /// process with the same identity. Shown to the operator and to the running agent.
    pub conflict: String,
    /// Whether, as a target, it applies files' owners (it runs as root).
    pub applies_owners: bool,
    /// Its data connections' congestion controller, as it registered it.
    pub congestion: String,
    /// The bytes one of its data connections may have in flight, as it registered it.
    pub window_bytes: u64,
    /// Its throttle as a source ([`ferry_common::throttle`] canonical text; empty: none).
    pub throttle: String,
    /// The directory it writes below as a target (empty: it is not one), or the URL of the
    /// object store it writes to.
    pub target_root: String,
    /// Uuids of deleted migrations this agent was source or target of, newest last (at most
    /// [`FORGET_MAX`]): its heartbeats carry them, and it removes what it keeps of them.
    #[serde(default)]
    pub forget: Vec<String>,
}

/// Most deleted migrations an agent is told to forget (the newest). An agent that stays away
/// while more are deleted keeps the local state of the older ones (files under its state
/// directory; nothing the coordinator needs).
pub const FORGET_MAX: usize = 256;

impl Agent {
    /// Whether, as a target, it writes to an object store (its root is a URL, not a path).
    pub fn writes_to_store(&self) -> bool {
        ferry_common::path::is_store_url(&self.target_root)
    }

    /// Whether a process runs as this agent: it has a session, heard from within
    /// [`SESSION_TIMEOUT_MS`] of `now_ms`.
    pub fn live(&self, now_ms: u64) -> bool {
        self.session != 0 && now_ms.saturating_sub(self.last_seen_ms) < SESSION_TIMEOUT_MS
    }

    /// Why sources cannot send to this agent, if they cannot: no data address, one nobody can
    /// dial, or the agent shut down.
    pub fn undialable(&self) -> Option<String> {
        let name = &self.name;
        if self.data_addr.is_empty() {
            return Some(format!(
                "agent {name} registered without a data address, so it cannot receive: set \
                 data_listen (and advertise_addr if sources reach it at another address) in its \
                 config and restart it"
            ));
        }
        match self.data_addr.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() || a.port() == 0 => Some(format!(
                "agent {name} advertises {}, which no source can dial: set advertise_addr in its \
                 config to the address sources reach it at, and restart it",
                self.data_addr
            )),
            Ok(_) => {
                if self.session == 0 {
                    Some(format!("agent {name} was shut down; start it again"))
                } else {
                    None
                }
            }
            Err(_) => Some(format!(
                "agent {name} advertises {:?}, which is not an IP address and port",
                self.data_addr
            )),
        }
    }

    /// Why a call of `session` is not this agent's current process's, if it is not.
    pub fn session_error(&self, session: u64) -> Option<String> {
        if session == self.session {
            return None;
        }
        let name = &self.name;
        Some(if self.session == 0 {
            format!(
                "agent {name}: session {session:016x} has ended; this process must register again"
            )
        } else {
            format!(
                "agent {name}: session {session:016x} is not current: another process registered \
                 as this agent (session {:016x}); this process must stop",
                self.session
            )
        })
    }
}

impl State {
    pub(super) fn register_agent(
        &mut self,
        name: String,
        data_addr: String,
        session: u64,
        previous: u64,
        now_ms: u64,
    ) -> Response {
        if session == 0 {
            return refused(format!(
                "agent {name} registered without a session; upgrade it to this coordinator's version"
            ));
        }
        if let Some(a) = self.agents.get_mut(&name) {
            let same = a.session == session;
            let succeeds = previous != 0 && a.session == previous;
            if !same && !succeeds && a.live(now_ms) {
                let seen = now_ms.saturating_sub(a.last_seen_ms) / 1000;
                let why = format!(
                    "agent {name} is already running: session {:016x} (data address {}) was \
                     heard from {seen} s ago, so a second process (session {session:016x}, data \
                     address {}) was refused. Two processes may not share an agent's identity: \
                     stop one of them. If the first one has died, start this one again after \
                     {} s (its session then expires)",
                    a.session,
                    if a.data_addr.is_empty() {
                        "none"
                    } else {
                        &a.data_addr
                    },
                    if data_addr.is_empty() {
                        "none"
                    } else {
                        &data_addr
                    },
                    SESSION_TIMEOUT_MS / 1000
                );
                a.conflict = format!("at {now_ms} (unix ms): {why}");
                self.dirty.agents.insert(name);
                return Response::Conflict(why);
            }
            if !same {
                // A new process: any earlier refusal is history.
                a.conflict.clear();
            }
            a.session = session;
            a.data_addr = data_addr;
            a.last_seen_ms = a.last_seen_ms.max(now_ms);
        } else {
            self.agents.insert(
                name.clone(),
                Agent {
                    name: name.clone(),
                    data_addr,
                    registered_ms: now_ms,
                    last_seen_ms: now_ms,
                    session,
                    conflict: String::new(),
                    applies_owners: false,
                    congestion: String::new(),
                    window_bytes: 0,
                    throttle: String::new(),
                    target_root: String::new(),
                    forget: Vec::new(),
                },
            );
        }
        self.dirty.agents.insert(name);
        Response::Ok
    }

    /// Whether `session` is the current session of `agent`.
    pub(super) fn check_session(&self, agent: &str, session: u64) -> Result<(), Response> {
        match self.agents.get(agent) {
            None => Err(refused(format!(
                "agent {agent} is not registered; register first"
            ))),
            Some(a) => a
                .session_error(session)
                .map_or(Ok(()), |why| Err(refused(why))),
        }
    }
}

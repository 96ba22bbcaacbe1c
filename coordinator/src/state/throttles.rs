//! Throttles: what a migration's source, or an agent as a source, may send per second. The
//! state keeps each as its canonical text; sources parse and apply it.

use ferry_common::throttle::Throttle;

use super::*;
use commands::ThrottleScope;

impl State {
    /// Sets a throttle. Its text must parse ([`Throttle`]); it is kept in canonical form, and
    /// "off" is kept as no throttle (empty).
    pub(super) fn set_throttle(&mut self, scope: ThrottleScope, text: &str) -> Response {
        let canonical = match text.parse::<Throttle>() {
            Ok(t) => t.stored(),
            Err(e) => return refused(e.to_string()),
        };
        match scope {
            ThrottleScope::Migration(id) => match self.migrations.get_mut(&id) {
                None => refused(format!("migration {id} does not exist")),
                // Between rounds the throttle is kept for the next one; once cut over, nothing
                // is sent again.
                Some(m)
                    if m.cutover
                        .as_ref()
                        .is_some_and(|c| c.phase == CutoverPhase::Done) =>
                {
                    refused(format!(
                        "migration {} was cut over: there is nothing left to throttle",
                        m.name
                    ))
                }
                Some(m) => {
                    m.throttle = canonical;
                    self.dirty.migrations.insert(id);
                    Response::Ok
                }
            },
            ThrottleScope::Agent(name) => match self.agents.get_mut(&name) {
                None => refused(format!(
                    "agent {name} is not registered; see `ferryctl agents list`"
                )),
                Some(a) => {
                    a.throttle = canonical;
                    self.dirty.agents.insert(name);
                    Response::Ok
                }
            },
        }
    }
}

//! A firewall in memory, for unit tests of what lume does around its
//! firewall (the watcher's repairs, the doctor's checks). The e2e tests use
//! nftables itself.

use std::sync::Mutex;

use super::foreign::Ruleset;
use super::{
    Accommodated, FirewallDriver, FirewallError, FirewallState, ForeignDrop, Opening,
    RulesetGeneration, Tables,
};

/// lume's table as the fake holds it, and what it was asked to do.
#[derive(Debug, Default)]
pub struct FakeFirewall {
    /// lume's table: `None` when missing (never written, or flushed).
    pub table: Mutex<Option<FirewallState>>,
    /// How many times lume's table was written whole.
    pub applies: Mutex<u32>,
    /// How many times it was changed from what lume last wrote.
    pub changes: Mutex<u32>,
    /// Another tool commits a change of its own during the next change.
    pub interfere: Mutex<bool>,
    /// The ruleset's generation: moved on by every change.
    pub generation: Mutex<u32>,
    /// How many times lume's tables were listed (`listing`).
    pub listings: Mutex<u32>,
    /// How many times the whole ruleset was listed (`ruleset`).
    pub rulesets: Mutex<u32>,
    /// Docker's chain is in the ruleset (`ruleset` shows it).
    pub docker: Mutex<bool>,
}

impl FakeFirewall {
    /// Removes lume's table behind lume's back (`nft flush ruleset`).
    pub fn flush(&self) {
        *self.table.lock().unwrap() = None;
        self.changed();
    }

    /// Another tool changed the ruleset (its own tables).
    pub fn changed(&self) {
        *self.generation.lock().unwrap() += 1;
    }

    pub fn listings(&self) -> u32 {
        *self.listings.lock().unwrap()
    }

    pub fn rulesets(&self) -> u32 {
        *self.rulesets.lock().unwrap()
    }

    pub fn state(&self) -> Option<FirewallState> {
        self.table.lock().unwrap().clone()
    }

    pub fn applies(&self) -> u32 {
        *self.applies.lock().unwrap()
    }

    pub fn changes(&self) -> u32 {
        *self.changes.lock().unwrap()
    }
}

impl FirewallDriver for FakeFirewall {
    fn apply(&self, state: &FirewallState) -> Result<Tables, FirewallError> {
        *self.applies.lock().unwrap() += 1;
        *self.table.lock().unwrap() = (!state.is_empty()).then(|| state.clone());
        self.changed();
        Ok(super::nft::tables(state))
    }

    fn apply_change(&self, last: &Tables, state: &FirewallState) -> Result<Tables, FirewallError> {
        *self.changes.lock().unwrap() += 1;
        if std::mem::take(&mut *self.interfere.lock().unwrap()) {
            self.changed();
        }
        let tables = super::nft::tables(state);
        if tables != *last {
            *self.table.lock().unwrap() = Some(state.clone());
            self.changed();
        }
        Ok(tables)
    }

    fn remove(&self) -> Result<(), FirewallError> {
        self.flush();
        Ok(())
    }

    fn present(&self) -> Result<bool, FirewallError> {
        Ok(self.table.lock().unwrap().is_some())
    }

    fn generation(&self) -> Option<RulesetGeneration> {
        Some(RulesetGeneration {
            namespace: 1,
            number: *self.generation.lock().unwrap(),
        })
    }

    fn listing(&self) -> Result<Option<String>, FirewallError> {
        *self.listings.lock().unwrap() += 1;
        Ok(self
            .table
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| format!("{s:?}")))
    }

    fn foreign_drops(&self) -> Result<Vec<ForeignDrop>, FirewallError> {
        Ok(Vec::new())
    }

    fn accommodate(&self, _openings: &[Opening]) -> Result<Accommodated, FirewallError> {
        Ok(Accommodated {
            changes: Vec::new(),
            tools: false,
        })
    }

    fn tools_present(&self) -> Result<bool, FirewallError> {
        Ok(false)
    }

    fn ruleset(&self) -> Result<Ruleset, FirewallError> {
        *self.rulesets.lock().unwrap() += 1;
        if !*self.docker.lock().unwrap() {
            return Ok(Ruleset::default());
        }
        Ok(Ruleset::parse(
            r#"{"nftables": [{"chain": {"family": "ip", "table": "filter", "name": "DOCKER-USER", "handle": 1}}]}"#,
        ))
    }

    fn accommodate_with(
        &self,
        _rs: Ruleset,
        openings: &[Opening],
    ) -> Result<Accommodated, FirewallError> {
        self.accommodate(openings)
    }
}

//! Access control in the style of RocketMQ's ACL 2.0: an access key is allowed or denied to
//! publish (`pub`) or subscribe (`sub`) per topic and consumer group, with prefix patterns.
//!
//! Rules live on the brokers, so the proxy stays stateless: rule `R` of key `K` is the queue
//! configuration `%ACL%K/R` (attributes `pub` and `sub`, each `allow` or `deny`), and all of a
//! key's rules are children of `%ACL%K`, on one shard. Each proxy trusts a key's rules for
//! `CACHE_TTL`, so a change reaches every proxy within it.
//!
//! The decision for (action, resource): among the key's rules that match the resource and state
//! the action, the most specific wins (a named kind over `*`; an exact name over a prefix; a
//! longer prefix over a shorter; any prefix over `*`); at equal specificity deny wins; with no
//! such rule the call is denied. Admin keys skip the rules, and while the ACL is on only they may
//! use the admin API (topics, groups, lookups, and these rules).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_transport::cluster::{BrokerPool, QueueRecord};
use sluice_transport::messages::{CreateQueueRequest, DeleteQueueRequest};
use sluice_transport::model::message_type;

use crate::error::{ProxyError, Result};

/// Prefix of the queue names that record rules.
pub const ACL_RECORD_PREFIX: &str = "%ACL%";
/// Longest access key that can carry rules; with `RESOURCE_MAX_BYTES` the record name stays
/// within the brokers' 255-byte queue names.
pub const ACCESS_KEY_MAX_BYTES: usize = 64;
/// Longest resource text (`topic:NAME`, `group:PREFIX*`, `*`).
pub const RESOURCE_MAX_BYTES: usize = 255 - ACL_RECORD_PREFIX.len() - ACCESS_KEY_MAX_BYTES - 1;
/// Rules one access key may hold.
pub const RULES_PER_KEY_MAX: usize = 256;
/// Rules `sluice acl list` returns at most across all keys.
pub const RULES_LISTED_MAX: usize = 100_000;
/// How long a key's rules are trusted before asking the broker again.
const CACHE_TTL: Duration = Duration::from_secs(2);
/// Keys whose rules are cached at most.
const CACHE_ENTRIES_MAX: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Pub,
    Sub,
}

impl Action {
    pub fn parse(text: &str) -> Result<Action> {
        match text.trim().to_ascii_lowercase().as_str() {
            "pub" | "publish" => Ok(Action::Pub),
            "sub" | "subscribe" => Ok(Action::Sub),
            other => Err(ProxyError::BadRequest(format!("action {other:?} is not \"pub\" or \"sub\""))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Action::Pub => "pub",
            Action::Sub => "sub",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Action::Pub => "publish to",
            Action::Sub => "subscribe to",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
}

impl Decision {
    fn parse(text: &str) -> Option<Decision> {
        match text {
            "allow" => Some(Decision::Allow),
            "deny" => Some(Decision::Deny),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Topic,
    Group,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Topic => "topic",
            Kind::Group => "group",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Prefix(String),
    Exact(String),
}

/// What a rule is about: `*` (every topic and group), `topic:*`, `topic:PREFIX*`, `topic:NAME`,
/// and the same for `group:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    kind: Option<Kind>,
    pattern: Pattern,
}

impl Resource {
    pub fn parse(text: &str) -> Result<Resource> {
        let bad = |why: &str| {
            ProxyError::BadRequest(format!(
                "resource {text:?} {why}; write topic:NAME, topic:PREFIX*, topic:*, group:NAME, group:PREFIX*, group:* or *"
            ))
        };
        if text.len() > RESOURCE_MAX_BYTES {
            return Err(bad(&format!("is longer than {RESOURCE_MAX_BYTES} bytes")));
        }
        if text == "*" {
            return Ok(Resource { kind: None, pattern: Pattern::Any });
        }
        let (kind, name) = text.split_once(':').ok_or_else(|| bad("names no kind"))?;
        let kind = match kind.to_ascii_lowercase().as_str() {
            "topic" => Kind::Topic,
            "group" => Kind::Group,
            _ => return Err(bad("is of no known kind")),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            return Err(bad("needs a name of visible ASCII characters other than '/'"));
        }
        let pattern = match name.strip_suffix('*') {
            Some("") => Pattern::Any,
            Some(prefix) => Pattern::Prefix(prefix.to_string()),
            None => Pattern::Exact(name.to_string()),
        };
        if matches!(&pattern, Pattern::Prefix(p) | Pattern::Exact(p) if p.contains('*')) {
            return Err(bad("has '*' other than at its end"));
        }
        Ok(Resource { kind: Some(kind), pattern })
    }

    /// The canonical text, as `parse` reads it.
    pub fn text(&self) -> String {
        let Some(kind) = self.kind else { return "*".into() };
        match &self.pattern {
            Pattern::Any => format!("{}:*", kind.name()),
            Pattern::Prefix(p) => format!("{}:{p}*", kind.name()),
            Pattern::Exact(name) => format!("{}:{name}", kind.name()),
        }
    }

    fn matches(&self, kind: Kind, name: &str) -> bool {
        if self.kind.is_some_and(|k| k != kind) {
            return false;
        }
        match &self.pattern {
            Pattern::Any => true,
            Pattern::Prefix(p) => name.starts_with(p.as_str()),
            Pattern::Exact(n) => n == name,
        }
    }

    /// Higher is more specific.
    fn specificity(&self) -> (bool, u8, usize) {
        let (rank, length) = match &self.pattern {
            Pattern::Any => (0, 0),
            Pattern::Prefix(p) => (1, p.len()),
            Pattern::Exact(n) => (2, n.len()),
        };
        (self.kind.is_some(), rank, length)
    }
}

/// One resource's decisions for a key; `None` states nothing about that action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub resource: Resource,
    pub publish: Option<Decision>,
    pub subscribe: Option<Decision>,
}

impl Rule {
    pub fn decision(&self, action: Action) -> Option<Decision> {
        match action {
            Action::Pub => self.publish,
            Action::Sub => self.subscribe,
        }
    }

    fn set(&mut self, action: Action, decision: Decision) {
        match action {
            Action::Pub => self.publish = Some(decision),
            Action::Sub => self.subscribe = Some(decision),
        }
    }

    fn attributes(&self) -> Vec<(String, String)> {
        [(Action::Pub, self.publish), (Action::Sub, self.subscribe)]
            .into_iter()
            .filter_map(|(action, d)| d.map(|d| (action.name().to_string(), d.name().to_string())))
            .collect()
    }

    /// The rule a broker record holds, or `None` for a record that is not one (left alone).
    fn of_record(record: &QueueRecord) -> Option<(String, Rule)> {
        let (key, resource) = record.name.strip_prefix(ACL_RECORD_PREFIX)?.split_once('/')?;
        let resource = Resource::parse(resource).ok()?;
        let decision = |action: Action| record.attribute(action.name()).and_then(Decision::parse);
        Some((key.to_string(), Rule { resource, publish: decision(Action::Pub), subscribe: decision(Action::Sub) }))
    }
}

/// What a call needs: one of `actions` on the resource `kind:name`.
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    pub kind: Kind,
    pub name: &'a str,
    pub actions: &'static [Action],
}

impl<'a> Need<'a> {
    pub fn publish(topic: &'a str) -> Need<'a> {
        Need { kind: Kind::Topic, name: topic, actions: &[Action::Pub] }
    }

    pub fn subscribe_topic(topic: &'a str) -> Need<'a> {
        Need { kind: Kind::Topic, name: topic, actions: &[Action::Sub] }
    }

    pub fn subscribe_group(group: &'a str) -> Need<'a> {
        Need { kind: Kind::Group, name: group, actions: &[Action::Sub] }
    }

    /// Routes serve producers and consumers alike.
    pub fn route(topic: &'a str) -> Need<'a> {
        Need { kind: Kind::Topic, name: topic, actions: &[Action::Pub, Action::Sub] }
    }
}

/// The deciding rule for `action` on `kind:name`, with its decision; `None` when no rule states it.
pub fn decide<'r>(rules: &'r [Rule], action: Action, kind: Kind, name: &str) -> Option<(&'r Rule, Decision)> {
    let mut best: Option<(&Rule, Decision)> = None;
    for rule in rules {
        let Some(decision) = rule.decision(action) else { continue };
        if !rule.resource.matches(kind, name) {
            continue;
        }
        best = match best {
            None => Some((rule, decision)),
            Some((b, bd)) => match rule.resource.specificity().cmp(&b.resource.specificity()) {
                std::cmp::Ordering::Greater => Some((rule, decision)),
                std::cmp::Ordering::Equal if decision == Decision::Deny => Some((rule, decision)),
                _ => Some((b, bd)),
            },
        };
    }
    best
}

/// `Ok` when `rules` grant `need`, else FORBIDDEN naming the resource and what decided.
fn check(rules: &[Rule], key: &str, need: &Need<'_>) -> Result<()> {
    let mut denied_by = None;
    for &action in need.actions {
        match decide(rules, action, need.kind, need.name) {
            Some((_, Decision::Allow)) => return Ok(()),
            Some((rule, Decision::Deny)) => denied_by = Some(rule.resource.text()),
            None => {}
        }
    }
    let wanted: Vec<&str> = need.actions.iter().map(|a| a.verb()).collect();
    let resource = format!("{} {:?}", need.kind.name(), need.name);
    let why = match denied_by {
        Some(rule) => format!("denied by its rule {rule}"),
        None => format!(
            "no rule allows it; an admin can add one with `sluice acl set {key} {}:{} --allow {}`",
            need.kind.name(),
            need.name,
            need.actions[0].name()
        ),
    };
    Err(ProxyError::Forbidden(format!("access key {key:?} may not {} {resource}: {why}", wanted.join(" or "))))
}

/// Why an access key cannot carry rules, or `Ok`.
pub fn check_access_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.len() > ACCESS_KEY_MAX_BYTES
        || !key.bytes().all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'#'))
    {
        return Err(ProxyError::BadRequest(format!(
            "access key {key:?} must be 1..={ACCESS_KEY_MAX_BYTES} visible ASCII characters other than '/' and '#'"
        )));
    }
    Ok(())
}

fn key_record(key: &str) -> String {
    format!("{ACL_RECORD_PREFIX}{key}")
}

fn rule_record(key: &str, resource: &Resource) -> String {
    format!("{ACL_RECORD_PREFIX}{key}/{}", resource.text())
}

/// A key's rules and when they were read.
type CachedRules = (Instant, Arc<[Rule]>);

pub struct Acl {
    enabled: bool,
    admin_keys: HashSet<String>,
    cache: Mutex<HashMap<String, CachedRules>>,
}

impl Acl {
    pub fn new(enabled: bool, admin_keys: HashSet<String>) -> Acl {
        Acl { enabled, admin_keys, cache: Mutex::default() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// `Ok` when the ACL is off or `key` is an admin key: the admin API's guard.
    pub fn admin(&self, key: Option<&str>) -> Result<()> {
        if !self.enabled || key.is_some_and(|k| self.admin_keys.contains(k)) {
            return Ok(());
        }
        Err(ProxyError::Forbidden(format!(
            "access key {:?} is not an admin key; while the ACL is on the admin API needs a key with admin = true",
            key.unwrap_or_default()
        )))
    }

    /// `Ok` when `key` may do everything `needs` names.
    pub async fn permit(&self, brokers: &BrokerPool, key: Option<&str>, needs: &[Need<'_>]) -> Result<()> {
        if !self.enabled || needs.is_empty() {
            return Ok(());
        }
        // With the ACL on, authentication is too (the configuration requires keys), so a call
        // without a key never reaches here; refuse it anyway rather than trust that.
        let key = key.ok_or_else(|| ProxyError::Forbidden("the ACL is on and the call names no access key".into()))?;
        if self.admin_keys.contains(key) {
            return Ok(());
        }
        let rules = self.cached_rules(brokers, key).await?;
        needs.iter().try_for_each(|need| check(&rules, key, need))
    }

    async fn cached_rules(&self, brokers: &BrokerPool, key: &str) -> Result<Arc<[Rule]>> {
        if let Some((at, rules)) = self.cache.lock().expect("acl cache lock").get(key) {
            if at.elapsed() < CACHE_TTL {
                return Ok(rules.clone());
            }
        }
        // A key that cannot carry rules has none: cached too, so its calls cost no broker trip.
        let rules: Arc<[Rule]> = match check_access_key(key) {
            Ok(()) => rules_of(brokers, key).await?.into(),
            Err(_) => Arc::from(Vec::new()),
        };
        let mut cache = self.cache.lock().expect("acl cache lock");
        if cache.len() >= CACHE_ENTRIES_MAX {
            cache.clear();
        }
        cache.insert(key.to_string(), (Instant::now(), rules.clone()));
        Ok(rules)
    }

    /// Sets `allow` and `deny` on the key's rule for `resource` (created if missing); the
    /// rule's other action keeps its decision.
    pub async fn set(
        &self,
        brokers: &BrokerPool,
        key: &str,
        resource: &str,
        allow: &[Action],
        deny: &[Action],
    ) -> Result<Rule> {
        check_access_key(key)?;
        let resource = Resource::parse(resource)?;
        if allow.is_empty() && deny.is_empty() {
            return Err(ProxyError::BadRequest("a rule needs --allow or --deny (pub, sub or both)".into()));
        }
        if let Some(both) = allow.iter().find(|a| deny.contains(a)) {
            return Err(ProxyError::BadRequest(format!("{} is both allowed and denied", both.name())));
        }
        let rules = rules_of(brokers, key).await?;
        let existing = rules.iter().find(|r| r.resource == resource).cloned();
        if existing.is_none() && rules.len() >= RULES_PER_KEY_MAX {
            return Err(ProxyError::BadRequest(format!(
                "access key {key:?} already has {RULES_PER_KEY_MAX} rules; use prefix patterns or remove some"
            )));
        }
        let mut rule = existing.clone().unwrap_or(Rule { resource, publish: None, subscribe: None });
        allow.iter().for_each(|&a| rule.set(a, Decision::Allow));
        deny.iter().for_each(|&a| rule.set(a, Decision::Deny));
        let request = CreateQueueRequest {
            queue: rule_record(key, &rule.resource),
            message_type: message_type::NORMAL,
            attributes: rule.attributes(),
            update: existing.is_some(),
        };
        brokers.call_for(&request.queue, &request).await?;
        self.forget(key);
        Ok(rule)
    }

    /// Removes the key's rule for `resource`, or all its rules when `None`; returns how many.
    pub async fn remove(&self, brokers: &BrokerPool, key: &str, resource: Option<&str>) -> Result<u32> {
        check_access_key(key)?;
        let only = resource.map(Resource::parse).transpose()?;
        let mut removed = 0;
        for rule in rules_of(brokers, key).await? {
            if only.as_ref().is_some_and(|r| *r != rule.resource) {
                continue;
            }
            let queue = rule_record(key, &rule.resource);
            match brokers.call_for(&queue, &DeleteQueueRequest { queue: queue.clone() }).await {
                Ok(_) => removed += 1,
                Err(e) if e.code() == sluice_transport::model::codes::QUEUE_NOT_FOUND => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.forget(key);
        Ok(removed)
    }

    /// (key, rule) for `key`, or for every key when `None`, sorted by key then resource.
    pub async fn list(&self, brokers: &BrokerPool, key: Option<&str>) -> Result<Vec<(String, Rule)>> {
        let records = match key {
            Some(key) => {
                check_access_key(key)?;
                brokers.child_records(&key_record(key), RULES_PER_KEY_MAX).await?
            }
            None => brokers.queue_records(ACL_RECORD_PREFIX).await?,
        };
        let mut rules: Vec<(String, Rule)> =
            records.iter().filter_map(Rule::of_record).take(RULES_LISTED_MAX).collect();
        rules.sort_by(|a, b| (&a.0, a.1.resource.text()).cmp(&(&b.0, b.1.resource.text())));
        Ok(rules)
    }

    fn forget(&self, key: &str) {
        self.cache.lock().expect("acl cache lock").remove(key);
    }
}

/// The key's rules as its shard holds them now.
async fn rules_of(brokers: &BrokerPool, key: &str) -> Result<Vec<Rule>> {
    let records = brokers.child_records(&key_record(key), RULES_PER_KEY_MAX).await?;
    Ok(records.iter().filter_map(Rule::of_record).map(|(_, rule)| rule).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(resource: &str, publish: Option<Decision>, subscribe: Option<Decision>) -> Rule {
        Rule { resource: Resource::parse(resource).unwrap(), publish, subscribe }
    }

    const A: Option<Decision> = Some(Decision::Allow);
    const D: Option<Decision> = Some(Decision::Deny);

    #[test]
    fn resources_parse_and_print_back() {
        for text in ["*", "topic:*", "topic:orders", "topic:orders-*", "group:g1", "group:g*"] {
            assert_eq!(Resource::parse(text).unwrap().text(), text);
        }
        assert_eq!(Resource::parse("Topic:x").unwrap().text(), "topic:x");
        for bad in ["", "orders", "queue:x", "topic:", "topic:a*b", "topic:**", "topic:a/b", "topic:a b"] {
            assert!(Resource::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(Resource::parse(&format!("topic:{}", "x".repeat(RESOURCE_MAX_BYTES))).is_err());
    }

    #[test]
    fn the_most_specific_rule_decides_and_deny_wins_a_tie() {
        let rules = vec![
            rule("*", A, None),
            rule("topic:orders-*", D, A),
            rule("topic:orders-eu*", A, None),
            rule("topic:orders-eu-secret", D, None),
            rule("group:*", None, A),
        ];
        let pub_on = |name| decide(&rules, Action::Pub, Kind::Topic, name).map(|(r, d)| (r.resource.text(), d));
        assert_eq!(pub_on("news"), Some(("*".into(), Decision::Allow)));
        assert_eq!(pub_on("orders-us"), Some(("topic:orders-*".into(), Decision::Deny)));
        assert_eq!(pub_on("orders-eu-1"), Some(("topic:orders-eu*".into(), Decision::Allow)));
        assert_eq!(pub_on("orders-eu-secret"), Some(("topic:orders-eu-secret".into(), Decision::Deny)));
        // A rule silent on an action does not decide it: sub on "news" has no rule at all.
        assert_eq!(decide(&rules, Action::Sub, Kind::Topic, "news"), None);
        assert_eq!(decide(&rules, Action::Sub, Kind::Topic, "orders-eu-1").map(|(_, d)| d), Some(Decision::Allow));
        // Kinds do not mix: topic rules say nothing of groups.
        assert_eq!(decide(&rules, Action::Sub, Kind::Group, "orders-1").map(|(_, d)| d), Some(Decision::Allow));
        assert_eq!(
            decide(&rules, Action::Pub, Kind::Group, "orders-1").map(|(r, _)| r.resource.text()),
            Some("*".into())
        );
        // Equal specificity: deny wins whichever comes first.
        let tie = vec![rule("topic:t", A, None), rule("topic:t", D, None)];
        assert_eq!(decide(&tie, Action::Pub, Kind::Topic, "t").map(|(_, d)| d), Some(Decision::Deny));
        let tie: Vec<Rule> = tie.into_iter().rev().collect();
        assert_eq!(decide(&tie, Action::Pub, Kind::Topic, "t").map(|(_, d)| d), Some(Decision::Deny));
    }

    #[test]
    fn a_refusal_names_the_resource_and_what_to_do() {
        let rules = vec![rule("topic:a*", A, D)];
        assert!(check(&rules, "k", &Need::publish("ab")).is_ok());
        let e = check(&rules, "k", &Need::subscribe_topic("ab")).unwrap_err();
        assert!(matches!(e, ProxyError::Forbidden(_)));
        let text = e.to_string();
        assert!(text.contains("subscribe to topic \"ab\"") && text.contains("rule topic:a*"), "{text}");
        let text = check(&rules, "k", &Need::publish("b")).unwrap_err().to_string();
        assert!(text.contains("sluice acl set k topic:b --allow pub"), "{text}");
        // Routes need either action.
        assert!(check(&rules, "k", &Need::route("ab")).is_ok());
        assert!(check(&[rule("topic:x", None, A)], "k", &Need::route("x")).is_ok());
        assert!(check(&[], "k", &Need::route("x")).is_err());
    }

    #[test]
    fn records_round_trip_and_foreign_ones_are_skipped() {
        let r = rule("group:g*", None, D);
        let record = QueueRecord {
            name: rule_record("app1", &r.resource),
            message_type: message_type::NORMAL,
            attributes: r.attributes(),
            messages: 0,
        };
        assert_eq!(Rule::of_record(&record), Some(("app1".to_string(), r)));
        let foreign = QueueRecord { name: "%ACL%app1".into(), ..record };
        assert_eq!(Rule::of_record(&foreign), None);
        assert!(check_access_key("app-1_X").is_ok());
        for bad in ["", "a/b", "a#1", "a b", &"k".repeat(ACCESS_KEY_MAX_BYTES + 1)] {
            assert!(check_access_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn admin_keys_pass_the_admin_guard_only_when_the_acl_is_on() {
        let on = Acl::new(true, HashSet::from(["root".to_string()]));
        assert!(on.admin(Some("root")).is_ok());
        assert!(matches!(on.admin(Some("app")), Err(ProxyError::Forbidden(_))));
        assert!(on.admin(None).is_err());
        let off = Acl::new(false, HashSet::new());
        assert!(off.admin(Some("app")).is_ok() && off.admin(None).is_ok());
    }
}

//! Weighted fairness across tenants: a NORMAL topic with a `fair_key` attribute shares its
//! deliveries among the values of that user property (the tenants) by weight. The proxy writes
//! these attributes on every queue of the topic; each broker shard reads them from its queues.

use std::collections::HashMap;

use super::record::name_hash;

/// Queue attribute: the user property whose value is a message's tenant.
pub const KEY_ATTRIBUTE: &str = "fair_key";
/// Queue attribute: `tenant=weight` pairs, comma-separated.
pub const WEIGHTS_ATTRIBUTE: &str = "fair_weights";
/// Queue attribute: the weight of every tenant not listed.
pub const DEFAULT_WEIGHT_ATTRIBUTE: &str = "fair_default_weight";

/// Largest weight. The ratio between weights bounds how long a light tenant waits, so it is
/// kept small enough to reason about.
pub const WEIGHT_MAX: u32 = 1_000;
/// Longest key property name and tenant name in a weight list.
pub const NAME_MAX_BYTES: usize = 64;
/// Longest weight list (it is stored as one queue attribute).
pub const WEIGHTS_MAX_BYTES: usize = 255;

/// Tenants' weights by `record::name_hash` of the tenant. Messages without the key property
/// form one tenant of their own (hash 0) at the default weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    by_hash: HashMap<u64, u32>,
    pub default_weight: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights { by_hash: HashMap::new(), default_weight: 1 }
    }
}

impl Weights {
    /// Reads `tenant=weight,…` and a default weight (`None`: 1). Errors say what to fix.
    pub fn parse(list: &str, default_weight: Option<&str>) -> Result<Weights, String> {
        let default_weight = match default_weight {
            None | Some("") => 1,
            Some(w) => parse_weight("the default weight", w)?,
        };
        let pairs = parse_list(list)?;
        let by_hash = pairs.iter().map(|(tenant, weight)| (name_hash(tenant), *weight)).collect();
        Ok(Weights { by_hash, default_weight })
    }

    /// The weight of the tenant with this `name_hash`.
    pub fn of(&self, tenant_hash: u64) -> u32 {
        self.by_hash.get(&tenant_hash).copied().unwrap_or(self.default_weight)
    }
}

/// The `(tenant, weight)` pairs of a weight list, checked.
pub fn parse_list(list: &str) -> Result<Vec<(String, u32)>, String> {
    if list.len() > WEIGHTS_MAX_BYTES {
        return Err(format!("the weight list is {} bytes; at most {WEIGHTS_MAX_BYTES}", list.len()));
    }
    let mut pairs: Vec<(String, u32)> = Vec::new();
    for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let Some((tenant, weight)) = item.split_once('=') else {
            return Err(format!("weight {item:?} is not tenant=weight"));
        };
        let tenant = tenant.trim();
        check_name("tenant", tenant)?;
        if pairs.iter().any(|(t, _)| t == tenant) {
            return Err(format!("tenant {tenant:?} is given two weights"));
        }
        pairs.push((tenant.to_string(), parse_weight(&format!("the weight of {tenant:?}"), weight.trim())?));
    }
    Ok(pairs)
}

/// Writes pairs back as a weight list.
pub fn format_list(pairs: &[(String, u32)]) -> String {
    pairs.iter().map(|(t, w)| format!("{t}={w}")).collect::<Vec<_>>().join(",")
}

/// A key property name or tenant: 1..=64 bytes, no control characters, `,` or `=`.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX_BYTES
        && !name.chars().any(|c| c.is_control() || c == ',' || c == '=');
    if ok {
        Ok(())
    } else {
        Err(format!("{what} {name:?} must be 1..={NAME_MAX_BYTES} bytes without control characters, ',' or '='"))
    }
}

fn parse_weight(what: &str, text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(w) if (1..=WEIGHT_MAX).contains(&w) => Ok(w),
        _ => Err(format!("{what} is {text:?}; it must be a whole number 1..={WEIGHT_MAX}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_by_tenant_with_a_default() {
        let w = Weights::parse("a=1, b=2,c=4", Some("3")).unwrap();
        assert_eq!((w.of(name_hash("a")), w.of(name_hash("b")), w.of(name_hash("c"))), (1, 2, 4));
        assert_eq!(w.of(name_hash("someone-else")), 3);
        assert_eq!(w.of(0), 3, "messages without the key property");
        assert_eq!(Weights::parse("", None).unwrap(), Weights::default());
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        for (list, needle) in [
            ("a", "tenant=weight"),
            ("a=0", "1..=1000"),
            ("a=1001", "1..=1000"),
            ("a=x", "whole number"),
            ("=3", "tenant \"\""),
            ("a=1,a=2", "two weights"),
        ] {
            let e = Weights::parse(list, None).unwrap_err();
            assert!(e.contains(needle), "{list:?}: {e}");
        }
        assert!(Weights::parse(&"a=1,".repeat(100), None).unwrap_err().contains("at most 255"));
        assert!(Weights::parse("", Some("0")).is_err());
        assert_eq!(parse_list(" x = 2 ,y=5").unwrap(), [("x".to_string(), 2), ("y".to_string(), 5)]);
        assert_eq!(format_list(&parse_list("x=2,y=5").unwrap()), "x=2,y=5");
    }
}

//! `sluice acl`: the access-control rules (ACL 2.0 style) kept on the brokers, over the admin API.

use sluice_proto::sluice::admin::v1 as admin;

use super::client::{admin, check, grpc, Connection};

pub async fn set(c: &Connection, request: admin::SetAclRuleRequest) -> Result<(), String> {
    let reply = admin(c).await?.set_acl_rule(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    print_rules(c, &reply, "")
}

pub async fn list(c: &Connection, access_key: Option<String>) -> Result<(), String> {
    let request = admin::ListAclRulesRequest { access_key: access_key.unwrap_or_default() };
    let reply = admin(c).await?.list_acl_rules(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    print_rules(c, &reply, "no rules; add one with `sluice acl set KEY topic:NAME --allow pub`")
}

pub async fn remove(c: &Connection, access_key: String, resource: Option<String>) -> Result<(), String> {
    let request =
        admin::RemoveAclRulesRequest { access_key: access_key.clone(), resource: resource.unwrap_or_default() };
    let reply = admin(c).await?.remove_acl_rules(request).await.map_err(grpc)?.into_inner();
    check(reply.status.as_ref())?;
    if c.json {
        println!("{}", serde_json::json!({ "access_key": access_key, "removed": reply.removed }));
    } else {
        println!("removed {} rule(s) of access key {access_key}", reply.removed);
    }
    Ok(())
}

fn print_rules(c: &Connection, reply: &admin::AclRulesResponse, none: &str) -> Result<(), String> {
    if c.json {
        let rules: Vec<serde_json::Value> = reply
            .rules
            .iter()
            .map(|r| serde_json::json!({ "access_key": r.access_key, "resource": r.resource, "pub": r.r#pub, "sub": r.sub }))
            .collect();
        println!("{}", serde_json::json!({ "enabled": reply.enabled, "rules": rules }));
        return Ok(());
    }
    if !reply.enabled {
        println!("note: the ACL is off at this proxy (proxy.acl = false): these rules are kept but not enforced");
    }
    if reply.rules.is_empty() && !none.is_empty() {
        println!("{none}");
        return Ok(());
    }
    let shown = |d: &str| if d.is_empty() { "-".to_string() } else { d.to_string() };
    println!("{:<24} {:<48} {:>6} {:>6}", "ACCESS KEY", "RESOURCE", "PUB", "SUB");
    for r in &reply.rules {
        println!("{:<24} {:<48} {:>6} {:>6}", r.access_key, r.resource, shown(&r.r#pub), shown(&r.sub));
    }
    Ok(())
}

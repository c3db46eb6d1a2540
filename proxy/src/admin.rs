//! `sluice.admin.v1.Admin`: topics and stats, served on the gRPC port beside the messaging
//! service. Guarded by the same access keys.

use std::sync::Arc;

use std::collections::{BTreeMap, HashMap};

use sluice_transport::messages::{GroupStatsRequest, GroupStatsResponse, StatsRequest, StatsResponse};
use tonic::{Request, Response, Status as GrpcStatus};

use crate::acl::Action;
use crate::error::{ok_status, ProxyError};
use crate::groups::{GroupChange, GroupMeta, Throttle};
use crate::pb::sluice::admin::v1::admin_server::Admin;
use crate::pb::sluice::admin::v1::*;
use crate::state::ProxyState;
use crate::topics::{Fairness, TopicChange, TopicMeta};

type GrpcResult<T> = Result<Response<T>, GrpcStatus>;

/// (group, topic) pairs asked of each shard, and kept in all, for `GetStats`.
const GROUP_STATS_PER_SHARD_MAX: u32 = 10_000;
const GROUP_STATS_MAX: usize = 10_000;

#[derive(Clone)]
pub struct AdminService {
    pub state: Arc<ProxyState>,
}

fn info(meta: &TopicMeta, messages: u64) -> TopicInfo {
    TopicInfo {
        name: meta.name.clone(),
        message_type: i32::from(meta.message_type),
        queue_count: meta.queue_count,
        messages,
        lite_ttl_minutes: meta.lite_ttl_minutes,
        max_send_tps: meta.max_send_tps,
        send_throttle: meta.send_throttle.name().to_string(),
        fair_key: meta.fairness.key.clone(),
        fair_weights: meta.fairness.weights.clone(),
        fair_default_weight: meta.fairness.default_weight,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_topic(&self, request: Request<CreateTopicRequest>) -> GrpcResult<CreateTopicResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let message_type =
                u8::try_from(r.message_type).map_err(|_| ProxyError::BadRequest("bad message type".into()))?;
            let fair = Fairness {
                key: r.fair_key.clone(),
                weights: r.fair_weights.clone(),
                default_weight: r.fair_default_weight,
            };
            self.state
                .topics
                .create_fair(&self.state.brokers, &r.name, message_type, r.queue_count, r.lite_ttl_minutes, &fair)
                .await
        }
        .await;
        Ok(Response::new(match result {
            Ok((created, meta)) => {
                CreateTopicResponse { status: Some(ok_status()), created, topic: Some(info(&meta, 0)) }
            }
            Err(e) => CreateTopicResponse { status: Some(e.status()), created: false, topic: None },
        }))
    }

    async fn update_topic(&self, request: Request<UpdateTopicRequest>) -> GrpcResult<CreateTopicResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let throttle = r.send_throttle.as_deref().map(Throttle::parse).transpose()?;
            let change = TopicChange {
                max_send_tps: r.max_send_tps,
                send_throttle: throttle,
                fair_weights: r.fair_weights.clone(),
                fair_default_weight: r.fair_default_weight,
            };
            self.state.topics.update(&self.state.brokers, &r.name, change).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(meta) => CreateTopicResponse { status: Some(ok_status()), created: false, topic: Some(info(&meta, 0)) },
            Err(e) => CreateTopicResponse { status: Some(e.status()), created: false, topic: None },
        }))
    }

    async fn list_topics(&self, request: Request<ListTopicsRequest>) -> GrpcResult<ListTopicsResponse> {
        let result = async {
            self.guard(&request)?;
            self.state.topics.list(&self.state.brokers).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(topics) => ListTopicsResponse {
                status: Some(ok_status()),
                topics: topics.iter().map(|(meta, messages)| info(meta, *messages)).collect(),
            },
            Err(e) => ListTopicsResponse { status: Some(e.status()), topics: Vec::new() },
        }))
    }

    async fn delete_topic(&self, request: Request<DeleteTopicRequest>) -> GrpcResult<DeleteTopicResponse> {
        let result = async {
            self.guard(&request)?;
            self.state.topics.delete(&self.state.brokers, &request.get_ref().name).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(deleted) => DeleteTopicResponse { status: Some(ok_status()), deleted },
            Err(e) => DeleteTopicResponse { status: Some(e.status()), deleted: false },
        }))
    }

    async fn create_group(&self, request: Request<CreateGroupRequest>) -> GrpcResult<CreateGroupResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let name = crate::consume::group_name(Some(&crate::pb::apache::rocketmq::v2::Resource {
                resource_namespace: String::new(),
                name: r.name.clone(),
            }))?;
            let attempts = if r.max_delivery_attempts == 0 {
                self.state.settings.max_delivery_attempts
            } else {
                r.max_delivery_attempts
            };
            let meta = GroupMeta {
                name,
                max_delivery_attempts: attempts,
                fifo: r.fifo,
                max_receive_tps: r.max_receive_tps,
                throttle: Throttle::parse(&r.throttle)?,
            };
            self.state.groups.create(&self.state.brokers, meta).await
        }
        .await;
        Ok(Response::new(match result {
            Ok((created, g)) => CreateGroupResponse { status: Some(ok_status()), created, group: Some(group_info(g)) },
            Err(e) => CreateGroupResponse { status: Some(e.status()), created: false, group: None },
        }))
    }

    async fn update_group(&self, request: Request<UpdateGroupRequest>) -> GrpcResult<CreateGroupResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let change = GroupChange {
                max_delivery_attempts: r.max_delivery_attempts,
                fifo: r.fifo,
                max_receive_tps: r.max_receive_tps,
                throttle: r.throttle.as_deref().map(Throttle::parse).transpose()?,
            };
            let default_attempts = self.state.settings.max_delivery_attempts;
            self.state.groups.update(&self.state.brokers, &r.name, change, default_attempts).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(g) => CreateGroupResponse { status: Some(ok_status()), created: false, group: Some(group_info(g)) },
            Err(e) => CreateGroupResponse { status: Some(e.status()), created: false, group: None },
        }))
    }

    async fn list_groups(&self, request: Request<ListGroupsRequest>) -> GrpcResult<ListGroupsResponse> {
        let result = async {
            self.guard(&request)?;
            self.state.groups.list(&self.state.brokers, self.state.settings.max_delivery_attempts).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(groups) => {
                ListGroupsResponse { status: Some(ok_status()), groups: groups.into_iter().map(group_info).collect() }
            }
            Err(e) => ListGroupsResponse { status: Some(e.status()), groups: Vec::new() },
        }))
    }

    async fn delete_group(&self, request: Request<DeleteGroupRequest>) -> GrpcResult<DeleteGroupResponse> {
        let result = async {
            self.guard(&request)?;
            self.state.groups.delete(&self.state.brokers, &request.get_ref().name).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(deleted) => DeleteGroupResponse { status: Some(ok_status()), deleted },
            Err(e) => DeleteGroupResponse { status: Some(e.status()), deleted: false },
        }))
    }

    async fn get_message(&self, request: Request<GetMessageRequest>) -> GrpcResult<FindMessagesResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            crate::lookup::get_message(&self.state, &r.topic, &r.message_id).await
        }
        .await;
        Ok(Response::new(found(result)))
    }

    async fn find_messages(&self, request: Request<FindMessagesRequest>) -> GrpcResult<FindMessagesResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            crate::lookup::find_messages(&self.state, &r.topic, &r.key, r.limit).await
        }
        .await;
        Ok(Response::new(found(result)))
    }

    async fn reset_group(&self, request: Request<ResetGroupRequest>) -> GrpcResult<ResetGroupResponse> {
        use crate::lookup::ResetTo;
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let to = match r.to {
                Some(reset_group_request::To::TimeMs(ms)) => ResetTo::TimeMs(ms.max(0) as u64),
                Some(reset_group_request::To::Offset(offset)) => ResetTo::Offset(offset),
                None => return Err(ProxyError::BadRequest("a reset needs a time or an offset".into())),
            };
            crate::lookup::reset_group(&self.state, &r.group, &r.topic, to, r.force).await
        }
        .await;
        Ok(Response::new(match result {
            Ok((queues, reset)) => ResetGroupResponse { status: Some(ok_status()), queues, reset },
            Err(e) => ResetGroupResponse { status: Some(e.status()), queues: Vec::new(), reset: false },
        }))
    }

    async fn set_acl_rule(&self, request: Request<SetAclRuleRequest>) -> GrpcResult<AclRulesResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let (allow, deny) = (actions(&r.allow)?, actions(&r.deny)?);
            let rule = self.state.acl.set(&self.state.brokers, &r.access_key, &r.resource, &allow, &deny).await?;
            Ok(vec![acl_rule(r.access_key.clone(), &rule)])
        }
        .await;
        Ok(Response::new(self.acl_rules(result)))
    }

    async fn list_acl_rules(&self, request: Request<ListAclRulesRequest>) -> GrpcResult<AclRulesResponse> {
        let result = async {
            self.guard(&request)?;
            let key = Some(request.get_ref().access_key.as_str()).filter(|k| !k.is_empty());
            let rules = self.state.acl.list(&self.state.brokers, key).await?;
            Ok(rules.into_iter().map(|(key, rule)| acl_rule(key, &rule)).collect())
        }
        .await;
        Ok(Response::new(self.acl_rules(result)))
    }

    async fn remove_acl_rules(&self, request: Request<RemoveAclRulesRequest>) -> GrpcResult<RemoveAclRulesResponse> {
        let result = async {
            self.guard(&request)?;
            let r = request.get_ref();
            let resource = Some(r.resource.as_str()).filter(|r| !r.is_empty());
            self.state.acl.remove(&self.state.brokers, &r.access_key, resource).await
        }
        .await;
        Ok(Response::new(match result {
            Ok(removed) => RemoveAclRulesResponse { status: Some(ok_status()), removed },
            Err(e) => RemoveAclRulesResponse { status: Some(e.status()), removed: 0 },
        }))
    }

    async fn get_stats(&self, request: Request<GetStatsRequest>) -> GrpcResult<GetStatsResponse> {
        if let Err(e) = self.guard(&request) {
            return Ok(Response::new(GetStatsResponse {
                status: Some(e.status()),
                brokers: Vec::new(),
                proxy: Vec::new(),
                groups: Vec::new(),
                groups_truncated: false,
            }));
        }
        let mut brokers = Vec::new();
        for owner in self.state.brokers.all_shards() {
            let endpoint = self.state.brokers.shard_endpoint(owner).to_string();
            let counters = match self.state.brokers.call(owner, &StatsRequest {}).await {
                Ok(frame) => match frame.access::<StatsResponse>() {
                    Ok(stats) => stats
                        .counters
                        .iter()
                        .map(|c| Counter { name: c.0.as_str().to_string(), value: c.1.to_native() })
                        .collect(),
                    Err(e) => vec![Counter { name: format!("error: {e}"), value: 0 }],
                },
                Err(e) => vec![Counter { name: format!("unreachable: {e}"), value: 0 }],
            };
            brokers.push(BrokerStats { endpoint, shard: owner.shard as u32, counters });
        }
        let mut proxy: Vec<Counter> =
            self.state.counters.snapshot().into_iter().map(|(name, value)| Counter { name, value }).collect();
        proxy.push(Counter { name: "renewals_tracked".into(), value: self.state.renewals.len() as u64 });
        let (groups, groups_truncated) = self.group_stats().await;
        Ok(Response::new(GetStatsResponse { status: Some(ok_status()), brokers, proxy, groups, groups_truncated }))
    }
}

fn acl_rule(key: String, rule: &crate::acl::Rule) -> AclRule {
    let name = |d: Option<crate::acl::Decision>| d.map_or("", |d| d.name()).to_string();
    AclRule { access_key: key, resource: rule.resource.text(), r#pub: name(rule.publish), sub: name(rule.subscribe) }
}

fn actions(names: &[String]) -> Result<Vec<Action>, ProxyError> {
    names.iter().map(|n| Action::parse(n)).collect()
}

impl AdminService {
    fn acl_rules(&self, result: Result<Vec<AclRule>, ProxyError>) -> AclRulesResponse {
        let enabled = self.state.acl.enabled();
        match result {
            Ok(rules) => AclRulesResponse { status: Some(ok_status()), rules, enabled },
            Err(e) => AclRulesResponse { status: Some(e.status()), rules: Vec::new(), enabled },
        }
    }

    /// Authenticates the call; while the ACL is on, only admin keys pass.
    fn guard<T>(&self, request: &Request<T>) -> Result<(), ProxyError> {
        let key = self.state.auth.check(request.metadata())?;
        self.state.acl.admin(key.as_deref())
    }

    /// Every shard's per-(group, topic) figures, summed; throttle counts come from the shard
    /// that keeps each group's receive quota. A shard that does not answer is left out.
    async fn group_stats(&self) -> (Vec<GroupStats>, bool) {
        let mut by_key: BTreeMap<(String, String), GroupStats> = BTreeMap::new();
        let mut throttled: HashMap<String, u64> = HashMap::new();
        let mut truncated = false;
        let request = GroupStatsRequest { max_count: GROUP_STATS_PER_SHARD_MAX };
        for owner in self.state.brokers.all_shards() {
            let Ok(frame) = self.state.brokers.call(owner, &request).await else { continue };
            let Ok(reply) = frame.access::<GroupStatsResponse>() else { continue };
            truncated |= reply.truncated;
            for g in reply.groups.iter() {
                let key = (g.group.as_str().to_string(), g.topic.as_str().to_string());
                if !by_key.contains_key(&key) && by_key.len() >= GROUP_STATS_MAX {
                    truncated = true;
                    continue;
                }
                let entry = by_key.entry(key.clone()).or_insert_with(|| GroupStats {
                    group: key.0.clone(),
                    topic: key.1.clone(),
                    ..Default::default()
                });
                entry.ready += g.ready.to_native();
                entry.inflight += g.inflight.to_native();
                entry.delivered += g.delivered.to_native();
                entry.rate_per_s += g.rate_milli_per_s.to_native() as f64 / 1000.0;
                let oldest = g.oldest_unacked_ms.to_native() as i64;
                if oldest > 0 && (entry.oldest_unacked_ms == 0 || oldest < entry.oldest_unacked_ms) {
                    entry.oldest_unacked_ms = oldest;
                }
            }
            for t in reply.throttled.iter() {
                if let Some(group) = t.0.as_str().strip_prefix(crate::groups::GROUP_RECORD_PREFIX) {
                    *throttled.entry(group.to_string()).or_default() += t.1.to_native();
                }
            }
        }
        let mut groups: Vec<GroupStats> = by_key.into_values().collect();
        for g in &mut groups {
            g.throttled = throttled.get(&g.group).copied().unwrap_or(0);
        }
        (groups, truncated)
    }
}

fn found(result: Result<(Vec<MessageInfo>, bool), ProxyError>) -> FindMessagesResponse {
    match result {
        Ok((messages, truncated)) => FindMessagesResponse { status: Some(ok_status()), messages, truncated },
        Err(e) => FindMessagesResponse { status: Some(e.status()), messages: Vec::new(), truncated: false },
    }
}

fn group_info(g: GroupMeta) -> GroupInfo {
    GroupInfo {
        name: g.name,
        max_delivery_attempts: g.max_delivery_attempts,
        fifo: g.fifo,
        max_receive_tps: g.max_receive_tps,
        throttle: g.throttle.name().to_string(),
    }
}

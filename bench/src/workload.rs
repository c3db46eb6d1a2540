//! What a run does: workloads from flags or a TOML suite file, with named limits.

use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// Each message carries its due time and sequence number in its first bytes.
pub const MESSAGE_HEADER_BYTES: usize = 16;
pub const MESSAGE_SIZE_MAX_BYTES: usize = 4 << 20;
pub const RATE_MAX_PER_SEC: u64 = 1_000_000;
/// Bounds the per-run bookkeeping (one bit per message to find duplicates and losses).
pub const RUN_MESSAGES_MAX: u64 = 100_000_000;
pub const CLIENTS_MAX: u32 = 256;
pub const TOPICS_MAX: u32 = 1024;
/// Most queues per topic a workload asks for (a Sluice topic's own limit).
pub const QUEUES_PER_TOPIC_MAX: u32 = 256;
pub const DURATION_MAX_SECS: u64 = 24 * 3600;
pub const INFLIGHT_MAX: usize = 65_536;
/// Short mode (CI): each workload runs this long after this much warm-up.
pub const SHORT_DURATION_SECS: u64 = 1;
pub const SHORT_WARMUP_SECS: u64 = 1;
/// Most sessions streaming at once per topic in a lite workload.
pub const SESSIONS_MAX: u32 = 10_000;
/// Most messages in one session's answer (a consumer tracks them in one 64-bit mask).
pub const ANSWER_MESSAGES_MAX: u32 = 64;
/// Most offered rates one saturation workload steps through.
pub const STEPS_MAX: usize = 16;
/// Short mode (CI) runs this many of a saturation workload's steps: enough to show the stepping.
pub const SHORT_STEPS_MAX: usize = 2;

/// What kind of topic the workload uses. Lite: each topic is a LITE parent, and its messages
/// go to sessions (lite topics, or a Redis stream each), each streaming a short answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TopicKind {
    #[default]
    Normal,
    Lite,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default)]
    pub topic_kind: TopicKind,
    #[serde(default = "defaults::size_bytes")]
    pub size_bytes: usize,
    #[serde(default = "defaults::rate_per_sec")]
    pub rate_per_sec: u64,
    #[serde(default = "defaults::one")]
    pub producers: u32,
    /// Each topic gets `consumers / topics` consumers in one group; 0 measures send→ack only.
    #[serde(default = "defaults::one")]
    pub consumers: u32,
    #[serde(default = "defaults::one")]
    pub topics: u32,
    /// Queues per topic on systems that have them (Sluice); 0: one per consumer of the topic.
    #[serde(default)]
    pub queues_per_topic: u32,
    #[serde(default = "defaults::duration_secs")]
    pub duration_secs: u64,
    /// Sent first and not recorded (connections, caches and the disk settle).
    #[serde(default = "defaults::warmup_secs")]
    pub warmup_secs: u64,
    /// Sends in flight per producer; beyond it the producer waits and the wait is measured.
    #[serde(default = "defaults::inflight_max")]
    pub inflight_max: usize,
    /// Lite workloads: sessions streaming at once per topic. A session's answer is
    /// `answer_messages` messages; when a generation of sessions has streamed its answers, the
    /// next generation (new lite topics) starts.
    #[serde(default)]
    pub sessions: u32,
    #[serde(default = "defaults::answer_messages")]
    pub answer_messages: u32,
    /// Target kinds this workload runs on (empty: every target given).
    #[serde(default)]
    pub targets: Vec<String>,
    /// A saturation workload: the offered rates to step through, lowest first, each a run of
    /// its own (`rate_per_sec` is then ignored). Stepping stops at the first rate a system
    /// falls short of twice in a row (see `saturation`). Empty: one run at `rate_per_sec`.
    /// Left out of results files when empty, so older sluice-bench binaries still read them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub step_rates_per_sec: Vec<u64>,
}

mod defaults {
    pub fn size_bytes() -> usize {
        1024
    }
    pub fn rate_per_sec() -> u64 {
        1000
    }
    pub fn one() -> u32 {
        1
    }
    pub fn duration_secs() -> u64 {
        20
    }
    pub fn warmup_secs() -> u64 {
        3
    }
    pub fn inflight_max() -> usize {
        1024
    }
    pub fn answer_messages() -> u32 {
        16
    }
}

impl Workload {
    pub fn total_messages(&self) -> u64 {
        self.rate_per_sec.saturating_mul(self.duration_secs.saturating_add(self.warmup_secs))
    }

    /// Queues each topic gets (at least one).
    pub fn queues_per_topic(&self) -> u32 {
        if self.queues_per_topic > 0 {
            self.queues_per_topic
        } else {
            self.consumers_per_topic().max(1)
        }
    }

    pub fn consumers_per_topic(&self) -> u32 {
        if self.topics == 0 {
            return 0;
        }
        self.consumers / self.topics
    }

    pub fn is_saturation(&self) -> bool {
        !self.step_rates_per_sec.is_empty()
    }

    /// One step of a saturation workload: the same workload at `rate_per_sec`.
    pub fn at_rate(&self, rate_per_sec: u64) -> Workload {
        Workload { rate_per_sec, step_rates_per_sec: Vec::new(), ..self.clone() }
    }

    pub fn validate(&self) -> Result<(), BenchError> {
        if self.is_saturation() {
            return self.validate_steps();
        }
        let bad = |why: String| Err(BenchError::Workload { workload: self.name.clone(), why });
        if self.name.is_empty() || !self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return bad("the name must be non-empty letters, digits, '-' or '_'".into());
        }
        if let Err(why) = self.validate_sessions() {
            return bad(why);
        }
        if !(MESSAGE_HEADER_BYTES..=MESSAGE_SIZE_MAX_BYTES).contains(&self.size_bytes) {
            return bad(format!("size_bytes must be {MESSAGE_HEADER_BYTES}..={MESSAGE_SIZE_MAX_BYTES}"));
        }
        if !(1..=RATE_MAX_PER_SEC).contains(&self.rate_per_sec) {
            return bad(format!("rate_per_sec must be 1..={RATE_MAX_PER_SEC}"));
        }
        if !(1..=CLIENTS_MAX).contains(&self.producers) || self.consumers > CLIENTS_MAX {
            return bad(format!("producers must be 1..={CLIENTS_MAX} and consumers 0..={CLIENTS_MAX}"));
        }
        if !(1..=TOPICS_MAX).contains(&self.topics) {
            return bad(format!("topics must be 1..={TOPICS_MAX}"));
        }
        if self.consumers > 0 && !self.consumers.is_multiple_of(self.topics) {
            return bad(format!(
                "{} consumers cannot share {} topics evenly; use a multiple of the topic count",
                self.consumers, self.topics
            ));
        }
        if self.queues_per_topic > QUEUES_PER_TOPIC_MAX {
            return bad(format!("queues_per_topic must be at most {QUEUES_PER_TOPIC_MAX}"));
        }
        if !(1..=DURATION_MAX_SECS).contains(&self.duration_secs) || self.warmup_secs > DURATION_MAX_SECS {
            return bad(format!("duration_secs must be 1..={DURATION_MAX_SECS} and warmup_secs at most that"));
        }
        if !(1..=INFLIGHT_MAX).contains(&self.inflight_max) {
            return bad(format!("inflight_max must be 1..={INFLIGHT_MAX}"));
        }
        if self.total_messages() > RUN_MESSAGES_MAX {
            return bad(format!(
                "rate × (warm-up + duration) is {} messages; at most {RUN_MESSAGES_MAX} per run",
                self.total_messages()
            ));
        }
        Ok(())
    }

    /// Steps rise, there are at most `STEPS_MAX`, and every step is a valid workload itself.
    fn validate_steps(&self) -> Result<(), BenchError> {
        let steps = &self.step_rates_per_sec;
        if steps.len() > STEPS_MAX || steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(BenchError::Workload {
                workload: self.name.clone(),
                why: format!("step_rates_per_sec must be 1..={STEPS_MAX} rates, each higher than the one before"),
            });
        }
        steps.iter().try_for_each(|rate| self.at_rate(*rate).validate())
    }

    fn validate_sessions(&self) -> Result<(), String> {
        match self.topic_kind {
            TopicKind::Normal if self.sessions != 0 => {
                Err("sessions is for topic_kind = \"lite\"; leave it out of a normal workload".into())
            }
            TopicKind::Normal => Ok(()),
            TopicKind::Lite if self.consumers == 0 => {
                Err("a lite workload needs consumers: they subscribe to the sessions".into())
            }
            TopicKind::Lite if !(1..=SESSIONS_MAX).contains(&self.sessions) => {
                Err(format!("a lite workload needs sessions = 1..={SESSIONS_MAX} (sessions streaming at once)"))
            }
            TopicKind::Lite if self.sessions < self.consumers_per_topic() => Err(format!(
                "{} sessions cannot give each of the {} consumers per topic one; use at least as many sessions",
                self.sessions,
                self.consumers_per_topic()
            )),
            TopicKind::Lite if !(1..=ANSWER_MESSAGES_MAX).contains(&self.answer_messages) => {
                Err(format!("answer_messages must be 1..={ANSWER_MESSAGES_MAX}"))
            }
            TopicKind::Lite => Ok(()),
        }
    }

    /// The CI form: same shape, a few seconds long.
    pub fn shortened(&self) -> Workload {
        Workload {
            duration_secs: self.duration_secs.min(SHORT_DURATION_SECS),
            warmup_secs: self.warmup_secs.min(SHORT_WARMUP_SECS),
            step_rates_per_sec: self.step_rates_per_sec.iter().take(SHORT_STEPS_MAX).copied().collect(),
            ..self.clone()
        }
    }

    pub fn runs_on(&self, kind: &str) -> bool {
        self.targets.is_empty() || self.targets.iter().any(|t| t == kind)
    }
}

/// A suite file: `[[workload]]` tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    #[serde(rename = "workload")]
    pub workloads: Vec<Workload>,
}

/// Most workloads in one suite.
pub const SUITE_WORKLOADS_MAX: usize = 64;

impl Suite {
    pub fn parse(text: &str, origin: &str) -> Result<Suite, BenchError> {
        let suite: Suite =
            toml::from_str(text).map_err(|e| BenchError::Suite { path: origin.to_string(), why: e.to_string() })?;
        if suite.workloads.is_empty() || suite.workloads.len() > SUITE_WORKLOADS_MAX {
            return Err(BenchError::Suite {
                path: origin.to_string(),
                why: format!("a suite needs 1..={SUITE_WORKLOADS_MAX} [[workload]] tables"),
            });
        }
        for w in &suite.workloads {
            w.validate()?;
            if suite.workloads.iter().filter(|o| o.name == w.name).count() > 1 {
                return Err(BenchError::Suite {
                    path: origin.to_string(),
                    why: format!("workload {:?} appears twice", w.name),
                });
            }
        }
        Ok(suite)
    }

    pub fn load(path: &std::path::Path) -> Result<Suite, BenchError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BenchError::Suite { path: path.display().to_string(), why: e.to_string() })?;
        Suite::parse(&text, &path.display().to_string())
    }
}

/// The durability level a run asks every system for (see `Target::durability`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityLevel {
    /// Acked once on disk: Sluice `sync`, Redis `appendfsync always`, JetStream file storage
    /// (see the printed note: nats-server before 2.10 cannot fsync before acking).
    Sync,
    /// Acked once written, flushed about every second: Sluice `async`, Redis `appendfsync everysec`.
    Async,
}

impl std::fmt::Display for DurabilityLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DurabilityLevel::Sync => "sync",
            DurabilityLevel::Async => "async",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STANDARD: &str = include_str!("../suites/standard.toml");

    #[test]
    fn the_standard_suite_parses_and_validates() {
        let suite = Suite::parse(STANDARD, "standard.toml").unwrap();
        assert_eq!(suite.name, "standard");
        assert!(suite.workloads.iter().all(|w| w.validate().is_ok()));
        for w in &suite.workloads {
            let short = w.shortened();
            assert!(short.duration_secs <= SHORT_DURATION_SECS && short.warmup_secs <= SHORT_WARMUP_SECS);
            assert_eq!((short.rate_per_sec, short.size_bytes), (w.rate_per_sec, w.size_bytes));
        }
    }

    #[test]
    fn defaults_fill_a_minimal_workload() {
        let suite = Suite::parse("name = \"x\"\n[[workload]]\nname = \"w\"\n", "x").unwrap();
        let w = &suite.workloads[0];
        assert_eq!((w.size_bytes, w.rate_per_sec, w.producers, w.consumers, w.topics), (1024, 1000, 1, 1, 1));
        assert_eq!(w.total_messages(), 1000 * 23);
        assert!(w.runs_on("redis"));
    }

    #[test]
    fn bad_workloads_are_refused_with_the_reason() {
        let base = Suite::parse("name = \"x\"\n[[workload]]\nname = \"w\"\n", "x").unwrap().workloads[0].clone();
        let cases = [
            Workload { size_bytes: 8, ..base.clone() },
            Workload { rate_per_sec: 0, ..base.clone() },
            Workload { consumers: 3, topics: 2, ..base.clone() },
            Workload { topics: 0, ..base.clone() },
            Workload { rate_per_sec: RATE_MAX_PER_SEC, duration_secs: 3600, ..base.clone() },
            Workload { topic_kind: TopicKind::Lite, ..base.clone() },
            Workload { topic_kind: TopicKind::Lite, sessions: SESSIONS_MAX + 1, ..base.clone() },
            Workload { topic_kind: TopicKind::Lite, sessions: 4, answer_messages: 65, ..base.clone() },
            Workload { topic_kind: TopicKind::Lite, sessions: 1, consumers: 2, ..base.clone() },
            Workload { sessions: 4, ..base.clone() },
            Workload { name: "a b".into(), ..base.clone() },
            Workload { inflight_max: 0, ..base.clone() },
            Workload { queues_per_topic: QUEUES_PER_TOPIC_MAX + 1, ..base.clone() },
            Workload { step_rates_per_sec: vec![2000, 1000], ..base.clone() },
            Workload { step_rates_per_sec: vec![1000, 1000], ..base.clone() },
            Workload { step_rates_per_sec: vec![1000, RATE_MAX_PER_SEC + 1], ..base.clone() },
            Workload { step_rates_per_sec: (1..=STEPS_MAX as u64 + 1).collect(), ..base.clone() },
        ];
        for w in cases {
            let err = w.validate().unwrap_err();
            assert_eq!(err.code(), BenchError::Workload { workload: String::new(), why: String::new() }.code());
        }
        assert!(Suite::parse("name = \"x\"\n[[workload]]\nname = \"w\"\nsize = 3\n", "x").is_err(), "unknown keys");
        assert!(Suite::parse("name = \"x\"\n", "x").is_err(), "no workloads");
        let lite = Workload { topic_kind: TopicKind::Lite, sessions: 4, ..base.clone() };
        assert!(lite.validate().is_ok(), "a lite workload with sessions is accepted");
        let steps = Workload { step_rates_per_sec: vec![1000, 2000, 4000], rate_per_sec: 0, ..base.clone() };
        assert!(steps.validate().is_ok(), "a saturation workload ignores rate_per_sec");
        assert_eq!(steps.shortened().step_rates_per_sec, [1000, 2000]);
        assert_eq!(steps.at_rate(2000).rate_per_sec, 2000);
        assert!(!steps.at_rate(2000).is_saturation());
    }
}

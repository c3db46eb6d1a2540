//! CPU time of processes (user + system, all threads), read from /proc/PID/stat: the same
//! utime and stime the kernel reports through getrusage, readable for other processes too.

use serde::{Deserialize, Serialize};

/// A named process to charge CPU time to (`--pid broker=1234`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPid {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for NamedPid {
    type Err = String;

    fn from_str(text: &str) -> Result<NamedPid, String> {
        let (name, pid) = text.split_once('=').ok_or_else(|| format!("{text:?} is not NAME=PID"))?;
        let pid = pid.parse().map_err(|_| format!("{pid:?} is not a process id"))?;
        Ok(NamedPid { name: name.to_string(), pid })
    }
}

/// CPU time one process used during a run, and per message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CpuUse {
    pub process: String,
    pub pid: u32,
    pub cpu_ms: f64,
    pub cpu_us_per_msg: f64,
}

/// User + system CPU time of `pid` in milliseconds, or None if it is gone.
pub fn cpu_ms(pid: u32) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_cpu_ticks(&text).map(|ticks| ticks as f64 * 1000.0 / rustix::param::clock_ticks_per_second() as f64)
}

/// utime + stime (fields 14 and 15) from a /proc/PID/stat line. The command name (field 2)
/// may hold spaces and parentheses, so counting starts after its last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The name the load generator itself is charged under (not a server process).
pub const CLIENT_PROCESS: &str = "client";

/// Samples processes' CPU time at the start of a run and charges the difference at its end.
#[derive(Debug)]
pub struct CpuMeter {
    start: Vec<(NamedPid, f64)>,
}

impl CpuMeter {
    pub fn start(processes: &[NamedPid]) -> CpuMeter {
        CpuMeter { start: processes.iter().filter_map(|p| Some((p.clone(), cpu_ms(p.pid)?))).collect() }
    }

    pub fn finish(&self, messages: u64) -> Vec<CpuUse> {
        self.start
            .iter()
            .filter_map(|(p, start_ms)| {
                let used_ms = (cpu_ms(p.pid)? - start_ms).max(0.0);
                Some(CpuUse {
                    process: p.name.clone(),
                    pid: p.pid,
                    cpu_ms: used_ms,
                    cpu_us_per_msg: if messages == 0 { 0.0 } else { used_ms * 1000.0 / messages as f64 },
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_parse_even_with_odd_command_names() {
        let line = "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0 500 1000 100";
        assert_eq!(parse_stat_cpu_ticks(line), Some(325));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_uses_cpu() {
        let me = NamedPid { name: "self".into(), pid: std::process::id() };
        let meter = CpuMeter::start(std::slice::from_ref(&me));
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let used = meter.finish(10);
        assert_eq!(used.len(), 1);
        assert!(used[0].cpu_ms >= 0.0 && used[0].cpu_us_per_msg == used[0].cpu_ms * 100.0);
        assert!("broker=12".parse::<NamedPid>().is_ok() && "broker".parse::<NamedPid>().is_err());
    }
}

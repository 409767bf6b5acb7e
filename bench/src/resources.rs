//! What the processes cost, from /proc (through the procfs crate): CPU time of the services, of the
//! bench itself, of pgbench (a reaped child) and of PostgreSQL (postmaster
//! and its backends), the machine's busy time, and peak RSS.

use anyhow::{Context, Result};
use procfs::{CurrentSI, KernelStats, process::Process};
use serde::Serialize;

/// Clock ticks per second of /proc's CPU times.
pub fn clock_ticks() -> f64 {
    procfs::ticks_per_second() as f64
}

fn process(pid: u32) -> Result<Process> {
    let id = i32::try_from(pid).with_context(|| format!("pid {pid} out of range"))?;
    Process::new(id).with_context(|| format!("reading /proc/{pid}"))
}

/// utime + stime of a process, in ticks (0 for pid 0: no process).
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    if pid == 0 {
        return Ok(0);
    }
    let stat = process(pid)?.stat()?;
    Ok(stat.utime + stat.stime)
}

/// Reaped children's CPU (cutime + cstime), in ticks.
fn children_ticks(stat: &procfs::process::Stat) -> u64 {
    u64::try_from(stat.cutime + stat.cstime).unwrap_or(0)
}

/// This process's own CPU and its reaped children's (pgbench), in ticks.
pub fn self_ticks() -> Result<(u64, u64)> {
    let stat = Process::myself()?.stat()?;
    Ok((stat.utime + stat.stime, children_ticks(&stat)))
}

pub fn parent_pid(pid: u32) -> Result<u32> {
    Ok(u32::try_from(process(pid)?.stat()?.ppid).unwrap_or(0))
}

/// Nanoseconds the threads of a process have spent runnable but waiting
/// for a CPU (schedstat's run_delay), summed over its live threads: how
/// much the machine's other work delays it.
pub fn run_queue_wait_ns(pid: u32) -> u64 {
    if pid == 0 {
        return 0;
    }
    let Ok(tasks) = process(pid).and_then(|p| Ok(p.tasks()?)) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| t.schedstat().ok())
        .map(|s| s.run_delay)
        .sum()
}

/// Peak and current resident set, in KiB (VmHWM, VmRSS).
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = process(pid)?.status()?;
    Ok((status.vmhwm.unwrap_or(0), status.vmrss.unwrap_or(0)))
}

/// Busy and total ticks of the whole machine (/proc/stat's `cpu` line:
/// user to steal; idle and iowait are not busy).
pub fn machine_ticks() -> Result<(u64, u64)> {
    let t = KernelStats::current().context("reading /proc/stat")?.total;
    let idle = t.idle + t.iowait.unwrap_or(0);
    let total = t.user
        + t.nice
        + t.system
        + idle
        + t.irq.unwrap_or(0)
        + t.softirq.unwrap_or(0)
        + t.steal.unwrap_or(0);
    Ok((total - idle, total))
}

/// CPU of a PostgreSQL server on this machine: the postmaster's own time,
/// its reaped backends' and its live children's.
pub fn postgres_ticks(postmaster: u32) -> Result<u64> {
    let stat = process(postmaster)?.stat()?;
    let mut ticks = stat.utime + stat.stime + children_ticks(&stat);
    // Processes come and go while we read: skip the ones gone.
    for child in procfs::process::all_processes()?
        .flatten()
        .filter_map(|p| p.stat().ok())
        .filter(|s| u32::try_from(s.ppid).is_ok_and(|p| p == postmaster))
    {
        ticks += child.utime + child.stime;
    }
    Ok(ticks)
}

/// The processes a run is charged to.
#[derive(Debug, Clone)]
pub struct Probe {
    /// 0 while the service is not running.
    pub memory_pid: u32,
    pub booking_pid: u32,
    /// None when PostgreSQL is not a process on this machine.
    pub postmaster: Option<u32>,
    pub ticks_per_second: f64,
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    memory: u64,
    booking: u64,
    bench: u64,
    /// Run-queue waits, ns: memory-service, booking-service, the bench.
    waits: [u64; 3],
    children: u64,
    postgres: Option<u64>,
    busy: u64,
    total: u64,
}

/// CPU seconds spent between two snapshots, by whom.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct CpuUse {
    pub memory_service_s: f64,
    pub booking_service_s: f64,
    /// The load generator itself.
    pub bench_s: f64,
    /// pgbench (floor runs only).
    pub pgbench_s: f64,
    /// PostgreSQL, when it runs on this machine.
    pub postgres_s: Option<f64>,
    /// Core-seconds the machine was busy, and had (cores x wall time).
    pub machine_busy_s: f64,
    pub machine_capacity_s: f64,
    /// Share of all cores busy, in percent.
    pub machine_busy_pct: f64,
    /// Share of all cores used by processes that are none of the above
    /// (other work on the machine): what disturbs the measurement.
    pub others_pct: f64,
    /// Seconds the threads of memory-service, booking-service and the
    /// bench were runnable but waited for a CPU.
    pub run_queue_wait_s: [f64; 3],
}

impl CpuUse {
    /// Sums two measurements (the rounds of one point).
    pub fn add(&mut self, o: &CpuUse) {
        if self.machine_capacity_s == 0.0 {
            *self = *o;
            return;
        }
        self.memory_service_s += o.memory_service_s;
        self.booking_service_s += o.booking_service_s;
        self.bench_s += o.bench_s;
        self.pgbench_s += o.pgbench_s;
        self.postgres_s = match (self.postgres_s, o.postgres_s) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
        self.machine_busy_s += o.machine_busy_s;
        self.machine_capacity_s += o.machine_capacity_s;
        for (a, b) in self.run_queue_wait_s.iter_mut().zip(o.run_queue_wait_s) {
            *a += b;
        }
        self.derive();
    }

    fn derive(&mut self) {
        let pct = |s: f64| {
            if self.machine_capacity_s > 0.0 {
                100.0 * s / self.machine_capacity_s
            } else {
                0.0
            }
        };
        let ours = self.memory_service_s
            + self.booking_service_s
            + self.bench_s
            + self.pgbench_s
            + self.postgres_s.unwrap_or(0.0);
        self.machine_busy_pct = pct(self.machine_busy_s);
        self.others_pct = pct((self.machine_busy_s - ours).max(0.0));
    }
}

impl Probe {
    pub fn snapshot(&self) -> Result<Snapshot> {
        let (bench, children) = self_ticks()?;
        let (busy, total) = machine_ticks()?;
        Ok(Snapshot {
            memory: cpu_ticks(self.memory_pid)?,
            booking: cpu_ticks(self.booking_pid)?,
            bench,
            waits: [
                run_queue_wait_ns(self.memory_pid),
                run_queue_wait_ns(self.booking_pid),
                run_queue_wait_ns(std::process::id()),
            ],
            children,
            postgres: self.postmaster.and_then(|p| postgres_ticks(p).ok()),
            busy,
            total,
        })
    }

    pub fn between(&self, a: &Snapshot, b: &Snapshot) -> CpuUse {
        let s = |x: u64, y: u64| y.saturating_sub(x) as f64 / self.ticks_per_second;
        let mut cpu = CpuUse {
            memory_service_s: s(a.memory, b.memory),
            booking_service_s: s(a.booking, b.booking),
            bench_s: s(a.bench, b.bench),
            pgbench_s: s(a.children, b.children),
            postgres_s: a.postgres.zip(b.postgres).map(|(x, y)| s(x, y)),
            machine_busy_s: s(a.busy, b.busy),
            machine_capacity_s: s(a.total, b.total),
            run_queue_wait_s: [0, 1, 2].map(|i| b.waits[i].saturating_sub(a.waits[i]) as f64 / 1e9),
            ..CpuUse::default()
        };
        cpu.derive();
        cpu
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let (hwm, rss) = memory_kib(std::process::id()).unwrap();
        assert!(hwm >= rss && rss > 0);
        cpu_ticks(std::process::id()).unwrap();
        let (busy, total) = machine_ticks().unwrap();
        assert!(total >= busy && total > 0);
        let mut a = CpuUse {
            bench_s: 1.0,
            machine_busy_s: 2.0,
            machine_capacity_s: 4.0,
            ..CpuUse::default()
        };
        a.derive();
        let mut sum = CpuUse::default();
        sum.add(&a);
        sum.add(&a);
        assert_eq!(sum.bench_s, 2.0);
        a = sum;
        assert_eq!((a.machine_busy_pct, a.others_pct), (50.0, 25.0));
        assert!(parent_pid(std::process::id()).unwrap() > 0);
        // Present on kernels with schedstats; 0 otherwise.
        let _ = run_queue_wait_ns(std::process::id());
    }
}

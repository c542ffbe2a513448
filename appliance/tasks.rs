//! Supervised background tasks, stopped in order.
//!
//! Every long-lived task of the daemon (the API's accept loops, the peer
//! link and replication, the reconciler, the watchdog) runs under one
//! [`Supervisor`], in one of the [`Stage`]s. A task that panics or returns
//! an error is logged and then, by its [`Policy`], restarted with backoff or
//! reported as fatal (the daemon then shuts down in order and exits
//! non-zero, for systemd to restart it). On SIGTERM the daemon stops the
//! stages in their order: the API stops accepting, then the cluster tasks
//! (a lease is released while the store and the link still work), then the
//! core's; only then is the store closed.
//!
//! Operation-scoped tasks (following one ACPI shutdown, one update, one
//! console session) are not here: they end with their operation, and what
//! they follow is picked up again at the next start.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Where a task stands in the shutdown order: stages stop in the order
/// declared here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Accepting API connections.
    Api,
    /// The pair: peer link, replication, later the witness and leases.
    Cluster,
    /// Reconciliation, the watchdog: everything that writes the store on
    /// its own.
    Core,
}

impl Stage {
    pub const ALL: [Stage; 3] = [Stage::Api, Stage::Cluster, Stage::Core];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Api => "api",
            Stage::Cluster => "cluster",
            Stage::Core => "core",
        }
    }
}

/// What happens when a task panics, returns an error, or returns at all
/// before it was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Logged, then started again after a backoff that doubles from the
    /// supervisor's minimum to its maximum (reset once a run lasted a
    /// minute). For tasks that rebuild their state when they start.
    Restart,
    /// Logged, then the daemon shuts down in order and exits non-zero. For
    /// tasks that cannot be remade in place (a bound listener).
    Fatal,
}

/// Given to each task: resolves when the task's stage is asked to stop.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<bool>);

impl Stop {
    /// Waits until the stage stops (at once if it already has).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }

    pub fn is_stopped(&self) -> bool {
        *self.0.borrow()
    }
}

/// How a task run ended, as the supervisor sees it.
type Outcome = std::result::Result<(), String>;

struct Task {
    stage: Stage,
    name: &'static str,
    handle: JoinHandle<()>,
}

struct Inner {
    stops: Vec<(Stage, watch::Sender<bool>)>,
    tasks: Mutex<Vec<Task>>,
    /// The first fatal failure: "task: reason".
    fatal: watch::Sender<Option<String>>,
    backoff: (Duration, Duration),
}

/// The daemon's task group. Cheap to clone; every clone is the same group.
#[derive(Clone)]
pub struct Supervisor(Arc<Inner>);

impl Default for Supervisor {
    fn default() -> Self {
        Supervisor::new(Duration::from_secs(1), Duration::from_secs(30))
    }
}

/// Aborts the task it holds when dropped, so that aborting a supervising
/// task also ends the run it supervises.
struct AbortOnDrop(JoinHandle<Outcome>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    if e.is_cancelled() {
        return "cancelled".into();
    }
    let p = e.into_panic();
    let msg = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    format!("panicked: {msg}")
}

impl Supervisor {
    /// A group whose restarts wait `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Supervisor {
        Supervisor(Arc::new(Inner {
            stops: Stage::ALL.iter().map(|s| (*s, watch::Sender::new(false))).collect(),
            tasks: Mutex::new(Vec::new()),
            fatal: watch::Sender::new(None),
            backoff: (min, max),
        }))
    }

    fn stop_for(&self, stage: Stage) -> Stop {
        let tx = &self.0.stops.iter().find(|(s, _)| *s == stage).expect("every stage has a sender").1;
        Stop(tx.subscribe())
    }

    /// Runs `make(stop)` in `stage`, again after each failure as `policy`
    /// says. The task should return `Ok(())` once `stop` resolves (after
    /// cleaning up: releasing a lease, finishing a write); it has the grace
    /// given to [`Supervisor::shutdown`] before it is aborted.
    pub fn spawn<F, Fut>(&self, stage: Stage, name: &'static str, policy: Policy, mut make: F)
    where
        F: FnMut(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let stop = self.stop_for(stage);
        let sup = self.clone();
        let handle = tokio::spawn(async move {
            let (min, max) = sup.0.backoff;
            let mut delay = min;
            loop {
                tracing::debug!(TASK = name, STAGE = stage.name(), "task started");
                let started = Instant::now();
                let mut run = AbortOnDrop(tokio::spawn(make(stop.clone())));
                let outcome = match (&mut run.0).await {
                    Ok(r) => r,
                    Err(e) => Err(panic_text(e)),
                };
                if stop.is_stopped() {
                    if let Err(e) = outcome {
                        tracing::warn!(TASK = name, error = %e, "task failed while stopping");
                    }
                    return;
                }
                let reason = outcome.err().unwrap_or_else(|| "ended on its own".into());
                match policy {
                    Policy::Fatal => {
                        tracing::error!(TASK = name, error = %reason, "task failed; the daemon stops");
                        sup.0.fatal.send_if_modified(|f| {
                            let first = f.is_none();
                            if first {
                                *f = Some(format!("{name}: {reason}"));
                            }
                            first
                        });
                        return;
                    }
                    Policy::Restart => {
                        if started.elapsed() >= Duration::from_secs(60) {
                            delay = min;
                        }
                        tracing::error!(TASK = name, error = %reason, restart_in_ms = delay.as_millis() as u64, "task failed; restarting");
                        let mut stop = stop.clone();
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = stop.wait() => return,
                        }
                        delay = (delay * 2).min(max);
                    }
                }
            }
        });
        self.0.tasks.lock().unwrap().push(Task { stage, name, handle });
    }

    /// Runs `fut` once in `stage`; a failure is fatal. For tasks that own
    /// something that cannot be made again (a bound listener).
    pub fn spawn_once<F, Fut>(&self, stage: Stage, name: &'static str, make: F)
    where
        F: FnOnce(Stop) -> Fut + Send + 'static,
        Fut: Future<Output = Outcome> + Send + 'static,
    {
        let mut make = Some(make);
        self.spawn(stage, name, Policy::Fatal, move |stop| {
            let f = make.take().expect("a fatal task runs once");
            f(stop)
        });
    }

    /// Resolves with "task: reason" once a fatal task failed.
    pub async fn failed(&self) -> String {
        let mut rx = self.0.fatal.subscribe();
        let got = rx.wait_for(Option::is_some).await.map(|f| f.clone());
        match got {
            Ok(Some(reason)) => reason,
            // The sender lives as long as `self`.
            _ => std::future::pending().await,
        }
    }

    /// Stops `stage`: tells its tasks, waits up to `grace` for them to end,
    /// aborts the rest. Returns the names of the tasks that ended in time
    /// and of those that were aborted.
    pub async fn shutdown(&self, stage: Stage, grace: Duration) -> (Vec<&'static str>, Vec<&'static str>) {
        let tasks: Vec<Task> = {
            let mut all = self.0.tasks.lock().unwrap();
            let (mine, rest) = std::mem::take(&mut *all).into_iter().partition(|t| t.stage == stage);
            *all = rest;
            mine
        };
        if let Some((_, tx)) = self.0.stops.iter().find(|(s, _)| *s == stage) {
            tx.send_replace(true);
        }
        let deadline = tokio::time::Instant::now() + grace;
        let (mut ended, mut aborted) = (Vec::new(), Vec::new());
        for mut t in tasks {
            match tokio::time::timeout_at(deadline, &mut t.handle).await {
                Ok(_) => ended.push(t.name),
                Err(_) => {
                    t.handle.abort();
                    let _ = t.handle.await;
                    tracing::warn!(
                        TASK = t.name,
                        grace_ms = grace.as_millis() as u64,
                        "task did not stop in time; aborted"
                    );
                    aborted.push(t.name);
                }
            }
        }
        (ended, aborted)
    }

    /// Names of the tasks running in `stage`.
    pub fn tasks(&self, stage: Stage) -> Vec<&'static str> {
        self.0.tasks.lock().unwrap().iter().filter(|t| t.stage == stage).map(|t| t.name).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn fast() -> Supervisor {
        Supervisor::new(Duration::from_millis(20), Duration::from_millis(80))
    }

    #[tokio::test]
    async fn a_panicking_or_failing_task_is_restarted_with_growing_backoff() {
        let sup = fast();
        let runs = Arc::new(Mutex::new(Vec::<Instant>::new()));
        let r = runs.clone();
        sup.spawn(Stage::Core, "flaky", Policy::Restart, move |mut stop| {
            let r = r.clone();
            async move {
                let n = {
                    let mut runs = r.lock().unwrap();
                    runs.push(Instant::now());
                    runs.len()
                };
                match n {
                    1 | 3 => panic!("run {n} panics"),
                    2 | 4 => Err(format!("run {n} fails")),
                    // Runs until stopped, then ends cleanly.
                    _ => {
                        stop.wait().await;
                        Ok(())
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(5), async {
            while runs.lock().unwrap().len() < 5 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the task was not restarted four times");
        let at = runs.lock().unwrap().clone();
        let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        // 20, 40, 80, 80 ms: doubling, capped.
        for (gap, want) in gaps.iter().zip([20u64, 40, 80, 80]) {
            assert!(*gap >= Duration::from_millis(want), "restart gaps {gaps:?}");
        }
        let (ended, aborted) = sup.shutdown(Stage::Core, Duration::from_secs(1)).await;
        assert_eq!((ended, aborted), (vec!["flaky"], vec![]));
        assert_eq!(runs.lock().unwrap().len(), 5, "restarted after the stop");
    }

    #[tokio::test]
    async fn a_fatal_failure_is_reported_once_and_not_restarted() {
        let sup = fast();
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        sup.spawn(Stage::Api, "listener", Policy::Fatal, move |_| {
            r.fetch_add(1, Ordering::SeqCst);
            async { panic!("accept loop broke") }
        });
        let reason = tokio::time::timeout(Duration::from_secs(5), sup.failed()).await.unwrap();
        assert_eq!(reason, "listener: panicked: accept loop broke");
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // A task that ends on its own before being stopped is a failure too.
        let sup = fast();
        sup.spawn_once(Stage::Api, "quits", |_| async { Ok(()) });
        let reason = tokio::time::timeout(Duration::from_secs(5), sup.failed()).await.unwrap();
        assert_eq!(reason, "quits: ended on its own");
    }

    #[tokio::test]
    async fn stages_stop_in_order_and_stragglers_are_aborted() {
        let sup = fast();
        let log = Arc::new(Mutex::new(Vec::<&'static str>::new()));
        for (stage, name) in [(Stage::Core, "reconciler"), (Stage::Cluster, "link"), (Stage::Api, "accept")] {
            let log = log.clone();
            sup.spawn(stage, name, Policy::Restart, move |mut stop| {
                let log = log.clone();
                async move {
                    stop.wait().await;
                    // Cleanup that takes a while (releasing a lease).
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    log.lock().unwrap().push(name);
                    Ok(())
                }
            });
        }
        sup.spawn(Stage::Core, "stuck", Policy::Restart, |_| std::future::pending());
        assert_eq!(sup.tasks(Stage::Core), ["reconciler", "stuck"]);
        let mut seen = Vec::new();
        for stage in Stage::ALL {
            let (ended, aborted) = sup.shutdown(stage, Duration::from_millis(300)).await;
            seen.push((stage, ended, aborted));
        }
        assert_eq!(*log.lock().unwrap(), ["accept", "link", "reconciler"]);
        assert_eq!(seen[2], (Stage::Core, vec!["reconciler"], vec!["stuck"]));
        assert!(sup.tasks(Stage::Core).is_empty());
    }
}

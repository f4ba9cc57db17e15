//! One background pass over every group (retention, the rollup): the
//! groups run concurrently and each is bounded in time, so one dead or slow
//! master delays no other; a failure is counted and logged, and the task's
//! next interval retries it.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::storage::shard_map::GroupHandle;

/// How long one group's part of a pass may take before it is abandoned.
const GROUP_BOUND: Duration = Duration::from_secs(300);

/// Runs `work` for every group of the current map; per group its result,
/// or `None` when it failed (`failed` counts it, the log names `what`) or
/// took longer than [`GROUP_BOUND`].
pub async fn each_group<T, E, F, Fut>(
    app: &App,
    what: &str,
    failed: fn(&str),
    work: F,
) -> Vec<(String, Option<T>)>
where
    E: Display,
    F: Fn(Arc<GroupHandle>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let groups = app.groups();
    let work = groups.iter().map(|g| {
        let part = work(g.clone());
        async move {
            let done = match tokio::time::timeout(GROUP_BOUND, part).await {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) => {
                    failed(&g.name);
                    tracing::warn!(group = %g.name, error = %e, "{what} failed; will retry next interval");
                    None
                }
                Err(_) => {
                    failed(&g.name);
                    tracing::warn!(group = %g.name, "{what} took over 5 minutes; abandoned");
                    None
                }
            };
            (g.name.clone(), done)
        }
    });
    futures::future::join_all(work).await
}

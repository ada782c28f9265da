//! The subject layout. See `docs/architecture.md`, "Subjects".

/// Every subject of the run journal starts with this.
pub const RUNS: &str = "baton.run";
/// External events accepted by the gateway or published on NATS.
pub const EVENTS: &str = "baton.events";
/// Dead letters.
pub const DLQ: &str = "baton.dlq";

/// The partition of a run: FNV-1a of its id, modulo the partition count. Stable forever, since it
/// decides which subject (and so which coordinator consumer) a run's events use.
pub fn partition(run_id: &str, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in run_id.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    (hash % u64::from(partitions.max(1))) as u32
}

/// `baton.run.<p>.<run>.run.<verb>`
pub fn run_event(partition: u32, run_id: &str, verb: &str) -> String {
    format!("{RUNS}.{partition}.{run_id}.run.{verb}")
}

/// `baton.run.<p>.<run>.step.<kind>.<verb>`
pub fn step_event(partition: u32, run_id: &str, kind: &str, verb: &str) -> String {
    format!("{RUNS}.{partition}.{run_id}.step.{kind}.{verb}")
}

/// `baton.run.<p>.<run>.timer.<name>.<verb>` (`at` for the schedule, `fired` when it fires)
pub fn timer_event(partition: u32, run_id: &str, name: &str, verb: &str) -> String {
    format!("{RUNS}.{partition}.{run_id}.timer.{name}.{verb}")
}

/// `baton.run.debounce.<key id>`: the schedule of a debounced trigger key. Outside every partition
/// (`<p>` is a number), so no coordinator reads it; the server writes the `run.requested` it holds
/// to the run's own subject when it fires.
pub fn debounce(key_id: &str) -> String {
    format!("{RUNS}.debounce.{key_id}")
}

/// Everything of one run: `baton.run.<p>.<run>.>`
pub fn run_all(partition: u32, run_id: &str) -> String {
    format!("{RUNS}.{partition}.{run_id}.>")
}

/// Everything of one partition: `baton.run.<p>.>`
pub fn partition_all(partition: u32) -> String {
    format!("{RUNS}.{partition}.>")
}

/// The events a partition's coordinator reacts to (its consumer's filter subjects).
pub fn coordinator_filters(partition: u32) -> Vec<String> {
    vec![
        format!("{RUNS}.{partition}.*.run.requested"),
        format!("{RUNS}.{partition}.*.run.cancel-requested"),
        format!("{RUNS}.{partition}.*.run.compensation-retry-requested"),
        format!("{RUNS}.{partition}.*.step.*.completed"),
        format!("{RUNS}.{partition}.*.step.*.failed"),
        format!("{RUNS}.{partition}.*.step.*.compensated"),
        format!("{RUNS}.{partition}.*.step.*.compensation-failed"),
        format!("{RUNS}.{partition}.*.timer.*.fired"),
    ]
}

/// The step and compensation requests of one kind, across all partitions (a runner consumer's
/// filters).
pub fn step_requests(kind: &str) -> Vec<String> {
    vec![
        format!("{RUNS}.*.*.step.{kind}.requested"),
        format!("{RUNS}.*.*.step.{kind}.compensate"),
    ]
}

/// Where external events of an origin (`http`, `github`, `nats` ...) are published.
pub fn ingress(origin: &str) -> String {
    format!("{EVENTS}.{origin}")
}

/// Whether `token` can be used as one subject token (step kinds, run ids): non-empty, and only
/// ASCII letters, digits, `-` and `_`.
pub fn is_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_in_range() {
        // Changing the hash would move live runs to other consumers: pin its values.
        assert_eq!(partition("01JABCDEF", 16), partition("01JABCDEF", 16));
        assert_eq!(partition("", 16), (0xcbf2_9ce4_8422_2325u64 % 16) as u32);
        assert!((0..1000).all(|i| partition(&format!("run-{i}"), 7) < 7));
        assert_eq!(partition("x", 0), 0);
    }

    #[test]
    fn tokens() {
        assert!(is_token("build-image_2"));
        assert!(!is_token("a.b") && !is_token("a b") && !is_token("") && !is_token("*"));
    }
}

//! Every Event reason the operator emits, in one list per type: [`super::reconcile::Note`]
//! refuses any other (in debug builds, so the tests catch a new reason), and a test holds the
//! README's Event lists to these.

/// Reasons of Normal Events.
pub const NORMAL: &[&str] = &[
    "Provisioned",
    "Placed",
    "RoleCreated",
    "SchemaCreated",
    "MigrationsApplied",
    "CredentialsIssued",
    "CredentialsRepaired",
    "CredentialsRotated",
    "PreviousCredentialsRetired",
    "Retained",
    "Deleted",
    "ReconcilePaused",
    "Suspended",
    "Resumed",
    "QuotaRestored",
    "SchemaDriftResolved",
];

/// Reasons of Warning Events.
pub const WARNING: &[&str] = &[
    "InvalidSpec",
    "ChangeRefused",
    "Conflict",
    "MigrationFailed",
    "UntrustedHistory",
    "RolloutHalted",
    "MigrationLocked",
    "AmbiguousRouting",
    "LockTimeout",
    "DatabaseUnavailable",
    "KubernetesError",
    "DatabaseError",
    "DeletionPending",
    "ReviewRequired",
    "OwnershipConverted",
    "QuotaExceeded",
    "SchemaDriftDetected",
    "RoleRecreated",
    "SchemaMissing",
    "SchemaRecreated",
    "HistoryMissing",
    "OwnershipMarkChanged",
    "KeptUnmarked",
    "NoServer",
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    /// The backticked names in `text`.
    fn quoted(text: &str) -> BTreeSet<&str> {
        text.split('`').skip(1).step_by(2).collect()
    }

    #[test]
    fn the_readme_lists_every_event_reason() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("**Events.**")
            .expect("README has an Events paragraph");
        let para = &readme[start..];
        let para = &para[..para.find("\n\n").unwrap_or(para.len())];
        let (normal, warning) = para
            .split_once("Warning:")
            .expect("the paragraph lists Normal, then Warning reasons");
        // Backticked words that are not reasons (file names, annotations) do not look like one.
        let reasons = |s| -> BTreeSet<&str> {
            quoted(s)
                .into_iter()
                .filter(|w| w.chars().all(|c| c.is_ascii_alphabetic()))
                .filter(|w| w.starts_with(|c: char| c.is_ascii_uppercase()))
                .collect()
        };
        assert_eq!(reasons(normal), super::NORMAL.iter().copied().collect());
        assert_eq!(reasons(warning), super::WARNING.iter().copied().collect());
    }
}

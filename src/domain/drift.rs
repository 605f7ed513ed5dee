//! Schema drift, pure: the descriptors a schema's fingerprint is made of (read by
//! [`crate::postgres::fingerprint`]), and the comparison of a tenant's descriptors with the
//! reference of its migration version that names what differs ("column tasks.priority: type
//! text, expected integer", "table audit: missing").

use std::collections::BTreeMap;

/// One object of a schema's fingerprint: a table, a column, a constraint or an index, with
/// its definition as labelled fields (schema-qualification taken out, so that two schemas
/// made by the same migrations describe alike).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `table`, `column`, `constraint` or `index`.
    pub kind: String,
    /// `tasks`, `tasks.priority` (column, constraint), `tasks_pkey` (index).
    pub name: String,
    /// The table the object belongs to (a table's own name for a table).
    pub table: String,
    /// `(label, value)` pairs, e.g. `("type", "integer")`, `("not null", "yes")`.
    pub fields: Vec<(String, String)>,
}

impl Descriptor {
    /// `kind name`, how differences are named.
    pub fn key(&self) -> String {
        format!("{} {}", self.kind, self.name)
    }
}

/// What a drifted schema differs in, one line per object, in a stable order: objects only
/// the tenant has ("index tasks_extra_idx: not in version 3"), objects it lacks ("table audit:
/// missing"), and objects defined otherwise ("column tasks.priority: type text, expected
/// integer"). Columns, constraints and indexes of a table that is missing or extra as a whole
/// are not listed again. `version` names the reference ("version 3", or "the empty schema").
pub fn differences(theirs: &[Descriptor], reference: &[Descriptor], version: &str) -> Vec<String> {
    let index = |ds: &[Descriptor]| -> BTreeMap<(String, String), Descriptor> {
        ds.iter()
            .map(|d| ((d.kind.clone(), d.name.clone()), d.clone()))
            .collect()
    };
    let (t, r) = (index(theirs), index(reference));
    let tables = |m: &BTreeMap<(String, String), Descriptor>| -> Vec<String> {
        m.values()
            .filter(|d| d.kind == "table")
            .map(|d| d.name.clone())
            .collect()
    };
    let (their_tables, ref_tables) = (tables(&t), tables(&r));
    let extra_tables: Vec<&String> = their_tables
        .iter()
        .filter(|n| !ref_tables.contains(n))
        .collect();
    let missing_tables: Vec<&String> = ref_tables
        .iter()
        .filter(|n| !their_tables.contains(n))
        .collect();
    let mut out = Vec::new();
    // Ordered by kind (table, column, constraint, index) then name.
    let rank = |k: &str| match k {
        "table" => 0,
        "column" => 1,
        "constraint" => 2,
        "index" => 3,
        _ => 4,
    };
    let mut keys: Vec<&(String, String)> = t.keys().chain(r.keys()).collect();
    keys.sort_by(|a, b| (rank(&a.0), &a.1).cmp(&(rank(&b.0), &b.1)));
    keys.dedup();
    for key in keys {
        match (t.get(key), r.get(key)) {
            (Some(d), None) => {
                if d.kind != "table" && extra_tables.contains(&&d.table) {
                    continue;
                }
                out.push(format!("{}: not in {version}", d.key()));
            }
            (None, Some(d)) => {
                if d.kind != "table" && missing_tables.contains(&&d.table) {
                    continue;
                }
                out.push(format!("{}: missing", d.key()));
            }
            (Some(a), Some(b)) if a.fields != b.fields => {
                out.push(format!(
                    "{}: {}",
                    a.key(),
                    field_changes(&a.fields, &b.fields)
                ));
            }
            _ => {}
        }
    }
    out
}

/// "type text, expected integer; default none, expected 0": the fields that differ.
fn field_changes(theirs: &[(String, String)], reference: &[(String, String)]) -> String {
    let get = |fs: &[(String, String)], label: &str| {
        fs.iter()
            .find(|(l, _)| l == label)
            .map_or_else(|| "none".to_string(), |(_, v)| v.clone())
    };
    let mut labels: Vec<&str> = Vec::new();
    for (l, _) in theirs.iter().chain(reference) {
        if !labels.contains(&l.as_str()) {
            labels.push(l);
        }
    }
    labels
        .into_iter()
        .filter_map(|l| {
            let (a, b) = (get(theirs, l), get(reference, l));
            (a != b).then(|| format!("{l} {a}, expected {b}"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// At most this many characters of differences in a condition message.
pub const MESSAGE_BUDGET: usize = 600;

/// The condition message of a drifted schema: as many differences as fit in
/// [`MESSAGE_BUDGET`] characters, then "and N more".
pub fn drift_message(version: &str, items: &[String]) -> String {
    let head = format!("the schema differs from {version}: ");
    let mut shown: Vec<&str> = Vec::new();
    let mut len = head.len();
    for item in items {
        let item = truncate(item, MESSAGE_BUDGET / 2);
        if !shown.is_empty() && len + item.len() + 2 > head.len() + MESSAGE_BUDGET {
            break;
        }
        len += item.len() + 2;
        shown.push(item);
    }
    let rest = items.len() - shown.len();
    let mut message = head + &shown.join("; ");
    if rest > 0 {
        message.push_str(&format!("; and {rest} more"));
    }
    message
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// How a reference version is named in messages.
pub fn version_label(version: Option<i64>) -> String {
    match version {
        Some(v) => format!("migration version {v}"),
        None => "the schema before any migration".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(kind: &str, name: &str, table: &str, fields: &[(&str, &str)]) -> Descriptor {
        Descriptor {
            kind: kind.into(),
            name: name.into(),
            table: table.into(),
            fields: fields
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    fn reference() -> Vec<Descriptor> {
        vec![
            d("table", "tasks", "tasks", &[("kind", "ordinary")]),
            d(
                "column",
                "tasks.priority",
                "tasks",
                &[("type", "integer"), ("not null", "yes"), ("default", "0")],
            ),
            d(
                "index",
                "tasks_pkey",
                "tasks",
                &[(
                    "definition",
                    "CREATE UNIQUE INDEX tasks_pkey ON tasks USING btree (id)",
                )],
            ),
            d("table", "audit", "audit", &[("kind", "ordinary")]),
            d(
                "column",
                "audit.at",
                "audit",
                &[("type", "timestamp with time zone")],
            ),
            d(
                "constraint",
                "audit.audit_pkey",
                "audit",
                &[("definition", "PRIMARY KEY (at)")],
            ),
        ]
    }

    #[test]
    fn the_same_descriptors_do_not_differ() {
        assert!(differences(&reference(), &reference(), "migration version 3").is_empty());
        // Order does not matter.
        let mut shuffled = reference();
        shuffled.reverse();
        assert!(differences(&shuffled, &reference(), "v").is_empty());
    }

    #[test]
    fn differences_are_named_by_object() {
        let mut theirs: Vec<Descriptor> = reference()
            .into_iter()
            .filter(|x| x.table != "audit")
            .collect();
        theirs[1] = d(
            "column",
            "tasks.priority",
            "tasks",
            &[("type", "text"), ("not null", "yes"), ("default", "0")],
        );
        theirs.push(d(
            "index",
            "tasks_extra_idx",
            "tasks",
            &[(
                "definition",
                "CREATE INDEX tasks_extra_idx ON tasks USING btree (title)",
            )],
        ));
        let got = differences(&theirs, &reference(), "migration version 3");
        assert_eq!(
            got,
            [
                "table audit: missing",
                "column tasks.priority: type text, expected integer",
                "index tasks_extra_idx: not in migration version 3",
            ],
            "the missing table's columns and constraints are not listed again"
        );
    }

    #[test]
    fn an_extra_table_is_named_once_and_fields_name_what_changed() {
        let mut theirs = reference();
        theirs.push(d("table", "notes", "notes", &[("kind", "ordinary")]));
        theirs.push(d("column", "notes.body", "notes", &[("type", "text")]));
        theirs[1] = d("column", "tasks.priority", "tasks", &[("type", "integer")]);
        let got = differences(&theirs, &reference(), "migration version 2");
        assert_eq!(
            got,
            [
                "table notes: not in migration version 2",
                "column tasks.priority: not null none, expected yes; default none, expected 0",
            ]
        );
    }

    #[test]
    fn the_message_is_bounded_and_says_how_many_more() {
        let items: Vec<String> = (0..100)
            .map(|i| format!("column t.c{i:03}: not in migration version 1"))
            .collect();
        let m = drift_message("migration version 1", &items);
        assert!(m.len() < MESSAGE_BUDGET + 100, "{}", m.len());
        assert!(m.starts_with("the schema differs from migration version 1: column t.c000"));
        let shown = m.matches("column t.c").count();
        assert!(m.ends_with(&format!("; and {} more", 100 - shown)), "{m}");
        // One enormous item is cut, not dropped.
        let m = drift_message("v", &["x".repeat(5000)]);
        assert!(m.len() < MESSAGE_BUDGET, "{}", m.len());
        assert!(!m.contains("more"));
        assert_eq!(
            drift_message("v", &["a".into(), "b".into()]),
            "the schema differs from v: a; b"
        );
    }
}

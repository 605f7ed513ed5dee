//! The migration lint: statements known to hold long exclusive locks on populated tables are
//! refused before anything runs, naming the rule and `file:line`. Pure (no database): a small
//! lexer splits each file into statements and a few token patterns recognise the risky ones;
//! anything it does not recognise passes.

use std::{borrow::Cow, collections::HashSet, fmt};

use super::migrations::{Migration, MigrationSet};

/// One lint rule: its stable id (what an opt-out names), what it catches, why, and what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub id: &'static str,
    pub catches: &'static str,
    pub fix: &'static str,
    /// Whether `-- tenantry:lint-allow <id>` may silence it (false for rules whose statements
    /// would fail anyway).
    pub allowable: bool,
}

pub const CREATE_INDEX: &str = "create-index-non-concurrent";
pub const VOLATILE_DEFAULT: &str = "add-column-volatile-default";
pub const ALTER_TYPE: &str = "alter-column-type";
pub const CONSTRAINT_NOT_VALID: &str = "add-constraint-without-not-valid";
pub const CONSTRAINT_INDEX: &str = "add-constraint-builds-index";
pub const SET_NOT_NULL: &str = "set-not-null";
pub const VACUUM_FULL: &str = "vacuum-full";
pub const CLUSTER: &str = "cluster";
pub const REINDEX: &str = "reindex-non-concurrent";
pub const REFRESH: &str = "refresh-materialized-view-non-concurrent";
pub const CONCURRENT_MIXED: &str = "concurrently-mixed";
pub const CONCURRENT_UNNAMED: &str = "concurrent-index-unnamed";
pub const BAD_ALLOW: &str = "lint-allow-invalid";

/// Every rule, in the order the README documents them.
pub const RULES: &[Rule] = &[
    Rule {
        id: CREATE_INDEX,
        catches: "CREATE [UNIQUE] INDEX without CONCURRENTLY on a table this file did not create",
        fix: "use CREATE INDEX CONCURRENTLY <name> in a migration file of its own (it runs outside a transaction)",
        allowable: true,
    },
    Rule {
        id: VOLATILE_DEFAULT,
        catches: "ALTER TABLE … ADD COLUMN with a volatile default (a function call other than now() and a few stable ones), a serial type, GENERATED … AS IDENTITY or GENERATED ALWAYS AS (…) STORED, on a table this file did not create",
        fix: "add the column without a default (or with a constant one), then fill it in batches in later migrations or from the application, then set the default",
        allowable: true,
    },
    Rule {
        id: ALTER_TYPE,
        catches: "ALTER TABLE … ALTER [COLUMN] … [SET DATA] TYPE on a table this file did not create",
        fix: "add a new column, backfill it in batches, switch the application, then drop the old column (a binary-coercible change such as varchar(n) to text may be allowed with a marked comment)",
        allowable: true,
    },
    Rule {
        id: CONSTRAINT_NOT_VALID,
        catches: "ALTER TABLE … ADD [CONSTRAINT …] FOREIGN KEY or CHECK without NOT VALID (and ADD COLUMN with an inline CHECK) on a table this file did not create",
        fix: "ADD CONSTRAINT … NOT VALID, then ALTER TABLE … VALIDATE CONSTRAINT … in a later migration",
        allowable: true,
    },
    Rule {
        id: CONSTRAINT_INDEX,
        catches: "ALTER TABLE … ADD [CONSTRAINT …] UNIQUE, PRIMARY KEY or EXCLUDE (or ADD COLUMN … UNIQUE/PRIMARY KEY) without USING INDEX on a table this file did not create",
        fix: "CREATE UNIQUE INDEX CONCURRENTLY in a file of its own, then ADD CONSTRAINT … UNIQUE USING INDEX (or PRIMARY KEY USING INDEX)",
        allowable: true,
    },
    Rule {
        id: SET_NOT_NULL,
        catches: "ALTER TABLE … ALTER [COLUMN] … SET NOT NULL on a table this file did not create",
        fix: "ADD CONSTRAINT … CHECK (col IS NOT NULL) NOT VALID, VALIDATE it in a later migration, then SET NOT NULL (which uses the valid check instead of scanning) and drop the check",
        allowable: true,
    },
    Rule {
        id: VACUUM_FULL,
        catches: "VACUUM FULL (or VACUUM (FULL))",
        fix: "do not rewrite tables in migrations: plain VACUUM runs by itself (autovacuum), or use an online tool such as pg_repack outside the migration set",
        allowable: true,
    },
    Rule {
        id: CLUSTER,
        catches: "CLUSTER on a table this file did not create (or on every clustered table)",
        fix: "do not rewrite tables in migrations; use an online tool such as pg_repack outside the migration set",
        allowable: true,
    },
    Rule {
        id: REINDEX,
        catches: "REINDEX without CONCURRENTLY",
        fix: "REINDEX … CONCURRENTLY in a migration file of its own (it runs outside a transaction)",
        allowable: true,
    },
    Rule {
        id: REFRESH,
        catches: "REFRESH MATERIALIZED VIEW without CONCURRENTLY on a view this file did not create",
        fix: "REFRESH MATERIALIZED VIEW CONCURRENTLY (the view needs a unique index), or refresh it outside migrations",
        allowable: true,
    },
    Rule {
        id: CONCURRENT_MIXED,
        catches: "a file mixing CREATE/DROP INDEX CONCURRENTLY or REINDEX … CONCURRENTLY with other statements",
        fix: "put the CONCURRENTLY statements in a migration file of their own: such a file runs outside a transaction, which PostgreSQL requires",
        allowable: false,
    },
    Rule {
        id: CONCURRENT_UNNAMED,
        catches: "CREATE INDEX CONCURRENTLY without an index name",
        fix: "name the index: after a failed build the operator finds the INVALID index it left by that name and drops it before retrying",
        allowable: false,
    },
    Rule {
        id: BAD_ALLOW,
        catches: "a `tenantry:lint-allow` comment naming an unknown rule or a rule that cannot be allowed, or giving no reason",
        fix: "write `-- tenantry:lint-allow <rule-id>[,<rule-id>] <reason>` with ids from this table",
        allowable: false,
    },
];

/// The marker of an opt-out comment.
pub const ALLOW_MARKER: &str = "tenantry:lint-allow";

fn rule(id: &str) -> Option<&'static Rule> {
    RULES.iter().find(|r| r.id == id)
}

/// One lint finding.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The rule's stable id.
    pub rule: &'static str,
    /// `<version>_<description>.sql`.
    pub file: String,
    /// 1-based line where the statement starts.
    pub line: usize,
    /// What was found and what to do instead.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: [{}] {}",
            self.file, self.line, self.rule, self.message
        )
    }
}

/// The file name of a migration, as [`MigrationSet::from_files`] reads it.
pub fn file_name(m: &Migration) -> String {
    format!("{}_{}.sql", m.version, m.description.replace(' ', "_"))
}

/// Lints every migration of the set. A table counts as new only in the file that creates it:
/// a table created by an earlier file is existing (populated on a live tenant).
///
/// The demo set's files, byte for byte as embedded, are exempt: they were applied by tenants
/// before the lint existed, and changing them (even by a comment) would make every such tenant
/// refuse the set (checksum mismatch). Its version 2 indexes `tasks` without CONCURRENTLY.
pub fn lint(set: &MigrationSet) -> Vec<Finding> {
    let demo = MigrationSet::embedded();
    set.migrations()
        .iter()
        .filter(|m| !demo.migrations().contains(m))
        .flat_map(lint_migration)
        .collect()
}

/// Lints the migrations of the set above `version` only (those not yet applied anywhere that
/// has `version`); earlier files still count as having created their tables.
pub fn lint_after(set: &MigrationSet, version: i64) -> Vec<Finding> {
    lint(set)
        .into_iter()
        .filter(|f| {
            set.migrations()
                .iter()
                .any(|m| m.version > version && file_name(m) == f.file)
        })
        .collect()
}

/// Lints one migration file on its own.
pub fn lint_migration(m: &Migration) -> Vec<Finding> {
    lint_sql(&file_name(m), &m.sql)
}

/// Lints the SQL text of one file named `file`.
pub fn lint_sql(file: &str, sql: &str) -> Vec<Finding> {
    let statements = split(sql);
    let mut created: HashSet<String> = HashSet::new();
    let mut findings = Vec::new();
    let concurrent = statements.iter().filter(|s| s.is_concurrent()).count();
    for s in &statements {
        let (allowed, mut bad) = s.allowances();
        for b in bad.drain(..) {
            findings.push(Finding {
                rule: BAD_ALLOW,
                file: file.to_string(),
                line: b.0,
                message: format!("{}; {}", b.1, rule(BAD_ALLOW).expect("rule").fix),
            });
        }
        let mut hits = s.check(&created);
        if concurrent > 0 && concurrent < statements.len() && s.is_concurrent() {
            hits.push((
                CONCURRENT_MIXED,
                "this CONCURRENTLY statement shares its file with other statements".to_string(),
            ));
        }
        for (id, what) in hits {
            let r = rule(id).expect("known rule");
            if r.allowable && allowed.contains(id) {
                continue;
            }
            findings.push(Finding {
                rule: id,
                file: file.to_string(),
                line: s.line,
                message: format!(
                    "{what}: {}; instead, {}{}",
                    why(id),
                    r.fix,
                    if r.allowable {
                        format!(" (or, if this is safe here, mark it `-- {ALLOW_MARKER} {id} <reason>`)")
                    } else {
                        String::new()
                    }
                ),
            });
        }
        if let Some(t) = s.created_table() {
            created.insert(t);
        }
        if let Some((from, to)) = s.renamed_table() {
            if created.contains(&from) {
                created.insert(to);
            }
        }
    }
    findings
}

fn why(id: &str) -> &'static str {
    match id {
        CREATE_INDEX => "it blocks every write to the table (SHARE lock) while the whole index is built",
        VOLATILE_DEFAULT => "it rewrites the whole table under an ACCESS EXCLUSIVE lock, blocking every read and write",
        ALTER_TYPE => "it usually rewrites the table (and its indexes) under an ACCESS EXCLUSIVE lock, blocking every read and write",
        CONSTRAINT_NOT_VALID => "it scans the whole table to validate the constraint while holding a lock that blocks writes",
        CONSTRAINT_INDEX => "it builds a unique index under an ACCESS EXCLUSIVE lock, blocking every read and write",
        SET_NOT_NULL => "it scans the whole table under an ACCESS EXCLUSIVE lock, blocking every read and write",
        VACUUM_FULL | CLUSTER => "it rewrites the whole table under an ACCESS EXCLUSIVE lock, blocking every read and write",
        REINDEX => "it blocks writes to the table (and reads that use the index) while the index is rebuilt",
        REFRESH => "it blocks every read of the view while it is recomputed",
        CONCURRENT_MIXED => "PostgreSQL refuses CONCURRENTLY inside a transaction block, and a file with other statements runs in one",
        CONCURRENT_UNNAMED => "an interrupted concurrent build leaves an INVALID index that a retry must find by name",
        _ => "",
    }
}

// ---------------------------------------------------------------------------------------------
// Lexer

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An unquoted word, ASCII-uppercased (keywords and identifiers alike).
    Word(String),
    /// A double-quoted identifier, as written between the quotes (`""` undone).
    Quoted(String),
    /// A string constant (its contents are irrelevant to the rules).
    Str,
    Num,
    LParen,
    RParen,
    Comma,
    Dot,
    /// `::`
    Cast,
    Op(char),
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

/// One statement of a migration file.
#[derive(Debug, Clone)]
pub struct Statement {
    /// 1-based line of its first token.
    pub line: usize,
    /// Byte range in the file (from the first token to before the `;`).
    pub start: usize,
    pub end: usize,
    tokens: Vec<Token>,
    /// Comments before it (since the previous statement) and inside it: (line, text).
    comments: Vec<(usize, String)>,
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// Splits SQL into statements at top-level semicolons, skipping string constants (`'…'` with
/// `''`, `E'…'` with backslash escapes), quoted identifiers, dollar-quoted bodies (`$$`,
/// `$tag$`), `--` and nested `/* */` comments, and SQL-standard function bodies
/// (`BEGIN ATOMIC … END`). Never fails: unterminated constructs run to the end of the file.
pub fn split(sql: &str) -> Vec<Statement> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut out: Vec<Statement> = Vec::new();
    let mut tokens: Vec<Token> = Vec::new();
    let mut comments: Vec<(usize, String)> = Vec::new();
    let mut first_line = 0;
    let mut line = 1;
    let mut i = 0;
    // Nesting depth inside BEGIN ATOMIC … END (semicolons there do not end the statement).
    let mut atomic = 0usize;
    let mut last_semicolon_line = 0;
    let count_lines = |from: usize, to: usize| b[from..to].iter().filter(|c| **c == b'\n').count();
    macro_rules! push {
        ($tok:expr, $start:expr, $end:expr, $line:expr) => {{
            if tokens.is_empty() {
                first_line = $line;
            }
            tokens.push(Token {
                tok: $tok,
                start: $start,
                end: $end,
            });
        }};
    }
    while i < n {
        let c = b[i];
        let start = i;
        let start_line = line;
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            _ if c.is_ascii_whitespace() => i += 1,
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < n && b[i] != b'\n' {
                    i += 1;
                }
                let text = sql[start..i].to_string();
                // A trailing comment on the line of the previous statement's `;` belongs to it.
                match out.last_mut() {
                    Some(prev) if tokens.is_empty() && start_line == last_semicolon_line => {
                        prev.comments.push((start_line, text))
                    }
                    _ => comments.push((start_line, text)),
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < n {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
                let i2 = i.min(n);
                line += count_lines(start, i2);
                comments.push((start_line, sql[start..i2].to_string()));
            }
            b'\'' => {
                i = skip_string(b, i, false);
                line += count_lines(start, i);
                push!(Tok::Str, start, i, start_line);
            }
            b'"' => {
                i += 1;
                let mut name = Vec::new();
                while i < n {
                    if b[i] == b'"' {
                        if b.get(i + 1) == Some(&b'"') {
                            name.push(b'"');
                            i += 2;
                            continue;
                        }
                        i += 1;
                        break;
                    }
                    name.push(b[i]);
                    i += 1;
                }
                line += count_lines(start, i);
                push!(
                    Tok::Quoted(String::from_utf8_lossy(&name).into_owned()),
                    start,
                    i,
                    start_line
                );
            }
            b'$' => {
                if b.get(i + 1).is_some_and(|d| d.is_ascii_digit()) {
                    // A parameter ($1).
                    i += 1;
                    while i < n && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    push!(Tok::Op('$'), start, i, start_line);
                } else {
                    let mut j = i + 1;
                    while j < n && is_ident_char(b[j]) && b[j] != b'$' {
                        j += 1;
                    }
                    if j < n && b[j] == b'$' {
                        let tag = &sql[i..=j];
                        let body = j + 1;
                        i = match sql[body..].find(tag) {
                            Some(k) => body + k + tag.len(),
                            None => n,
                        };
                        line += count_lines(start, i);
                        push!(Tok::Str, start, i, start_line);
                    } else {
                        i += 1;
                        push!(Tok::Op('$'), start, i, start_line);
                    }
                }
            }
            b';' if atomic == 0 => {
                i += 1;
                if !tokens.is_empty() {
                    out.push(Statement {
                        line: first_line,
                        start: tokens[0].start,
                        end: start,
                        tokens: std::mem::take(&mut tokens),
                        comments: std::mem::take(&mut comments),
                    });
                    last_semicolon_line = line;
                }
            }
            b'(' | b')' | b',' | b'.' => {
                i += 1;
                let tok = match c {
                    b'(' => Tok::LParen,
                    b')' => Tok::RParen,
                    b',' => Tok::Comma,
                    _ => Tok::Dot,
                };
                push!(tok, start, i, start_line);
            }
            b':' if b.get(i + 1) == Some(&b':') => {
                i += 2;
                push!(Tok::Cast, start, i, start_line);
            }
            _ if c.is_ascii_digit() => {
                while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                    i += 1;
                }
                push!(Tok::Num, start, i, start_line);
            }
            _ if is_ident_start(c) => {
                while i < n && is_ident_char(b[i]) {
                    i += 1;
                }
                let word = sql[start..i].to_ascii_uppercase();
                if b.get(i) == Some(&b'\'') && matches!(word.as_str(), "E" | "B" | "X" | "N") {
                    i = skip_string(b, i, word == "E");
                    line += count_lines(start, i);
                    push!(Tok::Str, start, i, start_line);
                    continue;
                }
                if word == "U" && b.get(i) == Some(&b'&') && b.get(i + 1) == Some(&b'\'') {
                    i = skip_string(b, i + 1, false);
                    line += count_lines(start, i);
                    push!(Tok::Str, start, i, start_line);
                    continue;
                }
                // SQL-standard function bodies: BEGIN ATOMIC … END, with CASE … END inside.
                if atomic > 0 {
                    match word.as_str() {
                        "CASE" => atomic += 1,
                        "BEGIN" => atomic += 1,
                        "END" => atomic -= 1,
                        _ => {}
                    }
                } else if word == "ATOMIC"
                    && matches!(tokens.last(), Some(Token { tok: Tok::Word(w), .. }) if w == "BEGIN")
                {
                    atomic = 1;
                }
                push!(Tok::Word(word), start, i, start_line);
            }
            _ => {
                // Any other character (operators, a `;` inside BEGIN ATOMIC); whole UTF-8
                // characters are consumed by the identifier branch.
                i += 1;
                push!(Tok::Op(c as char), start, i, start_line);
            }
        }
    }
    if !tokens.is_empty() {
        out.push(Statement {
            line: first_line,
            start: tokens[0].start,
            end: n,
            tokens,
            comments,
        });
    }
    out
}

/// The end of a single-quoted string starting at `i` (the quote): `''` is a quote; with
/// `backslash` (E'…'), so is `\'` and any `\x`.
fn skip_string(b: &[u8], mut i: usize, backslash: bool) -> usize {
    i += 1;
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// A name as PostgreSQL folds it: unquoted words lowercase, quoted ones verbatim.
fn name_of(t: &Tok) -> Option<String> {
    match t {
        Tok::Word(w) => Some(w.to_ascii_lowercase()),
        Tok::Quoted(q) => Some(q.clone()),
        _ => None,
    }
}

impl Statement {
    fn toks(&self) -> impl Iterator<Item = &Tok> + Clone {
        self.tokens.iter().map(|t| &t.tok)
    }

    fn word(&self, i: usize) -> Option<&str> {
        match self.tokens.get(i).map(|t| &t.tok) {
            Some(Tok::Word(w)) => Some(w),
            _ => None,
        }
    }

    fn is(&self, i: usize, kw: &str) -> bool {
        self.word(i) == Some(kw)
    }

    fn has_word(&self, kw: &str) -> bool {
        self.toks().any(|t| matches!(t, Tok::Word(w) if w == kw))
    }

    /// The (last component of the) possibly qualified name at `i`, and the index after it.
    fn name_at(&self, mut i: usize) -> Option<(String, usize)> {
        let mut name = name_of(&self.tokens.get(i)?.tok)?;
        i += 1;
        while matches!(self.tokens.get(i).map(|t| &t.tok), Some(Tok::Dot)) {
            name = name_of(&self.tokens.get(i + 1)?.tok)?;
            i += 2;
        }
        Some((name, i))
    }

    /// Index after the optional words `kws`, in order, each present or not.
    fn skip(&self, mut i: usize, kws: &[&str]) -> usize {
        for kw in kws {
            if self.is(i, kw) {
                i += 1;
            }
        }
        i
    }

    /// `CREATE [UNIQUE] INDEX CONCURRENTLY`, `DROP INDEX CONCURRENTLY` or
    /// `REINDEX … CONCURRENTLY`: the statements that must run outside a transaction block.
    pub fn is_concurrent(&self) -> bool {
        if self.is(0, "CREATE") {
            let i = self.skip(1, &["UNIQUE"]);
            self.is(i, "INDEX") && self.is(i + 1, "CONCURRENTLY")
        } else if self.is(0, "DROP") {
            self.is(1, "INDEX") && self.is(2, "CONCURRENTLY")
        } else {
            self.is(0, "REINDEX") && self.has_word("CONCURRENTLY")
        }
    }

    /// The one unqualified index a `DROP INDEX CONCURRENTLY [IF EXISTS] name [CASCADE |
    /// RESTRICT]` drops.
    pub fn concurrent_drop_name(&self) -> Option<String> {
        if !(self.is(0, "DROP") && self.is(1, "INDEX") && self.is(2, "CONCURRENTLY")) {
            return None;
        }
        let i = if self.is(3, "IF") { 5 } else { 3 };
        let name = name_of(&self.tokens.get(i)?.tok)?;
        match self.tokens.get(i + 1).map(|t| &t.tok) {
            None => Some(name),
            Some(Tok::Word(w)) if w == "CASCADE" || w == "RESTRICT" => Some(name),
            _ => None,
        }
    }

    /// The name of the index a `CREATE INDEX CONCURRENTLY` builds, if given.
    pub fn concurrent_index_name(&self) -> Option<String> {
        if !self.is(0, "CREATE") {
            return None;
        }
        let i = self.skip(1, &["UNIQUE"]);
        if !(self.is(i, "INDEX") && self.is(i + 1, "CONCURRENTLY")) {
            return None;
        }
        let i = if self.is(i + 2, "IF") { i + 5 } else { i + 2 };
        if self.is(i, "ON") {
            return None;
        }
        // An index name is never qualified.
        name_of(&self.tokens.get(i)?.tok)
    }

    /// The statement's text with the CONCURRENTLY keyword left out: the same effect inside a
    /// transaction, on tables nobody else uses (a scratch reference schema).
    pub fn without_concurrently<'a>(&self, sql: &'a str) -> Cow<'a, str> {
        let text = &sql[self.start..self.end];
        match self
            .tokens
            .iter()
            .find(|t| matches!(&t.tok, Tok::Word(w) if w == "CONCURRENTLY"))
        {
            Some(t) => Cow::Owned(format!(
                "{}{}",
                &sql[self.start..t.start],
                &sql[t.end..self.end]
            )),
            None => Cow::Borrowed(text),
        }
    }

    /// The table (or materialized view) this statement creates.
    fn created_table(&self) -> Option<String> {
        if !self.is(0, "CREATE") {
            return None;
        }
        let mut i = self.skip(1, &["OR", "REPLACE"]);
        i = self.skip(i, &["GLOBAL", "LOCAL"]);
        i = self.skip(i, &["TEMP", "TEMPORARY", "UNLOGGED"]);
        if self.is(i, "TABLE") {
            i += 1;
        } else if self.is(i, "MATERIALIZED") && self.is(i + 1, "VIEW") {
            i += 2;
        } else {
            return None;
        }
        if self.is(i, "IF") {
            i += 3;
        }
        self.name_at(i).map(|(n, _)| n)
    }

    /// `ALTER TABLE a RENAME TO b`: (a, b).
    fn renamed_table(&self) -> Option<(String, String)> {
        let (table, i) = self.altered_table()?;
        if self.is(i, "RENAME") && self.is(i + 1, "TO") {
            let (to, _) = self.name_at(i + 2)?;
            return Some((table, to));
        }
        None
    }

    /// `ALTER TABLE [IF EXISTS] [ONLY] name [*]`: the name and the index of the first action.
    fn altered_table(&self) -> Option<(String, usize)> {
        if !(self.is(0, "ALTER") && self.is(1, "TABLE")) {
            return None;
        }
        let mut i = 2;
        if self.is(i, "IF") {
            i += 2;
        }
        i = self.skip(i, &["ONLY"]);
        let (name, mut i) = self.name_at(i)?;
        if matches!(self.tokens.get(i).map(|t| &t.tok), Some(Tok::Op('*'))) {
            i += 1;
        }
        Some((name, i))
    }

    /// The rules this statement breaks, given the tables created earlier in its file.
    fn check(&self, created: &HashSet<String>) -> Vec<(&'static str, String)> {
        let mut hits = Vec::new();
        let new = |t: &str| created.contains(t);
        let first = self.word(0).unwrap_or_default();
        match first {
            "CREATE" => {
                let i = self.skip(1, &["UNIQUE"]);
                if self.is(i, "INDEX") {
                    let concurrently = self.is(i + 1, "CONCURRENTLY");
                    if concurrently && self.concurrent_index_name().is_none() {
                        hits.push((
                            CONCURRENT_UNNAMED,
                            "CREATE INDEX CONCURRENTLY without a name".to_string(),
                        ));
                    }
                    let on = self
                        .tokens
                        .iter()
                        .position(|t| t.tok == Tok::Word("ON".into()));
                    if let Some(on) = on {
                        let j = self.skip(on + 1, &["ONLY"]);
                        if let Some((table, _)) = self.name_at(j) {
                            if !concurrently && !new(&table) {
                                hits.push((
                                    CREATE_INDEX,
                                    format!("CREATE INDEX on existing table {table:?} without CONCURRENTLY"),
                                ));
                            }
                        }
                    }
                }
            }
            "ALTER" => {
                if let Some((table, i)) = self.altered_table() {
                    if !new(&table) {
                        for action in self.actions(i) {
                            hits.extend(self.check_action(&table, action));
                        }
                    }
                }
            }
            "VACUUM" => {
                let full = self.tokens.iter().enumerate().any(|(k, t)| {
                    t.tok == Tok::Word("FULL".into())
                        && !matches!(self.word(k + 1), Some("FALSE" | "OFF"))
                        && !matches!(self.tokens.get(k + 1).map(|t| &t.tok), Some(Tok::Num))
                });
                if full {
                    hits.push((VACUUM_FULL, "VACUUM FULL".to_string()));
                }
            }
            "CLUSTER" => {
                let mut i = 1;
                if self.tokens.get(1).map(|t| &t.tok) == Some(&Tok::LParen) {
                    i = self
                        .tokens
                        .iter()
                        .position(|t| t.tok == Tok::RParen)
                        .unwrap_or(0)
                        + 1;
                }
                i = self.skip(i, &["VERBOSE"]);
                match self.name_at(i) {
                    Some((table, _)) if new(&table) => {}
                    Some((table, _)) => {
                        hits.push((CLUSTER, format!("CLUSTER of existing table {table:?}")))
                    }
                    None => hits.push((CLUSTER, "CLUSTER of every clustered table".to_string())),
                }
            }
            "REINDEX" if !self.has_word("CONCURRENTLY") => {
                hits.push((REINDEX, "REINDEX without CONCURRENTLY".to_string()));
            }
            "REFRESH" if self.is(1, "MATERIALIZED") && !self.is(3, "CONCURRENTLY") => {
                if let Some((view, _)) = self.name_at(3) {
                    if !new(&view) {
                        hits.push((
                            REFRESH,
                            format!("REFRESH MATERIALIZED VIEW {view:?} without CONCURRENTLY"),
                        ));
                    }
                }
            }
            _ => {}
        }
        hits
    }

    /// The comma-separated actions of an ALTER TABLE from token `i`: token index ranges.
    fn actions(&self, i: usize) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut depth = 0i32;
        let mut from = i;
        for (k, t) in self.tokens.iter().enumerate().skip(i) {
            match t.tok {
                Tok::LParen => depth += 1,
                Tok::RParen => depth -= 1,
                Tok::Comma if depth == 0 => {
                    out.push(from..k);
                    from = k + 1;
                }
                _ => {}
            }
        }
        out.push(from..self.tokens.len());
        out
    }

    fn check_action(&self, table: &str, r: std::ops::Range<usize>) -> Vec<(&'static str, String)> {
        let mut hits = Vec::new();
        let toks: Vec<&Tok> = self.tokens[r.clone()].iter().map(|t| &t.tok).collect();
        let w = |k: usize| match toks.get(k) {
            Some(Tok::Word(w)) => Some(w.as_str()),
            _ => None,
        };
        // Words at parenthesis depth 0 of the action.
        let mut depth = 0;
        let top: Vec<(usize, &str)> = toks
            .iter()
            .enumerate()
            .filter_map(|(k, t)| {
                match t {
                    Tok::LParen => depth += 1,
                    Tok::RParen => depth -= 1,
                    Tok::Word(x) if depth == 0 => return Some((k, x.as_str())),
                    _ => {}
                }
                None
            })
            .collect();
        let top_has = |kw: &str| top.iter().any(|(_, x)| *x == kw);
        let not_valid = top
            .windows(2)
            .any(|p| p[0].1 == "NOT" && p[1].1 == "VALID" && p[1].0 == p[0].0 + 1);
        match w(0) {
            Some("ADD") => {
                let constraint_kind = match w(1) {
                    Some("CONSTRAINT") => w(3),
                    Some(k @ ("CHECK" | "FOREIGN" | "UNIQUE" | "PRIMARY" | "EXCLUDE")) => Some(k),
                    _ => None,
                };
                match constraint_kind {
                    Some("FOREIGN" | "CHECK") if !not_valid => hits.push((
                        CONSTRAINT_NOT_VALID,
                        format!("constraint added to existing table {table:?} without NOT VALID"),
                    )),
                    Some("UNIQUE" | "PRIMARY" | "EXCLUDE")
                        if !top_has("USING") || top_has("EXCLUDE") =>
                    {
                        hits.push((
                            CONSTRAINT_INDEX,
                            format!("constraint added to existing table {table:?} builds an index"),
                        ))
                    }
                    Some(_) => {}
                    None => {
                        // ADD [COLUMN] [IF NOT EXISTS] name type …
                        let mut k = if w(1) == Some("COLUMN") { 2 } else { 1 };
                        if w(k) == Some("IF") {
                            k += 3;
                        }
                        let column = toks.get(k).and_then(|t| name_of(t)).unwrap_or_default();
                        let what = format!("column {column:?} added to existing table {table:?}");
                        if let Some(
                            ty @ ("SERIAL" | "SERIAL2" | "SERIAL4" | "SERIAL8" | "BIGSERIAL"
                            | "SMALLSERIAL"),
                        ) = w(k + 1)
                        {
                            hits.push((
                                VOLATILE_DEFAULT,
                                format!("{what} as {}", ty.to_ascii_lowercase()),
                            ));
                        } else if top_has("GENERATED") && top_has("IDENTITY") {
                            hits.push((VOLATILE_DEFAULT, format!("{what} as an identity column")));
                        } else if top_has("GENERATED") && !top_has("VIRTUAL") {
                            hits.push((
                                VOLATILE_DEFAULT,
                                format!("{what} as a stored generated column"),
                            ));
                        } else if let Some(f) = volatile_default(&toks) {
                            hits.push((
                                VOLATILE_DEFAULT,
                                format!(
                                    "{what} with the volatile default {}()",
                                    f.to_ascii_lowercase()
                                ),
                            ));
                        }
                        if top_has("UNIQUE") || top_has("PRIMARY") {
                            hits.push((
                                CONSTRAINT_INDEX,
                                format!("{what} with UNIQUE or PRIMARY KEY builds an index"),
                            ));
                        }
                        if top_has("CHECK") {
                            hits.push((
                                CONSTRAINT_NOT_VALID,
                                format!("{what} with an inline CHECK is validated by a full scan"),
                            ));
                        }
                    }
                }
            }
            Some("ALTER") if w(1) != Some("CONSTRAINT") => {
                let k = if w(1) == Some("COLUMN") { 2 } else { 1 };
                let column = toks.get(k).and_then(|t| name_of(t)).unwrap_or_default();
                let rest = (w(k + 1), w(k + 2), w(k + 3));
                match rest {
                    (Some("TYPE"), _, _) | (Some("SET"), Some("DATA"), Some("TYPE")) => {
                        hits.push((
                            ALTER_TYPE,
                            format!(
                                "type of column {column:?} of existing table {table:?} changed"
                            ),
                        ))
                    }
                    (Some("SET"), Some("NOT"), Some("NULL")) => hits.push((
                        SET_NOT_NULL,
                        format!("column {column:?} of existing table {table:?} set NOT NULL"),
                    )),
                    _ => {}
                }
            }
            _ => {}
        }
        hits
    }

    /// Rule ids allowed by its `tenantry:lint-allow` comments, and the malformed markers as
    /// (line, what is wrong).
    fn allowances(&self) -> (HashSet<&'static str>, Vec<(usize, String)>) {
        let mut allowed = HashSet::new();
        let mut bad = Vec::new();
        for (line, text) in &self.comments {
            let Some(at) = text.find(ALLOW_MARKER) else {
                continue;
            };
            let rest = text[at + ALLOW_MARKER.len()..]
                .trim_end_matches("*/")
                .trim();
            let (ids, reason) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            if reason.trim().is_empty() {
                bad.push((*line, format!("{ALLOW_MARKER} without a reason")));
                continue;
            }
            for id in ids.split(',').filter(|s| !s.is_empty()) {
                match rule(id) {
                    Some(r) if r.allowable => {
                        allowed.insert(r.id);
                    }
                    Some(r) => bad.push((*line, format!("rule {} cannot be allowed", r.id))),
                    None => bad.push((*line, format!("{ALLOW_MARKER} names unknown rule {id:?}"))),
                }
            }
        }
        (allowed, bad)
    }
}

/// Functions a DEFAULT may call without rewriting the table (not volatile: evaluated once when
/// the column is added), and type names that take parentheses.
const NON_VOLATILE: &[&str] = &[
    "NOW",
    "TRANSACTION_TIMESTAMP",
    "STATEMENT_TIMESTAMP",
    "CURRENT_TIMESTAMP",
    "CURRENT_DATE",
    "CURRENT_TIME",
    "LOCALTIMESTAMP",
    "LOCALTIME",
    "CURRENT_SETTING",
    "CAST",
    "COALESCE",
    "NULLIF",
    "GREATEST",
    "LEAST",
    "ROW",
    "ARRAY",
    "LOWER",
    "UPPER",
    "LENGTH",
    "CONCAT",
    "ABS",
    "ROUND",
    "JSON_BUILD_OBJECT",
    "JSONB_BUILD_OBJECT",
    "JSON_BUILD_ARRAY",
    "JSONB_BUILD_ARRAY",
    "TO_JSONB",
    "MAKE_INTERVAL",
    "MAKE_DATE",
    "MAKE_TIMESTAMP",
    "MAKE_TIMESTAMPTZ",
    // Type modifiers: varchar(20), numeric(10, 2), timestamp(3), …
    "VARCHAR",
    "VARYING",
    "CHAR",
    "CHARACTER",
    "NUMERIC",
    "DECIMAL",
    "TIMESTAMP",
    "TIMESTAMPTZ",
    "TIME",
    "TIMETZ",
    "INTERVAL",
    "BIT",
    "FLOAT",
];

/// The first function called by the DEFAULT expression of an ADD COLUMN action that is not
/// known to be non-volatile (unknown functions count as volatile: their volatility is unknown
/// here).
fn volatile_default(toks: &[&Tok]) -> Option<String> {
    let at = toks
        .iter()
        .position(|t| **t == Tok::Word("DEFAULT".into()))?;
    let mut depth = 0;
    for k in at + 1..toks.len() {
        match toks[k] {
            Tok::LParen => depth += 1,
            Tok::RParen => depth -= 1,
            Tok::Word(w)
                if depth == 0
                    && k > at + 1
                    && matches!(
                        w.as_str(),
                        "NOT"
                            | "NULL"
                            | "CONSTRAINT"
                            | "CHECK"
                            | "UNIQUE"
                            | "PRIMARY"
                            | "REFERENCES"
                            | "GENERATED"
                            | "COLLATE"
                    ) =>
            {
                return None
            }
            Tok::Word(w)
                if toks.get(k + 1) == Some(&&Tok::LParen)
                    && !NON_VOLATILE.contains(&w.as_str())
                    && !matches!(toks.get(k.wrapping_sub(1)), Some(Tok::Cast)) =>
            {
                return Some(w.clone())
            }
            _ => {}
        }
    }
    None
}

/// Whether a migration's SQL must run outside a transaction block: every statement is a
/// CONCURRENTLY one (see [`Statement::is_concurrent`]).
pub fn runs_outside_transaction(sql: &str) -> bool {
    let s = split(sql);
    !s.is_empty() && s.iter().all(Statement::is_concurrent)
}

/// The SQL of a migration as it can run inside a transaction: CONCURRENTLY left out of its
/// statements when it is a file of CONCURRENTLY statements (for scratch schemas only).
pub fn sql_in_transaction(sql: &str) -> Cow<'_, str> {
    if !runs_outside_transaction(sql) {
        return Cow::Borrowed(sql);
    }
    Cow::Owned(
        split(sql)
            .iter()
            .map(|s| s.without_concurrently(sql).into_owned())
            .collect::<Vec<_>>()
            .join(";\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(sql: &str) -> Vec<&'static str> {
        lint_sql("3_x.sql", sql)
            .into_iter()
            .map(|f| f.rule)
            .collect()
    }

    fn texts(sql: &str) -> Vec<(usize, String)> {
        split(sql)
            .iter()
            .map(|s| (s.line, sql[s.start..s.end].to_string()))
            .collect()
    }

    #[test]
    fn splits_at_top_level_semicolons_with_lines() {
        let sql = "CREATE TABLE a (x int);\n\n  SELECT 1;\nSELECT\n 2";
        assert_eq!(
            texts(sql),
            [
                (1, "CREATE TABLE a (x int)".to_string()),
                (3, "SELECT 1".to_string()),
                (4, "SELECT\n 2".to_string())
            ]
        );
        assert!(split("  ;; -- nothing\n/* at all */").is_empty());
    }

    #[test]
    fn strings_identifiers_and_comments_hide_semicolons() {
        let sql = "SELECT 'a;b''c;';\n\
                   SELECT E'it\\'s; \\\\';\n\
                   SELECT \"we;ird\"\"x;\" FROM t;\n\
                   -- a comment; with a semicolon\n\
                   /* outer /* inner; */ still comment; */ SELECT 4;\n\
                   SELECT U&'d;' , B'01', X'1f';";
        let s = texts(sql);
        assert_eq!(s.len(), 5, "{s:?}");
        assert_eq!(s[0], (1, "SELECT 'a;b''c;'".to_string()));
        assert_eq!(s[1], (2, "SELECT E'it\\'s; \\\\'".to_string()));
        assert_eq!(s[2].0, 3);
        assert_eq!(s[3], (5, "SELECT 4".to_string()));
        assert_eq!(s[4].0, 6);
    }

    #[test]
    fn an_e_string_ends_at_an_unescaped_quote_but_a_plain_one_ignores_backslashes() {
        // In a plain string a backslash is an ordinary character: 'a\' ends there.
        let s = texts("SELECT 'a\\'; SELECT 2;");
        assert_eq!(s.len(), 2, "{s:?}");
        let s = texts("SELECT e'a\\'; SELECT 2;';");
        assert_eq!(s.len(), 1, "{s:?}");
    }

    #[test]
    fn dollar_quoted_bodies_are_opaque() {
        let sql = "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS $$ SELECT 1; $$;\n\
                   CREATE FUNCTION g() RETURNS int LANGUAGE plpgsql AS $body$\n\
                   BEGIN RETURN $$x;$$ = 'y;'; END; $body$;\n\
                   SELECT $1, a$b FROM t;";
        let s = texts(sql);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(s[1].0, 2);
        assert_eq!(s[2], (4, "SELECT $1, a$b FROM t".to_string()));
    }

    #[test]
    fn begin_atomic_bodies_keep_their_semicolons() {
        let sql = "CREATE FUNCTION f(x int) RETURNS int LANGUAGE sql BEGIN ATOMIC\n\
                   SELECT CASE WHEN x > 0 THEN 1 ELSE 2 END;\n SELECT 3;\nEND;\nSELECT 4;";
        let s = texts(sql);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!(s[1], (5, "SELECT 4".to_string()));
    }

    #[test]
    fn unterminated_constructs_do_not_panic() {
        for sql in [
            "SELECT 'abc",
            "SELECT \"x",
            "SELECT $$ x",
            "/* x",
            "SELECT E'\\",
            "$a",
        ] {
            let _ = split(sql);
            let _ = lint_sql("1_x.sql", sql);
        }
        let s = "CREATE INDEX ON t (x); SELECT 'é;' ; SELECT 1 /* ü */";
        assert_eq!(split(s).len(), 3);
    }

    #[test]
    fn create_index_needs_concurrently_on_existing_tables_only() {
        assert_eq!(ids("CREATE INDEX i ON t (x)"), [CREATE_INDEX]);
        assert_eq!(
            ids("create unique index if not exists i on only public.t (x)"),
            [CREATE_INDEX]
        );
        assert_eq!(ids("CREATE INDEX ON \"T\" (x)"), [CREATE_INDEX]);
        assert!(ids("CREATE TABLE t (x int); CREATE INDEX i ON t (x)").is_empty());
        assert!(ids("CREATE TABLE IF NOT EXISTS s.t (x int); CREATE INDEX i ON T (x)").is_empty());
        // Quoted names keep their case: "T" is not t.
        assert_eq!(
            ids("CREATE TABLE t (x int); CREATE INDEX i ON \"T\" (x)"),
            [CREATE_INDEX]
        );
        // A table created by the same file, then renamed, is still new.
        assert!(
            ids("CREATE TABLE t (x int); ALTER TABLE t RENAME TO u; CREATE INDEX i ON u (x)")
                .is_empty()
        );
        assert!(ids("CREATE INDEX CONCURRENTLY i ON t (x)").is_empty());
        assert!(
            ids("CREATE MATERIALIZED VIEW v AS SELECT 1 AS x; CREATE UNIQUE INDEX i ON v (x)")
                .is_empty()
        );
    }

    #[test]
    fn a_finding_names_rule_file_line_and_fix() {
        let f = &lint_sql("3_add_index.sql", "SELECT 1;\n\nCREATE INDEX i\n ON t (x);")[0];
        assert_eq!(
            (f.rule, f.line, f.file.as_str()),
            (CREATE_INDEX, 3, "3_add_index.sql")
        );
        let text = f.to_string();
        assert!(
            text.starts_with("3_add_index.sql:3: [create-index-non-concurrent]"),
            "{text}"
        );
        assert!(
            text.contains("CONCURRENTLY") && text.contains("\"t\""),
            "{text}"
        );
        assert!(
            text.contains("tenantry:lint-allow create-index-non-concurrent"),
            "{text}"
        );
    }

    #[test]
    fn add_column_defaults() {
        for ok in [
            "ALTER TABLE t ADD COLUMN c int",
            "ALTER TABLE t ADD COLUMN c int NOT NULL DEFAULT 0",
            "ALTER TABLE t ADD c timestamptz DEFAULT now()",
            "ALTER TABLE t ADD COLUMN c timestamptz DEFAULT pg_catalog.now() NOT NULL",
            "ALTER TABLE t ADD COLUMN c timestamptz DEFAULT CURRENT_TIMESTAMP",
            "ALTER TABLE t ADD COLUMN c numeric(10, 2) DEFAULT 0",
            "ALTER TABLE t ADD COLUMN c varchar(20) DEFAULT 'x'::character varying(20)",
            "ALTER TABLE t ADD COLUMN c text DEFAULT lower('X') COLLATE \"C\"",
            "ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a + 1) VIRTUAL",
            "ALTER TABLE t ADD COLUMN IF NOT EXISTS c jsonb DEFAULT '{}'",
            "CREATE TABLE t (a int); ALTER TABLE t ADD COLUMN c uuid DEFAULT gen_random_uuid()",
        ] {
            assert!(ids(ok).is_empty(), "{ok}: {:?}", ids(ok));
        }
        for bad in [
            "ALTER TABLE t ADD COLUMN c uuid DEFAULT gen_random_uuid()",
            "ALTER TABLE t ADD COLUMN c float8 DEFAULT (random() * 10)",
            "ALTER TABLE t ADD c timestamptz NOT NULL DEFAULT clock_timestamp()",
            "ALTER TABLE t ADD COLUMN c bigserial",
            "ALTER TABLE t ADD COLUMN c serial NOT NULL",
            "ALTER TABLE t ADD COLUMN c bigint GENERATED BY DEFAULT AS IDENTITY",
            "ALTER TABLE t ADD COLUMN c int GENERATED ALWAYS AS (a * 2) STORED",
            "ALTER TABLE t ADD COLUMN c int DEFAULT nextval('s')",
            "ALTER TABLE t ADD COLUMN a int, ADD COLUMN c int DEFAULT my_func()",
        ] {
            assert_eq!(ids(bad), [VOLATILE_DEFAULT], "{bad}");
        }
        assert!(lint_sql(
            "3_x.sql",
            "ALTER TABLE t ADD COLUMN c uuid DEFAULT gen_random_uuid()"
        )[0]
        .message
        .contains("gen_random_uuid()"));
    }

    #[test]
    fn type_changes_not_null_and_constraints() {
        assert_eq!(
            ids("ALTER TABLE t ALTER COLUMN c TYPE bigint"),
            [ALTER_TYPE]
        );
        assert_eq!(
            ids("ALTER TABLE t ALTER c SET DATA TYPE text USING c::text"),
            [ALTER_TYPE]
        );
        assert_eq!(
            ids("ALTER TABLE t ALTER COLUMN c SET NOT NULL"),
            [SET_NOT_NULL]
        );
        assert!(ids("ALTER TABLE t ALTER COLUMN c DROP NOT NULL").is_empty());
        assert!(ids("ALTER TABLE t ALTER COLUMN c SET DEFAULT 1").is_empty());
        assert_eq!(
            ids("ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u (id)"),
            [CONSTRAINT_NOT_VALID]
        );
        assert_eq!(
            ids("ALTER TABLE t ADD CHECK (a > 0)"),
            [CONSTRAINT_NOT_VALID]
        );
        assert!(ids("ALTER TABLE t ADD CONSTRAINT c CHECK (a > 0) NOT VALID").is_empty());
        assert!(
            ids("ALTER TABLE t ADD CONSTRAINT f FOREIGN KEY (a) REFERENCES u NOT VALID").is_empty()
        );
        assert!(ids("ALTER TABLE t VALIDATE CONSTRAINT f").is_empty());
        assert_eq!(
            ids("ALTER TABLE t ADD CONSTRAINT u UNIQUE (a)"),
            [CONSTRAINT_INDEX]
        );
        assert_eq!(ids("ALTER TABLE t ADD PRIMARY KEY (a)"), [CONSTRAINT_INDEX]);
        assert!(ids("ALTER TABLE t ADD CONSTRAINT u UNIQUE USING INDEX u_idx").is_empty());
        assert_eq!(
            ids("ALTER TABLE t ADD COLUMN c int UNIQUE"),
            [CONSTRAINT_INDEX]
        );
        assert_eq!(
            ids("ALTER TABLE t ADD COLUMN c int CHECK (c > 0)"),
            [CONSTRAINT_NOT_VALID]
        );
        // New tables are free.
        assert!(ids(
            "CREATE TABLE t (c int); ALTER TABLE t ALTER c TYPE bigint, \
                     ALTER c SET NOT NULL, ADD CHECK (c > 0), ADD UNIQUE (c)"
        )
        .is_empty());
        // Several actions, each checked.
        assert_eq!(
            ids("ALTER TABLE IF EXISTS ONLY s.t ALTER c TYPE bigint, ALTER d SET NOT NULL"),
            [ALTER_TYPE, SET_NOT_NULL]
        );
        assert!(ids("ALTER TABLE t ALTER CONSTRAINT f DEFERRABLE").is_empty());
    }

    #[test]
    fn rewrites_and_reindex() {
        assert_eq!(ids("VACUUM FULL t"), [VACUUM_FULL]);
        assert_eq!(ids("VACUUM (FULL, VERBOSE) t"), [VACUUM_FULL]);
        assert!(ids("VACUUM (FULL false) t").is_empty());
        assert!(ids("VACUUM ANALYZE t").is_empty());
        assert_eq!(ids("CLUSTER t USING i"), [CLUSTER]);
        assert_eq!(ids("CLUSTER"), [CLUSTER]);
        assert!(ids("CREATE TABLE t (x int); CLUSTER t USING i").is_empty());
        assert_eq!(ids("REINDEX TABLE t"), [REINDEX]);
        assert!(ids("REINDEX TABLE CONCURRENTLY t").is_empty());
        assert!(ids("REINDEX (VERBOSE) INDEX CONCURRENTLY i").is_empty());
        assert_eq!(ids("REFRESH MATERIALIZED VIEW v"), [REFRESH]);
        assert!(ids("REFRESH MATERIALIZED VIEW CONCURRENTLY v").is_empty());
    }

    #[test]
    fn the_index_a_concurrent_drop_names() {
        let name = |sql: &str| split(sql)[0].concurrent_drop_name();
        assert_eq!(name("DROP INDEX CONCURRENTLY i"), Some("i".into()));
        assert_eq!(
            name("drop index concurrently if exists \"I\" cascade"),
            Some("I".into())
        );
        assert_eq!(name("DROP INDEX CONCURRENTLY s.i"), None);
        assert_eq!(name("DROP INDEX CONCURRENTLY a, b"), None);
        assert_eq!(name("DROP INDEX i"), None);
    }

    #[test]
    fn concurrent_files_stand_alone_and_name_their_indexes() {
        assert!(
            ids("CREATE INDEX CONCURRENTLY i ON t (x);\nDROP INDEX CONCURRENTLY j;").is_empty()
        );
        assert_eq!(
            ids("CREATE TABLE u (x int);\nCREATE INDEX CONCURRENTLY i ON t (x);"),
            [CONCURRENT_MIXED]
        );
        assert_eq!(
            ids("CREATE INDEX CONCURRENTLY ON t (x)"),
            [CONCURRENT_UNNAMED]
        );
        // The mix cannot be allowed: PostgreSQL would refuse it anyway.
        assert_eq!(
            ids("SELECT 1;\n-- tenantry:lint-allow concurrently-mixed because\nCREATE INDEX CONCURRENTLY i ON t (x);"),
            [BAD_ALLOW, CONCURRENT_MIXED]
        );
        assert!(runs_outside_transaction("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS i ON t (x); REINDEX INDEX CONCURRENTLY j;"));
        assert!(!runs_outside_transaction("CREATE INDEX i ON t (x)"));
        assert!(!runs_outside_transaction("-- nothing"));
        let s = &split("CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS \"Idx\" ON t (x)")[0];
        assert_eq!(s.concurrent_index_name().as_deref(), Some("Idx"));
        let s = &split("create index concurrently idx on t (x)")[0];
        assert_eq!(s.concurrent_index_name().as_deref(), Some("idx"));
        assert_eq!(
            sql_in_transaction("CREATE INDEX CONCURRENTLY i ON t (x);\nDROP INDEX CONCURRENTLY j;"),
            "CREATE INDEX  i ON t (x);\nDROP INDEX  j"
        );
        assert_eq!(
            sql_in_transaction("CREATE INDEX i ON t (x);"),
            "CREATE INDEX i ON t (x);"
        );
    }

    #[test]
    fn a_marked_comment_allows_named_rules_for_one_statement() {
        let sql =
            "-- tenantry:lint-allow create-index-non-concurrent,set-not-null tiny lookup table\n\
                   CREATE INDEX i ON t (x);\n\
                   CREATE INDEX j ON t (y);";
        let f = lint_sql("3_x.sql", sql);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].rule, f[0].line), (CREATE_INDEX, 3));
        // Inside the statement, in a block comment.
        assert!(ids("ALTER TABLE t /* tenantry:lint-allow alter-column-type varchar to text */ ALTER c TYPE text").is_empty());
        // Trailing on the statement's own line.
        assert!(ids("CREATE INDEX i ON t (x); -- tenantry:lint-allow create-index-non-concurrent small\nSELECT 1;").is_empty());
        // It names the rule: another rule is not allowed.
        assert_eq!(
            ids("-- tenantry:lint-allow set-not-null reason\nCREATE INDEX i ON t (x)"),
            [CREATE_INDEX]
        );
        // Unknown rules and missing reasons are findings of their own.
        assert_eq!(
            ids("-- tenantry:lint-allow create-index-non-concurent typo\nCREATE INDEX i ON t (x)"),
            [BAD_ALLOW, CREATE_INDEX]
        );
        assert_eq!(
            ids("-- tenantry:lint-allow create-index-non-concurrent\nCREATE INDEX i ON t (x)"),
            [BAD_ALLOW, CREATE_INDEX]
        );
    }

    #[test]
    fn unknown_statements_pass() {
        for sql in [
            "GRANT SELECT ON t TO r",
            "CREATE POLICY p ON t USING (true)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "COMMENT ON TABLE t IS 'CREATE INDEX i ON t (x)'",
            "INSERT INTO t VALUES ('ALTER TABLE t ALTER c TYPE int')",
            "ALTER TABLE",
            "CREATE",
            "))) ((( ,,, ::",
            "ALTER TABLE t ADD",
        ] {
            assert!(ids(sql).is_empty(), "{sql}");
        }
    }

    #[test]
    fn tables_of_earlier_files_are_existing() {
        let set = MigrationSet::from_files([
            ("3_t.sql".to_string(), "CREATE TABLE t (x int)".to_string()),
            ("4_i.sql".to_string(), "CREATE INDEX i ON t (x)".to_string()),
        ])
        .unwrap();
        let f = lint(&set);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].file.as_str(), f[0].line), ("4_i.sql", 1));
        assert_eq!(lint_after(&set, 3).len(), 1);
        assert!(lint_after(&set, 4).is_empty());
    }

    #[test]
    fn the_demo_set_lints_clean_by_its_exemption_only() {
        let demo = MigrationSet::embedded();
        assert!(lint(&demo).is_empty());
        // The exemption is narrow: version 2 itself breaks a rule, and a changed demo file is
        // linted like any other.
        let own: Vec<_> = demo.migrations().iter().flat_map(lint_migration).collect();
        assert!(
            own.iter()
                .all(|f| f.rule == CREATE_INDEX && f.file.starts_with("2_")),
            "{own:?}"
        );
        assert!(!own.is_empty());
        let mut files = demo.to_files();
        files[1].1.push_str("\n-- changed\n");
        assert!(!lint(&MigrationSet::from_files(files).unwrap()).is_empty());
    }

    #[test]
    fn the_readme_rule_table_is_the_rules() {
        let readme = include_str!("../../README.md");
        let section = readme
            .split("\n### Migration lint")
            .nth(1)
            .expect("README has a Migration lint section");
        let documented: Vec<&str> = section
            .lines()
            .skip_while(|l| !l.starts_with("| rule id"))
            .skip(2)
            .take_while(|l| l.starts_with("| `"))
            .map(|l| l.split('`').nth(1).unwrap())
            .collect();
        let code: Vec<&str> = RULES.iter().map(|r| r.id).collect();
        assert_eq!(documented, code);
    }

    #[test]
    fn every_rule_has_a_why() {
        for r in RULES {
            assert!(!why(r.id).is_empty() || r.id == BAD_ALLOW, "{}", r.id);
        }
    }
}

//! Secret templates (`spec.credentials.template`): extra keys of the credentials Secret rendered
//! from its fields, so that applications read a ready-made `DATABASE_URL` or a .NET or Spring
//! property string instead of assembling one.
//!
//! The syntax is deliberately small: literal text with `{{ .field }}` placeholders, where
//! `field` is one of [`FIELDS`], optionally piped through `urlencode` (`{{ .password |
//! urlencode }}`: every byte but ASCII letters and digits percent-encoded, as in the `uri` key).
//! Nothing else is evaluated; anything else between `{{` and `}}` is an error naming the key.

use std::collections::BTreeMap;

use super::credentials::{encode, KEYS};

/// Placeholders a template may use, with the Secret key each reads.
pub const FIELDS: [(&str, &str); 9] = [
    ("host", "host"),
    ("port", "port"),
    ("dbname", "dbname"),
    ("username", "username"),
    ("password", "password"),
    ("schema", "schema"),
    ("uri", "uri"),
    ("jdbcUri", "jdbc-uri"),
    ("jwtKey", "jwt-key"),
];

/// Most template keys one Tenant may ask for.
pub const MAX_KEYS: usize = 32;

/// Longest template value, in bytes.
pub const MAX_VALUE_BYTES: usize = 4096;

/// The rule for a template key: a valid Secret data key (`[-._a-zA-Z0-9]+`, at most 253
/// characters) that is not one of the Secret's own keys.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty()
        || key.len() > 253
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(format!(
            "spec.credentials.template: {key:?} is not a valid Secret key (letters, digits, '-', '.', '_'; at most 253)"
        ));
    }
    if KEYS.contains(&key) {
        return Err(format!(
            "spec.credentials.template: {key:?} is one of the Secret's own keys ({})",
            KEYS.join(", ")
        ));
    }
    Ok(())
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part<'a> {
    Text(&'a str),
    /// A Secret key, and whether it is percent-encoded.
    Field(&'static str, bool),
}

fn parse(template: &str) -> Result<Vec<Part<'_>>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        if open > 0 {
            parts.push(Part::Text(&rest[..open]));
        }
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| "an unclosed \"{{\"".to_string())?;
        let inner = after[..close].trim();
        let (field, pipe) = match inner.split_once('|') {
            Some((f, p)) => (f.trim(), Some(p.trim())),
            None => (inner, None),
        };
        let encoded = match pipe {
            None => false,
            Some("urlencode") => true,
            Some(other) => {
                return Err(format!(
                    "unknown function {other:?} in \"{{{{{}}}}}\" (known: urlencode)",
                    &after[..close]
                ))
            }
        };
        let key = field
            .strip_prefix('.')
            .and_then(|f| FIELDS.iter().find(|(name, _)| *name == f))
            .map(|(_, key)| *key)
            .ok_or_else(|| {
                format!(
                    "unknown placeholder \"{{{{{}}}}}\" (known: {})",
                    &after[..close],
                    FIELDS
                        .iter()
                        .map(|(n, _)| format!(".{n}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
        parts.push(Part::Field(key, encoded));
        rest = &after[close + 2..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest));
    }
    Ok(parts)
}

/// Checks every key and value of a template: the message names the key at fault.
pub fn validate(template: &BTreeMap<String, String>) -> Result<(), String> {
    if template.len() > MAX_KEYS {
        return Err(format!(
            "spec.credentials.template has {} keys; at most {MAX_KEYS}",
            template.len()
        ));
    }
    for (key, value) in template {
        check_key(key)?;
        if value.len() > MAX_VALUE_BYTES {
            return Err(format!(
                "spec.credentials.template[{key}] is longer than {MAX_VALUE_BYTES} bytes"
            ));
        }
        parse(value).map_err(|e| format!("spec.credentials.template[{key}]: {e}"))?;
    }
    Ok(())
}

/// The template's keys rendered from `data` (the Secret's own keys). Entries that do not
/// validate are left out; [`validate`] refuses them before anything is written.
pub fn render(
    template: &BTreeMap<String, String>,
    data: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    template
        .iter()
        .filter(|(k, _)| check_key(k).is_ok())
        .filter_map(|(key, value)| {
            let parts = parse(value).ok()?;
            let mut out = String::with_capacity(value.len() + 64);
            for part in parts {
                match part {
                    Part::Text(t) => out.push_str(t),
                    Part::Field(f, false) => out.push_str(data.get(f).map_or("", String::as_str)),
                    Part::Field(f, true) => {
                        out.push_str(&encode(data.get(f).map_or("", String::as_str)))
                    }
                }
            }
            Some((key.clone(), out))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> BTreeMap<String, String> {
        [
            ("host", "db.example"),
            ("port", "5432"),
            ("dbname", "app"),
            ("username", "ns_acme"),
            ("password", "p/w+1"),
            ("schema", "ns_acme"),
            ("uri", "postgresql://x"),
            ("jdbc-uri", "jdbc:postgresql://x"),
            ("jwt-key", "k"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    fn t(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn templates_render_from_the_secrets_fields() {
        let tpl = t(&[
            ("DATABASE_URL", "{{ .uri }}"),
            (
                "dotnet",
                "Host={{.host}};Port={{ .port }};Database={{ .dbname }};Username={{ .username }};Password={{ .password }};Search Path={{ .schema }}",
            ),
            (
                "spring.properties",
                "spring.datasource.url={{ .jdbcUri }}\nspring.datasource.password={{ .password | urlencode }}\n",
            ),
            ("plain", "no placeholders"),
        ]);
        validate(&tpl).unwrap();
        let out = render(&tpl, &data());
        assert_eq!(out["DATABASE_URL"], "postgresql://x");
        assert_eq!(
            out["dotnet"],
            "Host=db.example;Port=5432;Database=app;Username=ns_acme;Password=p/w+1;Search Path=ns_acme"
        );
        assert_eq!(
            out["spring.properties"],
            "spring.datasource.url=jdbc:postgresql://x\nspring.datasource.password=p%2Fw%2B1\n"
        );
        assert_eq!(out["plain"], "no placeholders");
    }

    #[test]
    fn bad_templates_name_the_key_and_the_fault() {
        let e = validate(&t(&[("URL", "{{ .pasword }}")])).unwrap_err();
        assert!(
            e.contains("template[URL]") && e.contains(".pasword") && e.contains(".password"),
            "{e}"
        );
        let e = validate(&t(&[("URL", "x {{ .host ")])).unwrap_err();
        assert!(e.contains("template[URL]") && e.contains("unclosed"), "{e}");
        let e = validate(&t(&[("URL", "{{ .host | upper }}")])).unwrap_err();
        assert!(e.contains("upper") && e.contains("urlencode"), "{e}");
        let e = validate(&t(&[("URL", "{{ host }}")])).unwrap_err();
        assert!(e.contains("unknown placeholder"), "{e}");
        let e = validate(&t(&[("password", "{{ .host }}")])).unwrap_err();
        assert!(e.contains("own keys"), "{e}");
        let e = validate(&t(&[("bad key", "x")])).unwrap_err();
        assert!(e.contains("not a valid Secret key"), "{e}");
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(validate(&t(&[("K", &big)])).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_KEYS)
            .map(|i| (format!("K{i}"), String::new()))
            .collect();
        assert!(validate(&many).unwrap_err().contains("at most"));
        // What does not validate is never rendered.
        assert!(render(&t(&[("URL", "{{ .nope }}")]), &data()).is_empty());
    }
}

//! egressd.toml(5) (packaging/egressd.toml.5, written by hand) against the policy structs: every key
//! the file may hold has an entry in the page's section for its table, the page documents no key
//! that does not exist, and its example is a valid policy.

use std::{format, path::Path, string::String, vec::Vec};

use crate::policy::{Config, FAMILIES};

const PAGE: &str = include_str!("../../packaging/egressd.toml.5");
const POLICY_RS: &str = include_str!("policy.rs");
const DNS_POLICY_RS: &str = include_str!("dns_policy.rs");

/// Each table of the file: the struct it deserializes into, that struct's source, and the `.SS`
/// heading of its section in the page.
const TABLES: [(&str, &str, &str); 6] = [
    ("Config", POLICY_RS, "Top-level keys"),
    ("AuditConfig", POLICY_RS, "[audit]"),
    ("DnsConfig", DNS_POLICY_RS, "[dns]"),
    ("MetricsConfig", POLICY_RS, "[metrics]"),
    ("ProfileConfig", POLICY_RS, "[profiles.NAME]"),
    ("Access", POLICY_RS, "[access]"),
];

/// The names of the structs marked `deny_unknown_fields` (the tables of the file).
fn tables_in(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut pending = false;
    for line in src.lines().map(str::trim) {
        if line.starts_with("#[serde(") && line.contains("deny_unknown_fields") {
            pending = true;
        } else if pending && line.starts_with("pub struct ") {
            let name = line["pub struct ".len()..]
                .split(|c: char| !c.is_alphanumeric() && c != '_')
                .next()
                .unwrap();
            out.push(String::from(name));
            pending = false;
        }
    }
    out
}

/// The keys serde reads for `pub struct name { ... }` in `src`: field names, or their
/// `#[serde(rename = "...")]`, less `#[serde(skip)]` fields.
fn serde_keys(src: &str, name: &str) -> Vec<String> {
    let start = src
        .find(&format!("pub struct {name} {{"))
        .unwrap_or_else(|| panic!("no `pub struct {name} {{` in its source"));
    let before = &src[..start];
    let attrs_start = before.trim_end().rfind("\n\n").unwrap_or(0);
    assert!(
        !before[attrs_start..].contains("rename_all"),
        "{name} renames its fields with rename_all: teach this test the rule"
    );
    let body = &src[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find("\n}").unwrap()];
    let mut keys = Vec::new();
    let mut attrs: Vec<String> = Vec::new();
    for line in body.lines().map(str::trim) {
        if let Some(attr) = line
            .strip_prefix("#[serde(")
            .and_then(|a| a.strip_suffix(")]"))
        {
            attrs.extend(attr.split(',').map(|a| String::from(a.trim())));
            continue;
        }
        let field = line.strip_prefix("pub ").unwrap_or(line);
        let Some((ident, _)) = field.split_once(':') else {
            continue;
        };
        if ident.is_empty()
            || !ident
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        let skipped = attrs
            .iter()
            .any(|a| a == "skip" || a == "skip_deserializing");
        let renamed = attrs.iter().find_map(|a| {
            a.strip_prefix("rename")
                .and_then(|r| r.trim_start().strip_prefix('='))
                .map(|r| String::from(r.trim().trim_matches('"')))
        });
        if !skipped {
            keys.push(renamed.unwrap_or_else(|| String::from(ident)));
        }
        attrs.clear();
    }
    assert!(!keys.is_empty(), "found no fields in {name}");
    keys
}

/// The text of the page's section `.SS "heading"`, up to the next section.
fn section(heading: &str) -> &'static str {
    let start = PAGE
        .find(&format!(".SS \"{heading}\"\n"))
        .unwrap_or_else(|| panic!("packaging/egressd.toml.5 has no section .SS \"{heading}\""));
    let rest = &PAGE[start + 1..];
    let end = [rest.find("\n.SS "), rest.find("\n.SH ")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The keys a section documents: `.TP` entries whose term starts with a bold identifier.
fn documented(section: &str) -> Vec<String> {
    section
        .split(".TP\n")
        .skip(1)
        .filter_map(|entry| {
            let term = entry.strip_prefix("\\fB")?;
            let key: String = term
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            (!key.is_empty() && term[key.len()..].starts_with("\\fR")).then_some(key)
        })
        .collect()
}

#[test]
fn every_key_of_the_policy_structs_is_in_the_man_page_and_no_other() {
    let mut tables: Vec<String> = tables_in(POLICY_RS);
    tables.extend(tables_in(DNS_POLICY_RS));
    for table in &tables {
        assert!(
            TABLES.iter().any(|(name, _, _)| name == table),
            "{table} is a table of the policy file: add it to TABLES here, with a section for it in packaging/egressd.toml.5"
        );
    }
    for (name, src, heading) in TABLES {
        let text = section(heading);
        let keys = serde_keys(src, name);
        let doc = documented(text);
        for key in &keys {
            let table_heading = format!(".SS \"[{key}");
            let is_documented_table = name == "Config" && PAGE.contains(&table_heading);
            assert!(
                doc.contains(key) || is_documented_table,
                "key `{key}` of {name} is not in packaging/egressd.toml.5: add a `.TP` entry \
                 `\\fB{key}\\fR = ...` with its default and meaning under .SS \"{heading}\""
            );
        }
        for key in &doc {
            assert!(
                keys.contains(key),
                "packaging/egressd.toml.5 documents `{key}` under .SS \"{heading}\", but {name} has no such key"
            );
        }
    }
}

#[test]
fn the_parser_of_this_test_sees_what_serde_sees() {
    assert_eq!(
        serde_keys(POLICY_RS, "AuditConfig")[..3],
        ["path", "max_bytes", "keep"]
    );
    assert_eq!(
        serde_keys(POLICY_RS, "Config"),
        [
            "default_profile",
            "socket_group",
            "audit",
            "dns",
            "metrics",
            "profiles",
            "access"
        ]
    );
    let src = "#[serde(deny_unknown_fields)]\npub struct T {\n    /// doc: not a field\n    #[serde(rename = \"b-c\")]\n    pub a: u8,\n    #[serde(skip)]\n    pub hidden: u8,\n    #[serde(default, skip_serializing_if = \"Option::is_none\")]\n    pub d: Option<u8>,\n}\n";
    assert_eq!(serde_keys(src, "T"), ["b-c", "d"]);
    assert_eq!(tables_in(src), ["T"]);
    // Every table of the policy, and only those.
    let mut tables = tables_in(POLICY_RS);
    tables.extend(tables_in(DNS_POLICY_RS));
    tables.sort();
    assert_eq!(
        tables,
        [
            "Access",
            "AuditConfig",
            "Config",
            "DnsConfig",
            "MetricsConfig",
            "ProfileConfig"
        ]
    );
}

#[test]
fn the_man_pages_example_is_a_valid_policy() {
    let example = PAGE
        .split("\n.EX\n")
        .nth(1)
        .and_then(|e| e.split("\n.EE\n").next())
        .expect("an .EX ... .EE example in packaging/egressd.toml.5");
    let text = example
        .replace("\\-", "-")
        .replace("\\e", "\\")
        .replace("\\&", "");
    let config = Config::parse(Path::new("egressd.toml(5) EXAMPLE"), &text).unwrap();
    assert_eq!(config.default_profile, "airgap");
    assert_eq!(config.profiles["lan-llm"].allow.len(), 2);
    assert!(config.access.is_some());
}

#[test]
fn the_man_page_names_every_socket_family() {
    let families = section("[profiles.NAME]")
        .split(".TP\n\\fBfamilies\\fR")
        .nth(1)
        .and_then(|t| t.split(".TP\n").next())
        .unwrap();
    let words: Vec<&str> = families
        .split(|c: char| !c.is_ascii_alphanumeric())
        .collect();
    for (name, _) in FAMILIES {
        assert!(
            words.contains(&name),
            "families: {name} is not listed in packaging/egressd.toml.5"
        );
    }
}

//! README.md's Configuration section against the clap commands: one table
//! for the variables both services read (a default column each), one per
//! service for its own; every variable once, every default as clap has it.

use std::collections::BTreeMap;

use crate::{Service, read};

/// A table row: the variable and the default cells, in column order.
#[derive(Debug)]
struct Row {
    variable: String,
    defaults: Vec<Option<String>>,
}

/// Which table a row sits in, by the `###` heading above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Shared,
    Own(Service),
}

const SHARED_HEADING: &str = "### Both services";

fn table_of(heading: &str) -> Option<Table> {
    if heading == SHARED_HEADING {
        return Some(Table::Shared);
    }
    Service::ALL
        .into_iter()
        .find(|service| heading == format!("### {}", service.name()))
        .map(Table::Own)
}

/// A default cell: `` `value` `` (then any comment), or `unset`.
fn default_cell(cell: &str, line: &str) -> Option<String> {
    if let Some(quoted) = cell.strip_prefix('`') {
        let end = quoted
            .find('`')
            .unwrap_or_else(|| panic!("unclosed backtick in {line:?}"));
        return Some(quoted[..end].to_owned());
    }
    assert!(
        cell.starts_with("unset"),
        "a default is `value` or unset, not {cell:?} ({line:?})"
    );
    None
}

/// The rows of each table in the Configuration section of `readme`.
fn tables(readme: &str) -> Vec<(Table, Row)> {
    let section = readme
        .split("\n## ")
        .find(|section| section.starts_with("Configuration\n"))
        .expect("README.md has a `## Configuration` section");
    let mut table = None;
    let mut rows = Vec::new();
    for line in section.lines() {
        if line.starts_with("### ") {
            table = Some(
                table_of(line)
                    .unwrap_or_else(|| panic!("unexpected heading {line:?} in Configuration")),
            );
            continue;
        }
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        // The header row and the separator row.
        if cells[0] == "variable" || cells[0].starts_with("---") {
            continue;
        }
        let table = table.unwrap_or_else(|| panic!("table row outside a ### table: {line:?}"));
        let columns = match table {
            Table::Shared => 2,
            Table::Own(_) => 1,
        };
        assert_eq!(cells.len(), columns + 2, "wrong number of cells: {line:?}");
        let variable = cells[0]
            .strip_prefix('`')
            .and_then(|cell| cell.strip_suffix('`'))
            .unwrap_or_else(|| panic!("one `VARIABLE` per row: {line:?}"))
            .to_owned();
        let defaults = cells[1..=columns]
            .iter()
            .map(|cell| default_cell(cell, line))
            .collect();
        rows.push((table, Row { variable, defaults }));
    }
    rows
}

/// What is wrong with `readme`'s tables against what the services read.
fn drift(readme: &str) -> Vec<String> {
    let known: BTreeMap<Service, _> = Service::ALL
        .into_iter()
        .map(|service| (service, service.variables()))
        .collect();
    let mut problems = Vec::new();
    let mut listed: BTreeMap<Service, Vec<String>> = BTreeMap::new();
    for (table, row) in tables(readme) {
        let services = match table {
            Table::Shared => Service::ALL.to_vec(),
            Table::Own(service) => vec![service],
        };
        for (service, shown) in services.iter().zip(&row.defaults) {
            listed
                .entry(*service)
                .or_default()
                .push(row.variable.clone());
            match known[service].get(&row.variable) {
                None => problems.push(format!(
                    "README lists {} for {}, which does not read it",
                    row.variable,
                    service.name()
                )),
                Some(default) if default != shown => problems.push(format!(
                    "README shows {}'s default for {} as {shown:?}, clap has {default:?}",
                    service.name(),
                    row.variable
                )),
                Some(_) => {}
            }
        }
        if let Table::Own(service) = table {
            let shared = Service::ALL
                .into_iter()
                .all(|s| known[&s].contains_key(&row.variable));
            if shared {
                problems.push(format!(
                    "{} is read by both services: list it under {SHARED_HEADING:?}, not {}'s table",
                    row.variable,
                    service.name()
                ));
            }
        }
    }
    for (service, variables) in &known {
        let listed = listed.get(service).cloned().unwrap_or_default();
        for name in variables.keys() {
            match listed.iter().filter(|l| *l == name).count() {
                0 => problems.push(format!(
                    "README does not list {name}, which {} reads",
                    service.name()
                )),
                1 => {}
                _ => problems.push(format!(
                    "README lists {name} more than once for {}",
                    service.name()
                )),
            }
        }
    }
    problems
}

#[test]
fn the_readme_lists_exactly_what_the_services_read_with_their_defaults() {
    let problems = drift(&read("README.md"));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn a_missing_row_or_a_wrong_default_is_caught() {
    let readme = read("README.md");
    let without_row: String = readme
        .lines()
        .filter(|line| !line.starts_with("| `BOOKING_FOLLOWUP_HISTORY_LEN`"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(
        drift(&without_row)
            .iter()
            .any(|p| p.contains("does not list BOOKING_FOLLOWUP_HISTORY_LEN")),
        "a missing row went unnoticed"
    );
    let wrong_default = readme.replace(
        "| `SHUTDOWN_TIMEOUT` | `20s` |",
        "| `SHUTDOWN_TIMEOUT` | `30s` |",
    );
    assert_ne!(wrong_default, readme, "the row this test edits exists");
    assert!(
        drift(&wrong_default)
            .iter()
            .any(|p| p.contains("default for SHUTDOWN_TIMEOUT")),
        "a wrong default went unnoticed"
    );
}

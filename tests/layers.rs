//! The import structure ARCHITECTURE.md describes, checked from the code:
//! every `crate::` path a module uses names a module of its own layer or a
//! lower one, and no modules import each other in a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module prefixes by layer, bottom first (ARCHITECTURE.md, "Layers").
/// A module's layer is that of its longest matching prefix.
const LAYERS: &[&[&str]] = &[
    &["model", "dn", "throttle", "metrics"],
    &["config"],
    &[
        "tls",
        "store",
        "directory",
        "sync::policy",
        "sync::report",
        "sync::mapping",
        "sync::guard",
    ],
    &["proxy", "poller", "sync::engine", "sync::progress", "cluster"],
    &["worker", "monitor", "admin"],
    &["cli", "lib", "main", "sync"],
];

fn layer(module: &str) -> usize {
    let mut best = (0, None);
    for (layer, prefixes) in LAYERS.iter().enumerate() {
        for prefix in *prefixes {
            let matches = module == *prefix || module.starts_with(&format!("{prefix}::"));
            if matches && prefix.len() >= best.0 {
                best = (prefix.len(), Some(layer));
            }
        }
    }
    best.1
        .unwrap_or_else(|| panic!("module {module} is in no layer: add it to LAYERS and ARCHITECTURE.md"))
}

/// Each module's name and the modules it names through `crate::` (or
/// `super::` within its folder).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut modules = BTreeMap::new();
    let mut pending = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("src")];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
                continue;
            }
            let relative = path
                .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("src"))
                .unwrap();
            let module = relative.with_extension("").to_string_lossy().replace('/', "::");
            let module = module.strip_suffix("::mod").unwrap_or(&module).to_owned();
            let text = std::fs::read_to_string(&path).unwrap();
            // Tests may reach anywhere.
            let text = text.split("#[cfg(test)]").next().unwrap();
            let folder = module.rsplit_once("::").map(|(f, _)| f.to_owned());
            let mut used = BTreeSet::new();
            for (marker, base) in [("crate::", None), ("super::", folder.as_deref())] {
                for rest in text.split(marker).skip(1) {
                    let path: Vec<&str> = rest
                        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
                        .next()
                        .unwrap_or_default()
                        .split("::")
                        .take_while(|s| s.chars().next().is_some_and(|c| c.is_lowercase()))
                        .collect();
                    let Some(first) = path.first() else { continue };
                    let mut name = match base {
                        Some(base) => format!("{base}::{first}"),
                        None => (*first).to_owned(),
                    };
                    if let Some(second) = path.get(1) {
                        let deeper = format!("{name}::{second}");
                        if Path::new(env!("CARGO_MANIFEST_DIR"))
                            .join("src")
                            .join(deeper.replace("::", "/") + ".rs")
                            .exists()
                        {
                            name = deeper;
                        }
                    }
                    if name != module {
                        used.insert(name);
                    }
                }
            }
            modules.insert(module, used);
        }
    }
    modules
}

#[test]
fn no_module_imports_from_a_layer_above_its_own() {
    let mut wrong = Vec::new();
    for (module, used) in imports() {
        for target in used {
            if layer(&target) > layer(&module) {
                wrong.push(format!(
                    "{module} (layer {}) uses {target} (layer {})",
                    layer(&module),
                    layer(&target)
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers:\n{}", wrong.join("\n"));
}

/// The first import cycle in `graph`, if there is one.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit<'a>(
        node: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<String> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            return Some(format!("{} -> {node}", path[start..].join(" -> ")));
        }
        if !done.insert(node) {
            return None;
        }
        path.push(node);
        for next in graph.get(node).into_iter().flatten() {
            // A folder's mod.rs declaring its files is not an import.
            let declares = next.starts_with(&format!("{node}::"));
            if !declares && let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn no_modules_import_each_other_in_a_cycle() {
    if let Some(cycle) = cycle(&imports()) {
        panic!("import cycle: {cycle}");
    }
}

/// Folders too: `sync` and `poller` must not use each other, even through
/// different files (the worker that drives both sits above them).
#[test]
fn no_folders_import_each_other_in_a_cycle() {
    let top = |module: &str| module.split("::").next().unwrap_or(module).to_owned();
    let mut folders: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, used) in imports() {
        let from = top(&module);
        let targets = folders.entry(from.clone()).or_default();
        targets.extend(used.iter().map(|u| top(u)).filter(|u| *u != from));
    }
    if let Some(cycle) = cycle(&folders) {
        panic!("folder import cycle: {cycle}");
    }
}

//! The documentation stands alone: every relative link in the repository's Markdown
//! resolves to a file or folder inside the repository, and no file points readers at a
//! bug tracker's numbers instead of saying what a thing is.

use std::path::{Component, Path, PathBuf};

/// Every tracked file (`git ls-files`), so build outputs and downloads are left out.
fn tracked_files() -> Vec<PathBuf> {
    let root = shardline_tests::workspace_root();
    let out = std::process::Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output()
        .expect("run git ls-files (install git)");
    assert!(out.status.success(), "git ls-files failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(|f| root.join(f))
        .collect()
}

/// `[text](target)` link targets of a Markdown text, outside code blocks.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// `path` with `.` and `..` folded away (without touching the file system).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn every_relative_link_in_the_docs_resolves_inside_the_repository() {
    let root = normalize(&shardline_tests::workspace_root());
    let mut checked = 0;
    let mut broken = Vec::new();
    for file in tracked_files()
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "md"))
    {
        let text = std::fs::read_to_string(&file).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with('#') || link.starts_with("mailto:") {
                continue;
            }
            let path = link.split('#').next().unwrap();
            let target = normalize(&file.parent().unwrap().join(path));
            checked += 1;
            if !target.starts_with(&root) {
                broken.push(format!("{}: {link} leaves the repository", file.display()));
            } else if !target.exists() {
                broken.push(format!("{}: {link} does not exist", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    assert!(
        checked > 20,
        "only {checked} links checked: the link finder is broken"
    );
}

#[test]
fn no_file_refers_to_tracker_issue_numbers() {
    let mut found = Vec::new();
    for file in tracked_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // binary files
        };
        for (n, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let words: Vec<&str> = lower
                .split(|c: char| !c.is_alphanumeric() && c != '#')
                .filter(|w| !w.is_empty())
                .collect();
            let refers = words.windows(2).any(|w| {
                (w[0] == "issue" || w[0] == "issues")
                    && w[1].trim_start_matches('#').parse::<u32>().is_ok()
            });
            if refers {
                found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "say what the thing is instead of an issue number:\n{}",
        found.join("\n")
    );
}

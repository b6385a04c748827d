//! Assembles each Lua script from its file and the helpers its header names
//! (`-- includes: clock records …`, files in `scripts/lib/`), so that a
//! helper is written once and included only where used. A `#!lua` line
//! (Redis 7 script flags) stays first.
//!
//! Of an included file, only the functions the script reaches are kept
//! (named in its code, or in the code of a function kept): Redis runs a
//! script's whole text on every call, and each `local function` it passes
//! makes a closure. Counted by callgrind in redis-server (instructions,
//! which this noisy machine cannot blur): a claim that finds nothing,
//! 153.0k → 147.1k per call; thr-bench `scripts` with one job per call,
//! 1,007k → 974k per job; with 16, about 1 % (the cost per call is shared).

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let dir = Path::new("scripts");
    println!("cargo:rerun-if-changed=scripts");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    let mut index = String::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("scripts/ exists")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "lua"))
        .collect();
    names.sort();
    for path in names {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let (shebang, body) = match text.strip_prefix("#!lua") {
            Some(rest) => {
                let (line, body) = rest.split_once('\n').unwrap_or((rest, ""));
                (format!("#!lua{line}\n"), body.to_string())
            }
            None => ("#!lua\n".to_string(), text.clone()),
        };
        let includes = body
            .lines()
            .find_map(|l| l.strip_prefix("-- includes:"))
            .unwrap_or_else(|| panic!("{name}.lua: no `-- includes:` line in its header"));
        let mut pieces = Vec::new();
        for lib in includes.split_whitespace().filter(|l| *l != "(none)") {
            let lib_path = dir.join("lib").join(format!("{lib}.lua"));
            let lib_text = std::fs::read_to_string(&lib_path)
                .unwrap_or_else(|e| panic!("{name}.lua includes {lib}: {e}"));
            pieces.extend(split_functions(&lib_text));
        }
        let mut assembled = shebang;
        for piece in reached(pieces, &body) {
            assembled.push_str(&piece.text);
        }
        assembled.push_str(&body);
        std::fs::write(Path::new(&out).join(format!("{name}.lua")), assembled).unwrap();
        let _ = writeln!(
            index,
            "/// `scripts/{name}.lua` with its helpers.\npub(crate) const {}: &str = include_str!(concat!(env!(\"OUT_DIR\"), \"/{name}.lua\"));",
            name.to_uppercase()
        );
    }
    std::fs::write(Path::new(&out).join("scripts.rs"), index).unwrap();
}

/// A stretch of a helper file: a top-level `local function NAME` with the
/// comment lines right above it (`name` set), or anything else.
struct Piece {
    name: Option<String>,
    text: String,
}

/// Cuts a helper file into its top-level functions (from `local function
/// NAME(` to the first line that is `end` alone) and what lies between.
fn split_functions(text: &str) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut other = String::new();
    let mut comments = String::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(rest) = line.strip_prefix("local function ") {
            let name = rest.split('(').next().unwrap_or(rest).trim().to_string();
            let mut f = std::mem::take(&mut comments);
            f.push_str(line);
            f.push('\n');
            // A function on one line ends on it; any other ends at the
            // first `end` at the start of a line (its own blocks are
            // indented).
            let mut ended = line.trim_end().ends_with(" end");
            while !ended {
                let Some(line) = lines.next() else { break };
                f.push_str(line);
                f.push('\n');
                ended = line == "end";
            }
            assert!(ended, "helper {name}: no `end` at the start of a line");
            pieces.push(Piece {
                name: None,
                text: std::mem::take(&mut other),
            });
            pieces.push(Piece {
                name: Some(name),
                text: f,
            });
        } else if line.starts_with("--") {
            comments.push_str(line);
            comments.push('\n');
        } else {
            other.push_str(&comments);
            comments.clear();
            other.push_str(line);
            other.push('\n');
        }
    }
    other.push_str(&comments);
    pieces.push(Piece {
        name: None,
        text: other,
    });
    pieces
}

/// The pieces the script `body` reaches: every non-function piece, and each
/// function named (as a whole word) by the body or by another piece kept;
/// dropping one may leave others unnamed, so it goes on until none drops.
fn reached(mut pieces: Vec<Piece>, body: &str) -> Vec<Piece> {
    loop {
        let unused = pieces.iter().position(|p| {
            p.name.as_ref().is_some_and(|name| {
                !names(body, name)
                    && !pieces
                        .iter()
                        .any(|o| o.name.as_ref() != Some(name) && names(&o.text, name))
            })
        });
        match unused {
            Some(i) => {
                pieces.remove(i);
            }
            None => return pieces,
        }
    }
}

/// True when the code of `text` (comments left out: no script has `--`
/// inside a string) holds `word` as a whole Lua name.
fn names(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .any(|code| {
            code.match_indices(word).any(|(at, _)| {
                let before = code[..at].chars().next_back();
                let after = code[at + word.len()..].chars().next();
                !before.is_some_and(is_name) && !after.is_some_and(is_name)
            })
        })
}

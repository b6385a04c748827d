//! Assembles each Lua script from its file and the helpers its header names
//! (`-- includes: clock records …`, files in `scripts/lib/`), so that a
//! helper is written once and included only where used. A `#!lua` line
//! (Redis 7 script flags) stays first.

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
        let mut assembled = shebang;
        for lib in includes.split_whitespace().filter(|l| *l != "(none)") {
            let lib_path = dir.join("lib").join(format!("{lib}.lua"));
            let lib_text = std::fs::read_to_string(&lib_path)
                .unwrap_or_else(|e| panic!("{name}.lua includes {lib}: {e}"));
            assembled.push_str(&lib_text);
            assembled.push('\n');
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

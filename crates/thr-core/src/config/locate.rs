//! Finds where a key path sits in the TOML text, so that errors found after
//! deserialization (unknown keys, missing keys) can still name a line.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// `name` in `a.name`.
    Key(String),
    /// `0` in `queues[0]`.
    Index(usize),
}

/// Renders a path as operators write it: `queues[0].backend`.
pub fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// The parsed document with positions, and the text to turn them into lines.
pub struct Locator<'t> {
    text: &'t str,
    root: Option<Spanned<DeTable<'t>>>,
}

impl<'t> Locator<'t> {
    /// Parses `text` for positions only (syntax errors are reported elsewhere).
    pub fn new(text: &'t str) -> Locator<'t> {
        Locator {
            text,
            root: DeTable::parse(text).ok(),
        }
    }

    /// The byte range of the value at `path`, or of its closest parent
    /// (a missing key is reported where its table is).
    pub fn span(&self, path: &[Seg]) -> Option<Range<usize>> {
        let root = self.root.as_ref()?;
        let mut best = root.span();
        let mut table: Option<&DeTable<'_>> = Some(root.get_ref());
        let mut array: Option<&DeArray<'_>> = None;
        for seg in path {
            let next = match (seg, table, array) {
                (Seg::Key(key), Some(t), _) => t
                    .iter()
                    .find(|(k, _)| k.get_ref().as_ref() == key.as_str())
                    .map(|(k, v)| (k.span(), v)),
                (Seg::Index(i), _, Some(a)) => a.get(*i).map(|v| (v.span(), v)),
                _ => None,
            };
            let Some((key_span, value)) = next else {
                break;
            };
            // Point at the key for scalars (that is where the eye goes), at the
            // value for tables whose key may be far away.
            best = match value.get_ref() {
                DeValue::Table(_) if value.span().start < value.span().end => value.span(),
                _ => key_span,
            };
            table = None;
            array = None;
            match value.get_ref() {
                DeValue::Table(t) => table = Some(t),
                DeValue::Array(a) => array = Some(a),
                _ => {}
            }
        }
        Some(best)
    }

    /// The deepest key path whose key or value contains the byte `offset`.
    /// Containers are searched whatever their span: the span of an array of
    /// tables covers only its first `[[header]]`.
    pub fn path_at(&self, offset: usize) -> Vec<Seg> {
        fn search(value: &DeValue<'_>, offset: usize, path: &mut Vec<Seg>) -> bool {
            let inside = |s: Range<usize>| s.start <= offset && offset <= s.end;
            type Child<'a, 'i> = (Seg, Option<Range<usize>>, &'a Spanned<DeValue<'i>>);
            let children: Vec<Child<'_, '_>> = match value {
                DeValue::Table(t) => t
                    .iter()
                    .map(|(k, v)| (Seg::Key(k.get_ref().to_string()), Some(k.span()), v))
                    .collect(),
                DeValue::Array(a) => a
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (Seg::Index(i), None, v))
                    .collect(),
                _ => return false,
            };
            for (seg, key_span, child) in children {
                path.push(seg);
                if search(child.get_ref(), offset, path) {
                    return true;
                }
                let scalar = !matches!(child.get_ref(), DeValue::Table(_) | DeValue::Array(_));
                if (scalar && inside(child.span())) || key_span.is_some_and(inside) {
                    return true;
                }
                path.pop();
            }
            false
        }
        let mut path = Vec::new();
        if let Some(root) = &self.root {
            let table = DeValue::Table(root.get_ref().clone());
            search(&table, offset, &mut path);
        }
        path
    }

    /// 1-based line and column of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let column = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, column)
    }
}

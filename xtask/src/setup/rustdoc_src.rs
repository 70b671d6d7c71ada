//! Rebuilds Rust source files from the rustdoc source pages that ship in a
//! toolchain's rust-docs component (`<sysroot>/share/doc/rust/html/src/…`).
//!
//! Every page names its original path ("Source of the Rust file
//! `library/core/src/any.rs`") and holds the code in one
//! `<pre class="rust"><code>` block: highlighting spans, links to definitions,
//! and line-number anchors (`<a href=#1 id=1 data-nosnippet>1</a>`) around
//! HTML-escaped text. rustdoc escapes every `<`, `>` and `&` of the code, so
//! every raw `<` in the block starts a tag.
use std::{
    fs,
    path::{Component, Path, PathBuf},
};

use anyhow::{Context as _, bail};

const DESCRIPTION: &str = "<meta name=\"description\" content=\"Source of the Rust file `";
const CODE_START: &str = "<pre class=\"rust\"><code>";
const CODE_END: &str = "</code></pre>";

/// Writes the source of every page under `docs` to `out/<original path>`
/// (e.g. `out/library/core/src/any.rs`), as rust-src lays it out; returns how
/// many files were written.
pub fn extract(docs: &Path, out: &Path) -> anyhow::Result<usize> {
    let mut written = 0;
    let mut dirs = vec![docs.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for entry in entries {
            let path = entry
                .with_context(|| format!("reading {}", dir.display()))?
                .path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "html") {
                continue;
            }
            let page =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let Some((original, source)) = source_of(&page) else {
                eprintln!("setup: skipped {}: not a source page", path.display());
                continue;
            };
            let Some(relative) = normalize(original) else {
                bail!("{}: unexpected source path {original:?}", path.display());
            };
            let dest = out.join(relative);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .with_context(|| format!("creating {}", parent.display()))?;
            }
            fs::write(&dest, source).with_context(|| format!("writing {}", dest.display()))?;
            written += 1;
        }
    }
    if written == 0 {
        bail!("no rustdoc source pages under {}", docs.display());
    }
    Ok(written)
}

/// `path` with its `..` resolved (core's pages name files such as
/// `library/core/src/../../stdarch/…`), or `None` if it is absolute or climbs
/// above its start: the path comes from a file we did not write, and whatever
/// it says must land inside the output directory.
fn normalize(path: &str) -> Option<PathBuf> {
    let mut parts = Vec::new();
    for component in Path::new(path).components() {
        match component {
            Component::Normal(part) => parts.push(part),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// The original path and the source text of one rustdoc source page, or
/// `None` if the page is not a source page.
fn source_of(page: &str) -> Option<(&str, String)> {
    let (_, rest) = page.split_once(DESCRIPTION)?;
    let (original, _) = rest.split_once("`.\">")?;
    let (_, rest) = page.split_once(CODE_START)?;
    let (code, _) = rest.split_once(CODE_END)?;
    let mut text = unescape(&strip_tags(code));
    if !text.ends_with('\n') {
        text.push('\n');
    }
    Some((original, text))
}

/// Removes every tag, and the line-number anchors with their text.
fn strip_tags(html: &str) -> String {
    let mut text = String::with_capacity(html.len());
    let mut rest = html;
    while let Some(start) = rest.find('<') {
        text.push_str(&rest[..start]);
        rest = &rest[start..];
        let Some(end) = rest.find('>') else {
            // An unterminated tag: not rustdoc output; keep the text.
            break;
        };
        let tag = &rest[..=end];
        rest = &rest[end + 1..];
        if tag.starts_with("<a ") && tag.contains("data-nosnippet") {
            // A line number: drop it and its closing tag.
            rest = rest.split_once("</a>").map_or("", |(_, after)| after);
        }
    }
    text.push_str(rest);
    text
}

/// Decodes the HTML character references rustdoc writes (named ones for
/// `& < > " '`, and numeric ones); anything else is kept as it is.
fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find('&') {
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let decoded = rest.find(';').and_then(|end| {
            let decoded = match &rest[1..end] {
                "amp" => '&',
                "lt" => '<',
                "gt" => '>',
                "quot" => '"',
                "apos" => '\'',
                entity => {
                    let number = entity.strip_prefix('#')?;
                    let code = match number.strip_prefix(['x', 'X']) {
                        Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                        None => number.parse().ok()?,
                    };
                    char::from_u32(code)?
                }
            };
            Some((decoded, end))
        });
        match decoded {
            Some((c, end)) => {
                out.push(c);
                rest = &rest[end + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::{normalize, source_of, unescape};

    #[test]
    fn parent_components_are_resolved() {
        assert_eq!(
            normalize("library/core/src/../../stdarch/crates/core_arch/src/mod.rs"),
            Some(PathBuf::from("library/stdarch/crates/core_arch/src/mod.rs"))
        );
        assert_eq!(
            normalize("library/./core/lib.rs"),
            Some(PathBuf::from("library/core/lib.rs"))
        );
    }

    #[test]
    fn paths_leaving_the_output_are_refused() {
        assert_eq!(normalize("library/../../etc/passwd"), None);
        assert_eq!(normalize("/etc/passwd"), None);
    }

    const PAGE: &str = concat!(
        "<html><head><meta name=\"description\" content=\"Source of the Rust file ",
        "`library/core/src/any.rs`.\"></head><body><pre class=\"rust\"><code>",
        "<a href=#1 id=1 data-nosnippet>1</a><span class=\"doccomment\">//! `&amp;dyn Any`\n",
        "<a href=#2 id=2 data-nosnippet>2</a></span><span class=\"kw\">fn </span>",
        "<a href=\"../../core/any/trait.Any.html\">f</a>&lt;T: <span>Copy</span>&gt;() {}",
        "</code></pre></body></html>",
    );

    #[test]
    fn source_page_gives_path_and_code() {
        let (path, code) = source_of(PAGE).unwrap();
        assert_eq!(path, "library/core/src/any.rs");
        assert_eq!(code, "//! `&dyn Any`\nfn f<T: Copy>() {}\n");
    }

    #[test]
    fn other_pages_are_not_source() {
        assert!(source_of("<html><body>index</body></html>").is_none());
    }

    #[test]
    fn references_are_decoded() {
        assert_eq!(unescape("&lt;&gt;&amp;&quot;&#39;&#x27;&apos;"), "<>&\"'''");
    }

    #[test]
    fn stray_ampersands_are_kept() {
        assert_eq!(
            unescape("a && b &unknown; &#xZZ;"),
            "a && b &unknown; &#xZZ;"
        );
    }
}

/// Checks the extractor against the real thing where a toolchain has both.
#[cfg(test)]
mod against_rust_src {
    use std::{fs, path::PathBuf, process::Command};

    #[test]
    fn nightly_docs_rebuild_rust_src_byte_for_byte() {
        let output = Command::new("rustc")
            .args(["+nightly", "--print", "sysroot"])
            .output()
            .unwrap();
        let sysroot = PathBuf::from(String::from_utf8(output.stdout).unwrap().trim());
        let docs = sysroot.join("share/doc/rust/html/src/core");
        let rust_src = sysroot.join("lib/rustlib/src/rust");
        if !docs.is_dir() || !rust_src.is_dir() {
            eprintln!("skipped: nightly lacks rust-docs or rust-src, nothing to compare with");
            return;
        }
        let out = std::env::temp_dir().join(format!("xtask-rustdoc-src-{}", std::process::id()));
        let written = super::extract(&docs, &out).unwrap();

        let mut compared = 0;
        let mut differ = Vec::new();
        let mut dirs = vec![out.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let relative = path.strip_prefix(&out).unwrap().to_path_buf();
                compared += 1;
                if fs::read(&path).ok() != fs::read(rust_src.join(&relative)).ok() {
                    differ.push(relative);
                }
            }
        }
        fs::remove_dir_all(&out).unwrap();
        assert_eq!(compared, written);
        assert!(
            differ.is_empty(),
            "{} of {compared} files differ: {differ:?}",
            differ.len()
        );
    }
}

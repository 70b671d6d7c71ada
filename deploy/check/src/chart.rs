//! Renders the Helm chart's templates without Helm (not installable here) for
//! the small subset of Go templates and Sprig the chart is written in, so a
//! test can compare its output with the plain manifests. Anything outside the
//! subset is an error naming it, never silently rendered:
//!
//! - `{{ PIPELINE }}`, with `{{-` / `-}}` trimming whitespace as Go does;
//! - `{{/* comment */}}`, `{{ if P }}`, `{{ else }}`, `{{ range P }}`, `{{ end }}`;
//! - terms: `.`, `.a.b`, `$.a.b`, `"literal"`, integers, `.Files.Get "path"`;
//! - functions: `toYaml X`, `quote X`, and as pipeline stages `toYaml`,
//!   `quote`, `indent N`, `nindent N`.
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::CheckError;

/// What templates see: `.Values`, `.Release`, `.Chart`, and files for `.Files.Get`.
#[derive(Debug, Clone)]
pub struct Context {
    /// The root object: `{"Values": ..., "Release": ..., "Chart": ...}`.
    pub root: Value,
    /// The chart directory (`.Files.Get` is relative to it).
    pub chart_dir: PathBuf,
}

impl Context {
    /// Reads `Chart.yaml` and `values.yaml` of `chart_dir`, with `overrides`
    /// merged over the values (as `helm --set`/`-f` would).
    pub fn load(
        chart_dir: &Path,
        release_name: &str,
        namespace: &str,
        overrides: &Value,
    ) -> Result<Self, CheckError> {
        let one = |file: &str| -> Result<Value, CheckError> {
            let mut docs = crate::docs::load(&chart_dir.join(file))?;
            if docs.len() != 1 {
                return Err(CheckError::invalid(file, "expected exactly one document"));
            }
            Ok(docs.remove(0).value)
        };
        let chart = one("Chart.yaml")?;
        let mut values = one("values.yaml")?;
        merge(&mut values, overrides);
        let root = serde_json::json!({
            "Values": values,
            "Release": {"Name": release_name, "Namespace": namespace, "Service": "Helm"},
            "Chart": {
                "Name": chart["name"],
                "Version": chart["version"],
                "AppVersion": chart["appVersion"],
            },
        });
        Ok(Self {
            root,
            chart_dir: chart_dir.to_owned(),
        })
    }

    /// Renders every `templates/*.yaml` in name order, joined as one stream.
    pub fn render_all(&self) -> Result<String, CheckError> {
        let dir = self.chart_dir.join("templates");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(|source| CheckError::Io {
                path: dir.clone(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        files.sort();
        // Helm would render helpers (*.tpl) and NOTES.txt too: keep the
        // chart to what this renderer covers rather than skip them.
        if let Some(other) = files
            .iter()
            .find(|p| p.extension().is_none_or(|x| x != "yaml"))
        {
            return Err(CheckError::invalid(
                other.display().to_string(),
                "only templates/*.yaml are rendered by this check",
            ));
        }
        let mut out = String::new();
        for f in files {
            let text = crate::read(&f)?;
            let origin = f.display().to_string();
            out.push_str("\n---\n");
            out.push_str(&render(&text, self, &origin)?);
        }
        Ok(out)
    }
}

/// Merges `over` into `base`: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[derive(Debug)]
enum Node {
    Text(String),
    Output(String),
    If(String, Vec<Node>, Vec<Node>),
    Range(String, Vec<Node>),
}

/// Renders one template.
pub fn render(template: &str, ctx: &Context, origin: &str) -> Result<String, CheckError> {
    let tokens = tokenize(template, origin)?;
    let mut iter = tokens.into_iter();
    let (nodes, end) = parse_nodes(&mut iter, origin)?;
    if let Some(e) = end {
        return Err(CheckError::invalid(
            origin,
            format!("unexpected {{{{ {e} }}}}"),
        ));
    }
    let mut out = String::new();
    exec(&nodes, &ctx.root, ctx, origin, &mut out)?;
    Ok(out)
}

#[derive(Debug)]
enum Token {
    Text(String),
    Action(String),
}

fn tokenize(t: &str, origin: &str) -> Result<Vec<Token>, CheckError> {
    let mut tokens = Vec::new();
    let mut rest = t;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = rest[..start].to_owned();
        if trim_next {
            text = text.trim_start().to_owned();
        }
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| CheckError::invalid(origin, "unclosed {{"))?;
        let mut inner = &after[..end];
        if let Some(i) = inner.strip_prefix("- ") {
            text = text.trim_end().to_owned();
            inner = i;
        }
        trim_next = false;
        if let Some(i) = inner.strip_suffix(" -") {
            trim_next = true;
            inner = i;
        }
        tokens.push(Token::Text(text));
        let inner = inner.trim();
        if !(inner.starts_with("/*") && inner.ends_with("*/")) {
            tokens.push(Token::Action(inner.to_owned()));
        }
        rest = &after[end + 2..];
    }
    let text = if trim_next { rest.trim_start() } else { rest };
    tokens.push(Token::Text(text.to_owned()));
    Ok(tokens)
}

/// Parses until `end` or `else` (returned) or the end of input (None).
fn parse_nodes(
    it: &mut std::vec::IntoIter<Token>,
    origin: &str,
) -> Result<(Vec<Node>, Option<String>), CheckError> {
    let mut nodes = Vec::new();
    while let Some(tok) = it.next() {
        match tok {
            Token::Text(t) => nodes.push(Node::Text(t)),
            Token::Action(a) if a == "end" || a == "else" => return Ok((nodes, Some(a))),
            Token::Action(a) => {
                if let Some(cond) = a.strip_prefix("if ") {
                    let (then, end) = parse_nodes(it, origin)?;
                    let otherwise = match end.as_deref() {
                        Some("else") => match parse_nodes(it, origin)? {
                            (n, Some(e)) if e == "end" => n,
                            _ => return Err(CheckError::invalid(origin, "if/else without end")),
                        },
                        Some("end") => Vec::new(),
                        _ => return Err(CheckError::invalid(origin, "if without end")),
                    };
                    nodes.push(Node::If(cond.trim().to_owned(), then, otherwise));
                } else if let Some(over) = a.strip_prefix("range ") {
                    match parse_nodes(it, origin)? {
                        (body, Some(e)) if e == "end" => {
                            nodes.push(Node::Range(over.trim().to_owned(), body))
                        }
                        _ => return Err(CheckError::invalid(origin, "range without end")),
                    }
                } else {
                    let word = a.split_whitespace().next().unwrap_or("");
                    if ["with", "define", "template", "include", "block"].contains(&word) {
                        return Err(CheckError::invalid(
                            origin,
                            format!(
                                "{{{{ {a} }}}}: `{word}` is outside the subset this renderer supports"
                            ),
                        ));
                    }
                    nodes.push(Node::Output(a));
                }
            }
        }
    }
    Ok((nodes, None))
}

fn exec(
    nodes: &[Node],
    dot: &Value,
    ctx: &Context,
    origin: &str,
    out: &mut String,
) -> Result<(), CheckError> {
    for n in nodes {
        match n {
            Node::Text(t) => out.push_str(t),
            Node::Output(p) => {
                let v = pipeline(p, dot, ctx, origin)?;
                out.push_str(&to_text(&v, p, origin)?);
            }
            Node::If(cond, then, otherwise) => {
                let v = pipeline(cond, dot, ctx, origin)?;
                let branch = if truthy(&v) { then } else { otherwise };
                exec(branch, dot, ctx, origin, out)?;
            }
            Node::Range(over, body) => match pipeline(over, dot, ctx, origin)? {
                Value::Array(items) => {
                    for item in &items {
                        exec(body, item, ctx, origin, out)?;
                    }
                }
                Value::Null => {}
                other => {
                    return Err(CheckError::invalid(
                        origin,
                        format!("range over {over}: not a list but {other}"),
                    ));
                }
            },
        }
    }
    Ok(())
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

fn to_text(v: &Value, p: &str, origin: &str) -> Result<String, CheckError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(CheckError::invalid(
            origin,
            format!("{{{{ {p} }}}} is {other}; render lists and maps with toYaml"),
        )),
    }
}

fn pipeline(p: &str, dot: &Value, ctx: &Context, origin: &str) -> Result<Value, CheckError> {
    let mut stages = split_outside_quotes(p, '|').into_iter();
    let first = stages.next().unwrap_or_default();
    let words = split_outside_quotes(first.trim(), ' ');
    let mut value = match words.as_slice() {
        [f, arg] if f == "toYaml" || f == "quote" => {
            apply(f, &[], term(arg, dot, ctx, origin)?, origin)?
        }
        [files, path] if files == ".Files.Get" => {
            let rel = unquote(path).ok_or_else(|| {
                CheckError::invalid(origin, format!(".Files.Get needs a quoted path: {p}"))
            })?;
            Value::String(crate::read(&ctx.chart_dir.join(rel))?)
        }
        [t] => term(t, dot, ctx, origin)?,
        _ => {
            return Err(CheckError::invalid(
                origin,
                format!("{{{{ {p} }}}}: unsupported expression"),
            ));
        }
    };
    for stage in stages {
        let words = split_outside_quotes(stage.trim(), ' ');
        let (f, args) = words
            .split_first()
            .ok_or_else(|| CheckError::invalid(origin, format!("empty stage in {p}")))?;
        value = apply(f, args, value, origin)?;
    }
    Ok(value)
}

fn apply(f: &str, args: &[String], v: Value, origin: &str) -> Result<Value, CheckError> {
    let n = || -> Result<usize, CheckError> {
        args.first()
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| CheckError::invalid(origin, format!("{f} needs a width")))
    };
    match (f, args.len()) {
        ("toYaml", 0) => {
            let s = serde_norway::to_string(&v)
                .map_err(|e| CheckError::invalid(origin, format!("toYaml: {e}")))?;
            Ok(Value::String(s.trim_end_matches('\n').to_owned()))
        }
        ("quote", 0) => Ok(Value::String(
            serde_json::to_string(&to_text(&v, "quote", origin)?).unwrap_or_default(),
        )),
        ("indent", 1) => Ok(Value::String(indent(&to_text(&v, f, origin)?, n()?))),
        ("nindent", 1) => Ok(Value::String(format!(
            "\n{}",
            indent(&to_text(&v, f, origin)?, n()?)
        ))),
        _ => Err(CheckError::invalid(
            origin,
            format!(
                "function {f} with {} arguments is outside the supported subset",
                args.len()
            ),
        )),
    }
}

/// Sprig's indent: every line, empty ones too, gets the padding.
fn indent(s: &str, n: usize) -> String {
    let pad = " ".repeat(n);
    format!("{pad}{}", s.replace('\n', &format!("\n{pad}")))
}

fn term(t: &str, dot: &Value, ctx: &Context, origin: &str) -> Result<Value, CheckError> {
    if let Some(s) = unquote(t) {
        return Ok(Value::String(s));
    }
    if let Ok(i) = t.parse::<i64>() {
        return Ok(Value::from(i));
    }
    let (mut v, path) = if let Some(p) = t.strip_prefix('$') {
        (&ctx.root, p)
    } else if t.starts_with('.') {
        (dot, t)
    } else {
        return Err(CheckError::invalid(
            origin,
            format!("unsupported term {t:?}"),
        ));
    };
    for key in path.split('.').filter(|k| !k.is_empty()) {
        v = v.get(key).ok_or_else(|| {
            CheckError::invalid(origin, format!("{t}: no {key:?} (missing value?)"))
        })?;
    }
    Ok(v.clone())
}

fn unquote(t: &str) -> Option<String> {
    let inner = t.strip_prefix('"')?.strip_suffix('"')?;
    serde_json::from_str(&format!("\"{inner}\"")).ok()
}

fn split_outside_quotes(s: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut quoted = false;
    for c in s.chars() {
        if c == '"' {
            quoted = !quoted;
        }
        if c == sep && !quoted {
            parts.push(String::new());
        } else if let Some(last) = parts.last_mut() {
            last.push(c);
        }
    }
    parts.retain(|p| !p.is_empty());
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(values: Value) -> Context {
        Context {
            root: serde_json::json!({"Values": values, "Release": {"Namespace": "ns"}}),
            chart_dir: PathBuf::from("."),
        }
    }

    #[test]
    fn trimming_conditionals_ranges_and_yaml() {
        let c = ctx(serde_json::json!({"on": true, "off": false, "l": ["a", "b"], "m": {"k": 1}}));
        let t = "x:\n  {{- if .Values.on }}\n  on: {{ .Values.l | toYaml | nindent 4 }}\n  {{- end }}\n  {{- if .Values.off }}\n  off: 1\n  {{- else }}\n  else: {{ .Release.Namespace | quote }}\n  {{- end }}\n  r:\n  {{- range .Values.l }}\n    - {{ . }}-{{ $.Release.Namespace }}\n  {{- end }}\n  m: {{- toYaml .Values.m | nindent 4 }}\n";
        assert_eq!(
            render(t, &c, "t").unwrap(),
            "x:\n  on: \n    - a\n    - b\n  else: \"ns\"\n  r:\n    - a-ns\n    - b-ns\n  m:\n    k: 1\n"
        );
    }

    #[test]
    fn outside_the_subset_is_an_error() {
        let c = ctx(serde_json::json!({}));
        for (t, want) in [
            ("{{ include \"x\" . }}", "outside the subset"),
            ("{{ .Values.missing }}", "no \"missing\""),
            ("{{ .Values | default 3 }}", "function default"),
            ("{{ if .Values }}x", "if without end"),
            ("{{ .Values }}", "render lists and maps with toYaml"),
        ] {
            let err = render(t, &c, "t").unwrap_err();
            assert!(err.to_string().contains(want), "{t}: {err}");
        }
    }
}

//! The metric names a PromQL expression selects, from its parsed syntax tree.
use std::collections::BTreeSet;

use promql_parser::parser::{self, Expr};

use crate::CheckError;

/// Every metric name `expr` selects. Grafana's `$__rate_interval`-style
/// durations and `$var` template variables are replaced first, so dashboard
/// queries parse as the PromQL Grafana sends.
pub fn selected_metrics(expr: &str, origin: &str) -> Result<BTreeSet<String>, CheckError> {
    let plain = grafana_to_promql(expr);
    let ast = parser::parse(&plain).map_err(|message| CheckError::Parse {
        origin: origin.to_owned(),
        message: format!("{message} in {plain:?}"),
    })?;
    let mut names = BTreeSet::new();
    let mut nameless = false;
    walk(&ast, &mut names, &mut nameless);
    if nameless {
        return Err(CheckError::invalid(
            origin,
            format!("a selector without a metric name in {expr:?}: name it, so it can be checked"),
        ));
    }
    Ok(names)
}

/// Replaces Grafana's interval macros with a duration and `$var`s with `.*`.
pub fn grafana_to_promql(expr: &str) -> String {
    let mut s = expr.to_owned();
    for m in ["$__rate_interval", "$__interval", "$__range"] {
        s = s.replace(m, "5m");
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '$'
            && chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphabetic() || *n == '{')
        {
            while chars
                .peek()
                .is_some_and(|n| n.is_ascii_alphanumeric() || matches!(n, '_' | '{' | '}'))
            {
                chars.next();
            }
            out.push_str(".*");
        } else {
            out.push(c);
        }
    }
    out
}

fn walk(e: &Expr, names: &mut BTreeSet<String>, nameless: &mut bool) {
    match e {
        Expr::Aggregate(a) => {
            walk(&a.expr, names, nameless);
            if let Some(p) = &a.param {
                walk(p, names, nameless);
            }
        }
        Expr::Unary(u) => walk(&u.expr, names, nameless),
        Expr::Binary(b) => {
            walk(&b.lhs, names, nameless);
            walk(&b.rhs, names, nameless);
        }
        Expr::Paren(p) => walk(&p.expr, names, nameless),
        Expr::Subquery(s) => walk(&s.expr, names, nameless),
        Expr::VectorSelector(v) => selector(v, names, nameless),
        Expr::MatrixSelector(m) => selector(&m.vs, names, nameless),
        Expr::Call(c) => c.args.args.iter().for_each(|a| walk(a, names, nameless)),
        Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => {}
    }
}

fn selector(v: &parser::VectorSelector, names: &mut BTreeSet<String>, nameless: &mut bool) {
    let by_matcher = v
        .matchers
        .matchers
        .iter()
        .find(|m| m.name == "__name__")
        .map(|m| m.value.clone());
    match v.name.clone().or(by_matcher) {
        Some(n) => {
            names.insert(n);
        }
        None => *nameless = true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_nested_expressions() {
        let n = selected_metrics(
            r#"sum by (p) (rate(a_total{job="x",i=~"$instance"}[$__rate_interval])) / sum(rate(b_total[5m])) > on() group_left max_over_time(c[1h:5m])"#,
            "t",
        )
        .unwrap();
        assert_eq!(
            n.into_iter().collect::<Vec<_>>(),
            ["a_total", "b_total", "c"]
        );
        assert!(selected_metrics("sum(rate(x[5m]", "t").is_err());
        let err = selected_metrics(r#"{job="x"}"#, "t").unwrap_err();
        assert!(err.to_string().contains("without a metric name"), "{err}");
    }
}

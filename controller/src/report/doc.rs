//! A tiny document model: what a report or draft says, independent of the
//! format it is rendered to. Gaps (facts the system cannot know) are a kind
//! of text of their own, so every format marks them the same way.

/// A run of text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inline {
    /// Plain text.
    Text(String),
    /// Emphasised text.
    Strong(String),
    /// Code / identifiers.
    Code(String),
    /// Something a person must fill in: what is missing and why.
    Gap(String),
}

/// A paragraph's worth of inlines.
pub type Line = Vec<Inline>;

/// A block of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    /// Section heading (level 2).
    Heading(String),
    /// Paragraph.
    Para(Line),
    /// Bullet list.
    List(Vec<Line>),
    /// Two-column facts table.
    Table(Vec<(String, Line)>),
    /// Table with a header row.
    Grid {
        /// Column names.
        header: Vec<String>,
        /// Rows.
        rows: Vec<Vec<String>>,
    },
    /// The egress chart (HTML draws it; text formats describe it).
    Chart,
}

/// A whole document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Title (level 1).
    pub title: String,
    /// Body.
    pub blocks: Vec<Block>,
}

/// Plain text inline.
pub fn t(s: impl Into<String>) -> Inline {
    Inline::Text(s.into())
}

/// Strong inline.
pub fn b(s: impl Into<String>) -> Inline {
    Inline::Strong(s.into())
}

/// Code inline.
pub fn c(s: impl Into<String>) -> Inline {
    Inline::Code(s.into())
}

/// Gap inline.
pub fn gap(s: impl Into<String>) -> Inline {
    Inline::Gap(s.into())
}

impl Doc {
    /// Every gap in the document, in order.
    pub fn gaps(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut take = |line: &Line| {
            for i in line {
                if let Inline::Gap(g) = i {
                    out.push(g.clone());
                }
            }
        };
        for block in &self.blocks {
            match block {
                Block::Para(l) => take(l),
                Block::List(items) => items.iter().for_each(&mut take),
                Block::Table(rows) => rows.iter().for_each(|(_, l)| take(l)),
                Block::Heading(_) | Block::Grid { .. } | Block::Chart => {}
            }
        }
        out
    }
}

/// Plain text of a line (gaps as `[GAP: …]`).
pub fn plain(line: &Line) -> String {
    line.iter()
        .map(|i| match i {
            Inline::Text(s) | Inline::Strong(s) | Inline::Code(s) => s.clone(),
            Inline::Gap(g) => format!("[GAP: {g}]"),
        })
        .collect()
}

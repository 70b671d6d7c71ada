//! Counting tests from libtest's closing lines
//! (`test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; …`).
use std::ops::AddAssign;

/// Tests counted over one or more harness runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed (or harnesses that failed without saying which).
    pub failed: u64,
    /// Tests marked `#[ignore]` that did not run.
    pub ignored: u64,
}

impl Counts {
    /// The counts in one libtest `test result:` line; `None` for any other line.
    pub fn parse_line(line: &str) -> Option<Self> {
        let rest = line.trim().strip_prefix("test result: ")?;
        // "ok. 3 passed; …" or "FAILED. 1 passed; 2 failed; …"
        let (_, fields) = rest.split_once(". ")?;
        let mut counts = Self::default();
        let mut seen_passed = false;
        for field in fields.split(';') {
            let Some((number, word)) = field.trim().split_once(' ') else {
                continue;
            };
            let Ok(number) = number.parse() else {
                continue;
            };
            match word {
                "passed" => {
                    counts.passed = number;
                    seen_passed = true;
                }
                "failed" => counts.failed = number,
                "ignored" => counts.ignored = number,
                _ => {}
            }
        }
        seen_passed.then_some(counts)
    }

    /// The closing line CI reads: `N passed, N failed`, with `, N skipped`
    /// when tests were ignored.
    pub fn summary_line(&self) -> String {
        let Self {
            passed,
            failed,
            ignored,
        } = self;
        if *ignored == 0 {
            format!("{passed} passed, {failed} failed")
        } else {
            format!("{passed} passed, {failed} failed, {ignored} skipped")
        }
    }
}

impl AddAssign for Counts {
    fn add_assign(&mut self, other: Self) {
        let Self {
            passed,
            failed,
            ignored,
        } = other;
        self.passed += passed;
        self.failed += failed;
        self.ignored += ignored;
    }
}

#[cfg(test)]
mod tests {
    use super::Counts;

    #[test]
    fn ok_line() {
        let line = "test result: ok. 12 passed; 0 failed; 2 ignored; 0 measured; 3 filtered out; finished in 0.41s";
        assert_eq!(
            Counts::parse_line(line),
            Some(Counts {
                passed: 12,
                failed: 0,
                ignored: 2
            })
        );
    }

    #[test]
    fn failed_line() {
        let line = "test result: FAILED. 4 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.02s";
        assert_eq!(
            Counts::parse_line(line),
            Some(Counts {
                passed: 4,
                failed: 1,
                ignored: 0
            })
        );
    }

    #[test]
    fn other_lines_are_not_results() {
        for line in [
            "running 3 tests",
            "test detect::volume::tests::window ... ok",
            "test result: garbage",
            "",
        ] {
            assert_eq!(Counts::parse_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn counts_add_up_and_summarise() {
        let mut total = Counts::default();
        total += Counts {
            passed: 3,
            failed: 0,
            ignored: 0,
        };
        total += Counts {
            passed: 2,
            failed: 1,
            ignored: 0,
        };
        assert_eq!(total.summary_line(), "5 passed, 1 failed");
        total.ignored = 2;
        assert_eq!(total.summary_line(), "5 passed, 1 failed, 2 skipped");
    }
}

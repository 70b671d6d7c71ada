//! `cargo xtask bench`: runs the benchmarks listed in [`BENCHMARKS`] and
//! writes their measures to `target/bench/results.json`.
use std::{fs, path::Path};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::{cargo::BuildEnv, process};

/// Where the results go, relative to the workspace root.
const RESULTS_DIR: &str = "target/bench";

/// One benchmark: a name, what it measures, and the function that runs it.
pub struct Benchmark {
    /// Short name, as `cargo xtask bench NAME` selects it.
    pub name: &'static str,
    /// What it measures, one line.
    pub about: &'static str,
    /// Runs it and returns its measures.
    pub run: fn(&BuildEnv) -> anyhow::Result<Vec<Measure>>,
}

/// Every benchmark `cargo xtask bench` runs, in order.
const BENCHMARKS: &[Benchmark] = &[
    Benchmark {
        name: "datapath",
        about: "egress program cost per packet (BPF_PROG_TEST_RUN), live bpf_stats, \
            TCP throughput attached vs detached (iperf3)",
        run: datapath,
    },
    Benchmark {
        name: "detect",
        about: "DNS detector events/s on one core; agent detection state RSS with \
            10,000 pods × 20 destinations (agent/examples/detect_bench.rs)",
        run: detect,
    },
    Benchmark {
        name: "controller",
        about: "500 simulated agents over mutual TLS for 60 s: stored msg/s, ack latency, RSS",
        run: controller,
    },
    Benchmark {
        name: "controller-burst",
        about: "the same 500 agents offering 10× (200,000 msg/s) for 60 s: what the controller \
            cannot take waits in the agents' journals; all of it stored, nothing lost (~8 min)",
        run: controller_burst,
    },
    Benchmark {
        name: "lockdown",
        about: "detection received → Block on the agent's stream and → NetworkPolicy apply \
            request at kube's mock API server, 300 incidents (controller/examples/lockdown_bench.rs)",
        run: lockdown,
    },
    Benchmark {
        name: "contain",
        about: "the demo's lab: 10 bulk uploads across 100 MB (detection, containment p50/p95, \
            bytes past the threshold) and the hard cap's overshoot",
        run: contain,
    },
];

/// Runs the lab's time-to-contain benchmark (xtask/lab/src/bench.rs) on
/// release builds of the agent and controller (needs root).
fn contain(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    let out = Path::new(RESULTS_DIR).join("contain.json");
    process::run(&mut env.cargo([
        "build",
        "--release",
        "--quiet",
        "--package",
        "exfilguard-agent",
        "--package",
        "exfilguard-controller",
        "--package",
        "exfilguard-lab",
        "--bins",
    ]))?;
    process::run(
        std::process::Command::new("target/release/exfilguard-lab")
            .args(["bench", "--runs", "10", "--json"])
            .arg(&out)
            .env("EXFILGUARD_BIN_DIR", "target/release"),
    )?;
    read_measures(&out)
}

/// Runs the detector benchmark (agent/examples/detect_bench.rs) and reads
/// its measures.
fn detect(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    let out = Path::new(RESULTS_DIR).join("detect.json");
    let mut cmd = env.cargo([
        "run",
        "--release",
        "--quiet",
        "--package",
        "exfilguard-agent",
        "--example",
        "detect_bench",
        "--",
        "--json",
    ]);
    cmd.arg(&out);
    process::run(&mut cmd)?;
    read_measures(&out)
}

/// Runs the controller's load generator (controller/examples/loadgen.rs)
/// against a real controller process and reads its measures.
fn controller(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    loadgen(env, "controller.json", &[])
}

/// The load generator with a 10× burst (`--burst 10`).
fn controller_burst(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    loadgen(env, "controller-burst.json", &["--burst", "10"])
}

/// Builds the controller and its load generator, runs it with `args`, and
/// reads the measures it wrote to `RESULTS_DIR/file`.
fn loadgen(env: &BuildEnv, file: &str, args: &[&str]) -> anyhow::Result<Vec<Measure>> {
    let out = Path::new(RESULTS_DIR).join(file);
    process::run(&mut env.cargo([
        "build",
        "--release",
        "--quiet",
        "--package",
        "exfilguard-controller",
        "--bins",
        "--examples",
    ]))?;
    process::run(
        std::process::Command::new("target/release/examples/loadgen")
            .args(args)
            .arg("--json")
            .arg(&out),
    )?;
    read_measures(&out)
}

/// Runs the controller's response benchmark (controller/examples/lockdown_bench.rs).
fn lockdown(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    let out = Path::new(RESULTS_DIR).join("lockdown.json");
    let mut cmd = env.cargo([
        "run",
        "--release",
        "--quiet",
        "--package",
        "exfilguard-controller",
        "--example",
        "lockdown_bench",
        "--",
        "--json",
    ]);
    cmd.arg(&out);
    process::run(&mut cmd)?;
    read_measures(&out)
}

/// Runs `tests/src/bin/datapath-bench.rs` (needs root) and reads its measures.
fn datapath(env: &BuildEnv) -> anyhow::Result<Vec<Measure>> {
    let out = Path::new(RESULTS_DIR).join("datapath.json");
    let mut cmd = env.cargo([
        "run",
        "--release",
        "--quiet",
        "--package",
        "exfilguard-tests",
        "--bin",
        "datapath-bench",
        "--",
        "--json",
    ]);
    cmd.arg(&out);
    process::run(&mut cmd)?;
    read_measures(&out)
}

/// The measures a benchmark program wrote to `path`.
fn read_measures(path: &Path) -> anyhow::Result<Vec<Measure>> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// One measured figure and how it compares with its goal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measure {
    /// What was measured, e.g. `egress.overhead_per_packet`.
    pub name: String,
    /// The measured value, in `unit`.
    pub value: f64,
    /// The unit of `value` and `goal`, e.g. `ns`.
    pub unit: String,
    /// The target, as a comparison in `unit`, e.g. `<= 1000`.
    pub goal: String,
    /// Whether `value` meets `goal`.
    pub met: bool,
}

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct Options {
    /// Run only these benchmarks (datapath, detect, controller,
    /// controller-burst, lockdown, contain); every one when none is named.
    /// The other benchmarks' measures in results.json are kept.
    pub only: Vec<String>,
}

/// The benchmarks `only` names, in [`BENCHMARKS`] order; all when empty.
fn select(only: &[String]) -> anyhow::Result<Vec<&'static Benchmark>> {
    if let Some(unknown) = only
        .iter()
        .find(|n| !BENCHMARKS.iter().any(|b| b.name == n.as_str()))
    {
        let known: Vec<&str> = BENCHMARKS.iter().map(|b| b.name).collect();
        anyhow::bail!("no benchmark {unknown:?}; there are: {}", known.join(", "));
    }
    Ok(BENCHMARKS
        .iter()
        .filter(|b| only.is_empty() || only.iter().any(|n| n == b.name))
        .collect())
}

/// `earlier` with every measure `now` has again replaced, then `now`'s new ones.
fn merge(earlier: Vec<Measure>, now: &[Measure]) -> Vec<Measure> {
    let mut merged: Vec<Measure> = earlier
        .into_iter()
        .map(|m| now.iter().find(|n| n.name == m.name).cloned().unwrap_or(m))
        .collect();
    for m in now {
        if !merged.iter().any(|e| e.name == m.name) {
            merged.push(m.clone());
        }
    }
    merged
}

/// Shows BENCHMARKS.md, runs the selected benchmarks, and writes the results.
pub fn run(env: &BuildEnv, root: &Path, options: &Options) -> anyhow::Result<()> {
    let selected = select(&options.only)?;
    let dir = root.join(RESULTS_DIR);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let table = root.join("BENCHMARKS.md");
    match fs::read_to_string(&table) {
        Ok(text) => println!("{}:\n\n{text}", table.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no BENCHMARKS.md yet");
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", table.display())),
    }

    let mut measures = Vec::new();
    for Benchmark { name, about, run } in selected {
        println!("==> {name}: {about}");
        measures.extend(run(env).with_context(|| format!("benchmark {name}"))?);
    }
    for Measure {
        name,
        value,
        unit,
        goal,
        met,
    } in &measures
    {
        let verdict = if *met { "met" } else { "NOT MET" };
        println!("{name:<40} {value:>12.3} {unit:<6} goal {goal:<12} {verdict}");
    }
    let results = dir.join("results.json");
    // A partial run keeps what the others measured last time.
    let measures = if options.only.is_empty() {
        measures
    } else {
        let earlier = if results.exists() {
            read_measures(&results)?
        } else {
            Vec::new()
        };
        merge(earlier, &measures)
    };
    write_results(&results, &measures)?;
    println!("wrote {}", results.display());
    Ok(())
}

/// Writes `measures` to `path` as a JSON array of
/// `{name, value, unit, goal, met}` objects.
pub fn write_results(path: &Path, measures: &[Measure]) -> anyhow::Result<()> {
    let mut json = serde_json::to_string_pretty(measures).context("serialising measures")?;
    json.push('\n');
    fs::write(path, json).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::fs;

    use serde_json::{Value, json};

    use super::{BENCHMARKS, Measure, merge, select, write_results};

    fn measure(name: &str, value: f64) -> Measure {
        Measure {
            name: name.into(),
            value,
            unit: "ms".into(),
            goal: "<= 50".into(),
            met: value <= 50.0,
        }
    }

    #[test]
    fn named_benchmarks_run_in_table_order_and_unknown_names_are_refused() {
        let names = |only: &[&str]| -> Vec<&str> {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            select(&only).unwrap().iter().map(|b| b.name).collect()
        };
        assert_eq!(names(&[]).len(), BENCHMARKS.len());
        assert_eq!(
            names(&["controller-burst", "controller"]),
            ["controller", "controller-burst"]
        );
        let Err(err) = select(&["controler".to_string()]) else {
            panic!("a misspelt name was accepted");
        };
        let err = err.to_string();
        assert!(
            err.contains("\"controler\"") && err.contains("controller-burst"),
            "{err}"
        );
    }

    #[test]
    fn a_partial_run_replaces_its_measures_and_keeps_the_others() {
        let earlier = vec![measure("egress.hit", 94.0), measure("controller.p99", 56.0)];
        let now = [
            measure("controller.p99", 30.0),
            measure("controller.new", 1.0),
        ];
        let merged = merge(earlier, &now);
        assert_eq!(
            merged,
            [
                measure("egress.hit", 94.0),
                measure("controller.p99", 30.0),
                measure("controller.new", 1.0)
            ]
        );
    }

    #[test]
    fn results_are_an_array_of_measures() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        let measures = [
            Measure {
                name: "egress.overhead_per_packet".into(),
                value: 812.5,
                unit: "ns".into(),
                goal: "<= 1000".into(),
                met: true,
            },
            Measure {
                name: "containment.latency".into(),
                value: 1.4,
                unit: "s".into(),
                goal: "<= 1".into(),
                met: false,
            },
        ];
        write_results(&path, &measures).unwrap();
        let written: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            written,
            json!([
                {"name": "egress.overhead_per_packet", "value": 812.5, "unit": "ns", "goal": "<= 1000", "met": true},
                {"name": "containment.latency", "value": 1.4, "unit": "s", "goal": "<= 1", "met": false},
            ])
        );
    }

    #[test]
    fn no_measures_is_an_empty_array() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-empty-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("results.json");
        write_results(&path, &[]).unwrap();
        let text = fs::read_to_string(&path).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(text, "[]\n");
    }
}

//! Reading a results directory as `coordinator results --out DIR` writes it:
//! `DIR/<task-index>.out` (accepted output bytes) and optionally `DIR/results.json`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// Task outputs by task index.
#[derive(Debug, Default, Clone)]
pub struct Outputs {
    pub outputs: BTreeMap<u32, Vec<u8>>,
    /// Number of tasks in the job, if `results.json` says so.
    pub tasks_total: Option<usize>,
    /// Task indices `results.json` lists that have no `.out` file (no accepted result).
    pub missing: Vec<u32>,
}

/// Read every `<index>.out` in `dir`; if `results.json` is there, use it to find missing tasks.
pub fn read_dir(dir: &Path) -> Result<Outputs> {
    let mut outputs = BTreeMap::new();
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read results directory {}", dir.display()))?;
    for e in entries {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        let Some(stem) = name.strip_suffix(".out") else {
            continue;
        };
        let Ok(index) = stem.parse::<u32>() else {
            continue;
        };
        let bytes = std::fs::read(e.path())
            .with_context(|| format!("cannot read {}", e.path().display()))?;
        outputs.insert(index, bytes);
    }
    let mut res = Outputs {
        outputs,
        ..Default::default()
    };
    let rj = dir.join("results.json");
    if rj.is_file() {
        let text = std::fs::read_to_string(&rj)
            .with_context(|| format!("cannot read {}", rj.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", rj.display()))?;
        if let Some(tasks) = v.get("tasks").and_then(|t| t.as_array()) {
            res.tasks_total = Some(tasks.len());
            for t in tasks {
                if let Some(i) = t.get("index").and_then(|i| i.as_u64()) {
                    if !res.outputs.contains_key(&(i as u32)) {
                        res.missing.push(i as u32);
                    }
                }
            }
        }
    }
    if res.outputs.is_empty() {
        bail!("no <task-index>.out files in {} (write them with `coordinator results JOB_ID --out DIR`)", dir.display());
    }
    Ok(res)
}

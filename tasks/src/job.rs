//! The job file (TOML) and the manifests it becomes.
//!
//! A [`JobSpec`] is what a scientist writes (paths relative to the job file). Loading it reads
//! the module and inputs, so it can be turned into a [`JobManifest`] that references every
//! blob by id; the coordinator expands the manifest into one [`TaskManifest`] per task.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::blob::{BlobId, BlobRef};

/// A job's id, assigned by the coordinator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim().parse::<u64>().map(JobId).map_err(|_| {
            format!("not a job id: {s:?} (job ids are numbers, as printed by `coordinator submit`)")
        })
    }
}

/// A task: one index within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId {
    pub job: JobId,
    pub index: u32,
}

impl TaskId {
    /// The seed of the task's deterministic `random_get` stream: every replica of this task
    /// sees the same bytes, different tasks different ones.
    pub fn random_seed(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("peergrid 2026 task random seed v1");
        h.update(&self.job.0.to_le_bytes());
        h.update(&self.index.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.job, self.index)
    }
}

/// How bit-exact a job's results must be, and so which workers may compare them: the job's
/// *determinism class* (job file key `determinism`).
///
/// Results are only ever compared between workers whose engine fingerprints are equal, and
/// the fingerprint names the architecture, its fixed ISA baseline and this setting. Every
/// worker compiles for one fixed baseline per architecture, so the machine code of a module,
/// and with it every NaN bit pattern it produces, is the same on every host of that
/// architecture. NaN canonicalization therefore only buys comparison *across*
/// architectures, at a cost of up to 4x on float-heavy loops.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Determinism {
    /// Bit-exact among workers of one architecture (fixed ISA baseline, NaN bits as the
    /// hardware makes them): the fast default. Replicas of a task are compared, and quorums
    /// formed, only among workers of one architecture.
    #[default]
    Native,
    /// Bit-exact across architectures (NaN canonicalization on): x86_64 and aarch64 workers
    /// agree. What every job ran in before classes existed.
    Portable,
}

impl Determinism {
    /// The job file's word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Determinism::Native => "native",
            Determinism::Portable => "portable",
        }
    }

    /// Whether the engine canonicalizes NaNs in this class.
    pub fn nan_canonicalization(self) -> bool {
        self == Determinism::Portable
    }
}

impl fmt::Display for Determinism {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Determinism {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "native" => Ok(Determinism::Native),
            "portable" => Ok(Determinism::Portable),
            _ => Err(format!(
                "not a determinism class: {s:?} (use \"native\", bit-exact among workers of one architecture, or \"portable\", bit-exact across architectures)"
            )),
        }
    }
}

/// Defaults for keys a job file may leave out.
pub mod defaults {
    pub const QUORUM: u32 = 2;
    pub const MAX_REPLICAS: u32 = 6;
    pub const FUEL: u64 = 20_000_000_000;
    pub const MEMORY_MB: u32 = 256;
    pub const MAX_OUTPUT: u64 = 1 << 20;
    pub const DEADLINE_SECS: u64 = 600;
}

/// Hard limits on what a job may ask for. Every number of a job is checked against these
/// at submission (job file and network manifest alike), so the coordinator never does
/// arithmetic on absurd values (`deadline_secs = i64::MAX` once overflowed its clock).
pub mod limits {
    pub const MAX_TASKS: u64 = 10_000_000;
    pub const MAX_MEMORY_MB: u32 = 4096;
    pub const MAX_OUTPUT: u64 = 256 << 20;
    pub const MAX_REPLICAS: u32 = 64;
    pub const MAX_ARGS: usize = 256;
    pub const MAX_ARG_LEN: usize = 4096;
    /// A job's name is argv[0] of every task and a column of `status`: a line, not a file.
    pub const MAX_NAME_LEN: usize = 256;
    /// 10^15 instructions: days of CPU per replica, far beyond any sane task, and small
    /// enough that credit sums (fuel × replicas × tasks) stay meaningful in a u64.
    pub const MAX_FUEL: u64 = 1_000_000_000_000_000;
    /// 30 days: a replica not reported within a month is lost anyway.
    pub const MAX_DEADLINE_SECS: u64 = 30 * 24 * 3600;
}

/// Check a job's name (job file and network manifest alike): not blank, at most
/// [`limits::MAX_NAME_LEN`] bytes, and no control characters (it is printed by `status`, in
/// logs and as argv[0]; a newline or an escape sequence would forge lines there).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("`name` is empty; give the job a name".into());
    }
    if name.len() > limits::MAX_NAME_LEN {
        return Err(format!(
            "`name` is {} bytes, above the limit of {}; use a shorter name",
            name.len(),
            limits::MAX_NAME_LEN
        ));
    }
    if name.contains(char::is_control) {
        return Err(format!(
            "`name` {name:?} contains a control character; use printable characters only"
        ));
    }
    Ok(())
}

/// The job file as written (every key: docs/job-file.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub name: String,
    pub module: PathBuf,
    #[serde(default = "d_quorum")]
    pub quorum: u32,
    #[serde(default = "d_max_replicas")]
    pub max_replicas: u32,
    #[serde(default = "d_fuel")]
    pub fuel: u64,
    #[serde(default = "d_memory_mb")]
    pub memory_mb: u32,
    #[serde(default = "d_max_output")]
    pub max_output: u64,
    #[serde(default = "d_deadline")]
    pub deadline_secs: u64,
    /// The job's determinism class (`"native"`, the default, or `"portable"`).
    #[serde(default)]
    pub determinism: Determinism,
    /// Generated tasks, `i = 0..count`; `{i}` in args and input is replaced by `i`.
    #[serde(default)]
    pub tasks: Option<TaskGenerator>,
    /// Explicit tasks, after the generated ones.
    #[serde(default)]
    pub task: Vec<ExplicitTask>,
}

fn d_quorum() -> u32 {
    defaults::QUORUM
}
fn d_max_replicas() -> u32 {
    defaults::MAX_REPLICAS
}
fn d_fuel() -> u64 {
    defaults::FUEL
}
fn d_memory_mb() -> u32 {
    defaults::MEMORY_MB
}
fn d_max_output() -> u64 {
    defaults::MAX_OUTPUT
}
fn d_deadline() -> u64 {
    defaults::DEADLINE_SECS
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskGenerator {
    pub count: u64,
    #[serde(default)]
    pub args: Vec<String>,
    /// Optional input path template, e.g. `inputs/{i}.bin`.
    #[serde(default)]
    pub input: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplicitTask {
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub input: Option<PathBuf>,
}

/// Why a job file was rejected. Each message names the problem and the fix.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("cannot read job file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("job file {path} is not valid: {message}")]
    Syntax { path: String, message: String },
    #[error("job file {path}: {message}")]
    Invalid { path: String, message: String },
    #[error("job file {path}: cannot read {what} {file}: {source}")]
    File {
        path: String,
        what: &'static str,
        file: String,
        source: std::io::Error,
    },
}

/// A parsed, validated job file with its paths resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSpec {
    /// The job file itself (for messages).
    pub path: PathBuf,
    pub name: String,
    pub module: PathBuf,
    pub limits: JobLimits,
    /// Which workers may compare its results (see [`Determinism`]).
    pub determinism: Determinism,
    pub tasks: Vec<TaskSpec>,
}

/// Per-job policy and limits, shared by all its tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobLimits {
    pub quorum: u32,
    pub max_replicas: u32,
    pub fuel: u64,
    pub memory_mb: u32,
    pub max_output: u64,
    pub deadline_secs: u64,
}

impl JobLimits {
    /// Check every number against [`limits`]: `Err` is one line naming the key, the value
    /// and the allowed range.
    pub fn check(&self) -> Result<(), String> {
        if self.quorum == 0 {
            return Err("`quorum` must be at least 1".into());
        }
        if self.max_replicas < self.quorum {
            return Err(format!(
                "`quorum` ({}) is larger than `max_replicas` ({}): no task could ever be accepted; raise max_replicas or lower quorum",
                self.quorum, self.max_replicas
            ));
        }
        if self.max_replicas > limits::MAX_REPLICAS {
            return Err(format!(
                "`max_replicas` ({}) is above the limit of {}",
                self.max_replicas,
                limits::MAX_REPLICAS
            ));
        }
        if self.fuel == 0 {
            return Err("`fuel` is 0: every task would run out of fuel at once; give it an instruction budget such as 20_000_000_000".into());
        }
        if self.fuel > limits::MAX_FUEL {
            return Err(format!(
                "`fuel` ({}) is above the limit of {}",
                self.fuel,
                limits::MAX_FUEL
            ));
        }
        if self.memory_mb == 0 || self.memory_mb > limits::MAX_MEMORY_MB {
            return Err(format!(
                "`memory_mb` ({}) must be between 1 and {}",
                self.memory_mb,
                limits::MAX_MEMORY_MB
            ));
        }
        if self.max_output > limits::MAX_OUTPUT {
            return Err(format!(
                "`max_output` ({}) must be at most {} bytes",
                self.max_output,
                limits::MAX_OUTPUT
            ));
        }
        if self.deadline_secs == 0 || self.deadline_secs > limits::MAX_DEADLINE_SECS {
            return Err(format!(
                "`deadline_secs` ({}) must be between 1 and {} (30 days)",
                self.deadline_secs,
                limits::MAX_DEADLINE_SECS
            ));
        }
        Ok(())
    }
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            quorum: defaults::QUORUM,
            max_replicas: defaults::MAX_REPLICAS,
            fuel: defaults::FUEL,
            memory_mb: defaults::MEMORY_MB,
            max_output: defaults::MAX_OUTPUT,
            deadline_secs: defaults::DEADLINE_SECS,
        }
    }
}

/// One task of a spec: its argv tail and optional input file (resolved path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskSpec {
    pub args: Vec<String>,
    pub input: Option<PathBuf>,
}

impl JobSpec {
    /// Read, parse and validate a job file. Does not read the module or inputs; see
    /// [`JobSpec::load_blobs`].
    pub fn from_file(path: &Path) -> Result<JobSpec, JobError> {
        let shown = show_path(path);
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: shown.clone(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        JobSpec::parse(&text, base, path)
    }

    /// Parse and validate job file text; relative paths resolve against `base`.
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<JobSpec, JobError> {
        let shown = show_path(path);
        let file: JobFile = toml::from_str(text).map_err(|e| JobError::Syntax {
            path: shown.clone(),
            message: one_line(&e.message().trim().replace('\n', ": ")) + &span_hint(text, e.span()),
        })?;
        let invalid = |message: String| JobError::Invalid {
            path: shown.clone(),
            message,
        };
        check_name(&file.name).map_err(invalid)?;
        let job_limits = JobLimits {
            quorum: file.quorum,
            max_replicas: file.max_replicas,
            fuel: file.fuel,
            memory_mb: file.memory_mb,
            max_output: file.max_output,
            deadline_secs: file.deadline_secs,
        };
        job_limits.check().map_err(invalid)?;
        let module = base.join(&file.module);
        if !module.is_file() {
            return Err(invalid(format!(
                "module {} does not exist (paths are relative to the job file)",
                show_path(&module)
            )));
        }
        let mut tasks = Vec::new();
        if let Some(g) = &file.tasks {
            if g.count > limits::MAX_TASKS {
                return Err(invalid(format!(
                    "[tasks] count {} is above the limit of {}",
                    g.count,
                    limits::MAX_TASKS
                )));
            }
            for i in 0..g.count {
                let sub = |s: &str| s.replace("{i}", &i.to_string());
                tasks.push(TaskSpec {
                    args: g.args.iter().map(|a| sub(a)).collect(),
                    input: g.input.as_deref().map(|p| base.join(sub(p))),
                });
            }
        }
        for t in &file.task {
            tasks.push(TaskSpec {
                args: t.args.clone(),
                input: t.input.as_ref().map(|p| base.join(p)),
            });
        }
        if tasks.is_empty() {
            return Err(invalid(
                "no tasks: add a [tasks] section with `count` or one or more [[task]] entries"
                    .into(),
            ));
        }
        if tasks.len() as u64 > limits::MAX_TASKS {
            return Err(invalid(format!(
                "{} tasks is above the limit of {}",
                tasks.len(),
                limits::MAX_TASKS
            )));
        }
        for (i, t) in tasks.iter().enumerate() {
            if t.args.len() > limits::MAX_ARGS
                || t.args.iter().any(|a| a.len() > limits::MAX_ARG_LEN)
            {
                return Err(invalid(format!(
                    "task {i}: too many or too long args (at most {} args of {} bytes)",
                    limits::MAX_ARGS,
                    limits::MAX_ARG_LEN
                )));
            }
            if let Some(p) = &t.input {
                if !p.is_file() {
                    return Err(invalid(format!(
                        "task {i}: input {} does not exist (paths are relative to the job file)",
                        show_path(p)
                    )));
                }
            }
        }
        Ok(JobSpec {
            path: path.to_path_buf(),
            name: file.name,
            module,
            limits: job_limits,
            determinism: file.determinism,
            tasks,
        })
    }

    /// Read the module and inputs, hash them, and build the manifest plus the blobs it
    /// references (each distinct blob once).
    pub fn load_blobs(&self) -> Result<(JobManifest, BTreeMap<BlobId, Vec<u8>>), JobError> {
        let shown = show_path(&self.path);
        let mut blobs = BTreeMap::new();
        let mut read = |what: &'static str, p: &Path| -> Result<BlobRef, JobError> {
            let bytes = std::fs::read(p).map_err(|source| JobError::File {
                path: shown.clone(),
                what,
                file: show_path(p),
                source,
            })?;
            let r = BlobRef::of(&bytes);
            blobs.entry(r.id).or_insert(bytes);
            Ok(r)
        };
        let module = read("module", &self.module)?;
        let mut inputs: BTreeMap<PathBuf, BlobRef> = BTreeMap::new();
        let mut tasks = Vec::with_capacity(self.tasks.len());
        for t in &self.tasks {
            let input = match &t.input {
                None => None,
                Some(p) => Some(match inputs.get(p) {
                    Some(r) => *r,
                    None => {
                        let r = read("input", p)?;
                        inputs.insert(p.clone(), r);
                        r
                    }
                }),
            };
            tasks.push(TaskEntry {
                args: t.args.clone(),
                input,
            });
        }
        Ok((
            JobManifest {
                name: self.name.clone(),
                module,
                limits: self.limits,
                tasks,
            },
            blobs,
        ))
    }
}

/// A path as error messages show it: control characters escaped, so a hostile job file
/// (an input named `x\n`) cannot break the one-line error.
fn show_path(p: &Path) -> String {
    one_line(&p.display().to_string())
}

/// `s` with its control characters escaped (`\n`, `\u{1b}`); the rest as is.
fn one_line(s: &str) -> String {
    if !s.contains(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn span_hint(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// What a submitter uploads: the job with every file replaced by its blob id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobManifest {
    pub name: String,
    pub module: BlobRef,
    pub limits: JobLimits,
    pub tasks: Vec<TaskEntry>,
}

impl JobManifest {
    /// Every blob the job references, each once.
    pub fn blobs(&self) -> Vec<BlobRef> {
        let mut v = vec![self.module];
        let mut seen = std::collections::HashSet::from([self.module.id]);
        for t in &self.tasks {
            if let Some(i) = t.input {
                // (A set, not `v.contains`: a million inputs must not cost 10^12 compares.)
                if seen.insert(i.id) {
                    v.push(i);
                }
            }
        }
        v
    }

    /// The manifest of task `index` of job `job`.
    pub fn task(&self, job: JobId, index: u32) -> Option<TaskManifest> {
        let t = self.tasks.get(index as usize)?;
        Some(TaskManifest {
            id: TaskId { job, index },
            name: self.name.clone(),
            module: self.module,
            input: t.input,
            args: t.args.clone(),
            fuel: self.limits.fuel,
            memory_mb: self.limits.memory_mb,
            max_output: self.limits.max_output,
        })
    }
}

/// One task of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    pub args: Vec<String>,
    pub input: Option<BlobRef>,
}

/// Everything a worker needs to run one task: the unit of assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskManifest {
    pub id: TaskId,
    /// The job's name: argv[0] of the guest.
    pub name: String,
    pub module: BlobRef,
    pub input: Option<BlobRef>,
    pub args: Vec<String>,
    pub fuel: u64,
    pub memory_mb: u32,
    pub max_output: u64,
}

impl TaskManifest {
    /// The guest's argv: `[name, args...]`.
    pub fn argv(&self) -> Vec<String> {
        std::iter::once(self.name.clone())
            .chain(self.args.iter().cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with_module() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("m.wasm"), b"\0asm\x01\0\0\0").unwrap();
        std::fs::create_dir(d.path().join("inputs")).unwrap();
        for i in 0..3 {
            std::fs::write(d.path().join(format!("inputs/{i}.bin")), [i as u8; 10]).unwrap();
        }
        d
    }

    fn parse(d: &tempfile::TempDir, text: &str) -> Result<JobSpec, JobError> {
        JobSpec::parse(text, d.path(), &d.path().join("job.toml"))
    }

    #[test]
    fn generated_and_explicit_tasks_expand_in_order() {
        let d = dir_with_module();
        let spec = parse(
            &d,
            r#"
            name = "primes"
            module = "m.wasm"
            quorum = 2
            max_replicas = 6
            fuel = 20_000_000_000
            [tasks]
            count = 3
            args = ["{i}", "100"]
            input = "inputs/{i}.bin"
            [[task]]
            args = ["x"]
            input = "inputs/0.bin"
        "#,
        )
        .unwrap();
        assert_eq!(spec.tasks.len(), 4);
        assert_eq!(spec.tasks[2].args, vec!["2", "100"]);
        assert_eq!(spec.tasks[3].args, vec!["x"]);
        assert_eq!(
            spec.tasks[1].input.as_deref(),
            Some(d.path().join("inputs/1.bin").as_path())
        );
        let (m, blobs) = spec.load_blobs().unwrap();
        // module + 3 distinct inputs; task 3 reuses input 0.
        assert_eq!(blobs.len(), 4);
        assert_eq!(m.tasks[3].input, m.tasks[0].input);
        let t = m.task(JobId(7), 2).unwrap();
        assert_eq!(t.argv(), vec!["primes", "2", "100"]);
        assert_eq!(t.fuel, 20_000_000_000);
    }

    #[test]
    fn bad_job_files_get_one_line_errors_naming_the_problem() {
        let d = dir_with_module();
        let long_name = format!(
            "name = \"{}\"\nmodule = \"m.wasm\"\n[tasks]\ncount = 1",
            "x".repeat(257)
        );
        let cases = [
            ("name = \"x\"\nmodule = \"nope.wasm\"\n[tasks]\ncount = 1", "does not exist"),
            ("name = \"x\"\nmodule = \"m.wasm\"\nquorum = 5\nmax_replicas = 3\n[tasks]\ncount = 1", "larger than `max_replicas`"),
            ("name = \"x\"\nmodule = \"m.wasm\"\nfuel = 0\n[tasks]\ncount = 1", "`fuel` is 0"),
            ("name = \"x\"\nmodule = \"m.wasm\"\ncolour = 1\n[tasks]\ncount = 1", "unknown field"),
            ("name = \"x\"\nmodule = \"m.wasm\"", "no tasks"),
            ("name = \"x\"\nmodule = \"m.wasm\"\n[[task]]\ninput = \"inputs/9.bin\"", "input"),
            ("name = [1", "line 1"),
            ("name = \"x\"\nmodule = \"m.wasm\"\ndeadline_secs = 9223372036854775807\n[tasks]\ncount = 1", "`deadline_secs` (9223372036854775807) must be between 1 and 2592000"),
            ("name = \"x\"\nmodule = \"m.wasm\"\nfuel = 9223372036854775807\n[tasks]\ncount = 1", "above the limit of 1000000000000000"),
            ("name = \"x\"\nmodule = \"m.wasm\"\nmemory_mb = 4294967295\n[tasks]\ncount = 1", "between 1 and 4096"),
            ("name = \"x\"\nmodule = \"m.wasm\"\nmax_output = 9223372036854775807\n[tasks]\ncount = 1", "at most 268435456"),
            ("name = \"x\"\nmodule = \"m.wasm\"\n[tasks]\ncount = 9223372036854775807", "above the limit of 10000000"),
            ("name = \"a\\u001b[31mb\"\nmodule = \"m.wasm\"\n[tasks]\ncount = 1", "contains a control character"),
            ("name = \"a\\nb\"\nmodule = \"m.wasm\"\n[tasks]\ncount = 1", "contains a control character"),
            (long_name.as_str(), "above the limit of 256"),
            // Control characters in a path come back escaped, not as a second line.
            ("name = \"x\"\nmodule = \"m.wasm\"\n[[task]]\ninput = \"inputs/x.b\\n\"", "inputs/x.b\\n does not exist"),
            ("name = \"x\"\nmodule = \"m\\r\\u001b[2J.wasm\"\n[tasks]\ncount = 1", "m\\r\\u{1b}[2J.wasm does not exist"),
        ];
        for (text, want) in cases {
            let err = parse(&d, text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(
                !err.contains(char::is_control),
                "error should be one line: {err:?}"
            );
        }
    }

    #[test]
    fn task_seeds_differ_per_task() {
        let a = TaskId {
            job: JobId(1),
            index: 0,
        }
        .random_seed();
        let b = TaskId {
            job: JobId(1),
            index: 1,
        }
        .random_seed();
        assert_ne!(a, b);
        assert_eq!(
            a,
            TaskId {
                job: JobId(1),
                index: 0
            }
            .random_seed()
        );
    }
}

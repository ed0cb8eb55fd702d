//! Logs through `tracing`: the console, a file rotated by size, JSON lines,
//! or several at once, as [`LoggingConfig`] says.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::Level;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use super::config::{ConfigError, LoggerKind, LoggingConfig};

/// A layer of the subscriber, boxed so that the set can be chosen at run time.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// Where console lines go.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConsoleStreams {
    /// Warnings and errors to stderr, the rest to stdout.
    #[default]
    Split,
    /// Everything to stderr: for tools whose stdout is their output.
    Stderr,
}

/// Builds the log layers `config` asks for.
pub fn log_layers(config: &LoggingConfig) -> Result<Vec<BoxedLayer>, ConfigError> {
    log_layers_with(config, ConsoleStreams::Split)
}

/// Builds the log layers `config` asks for, with console lines going to
/// `streams`.
pub fn log_layers_with(
    config: &LoggingConfig,
    streams: ConsoleStreams,
) -> Result<Vec<BoxedLayer>, ConfigError> {
    let filter = |level: &str| {
        EnvFilter::try_new(level).map_err(|e| ConfigError::Invalid {
            origin: "logging".into(),
            message: format!("`{level}` is not a level or filter: {e}"),
        })
    };
    let file = || -> Result<RotatingFile, ConfigError> {
        let path = config
            .file_path
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid {
                origin: "logging".into(),
                message: "file_path must be set for a file logger".into(),
            })?;
        RotatingFile::open(path, config.max_size_mb * 1024 * 1024, config.backup_count)
    };
    let mut layers: Vec<BoxedLayer> = Vec::new();
    let console = |level: &str| -> Result<BoxedLayer, ConfigError> {
        let ansi = config.use_colors
            && std::io::stderr().is_terminal()
            && (streams == ConsoleStreams::Stderr || std::io::stdout().is_terminal());
        let layer = tracing_subscriber::fmt::layer().with_ansi(ansi);
        Ok(match streams {
            // Warnings and errors to stderr, the rest to stdout.
            ConsoleStreams::Split => layer
                .with_writer(
                    std::io::stderr
                        .with_max_level(Level::WARN)
                        .or_else(std::io::stdout),
                )
                .with_filter(filter(level)?)
                .boxed(),
            ConsoleStreams::Stderr => layer
                .with_writer(std::io::stderr)
                .with_filter(filter(level)?)
                .boxed(),
        })
    };
    let to_file = |json: bool| -> Result<BoxedLayer, ConfigError> {
        let writer = file()?;
        Ok(if json {
            json_layer(writer)
                .with_filter(filter(&config.level)?)
                .boxed()
        } else {
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false)
                .with_filter(filter(&config.level)?)
                .boxed()
        })
    };
    match config.default_logger {
        LoggerKind::Console => layers.push(console(&config.level)?),
        LoggerKind::File => layers.push(to_file(config.json_format)?),
        LoggerKind::Json => match config.file_path {
            Some(_) => layers.push(to_file(true)?),
            None => layers.push(
                json_layer(std::io::stdout)
                    .with_filter(filter(&config.level)?)
                    .boxed(),
            ),
        },
        LoggerKind::Composite => {
            layers.push(console(&config.console_min_level)?);
            layers.push(to_file(config.json_format)?);
        }
    }
    Ok(layers)
}

/// JSON lines: one object per event, its fields at the top level, with the
/// fields of the spans it happened in (the workflow and step it is about).
fn json_layer<W>(writer: W) -> impl Layer<Registry> + Send + Sync
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(true)
        .with_writer(writer)
}

/// Installs the log layers as the global subscriber. Fails if one is set.
pub fn init_logging(config: &LoggingConfig, streams: ConsoleStreams) -> Result<(), ConfigError> {
    tracing_subscriber::registry()
        .with(log_layers_with(config, streams)?)
        .try_init()
        .map_err(|e| ConfigError::Invalid {
            origin: "logging".into(),
            message: format!("a global subscriber is already set: {e}"),
        })
}

/// A log file rotated by size: when a line would take it past the limit,
/// `app.log` becomes `app.log.1`, `app.log.1` becomes `app.log.2`, and so on
/// up to `backup_count`; the oldest is dropped.
#[derive(Clone)]
pub struct RotatingFile {
    inner: Arc<Mutex<FileState>>,
}

struct FileState {
    path: PathBuf,
    file: File,
    size: u64,
    max_bytes: u64,
    backups: u32,
}

impl RotatingFile {
    /// Opens (appending to) `path`, creating its directory.
    pub fn open(path: &Path, max_bytes: u64, backups: u32) -> Result<Self, ConfigError> {
        let fail = |e: std::io::Error| ConfigError::Read {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(fail)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(fail)?;
        let size = file.metadata().map_err(fail)?.len();
        Ok(Self {
            inner: Arc::new(Mutex::new(FileState {
                path: path.to_path_buf(),
                file,
                size,
                max_bytes: max_bytes.max(1),
                backups,
            })),
        })
    }
}

impl FileState {
    fn rotate(&mut self) -> std::io::Result<()> {
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        if self.backups == 0 {
            self.file = File::create(&self.path)?;
        } else {
            for n in (1..self.backups).rev() {
                let from = numbered(n);
                if from.exists() {
                    std::fs::rename(&from, numbered(n + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// Writes through a [`RotatingFile`].
pub struct RotatingWriter {
    inner: Arc<Mutex<FileState>>,
}

impl Write for RotatingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut state = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if state.size > 0 && state.size + buf.len() as u64 > state.max_bytes {
            state.rotate()?;
        }
        state.file.write_all(buf)?;
        state.size += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .file
            .flush()
    }
}

impl<'a> MakeWriter<'a> for RotatingFile {
    type Writer = RotatingWriter;

    fn make_writer(&'a self) -> Self::Writer {
        RotatingWriter {
            inner: self.inner.clone(),
        }
    }
}

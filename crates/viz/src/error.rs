//! Errors of the visualisation crate.

/// Result with [`VizError`].
pub type Result<T> = std::result::Result<T, VizError>;

/// What can go wrong while drawing or writing a report.
#[derive(Debug, thiserror::Error)]
pub enum VizError {
    /// The data handed in cannot be drawn; names what and why.
    #[error("{what}: {why}")]
    Invalid {
        /// The offending input, e.g. `loss series "pre-training"`.
        what: String,
        /// What is wrong with it.
        why: String,
    },
    /// plotters failed while drawing a chart.
    #[error("drawing {chart}: {why}")]
    Draw {
        /// The chart's title.
        chart: String,
        /// The backend's message.
        why: String,
    },
    /// Writing a file failed; names the file.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// Graphviz's `dot` is not on PATH.
    #[error("graphviz `dot` was not found on PATH (install the graphviz package to render DOT files)")]
    GraphvizMissing,
    /// Graphviz's `dot` ran and failed.
    #[error("graphviz `dot -T{format}` failed: {why}")]
    Graphviz {
        /// The output format asked for.
        format: String,
        /// Its exit status and error output.
        why: String,
    },
}

impl VizError {
    pub(crate) fn invalid(what: impl Into<String>, why: impl Into<String>) -> Self {
        VizError::Invalid { what: what.into(), why: why.into() }
    }
}

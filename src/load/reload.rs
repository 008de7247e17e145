//! Reloading `[load]` without a restart (SIGHUP and `POST /v1/config/reload`): the whole file is
//! validated first and only `[load]` is applied, so an invalid file changes nothing.

use std::path::PathBuf;
use std::sync::Arc;

use super::LoadControl;
use crate::config::{ConfigFile, LoadSection};
use crate::metrics::LoadMetrics;

/// Reloads `[load]` from the config file: validated first, applied only when valid.
#[derive(Clone)]
pub struct Reloader {
    file: Option<PathBuf>,
    load: Arc<LoadControl>,
    metrics: LoadMetrics,
}

impl Reloader {
    /// A reloader of `file`'s `[load]` section into `load`, counted in `metrics`.
    pub fn new(file: Option<PathBuf>, load: Arc<LoadControl>, metrics: LoadMetrics) -> Self {
        Self { file, load, metrics }
    }

    /// Re-read the file and apply its `[load]` section if the whole file is valid; the applied
    /// section, or why the previous settings stay.
    pub fn reload(&self) -> Result<LoadSection, String> {
        let res = self.read();
        match &res {
            Ok(section) => {
                self.load.reload(section.clone());
                self.metrics.reloads.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                tracing::warn!(error = %e, "config reload rejected; the previous [load] settings stay");
                self.metrics.reloads.with_label_values(&["error"]).inc();
            }
        }
        res
    }

    fn read(&self) -> Result<LoadSection, String> {
        let Some(path) = &self.file else {
            return Err("the node was started without --config: there is no file to reload".into());
        };
        let file = ConfigFile::from_file(path).map_err(|e| e.to_string())?;
        // The whole file must be valid (a typo elsewhere is reported now, not at the next
        // restart), but only `[load]` takes effect without a restart.
        file.validate().map_err(|e| e.to_string())?;
        Ok(file.load)
    }
}

//! The progress bar on stderr: shown only on a terminal and without `--quiet`, so schedulers,
//! pipes and tests see nothing of it.

use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Called once by the binary: whether stderr is a terminal a person watches.
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// A bar over `total` units (source versions, files), or a hidden one when bars are off or
/// there is too little work to be worth drawing.
pub fn bar(total: u64, unit: &str) -> ProgressBar {
    if !ENABLED.load(Ordering::Relaxed) || total < 2 {
        return ProgressBar::hidden();
    }
    let style = ProgressStyle::with_template(&format!(
        "{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{msg}}"
    ))
    .expect("a valid template")
    .progress_chars("=> ");
    ProgressBar::new(total).with_style(style)
}

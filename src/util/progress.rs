//! The progress bar (on a terminal; elsewhere log lines on stderr).

/// A progress bar over `total` items, hidden when `hidden`.
pub fn progress_bar(total: usize, hidden: bool) -> indicatif::ProgressBar {
    if hidden {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:30}] {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb
}

pub fn say(pb: &indicatif::ProgressBar, msg: &str) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

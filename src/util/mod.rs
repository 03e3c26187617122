//! Small helpers shared across layers, one file per concern.

pub mod fs;
pub mod hash;
pub mod math;
pub mod progress;
pub mod rng;
pub mod system;
pub mod text;

pub use fs::{create_dir_all, read_to_string, tmp_path, write_atomic};
pub use hash::Fnv64;
pub use math::{d_log_ndtr, gaussian_preference_probability, log_ndtr, log_sigmoid};
pub use progress::{progress_bar, say};
pub use rng::Rng;
pub use system::{memtrace, peak_rss_bytes, tune_allocator, with_workers_awake};
pub use text::{closest, edit_distance, text_histogram};

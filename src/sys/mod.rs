//! Low-level helpers shared by every layer: files, locks, usage accounting.

pub mod fs;
pub mod lock;
pub mod memory;
pub mod netns;

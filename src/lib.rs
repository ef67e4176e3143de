//! walhoard as a library: the binary (`src/main.rs`) is a thin command line over this.
//!
//! - [`config`]: the pghoard.json-compatible configuration file.
//!   where pghoard has the format).

pub mod config;

//! walhoard as a library: the binary (`src/main.rs`) is a thin command line over this.
//!
//! - [`basebackup`]: taking a basebackup into a site's archive (basic/pipe and local-tar).
//! - [`config`]: the pghoard.json-compatible configuration file.
//! - [`pipeline`]: compression of archive objects, byte-compatible with pghoard.
//! - [`storage`]: object storage over OpenDAL, with retries and alert files.

pub mod basebackup;
pub mod config;
pub mod pipeline;
pub mod storage;

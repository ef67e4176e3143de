//! The path every archived byte takes: compress, then encrypt, then store; and back.

pub mod blake2s;
pub mod blocking;
pub mod compression;
pub mod cpu;
pub mod encryption;
pub mod handoff;
pub mod hash;
pub mod pghoa1;
pub mod transfer;

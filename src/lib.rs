pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod failpoint;
pub mod source;

//! The one integration-test binary (one link step for DataFusion + delta-rs).
//!
//! Tests drive the real `sessionizer` binary on Delta tables in temporary folders and assert
//! table contents, read back through delta-rs.

mod bad_input;
mod batches;
mod crash;
mod fencing;
mod help;
mod live_mode;
mod lock;
mod models;
mod ops;
mod real_tables;
mod s3;
mod safety;
mod shards;
mod source_commits;
mod util;
mod walkthrough;
